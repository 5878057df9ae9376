//! How a batch travels to Centrifugo: the one trait every transport (HTTP in [`crate::http`],
//! gRPC in [`crate::grpc`]) implements, the settings they are built from, and the bounds they
//! share. A transport makes a batch's request ahead of sending and sends it to one endpoint;
//! what the answer means, which node to use and what to do next are the client's and the
//! engine's (see [`crate::client`], [`crate::engine`]). Nothing here does I/O itself.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::dispatch::{Prepared, Response};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000/api`, or several (a cluster's nodes) separated by
    /// commas, in order of preference (see [`crate::endpoints`]).
    pub api_url: String,
    pub api_key: String,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// PEM file of the CA of Centrifugo's certificate (empty: system roots).
    pub tls_root_ca: String,
    /// PEM files of a client certificate and key for mutual TLS (both or neither).
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_insecure_skip_verify: bool,
}

/// A request on its way: run by the client's runtime, it ends with Centrifugo's answer or why
/// there is none (a timeout, a refused connection).
pub type Call = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

/// One way of carrying batches to Centrifugo's server API.
pub trait Transport {
    /// The request of one sequential batch of `commands`, made ahead of sending.
    fn body(&self, commands: &[Prepared]) -> Body;
    /// Sends `body` (made by this transport's [`Transport::body`]) to endpoint `endpoint` (an
    /// index into the client's list), giving up after `timeout`.
    fn call(&self, endpoint: usize, body: Body, timeout: Duration) -> Call;
    /// A request that runs nothing (an empty batch): whether the node is up and takes the key.
    fn probe(&self, endpoint: usize, timeout: Duration) -> Call;
    /// The most payload text one batch of `commands` commands may carry (None: no limit).
    fn batch_bytes_cap(&self, _commands: usize) -> Option<i64> {
        None
    }
    /// Whether statuses are gRPC's (for what the log says of a refusal).
    fn is_grpc(&self) -> bool {
        false
    }
}

/// A batch request ready to send, made by a transport for itself.
pub enum Body {
    Ready(Box<dyn std::any::Any + Send>),
    /// A command that the transport cannot carry (why): the batch is refused without a request.
    Unsendable(String),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Ready(_) => f.write_str("Body::Ready"),
            Body::Unsendable(why) => write!(f, "Body::Unsendable({why:?})"),
        }
    }
}

impl Body {
    pub fn new<T: Send + 'static>(request: T) -> Self {
        Body::Ready(Box::new(request))
    }

    /// The request as the transport that made it; a body of another transport (never today: a
    /// round keeps its client) is nothing to send, and the commands are retried.
    pub fn take<T: 'static>(self) -> Result<T, Response> {
        match self {
            Body::Unsendable(why) => Err(Response::Unsendable(why)),
            Body::Ready(any) => any.downcast::<T>().map(|b| *b).map_err(|_| {
                Response::Transport(format!(
                    "{}: request made for another transport, sent again next round",
                    crate::dispatch::CONNECT_FAILED
                ))
            }),
        }
    }
}

/// Whether `url` selects the gRPC transport.
pub fn is_grpc_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    scheme.eq_ignore_ascii_case("grpc") || scheme.eq_ignore_ascii_case("grpcs")
}

/// The most of a reply that is read for a small batch, over either transport. Centrifugo answers
/// a batch with a few dozen bytes per command; only a broadcast's answer grows with its request
/// (per channel, up to ~51 bytes for the 4 of `"a",`): see [`reply_cap`].
pub const MAX_REPLY_BYTES: usize = 256 << 20;

/// Bytes of reply allowed per byte of request, above [`MAX_REPLY_BYTES`].
const REPLY_BYTES_PER_REQUEST_BYTE: usize = 32;

/// The most of the reply to a request of `request_bytes` that is read: more than Centrifugo
/// can answer to it (a longer reply is not its answer, and reading on would only take memory).
pub fn reply_cap(request_bytes: usize) -> usize {
    MAX_REPLY_BYTES.max(request_bytes.saturating_mul(REPLY_BYTES_PER_REQUEST_BYTE))
}
