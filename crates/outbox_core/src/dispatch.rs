//! Turning outbox rows into one `/api/batch` request and Centrifugo's reply into a delivery
//! outcome per command. No I/O here: the worker reads rows and sends bytes; this module decides.
//!
//! Definitions used throughout:
//! - a *row* is what the outbox holds (`method`, `payload`), possibly malformed;
//! - a *prepared* command is a row that parsed, with an idempotency key added where it helps;
//! - an *outcome* says what happens to the row: removed (delivered), kept and retried later, or
//!   moved to the dead-letter table with a reason.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::command::{raw_object, trim_json, write_object, Method};

/// Centrifugo error codes that mean "try again later" (internal, too many requests, concurrent
/// pagination). Every other code is final.
pub const RETRYABLE_CODES: [u32; 3] = [100, 111, 113];

pub fn is_retryable_code(code: u32) -> bool {
    RETRYABLE_CODES.contains(&code)
}

/// Where a failure came from; stored with each dead letter as `error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Centrifugo answered with an error code (`error_code` is that code).
    Centrifugo,
    /// The HTTP exchange failed (`error_code` is the HTTP status, if any).
    Http,
    /// The row itself cannot be sent: unknown method, payload not an object.
    Malformed,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Centrifugo => "centrifugo",
            FailureKind::Http => "http",
            FailureKind::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub code: Option<u32>,
    pub message: String,
}

impl Failure {
    pub fn centrifugo(code: u32, message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Centrifugo, code: Some(code), message: message.into() }
    }
    pub fn http(status: Option<u16>, message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Http, code: status.map(u32::from), message: message.into() }
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Malformed, code: None, message: message.into() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} error {code}: {}", self.kind.as_str(), self.message),
            None => write!(f, "{} error: {}", self.kind.as_str(), self.message),
        }
    }
}

/// What happens to one row after a send.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Centrifugo accepted it: delete the row.
    Delivered,
    /// Temporary failure: keep this row and every later one of the partition, back off, resend.
    Retry(Failure),
    /// Final failure: move the row to the dead letters (with `payload`, JSON object text, instead
    /// of the row's own payload when given: a broadcast keeps only the channels that failed) and go on.
    DeadLetter { failure: Failure, payload: Option<String> },
}

impl Failure {
    /// No failure: the command was not sent yet (see [`NOT_SENT_YET`]), a retry without
    /// back-off.
    pub fn is_deferred(&self) -> bool {
        self.message == NOT_SENT_YET
    }

    /// The request got no answer in time (over either transport; several endpoints' failures
    /// are prefixed by the last one's name).
    pub fn is_timeout(&self) -> bool {
        self.kind == FailureKind::Http
            && self.code.is_none()
            && (self.message.starts_with("timeout") || self.message.contains(": timeout"))
    }
}

/// A row ready to send: the method and the payload as JSON object text, exactly what goes into
/// the batch request (kept as text so that a row read from PostgreSQL is not parsed into a tree
/// and serialized again).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub method: Method,
    pub payload: String,
}

/// Parses a row as Centrifugo's consumers do (method name, payload object or JSON string holding
/// one) and adds `idempotency_key` to publish/broadcast rows that lack one, so a resend after a
/// crash or timeout does not publish twice. Anything Centrifugo may accept is passed on as is:
/// the server, not us, judges the fields of raw rows. `payload` is JSON text; every field value
/// keeps its exact text.
pub fn prepare(method: &str, payload: &str, idempotency_key: impl FnOnce() -> String) -> Result<Prepared, Failure> {
    let method = Method::parse(method).map_err(|e| Failure::malformed(e.message))?;
    let mut payload = raw_object(payload).map_err(|e| Failure::malformed(e.message))?;
    if needs_key(method) {
        // Judged on the text, as prepare_text does: a non-empty JSON string counts even when it
        // holds a lone surrogate escape, which Rust cannot decode but Go reads as U+FFFD.
        let has_key = payload.get("idempotency_key").is_some_and(|k| k.get().starts_with('"') && k.get().len() > 2);
        if !has_key {
            let key = RawValue::from_string(Value::String(idempotency_key()).to_string()).expect("a JSON string");
            payload.insert("idempotency_key".into(), key);
        }
    }
    Ok(Prepared { method, payload: write_object(&payload) })
}

