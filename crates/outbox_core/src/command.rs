//! Centrifugo server API commands as they travel through the outbox.
//!
//! A command is a method name plus a JSON object payload, exactly the `method`/`payload` columns of
//! Centrifugo's outbox table. Only the state-changing methods Centrifugo's own async consumers
//! accept can be enqueued. Validation here mirrors what Centrifugo's API would reject as a bad
//! request, so mistakes surface in the caller's transaction instead of as a dead letter later.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{CommandError, ErrorClass};

/// A state-changing server API method accepted by the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Publish,
    Broadcast,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Refresh,
    HistoryRemove,
}

/// Read-only methods of the server API: meaningless when run asynchronously.
const READ_ONLY_METHODS: &[&str] = &[
    "info",
    "history",
    "presence",
    "presence_stats",
    "channels",
    "connections",
    "rpc",
    "get_user_status",
    "device_list",
    "device_topic_list",
    "user_topic_list",
];

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Publish,
        Method::Broadcast,
        Method::Subscribe,
        Method::Unsubscribe,
        Method::Disconnect,
        Method::Refresh,
        Method::HistoryRemove,
    ];

    /// The method's name on the wire (the `method` column, the `/api/<name>` path, the batch key).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Publish => "publish",
            Method::Broadcast => "broadcast",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::Disconnect => "disconnect",
            Method::Refresh => "refresh",
            Method::HistoryRemove => "history_remove",
        }
    }

    /// Parses a method name, telling apart unknown, read-only and `batch`.
    pub fn parse(name: &str) -> Result<Method, CommandError> {
        if let Some(m) = Method::ALL.iter().find(|m| m.as_str() == name) {
            return Ok(*m);
        }
        let accepted = Method::ALL.map(Method::as_str).join(", ");
        if name == "batch" {
            return Err(CommandError::new(ErrorClass::NotSupported, "method \"batch\" cannot be enqueued").with_hint(
                format!(
                "Enqueue each command on its own; the workers batch them when sending. Accepted methods: {accepted}."
            ),
            ));
        }
        if READ_ONLY_METHODS.contains(&name) {
            return Err(CommandError::new(
                ErrorClass::NotSupported,
                format!("method \"{name}\" is read-only and cannot be enqueued"),
            )
            .with_hint(format!("Only state-changing methods are accepted: {accepted}.")));
        }
        Err(CommandError::invalid(format!("unknown method \"{name}\""))
            .with_hint(format!("Accepted methods: {accepted}.")))
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated command, ready for the outbox: the payload is JSON object text whose field
/// values are exactly as given (never parsed into a tree: numbers keep every digit).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub method: Method,
    pub payload: String,
}

impl Command {
    /// Validates `payload` (JSON text) for `method`. The payload may be a JSON object or a JSON
    /// string holding one (Debezium sends JSONB columns as strings), as Centrifugo's consumers
    /// accept. Field values are copied as written; a repeated field keeps its last value.
    pub fn new(method: Method, payload: &str) -> Result<Command, CommandError> {
        let object = raw_object(payload)?;
        validate(method, &validation_view(method, &object)?)?;
        Ok(Command { method, payload: write_object(&object) })
    }

    /// Parses and validates a raw `method`/`payload` pair.
    pub fn parse(method: &str, payload: &str) -> Result<Command, CommandError> {
        Command::new(Method::parse(method)?, payload)
    }

    pub fn payload_json(&self) -> &str {
        &self.payload
    }
}

/// A payload object read one level deep: each field's value kept as the text it was written in.
/// A repeated field keeps its last value, as Go's decoder (and so Centrifugo) does.
pub type RawObject = BTreeMap<String, Box<RawValue>>;

