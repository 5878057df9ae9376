//! Centrifugo's `consumers` JSON array, pasted verbatim into `centrifugo.consumers`: entries of
//! type `kafka` (run by the Kafka bridge) and `postgresql` (an outbox drained by its own partition
//! workers), v5 (`disabled`) and v6 (`enabled`) shapes, names checked as Centrifugo checks them.

use serde_json::{Map, Value};

use crate::kafka::{duration_ms, KafkaConsumer};
use crate::partition::MAX_PARTITIONS;
use crate::settings::{quoted_table_name, valid_consumer_name};

/// A PostgreSQL outbox consumer: which database and table, how many partitions, how to drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConsumer {
    pub name: String,
    /// The database named by the entry's DSN (the workers run inside PostgreSQL, so host, port,
    /// user and password of the DSN are not used); None: `centrifugo.database`.
    pub database: Option<String>,
    pub table: String,
    pub num_partitions: i32,
    pub select_limit: i32,
    pub poll_interval_ms: u64,
    pub notification_channel: String,
}

/// The database name of a PostgreSQL DSN: URL form (`postgresql://u:p@h:5432/db?x=y`, the name
/// percent-encoded) or key/value form (`host=h dbname=db`, read as libpq and pgx read it).
pub fn dsn_database(dsn: &str) -> Option<String> {
    // ASCII whitespace only, as libpq: a name may end in any other char.
    let dsn = dsn.trim_matches(|c: char| c.is_ascii_whitespace());
    if let Some(rest) = dsn.strip_prefix("postgresql://").or_else(|| dsn.strip_prefix("postgres://")) {
        let path = rest.split_once('/').map(|(_, p)| p)?;
        let db = percent_decode(path.split(['?', '#']).next().unwrap_or(""));
        return (!db.is_empty()).then_some(db);
    }
    // The last dbname counts, as in libpq.
    conninfo_pairs(dsn)
        .into_iter()
        .rev()
        .find(|(key, _)| key == "dbname")
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// `text` with its `%XX` escapes decoded; as written when an escape is broken or the result is
/// not UTF-8.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let Some(hex) = hex else { return text.to_owned() };
            out.push(u8::from_str_radix(std::str::from_utf8(hex).expect("hex digits"), 16).expect("two hex digits"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

/// The `key=value` pairs of a key/value connection string: whitespace allowed around `=`, a
/// value bare or in single quotes, `\` escaping the next char in both. Stops at the first
/// malformed pair.
fn conninfo_pairs(dsn: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = dsn.chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(char::is_ascii_whitespace).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_ascii_whitespace()) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        if key.is_empty() || chars.next() != Some('=') {
            return pairs;
        }
        skip_spaces(&mut chars);
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '\'' if quoted => break,
                c if !quoted && c.is_ascii_whitespace() => break,
                c => value.push(c),
            }
        }
        pairs.push((key, value));
    }
}

fn outbox_from_json(name: &str, cfg: &Map<String, Value>) -> Result<OutboxConsumer, String> {
    let who = format!("postgresql consumer \"{name}\"");
    let table = cfg.get("outbox_table_name").and_then(Value::as_str).unwrap_or("").to_owned();
    if table.is_empty() {
        return Err(format!("{who}: outbox_table_name is required"));
    }
    quoted_table_name(&table).map_err(|e| format!("{who}: {e}"))?;
    let num_partitions = cfg.get("num_partitions").and_then(Value::as_i64).unwrap_or(1);
    if !(1..=i64::from(MAX_PARTITIONS)).contains(&num_partitions) {
        return Err(format!("{who}: num_partitions must be between 1 and {MAX_PARTITIONS}"));
    }
    let select_limit = cfg.get("partition_select_limit").and_then(Value::as_i64).unwrap_or(100);
    if !(1..=10_000).contains(&select_limit) {
        return Err(format!("{who}: partition_select_limit must be between 1 and 10000"));
    }
    let poll = match cfg.get("partition_poll_interval") {
        None | Some(Value::Null) => 300,
        v => duration_ms(v).map_err(|e| format!("{who}: partition_poll_interval: {e}"))?.max(1),
    };
    let notification_channel =
        cfg.get("partition_notification_channel").and_then(Value::as_str).unwrap_or("").to_owned();
    crate::settings::notification_channel(&notification_channel)
        .map_err(|e| format!("{who}: partition_notification_channel: {e}"))?;
    Ok(OutboxConsumer {
        name: name.to_owned(),
        database: cfg.get("dsn").and_then(Value::as_str).and_then(dsn_database),
        table,
        num_partitions: num_partitions as i32,
        select_limit: select_limit as i32,
        poll_interval_ms: poll,
        notification_channel,
    })
}

