//! The gRPC transport towards Centrifugo's server API (`grpc_api` in Centrifugo's configuration):
//! the `Batch` RPC of `CentrifugoApi`, with the API key as `authorization: apikey <key>` metadata.
//!
//! Outbox commands are JSON (the outbox's `payload` column); here each becomes the protobuf
//! message Centrifugo's gRPC API takes, read as Centrifugo's HTTP API reads the same JSON (Go's
//! `encoding/json`: unknown fields skipped, `null` is the zero value, `data`/`info` are raw JSON
//! whose text travels as bytes). Replies are mapped onto the model [`crate::dispatch`] classifies,
//! so both transports give the same outcomes.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::command::Method;
use crate::dispatch::{ChannelResponse, ErrorBody, Prepared, Reply, Response, CONNECT_FAILED};
use crate::transport::{reply_cap, Body, Call, ClientConfig, Transport};

/// The message types and client generated from `proto/centrifugo/api.proto` (Centrifugo v6.9.6).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("centrifugal.centrifugo.api");
}

use proto::centrifugo_api_client::CentrifugoApiClient;

include!(concat!(env!("OUT_DIR"), "/request_fields.rs"));

/// What Centrifugo's gRPC server accepts by default (grpc-go's limit, `grpc_api.max_receive_message_size`).
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

/// The gRPC framing and idempotency key a row adds to a batch, beyond its payload text.
pub const PER_COMMAND_OVERHEAD: usize = 128;

/// A raw JSON field (Centrifugo's `Raw`): the value's text, as bytes.
pub(crate) fn raw_json<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    <&'de RawValue>::deserialize(d).map(|raw| raw.get().as_bytes().to_vec())
}

/// Any other field: `null` reads as the zero value, as Go's `encoding/json` leaves it.
pub(crate) fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A list of strings; a `null` element is an empty string, as in Go.
pub(crate) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Option::<Vec<Option<String>>>::deserialize(d)?.unwrap_or_default();
    Ok(list.into_iter().map(Option::unwrap_or_default).collect())
}

/// A map of strings; a `null` value is an empty string, as in Go.
pub(crate) fn string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::HashMap<String, String>, D::Error> {
    let map = Option::<std::collections::HashMap<String, Option<String>>>::deserialize(d)?.unwrap_or_default();
    Ok(map.into_iter().map(|(k, v)| (k, v.unwrap_or_default())).collect())
}

/// The keys of a JSON object in order, duplicates kept.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// `payload` with its keys as Go's `encoding/json` matches them to the fields of `message`: an
/// exact name, else the same name in another case; a later key for the same field wins; keys
/// of no field are dropped. None when `payload` already reads that way (every key names a field
/// exactly, once: what the SQL API writes), so it is read as it is.
fn go_keys(payload: &str, message: &str) -> Result<Option<String>, String> {
    let fields = FIELDS.iter().find(|(m, _)| *m == message).map_or(&[][..], |(_, f)| *f);
    let Entries(entries) =
        serde_json::from_str(payload).map_err(|e| short(format!("payload is not a JSON object: {e}")))?;
    let mut chosen: Vec<Option<&RawValue>> = vec![None; fields.len()];
    let mut as_is = true;
    for (key, value) in entries {
        let exact = fields.iter().position(|f| *f == key);
        let field = exact.or_else(|| fields.iter().position(|f| f.eq_ignore_ascii_case(&key)));
        match field {
            Some(i) => {
                as_is &= exact.is_some() && chosen[i].is_none();
                chosen[i] = Some(value);
            }
            None => as_is = false,
        }
    }
    if as_is {
        return Ok(None);
    }
    let mut out = String::with_capacity(payload.len());
    out.push('{');
    for (name, value) in fields.iter().zip(chosen) {
        if let Some(value) = value {
            if out.len() > 1 {
                out.push(',');
            }
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            out.push_str(value.get());
        }
    }
    out.push('}');
    Ok(Some(out))
}