/// Reads a JSON object, or a JSON string whose content is a JSON object, one level deep. Nested
/// values are skipped without recursion, so any depth PostgreSQL accepts passes.
pub fn raw_object(payload: &str) -> Result<RawObject, CommandError> {
    let text = trim_json(payload);
    let object_text;
    let text = match text.as_bytes().first() {
        Some(b'{') => text,
        Some(b'"') => {
            object_text = serde_json::from_str::<String>(text)
                .map_err(|e| CommandError::new(ErrorClass::InvalidJson, format!("payload is not valid JSON: {e}")))?;
            if !trim_json(&object_text).starts_with('{') {
                return Err(match serde_json::from_str::<&RawValue>(&object_text) {
                    Ok(_) => CommandError::invalid("payload is a JSON string that does not hold a JSON object"),
                    Err(e) => CommandError::new(
                        ErrorClass::InvalidJson,
                        format!("payload is a JSON string that is not valid JSON: {e}"),
                    ),
                });
            }
            object_text.as_str()
        }
        _ => {
            let kind = serde_json::from_str::<&RawValue>(text).map(|v| raw_type(v.get())).unwrap_or("not JSON");
            return Err(CommandError::invalid(format!("payload must be a JSON object, got {kind}")));
        }
    };
    serde_json::from_str::<RawObject>(text)
        .map_err(|e| CommandError::new(ErrorClass::InvalidJson, format!("payload is not valid JSON: {e}")))
}

/// `text` without the whitespace JSON allows around a value (and no other).
pub fn trim_json(text: &str) -> &str {
    text.trim_matches([' ', '\t', '\n', '\r'])
}

/// Writes a raw object back as compact JSON object text, each value as it was.
pub fn write_object(object: &RawObject) -> String {
    let mut out = String::with_capacity(object.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>() + 2);
    out.push('{');
    for (i, (key, value)) in object.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key).expect("a string serializes"));
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    out
}

/// The JSON type of a value given as text.
pub fn raw_type(text: &str) -> &'static str {
    match trim_json(text).as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

/// What [`validate`] looks at: the typed fields parsed (they are small), and for fields of any
/// shape (data, info), objects Centrifugo checks itself (label_filter) and unknown fields only a
/// stand-in of the same JSON type, so user data is never parsed into a tree.
fn validation_view(method: Method, object: &RawObject) -> Result<Map<String, Value>, CommandError> {
    let shapes = fields(method);
    let mut view = Map::new();
    for (key, raw) in object {
        let text = raw.get();
        let value = match shapes.iter().find(|f| f.name == key).map(|f| f.shape) {
            None | Some(Shape::Any | Shape::Object) => stand_in(text),
            Some(_) => serde_json::from_str(text)
                .map_err(|e| CommandError::invalid(format!("{method}: \"{key}\" cannot be read: {e}")))?,
        };
        view.insert(key.clone(), value);
    }
    Ok(view)
}

/// An empty value of the JSON type of `text` (valid JSON), for checks that look only at the type.
fn stand_in(text: &str) -> Value {
    match raw_type(text) {
        "object" => Value::Object(Map::new()),
        "array" => Value::Array(Vec::new()),
        "string" => Value::String(String::new()),
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => Value::from(0),
    }
}

pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON shape a field must have.
#[derive(Clone, Copy)]
enum Shape {
    /// Any JSON value (publication data, connection info).
    Any,
    String,
    NonEmptyString,
    Bool,
    /// A non-negative integer that fits in u64.
    Unsigned,
    /// A signed 64-bit integer.
    Integer,
    Base64,
    /// An object whose values are all strings (`tags`).
    StringMap,
    /// A non-empty array of non-empty strings (`channels`).
    Channels,
    /// An array of strings (`whitelist`).
    StringArray,
    /// `{offset, epoch}` (`recover_since`).
    StreamPosition,
    /// `{code, reason}` (`disconnect`).
    Disconnect,
    /// `{presence: {value: bool}, ...}` (`override`).
    SubscribeOverride,
    /// Any JSON object (`label_filter`, whose grammar Centrifugo checks).
    Object,
}

struct Field {
    name: &'static str,
    shape: Shape,
}

const fn f(name: &'static str, shape: Shape) -> Field {
    Field { name, shape }
}

