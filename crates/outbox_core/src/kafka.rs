//! The Kafka bridge's pure logic: a Kafka consumer's settings (flat settings or an entry of
//! Centrifugo's `consumers` JSON, v5 and v6 shapes), their mapping to librdkafka properties, and
//! turning a Kafka record into a command exactly as Centrifugo's Kafka consumer reads it.
//!
//! Record formats, as Centrifugo accepts them:
//! - value `{"method": "...", "payload": {...}}` (payload may be a JSON string holding the object);
//! - with the method header (default `centrifugo-method`) present: the value is the bare payload;
//! - publication data mode: the value is the publication data; headers carry the channels
//!   (comma-separated; one → publish, several → broadcast), idempotency key, delta, version,
//!   version epoch and tags (`centrifugo-tag-<name>`).

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use crate::command::{write_object, RawObject};
use crate::dispatch::{prepare_text, Failure, Prepared};
use crate::settings::valid_consumer_name;

/// Header names of publication data mode (Centrifugo's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationDataMode {
    pub channels_header: String,
    pub idempotency_key_header: String,
    pub delta_header: String,
    pub version_header: String,
    pub version_epoch_header: String,
    pub tags_header_prefix: String,
}

impl Default for PublicationDataMode {
    fn default() -> Self {
        PublicationDataMode {
            channels_header: "centrifugo-channels".into(),
            idempotency_key_header: "centrifugo-idempotency-key".into(),
            delta_header: "centrifugo-delta".into(),
            version_header: "centrifugo-version".into(),
            version_epoch_header: "centrifugo-version-epoch".into(),
            tags_header_prefix: "centrifugo-tag-".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub fn parse(name: &str) -> Result<Option<SaslMechanism>, String> {
        match name.to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "plain" => Ok(Some(SaslMechanism::Plain)),
            "scram-sha-256" => Ok(Some(SaslMechanism::ScramSha256)),
            "scram-sha-512" => Ok(Some(SaslMechanism::ScramSha512)),
            "aws-msk-iam" => Err("sasl_mechanism \"aws-msk-iam\" is not supported by the in-database bridge (it needs AWS credentials and signing); use scram-sha-512 or Centrifugo's own consumer".into()),
            other => Err(format!("sasl_mechanism \"{other}\" is not one of plain, scram-sha-256, scram-sha-512")),
        }
    }

    fn librdkafka_name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A certificate or key given as a file path or as PEM text.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    File(String),
    Text(String),
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(p) => write!(f, "File({p})"),
            Pem::Text(_) => f.write_str("Text(..)"),
        }
    }
}