/// [`prepare`] for a payload given as JSON text (an outbox row's `payload::text`). A JSON
/// object, the usual case, is checked without building a tree and the idempotency key is
/// written in front of its fields; anything else takes the general path.
pub fn prepare_text(
    method: &str,
    payload: &str,
    idempotency_key: impl FnOnce() -> String,
) -> Result<Prepared, Failure> {
    /// The one field we need to know about; serde skips the others without allocating.
    #[derive(Deserialize)]
    struct KeyPeek<'a> {
        // `present`: a JSON null is a present key too (plain Option would read it as absent).
        #[serde(borrow, default, deserialize_with = "present")]
        idempotency_key: Option<&'a RawValue>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(d).map(Some)
    }
    let parsed_method = Method::parse(method).map_err(|e| Failure::malformed(e.message))?;
    let object = trim_json(payload);
    if let Some(fields) = object.strip_prefix('{') {
        if let Ok(peek) = serde_json::from_str::<KeyPeek<'_>>(object) {
            // A present key must be a non-empty string to count (else the general path replaces it).
            let key = peek.idempotency_key.map(RawValue::get);
            let has_key = key.is_some_and(|k| k.starts_with('"') && k.len() > 2);
            if !needs_key(parsed_method) || has_key {
                return Ok(Prepared { method: parsed_method, payload: object.to_owned() });
            }
            if key.is_none() {
                let fields = fields.trim_start_matches([' ', '\t', '\n', '\r']);
                let key = json_string(idempotency_key());
                let mut text = String::with_capacity(object.len() + key.len() + 20);
                text.push_str("{\"idempotency_key\":");
                text.push_str(&key);
                if !fields.starts_with('}') {
                    text.push(',');
                }
                text.push_str(fields);
                return Ok(Prepared { method: parsed_method, payload: text });
            }
        }
    }
    prepare(method, payload, idempotency_key)
}

/// `text` as a JSON string; the derived keys (letters, digits, `-`) need no escaping.
fn json_string(text: String) -> String {
    if text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        let mut quoted = String::with_capacity(text.len() + 2);
        quoted.push('"');
        quoted.push_str(&text);
        quoted.push('"');
        quoted
    } else {
        Value::String(text).to_string()
    }
}

fn needs_key(method: Method) -> bool {
    matches!(method, Method::Publish | Method::Broadcast)
}

/// The idempotency keys of one table's outbox rows:
/// `cfo-<system id hex>-<table oid>-<row id>-<created_at in Unix microseconds>`, unique per
/// cluster, table and row (even when ids are reused) and stable across resends (the prefix is
/// formatted once).
pub struct OutboxKeys {
    prefix: String,
}

impl OutboxKeys {
    pub fn new(system_id: u64, table_oid: u32) -> Self {
        OutboxKeys { prefix: format!("cfo-{system_id:x}-{table_oid}-") }
    }

    /// The key of the row `row_id` created at `created_at_unix_micros`: the creation time keeps
    /// the key unique when ids are reused (a sequence set back, a restore, a failover).
    pub fn key(&self, row_id: i64, created_at_unix_micros: i64) -> String {
        use std::fmt::Write;
        let mut key = String::with_capacity(self.prefix.len() + 40);
        key.push_str(&self.prefix);
        write!(key, "{row_id}-{created_at_unix_micros}").expect("writing to a String");
        key
    }
}

/// The body of one `/api/batch` request running `commands` sequentially, in order.
pub fn batch_body<'a>(commands: impl IntoIterator<Item = &'a Prepared>) -> Vec<u8> {
    // Payloads are JSON text already: written in as they are.
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"commands\":[");
    for (i, c) in commands.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(c.method.as_str().as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(c.payload.as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"parallel\":false}");
    out
}

