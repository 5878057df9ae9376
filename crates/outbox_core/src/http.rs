//! The HTTP transport: JSON batches to each endpoint's `/api/batch` with the `X-API-Key` header,
//! keep-alive, bounded connect and request timeouts, TLS verified by default (custom CA and client
//! certificate optional), redirects never followed.

use std::time::Duration;

use crate::dispatch::{batch_body, scrub, Prepared, Response, CONNECT_FAILED};
use crate::transport::{reply_cap, Body, Call, ClientConfig, Transport};

/// Of a reply that is not a 200, what is read: its text is only quoted in the reason.
const ERROR_REPLY_BYTES: usize = 64 << 10;

pub struct HttpTransport {
    http: reqwest::Client,
    /// The `/api/batch` URL of each endpoint.
    batch_urls: Vec<String>,
    api_key: String,
}

impl HttpTransport {
    /// Errors say which setting is wrong and never contain the API key.
    pub fn new(urls: &[String], config: &ClientConfig) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            // Below Centrifugo's own 30 s (its HTTP server closes idle keep-alive connections then).
            .pool_idle_timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .no_proxy()
            // A redirect would take the API key (a custom header, which reqwest keeps across
            // hosts) and the batch to wherever it points, and its answer would count as
            // Centrifugo's: it is an answer of its own, retried with its status shown.
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(config.tls_insecure_skip_verify);
        if !config.tls_root_ca.is_empty() {
            let pem = std::fs::read(&config.tls_root_ca)
                .map_err(|e| format!("centrifugo.http_tls_root_ca: cannot read {}: {e}", config.tls_root_ca))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("centrifugo.http_tls_root_ca: not a PEM certificate: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
        match (config.tls_cert.is_empty(), config.tls_key.is_empty()) {
            (true, true) => {}
            (false, false) => {
                let mut pem = std::fs::read(&config.tls_cert)
                    .map_err(|e| format!("centrifugo.http_tls_cert: cannot read {}: {e}", config.tls_cert))?;
                pem.push(b'\n');
                pem.extend(
                    std::fs::read(&config.tls_key)
                        .map_err(|e| format!("centrifugo.http_tls_key: cannot read the key file: {e}"))?,
                );
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    format!("centrifugo.http_tls_cert/http_tls_key: not a PEM certificate and key: {e}")
                })?;
                builder = builder.identity(identity);
            }
            _ => return Err("centrifugo.http_tls_cert and centrifugo.http_tls_key must be set together".into()),
        }
        let http = builder.build().map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(HttpTransport {
            http,
            batch_urls: urls.iter().map(|u| crate::settings::batch_url(u)).collect(),
            api_key: config.api_key.clone(),
        })
    }
}

impl HttpTransport {
    /// A batch request to endpoint `endpoint`, with the key.
    fn post(&self, endpoint: usize, timeout: Duration, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.http
            .post(&self.batch_urls[endpoint])
            .timeout(timeout)
            .header("X-API-Key", &self.api_key)
            .header("Content-Type", "application/json")
            .body(body)
    }
}

impl Transport for HttpTransport {
    fn body(&self, commands: &[Prepared]) -> Body {
        Body::new(batch_body(commands))
    }

    fn call(&self, endpoint: usize, body: Body, timeout: Duration) -> Call {
        let body: Vec<u8> = match body.take() {
            Ok(body) => body,
            Err(response) => return Box::pin(async move { response }),
        };
        let cap = reply_cap(body.len());
        let request = self.post(endpoint, timeout, body);
        let api_key = self.api_key.clone();
        Box::pin(async move {
            let result = async {
                let resp = request.send().await.map_err(|e| describe(&e))?;
                let status = resp.status().as_u16();
                read_reply(resp, status, cap).await.map(|body| Response::Http { status, body })
            }
            .await;
            result.unwrap_or_else(|e| Response::Transport(scrub(&e, &[&api_key])))
        })
    }

    fn probe(&self, endpoint: usize, timeout: Duration) -> Call {
        let request = self.post(endpoint, timeout, &b"{\"commands\":[]}"[..]);
        Box::pin(async move {
            match request.send().await {
                Ok(resp) => Response::Http { status: resp.status().as_u16(), body: Vec::new() },
                Err(_) => Response::Transport("probe failed".into()),
            }
        })
    }
}

/// The body of `resp` (HTTP `status`), or why it was not read whole: a 200 longer than `max`
/// bytes (announced or as it came; nothing past it is read), or a transport error. Of another
/// status, the first [`ERROR_REPLY_BYTES`] are read: the status is what counts.
async fn read_reply(mut resp: reqwest::Response, status: u16, max: usize) -> Result<Vec<u8>, String> {
    let too_long = || {
        format!(
            "a reply (HTTP {status}) longer than {max} bytes, more than Centrifugo answers to this batch, was not read"
        )
    };
    if status == 200 && resp.content_length().is_some_and(|len| len > max as u64) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if status != 200 && body.len() + chunk.len() > ERROR_REPLY_BYTES {
            body.extend_from_slice(&chunk[..ERROR_REPLY_BYTES - body.len()]);
            break;
        }
        if body.len() + chunk.len() > max {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A one-line description of a transport error, with its causes.
fn describe(e: &reqwest::Error) -> String {
    // A connect timeout is a connect failure: the request never went out.
    let mut text = if e.is_connect() {
        CONNECT_FAILED.to_owned()
    } else if e.is_timeout() {
        "timeout".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