/// At most 200 bytes of `text` (a reason stored with a dead letter and logged: a rejected
/// value may be large).
fn short(mut text: String) -> String {
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// `command` as a protobuf `Command`; an error says why Centrifugo would refuse its JSON.
pub fn command(command: &Prepared) -> Result<proto::Command, String> {
    fn read<T: for<'a> Deserialize<'a>>(payload: &str, message: &str) -> Result<Option<Box<T>>, String> {
        // One pass where every key names a field exactly, once (what the SQL API writes): the
        // request messages refuse unknown and repeated keys, so what they accept reads as in Go.
        // Anything else is read again with its keys as Go matches them.
        // (serde would also read a struct from a JSON array: only an object is tried in one pass.)
        if payload.trim_start().starts_with('{') {
            if let Ok(message) = serde_json::from_str::<T>(payload) {
                return Ok(Some(Box::new(message)));
            }
        }
        let rewritten = go_keys(payload, message)?;
        serde_json::from_str::<T>(rewritten.as_deref().unwrap_or(payload))
            .map(|m| Some(Box::new(m)))
            .map_err(|e| short(format!("payload not valid for Centrifugo's API: {e}")))
    }
    let payload = command.payload.as_str();
    let mut out = proto::Command::default();
    match command.method {
        Method::Publish => out.publish = read(payload, "PublishRequest")?,
        Method::Broadcast => out.broadcast = read(payload, "BroadcastRequest")?,
        Method::Subscribe => out.subscribe = read(payload, "SubscribeRequest")?,
        Method::Unsubscribe => out.unsubscribe = read(payload, "UnsubscribeRequest")?,
        Method::Disconnect => out.disconnect = read(payload, "DisconnectRequest")?,
        Method::Refresh => out.refresh = read(payload, "RefreshRequest")?,
        Method::HistoryRemove => out.history_remove = read(payload, "HistoryRemoveRequest")?,
    }
    Ok(out)
}

/// One sequential `Batch` request of `commands`; an error names the first command that cannot
/// be sent (Centrifugo's HTTP API would refuse such a batch as a whole, with HTTP 400).
pub fn batch_request<'a>(commands: impl IntoIterator<Item = &'a Prepared>) -> Result<proto::BatchRequest, String> {
    let commands = commands.into_iter().map(command).collect::<Result<Vec<_>, _>>()?;
    Ok(proto::BatchRequest { commands, parallel: false })
}

/// Centrifugo's replies, as [`crate::dispatch`] reads them.
pub fn replies(response: proto::BatchResponse) -> Vec<Reply> {
    let error = |e: Option<proto::Error>| e.map(|e| ErrorBody { code: e.code, message: e.message });
    response
        .replies
        .into_iter()
        .map(|reply| Reply {
            error: error(reply.error.map(|e| *e)),
            broadcast: reply.broadcast.map(|b| crate::dispatch::BroadcastResult {
                responses: b.responses.into_iter().map(|r| ChannelResponse { error: error(r.error) }).collect(),
            }),
        })
        .collect()
}

/// What one call's failure becomes: a gRPC status Centrifugo sent, or a transport failure
/// (connect failures marked as such, so failover knows the request never left).
pub fn status_response(status: &tonic::Status, secret: &str) -> Response {
    use tonic::Code;
    let mut detail = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    let mut connect = false;
    let mut timed_out = status.message() == tonic::TimeoutExpired(()).to_string();
    while let Some(s) = source {
        let text = s.to_string();
        connect |=
            s.downcast_ref::<tonic::ConnectError>().is_some() || text.contains("tcp connect error") || is_connect_io(s);
        timed_out |= s.downcast_ref::<tonic::TimeoutExpired>().is_some();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    let detail = crate::dispatch::scrub(&detail, &[secret]);
    // Not a gRPC server's answer: a proxy's plain HTTP response, which tonic reports as a status
    // "mapped from HTTP status code N". Read it as the HTTP transport reads that status.
    if let Some(code) = status.message().split("mapped from HTTP status code ").nth(1) {
        if let Ok(http) = code.trim().parse::<u16>() {
            return Response::Http { status: http, body: detail.into_bytes() };
        }
    }
    match status.code() {
        // No answer from Centrifugo itself: the channel could not connect or lost the connection.
        Code::Unavailable if connect => Response::Transport(format!("{CONNECT_FAILED}: {detail}")),
        // The deadline sent along (grpc-timeout) ran out on the client's side first.
        Code::Cancelled if timed_out => Response::Transport(format!("timeout: {detail}")),
        Code::Unavailable | Code::Cancelled => Response::Transport(format!("request failed: {detail}")),
        Code::DeadlineExceeded => Response::Transport(format!("timeout: {detail}")),
        code => Response::Grpc { code: code as i32, message: detail },
    }
}

fn is_connect_io(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::AddrNotAvailable
        )
    })
}

