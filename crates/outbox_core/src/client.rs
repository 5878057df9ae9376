//! The client towards Centrifugo's server API, over a [`Transport`] (HTTP, see [`crate::http`], or
//! gRPC's `Batch` RPC, see [`crate::grpc`]), chosen by the scheme of the URL. It keeps the nodes'
//! health (failover, probes, the shared node board) and turns an answer into one outcome per
//! command, resending one by one when Centrifugo refuses a batch as a whole.
//! One client per partition worker, which sends one request at a time, so there is never more
//! than one request in flight per partition. The Kafka bridge's client has one in flight per
//! ready Kafka partition at once.
//!
//! The client owns a current-thread runtime, driven only by the worker's own thread (no extra
//! thread, no cross-thread wake-ups): [`CentrifugoClient::start_body`] runs it just long enough
//! to put the request on the wire, the worker goes on (reading the next rows from PostgreSQL)
//! while Centrifugo works, and [`InFlight::wait`] runs it again to read the reply.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::command::Method;
use crate::dispatch::{classify_batch, BatchVerdict, Outcome, Prepared, Response, NOT_SENT_YET, STOPPING};
use crate::endpoints::{display_url, node_failure, parse_api_urls, Failover, NodeBoard, NodeFailure};
use crate::transport::Transport;
pub use crate::transport::{is_grpc_url, Body, ClientConfig};

pub struct CentrifugoClient {
    config: ClientConfig,
    transport: Box<dyn Transport>,
    runtime: Runtime,
    /// Each endpoint as the setting gives it, in its order, and as logs and status views show it.
    urls: Vec<String>,
    names: Vec<String>,
    /// `endpoints::list_id` of `names`, asked for before every request (the node board's key).
    list_id: u64,
    failover: RefCell<Failover>,
    /// The probe of a failed endpoint earlier in the list, while it runs.
    probe: RefCell<Option<(usize, JoinHandle<Response>)>>,
    /// Endpoint switches not yet taken by the worker's log.
    events: RefCell<Vec<String>>,
    /// The HTTP status of each endpoint's last probe (0: none), so a refusal is logged once.
    probe_statuses: RefCell<Vec<u16>>,
    /// Asked every [`STOP_POLL`] while a reply is awaited: true means the worker must stop.
    stop_requested: fn() -> bool,
    /// When a wait first saw the stop request: every later wait shares its [`STOP_GRACE`], so
    /// a bridge waiting for many partitions' answers stops within one grace, not one each.
    stop_seen: std::cell::Cell<Option<Instant>>,
    /// Where node health is shared with the server's other workers (None: this client alone).
    board: Option<Box<dyn NodeBoard>>,
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// How often a wait for a reply checks whether the worker must stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// How long a wait goes on after the worker was asked to stop: most replies come by then, and
/// a batch whose reply came is not sent again by the next worker.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A batch request on the wire. Dropping it without waiting cancels the request.
pub struct InFlight<'c> {
    client: &'c CentrifugoClient,
    task: Option<JoinHandle<Response>>,
    /// The answer, once read by [`InFlight::settle`].
    answer: Option<Response>,
    endpoint: usize,
    started: Instant,
}