const PUBLICATION_FIELDS: &[Field] = &[
    f("data", Shape::Any),
    f("b64data", Shape::Base64),
    f("skip_history", Shape::Bool),
    f("tags", Shape::StringMap),
    f("idempotency_key", Shape::String),
    f("delta", Shape::Bool),
    f("version", Shape::Unsigned),
    f("version_epoch", Shape::String),
];

const USER_TARGET_FIELDS: &[Field] = &[
    f("user", Shape::String),
    f("client", Shape::String),
    f("session", Shape::String),
    f("label_filter", Shape::Object),
    f("all_users", Shape::Bool),
];

fn fields(method: Method) -> Vec<&'static Field> {
    const SUBSCRIBE: &[Field] = &[
        f("channel", Shape::NonEmptyString),
        f("info", Shape::Any),
        f("b64info", Shape::Base64),
        f("data", Shape::Any),
        f("b64data", Shape::Base64),
        f("recover_since", Shape::StreamPosition),
        f("expire_at", Shape::Integer),
        f("override", Shape::SubscribeOverride),
    ];
    const UNSUBSCRIBE: &[Field] = &[f("channel", Shape::NonEmptyString)];
    const DISCONNECT: &[Field] = &[f("whitelist", Shape::StringArray), f("disconnect", Shape::Disconnect)];
    const REFRESH: &[Field] = &[f("expired", Shape::Bool), f("expire_at", Shape::Integer), f("info", Shape::Any)];
    const PUBLISH: &[Field] = &[f("channel", Shape::NonEmptyString)];
    const BROADCAST: &[Field] = &[f("channels", Shape::Channels)];
    const HISTORY_REMOVE: &[Field] = &[f("channel", Shape::NonEmptyString)];
    let (own, shared): (&[Field], &[Field]) = match method {
        Method::Publish => (PUBLISH, PUBLICATION_FIELDS),
        Method::Broadcast => (BROADCAST, PUBLICATION_FIELDS),
        Method::Subscribe => (SUBSCRIBE, USER_TARGET_FIELDS),
        Method::Unsubscribe => (UNSUBSCRIBE, USER_TARGET_FIELDS),
        Method::Disconnect => (DISCONNECT, USER_TARGET_FIELDS),
        Method::Refresh => (REFRESH, USER_TARGET_FIELDS),
        Method::HistoryRemove => (HISTORY_REMOVE, &[]),
    };
    own.iter().chain(shared.iter()).collect()
}

/// Fields without which Centrifugo rejects the command.
fn required(method: Method) -> &'static [&'static str] {
    match method {
        Method::Publish | Method::HistoryRemove => &["channel"],
        Method::Broadcast => &["channels"],
        Method::Subscribe | Method::Unsubscribe => &["channel", "user"],
        Method::Disconnect | Method::Refresh => &["user"],
    }
}