impl Pem {
    /// v6 options take either a path or the PEM itself.
    fn from_path_or_text(value: &str) -> Option<Pem> {
        match value.trim() {
            "" => None,
            v if v.starts_with("-----BEGIN") => Some(Pem::Text(v.to_owned())),
            v => Some(Pem::File(v.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub cert: Option<Pem>,
    pub key: Option<Pem>,
    pub root_ca: Option<Pem>,
    /// A server-side option in Centrifugo's TLS block; accepted and ignored by a client.
    pub client_ca: Option<Pem>,
    pub insecure_skip_verify: bool,
    pub server_name: String,
}

/// One Kafka consumer of the bridge.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConsumer {
    pub name: String,
    pub brokers: Vec<String>,
    pub topics: Vec<String>,
    pub consumer_group: String,
    pub max_poll_records: usize,
    pub fetch_max_bytes: u64,
    pub fetch_max_wait_ms: u64,
    pub fetch_read_uncommitted: bool,
    pub partition_queue_max_size: usize,
    pub dial_timeout_ms: u64,
    /// librdkafka's `session.timeout.ms` (0: its default): how long the group waits for a
    /// silent member before giving its partitions to others. Not an option of Centrifugo's.
    pub session_timeout_ms: u64,
    /// librdkafka's `max.poll.interval.ms` (0: its default): the longest a member may go
    /// between polls (the bridge does not poll while batches are in flight, so this bounds a
    /// round of resends). Not an option of Centrifugo's.
    pub max_poll_interval_ms: u64,
    pub instance_id: String,
    pub sasl: Option<(SaslMechanism, String, String)>,
    pub tls: Option<Tls>,
    pub method_header: String,
    pub publication_data_mode: Option<PublicationDataMode>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints the SASL password.
        f.debug_struct("KafkaConsumer")
            .field("name", &self.name)
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("consumer_group", &self.consumer_group)
            .field("sasl", &self.sasl.as_ref().map(|(m, u, _)| (m, u)))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Centrifugo's defaults for everything but the name, brokers, topics and group.
    pub fn new(name: &str, brokers: Vec<String>, topics: Vec<String>, group: &str) -> Self {
        KafkaConsumer {
            name: name.into(),
            brokers,
            topics,
            consumer_group: group.into(),
            max_poll_records: 100,
            fetch_max_bytes: 0,
            fetch_max_wait_ms: 0,
            fetch_read_uncommitted: false,
            partition_queue_max_size: 1000,
            dial_timeout_ms: 0,
            session_timeout_ms: 0,
            max_poll_interval_ms: 0,
            instance_id: String::new(),
            sasl: None,
            tls: None,
            method_header: "centrifugo-method".into(),
            publication_data_mode: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let who = format!("kafka consumer \"{}\"", self.name);
        if !valid_consumer_name(&self.name) {
            return Err(format!("{who}: name must match ^[a-zA-Z0-9_]{{2,}}$"));
        }
        if self.brokers.is_empty() {
            return Err(format!("{who}: brokers are required"));
        }
        if self.topics.is_empty() {
            return Err(format!("{who}: topics are required"));
        }
        if self.consumer_group.is_empty() {
            return Err(format!("{who}: consumer_group is required"));
        }
        // librdkafka's ranges, checked here so that a bad value is this consumer's error.
        if self.session_timeout_ms > 0 && !(1..=3_600_000).contains(&self.session_timeout_ms) {
            return Err(format!("{who}: session_timeout must be at most 1h"));
        }
        if self.max_poll_interval_ms > 0 && !(1..=86_400_000).contains(&self.max_poll_interval_ms) {
            return Err(format!("{who}: max_poll_interval must be at most 24h"));
        }
        // Unset, the bridge asks for 6 s (a rebalance within seconds).
        let effective_session = if self.session_timeout_ms > 0 { self.session_timeout_ms } else { 6_000 };
        let effective_poll = if self.max_poll_interval_ms > 0 { self.max_poll_interval_ms } else { 300_000 };
        if effective_poll < effective_session {
            return Err(format!(
                "{who}: max_poll_interval ({effective_poll} ms) must not be shorter than session_timeout ({effective_session} ms)"
            ));
        }
        if let Some((_, user, _)) = &self.sasl {
            if user.is_empty() {
                return Err(format!("{who}: sasl_user is required with sasl_mechanism"));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(format!("{who}: a TLS client certificate and key go together"));
            }
            if !tls.server_name.is_empty() {
                return Err(format!(
                    "{who}: tls server_name is not supported (librdkafka verifies each broker's advertised host name; \
                     remove server_name, or set tls_insecure_skip_verify for testing)"
                ));
            }
        }
        Ok(())
    }

    /// librdkafka properties for this consumer. Offsets are committed by the bridge only after
    /// a record is done, so auto-commit and auto offset store are off.
    pub fn librdkafka_config(&self) -> Vec<(String, String)> {
        let mut c: Vec<(String, String)> = vec![
            ("bootstrap.servers".into(), self.brokers.join(",")),
            ("group.id".into(), self.consumer_group.clone()),
            ("enable.auto.commit".into(), "false".into()),
            ("enable.auto.offset.store".into(), "false".into()),
            ("auto.offset.reset".into(), "earliest".into()),
            ("enable.partition.eof".into(), "false".into()),
            (
                "isolation.level".into(),
                if self.fetch_read_uncommitted { "read_uncommitted" } else { "read_committed" }.into(),
            ),
            ("client.id".into(), format!("centrifugo_outbox-{}", self.name)),
        ];
        if self.fetch_max_bytes > 0 {
            c.push(("fetch.max.bytes".into(), self.fetch_max_bytes.to_string()));
        }
        if self.fetch_max_wait_ms > 0 {
            c.push(("fetch.wait.max.ms".into(), self.fetch_max_wait_ms.to_string()));
        }
        if self.dial_timeout_ms > 0 {
            c.push(("socket.connection.setup.timeout.ms".into(), self.dial_timeout_ms.max(1000).to_string()));
        }
        if self.session_timeout_ms > 0 {
            c.push(("session.timeout.ms".into(), self.session_timeout_ms.to_string()));
        }
        if self.max_poll_interval_ms > 0 {
            c.push(("max.poll.interval.ms".into(), self.max_poll_interval_ms.to_string()));
        }
        if !self.instance_id.is_empty() {
            c.push(("group.instance.id".into(), self.instance_id.clone()));
        }
        let protocol = match (self.sasl.is_some(), self.tls.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "sasl_plaintext",
            (false, true) => "ssl",
            (true, true) => "sasl_ssl",
        };
        c.push(("security.protocol".into(), protocol.into()));
        if let Some((mechanism, user, password)) = &self.sasl {
            c.push(("sasl.mechanism".into(), mechanism.librdkafka_name().into()));
            c.push(("sasl.username".into(), user.clone()));
            c.push(("sasl.password".into(), password.clone()));
        }
        if let Some(tls) = &self.tls {
            let mut pem = |file_key: &str, text_key: &str, v: &Option<Pem>| match v {
                Some(Pem::File(p)) => c.push((file_key.into(), p.clone())),
                Some(Pem::Text(t)) => c.push((text_key.into(), t.clone())),
                None => {}
            };
            pem("ssl.certificate.location", "ssl.certificate.pem", &tls.cert);
            pem("ssl.key.location", "ssl.key.pem", &tls.key);
            pem("ssl.ca.location", "ssl.ca.pem", &tls.root_ca);
            if tls.insecure_skip_verify {
                c.push(("enable.ssl.certificate.verification".into(), "false".into()));
                c.push(("ssl.endpoint.identification.algorithm".into(), "none".into()));
            } else {
                c.push(("ssl.endpoint.identification.algorithm".into(), "https".into()));
            }
        }
        c
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(Value::String(s)) => split_list(s),
        _ => Vec::new(),
    }
}

/// A comma- or space-separated list (flat settings, Centrifugo's env-style broker lists).
pub fn split_list(s: &str) -> Vec<String> {
    s.split([',', ' ']).map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

/// Centrifugo durations: "500ms", "3s", "1m", or a number of milliseconds.
pub fn duration_ms(v: Option<&Value>) -> Result<u64, String> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("bad duration {n}")),
        Some(Value::String(s)) => {
            let s = s.trim();
            let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
            let n: f64 = num.parse().map_err(|_| format!("bad duration \"{s}\""))?;
            let factor = match unit {
                "ms" => 1.0,
                "s" | "" => 1000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                _ => return Err(format!("bad duration \"{s}\"")),
            };
            // Rounded: a decimal like "131072.8s" is a hair below its value in f64.
            Ok((n * factor).round() as u64)
        }
        Some(other) => Err(format!("bad duration {other}")),
    }
}

/// The largest `max_poll_records` and `partition_queue_max_size` (as for their flat settings).
pub const MAX_RECORDS_SETTING: i64 = 1_000_000;

pub(crate) fn kafka_from_json(name: &str, cfg: &Map<String, Value>) -> Result<KafkaConsumer, String> {
    let who = |e: String| format!("kafka consumer \"{name}\": {e}");
    let text = |k: &str| cfg.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut c =
        KafkaConsumer::new(name, strings(cfg.get("brokers")), strings(cfg.get("topics")), &text("consumer_group"));
    // Bounded as the flat settings are: each is allocated per partition and round.
    let bounded = |key: &str, n: i64| -> Result<usize, String> {
        if n > MAX_RECORDS_SETTING {
            return Err(who(format!("{key} {n} is above {MAX_RECORDS_SETTING}")));
        }
        Ok(n.max(1) as usize)
    };
    if let Some(n) = cfg.get("max_poll_records").and_then(Value::as_u64) {
        c.max_poll_records = bounded("max_poll_records", i64::try_from(n).unwrap_or(i64::MAX))?;
    }
    c.fetch_max_bytes = cfg.get("fetch_max_bytes").and_then(Value::as_u64).unwrap_or(0);
    c.fetch_max_wait_ms = duration_ms(cfg.get("fetch_max_wait")).map_err(who)?;
    c.fetch_read_uncommitted = cfg.get("fetch_read_uncommitted").and_then(Value::as_bool).unwrap_or(false);
    if let Some(n) = cfg.get("partition_queue_max_size").and_then(Value::as_i64) {
        c.partition_queue_max_size = bounded("partition_queue_max_size", n)?;
    }
    c.dial_timeout_ms = duration_ms(cfg.get("dial_timeout")).map_err(who)?;
    c.session_timeout_ms = duration_ms(cfg.get("session_timeout")).map_err(who)?;
    c.max_poll_interval_ms = duration_ms(cfg.get("max_poll_interval")).map_err(who)?;
    c.instance_id = text("instance_id");
    if let Some(m) = SaslMechanism::parse(&text("sasl_mechanism")).map_err(who)? {
        c.sasl = Some((m, text("sasl_user"), text("sasl_password")));
    }
    c.tls = match cfg.get("tls") {
        // v5: "tls": true with flat tls_* options beside it.
        Some(Value::Bool(true)) => {
            Some(flat_tls(|k| text(k), cfg.get("tls_insecure_skip_verify").and_then(Value::as_bool).unwrap_or(false)))
        }
        // v6: "tls": {"enabled": true, "cert_pem": ..., "key_pem": ..., "server_ca_pem": ..., ...}
        Some(Value::Object(t)) if t.get("enabled").and_then(Value::as_bool) == Some(true) => {
            let tt = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("");
            Some(Tls {
                cert: Pem::from_path_or_text(tt("cert_pem")),
                key: Pem::from_path_or_text(tt("key_pem")),
                root_ca: Pem::from_path_or_text(tt("server_ca_pem")),
                client_ca: Pem::from_path_or_text(tt("client_ca_pem")),
                insecure_skip_verify: t.get("insecure_skip_verify").and_then(Value::as_bool).unwrap_or(false),
                server_name: tt("server_name").to_owned(),
            })
        }
        _ => None,
    };
    if let Some(h) = cfg.get("method_header").and_then(Value::as_str) {
        c.method_header = h.to_owned();
    }
    c.publication_data_mode = match cfg.get("publication_data_mode") {
        Some(Value::Bool(true)) => Some(PublicationDataMode::default()),
        Some(Value::Object(m)) if m.get("enabled").and_then(Value::as_bool) == Some(true) => {
            let mut mode = PublicationDataMode::default();
            let set = |field: &mut String, key: &str| {
                if let Some(v) = m.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()) {
                    *field = v.to_owned();
                }
            };
            set(&mut mode.channels_header, "channels_header");
            set(&mut mode.idempotency_key_header, "idempotency_key_header");
            set(&mut mode.delta_header, "delta_header");
            set(&mut mode.version_header, "version_header");
            set(&mut mode.version_epoch_header, "version_epoch_header");
            set(&mut mode.tags_header_prefix, "tags_header_prefix");
            Some(mode)
        }
        _ => None,
    };
    Ok(c)
}

/// The seed doc's flat TLS options (also the flat `centrifugo.kafka_tls_*` settings).
pub fn flat_tls(get: impl Fn(&str) -> String, insecure_skip_verify: bool) -> Tls {
    let pick = |file: &str, pem: &str| {
        let text = get(pem);
        if !text.trim().is_empty() {
            Some(Pem::Text(text))
        } else {
            Pem::from_path_or_text(&get(file))
        }
    };
    Tls {
        cert: pick("tls_cert", "tls_cert_pem"),
        key: pick("tls_key", "tls_key_pem"),
        root_ca: pick("tls_root_ca", "tls_root_ca_pem"),
        client_ca: pick("tls_client_ca", "tls_client_ca_pem"),
        insecure_skip_verify,
        server_name: get("server_name"),
    }
}

/// Where a record came from: the key of its dead letter and of its derived idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPosition<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, when the broker has one.
    pub timestamp_ms: Option<i64>,
}