/// The retry of commands a one-by-one resend had no time left for: no failure, so no back-off
/// (see [`Failure::is_deferred`]).
pub const NOT_SENT_YET: &str = "not sent yet: the batch is resent one command at a time, the rest next round";

/// What a reply not awaited because the worker stops becomes: nothing is known to have run.
pub const STOPPING: &str = "not awaited: the worker is stopping";

/// How a transport failure that never reached the server begins (no connection could be made).
pub const CONNECT_FAILED: &str = "connect failed";

/// What came back from one exchange with Centrifugo, over HTTP or gRPC.
#[derive(Debug, Clone)]
pub enum Response {
    /// An HTTP response with its status and body.
    Http { status: u16, body: Vec<u8> },
    /// A gRPC `Batch` reply, already decoded.
    Replies(Vec<Reply>),
    /// A gRPC status other than OK from the server (`code` as in gRPC: 16 unauthenticated, ...).
    Grpc { code: i32, message: String },
    /// The request could not be encoded for the transport (a command's payload does not fit
    /// Centrifugo's gRPC messages): what Centrifugo's HTTP API answers with 400.
    Unsendable(String),
    /// No response: connect refused, reset, timeout, TLS failure (already scrubbed of secrets).
    Transport(String),
}

/// Whether a RESOURCE_EXHAUSTED status is grpc-go's refusal of a message over its size limit.
pub fn is_too_large(message: &str) -> bool {
    message.contains("larger than max")
}

/// The HTTP status that means what gRPC status `code` means, where there is one.
pub fn grpc_as_http_status(code: i32) -> Option<u16> {
    use grpc_code::*;
    match code {
        INVALID_ARGUMENT => Some(400),
        UNAUTHENTICATED => Some(401),
        PERMISSION_DENIED => Some(403),
        NOT_FOUND | UNIMPLEMENTED => Some(404),
        RESOURCE_EXHAUSTED => Some(413),
        // Internal, unknown, data loss: the server failed.
        13 | 2 | 15 => Some(500),
        _ => None,
    }
}

/// gRPC status codes the classification tells apart.
pub mod grpc_code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The verdict on one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchVerdict {
    /// One outcome per command, in order.
    PerCommand(Vec<Outcome>),
    /// Nothing is known to have happened: keep every row and retry (Centrifugo down, overloaded,
    /// misconfigured URL or key: never a reason to dead-letter the user's commands).
    RetryAll(Failure),
    /// The request as a whole was refused (HTTP 400/413): resend the commands one per batch to
    /// find the one at fault. A single command refused this way is a dead letter.
    SplitAndResend(Failure),
}

/// Classifies Centrifugo's answer to a batch of `commands`.
pub fn classify_batch(response: &Response, commands: &[Prepared]) -> BatchVerdict {
    let (status, body) = match response {
        Response::Transport(message) => return BatchVerdict::RetryAll(Failure::http(None, message.clone())),
        Response::Http { status, body } => (*status, body),
        Response::Replies(replies) => return classify_replies(replies.clone(), commands, 200),
        Response::Unsendable(message) => return refused(Failure::http(Some(400), message.clone()), commands),
        Response::Grpc { code, message } => return classify_grpc_status(*code, message, commands),
    };
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned();
    match status {
        200 => {}
        400 | 413 => return refused(Failure::http(Some(status), format!("request refused: {}", snippet())), commands),
        401 | 403 => {
            return BatchVerdict::RetryAll(Failure::http(
                Some(status),
                "unauthorized: check centrifugo.api_key against Centrifugo's http_api.key",
            ))
        }
        404 => {
            return BatchVerdict::RetryAll(Failure::http(
                Some(status),
                "API endpoint not found: check centrifugo.api_url (it should end with Centrifugo's API prefix, usually /api)",
            ))
        }
        300..=399 => {
            return BatchVerdict::RetryAll(Failure::http(
                Some(status),
                format!("HTTP {status}: redirects are not followed (the API key would go with them): point centrifugo.api_url at Centrifugo's API itself"),
            ))
        }
        _ => return BatchVerdict::RetryAll(Failure::http(Some(status), format!("HTTP {status}: {}", snippet()))),
    }
    let parsed: BatchReply = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return BatchVerdict::RetryAll(Failure::http(Some(status), format!("unreadable reply: {e}"))),
    };
    if let Some(err) = parsed.error {
        let failure = err.failure();
        return match failure.code {
            Some(code) if is_retryable_code(code) => BatchVerdict::RetryAll(failure),
            _ if commands.len() > 1 => BatchVerdict::SplitAndResend(failure),
            _ => BatchVerdict::PerCommand(vec![Outcome::DeadLetter { failure, payload: None }]),
        };
    }
    match parsed.replies {
        Some(replies) => classify_replies(replies, commands, status),
        None => BatchVerdict::RetryAll(Failure::http(Some(status), "batch reply without replies")),
    }
}