/// Values in a `consumers` JSON text that must never be logged: every string under a key that
/// names a password or a private key, and the password of every DSN. Read from the text as
/// written, whatever else is wrong with it.
pub fn consumers_secrets(json: &str) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("sasl_password" | "password" | "key_pem" | "tls_key_pem", Value::String(s)) => {
                            out.push(s.clone())
                        }
                        ("dsn", Value::String(dsn)) => {
                            out.extend(crate::endpoints::userinfo_secrets(dsn));
                            out.extend(
                                conninfo_pairs(dsn).into_iter().filter(|(k, _)| k == "password").map(|(_, v)| v),
                            );
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::from_str::<Value>(json) {
        walk(&value, &mut out);
    }
    out.retain(|s| !s.is_empty());
    out
}

/// An entry of Centrifugo's `consumers` array that the bridge runs.
#[derive(Debug, Clone, PartialEq, Eq)]
// A handful of entries, read once at start-up: boxing the Kafka variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ConsumerEntry {
    Kafka(KafkaConsumer),
    /// A PostgreSQL outbox consumer: drained by its own partition workers.
    Postgresql(OutboxConsumer),
}

/// Parses Centrifugo's `consumers` JSON array (v5 `disabled` or v6 `enabled`, v5 flat `tls_*`
/// options or the v6 `tls` object), skipping disabled entries and checking names: all entries,
/// or the first error.
pub fn parse_consumers(json: &str) -> Result<Vec<ConsumerEntry>, String> {
    parse_consumers_each(json)?.into_iter().map(|e| e.entry).collect()
}

/// The longest consumer name (bytes; names are ASCII).
pub const MAX_CONSUMER_NAME: usize = 63;

/// One enabled entry of the `consumers` array: what it is, or why it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryResult {
    /// The entry's name as written, or `consumers[i]` when it has no valid one.
    pub name: String,
    pub entry: Result<ConsumerEntry, String>,
}