/// The idempotency key of a Kafka record: stable across redeliveries of the same record; its
/// timestamp keeps it unique when offsets are reused (a topic deleted and made again).
pub fn kafka_idempotency_key(pos: &RecordPosition<'_>) -> String {
    match pos.timestamp_ms {
        Some(ts) => format!("cfk-{}-{}-{}-{ts}", pos.topic, pos.partition, pos.offset),
        None => format!("cfk-{}-{}-{}", pos.topic, pos.partition, pos.offset),
    }
}

fn header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    if name.is_empty() {
        return None;
    }
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Result<Option<String>, Failure> {
    match header(headers, name) {
        None => Ok(None),
        Some(v) => String::from_utf8(v.to_vec())
            .map(|s| if s.is_empty() { None } else { Some(s) })
            .map_err(|_| Failure::malformed(format!("header {name} is not UTF-8"))),
    }
}

/// The method and payload a record carries, as Centrifugo's Kafka consumer reads it; malformed
/// records are failures (they become dead letters, and their offsets are committed).
pub fn parse_record(
    consumer: &KafkaConsumer,
    value: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    pos: &RecordPosition<'_>,
) -> Result<Prepared, Failure> {
    let key = || kafka_idempotency_key(pos);
    let value = value.unwrap_or_default();
    if let Some(mode) = &consumer.publication_data_mode {
        return publication_record(mode, value, headers, key);
    }
    let text = std::str::from_utf8(value).map_err(|e| Failure::malformed(format!("record value is not JSON: {e}")))?;
    match header_text(headers, &consumer.method_header)? {
        Some(method) => prepare_text(&method, text, key),
        None => {
            // The envelope read one level deep (a repeated field keeps its last value, as in Go):
            // the payload stays as its bytes.
            let envelope: BTreeMap<String, &RawValue> =
                serde_json::from_str(text).map_err(|e| Failure::malformed(format!("record value is not JSON: {e}")))?;
            let method: String = envelope
                .get("method")
                .and_then(|m| serde_json::from_str::<Option<String>>(m.get()).transpose())
                .ok_or_else(|| Failure::malformed("record has no \"method\" (and no method header)"))?
                .map_err(|e| Failure::malformed(format!("record \"method\" is not a string: {e}")))?;
            let payload = envelope.get("payload").ok_or_else(|| Failure::malformed("record has no \"payload\""))?;
            prepare_text(&method, payload.get(), key)
        }
    }
}