/// The request as a whole was refused: find the command at fault by sending one at a time.
fn refused(failure: Failure, commands: &[Prepared]) -> BatchVerdict {
    if commands.len() > 1 {
        BatchVerdict::SplitAndResend(failure)
    } else {
        BatchVerdict::PerCommand(vec![Outcome::DeadLetter { failure, payload: None }])
    }
}

fn classify_replies(replies: Vec<Reply>, commands: &[Prepared], status: u16) -> BatchVerdict {
    if replies.len() != commands.len() {
        return BatchVerdict::RetryAll(Failure::http(
            Some(status),
            format!("batch reply has {} replies for {} commands", replies.len(), commands.len()),
        ));
    }
    BatchVerdict::PerCommand(commands.iter().zip(replies).map(|(c, r)| classify_reply(c, r)).collect())
}

/// A gRPC status instead of replies, read as the HTTP status with the same meaning, which is
/// also the failure's code (so `last_error_code = 401` means a refused key on both transports;
/// the message names the gRPC status).
fn classify_grpc_status(code: i32, message: &str, commands: &[Prepared]) -> BatchVerdict {
    let failure = |text: String| Failure::http(grpc_as_http_status(code), text);
    match code {
        grpc_code::INVALID_ARGUMENT => {
            refused(failure(format!("request refused: {message} (gRPC status {code})")), commands)
        }
        // The server's message size limit; any other exhaustion (a quota, a rate limiter in
        // front of it) is temporary, as HTTP 429 is.
        grpc_code::RESOURCE_EXHAUSTED if is_too_large(message) => refused(
            failure(format!(
                "request refused: {message} (gRPC status {code}; a single command this large needs Centrifugo's grpc_api.max_receive_message_size raised)"
            )),
            commands,
        ),
        grpc_code::RESOURCE_EXHAUSTED => BatchVerdict::RetryAll(Failure::http(
            Some(429),
            format!("too many requests: {message} (gRPC status {code})"),
        )),
        grpc_code::UNAUTHENTICATED | grpc_code::PERMISSION_DENIED => BatchVerdict::RetryAll(failure(format!(
            "unauthorized: check centrifugo.api_key against Centrifugo's grpc_api.key (gRPC status {code})"
        ))),
        grpc_code::UNIMPLEMENTED | grpc_code::NOT_FOUND => BatchVerdict::RetryAll(failure(format!(
            "API endpoint not found: check that centrifugo.api_url is the address of Centrifugo's grpc_api (gRPC status {code})"
        ))),
        _ => BatchVerdict::RetryAll(failure(format!("gRPC status {code}: {message}"))),
    }
}

/// Centrifugo's answer to a batch, read only as far as outcomes need (results are skipped).
#[derive(Deserialize)]
struct BatchReply {
    error: Option<ErrorBody>,
    replies: Option<Vec<Reply>>,
}