impl InFlight<'_> {
    /// Blocks until Centrifugo answers (or the request times out / fails), or until the
    /// worker must stop: then the request is abandoned and reported as a transport failure.
    pub fn wait(mut self) -> Response {
        self.settle();
        self.answer.take().expect("settled")
    }

    /// Reads the answer now and keeps it for [`InFlight::wait`]. With several requests in
    /// flight, settling all of them before handling any answer keeps an answer from waiting
    /// unread (and timing out) while another one's outcome is written to the database.
    pub fn settle(&mut self) {
        if self.answer.is_none() {
            self.answer = Some(self.read_answer());
        }
    }

    fn read_answer(&mut self) -> Response {
        let mut task = self.task.take().expect("read once");
        let stop_requested = self.client.stop_requested;
        let stop_seen = &self.client.stop_seen;
        let done = self.client.runtime.block_on(async {
            loop {
                if let Ok(result) = tokio::time::timeout(STOP_POLL, &mut task).await {
                    return Some(result);
                }
                if stop_requested() {
                    let since = stop_seen.get().unwrap_or_else(Instant::now);
                    stop_seen.set(Some(since));
                    if since.elapsed() >= STOP_GRACE {
                        return None;
                    }
                }
            }
        });
        match done {
            Some(Ok(response)) => response,
            Some(Err(e)) => Response::Transport(format!("request task failed: {e}")),
            None => {
                task.abort();
                Response::Transport(STOPPING.into())
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl CentrifugoClient {
    /// Builds a client; errors say which setting is wrong and never contain the API key.
    pub fn new(config: ClientConfig) -> Result<Self, String> {
        let urls = parse_api_urls(&config.api_url)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the client's runtime: {e}"))?;
        let transport = if urls.first().is_some_and(|u| is_grpc_url(u)) {
            Self::grpc_transport(&urls, &config, &runtime)?
        } else {
            Box::new(crate::http::HttpTransport::new(&urls, &config)?)
        };
        Ok(Self::with_transport(config, urls, transport, runtime))
    }

    /// A client over `transport` (for tests: a scripted one) to the endpoints `urls`.
    pub fn over(config: ClientConfig, transport: Box<dyn Transport>) -> Result<Self, String> {
        let urls = parse_api_urls(&config.api_url)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the client's runtime: {e}"))?;
        Ok(Self::with_transport(config, urls, transport, runtime))
    }

    fn with_transport(
        config: ClientConfig,
        urls: Vec<String>,
        transport: Box<dyn Transport>,
        runtime: Runtime,
    ) -> Self {
        let names: Vec<String> = urls.iter().map(|u| display_url(u)).collect();
        CentrifugoClient {
            config,
            transport,
            runtime,
            failover: RefCell::new(Failover::new(urls.len())),
            list_id: crate::endpoints::list_id(&names),
            names,
            probe_statuses: RefCell::new(vec![0; urls.len()]),
            urls,
            probe: RefCell::new(None),
            events: RefCell::new(Vec::new()),
            stop_requested: || false,
            stop_seen: std::cell::Cell::new(None),
            board: None,
        }
    }

    /// Shares what this client learns of the nodes with every client on `board` (the workers
    /// of one server), and takes over what they learn.
    pub fn with_node_board(mut self, board: Box<dyn NodeBoard>) -> Self {
        self.board = Some(board);
        self
    }

    /// Takes over what the other clients on the board reported since the last look.
    fn take_shared(&self) {
        let Some(board) = &self.board else { return };
        let Some(shared) = board.read(self.endpoints_id()) else { return };
        let before = self.failover.borrow().current();
        if self.failover.borrow_mut().take_shared(&shared, Instant::now(), unix_micros()) {
            let after = self.failover.borrow().current();
            let back = after < before;
            let (before, after) = (self.endpoint_name(before), self.endpoint_name(after));
            self.events.borrow_mut().push(if back {
                format!("another worker found {after} answering again: sending to it instead of {before}")
            } else {
                format!("another worker found {before} down: sending to {after} from now on")
            });
        }
    }

    /// Tells the board what this client learnt (a node that failed, or answers again).
    fn share(&self) {
        let Some(board) = &self.board else { return };
        let list = self.endpoints_id();
        let reports = self.failover.borrow_mut().to_share(Instant::now(), unix_micros());
        for (endpoint, down_until) in reports {
            let generation = board.write(list, endpoint, down_until);
            self.failover.borrow_mut().reported(endpoint, generation);
        }
    }

    #[cfg(feature = "grpc")]
    fn grpc_transport(urls: &[String], config: &ClientConfig, runtime: &Runtime) -> Result<Box<dyn Transport>, String> {
        let _inside = runtime.enter();
        Ok(Box::new(crate::grpc::GrpcTransport::new(urls, config)?))
    }

    #[cfg(not(feature = "grpc"))]
    fn grpc_transport(_: &[String], _: &ClientConfig, _: &Runtime) -> Result<Box<dyn Transport>, String> {
        Err("centrifugo.api_url: this build has no gRPC transport (the grpc feature is off)".into())
    }

    /// Takes over what `previous` (the client this one replaces after a reload) knew of the
    /// endpoints, when both have the same list: a change of another setting must not send the
    /// worker back to a node it knows is down.
    pub fn carry_over(self, previous: Option<&CentrifugoClient>) -> Self {
        if let Some(previous) = previous.filter(|p| p.urls == self.urls) {
            self.failover.borrow_mut().adopt(&previous.failover.borrow());
        }
        self
    }

    /// An identifier of the endpoint list (see [`crate::endpoints::list_id`]).
    pub fn endpoints_id(&self) -> u64 {
        self.list_id
    }

    /// Makes waits for replies give up when `stop_requested` says so (a worker's SIGTERM).
    pub fn with_stop_check(mut self, stop_requested: fn() -> bool) -> Self {
        self.stop_requested = stop_requested;
        self
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Puts `commands` on the wire as one sequential batch request and returns at once.
    pub fn start_batch(&self, commands: &[Prepared]) -> InFlight<'_> {
        self.start_body(self.body(commands))
    }

    /// The request of one sequential batch of `commands`, for this client's transport.
    pub fn body(&self, commands: &[Prepared]) -> Body {
        self.transport.body(commands)
    }

    /// The most payload text one batch of `commands` commands may carry over this transport
    /// (None: no limit of its own). Centrifugo's gRPC server refuses messages over 4 MiB by
    /// default; HTTP has no such limit.
    pub fn batch_bytes_cap(&self, commands: usize) -> Option<i64> {
        self.transport.batch_bytes_cap(commands)
    }

    /// [`Self::start_batch`] with the request already made by [`Self::body`], sent to the
    /// endpoint in use.
    pub fn start_body(&self, body: Body) -> InFlight<'_> {
        self.take_shared();
        self.check_probe();
        let endpoint = self.failover.borrow().current();
        self.start_at(endpoint, body)
    }

    /// The endpoint requests go to now (an index into the setting's list).
    pub fn endpoint_in_use(&self) -> usize {
        self.failover.borrow().current()
    }

    /// The endpoints, as logs and status views show them (no credentials).
    pub fn endpoints(&self) -> &[String] {
        &self.names
    }

    /// Failed requests per endpoint since the client was built.
    pub fn endpoint_failures(&self) -> Vec<u64> {
        self.failover.borrow().failures()
    }

    /// What happened to the endpoints since the last call (switches, for the worker's log).
    pub fn take_events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.borrow_mut())
    }

    fn endpoint_name(&self, endpoint: usize) -> String {
        self.names[endpoint].clone()
    }

    /// Takes the answer of a finished probe (a healthy node earlier in the list is used again)
    /// and starts the next one that is due. A probe is an empty batch: Centrifugo checks the
    /// key and answers `{}` without doing anything. It runs alongside the worker's requests.
    fn check_probe(&self) {
        let mut probe = self.probe.borrow_mut();
        if probe.as_ref().is_some_and(|(_, task)| !task.is_finished()) {
            return;
        }
        if let Some((endpoint, task)) = probe.take() {
            let status = match self.runtime.block_on(task) {
                Ok(Response::Http { status, .. }) => status,
                Ok(Response::Replies(_)) => 200,
                Ok(Response::Grpc { code, .. }) => refusal_status(code),
                _ => 0,
            };
            let healthy = status == 200;
            let before = std::mem::replace(&mut self.probe_statuses.borrow_mut()[endpoint], status);
            if status != before && (400..500).contains(&status) {
                self.events.borrow_mut().push(format!(
                    "{} refuses requests ({} to a probe): check centrifugo.api_key and centrifugo.api_url against that node's configuration; not going back to it until it accepts them",
                    self.endpoint_name(endpoint),
                    if self.is_grpc() { format!("gRPC status {}", grpc_status_of(status)) } else { format!("HTTP {status}") }
                ));
            }
            let before = self.failover.borrow().current();
            let switched = self.failover.borrow_mut().probed(endpoint, healthy, Instant::now());
            self.share();
            if switched {
                self.events.borrow_mut().push(format!(
                    "{} answers again: sending to it instead of {}",
                    self.endpoint_name(endpoint),
                    self.endpoint_name(before)
                ));
            }
        }
        if let Some(endpoint) = self.failover.borrow().probe_due(Instant::now()) {
            let task = self.runtime.spawn(self.transport.probe(endpoint, self.config.timeout));
            *probe = Some((endpoint, task));
        }
    }

    fn is_grpc(&self) -> bool {
        self.transport.is_grpc()
    }

    /// Puts a batch on the wire to endpoint `endpoint` and returns at once.
    fn start_at(&self, endpoint: usize, body: Body) -> InFlight<'_> {
        self.start_at_within(endpoint, body, self.config.timeout)
    }

    /// [`Self::start_at`] with a request timeout of `timeout` (what is left of a call's).
    fn start_at_within(&self, endpoint: usize, body: Body, timeout: Duration) -> InFlight<'_> {
        let started = Instant::now();
        let timeout = timeout.max(Duration::from_millis(1));
        // The runtime sleeps while the worker does: first let idle connections see what happened
        // meanwhile (a server closes keep-alive connections after a while; a closed one must
        // leave the pool before the request picks it).
        self.drive();
        let task = match body {
            Body::Unsendable(why) => self.runtime.spawn(async move { Response::Unsendable(why) }),
            body => self.runtime.spawn(self.transport.call(endpoint, body, timeout)),
        };
        // Put the request on the wire now; whatever is not written yet is written by `wait`.
        self.drive();
        InFlight { client: self, task: Some(task), answer: None, endpoint, started }
    }

    /// Runs the runtime for a moment without blocking: each yield polls the socket events once
    /// and then runs every task that became ready (a connection noticing it was closed, the
    /// request, the connection writing it); a new connection may need a few rounds.
    fn drive(&self) {
        self.runtime.block_on(async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        });
    }

    /// Sends `commands` as one batch and returns one outcome per command (see [`Self::finish`]).
    pub fn send(&self, commands: &[Prepared], batches: &mut u64) -> Vec<Outcome> {
        self.finish(self.start_batch(commands), commands, batches)
    }

    /// Waits for the batch `pending` of `commands` and returns one outcome per command. When
    /// Centrifugo refuses the request as a whole, resends them one per batch, in order, stopping
    /// at the first temporary failure (the rest then count as retries too), and also once the
    /// resends took as long as one request may (`timeout`) or the worker must stop: the rest are
    /// then retries, sent by the next round, so a round never holds its transaction for
    /// `commands × timeout`. Adds the requests made to `batches`.
    ///
    /// When the endpoint fails as a node (no answer, a 5xx) and another node is believed up, the
    /// batch goes there at once if that cannot run a command twice: the request never reached
    /// the failed node, or every command is a publication with an idempotency key (the nodes
    /// share their idempotency cache through the broker, so a publication the failed node made
    /// before failing is not made again). Otherwise the worker only switches nodes and retries
    /// after its back-off, as with one node. Each node is tried at most once per call, and none
    /// once the first request's `timeout` has passed.
    pub fn finish(&self, pending: InFlight<'_>, commands: &[Prepared], batches: &mut u64) -> Vec<Outcome> {
        *batches += 1;
        let count = self.urls.len();
        let mut endpoint = pending.endpoint;
        let started = pending.started;
        let mut response = pending.wait();
        // A request that never reached its node took no time of its own: the next node gets a
        // whole timeout then. Otherwise the first request's timeout bounds the whole call.
        let deadline = match node_failure(&response) {
            Some(NodeFailure::NotReached) => Instant::now() + self.config.timeout,
            _ => started + self.config.timeout,
        };
        let mut tried = vec![false; count];
        tried[endpoint] = true;
        let publications_only = commands.iter().all(|c| matches!(c.method, Method::Publish | Method::Broadcast));
        while let Some(failure) = node_failure(&response) {
            self.take_shared();
            let next = self.failover.borrow_mut().failed(endpoint, Instant::now());
            self.share();
            if next != endpoint {
                let why = match &response {
                    Response::Transport(message) => message.clone(),
                    Response::Http { status, .. } => format!("HTTP {status}"),
                    Response::Grpc { code, .. } => format!("gRPC status {code}"),
                    Response::Replies(_) | Response::Unsendable(_) => "no failure".into(),
                };
                self.events.borrow_mut().push(format!(
                    "{} failed ({why}): sending to {} from now on",
                    self.endpoint_name(endpoint),
                    self.endpoint_name(next)
                ));
            }
            let resend_now = next != endpoint
                && !tried[next]
                && (!self.failover.borrow().is_down(next)
                    || (failure == NodeFailure::NotReached && self.failover.borrow().may_try(next, Instant::now())))
                && (failure == NodeFailure::NotReached || publications_only)
                && Instant::now() < deadline
                && !(self.stop_requested)();
            if !resend_now {
                break;
            }
            tried[next] = true;
            *batches += 1;
            endpoint = next;
            response = self
                .start_at_within(endpoint, self.body(commands), deadline.saturating_duration_since(Instant::now()))
                .wait();
        }
        if matches!(&response, Response::Unsendable(_)) {
            // Nothing was sent: no request to count, nothing learned about the node.
            *batches -= 1;
        } else if node_failure(&response).is_none() && !matches!(&response, Response::Transport(_)) {
            let mut failover = self.failover.borrow_mut();
            // A request sent before another one failed over from this node, answering late:
            // the node stays down until its probe, which brings it back.
            if endpoint == failover.current() || !failover.is_down(endpoint) {
                failover.answered(endpoint, Instant::now());
            }
            drop(failover);
            self.share();
        }
        let tried = tried.iter().filter(|t| **t).count();
        let mut verdict = classify_batch(&response, commands);
        if count > 1 {
            // Which node said so: a refusal (401, 404) is that node's configuration.
            if let BatchVerdict::RetryAll(failure) = &mut verdict {
                let tried = if tried > 1 { format!("{tried} endpoints tried, last ") } else { String::new() };
                failure.message = format!("{tried}{}: {}", self.endpoint_name(endpoint), failure.message);
            }
        }
        match verdict {
            BatchVerdict::PerCommand(outcomes) => outcomes,
            BatchVerdict::RetryAll(failure) => vec![Outcome::Retry(failure); commands.len()],
            BatchVerdict::SplitAndResend(_) => {
                let started = std::time::Instant::now();
                let mut outcomes = Vec::with_capacity(commands.len());
                for (i, command) in commands.iter().enumerate() {
                    if i > 0 && (started.elapsed() >= self.config.timeout || (self.stop_requested)()) {
                        let later = crate::dispatch::Failure::http(None, NOT_SENT_YET);
                        outcomes.extend(std::iter::repeat_n(Outcome::Retry(later), commands.len() - i));
                        break;
                    }
                    let outcome =
                        self.send(std::slice::from_ref(command), batches).pop().expect("one outcome per command");
                    let stop = matches!(outcome, Outcome::Retry(_));
                    outcomes.push(outcome.clone());
                    if stop {
                        outcomes.extend(std::iter::repeat_n(outcome, commands.len() - i - 1));
                        break;
                    }
                }
                outcomes
            }
        }
    }
}