fn publication_record(
    mode: &PublicationDataMode,
    value: &[u8],
    headers: &[(String, Vec<u8>)],
    key: impl FnOnce() -> String,
) -> Result<Prepared, Failure> {
    let channels: Vec<String> = header_text(headers, &mode.channels_header)?
        .map(|c| c.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    if channels.is_empty() {
        return Err(Failure::malformed(format!("no channels in header {}", mode.channels_header)));
    }
    // The data goes on as the record's own bytes.
    let data = std::str::from_utf8(value)
        .map_err(|e| e.to_string())
        .and_then(|text| RawValue::from_string(text.to_owned()).map_err(|e| e.to_string()))
        .map_err(|e| Failure::malformed(format!("publication data is not JSON: {e}")))?;
    fn json(value: impl serde::Serialize) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).expect("strings, numbers and maps of strings serialize")
    }
    let mut payload = RawObject::new();
    payload.insert("data".into(), data);
    let method = if channels.len() == 1 {
        payload.insert("channel".into(), json(&channels[0]));
        "publish"
    } else {
        payload.insert("channels".into(), json(&channels));
        "broadcast"
    };
    if let Some(k) = header_text(headers, &mode.idempotency_key_header)? {
        payload.insert("idempotency_key".into(), json(k));
    }
    if let Some(d) = header_text(headers, &mode.delta_header)? {
        let delta = parse_bool(&d)
            .ok_or_else(|| Failure::malformed(format!("header {}: \"{d}\" is not a boolean", mode.delta_header)))?;
        payload.insert("delta".into(), json(delta));
    }
    if let Some(v) = header_text(headers, &mode.version_header)? {
        let version: u64 = v.parse().map_err(|_| {
            Failure::malformed(format!("header {}: \"{v}\" is not a version number", mode.version_header))
        })?;
        payload.insert("version".into(), json(version));
    }
    if let Some(e) = header_text(headers, &mode.version_epoch_header)? {
        payload.insert("version_epoch".into(), json(e));
    }
    let tags: BTreeMap<&str, String> = headers
        .iter()
        .filter(|(k, _)| !mode.tags_header_prefix.is_empty() && k.starts_with(&mode.tags_header_prefix))
        .map(|(k, v)| (&k[mode.tags_header_prefix.len()..], String::from_utf8_lossy(v).into_owned()))
        .collect();
    if !tags.is_empty() {
        payload.insert("tags".into(), json(tags));
    }
    prepare_text(method, &write_object(&payload), key)
}