/// As [`parse_consumers`], each entry on its own: one bad entry refuses only itself (a second
/// entry of a name is the one refused). Err only when the text is not a JSON array.
pub fn parse_consumers_each(json: &str) -> Result<Vec<EntryResult>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value =
        serde_json::from_str(json).map_err(|e| format!("centrifugo.consumers is not valid JSON: {e}"))?;
    let items = value.as_array().ok_or("centrifugo.consumers must be a JSON array")?;
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            out.push(EntryResult {
                name: format!("consumers[{i}]"),
                entry: Err(format!("centrifugo.consumers[{i}] must be an object")),
            });
            continue;
        };
        let name = obj.get("name").and_then(Value::as_str).unwrap_or("");
        if !valid_consumer_name(name) {
            out.push(EntryResult {
                name: format!("consumers[{i}]"),
                entry: Err(format!("centrifugo.consumers[{i}]: name \"{name}\" must match ^[a-zA-Z0-9_]{{2,}}$")),
            });
            continue;
        }
        let disabled = obj.get("disabled").and_then(Value::as_bool).unwrap_or(false)
            || obj.get("enabled").and_then(Value::as_bool) == Some(false);
        if disabled {
            continue;
        }
        // A worker finds its entry by a name handed over in PostgreSQL's fixed-size worker
        // data, and shows it in its process type: a longer one would be cut and never found.
        if name.len() > MAX_CONSUMER_NAME {
            out.push(EntryResult {
                name: format!("consumers[{i}]"),
                entry: Err(format!(
                    "centrifugo.consumers[{i}]: name of {} characters; at most {MAX_CONSUMER_NAME} are allowed",
                    name.len()
                )),
            });
            continue;
        }
        // Among enabled entries only: a disabled copy refuses nothing.
        if !names.insert(name.to_owned()) {
            out.push(EntryResult {
                name: name.to_owned(),
                entry: Err(format!("centrifugo.consumers: name \"{name}\" is used twice")),
            });
            continue;
        }
        let entry = match obj.get("type").and_then(Value::as_str).unwrap_or("") {
            "kafka" => {
                let cfg = obj.get("kafka").and_then(Value::as_object).cloned().unwrap_or_default();
                crate::kafka::kafka_from_json(name, &cfg)
                    .and_then(|consumer| consumer.validate().map(|()| ConsumerEntry::Kafka(consumer)))
            }
            "postgresql" => {
                let cfg = obj.get("postgresql").and_then(Value::as_object).cloned().unwrap_or_default();
                outbox_from_json(name, &cfg).map(ConsumerEntry::Postgresql)
            }
            other => Err(format!(
                "centrifugo.consumers[{i}] (\"{name}\"): type \"{other}\" is not supported here (kafka, postgresql)"
            )),
        };
        out.push(EntryResult { name: name.to_owned(), entry });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgresql_entries() {
        let entries = parse_consumers(
            r#"[{"name": "chat_pg", "type": "postgresql", "postgresql": {
            "dsn": "postgresql://u:secret@db:5432/chat?sslmode=disable", "outbox_table_name": "chat_outbox",
            "num_partitions": 4, "partition_select_limit": 50, "partition_poll_interval": "1s"}}]"#,
        )
        .unwrap();
        assert_eq!(
            entries,
            vec![ConsumerEntry::Postgresql(OutboxConsumer {
                name: "chat_pg".into(),
                database: Some("chat".into()),
                table: "chat_outbox".into(),
                num_partitions: 4,
                select_limit: 50,
                poll_interval_ms: 1000,
                notification_channel: String::new()
            })]
        );
        let long_channel =
            format!(r#"{{"outbox_table_name": "t", "partition_notification_channel": "{}"}}"#, "c".repeat(64));
        for (cfg, needle) in [
            (r#"{}"#, "outbox_table_name is required"),
            (r#"{"outbox_table_name": "a;b"}"#, "not a valid table name"),
            (r#"{"outbox_table_name": "t", "num_partitions": 0}"#, "num_partitions"),
            (long_channel.as_str(), "partition_notification_channel"),
        ] {
            let json = format!(r#"[{{"name": "pg", "type": "postgresql", "postgresql": {cfg}}}]"#);
            let e = parse_consumers(&json).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn secrets_of_the_consumers_json() {
        let json = r#"[{"name": "k", "type": "kafka", "kafka": {"sasl_password": "sasl-pw", "tls": {"key_pem": "KEY"}}},
            {"name": "p", "type": "postgresql", "postgresql": {"dsn": "postgresql://u:dsn-pw@h/db"}},
            {"name": "q", "type": "postgresql", "postgresql": {"dsn": "host=h password='kv pw' dbname=x"}}]"#;
        let mut secrets = consumers_secrets(json);
        secrets.sort();
        assert_eq!(secrets, vec!["KEY", "dsn-pw", "kv pw", "sasl-pw", "u:dsn-pw"]);
        assert!(consumers_secrets("[not json").is_empty());
    }

    #[test]
    fn one_bad_entry_refuses_only_itself() {
        let each = parse_consumers_each(
            r#"[{"name": "good", "type": "postgresql", "postgresql": {"outbox_table_name": "t"}},
                {"name": "bad", "type": "postgresql", "postgresql": {"num_partitions": 2}},
                {"name": "good", "type": "postgresql", "postgresql": {"outbox_table_name": "u"}},
                7,
                {"name": "kbad", "type": "kafka", "kafka": {"topics": ["t"]}}]"#,
        )
        .unwrap();
        let names: Vec<_> = each.iter().map(|e| (e.name.as_str(), e.entry.is_ok())).collect();
        assert_eq!(
            names,
            vec![("good", true), ("bad", false), ("good", false), ("consumers[3]", false), ("kbad", false)]
        );
        assert!(each[1].entry.as_ref().unwrap_err().contains("outbox_table_name is required"));
        assert!(each[2].entry.as_ref().unwrap_err().contains("used twice"));
        assert!(each[4].entry.as_ref().unwrap_err().contains("brokers are required"));
        assert!(parse_consumers_each("[not json").is_err());
        // Found by review: a name longer than the worker data that carries it was cut, and its
        // bridge never found its entry again; it is refused, alone, with the reason.
        let long = "k".repeat(MAX_CONSUMER_NAME + 1);
        let fits = "k".repeat(MAX_CONSUMER_NAME);
        let json = format!(
            r#"[{{"name": "{long}", "type": "postgresql", "postgresql": {{"outbox_table_name": "t"}}}},
                {{"name": "{fits}", "type": "postgresql", "postgresql": {{"outbox_table_name": "u"}}}}]"#
        );
        let each = parse_consumers_each(&json).unwrap();
        assert!(
            each[0].entry.as_ref().unwrap_err().contains("name of 64 characters; at most 63"),
            "{:?}",
            each[0].entry
        );
        assert!(each[1].entry.is_ok());
        // All or the first error, as before.
        assert!(parse_consumers(r#"[{"name": "bad", "type": "postgresql"}]"#).is_err());
    }

    #[test]
    fn dsn_forms() {
        assert_eq!(dsn_database("postgres://h/app").as_deref(), Some("app"));
        assert_eq!(dsn_database("host=h dbname=app user=u").as_deref(), Some("app"));
        assert_eq!(dsn_database("postgresql://h:5432"), None);
    }

    /// Found by tests/fuzz.rs: spaces around `=`, quoted values with spaces or escapes, and
    /// percent-encoded names were misread (None, a truncated name, or the escapes themselves).
    #[test]
    fn dsn_forms_as_libpq_reads_them() {
        assert_eq!(dsn_database("dbname = app").as_deref(), Some("app"));
        assert_eq!(dsn_database("host=h dbname='my db' user=u").as_deref(), Some("my db"));
        assert_eq!(dsn_database(r"dbname='it\'s' port=5432").as_deref(), Some("it's"));
        assert_eq!(dsn_database("dbname=a dbname=b").as_deref(), Some("b"));
        assert_eq!(dsn_database("postgresql://h/my%20db%C3%A9?sslmode=disable").as_deref(), Some("my dbé"));
        assert_eq!(dsn_database("postgres://h/100%"), Some("100%".into()));
        assert_eq!(dsn_database("dbname="), None);
    }
}