/// The HTTP status with the meaning of gRPC status `code` for a probe (0: none of the refusals).
fn refusal_status(code: i32) -> u16 {
    crate::dispatch::grpc_as_http_status(code).filter(|s| matches!(s, 401 | 403 | 404)).unwrap_or(0)
}

/// The gRPC status a probe's [`refusal_status`] stands for.
fn grpc_status_of(status: u16) -> i32 {
    use crate::dispatch::grpc_code::*;
    match status {
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        _ => UNIMPLEMENTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::prepare;
    use crate::transport::{reply_cap, MAX_REPLY_BYTES};
    use serde_json::json;
    use std::io::{Read, Write};

    fn config(url: String) -> ClientConfig {
        ClientConfig {
            api_url: url,
            api_key: "secret-key-123".into(),
            connect_timeout: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            ..Default::default()
        }
    }

    #[test]
    fn a_redirect_is_not_followed_and_the_batch_is_retried() {
        // Where the redirect points: it must never see the key or the batch.
        let elsewhere = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let location = format!("http://{}/steal", elsewhere.server_addr().to_ip().unwrap());
        let node = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", node.server_addr().to_ip().unwrap());
        let redirecting = std::thread::spawn(move || {
            let req = node.recv().unwrap();
            let header = tiny_http::Header::from_bytes(&b"Location"[..], location.as_bytes()).unwrap();
            req.respond(tiny_http::Response::from_string("").with_status_code(307).with_header(header)).unwrap();
        });
        let client = CentrifugoClient::new(config(url)).unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k1".into()).unwrap();
        let outcomes = client.send(std::slice::from_ref(&cmd), &mut 0);
        redirecting.join().unwrap();
        assert!(
            matches!(&outcomes[..], [Outcome::Retry(f)] if f.code == Some(307) && f.message.contains("redirect")),
            "{outcomes:?}"
        );
        assert!(elsewhere.recv_timeout(Duration::from_millis(300)).unwrap().is_none(), "the redirect was followed");
    }

    #[test]
    fn a_reply_longer_than_centrifugo_would_send_is_not_read_and_the_batch_is_retried() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", server.server_addr().to_ip().unwrap());
        let too_long = MAX_REPLY_BYTES + 1;
        let serving = std::thread::spawn(move || {
            // Sent as it comes (chunked, no length said), then with a length said up front.
            let req = server.recv().unwrap();
            let stream = std::io::repeat(b' ').take(too_long as u64);
            let _ = req.respond(tiny_http::Response::new(200.into(), vec![], stream, None, None));
            let req = server.recv().unwrap();
            let announced = tiny_http::Response::new(200.into(), vec![], std::io::empty(), Some(too_long), None);
            let _ = req.respond(announced.with_chunked_threshold(usize::MAX));
            // Of a 503, however long, the status is what counts.
            let req = server.recv().unwrap();
            let stream = std::io::repeat(b' ').take(too_long as u64);
            let _ = req.respond(tiny_http::Response::new(503.into(), vec![], stream, None, None));
        });
        let client = CentrifugoClient::new(ClientConfig { timeout: Duration::from_secs(60), ..config(url) }).unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k1".into()).unwrap();
        for attempt in 0..2 {
            let outcomes = client.send(std::slice::from_ref(&cmd), &mut 0);
            assert!(
                matches!(&outcomes[..], [Outcome::Retry(f)] if f.message.contains(&format!("(HTTP 200) longer than {MAX_REPLY_BYTES} bytes"))),
                "{attempt}: {outcomes:?}"
            );
        }
        let outcomes = client.send(std::slice::from_ref(&cmd), &mut 0);
        assert!(matches!(&outcomes[..], [Outcome::Retry(f)] if f.code == Some(503)), "{outcomes:?}");
        serving.join().unwrap();
    }

    #[test]
    fn the_reply_read_grows_with_the_request_a_broadcast_answers_per_channel() {
        assert_eq!(reply_cap(0), MAX_REPLY_BYTES);
        assert_eq!(reply_cap(1 << 20), MAX_REPLY_BYTES);
        // A broadcast to 20 MiB of channel names ("a", is 4 bytes) answers up to ~51 bytes each.
        let request = 20 << 20;
        assert!(reply_cap(request) >= request / 4 * 51, "{}", reply_cap(request));
        assert_eq!(reply_cap(usize::MAX), usize::MAX);
    }

    #[test]
    fn sends_the_key_and_a_sequential_batch() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", server.server_addr().to_ip().unwrap());
        let handle = std::thread::spawn(move || {
            let mut req = server.recv().unwrap();
            let key = req.headers().iter().find(|h| h.field.equiv("X-API-Key")).map(|h| h.value.to_string());
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            let path = req.url().to_owned();
            req.respond(tiny_http::Response::from_string(r#"{"replies":[{"publish":{}}]}"#)).unwrap();
            (path, key, body)
        });
        let client = CentrifugoClient::new(config(url)).unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k1".into()).unwrap();
        let response = client.start_batch(std::slice::from_ref(&cmd)).wait();
        assert_eq!(classify_batch(&response, &[cmd]), BatchVerdict::PerCommand(vec![Outcome::Delivered]));
        let (path, key, body) = handle.join().unwrap();
        assert_eq!(path, "/api/batch");
        assert_eq!(key.as_deref(), Some("secret-key-123"));
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["parallel"], false);
        assert_eq!(body["commands"][0]["publish"]["idempotency_key"], "k1");
    }

    #[test]
    fn a_started_batch_is_on_the_wire_before_anyone_waits() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let client =
            CentrifugoClient::new(config(format!("http://{}/api", server.server_addr().to_ip().unwrap()))).unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k".into()).unwrap();
        for round in 0..3 {
            let pending = client.start_batch(std::slice::from_ref(&cmd));
            // The server gets the request while this thread is not inside the client at all.
            let req = server.recv_timeout(Duration::from_secs(5)).unwrap().expect("the request arrived before wait()");
            req.respond(tiny_http::Response::from_string(r#"{"replies":[{"publish":{}}]}"#)).unwrap();
            let response = pending.wait();
            assert_eq!(
                classify_batch(&response, std::slice::from_ref(&cmd)),
                BatchVerdict::PerCommand(vec![Outcome::Delivered]),
                "round {round}"
            );
        }
    }

    #[test]
    fn refused_and_slow_servers_are_transport_failures_without_the_key() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = CentrifugoClient::new(config(format!("http://127.0.0.1:{port}/api"))).unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k".into()).unwrap();
        match client.start_batch(std::slice::from_ref(&cmd)).wait() {
            Response::Transport(msg) => assert!(msg.contains("connect") && !msg.contains("secret-key-123"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // Accepts the connection but never answers: the request timeout fires.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = CentrifugoClient::new(config(format!("http://{}/api", silent.local_addr().unwrap()))).unwrap();
        match client.start_batch(&[cmd]).wait() {
            Response::Transport(msg) => assert!(msg.contains("timeout"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refused_batch_is_resent_one_by_one_to_find_the_bad_command() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", server.server_addr().to_ip().unwrap());
        let handle = std::thread::spawn(move || {
            let mut sizes = Vec::new();
            for _ in 0..4 {
                let mut req = server.recv().unwrap();
                let mut body = String::new();
                req.as_reader().read_to_string(&mut body).unwrap();
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                let cmds = body["commands"].as_array().unwrap().clone();
                sizes.push(cmds.len());
                let bad = cmds.iter().any(|c| c["publish"]["channel"] == "bad");
                let resp = if cmds.len() > 1 || bad {
                    tiny_http::Response::from_string("Bad Request").with_status_code(400)
                } else {
                    tiny_http::Response::from_string(r#"{"replies":[{"publish":{}}]}"#)
                };
                req.respond(resp).unwrap();
            }
            sizes
        });
        let client = CentrifugoClient::new(config(url)).unwrap();
        let cmds: Vec<_> = ["a", "bad", "c"]
            .iter()
            .map(|ch| prepare("publish", &json!({"channel": ch, "data": 1}).to_string(), || "k".into()).unwrap())
            .collect();
        let mut batches = 0;
        let outcomes = client.send(&cmds, &mut batches);
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(matches!(&outcomes[1], Outcome::DeadLetter { failure, .. } if failure.code == Some(400)));
        assert_eq!(outcomes[2], Outcome::Delivered);
        assert_eq!(batches, 4);
        assert_eq!(handle.join().unwrap(), vec![3, 1, 1, 1]);
    }

    #[test]
    fn a_wait_gives_up_when_the_worker_must_stop() {
        static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        // Accepts the connection and never answers, within a request timeout of a minute.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = config(format!("http://{}/api", silent.local_addr().unwrap()));
        c.timeout = Duration::from_secs(60);
        let client =
            CentrifugoClient::new(c).unwrap().with_stop_check(|| STOP.load(std::sync::atomic::Ordering::SeqCst));
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k".into()).unwrap();
        let pending = client.start_batch(std::slice::from_ref(&cmd));
        let stopper = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            STOP.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        let response = pending.wait();
        stopper.join().unwrap();
        assert!(started.elapsed() < STOP_GRACE + Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(matches!(&response, Response::Transport(m) if m == STOPPING), "{response:?}");
        assert!(matches!(classify_batch(&response, &[cmd]), BatchVerdict::RetryAll(_)));
    }

    #[test]
    fn resending_one_by_one_stops_after_one_request_timeout() {
        // Refuses the batch (400), then answers each single command slowly.
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", server.server_addr().to_ip().unwrap());
        std::thread::spawn(move || {
            let mut first = true;
            while let Ok(req) = server.recv() {
                if first {
                    first = false;
                    req.respond(tiny_http::Response::from_string("Bad Request").with_status_code(400)).unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                    req.respond(tiny_http::Response::from_string(r#"{"replies":[{"publish":{}}]}"#)).unwrap();
                }
            }
        });
        let client = CentrifugoClient::new(config(url)).unwrap(); // timeout 500 ms
        let cmds: Vec<_> = (0..20)
            .map(|i| prepare("publish", &json!({"channel": "a", "data": i}).to_string(), || "k".into()).unwrap())
            .collect();
        let started = std::time::Instant::now();
        let outcomes = client.send(&cmds, &mut 0);
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
        let delivered = outcomes.iter().take_while(|o| **o == Outcome::Delivered).count();
        assert!((1..20).contains(&delivered), "{delivered}");
        assert!(outcomes[delivered..]
            .iter()
            .all(|o| matches!(o, Outcome::Retry(f) if f.message.contains("next round"))));
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = config("http://127.0.0.1:1/api".into());
        c.tls_root_ca = "/nonexistent/ca.pem".into();
        assert!(CentrifugoClient::new(c.clone()).err().unwrap().contains("http_tls_root_ca"));
        c.tls_root_ca.clear();
        c.tls_cert = "/x".into();
        assert!(CentrifugoClient::new(c).err().unwrap().contains("set together"));
        assert!(CentrifugoClient::new(config("localhost:8000".into())).is_err());
    }

    /// A Centrifugo double on `listener`'s address: answers every batch with one empty reply per
    /// command (the empty probe batch gets `{}`), or with `status` alone; counts the commands.
    fn node(server: tiny_http::Server, status: u16) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            while let Ok(mut req) = server.recv() {
                let mut body = String::new();
                req.as_reader().read_to_string(&mut body).unwrap();
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                let commands = body["commands"].as_array().cloned().unwrap_or_default();
                for c in &commands {
                    record.lock().unwrap().push(c["publish"]["channel"].as_str().unwrap_or("?").to_owned());
                }
                if commands.is_empty() {
                    record.lock().unwrap().push("(probe)".into());
                }
                let reply = if status != 200 {
                    tiny_http::Response::from_string("no").with_status_code(status)
                } else if commands.is_empty() {
                    tiny_http::Response::from_string("{}")
                } else {
                    let replies = vec![r#"{"publish":{}}"#; commands.len()].join(",");
                    tiny_http::Response::from_string(format!(r#"{{"replies":[{replies}]}}"#))
                };
                let _ = req.respond(reply);
            }
        });
        seen
    }

    fn publish(channel: &str) -> Prepared {
        prepare("publish", &json!({"channel": channel, "data": 1}).to_string(), || "k".into()).unwrap()
    }

    #[test]
    fn a_node_that_is_down_is_left_for_the_next_and_used_again_once_it_answers() {
        let port_a = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let b = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_b = format!("http://{}/api", b.server_addr().to_ip().unwrap());
        let seen_b = node(b, 200);
        let client = CentrifugoClient::new(config(format!("http://127.0.0.1:{port_a}/api, {url_b}"))).unwrap();
        assert_eq!(client.send(&[publish("one")], &mut 0), vec![Outcome::Delivered]);
        assert_eq!(client.endpoint_in_use(), 1);
        assert_eq!(client.endpoint_failures(), vec![1, 0]);
        let events = client.take_events();
        assert!(
            events.len() == 1 && events[0].contains(&format!("127.0.0.1:{port_a}/api failed (connect failed")),
            "{events:?}"
        );
        // Node A comes back: the next request after its probe interval starts a probe (and still
        // goes to B); the one after that goes to A.
        let seen_a = node(tiny_http::Server::http(format!("127.0.0.1:{port_a}")).unwrap(), 200);
        std::thread::sleep(crate::endpoints::PROBE_FIRST + Duration::from_millis(100));
        let mut sent = 1;
        while client.endpoint_in_use() == 1 {
            assert!(sent < 50, "never went back to A");
            sent += 1;
            assert_eq!(client.send(&[publish(&format!("to-b-{sent}"))], &mut 0), vec![Outcome::Delivered]);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(client.send(&[publish("three")], &mut 0), vec![Outcome::Delivered]);
        // The probe came first; the send that found its answer already went to A.
        let (seen_a, seen_b) = (seen_a.lock().unwrap().clone(), seen_b.lock().unwrap().clone());
        assert_eq!(
            (seen_a.first().map(String::as_str), seen_a.last().map(String::as_str)),
            (Some("(probe)"), Some("three"))
        );
        assert_eq!(seen_b.len() + seen_a.len() - 1, sent + 1, "{seen_a:?} {seen_b:?}");
        assert!(client.take_events().iter().any(|e| e.contains("answers again")));
    }

    #[test]
    fn a_5xx_fails_over_and_a_refusal_does_not() {
        let a = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_a = format!("http://{}/api", a.server_addr().to_ip().unwrap());
        let seen_a = node(a, 503);
        let b = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_b = format!("http://{}/api", b.server_addr().to_ip().unwrap());
        let seen_b = node(b, 200);
        let client = CentrifugoClient::new(config(format!("{url_a},{url_b}"))).unwrap();
        let mut batches = 0;
        assert_eq!(client.send(&[publish("x")], &mut batches), vec![Outcome::Delivered]);
        assert_eq!((batches, client.endpoint_in_use()), (2, 1));
        assert_eq!((seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len()), (1, 1));

        // 401 from the preferred node: its configuration, said with its name; nobody else asked.
        let a = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_a = format!("http://{}/api", a.server_addr().to_ip().unwrap());
        node(a, 401);
        let b = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_b = format!("http://{}/api", b.server_addr().to_ip().unwrap());
        let seen_b = node(b, 200);
        let client = CentrifugoClient::new(config(format!("{url_a},{url_b}"))).unwrap();
        let outcomes = client.send(&[publish("x")], &mut 0);
        assert!(
            matches!(&outcomes[0], Outcome::Retry(f) if f.code == Some(401) && f.message.starts_with(&format!("{url_a}: unauthorized"))),
            "{outcomes:?}"
        );
        assert_eq!(client.endpoint_in_use(), 0);
        assert_eq!(client.endpoint_failures(), vec![0, 0]);
        assert!(seen_b.lock().unwrap().is_empty());
    }

    #[test]
    fn with_every_node_down_each_is_tried_once_and_the_failure_names_the_last() {
        let ports: Vec<u16> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let client = CentrifugoClient::new(config(format!(
            "http://127.0.0.1:{}/api,http://127.0.0.1:{}/api",
            ports[0], ports[1]
        )))
        .unwrap();
        let mut batches = 0;
        let outcomes = client.send(&[publish("x")], &mut batches);
        assert_eq!(batches, 2);
        assert!(
            matches!(&outcomes[0], Outcome::Retry(f) if f.message.starts_with(&format!("2 endpoints tried, last http://127.0.0.1:{}/api: connect failed", ports[1]))),
            "{outcomes:?}"
        );
        assert_eq!(client.endpoint_failures(), vec![1, 1]);
    }

    /// A node that answers real batches after `delay` (probes at once), recording the commands
    /// it ran with when.
    /// The commands a double ran, with when.
    type Ran = std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>;

    fn slow_node(delay: Duration, status: u16) -> (String, Ran) {
        let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}/api", server.server_addr().to_ip().unwrap());
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = ran.clone();
        std::thread::spawn(move || {
            while let Ok(mut req) = server.recv() {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut body = String::new();
                    req.as_reader().read_to_string(&mut body).unwrap();
                    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let commands = body["commands"].as_array().cloned().unwrap_or_default();
                    if !commands.is_empty() {
                        std::thread::sleep(delay);
                    }
                    for c in &commands {
                        record.lock().unwrap().push((Instant::now(), c.to_string()));
                    }
                    let replies = vec!["{}"; commands.len()].join(",");
                    let reply = if status == 200 {
                        tiny_http::Response::from_string(format!(r#"{{"replies":[{replies}]}}"#))
                    } else {
                        tiny_http::Response::from_string("no").with_status_code(status)
                    };
                    let _ = req.respond(reply);
                });
            }
        });
        (url, ran)
    }

    fn unsubscribe(user: &str) -> Prepared {
        prepare("unsubscribe", &json!({"channel": "c", "user": user}).to_string(), || "k".into()).unwrap()
    }

    /// Found by review: a batch that timed out may still run on its node; sent at once to the
    /// next node, an unsubscribe ran there, then the next one, then late on the first node.
    /// Commands that may not run twice now wait for the worker's back-off; publications (with
    /// their idempotency keys) and requests that never reached the node go at once.
    #[test]
    fn only_what_cannot_run_twice_goes_to_the_next_node_at_once() {
        let (slow, ran_slow) = slow_node(Duration::from_millis(700), 200);
        let (b, ran_b) = slow_node(Duration::ZERO, 200);
        let mut c = config(format!("{slow},{b}"));
        c.timeout = Duration::from_millis(300);
        let client = CentrifugoClient::new(c.clone()).unwrap();
        let outcomes = client.send(&[unsubscribe("first")], &mut 0);
        assert!(matches!(&outcomes[0], Outcome::Retry(f) if f.message.contains("timeout")), "{outcomes:?}");
        assert!(ran_b.lock().unwrap().is_empty(), "not sent to B at once");
        assert_eq!(client.endpoint_in_use(), 1, "the next round goes to B");
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(ran_slow.lock().unwrap().len(), 1, "the slow node did run it, late");

        // A publication that timed out: the next node only after the request's timeout, i.e.
        // next round (no second timeout inside one call).
        let client = CentrifugoClient::new(c.clone()).unwrap();
        let started = Instant::now();
        assert!(matches!(&client.send(&[publish("p")], &mut 0)[0], Outcome::Retry(_)));
        assert!(started.elapsed() < Duration::from_millis(550), "{:?}", started.elapsed());

        // A 5xx: publications go to B at once, an unsubscribe waits.
        let (failing, _) = slow_node(Duration::ZERO, 503);
        let client = CentrifugoClient::new(config(format!("{failing},{b}"))).unwrap();
        let before = ran_b.lock().unwrap().len();
        assert!(matches!(&client.send(&[unsubscribe("second")], &mut 0)[0], Outcome::Retry(f) if f.code == Some(503)));
        assert_eq!(ran_b.lock().unwrap().len(), before);
        let client = CentrifugoClient::new(config(format!("{failing},{b}"))).unwrap();
        assert_eq!(client.send(&[publish("p")], &mut 0), vec![Outcome::Delivered]);

        // Never reached (connection refused): anything goes to B at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = CentrifugoClient::new(config(format!("http://127.0.0.1:{closed}/api,{b}"))).unwrap();
        assert_eq!(client.send(&[unsubscribe("third")], &mut 0), vec![Outcome::Delivered]);
    }

    /// The shared-memory board of a server, in memory.
    #[derive(Clone, Default)]
    struct Board(std::sync::Arc<std::sync::Mutex<(u64, u64, [crate::endpoints::SharedNode; 8])>>);

    impl NodeBoard for Board {
        fn read(&self, list_id: u64) -> Option<[crate::endpoints::SharedNode; 8]> {
            let b = self.0.lock().unwrap();
            (b.0 == list_id).then_some(b.2)
        }
        fn write(&self, list_id: u64, endpoint: usize, down_until: i64) -> u64 {
            let mut b = self.0.lock().unwrap();
            if b.0 != list_id {
                *b = (list_id, b.1, Default::default());
            }
            b.1 += 1;
            let generation = b.1;
            b.2[endpoint] = crate::endpoints::SharedNode { generation, down_until };
            generation
        }
    }

    /// Issue 22: a frozen node cost every worker a whole timeout of its own to learn of it.
    #[test]
    fn a_node_one_client_found_frozen_is_skipped_by_the_others_and_taken_back_by_all() {
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url_a = format!("http://{}/api", frozen.local_addr().unwrap());
        let b = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url_b = format!("http://{}/api", b.server_addr().to_ip().unwrap());
        let seen_b = node(b, 200);
        let mut c = config(format!("{url_a},{url_b}"));
        c.timeout = Duration::from_millis(300);
        let board = Board::default();
        let clients: Vec<_> = (0..4)
            .map(|_| CentrifugoClient::new(c.clone()).unwrap().with_node_board(Box::new(board.clone())))
            .collect();
        // The first pays the timeout, and moves on to B.
        assert!(matches!(&clients[0].send(&[publish("first")], &mut 0)[..], [Outcome::Retry(f)] if f.is_timeout()));
        assert_eq!((clients[0].endpoint_in_use(), clients[0].endpoint_failures()), (1, vec![1, 0]));
        // The others go straight to B: no timeout, no failure of their own at A.
        for (i, client) in clients.iter().enumerate().skip(1) {
            let started = Instant::now();
            assert_eq!(client.send(&[publish(&format!("c{i}"))], &mut 0), vec![Outcome::Delivered]);
            assert!(started.elapsed() < Duration::from_millis(250), "client {i}: {:?}", started.elapsed());
            assert_eq!((client.endpoint_in_use(), client.endpoint_failures()), (1, vec![0, 0]));
            assert!(client.take_events().iter().any(|e| e.contains("another worker found") && e.contains(&url_a)));
        }
        assert_eq!(seen_b.lock().unwrap().len(), 3);
        // Without the board each one learns for itself.
        let alone = CentrifugoClient::new(c.clone()).unwrap();
        assert!(matches!(&alone.send(&[publish("alone")], &mut 0)[..], [Outcome::Retry(f)] if f.is_timeout()));
        // A comes back: once one client's probe finds it answering, every client uses it again.
        drop(frozen);
        let seen_a =
            node(tiny_http::Server::http(url_a.trim_start_matches("http://").trim_end_matches("/api")).unwrap(), 200);
        std::thread::sleep(crate::endpoints::PROBE_FIRST * 2);
        let mut sent = 0;
        while clients[0].endpoint_in_use() == 1 {
            assert!(sent < 50, "never went back to A");
            sent += 1;
            clients[0].send(&[publish("probing")], &mut 0);
            std::thread::sleep(Duration::from_millis(20));
        }
        for client in &clients[1..] {
            assert_eq!(client.send(&[publish("back")], &mut 0), vec![Outcome::Delivered]);
            assert_eq!(client.endpoint_in_use(), 0);
        }
        assert_eq!(seen_a.lock().unwrap().iter().filter(|c| *c == "back").count(), 3);
    }

    /// Found by review: with every node hanging, one call took nodes × timeout.
    #[test]
    fn hanging_nodes_cost_one_request_timeout_per_call() {
        let listeners: Vec<_> = (0..4).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let urls: Vec<_> = listeners.iter().map(|l| format!("http://{}/api", l.local_addr().unwrap())).collect();
        let mut c = config(urls.join(","));
        c.timeout = Duration::from_millis(300);
        let client = CentrifugoClient::new(c).unwrap();
        for round in 0..4 {
            let started = Instant::now();
            assert!(matches!(&client.send(&[publish("x")], &mut 0)[0], Outcome::Retry(_)));
            assert!(started.elapsed() < Duration::from_millis(550), "round {round}: {:?}", started.elapsed());
        }
        // Each round moved on to the next node: every node was tried once in four rounds.
        assert_eq!(client.endpoint_failures(), vec![1, 1, 1, 1]);
    }

    /// Found by review: a rebuilt client (another setting changed) went back to a node it knew
    /// was down; and a probe refused with 401 was silent.
    #[test]
    fn a_rebuilt_client_keeps_what_it_knew_and_a_refused_probe_is_said() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (b, _) = slow_node(Duration::ZERO, 200);
        let list = format!("http://127.0.0.1:{closed}/api,{b}");
        let old = CentrifugoClient::new(config(list.clone())).unwrap();
        assert_eq!(old.send(&[publish("x")], &mut 0), vec![Outcome::Delivered]);
        let mut c = config(list);
        c.timeout = Duration::from_millis(900);
        let new = CentrifugoClient::new(c).unwrap().carry_over(Some(&old));
        assert_eq!((new.endpoint_in_use(), new.endpoint_failures()), (1, vec![1, 0]));
        let other = CentrifugoClient::new(config(b.clone())).unwrap().carry_over(Some(&old));
        assert_eq!(other.endpoint_in_use(), 0, "another list starts afresh");

        // The node comes back with another key: the probe's 401 is said once.
        let refusing = tiny_http::Server::http(format!("127.0.0.1:{closed}")).unwrap();
        node(refusing, 401);
        let mut events = Vec::new();
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(100));
            new.send(&[publish("y")], &mut 0);
            events.extend(new.take_events());
        }
        let said: Vec<_> = events.iter().filter(|e| e.contains("refuses requests (HTTP 401 to a probe)")).collect();
        assert_eq!(said.len(), 1, "{events:?}");
        assert_eq!(new.endpoint_in_use(), 1);
    }

    /// A server that answers each connection's first request and closes it 50 ms later, as
    /// Centrifugo does with keep-alive connections idle for 30 s.
    fn closing_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let body = r#"{"replies":[{"publish":{}}]}"#;
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                });
            }
        });
        (url, served)
    }

    #[test]
    fn a_connection_the_server_closed_while_idle_is_not_used() {
        let (url, served) = closing_server();
        let client = CentrifugoClient::new(ClientConfig {
            api_url: url,
            api_key: "k".into(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .unwrap();
        let cmd = prepare("publish", &json!({"channel": "a", "data": 1}).to_string(), || "k".into()).unwrap();
        for round in 0..5 {
            let response = client.start_batch(std::slice::from_ref(&cmd)).wait();
            assert_eq!(
                classify_batch(&response, std::slice::from_ref(&cmd)),
                BatchVerdict::PerCommand(vec![Outcome::Delivered]),
                "round {round}: {response:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 5);
    }
}