/// The gRPC clients of the endpoints (one HTTP/2 connection each, opened when first used).
pub struct GrpcTransport {
    clients: Vec<CentrifugoApiClient<Channel>>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// Scrubbed from whatever a failure says.
    api_key: String,
}

impl GrpcTransport {
    /// Must run inside the client's runtime (channels spawn their connection task there).
    pub fn new(urls: &[String], config: &ClientConfig) -> Result<Self, String> {
        let authorization =
            if config.api_key.is_empty() {
                None
            } else {
                Some(MetadataValue::try_from(format!("apikey {}", config.api_key)).map_err(|_| {
                    "centrifugo.api_key cannot be sent over gRPC (it must be printable ASCII)".to_owned()
                })?)
            };
        let tls = tls_config(config)?;
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            let (scheme, authority) = url.split_once("://").expect("checked by parse_api_urls");
            let secure = scheme.eq_ignore_ascii_case("grpcs");
            let http_url = format!("{}://{}", if secure { "https" } else { "http" }, authority.trim_end_matches('/'));
            let mut endpoint = Endpoint::from_shared(http_url)
                .map_err(|e| {
                    format!(
                        "centrifugo.api_url: {} is not a valid gRPC address: {e}",
                        crate::endpoints::display_url(url)
                    )
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(15))
                .keep_alive_timeout(config.timeout.max(Duration::from_secs(1)));
            if secure {
                endpoint = if config.tls_insecure_skip_verify {
                    endpoint.tls_config_with_verifier(tls.clone(), std::sync::Arc::new(AnyCertificate))
                } else {
                    endpoint.tls_config(tls.clone())
                }
                .map_err(|e| format!("centrifugo.api_url: TLS for {}: {e}", crate::endpoints::display_url(url)))?;
            }
            clients.push(CentrifugoApiClient::new(endpoint.connect_lazy()));
        }
        Ok(GrpcTransport { clients, authorization, api_key: config.api_key.clone() })
    }

    /// Sends `request` to endpoint `endpoint`, giving up after `timeout`.
    fn send(&self, endpoint: usize, request: proto::BatchRequest, timeout: Duration) -> Call {
        let secret = self.api_key.clone();
        // Replies may be large (a batch of broadcasts answers per channel), up to what the request allows.
        let cap = reply_cap(prost::Message::encoded_len(&request));
        let mut client = self.clients[endpoint].clone().max_decoding_message_size(cap);
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Box::pin(async move {
            match tokio::time::timeout(timeout, client.batch(request)).await {
                Err(_) => Response::Transport("timeout".into()),
                Ok(Ok(reply)) => Response::Replies(replies(reply.into_inner())),
                Ok(Err(status)) => status_response(&status, &secret),
            }
        })
    }
}

impl Transport for GrpcTransport {
    fn body(&self, commands: &[Prepared]) -> Body {
        batch_request(commands).map_or_else(Body::Unsendable, Body::new)
    }

    fn call(&self, endpoint: usize, body: Body, timeout: Duration) -> Call {
        match body.take::<proto::BatchRequest>() {
            Ok(request) => self.send(endpoint, request, timeout),
            Err(response) => Box::pin(async move { response }),
        }
    }

    fn probe(&self, endpoint: usize, timeout: Duration) -> Call {
        self.send(endpoint, proto::BatchRequest::default(), timeout)
    }

    fn batch_bytes_cap(&self, commands: usize) -> Option<i64> {
        Some(DEFAULT_MAX_MESSAGE.saturating_sub(PER_COMMAND_OVERHEAD * commands).max(1 << 20) as i64)
    }