/// Go's strconv.ParseBool, which Centrifugo uses for the delta header.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Method;
    use crate::dispatch::FailureKind;
    use serde_json::json;

    const POS: RecordPosition<'static> = RecordPosition { topic: "t", partition: 2, offset: 9, timestamp_ms: None };

    fn consumer() -> KafkaConsumer {
        KafkaConsumer::new("kc", vec!["127.0.0.1:9092".into()], vec!["t".into()], "g")
    }

    /// The payload's fields, for assertions on their values.
    fn fields(p: &Prepared) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&p.payload).expect("a JSON object")
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn method_and_payload_value() {
        let p = parse_record(
            &consumer(),
            Some(br#"{"method": "publish", "payload": {"channel": "c", "data": 1}}"#),
            &[],
            &POS,
        )
        .unwrap();
        assert_eq!(p.method, Method::Publish);
        assert_eq!(fields(&p)["idempotency_key"], "cfk-t-2-9");
        // payload as a JSON string holding the object
        let p = parse_record(
            &consumer(),
            Some(br#"{"method": "broadcast", "payload": "{\"channels\": [\"a\"], \"data\": 2}"}"#),
            &[],
            &POS,
        )
        .unwrap();
        assert_eq!(p.method, Method::Broadcast);
    }

    #[test]
    fn method_header_with_a_bare_payload() {
        let p = parse_record(
            &consumer(),
            Some(br#"{"user": "42", "channel": "c"}"#),
            &h(&[("centrifugo-method", "unsubscribe")]),
            &POS,
        )
        .unwrap();
        assert_eq!(p.method, Method::Unsubscribe);
        assert_eq!(fields(&p)["user"], "42");
        let mut c = consumer();
        c.method_header = "x-method".into();
        let p =
            parse_record(&c, Some(br#"{"channel": "c", "data": 3}"#), &h(&[("x-method", "publish")]), &POS).unwrap();
        assert_eq!(fields(&p)["data"], 3);
    }

    #[test]
    fn publication_data_mode_headers() {
        let mut c = consumer();
        c.publication_data_mode = Some(PublicationDataMode::default());
        let headers = h(&[
            ("centrifugo-channels", "a"),
            ("centrifugo-idempotency-key", "k1"),
            ("centrifugo-delta", "true"),
            ("centrifugo-version", "5"),
            ("centrifugo-version-epoch", "e"),
            ("centrifugo-tag-kind", "x"),
        ]);
        let p = parse_record(&c, Some(br#"{"text": "hi"}"#), &headers, &POS).unwrap();
        assert_eq!(p.method, Method::Publish);
        assert_eq!(
            serde_json::Value::Object(fields(&p)),
            json!({"channel": "a", "data": {"text": "hi"}, "idempotency_key": "k1",
            "delta": true, "version": 5, "version_epoch": "e", "tags": {"kind": "x"}})
        );
        let p = parse_record(&c, Some(b"1"), &h(&[("centrifugo-channels", "a,b")]), &POS).unwrap();
        assert_eq!(p.method, Method::Broadcast);
        assert_eq!(fields(&p)["channels"], json!(["a", "b"]));
        assert_eq!(fields(&p)["idempotency_key"], "cfk-t-2-9");
        for bad in [
            h(&[]),
            h(&[("centrifugo-channels", "a"), ("centrifugo-version", "x")]),
            h(&[("centrifugo-channels", "a"), ("centrifugo-delta", "maybe")]),
        ] {
            assert_eq!(parse_record(&c, Some(b"1"), &bad, &POS).unwrap_err().kind, FailureKind::Malformed);
        }
    }

    #[test]
    fn record_keys_are_unique_per_record() {
        assert_eq!(kafka_idempotency_key(&POS), "cfk-t-2-9");
        let pos = RecordPosition { topic: "orders.v1", partition: 2, offset: 9, timestamp_ms: Some(1_700_000_000_000) };
        assert_eq!(kafka_idempotency_key(&pos), "cfk-orders.v1-2-9-1700000000000");
        let p = parse_record(
            &consumer(),
            Some(br#"{"method": "publish", "payload": {"channel": "c", "data": 1}}"#),
            &[],
            &pos,
        )
        .unwrap();
        assert_eq!(fields(&p)["idempotency_key"], "cfk-orders.v1-2-9-1700000000000");
    }

    #[test]
    fn every_record_format_keeps_the_record_bytes() {
        let mut data_mode = consumer();
        data_mode.publication_data_mode = Some(Default::default());
        for value in crate::command::builder_tests::tricky_values() {
            let shown = &value[..value.len().min(60)];
            let bare = format!(r#"{{"channel": "a", "data": {value}}}"#);
            let as_it_was = format!(r#"{{"idempotency_key":"cfk-t-2-9","channel": "a", "data": {value}}}"#);
            // {"method": ..., "payload": <object>} and {"method": ..., "payload": "<object as a string>"}
            let envelope = format!(r#"{{"method": "publish", "payload": {bare}}}"#);
            let p = parse_record(&consumer(), Some(envelope.as_bytes()), &[], &POS).unwrap();
            assert_eq!(p.payload, as_it_was, "{shown}");
            let envelope =
                format!(r#"{{"method": "publish", "payload": {}}}"#, serde_json::Value::String(bare.clone()));
            let p = parse_record(&consumer(), Some(envelope.as_bytes()), &[], &POS).unwrap();
            assert_eq!(
                p.payload,
                format!(r#"{{"channel":"a","data":{value},"idempotency_key":"cfk-t-2-9"}}"#),
                "{shown}"
            );
            // The method header with the bare payload as the value.
            let p = parse_record(&consumer(), Some(bare.as_bytes()), &h(&[("centrifugo-method", "publish")]), &POS)
                .unwrap();
            assert_eq!(p.payload, as_it_was, "{shown}");
            // Publication data mode: the value is the data.
            let p =
                parse_record(&data_mode, Some(value.as_bytes()), &h(&[("centrifugo-channels", "a,b")]), &POS).unwrap();
            assert_eq!(
                p.payload,
                format!(r#"{{"idempotency_key":"cfk-t-2-9","channels":["a","b"],"data":{value}}}"#),
                "{shown}"
            );
        }
        // Not JSON, or cut short, is a dead letter, however deep.
        let unbalanced = "[".repeat(10_000);
        assert_eq!(
            parse_record(&data_mode, Some(unbalanced.as_bytes()), &h(&[("centrifugo-channels", "a")]), &POS)
                .unwrap_err()
                .kind,
            FailureKind::Malformed
        );
        let envelope = format!(r#"{{"method": "publish", "payload": {{"channel": "a", "data": {unbalanced}}}}}"#);
        assert_eq!(
            parse_record(&consumer(), Some(envelope.as_bytes()), &[], &POS).unwrap_err().kind,
            FailureKind::Malformed
        );
    }

    #[test]
    fn a_repeated_envelope_field_keeps_its_last_value() {
        let value = br#"{"method": "nope", "payload": 1, "method": "publish", "payload": {"channel": "c", "data": 1}}"#;
        let p = parse_record(&consumer(), Some(value), &[], &POS).unwrap();
        assert_eq!(p.method, Method::Publish);
    }

    #[test]
    fn garbage_is_malformed() {
        for value in [
            &b"not json"[..],
            br#"{"payload": {}}"#,
            br#"{"method": "publish"}"#,
            br#"{"method": "nope", "payload": {}}"#,
            br#"{"method": "publish", "payload": 5}"#,
        ] {
            let f = parse_record(&consumer(), Some(value), &[], &POS).unwrap_err();
            assert_eq!(f.kind, FailureKind::Malformed, "{}", String::from_utf8_lossy(value));
        }
        assert!(parse_record(&consumer(), None, &[], &POS).is_err());
    }

    #[test]
    fn kafka_entries_of_consumers_json_v5_and_v6() {
        use crate::consumers::{parse_consumers, ConsumerEntry};
        let entries = parse_consumers(r#"[
            {"name": "pg1", "type": "postgresql", "postgresql": {"dsn": "x", "outbox_table_name": "t"}},
            {"name": "k5", "type": "kafka", "kafka": {"brokers": ["b:9092"], "topics": ["t"], "consumer_group": "g",
                "sasl_mechanism": "scram-sha-512", "sasl_user": "u", "sasl_password": "p", "tls": true,
                "tls_root_ca": "/ca.pem", "fetch_max_wait": "250ms", "publication_data_mode": true}},
            {"name": "k6", "type": "kafka", "enabled": true, "kafka": {"brokers": ["b:9092"], "topics": ["t"], "consumer_group": "g",
                "tls": {"enabled": true, "server_ca_pem": "-----BEGIN CERTIFICATE-----\nx"}, "method_header": "m",
                "publication_data_mode": {"enabled": true, "channels_header": "ch"}}},
            {"name": "off5", "type": "kafka", "disabled": true},
            {"name": "off6", "type": "kafka", "enabled": false}
        ]"#).unwrap();
        assert_eq!(entries.len(), 3);
        assert!(matches!(&entries[0], ConsumerEntry::Postgresql(p) if p.name == "pg1"));
        let ConsumerEntry::Kafka(k5) = &entries[1] else { panic!() };
        assert_eq!(k5.fetch_max_wait_ms, 250);
        assert_eq!(k5.tls.as_ref().unwrap().root_ca, Some(Pem::File("/ca.pem".into())));
        let cfg = k5.librdkafka_config();
        assert!(cfg.contains(&("security.protocol".into(), "sasl_ssl".into())));
        assert!(cfg.contains(&("sasl.mechanism".into(), "SCRAM-SHA-512".into())));
        assert!(!format!("{k5:?}").contains("\"p\""), "Debug must not show the password");
        let ConsumerEntry::Kafka(k6) = &entries[2] else { panic!() };
        assert!(matches!(k6.tls.as_ref().unwrap().root_ca, Some(Pem::Text(_))));
        assert_eq!(k6.publication_data_mode.as_ref().unwrap().channels_header, "ch");
        assert_eq!(k6.method_header, "m");
    }

    #[test]
    fn session_timeout_and_max_poll_interval_reach_librdkafka_and_are_checked_together() {
        use crate::consumers::{parse_consumers, ConsumerEntry};
        let json = |extra: &str| {
            format!(
                r#"[{{"name": "k1", "type": "kafka", "kafka": {{"brokers": ["b"], "topics": ["t"], "consumer_group": "g"{extra}}}}}]"#
            )
        };
        let entries = parse_consumers(&json(r#", "session_timeout": "10s", "max_poll_interval": "2m""#)).unwrap();
        let ConsumerEntry::Kafka(k) = &entries[0] else { panic!() };
        let cfg = k.librdkafka_config();
        assert!(cfg.contains(&("session.timeout.ms".into(), "10000".into())), "{cfg:?}");
        assert!(cfg.contains(&("max.poll.interval.ms".into(), "120000".into())), "{cfg:?}");
        // Unset: librdkafka's defaults, not named.
        let entries = parse_consumers(&json("")).unwrap();
        let ConsumerEntry::Kafka(k) = &entries[0] else { panic!() };
        assert!(!k
            .librdkafka_config()
            .iter()
            .any(|(key, _)| key == "session.timeout.ms" || key == "max.poll.interval.ms"));
        // librdkafka refuses a poll interval below the session timeout: this entry's error, at parse time.
        let e = parse_consumers(&json(r#", "session_timeout": "60s", "max_poll_interval": "30s""#)).unwrap_err();
        assert!(e.contains("max_poll_interval (30000 ms) must not be shorter than session_timeout (60000 ms)"), "{e}");
        let e = parse_consumers(&json(r#", "max_poll_interval": "5s""#)).unwrap_err();
        assert!(e.contains("session_timeout (6000 ms)"), "{e}");
        assert!(parse_consumers(&json(r#", "session_timeout": "2h""#)).unwrap_err().contains("at most 1h"));
    }

    #[test]
    fn consumers_json_errors_are_clear() {
        use crate::consumers::parse_consumers;
        for (json, needle) in [
            ("{", "not valid JSON"),
            ("{}", "array"),
            (r#"[{"name": "a", "type": "kafka"}]"#, "^[a-zA-Z0-9_]{2,}$"),
            (
                r#"[{"name": "aa", "type": "kafka", "kafka": {}}, {"name": "aa", "type": "kafka"}]"#,
                "brokers are required",
            ),
            (
                r#"[{"name": "aa", "type": "postgresql", "postgresql": {"outbox_table_name": "t"}}, {"name": "aa", "type": "postgresql"}]"#,
                "used twice",
            ),
            (r#"[{"name": "aa", "type": "nats_jetstream"}]"#, "not supported"),
            (
                r#"[{"name": "aa", "type": "kafka", "kafka": {"brokers": ["b"], "topics": ["t"], "consumer_group": "g", "sasl_mechanism": "aws-msk-iam"}}]"#,
                "aws-msk-iam",
            ),
            // Bounded as the flat settings are (a huge value would be allocated per round).
            (
                r#"[{"name": "aa", "type": "kafka", "kafka": {"brokers": ["b"], "topics": ["t"], "consumer_group": "g", "max_poll_records": 1000000000000}}]"#,
                "max_poll_records 1000000000000 is above 1000000",
            ),
            (
                r#"[{"name": "aa", "type": "kafka", "kafka": {"brokers": ["b"], "topics": ["t"], "consumer_group": "g", "partition_queue_max_size": 1000001}}]"#,
                "partition_queue_max_size 1000001 is above 1000000",
            ),
        ] {
            let e = parse_consumers(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms(Some(&json!("3s"))).unwrap(), 3000);
        assert_eq!(duration_ms(Some(&json!("1.5s"))).unwrap(), 1500);
        assert_eq!(duration_ms(Some(&json!(250))).unwrap(), 250);
        assert!(duration_ms(Some(&json!("soon"))).is_err());
        // Found by tests/fuzz.rs: 131072.8 * 1000.0 is 131072799.99999999 in f64 (was truncated).
        assert_eq!(duration_ms(Some(&json!("131072.8s"))).unwrap(), 131_072_800);
        assert_eq!(duration_ms(Some(&json!("1.005s"))).unwrap(), 1005);
    }
}