/// Checks a payload against what Centrifugo's server API accepts for `method`.
///
/// Unknown fields are passed through untouched: a newer Centrifugo may accept them, and the
/// server ignores what it does not know.
pub fn validate(method: Method, payload: &Map<String, Value>) -> Result<(), CommandError> {
    let targets_all_users = matches!(payload.get("all_users"), Some(Value::Bool(true)))
        || payload.get("label_filter").is_some_and(|v| !v.is_null());
    for name in required(method) {
        let missing = matches!(payload.get(*name), None | Some(Value::Null));
        if missing && !(*name == "user" && targets_all_users) {
            let err = CommandError::new(ErrorClass::NullValue, format!("{method} requires \"{name}\""));
            return Err(if *name == "user" {
                err.with_hint("Use an empty string for anonymous connections, or all_users => true.")
            } else {
                err
            });
        }
    }
    for field in fields(method) {
        if let Some(value) = payload.get(field.name) {
            check_shape(method, field, value)?;
        }
    }
    if matches!(method, Method::Publish | Method::Broadcast) {
        let has_data = payload.get("data").is_some_and(|v| !v.is_null());
        // JSON null means "not set" here too: `"b64data": null` beside data is no second data.
        let has_b64 = payload.get("b64data").is_some_and(|v| !v.is_null() && v.as_str() != Some(""));
        match (has_data, has_b64) {
            (false, false) => {
                return Err(CommandError::new(
                    ErrorClass::NullValue,
                    format!("{method} requires \"data\" (JSON) or \"b64data\" (base64)"),
                ))
            }
            (true, true) => {
                return Err(CommandError::invalid(format!("{method} takes either \"data\" or \"b64data\", not both")))
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_shape(method: Method, field: &Field, value: &Value) -> Result<(), CommandError> {
    let name = field.name;
    let wrong = |expected: &str| {
        CommandError::invalid(format!("{method}: \"{name}\" must be {expected}, got {}", json_type(value)))
    };
    // JSON null means "not set", as in Centrifugo's decoder.
    if value.is_null() {
        return Ok(());
    }
    match field.shape {
        Shape::Any => Ok(()),
        Shape::Object => value.as_object().map(|_| ()).ok_or_else(|| wrong("an object")),
        Shape::String => value.as_str().map(|_| ()).ok_or_else(|| wrong("a string")),
        Shape::NonEmptyString => match value.as_str() {
            Some("") => {
                Err(CommandError::new(ErrorClass::NullValue, format!("{method}: \"{name}\" must not be empty")))
            }
            Some(_) => Ok(()),
            None => Err(wrong("a string")),
        },
        Shape::Bool => value.as_bool().map(|_| ()).ok_or_else(|| wrong("a boolean")),
        Shape::Unsigned => value.as_u64().map(|_| ()).ok_or_else(|| wrong("a non-negative integer")),
        Shape::Integer => value.as_i64().map(|_| ()).ok_or_else(|| wrong("an integer")),
        Shape::Base64 => {
            let text = value.as_str().ok_or_else(|| wrong("a base64 string"))?;
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(|_| ())
                .map_err(|e| CommandError::invalid(format!("{method}: \"{name}\" is not valid base64: {e}")))
        }
        Shape::StringMap => {
            let map = value.as_object().ok_or_else(|| wrong("an object of strings"))?;
            match map.iter().find(|(_, v)| !v.is_string()) {
                Some((k, v)) => Err(CommandError::invalid(format!(
                    "{method}: \"{name}\".\"{k}\" must be a string, got {}",
                    json_type(v)
                ))),
                None => Ok(()),
            }
        }
        Shape::StringArray => {
            let items = value.as_array().ok_or_else(|| wrong("an array of strings"))?;
            if items.iter().all(Value::is_string) {
                Ok(())
            } else {
                Err(wrong("an array of strings"))
            }
        }
        Shape::Channels => {
            let items = value.as_array().ok_or_else(|| wrong("an array of channel names"))?;
            if items.is_empty() {
                return Err(CommandError::invalid(format!("{method}: \"{name}\" must not be empty")));
            }
            match items.iter().position(|c| c.as_str().is_none_or(str::is_empty)) {
                Some(i) => Err(CommandError::invalid(format!("{method}: \"{name}\"[{i}] must be a non-empty string"))),
                None => Ok(()),
            }
        }
        Shape::StreamPosition => {
            let obj = value.as_object().ok_or_else(|| wrong("an object {offset, epoch}"))?;
            check_members(method, name, obj, &[("offset", Shape::Unsigned), ("epoch", Shape::String)])
        }
        Shape::Disconnect => {
            let obj = value.as_object().ok_or_else(|| wrong("an object {code, reason}"))?;
            check_members(method, name, obj, &[("code", Shape::Unsigned), ("reason", Shape::String)])
        }
        Shape::SubscribeOverride => {
            let obj = value.as_object().ok_or_else(|| wrong("an object"))?;
            for (key, v) in obj {
                let inner = v.as_object().and_then(|o| o.get("value"));
                if !matches!(inner, Some(Value::Bool(_))) && !v.is_null() {
                    return Err(CommandError::invalid(format!(
                        "{method}: \"{name}\".\"{key}\" must be {{\"value\": true|false}}"
                    )));
                }
            }
            Ok(())
        }
    }
}

fn check_members(
    method: Method,
    parent: &str,
    obj: &Map<String, Value>,
    members: &[(&'static str, Shape)],
) -> Result<(), CommandError> {
    for (name, shape) in members {
        if let Some(v) = obj.get(*name) {
            check_shape(method, &Field { name, shape: *shape }, v).map_err(|e| CommandError {
                message: e.message.replacen(&format!("\"{name}\""), &format!("\"{parent}.{name}\""), 1),
                ..e
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(method: &str, payload: Value) -> Result<Command, CommandError> {
        Command::parse(method, &payload.to_string())
    }

    fn err(method: &str, payload: Value) -> CommandError {
        parse(method, payload).expect_err("should be rejected")
    }

    #[test]
    fn every_accepted_method_round_trips_its_name() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.as_str()).unwrap(), m);
        }
    }

    #[test]
    fn seed_insert_payload_is_valid() {
        let c = parse("publish", json!({"channel": "updates", "data": {"text": "Hello, world!"}})).unwrap();
        assert_eq!(c.method, Method::Publish);
        assert_eq!(serde_json::from_str::<Value>(&c.payload).unwrap()["channel"], "updates");
    }

    #[test]
    fn batch_read_only_and_unknown_methods_are_told_apart() {
        let e = err("batch", json!({}));
        assert_eq!(e.class, ErrorClass::NotSupported);
        assert!(e.message.contains("batch"));
        assert!(e.hint.unwrap().contains("workers batch"));
        let e = err("presence", json!({"channel": "x"}));
        assert_eq!(e.class, ErrorClass::NotSupported);
        assert!(e.message.contains("read-only"));
        let e = err("pubish", json!({}));
        assert_eq!(e.class, ErrorClass::InvalidParameter);
        assert!(e.message.contains("unknown method \"pubish\""));
    }

    #[test]
    fn payload_may_be_a_json_string_holding_an_object() {
        let c = parse("publish", json!("{\"channel\":\"a\",\"data\":1}")).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&c.payload).unwrap()["data"], 1);
        assert_eq!(err("publish", json!("not json")).class, ErrorClass::InvalidJson);
        assert_eq!(err("publish", json!("[1]")).class, ErrorClass::InvalidParameter);
        assert_eq!(err("publish", json!(42)).class, ErrorClass::InvalidParameter);
    }

    #[test]
    fn required_fields_are_enforced_per_method() {
        assert_eq!(err("publish", json!({"data": 1})).class, ErrorClass::NullValue);
        assert_eq!(err("publish", json!({"channel": "", "data": 1})).class, ErrorClass::NullValue);
        assert_eq!(err("publish", json!({"channel": "a"})).class, ErrorClass::NullValue);
        assert_eq!(err("broadcast", json!({"data": 1})).class, ErrorClass::NullValue);
        let e = err("broadcast", json!({"channels": [], "data": 1}));
        assert_eq!(e.class, ErrorClass::InvalidParameter);
        assert!(e.message.contains("must not be empty"));
        assert!(err("broadcast", json!({"channels": ["a", ""], "data": 1})).message.contains("[1]"));
        assert_eq!(err("subscribe", json!({"channel": "a"})).class, ErrorClass::NullValue);
        assert_eq!(err("subscribe", json!({"user": "1"})).class, ErrorClass::NullValue);
        assert_eq!(err("disconnect", json!({})).class, ErrorClass::NullValue);
        assert_eq!(err("history_remove", json!({})).class, ErrorClass::NullValue);
        // Anonymous users and all-user targeting are legitimate.
        parse("disconnect", json!({"user": ""})).unwrap();
        parse("unsubscribe", json!({"channel": "a", "all_users": true})).unwrap();
    }

    #[test]
    fn field_types_are_checked() {
        let cases = [
            json!({"channel": 1, "data": 1}),
            json!({"channel": "a", "data": 1, "tags": {"k": 1}}),
            json!({"channel": "a", "data": 1, "tags": []}),
            json!({"channel": "a", "data": 1, "skip_history": "yes"}),
            json!({"channel": "a", "data": 1, "version": -1}),
            json!({"channel": "a", "b64data": "%%%"}),
            json!({"channel": "a", "data": 1, "b64data": "AA=="}),
        ];
        for payload in cases {
            let e = err("publish", payload.clone());
            assert_eq!(e.class, ErrorClass::InvalidParameter, "{payload}: {e}");
        }
        let e = err("subscribe", json!({"channel": "a", "user": "u", "recover_since": {"offset": "x"}}));
        assert!(e.message.contains("recover_since.offset"), "{e}");
        assert!(err("disconnect", json!({"user": "u", "disconnect": {"code": "x"}}))
            .message
            .contains("disconnect.code"));
        assert!(err("subscribe", json!({"channel": "a", "user": "u", "override": {"presence": true}}))
            .message
            .contains("override"));
    }

    #[test]
    fn full_commands_pass() {
        parse(
            "publish",
            json!({"channel": "a", "data": {"x": [1]}, "skip_history": true, "tags": {"k": "v"},
                   "idempotency_key": "k1", "delta": false, "version": 3, "version_epoch": "e"}),
        )
        .unwrap();
        parse("broadcast", json!({"channels": ["a", "b"], "b64data": "aGk="})).unwrap();
        parse(
            "subscribe",
            json!({"user": "1", "channel": "c", "info": {"n": 1}, "client": "cl", "session": "s",
                   "recover_since": {"offset": 1, "epoch": "e"}, "expire_at": 0,
                   "override": {"presence": {"value": true}}}),
        )
        .unwrap();
        parse("disconnect", json!({"user": "1", "whitelist": ["c1"], "disconnect": {"code": 4000, "reason": "bye"}}))
            .unwrap();
        parse("refresh", json!({"user": "1", "expired": true})).unwrap();
        // Unknown fields pass through for newer servers.
        parse("publish", json!({"channel": "a", "data": 1, "future_field": 1})).unwrap();
    }

    /// Found by tests/fuzz.rs: `"b64data": null` counted as base64 data.
    #[test]
    fn null_b64data_is_not_set() {
        parse("publish", json!({"channel": "a", "data": 1, "b64data": null})).unwrap();
        parse("broadcast", json!({"channels": ["a"], "data": {}, "b64data": null})).unwrap();
        assert_eq!(err("publish", json!({"channel": "a", "b64data": null})).class, ErrorClass::NullValue);
    }
}

/// Builds a payload from optional SQL arguments: a field is set only when its argument is not NULL.
#[derive(Debug, Default)]
pub struct PayloadBuilder {
    object: RawObject,
    /// The first argument that was not JSON, reported by `build`.
    error: Option<CommandError>,
}

impl PayloadBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn field<V: Into<Value>>(mut self, key: &str, value: Option<V>) -> Self {
        if let Some(v) = value {
            let raw = RawValue::from_string(v.into().to_string()).expect("a serialized Value is JSON");
            self.object.insert(key.to_owned(), raw);
        }
        self
    }

    /// Sets `key` to a JSON value given as text (a jsonb argument as PostgreSQL prints it),
    /// inserted as it is.
    pub fn raw(mut self, key: &str, json: Option<&str>) -> Self {
        if let Some(text) = json {
            match RawValue::from_string(text.to_owned()) {
                Ok(raw) => {
                    self.object.insert(key.to_owned(), raw);
                }
                Err(e) => {
                    self.error.get_or_insert(CommandError::new(
                        ErrorClass::InvalidJson,
                        format!("\"{key}\" is not valid JSON: {e}"),
                    ));
                }
            }
        }
        self
    }

    /// Sets `key` to the standard base64 of `bytes` (Centrifugo's `b64data`/`b64info`).
    pub fn base64(self, key: &str, bytes: Option<&[u8]>) -> Self {
        use base64::Engine as _;
        let encoded = bytes.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        self.field(key, encoded)
    }

    /// Sets `key` to `{"value": v}` inside the `override` object (subscribe option overrides).
    pub fn override_flag(self, key: &str, value: Option<bool>) -> Self {
        let Some(v) = value else { return self };
        let mut overrides: Map<String, Value> =
            self.object.get("override").and_then(|o| serde_json::from_str(o.get()).ok()).unwrap_or_default();
        overrides.insert(key.to_owned(), serde_json::json!({ "value": v }));
        self.field("override", Some(Value::Object(overrides)))
    }

    pub fn build(self, method: Method) -> Result<Command, CommandError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        // What Command::new would check, without writing the object out and reading it back.
        validate(method, &validation_view(method, &self.object)?)?;
        Ok(Command { method, payload: write_object(&self.object) })
    }
}

#[cfg(test)]
pub(crate) mod builder_tests {
    use super::*;
    use serde_json::json;

    /// Values JSON allows that a float or a JSON tree would change, and nesting past serde_json's
    /// recursion limit of 128.
    pub(crate) fn tricky_values() -> Vec<String> {
        let mut values: Vec<String> = [
            "123456789012345678901234567890",
            "-0.12345678901234567890123456789",
            "1e400",
            "-2.5E-300",
            "1E+2",
            r#""\u00e9\ud83d\ude00\u0001\"\\/""#,
            r#"{"b": 1, "a": [1.10, 2.500]}"#,
        ]
        .map(str::to_owned)
        .to_vec();
        values.push(format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)));
        values.push(format!("{}0{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)));
        values
    }

    #[test]
    fn raw_fields_keep_their_exact_text() {
        for value in tricky_values() {
            let c = PayloadBuilder::new()
                .field("channel", Some("c"))
                .raw("data", Some(&value))
                .build(Method::Publish)
                .unwrap();
            assert!(c.payload.contains(&format!("\"data\":{value}")), "{}", &value[..value.len().min(60)]);
            let c = PayloadBuilder::new()
                .field("user", Some("u"))
                .field("channel", Some("c"))
                .raw("info", Some(&value))
                .raw("data", Some(&value))
                .build(Method::Subscribe)
                .unwrap();
            assert!(c.payload.contains(&format!("\"info\":{value}")));
            // Command::new and ::parse, given the object and a JSON string holding it (Debezium).
            let text = format!(r#"{{"channel": "c", "data": {value}}}"#);
            for payload in [text.clone(), Value::String(text.clone()).to_string()] {
                let c = Command::new(Method::Publish, &payload).unwrap();
                assert!(c.payload.contains(&format!("\"data\":{value}")));
                let c = Command::parse("publish", &payload).unwrap();
                assert!(c.payload_json().contains(&format!("\"data\":{value}")));
            }
        }
        assert_eq!(
            PayloadBuilder::new().raw("data", Some("{bad")).build(Method::Publish).unwrap_err().class,
            ErrorClass::InvalidJson
        );
    }

    /// `build` validates the object in place; it must accept, refuse and write exactly what
    /// Command::new does for the same object written out.
    #[test]
    fn build_agrees_with_command_new() {
        let builders: Vec<(Method, PayloadBuilder)> = vec![
            (Method::Publish, PayloadBuilder::new().field("channel", Some("c")).raw("data", Some(r#"{"b": [1.50]}"#))),
            (Method::Publish, PayloadBuilder::new().field("channel", Some("")).raw("data", Some("1"))),
            (Method::Publish, PayloadBuilder::new().field("channel", Some("c"))),
            (
                Method::Publish,
                PayloadBuilder::new().field("channel", Some("c")).raw("data", Some("1")).field("b64data", Some("AA==")),
            ),
            (
                Method::Publish,
                PayloadBuilder::new().field("channel", Some("c")).raw("data", Some("null")).raw("tags", Some("[1]")),
            ),
            (
                Method::Broadcast,
                PayloadBuilder::new()
                    .field("channels", Some(vec!["a", "b"]))
                    .raw("data", Some("2"))
                    .field("version", Some(3)),
            ),
            (
                Method::Subscribe,
                PayloadBuilder::new().field("channel", Some("c")).override_flag("presence", Some(true)),
            ),
            (
                Method::Subscribe,
                PayloadBuilder::new()
                    .field("user", Some("u"))
                    .field("channel", Some("c"))
                    .override_flag("presence", Some(true)),
            ),
            (
                Method::Disconnect,
                PayloadBuilder::new().field("user", Some("u")).raw("disconnect", Some(r#"{"code": 4000}"#)),
            ),
            (Method::Refresh, PayloadBuilder::new().field("user", Some("u")).raw("expired", Some("1"))),
        ];
        for (method, builder) in builders {
            let written = write_object(&builder.object);
            let built = builder.build(method);
            assert_eq!(built, Command::new(method, &written), "{method} {written}");
        }
    }

    /// serde_json skips a raw value with a loop and a stack on the heap (`ignore_value`), so a
    /// raw value has no recursion limit and needs no call stack however deep it is.
    #[test]
    fn raw_values_of_any_depth_need_no_stack() {
        let depth = 100_000;
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}0{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        // 256 KiB of stack: a recursive parser would need megabytes at this depth.
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                for value in [&arrays, &objects] {
                    assert_eq!(serde_json::from_str::<&RawValue>(value).unwrap().get(), value.as_str());
                    assert_eq!(serde_json::from_str::<Box<RawValue>>(value).unwrap().get(), value.as_str());
                    let payload = format!(r#"{{"channel":"c","data":{value}}}"#);
                    assert_eq!(Command::new(Method::Publish, &payload).unwrap().payload, payload);
                    let c = PayloadBuilder::new()
                        .field("channel", Some("c"))
                        .raw("data", Some(value))
                        .build(Method::Publish)
                        .unwrap();
                    assert_eq!(c.payload, payload);
                    let label_filter = format!(r#"{{"channel":"c","all_users":true,"label_filter":{value}}}"#);
                    let e = Command::new(Method::Unsubscribe, &label_filter);
                    // Arrays are refused by type; objects pass unread (Centrifugo checks the grammar).
                    assert_eq!(e.is_ok(), value.starts_with('{'), "{e:?}");
                }
                // Unbalanced or truncated nesting is a clean error.
                let unbalanced = "[".repeat(depth);
                assert!(serde_json::from_str::<&RawValue>(&unbalanced).is_err());
                let e =
                    Command::new(Method::Publish, &format!(r#"{{"channel":"c","data":{unbalanced}}}"#)).unwrap_err();
                assert_eq!(e.class, ErrorClass::InvalidJson);
            })
            .unwrap()
            .join()
            .expect("no stack overflow, no panic");
    }

    #[test]
    fn typed_fields_nested_too_deep_are_clean_errors() {
        // The small fields validation parses hit serde_json's recursion limit: an error, not a crash.
        let deep = format!("{}0{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        let e = Command::new(Method::Publish, &format!(r#"{{"channel":"c","data":1,"tags":{deep}}}"#)).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidParameter);
        assert!(e.message.contains("\"tags\" cannot be read"), "{e}");
        let e =
            Command::new(Method::Unsubscribe, r#"{"channel":"c","all_users":true,"label_filter":[1]}"#).unwrap_err();
        assert!(e.message.contains("\"label_filter\" must be an object, got array"), "{e}");
    }

    #[test]
    fn repeated_fields_keep_the_last_value() {
        let c = Command::new(Method::Publish, r#"{"channel": "a", "data": 1, "channel": "b"}"#).unwrap();
        assert_eq!(c.payload, r#"{"channel":"b","data":1}"#);
    }

    #[test]
    fn null_arguments_are_left_out_and_binary_is_base64() {
        let c = PayloadBuilder::new()
            .field("channel", Some("c"))
            .base64("b64data", Some(b"hi".as_slice()))
            .field::<bool>("skip_history", None)
            .override_flag("presence", Some(true))
            .build(Method::Publish)
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&c.payload).unwrap(),
            json!({"channel": "c", "b64data": "aGk=", "override": {"presence": {"value": true}}})
        );
    }
}