    fn is_grpc(&self) -> bool {
        true
    }
}

/// The TLS settings for `grpcs://` endpoints.
fn tls_config(config: &ClientConfig) -> Result<ClientTlsConfig, String> {
    let mut tls = ClientTlsConfig::new();
    if config.tls_insecure_skip_verify {
        // No roots: tonic refuses them next to a verifier of its own.
    } else if config.tls_root_ca.is_empty() {
        tls = tls.with_native_roots();
    } else {
        let pem = std::fs::read(&config.tls_root_ca)
            .map_err(|e| format!("centrifugo.http_tls_root_ca: cannot read {}: {e}", config.tls_root_ca))?;
        // Added to the system's roots, as over HTTPS.
        tls = tls.with_native_roots().ca_certificate(Certificate::from_pem(pem));
    }
    match (config.tls_cert.is_empty(), config.tls_key.is_empty()) {
        (true, true) => {}
        (false, false) => {
            let cert = std::fs::read(&config.tls_cert)
                .map_err(|e| format!("centrifugo.http_tls_cert: cannot read {}: {e}", config.tls_cert))?;
            let key = std::fs::read(&config.tls_key)
                .map_err(|e| format!("centrifugo.http_tls_key: cannot read the key file: {e}"))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        _ => return Err("centrifugo.http_tls_cert and centrifugo.http_tls_key must be set together".into()),
    }
    Ok(tls)
}

/// `centrifugo.http_tls_insecure_skip_verify`: any certificate is accepted (tests only).
#[derive(Debug)]
struct AnyCertificate;

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[tokio_rustls::rustls::pki_types::CertificateDer<'_>],
        _server_name: &tokio_rustls::rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<tokio_rustls::rustls::client::danger::HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<tokio_rustls::rustls::client::danger::HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        tokio_rustls::rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{classify_batch, prepare, BatchVerdict, Outcome};
    use prost::Message;

    fn prepared(method: &str, payload: &str) -> Prepared {
        prepare(method, payload, || "key-1".into()).unwrap()
    }

    #[test]
    fn json_fields_become_the_protobuf_fields_centrifugo_reads() {
        let c = command(&prepared(
            "publish",
            r#"{"channel":"chat:a","data":{"n": 12345678901234567890123, "s":"é"},"tags":{"k":"v"},"skip_history":true,"unknown":[1]}"#,
        ))
        .unwrap();
        let p = c.publish.expect("a publish");
        assert_eq!(p.channel, "chat:a");
        // Raw JSON travels as its exact text: no number is rounded, nothing re-encoded.
        assert_eq!(p.data, r#"{"n": 12345678901234567890123, "s":"é"}"#.as_bytes().to_vec());
        assert_eq!(p.tags.get("k").map(String::as_str), Some("v"));
        assert!(p.skip_history);
        assert_eq!(p.idempotency_key, "key-1");

        let c = command(&prepared("broadcast", r#"{"channels":["a","b"],"data":"text","version":7}"#)).unwrap();
        let b = c.broadcast.unwrap();
        assert_eq!((b.channels, b.data, b.version), (vec!["a".to_owned(), "b".to_owned()], br#""text""#.to_vec(), 7));

        let c = command(&prepared(
            "subscribe",
            r#"{"user":"u","channel":"c","info":{"x":1},"override":{"presence":{"value":true}},"recover_since":{"offset":5,"epoch":"e"}}"#,
        ))
        .unwrap();
        let s = c.subscribe.unwrap();
        assert_eq!(s.info, br#"{"x":1}"#.to_vec());
        assert!(s.r#override.unwrap().presence.unwrap().value);
        assert_eq!(s.recover_since.unwrap().offset, 5);

        let c = command(&prepared("disconnect", r#"{"user":"u","disconnect":{"code":4503,"reason":"bye"}}"#)).unwrap();
        assert_eq!(c.disconnect.unwrap().disconnect.unwrap().code, 4503);
        for (method, payload) in [
            ("unsubscribe", r#"{"user":"u","channel":"c"}"#),
            ("refresh", r#"{"user":"u","expired":true,"info":null}"#),
            ("history_remove", r#"{"channel":"c"}"#),
        ] {
            let c = command(&prepared(method, payload)).unwrap();
            assert!(c.encoded_len() > 0, "{method}");
        }
    }

    #[test]
    fn null_is_the_zero_value_and_a_wrong_type_is_refused_as_a_bad_request() {
        let c = command(&prepared("publish", r#"{"channel":"a","data":1,"skip_history":null,"tags":null}"#)).unwrap();
        assert!(!c.publish.as_ref().unwrap().skip_history && c.publish.unwrap().tags.is_empty());
        let e = command(&prepared("publish", r#"{"channel":5,"data":1}"#)).unwrap_err();
        assert!(e.contains("invalid type") && e.contains("Centrifugo"), "{e}");
        let e = command(&prepared("broadcast", r#"{"channels":"a","data":1}"#)).unwrap_err();
        assert!(e.contains("expected a sequence"), "{e}");
        let e = command(&prepared("publish", r#"{"channel":"a","data":1,"version":-1}"#)).unwrap_err();
        assert!(e.contains("invalid value"), "{e}");
        // Such a batch is refused as a whole, as Centrifugo refuses it over HTTP: resent one by
        // one to dead-letter just the bad command.
        let commands = [prepared("publish", r#"{"channel":"a","data":1}"#), prepared("publish", r#"{"channel":5}"#)];
        let why = batch_request(&commands).unwrap_err();
        let verdict = classify_batch(&Response::Unsendable(why.clone()), &commands);
        assert!(matches!(verdict, BatchVerdict::SplitAndResend(ref f) if f.code == Some(400)), "{verdict:?}");
        let verdict = classify_batch(&Response::Unsendable(why), &commands[1..]);
        assert!(
            matches!(&verdict, BatchVerdict::PerCommand(o) if matches!(&o[0], Outcome::DeadLetter { failure, .. } if failure.code == Some(400))),
            "{verdict:?}"
        );
    }

    #[test]
    fn keys_are_matched_as_go_matches_them() {
        // Another case matches; a later key for the same field wins; unknown keys are dropped.
        let p = command(&prepared("publish", r#"{"Channel":"a","DATA":1,"channel":"b","x":{"y":[1]}}"#))
            .unwrap()
            .publish
            .unwrap();
        assert_eq!((p.channel.as_str(), p.data.as_slice()), ("b", &b"1"[..]));
        // (As a row's text is sent: `prepare` of a parsed object may order its keys.)
        let raw = Prepared { method: Method::Publish, payload: r#"{"channel":"a","data":1,"Channel":"c"}"#.into() };
        let p = command(&raw).unwrap().publish.unwrap();
        assert_eq!(p.channel, "c");
        // Null elements are zero values, as in Go.
        let b = command(&prepared("broadcast", r#"{"channels":["a",null],"data":1,"tags":{"k":null}}"#))
            .unwrap()
            .broadcast
            .unwrap();
        assert_eq!(b.channels, vec!["a".to_owned(), String::new()]);
        assert_eq!(b.tags.get("k").map(String::as_str), Some(""));
        // A rejected value is not copied whole into the reason.
        let long = "z".repeat(10_000);
        let e =
            command(&prepared("publish", &format!(r#"{{"channel":"a","data":1,"version":"{long}"}}"#))).unwrap_err();
        assert!(e.len() < 300, "{}", e.len());
    }

    #[test]
    fn one_pass_reads_what_rewriting_the_keys_first_reads() {
        // What `command` did before it tried one pass: keys rewritten as Go matches them, always.
        fn by_rewriting<T: for<'a> Deserialize<'a>>(payload: &str, message: &str) -> Result<T, String> {
            let rewritten = go_keys(payload, message)?;
            serde_json::from_str(rewritten.as_deref().unwrap_or(payload))
                .map_err(|e| short(format!("payload not valid for Centrifugo's API: {e}")))
        }
        let publishes = [
            r#"{"channel":"a","data":{"x":[1,2]}}"#,
            r#"{"channel":"a","data":1,"tags":{"k":"v"},"skip_history":true,"idempotency_key":"i"}"#,
            r#"{"Channel":"a","data":1}"#,
            r#"{"channel":"a","channel":"b","data":1}"#,
            r#"{"channel":"a","data":1,"unknown":{"deep":[null]}}"#,
            r#"{"channel":"a","data":1,"version":"x"}"#,
            r#"{"channel":"a","data":1,"tags":{"k":1}}"#,
            r#"{"channel":7,"data":1}"#,
            r#"{"channel":null,"data":null}"#,
            r#"{"channel":"a","data":1} trailing"#,
            r#"{"channel":"a","data":1,"delta":true,"version":3,"version_epoch":"e"}"#,
            r#"[1]"#,
            r#"["a", 1]"#,
            r#""text""#,
            r#"{}"#,
        ];
        for payload in publishes {
            let one = command(&Prepared { method: Method::Publish, payload: payload.into() }).map(|c| c.publish);
            let two = by_rewriting::<proto::PublishRequest>(payload, "PublishRequest").map(|m| Some(Box::new(m)));
            assert_eq!(one, two, "{payload}");
        }
        let subscribes = [
            r#"{"user":"u","channel":"c","override":{"presence":{"value":true}}}"#,
            r#"{"user":"u","channel":"c","override":{"presence":{"value":true},"x":1}}"#,
            r#"{"user":"u","channel":"c","recover_since":{"offset":1,"epoch":"e"},"USER":"v"}"#,
        ];
        for payload in subscribes {
            let one = command(&Prepared { method: Method::Subscribe, payload: payload.into() }).map(|c| c.subscribe);
            let two = by_rewriting::<proto::SubscribeRequest>(payload, "SubscribeRequest").map(|m| Some(Box::new(m)));
            assert_eq!(one, two, "{payload}");
        }
    }

    #[test]
    fn replies_give_the_same_outcomes_as_over_http() {
        let commands = [
            prepared("publish", r#"{"channel":"a","data":1}"#),
            prepared("publish", r#"{"channel":"b","data":1}"#),
            prepared("broadcast", r#"{"channels":["x","y"],"data":1}"#),
            prepared("publish", r#"{"channel":"c","data":1}"#),
        ];
        let error = |code: u32| Some(proto::Error { code, message: format!("e{code}") });
        let reply = proto::BatchResponse {
            replies: vec![
                proto::Reply { publish: Some(Box::default()), ..Default::default() },
                proto::Reply { error: error(102).map(Box::new), ..Default::default() },
                proto::Reply {
                    broadcast: Some(Box::new(proto::BroadcastResult {
                        responses: vec![
                            proto::PublishResponse { error: None, result: Some(Default::default()) },
                            proto::PublishResponse { error: error(102), result: None },
                        ],
                    })),
                    ..Default::default()
                },
                proto::Reply { error: error(100).map(Box::new), ..Default::default() },
            ],
        };
        // Through the wire format, as it comes back.
        let decoded = proto::BatchResponse::decode(reply.encode_to_vec().as_slice()).unwrap();
        let BatchVerdict::PerCommand(outcomes) = classify_batch(&Response::Replies(replies(decoded)), &commands) else {
            panic!("per command")
        };
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(matches!(&outcomes[1], Outcome::DeadLetter { failure, payload: None } if failure.code == Some(102)));
        assert!(
            matches!(&outcomes[2], Outcome::DeadLetter { payload: Some(p), .. } if p.contains(r#""channels":["y"]"#)),
            "{:?}",
            outcomes[2]
        );
        assert!(matches!(&outcomes[3], Outcome::Retry(f) if f.code == Some(100)));
        // Fewer replies than commands: nothing is known, everything is retried.
        let short = Response::Replies(vec![]);
        assert!(matches!(classify_batch(&short, &commands), BatchVerdict::RetryAll(_)));
    }

    #[test]
    fn statuses_read_as_the_http_statuses_that_mean_the_same() {
        let verdict = |status: tonic::Status, n: usize| {
            let commands = vec![prepared("publish", r#"{"channel":"a","data":1}"#); n];
            classify_batch(&status_response(&status, "the-secret-key"), &commands)
        };
        let retry_code = |v: BatchVerdict| match v {
            BatchVerdict::RetryAll(f) => (f.code, f.message),
            other => panic!("{other:?}"),
        };
        let (code, message) = retry_code(verdict(tonic::Status::unauthenticated("bad key the-secret-key"), 2));
        assert_eq!(code, Some(401));
        assert!(message.contains("grpc_api.key") && !message.contains("the-secret-key"), "{message}");
        assert_eq!(retry_code(verdict(tonic::Status::unimplemented("no"), 1)).0, Some(404));
        assert_eq!(retry_code(verdict(tonic::Status::internal("boom"), 1)).0, Some(500));
        let too_large =
            || tonic::Status::resource_exhausted("grpc: received message larger than max (5000000 vs. 4194304)");
        assert!(matches!(verdict(too_large(), 2), BatchVerdict::SplitAndResend(_)));
        // Exhaustion that is not the size limit (a quota, a rate limiter) is pushback: retried,
        // never dead-lettered, and not the node failing.
        let quota = || tonic::Status::resource_exhausted("rate limited");
        assert_eq!(retry_code(verdict(quota(), 1)).0, Some(429));
        // A proxy's plain HTTP answer reads as that HTTP status (413: split; 503: the node failing).
        let proxied = |code: u16| {
            tonic::Status::unknown(format!("grpc-status header missing, mapped from HTTP status code {code}"))
        };
        assert!(matches!(verdict(proxied(413), 2), BatchVerdict::SplitAndResend(_)));
        assert_eq!(retry_code(verdict(proxied(503), 1)).0, Some(503));
        let timeout = status_response(&tonic::Status::deadline_exceeded("late"), "");
        assert!(matches!(&timeout, Response::Transport(m) if m.starts_with("timeout")), "{timeout:?}");
        let tonic_timeout = status_response(&tonic::Status::cancelled(tonic::TimeoutExpired(()).to_string()), "");
        assert!(matches!(&tonic_timeout, Response::Transport(m) if m.starts_with("timeout")), "{tonic_timeout:?}");
        // A refusal is the node's configuration, a failure of the node is not.
        use crate::endpoints::{node_failure, NodeFailure};
        assert_eq!(node_failure(&status_response(&tonic::Status::unauthenticated(""), "")), None);
        assert_eq!(node_failure(&status_response(&tonic::Status::internal(""), "")), Some(NodeFailure::Unknown));
        assert_eq!(node_failure(&timeout), Some(NodeFailure::Unknown));
        assert_eq!(node_failure(&status_response(&too_large(), "")), None);
        assert_eq!(node_failure(&status_response(&quota(), "")), None);
        assert_eq!(node_failure(&status_response(&proxied(502), "")), Some(NodeFailure::Unknown));
    }

    fn config(url: &str, api_key: &str) -> ClientConfig {
        ClientConfig {
            api_url: url.into(),
            api_key: api_key.into(),
            connect_timeout: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            ..Default::default()
        }
    }

    #[test]
    fn a_port_nobody_listens_on_is_a_connect_failure_without_the_key() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("grpc://127.0.0.1:{port}");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _inside = runtime.enter();
        let transport = GrpcTransport::new(std::slice::from_ref(&url), &config(&url, "secret-key-123")).unwrap();
        let cmd = prepared("publish", r#"{"channel":"a","data":1}"#);
        let body = transport.body(std::slice::from_ref(&cmd));
        let response = runtime.block_on(transport.call(0, body, Duration::from_millis(500)));
        assert!(
            matches!(&response, Response::Transport(m) if m.starts_with(CONNECT_FAILED) && !m.contains("secret-key-123")),
            "{response:?}"
        );
        assert_eq!(crate::endpoints::node_failure(&response), Some(crate::endpoints::NodeFailure::NotReached));
    }

    #[test]
    fn a_key_that_cannot_be_metadata_is_refused_without_showing_it() {
        let url = "grpc://127.0.0.1:10000".to_owned();
        let e = GrpcTransport::new(std::slice::from_ref(&url), &config(&url, "line\nbreak-secret")).err().unwrap();
        assert!(e.contains("centrifugo.api_key") && !e.contains("break-secret"), "{e}");
    }
}