/// One reply of a batch, as far as outcomes need: `{"error": {...}}` or `{"<method>": result}`
/// over HTTP, the same fields of the protobuf `Reply` over gRPC.
#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    pub error: Option<ErrorBody>,
    pub broadcast: Option<BroadcastResult>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BroadcastResult {
    #[serde(default)]
    pub responses: Vec<ChannelResponse>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChannelResponse {
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub message: String,
}

impl ErrorBody {
    fn failure(self) -> Failure {
        Failure::centrifugo(self.code, self.message)
    }
}

fn classify_reply(command: &Prepared, reply: Reply) -> Outcome {
    if let Some(err) = reply.error {
        let failure = err.failure();
        return match failure.code {
            Some(code) if is_retryable_code(code) => Outcome::Retry(failure),
            _ => Outcome::DeadLetter { failure, payload: None },
        };
    }
    if command.method != Method::Broadcast {
        return Outcome::Delivered;
    }
    // A broadcast answers per channel. Any temporary failure retries the whole broadcast (the
    // idempotency key keeps the channels that succeeded from publishing twice); final failures
    // on some channels dead-letter a broadcast to just those channels.
    let responses = reply.broadcast.map(|b| b.responses).unwrap_or_default();
    if responses.iter().all(|r| r.error.is_none()) {
        return Outcome::Delivered;
    }
    let mut payload = raw_object(&command.payload).unwrap_or_default();
    // Channel names are moved into the dead letter as written.
    let all_channels = payload.remove("channels");
    let channels: Vec<&RawValue> =
        all_channels.as_deref().and_then(|c| serde_json::from_str(c.get()).ok()).unwrap_or_default();
    let channel_name = |i: usize| {
        channels.get(i).and_then(|c| serde_json::from_str::<String>(c.get()).ok()).unwrap_or_else(|| "?".into())
    };
    let mut failed_channels = Vec::new();
    let mut failures = Vec::new();
    for (i, response) in responses.into_iter().enumerate() {
        if let Some(err) = response.error {
            let failure = err.failure();
            if failure.code.is_some_and(is_retryable_code) {
                return Outcome::Retry(Failure {
                    message: format!("channel {}: {}", channel_name(i), failure.message),
                    ..failure
                });
            }
            if let Some(ch) = channels.get(i) {
                failed_channels.push(ch.get());
            }
            failures.push((channel_name(i), failure));
        }
    }
    let first = failures[0].1.clone();
    let message = failures
        .iter()
        .map(|(ch, f)| format!("{ch}: {} {}", f.code.unwrap_or(0), f.message))
        .collect::<Vec<_>>()
        .join("; ");
    let failed_channels =
        RawValue::from_string(format!("[{}]", failed_channels.join(","))).expect("an array of JSON values");
    payload.insert("channels".into(), failed_channels);
    Outcome::DeadLetter {
        failure: Failure {
            message: format!("broadcast failed on {} of {} channels: {message}", failures.len(), channels.len()),
            ..first
        },
        payload: Some(write_object(&payload)),
    }
}

/// Replaces every occurrence of each secret in `text` (defence in depth for log lines and errors).
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret, "********");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn prep(method: &str, payload: Value) -> Prepared {
        prepare(method, &payload.to_string(), || "k".into()).unwrap()
    }

    /// The payload's fields, for assertions on their values.
    fn fields(p: &Prepared) -> Map<String, Value> {
        serde_json::from_str(&p.payload).expect("a JSON object")
    }

    fn http(status: u16, body: Value) -> Response {
        Response::Http { status, body: body.to_string().into_bytes() }
    }

    #[test]
    fn prepare_adds_idempotency_keys_only_where_missing() {
        let p = prep("publish", json!({"channel": "a", "data": 1}));
        assert_eq!(fields(&p)["idempotency_key"], "k");
        let p = prep("publish", json!({"channel": "a", "data": 1, "idempotency_key": "mine"}));
        assert_eq!(fields(&p)["idempotency_key"], "mine");
        let p = prep("subscribe", json!({"channel": "a", "user": "u"}));
        assert!(fields(&p).get("idempotency_key").is_none());
        let p = prep("broadcast", json!("{\"channels\": [\"a\"], \"data\": 1}"));
        assert_eq!(fields(&p)["idempotency_key"], "k");
    }

    #[test]
    fn outbox_keys_tell_reused_row_ids_apart() {
        let keys = OutboxKeys::new(0x6f2b_9c41_0a5e_d3c7, 16384);
        assert_eq!(keys.key(42, 1_700_000_000_123_456), "cfo-6f2b9c410a5ed3c7-16384-42-1700000000123456");
        // The same id after a restore or a sequence set back: another row, another key.
        assert_ne!(keys.key(42, 1_700_000_000_123_456), keys.key(42, 1_700_000_100_000_000));
        assert_eq!(OutboxKeys::new(255, 1).key(-1, -5), "cfo-ff-1--1--5");
    }

    #[test]
    fn prepare_text_matches_prepare() {
        let cases = [
            ("publish", r#"{"channel": "a", "data": {"x": [1, {"idempotency_key": 5}]}}"#),
            ("publish", r#"{"channel": "a", "data": 1, "idempotency_key": "mine"}"#),
            ("publish", r#"{"channel": "a", "data": 1, "idempotency_key": ""}"#),
            ("publish", r#"{"channel": "a", "data": 1, "idempotency_key": null}"#),
            ("broadcast", r#"  {}  "#),
            ("broadcast", r#""{\"channels\": [\"a\"], \"data\": 1}""#),
            ("subscribe", r#"{"channel": "a", "user": "u"}"#),
            ("history_remove", r#"{"channel": "a"}"#),
        ];
        for (method, text) in cases {
            let fast = prepare_text(method, text, || "cfo-1-2-3".into()).unwrap();
            let slow = prepare(method, text, || "cfo-1-2-3".into()).unwrap();
            assert_eq!(fast.method, slow.method);
            assert_eq!(fields(&fast), fields(&slow), "{method} {text}");
            // Always a single JSON object, whatever path made it.
            assert!(serde_json::from_str::<Map<String, Value>>(&fast.payload).is_ok(), "{}", fast.payload);
        }
        let p = prepare_text("publish", r#"{"data": 1, "channel": "a"}"#, || "k".into()).unwrap();
        assert_eq!(p.payload, r#"{"idempotency_key":"k","data": 1, "channel": "a"}"#);
        for (m, text) in
            [("publish", "[1]"), ("publish", "{bad"), ("publish", r#""{bad""#), ("nope", "{}"), ("publish", "")]
        {
            assert_eq!(prepare_text(m, text, || "k".into()).unwrap_err().kind, FailureKind::Malformed, "{m} {text}");
        }
    }

    /// Found by tests/fuzz.rs: `prepare` replaced a key holding a lone surrogate escape (which
    /// Centrifugo reads as U+FFFD, a non-empty key) where `prepare_text` kept it.
    #[test]
    fn a_key_with_a_lone_surrogate_is_kept_on_both_paths() {
        let text = r#"{"channel": "a", "data": 1, "idempotency_key": "\ud800"}"#;
        let slow = prepare("publish", text, || "k".into()).unwrap();
        assert_eq!(slow.payload, r#"{"channel":"a","data":1,"idempotency_key":"\ud800"}"#);
        let fast = prepare_text("publish", text, || "k".into()).unwrap();
        assert_eq!(fast.payload, text);
        // A JSON string holding the object takes the general path: the same key.
        assert_eq!(prepare_text("publish", &Value::String(text.into()).to_string(), || "k".into()).unwrap(), slow);
    }

    #[test]
    fn malformed_rows_are_dead_letters_not_errors() {
        for (m, p) in [("nope", json!({})), ("publish", json!([1])), ("publish", json!("{bad")), ("batch", json!({}))] {
            let f = prepare(m, &p.to_string(), || "k".into()).unwrap_err();
            assert_eq!(f.kind, FailureKind::Malformed);
        }
    }

    #[test]
    fn batch_body_keeps_order_and_is_sequential() {
        let a = prep("publish", json!({"channel": "a", "data": 1}));
        let b = prep("history_remove", json!({"channel": "a"}));
        let body: Value = serde_json::from_slice(&batch_body([&a, &b])).unwrap();
        assert_eq!(body["parallel"], false);
        assert_eq!(body["commands"][0]["publish"]["channel"], "a");
        assert_eq!(body["commands"][1]["history_remove"]["channel"], "a");
    }

    #[test]
    fn replies_map_to_outcomes_in_order() {
        let cmds = vec![
            prep("publish", json!({"channel": "a", "data": 1})),
            prep("publish", json!({"channel": "x:a", "data": 1})),
            prep("publish", json!({"channel": "a", "data": 1})),
            prep("subscribe", json!({"channel": "a", "user": "u"})),
        ];
        let reply = json!({"replies": [
            {"publish": {"offset": 1}},
            {"error": {"code": 102, "message": "unknown channel"}},
            {"error": {"code": 100, "message": "internal server error"}},
            {"subscribe": {}}
        ]});
        let BatchVerdict::PerCommand(outcomes) = classify_batch(&http(200, reply), &cmds) else { panic!() };
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(matches!(&outcomes[1], Outcome::DeadLetter { failure, payload: None } if failure.code == Some(102)));
        assert!(matches!(&outcomes[2], Outcome::Retry(f) if f.code == Some(100)));
        assert_eq!(outcomes[3], Outcome::Delivered);
        for code in [111, 113] {
            let reply = json!({"replies": [{"error": {"code": code, "message": "x"}}]});
            let BatchVerdict::PerCommand(o) = classify_batch(&http(200, reply), &cmds[..1]) else { panic!() };
            assert!(matches!(o[0], Outcome::Retry(_)));
        }
    }

    #[test]
    fn broadcast_retries_on_any_internal_error_and_dead_letters_only_failed_channels() {
        let cmd = vec![prep("broadcast", json!({"channels": ["a", "b", "c"], "data": 1}))];
        let retry = json!({"replies": [{"broadcast": {"responses": [
            {"result": {}}, {"error": {"code": 100, "message": "internal"}}, {"result": {}}]}}]});
        let BatchVerdict::PerCommand(o) = classify_batch(&http(200, retry), &cmd) else { panic!() };
        assert!(matches!(&o[0], Outcome::Retry(f) if f.message.contains("channel b")));

        let partial = json!({"replies": [{"broadcast": {"responses": [
            {"result": {}}, {"error": {"code": 102, "message": "unknown channel"}}, {"result": {}}]}}]});
        let BatchVerdict::PerCommand(o) = classify_batch(&http(200, partial), &cmd) else { panic!() };
        match &o[0] {
            Outcome::DeadLetter { failure, payload: Some(p) } => {
                let p: Value = serde_json::from_str(p).unwrap();
                assert_eq!(failure.code, Some(102));
                assert!(failure.message.contains("1 of 3 channels"), "{}", failure.message);
                assert_eq!(p["channels"], json!(["b"]));
                assert_eq!(p["data"], 1);
                assert_eq!(p["idempotency_key"], "k");
            }
            other => panic!("{other:?}"),
        }
        let ok = json!({"replies": [{"broadcast": {"responses": [{"result": {}}, {"result": {}}, {"result": {}}]}}]});
        assert_eq!(classify_batch(&http(200, ok), &cmd), BatchVerdict::PerCommand(vec![Outcome::Delivered]));
    }

    #[test]
    fn transport_and_http_failures() {
        let two = vec![
            prep("publish", json!({"channel": "a", "data": 1})),
            prep("publish", json!({"channel": "b", "data": 1})),
        ];
        assert!(matches!(
            classify_batch(&Response::Transport("connection refused".into()), &two),
            BatchVerdict::RetryAll(_)
        ));
        for status in [500, 502, 503, 429, 401, 403, 404] {
            assert!(matches!(classify_batch(&http(status, json!({})), &two), BatchVerdict::RetryAll(_)), "{status}");
        }
        let r = Response::Http { status: 400, body: b"Bad Request\n".to_vec() };
        assert!(matches!(classify_batch(&r, &two), BatchVerdict::SplitAndResend(_)));
        assert!(
            matches!(classify_batch(&r, &two[..1]), BatchVerdict::PerCommand(o) if matches!(o[0], Outcome::DeadLetter { .. }))
        );
        let r = Response::Http { status: 200, body: b"<html>".to_vec() };
        assert!(matches!(classify_batch(&r, &two), BatchVerdict::RetryAll(_)));
        let short = json!({"replies": [{"publish": {}}]});
        assert!(matches!(classify_batch(&http(200, short), &two), BatchVerdict::RetryAll(_)));
        let top = json!({"error": {"code": 100, "message": "internal"}});
        assert!(matches!(classify_batch(&http(200, top), &two), BatchVerdict::RetryAll(_)));
    }

    #[test]
    fn every_path_keeps_values_exact() {
        for value in crate::command::builder_tests::tricky_values() {
            let shown = &value[..value.len().min(60)];
            let object = format!(r#"{{"channel": "c", "data": {value}}}"#);
            // The fast path passes the object on as it is, the key written in front.
            let p = prepare_text("publish", &object, || "k".into()).unwrap();
            assert_eq!(p.payload, format!(r#"{{"idempotency_key":"k","channel": "c", "data": {value}}}"#), "{shown}");
            let with_key = format!(r#"{{"channel": "c", "data": {value}, "idempotency_key": "mine"}}"#);
            assert_eq!(prepare_text("publish", &with_key, || "k".into()).unwrap().payload, with_key);
            // The general path rewrites the object, every value as written.
            let general = [
                format!(r#"{{"channel": "c", "data": {value}, "idempotency_key": null}}"#),
                format!(r#"{{"channel": "c", "data": {value}, "idempotency_key": ""}}"#),
                format!(r#"{{"channel": "c", "data": {value}, "idempotency_key": 5}}"#),
                Value::String(object.clone()).to_string(), // Debezium: a string holding the object
            ];
            let expected = format!(r#"{{"channel":"c","data":{value},"idempotency_key":"k"}}"#);
            for payload in &general {
                for p in [
                    prepare_text("publish", payload, || "k".into()).unwrap(),
                    prepare("publish", payload, || "k".into()).unwrap(),
                ] {
                    assert_eq!(p.payload, expected, "{shown}");
                }
            }
            assert_eq!(prepare("publish", &object, || "k".into()).unwrap().payload, expected, "{shown}");
            // A broadcast dead-lettered for some channels keeps its data as it was.
            let cmd =
                vec![prepare("broadcast", &format!(r#"{{"channels": ["a", "\u0062"], "data": {value}}}"#), || {
                    "k".into()
                })
                .unwrap()];
            let reply = json!({"replies": [{"broadcast": {"responses": [
                {"result": {}}, {"error": {"code": 102, "message": "unknown channel"}}]}}]});
            let BatchVerdict::PerCommand(o) = classify_batch(&http(200, reply), &cmd) else { panic!() };
            let Outcome::DeadLetter { failure, payload: Some(p) } = &o[0] else { panic!("{o:?}") };
            assert_eq!(p, &format!(r#"{{"channels":["\u0062"],"data":{value},"idempotency_key":"k"}}"#), "{shown}");
            assert!(failure.message.contains("b: 102 unknown channel"), "{}", failure.message);
        }
    }

    #[test]
    fn scrub_hides_secrets() {
        assert_eq!(scrub("key=s3cret-key here", &["s3cret-key", ""]), "key=******** here");
    }
}
