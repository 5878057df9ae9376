//! Property-based fuzzing of every parser of outside input in outbox_core: command payloads (SQL
//! API and outbox rows), Kafka records and their headers, Centrifugo's replies, the
//! `centrifugo.consumers` JSON, and the table-name and URL settings.
//!
//! One module with one `proptest!` block per target. Each property says either "never panics"
//! (every input is Ok or Err) or "what parses comes back as it was sent". Inputs are arbitrary
//! (any chars, any bytes) and also built to be valid (JSON of random shape, commands with random
//! fields, consumers with random settings), so that the deep paths are reached, not only the
//! first error.
//!
//! Cases per property: the standard PROPTEST_CASES environment variable, else [`DEFAULT_CASES`]
//! (a few seconds for the whole file in a debug build, so `cargo test -p outbox_core` stays
//! quick); `bench/fuzz.sh` runs a million per property in release mode.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::value::RawValue;

/// Cases per property when PROPTEST_CASES is not set (proptest's own default, stated so that it
/// stays small whatever proptest's becomes).
const DEFAULT_CASES: u32 = 256;

/// proptest's defaults, which read PROPTEST_CASES and the other PROPTEST_* variables; only the
/// case count differs when the variable is not set.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig {
        // A failing case's seed goes to tests/fuzz.proptest-regressions, replayed first by later runs.
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config
}

/// Generators shared by the targets. JSON is generated as text, not as a tree, so that what is
/// tested includes exactly how a value was written (spacing, escapes, number spellings).
mod gen {
    use std::collections::BTreeMap;

    use outbox_core::Method;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::{select, Index};

    /// Whitespace JSON allows around tokens (none, most often).
    pub fn ws() -> impl Strategy<Value = &'static str> + Clone {
        select(&["", "", "", " ", "\n", "\t", "\r\n  "][..])
    }

    /// Any string: every char (controls, NUL, non-BMP), any length below `max`.
    pub fn any_text(max: usize) -> impl Strategy<Value = String> + Clone {
        vec(any::<char>(), 0..max).prop_map(String::from_iter)
    }

    /// Byte sequences that are not UTF-8: overlong NUL, an encoded surrogate, past U+10FFFF, a
    /// lone continuation byte, a truncated sequence, bytes never valid.
    const NOT_UTF8: &[&[u8]] = &[b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82", b"\xff\xfe"];

    /// Any bytes: short random ones, text with a sequence that is not UTF-8 spliced in, empty,
    /// or huge (64 KiB and more).
    pub fn any_bytes() -> impl Strategy<Value = Vec<u8>> + Clone {
        prop_oneof![
            6 => vec(any::<u8>(), 0..48),
            3 => (any_text(24), select(NOT_UTF8), any::<Index>()).prop_map(|(text, bad, at)| {
                let mut bytes = text.into_bytes();
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, bad.iter().copied());
                bytes
            }),
            1 => Just(Vec::new()),
            1 => (any::<u8>(), 65_536usize..70_000).prop_map(|(byte, len)| vec![byte; len]),
        ]
    }

    /// A char as it may be written inside a JSON string literal.
    fn escape_char(c: char) -> String {
        match c {
            '"' => "\\\"".into(),
            '\\' => "\\\\".into(),
            c if u32::from(c) < 0x20 => format!("\\u{:04x}", u32::from(c)),
            c => c.to_string(),
        }
    }

    /// One char of a JSON string literal: plain, escaped, or a `\u` escape of any code unit.
    /// With `lone_surrogates`, also escapes of unpaired surrogates: valid JSON text that no Rust
    /// String can hold (serde_json refuses them when decoding, skips them when not).
    fn string_piece(lone_surrogates: bool) -> BoxedStrategy<String> {
        let plain = any::<char>().prop_map(escape_char);
        let escapes = select(
            &[
                "\\\"",
                "\\\\",
                "\\/",
                "\\b",
                "\\f",
                "\\n",
                "\\r",
                "\\t",
                "\\u0000",
                "\\u00e9",
                "\\ud83d\\ude00",
                "\\uFFFF",
            ][..],
        )
        .prop_map(str::to_owned);
        let unit = any::<u16>().prop_map(move |u| match u {
            0xD800..=0xDFFF if !lone_surrogates => format!("\\u{:04x}", u - 0xD000),
            u => format!("\\u{u:04x}"),
        });
        if lone_surrogates {
            let lone = select(&["\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ud800\\ud800", "\\ude00\\ud83d"][..])
                .prop_map(str::to_owned);
            prop_oneof![6 => plain, 2 => escapes, 1 => unit, 1 => lone].boxed()
        } else {
            prop_oneof![6 => plain, 2 => escapes, 1 => unit].boxed()
        }
    }

    /// A JSON string literal as written, quotes included, possibly with lone surrogate escapes.
    pub fn json_string() -> BoxedStrategy<String> {
        vec(string_piece(true), 0..10).prop_map(|p| format!("\"{}\"", p.concat())).boxed()
    }

    /// A JSON string literal that decodes to a Rust String.
    pub fn clean_json_string() -> BoxedStrategy<String> {
        vec(string_piece(false), 0..10).prop_map(|p| format!("\"{}\"", p.concat())).boxed()
    }

    /// A JSON string literal that decodes to a non-empty Rust String.
    pub fn non_empty_json_string() -> BoxedStrategy<String> {
        vec(string_piece(false), 1..10).prop_map(|p| format!("\"{}\"", p.concat())).boxed()
    }

    /// A JSON number as written: any length of digits, fractions, exponents far out of range.
    pub fn json_number() -> BoxedStrategy<String> {
        prop_oneof![
            3 => "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,7})?",
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => select(&["1e1000000", "-1e1000000", "1e-1000000", "-0", "-0.0e-0", "1E+2", "18446744073709551616",
                          "-9223372036854775809", "123456789012345678901234567890"][..]).prop_map(str::to_owned),
        ]
        .boxed()
    }

    /// Nesting far past serde_json's recursion limit (128).
    pub fn deep_json() -> impl Strategy<Value = String> + Clone {
        (100usize..5_000, any::<bool>()).prop_map(|(depth, arrays)| {
            if arrays {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}0{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            }
        })
    }

    /// Any JSON value as written: random shape and spacing, tricky numbers and strings, and now
    /// and then nesting thousands deep.
    pub fn json_value() -> BoxedStrategy<String> {
        let leaf = prop_oneof![
            1 => select(&["null", "true", "false"][..]).prop_map(str::to_owned),
            2 => json_number(),
            2 => json_string(),
        ];
        let nested = leaf.prop_recursive(4, 24, 5, |inner| {
            prop_oneof![
                vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                    let items: Vec<String> = items.iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                    format!("[{}]", items.join(","))
                }),
                vec((ws(), json_string(), ws(), ws(), inner, ws()), 0..5).prop_map(|fields| {
                    let fields: Vec<String> =
                        fields.iter().map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{v}{d}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        });
        prop_oneof![20 => nested, 1 => deep_json()].boxed()
    }

    /// `text` damaged at a random place: cut short, a char inserted, or a char removed.
    pub fn damaged(text: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        (text, any::<Index>(), any::<char>(), 0..3u8).prop_map(|(text, at, c, how)| {
            let mut at = at.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let (head, tail) = text.split_at(at);
            match how {
                0 => head.to_owned(),
                1 => format!("{head}{c}{tail}"),
                _ => format!("{head}{}", tail.chars().skip(1).collect::<String>()),
            }
        })
    }

    /// Field names the code looks at, and a few it does not.
    pub const FIELD_NAMES: &[&str] = &[
        "channel",
        "channels",
        "data",
        "b64data",
        "user",
        "client",
        "session",
        "info",
        "b64info",
        "idempotency_key",
        "tags",
        "skip_history",
        "delta",
        "version",
        "version_epoch",
        "recover_since",
        "expire_at",
        "override",
        "label_filter",
        "all_users",
        "whitelist",
        "disconnect",
        "expired",
        "method",
        "payload",
        "future_field",
    ];

    /// An object key as written: mostly a known field name (sometimes with one char escaped, as
    /// `"chan\u006eel"`), else any string that decodes.
    pub fn field_key() -> BoxedStrategy<String> {
        prop_oneof![
            4 => select(FIELD_NAMES).prop_map(|k| format!("\"{k}\"")),
            1 => (select(FIELD_NAMES), any::<Index>()).prop_map(|(k, at)| {
                let at = at.index(k.len());
                format!("\"{}\\u{:04x}{}\"", &k[..at], k.as_bytes()[at], &k[at + 1..])
            }),
            2 => clean_json_string(),
        ]
        .boxed()
    }

    /// A JSON object as written, with what it holds: each field's key as decoded and value as
    /// written (values never contain the surrounding whitespace).
    #[derive(Debug, Clone)]
    pub struct JsonObject {
        pub text: String,
        pub fields: Vec<(String, String)>,
    }

    impl JsonObject {
        /// Writes `fields` (decoded key, value text) as an object with random spacing taken from `spaces`.
        pub fn write(fields: Vec<(String, String)>, spaces: &[&str]) -> JsonObject {
            let mut space = spaces.iter().cycle();
            let mut text = format!("{}{{", space.next().unwrap_or(&""));
            for (i, (key, value)) in fields.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                let key = serde_json::to_string(key).expect("a string serializes");
                let [a, b, c, d] = [(); 4].map(|_| *space.next().unwrap_or(&""));
                text.push_str(&format!("{a}{key}{b}:{c}{value}{d}"));
            }
            text.push('}');
            text.push_str(space.next().unwrap_or(&""));
            JsonObject { text, fields }
        }

        /// The fields as Centrifugo reads them: a repeated key keeps its last value.
        pub fn last_wins(&self) -> BTreeMap<String, String> {
            self.fields.iter().cloned().collect()
        }

        /// The object as `write_object` writes it: compact, keys in order, values as written.
        pub fn compact(&self) -> String {
            compact(&self.last_wins())
        }
    }

    /// A map of field values written as compact JSON object text.
    pub fn compact(fields: &BTreeMap<String, String>) -> String {
        let fields: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).expect("a string serializes")))
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    /// An object of fields whose keys come from `key` (literals that decode) and values from `value`.
    pub fn json_object(
        key: BoxedStrategy<String>,
        value: BoxedStrategy<String>,
        fields: std::ops::Range<usize>,
    ) -> impl Strategy<Value = JsonObject> {
        (vec((key, value), fields), vec(ws(), 12)).prop_map(|(fields, spaces)| {
            let fields = fields
                .into_iter()
                .map(|(k, v)| (serde_json::from_str::<String>(&k).expect("keys decode"), v))
                .collect();
            JsonObject::write(fields, &spaces)
        })
    }

    /// A payload of random fields, mostly known names with values of any JSON type.
    pub fn random_payload() -> impl Strategy<Value = JsonObject> {
        json_object(field_key(), json_value(), 0..8)
    }

    // Values of the typed fields, as written.

    fn boolean() -> BoxedStrategy<String> {
        select(&["true", "false"][..]).prop_map(str::to_owned).boxed()
    }

    fn unsigned() -> BoxedStrategy<String> {
        prop_oneof![any::<u64>().prop_map(|n| n.to_string()), (0u64..1000).prop_map(|n| n.to_string())].boxed()
    }

    fn integer() -> BoxedStrategy<String> {
        any::<i64>().prop_map(|n| n.to_string()).boxed()
    }

    fn base64(min_len: usize) -> BoxedStrategy<String> {
        use base64::Engine as _;
        vec(any::<u8>(), min_len..40)
            .prop_map(|b| format!("\"{}\"", base64::engine::general_purpose::STANDARD.encode(b)))
            .boxed()
    }

    fn array_of(item: BoxedStrategy<String>, len: std::ops::Range<usize>) -> BoxedStrategy<String> {
        (vec((ws(), item, ws()), len))
            .prop_map(|items| {
                format!("[{}]", items.iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect::<Vec<_>>().join(","))
            })
            .boxed()
    }

    fn object_of(value: BoxedStrategy<String>) -> BoxedStrategy<String> {
        json_object(clean_json_string(), value, 0..4).prop_map(|o| o.text.trim().to_owned()).boxed()
    }

    /// Publication data that counts as data (JSON null means "no data").
    fn data() -> BoxedStrategy<String> {
        json_value().prop_map(|v| if v == "null" { "{}".to_owned() } else { v }).boxed()
    }

    type Field = Option<(String, String)>;

    /// A required field.
    fn req(name: &'static str, value: BoxedStrategy<String>) -> BoxedStrategy<Field> {
        value.prop_map(move |v| Some((name.to_owned(), v))).boxed()
    }

    /// An optional field: absent, set, or JSON null (which means "not set").
    fn opt(name: &'static str, value: BoxedStrategy<String>) -> BoxedStrategy<Field> {
        let null = Just(Some((name.to_owned(), "null".to_owned())));
        prop_oneof![3 => Just(None), 3 => value.prop_map(move |v| Some((name.to_owned(), v))), 1 => null].boxed()
    }

    /// Either of two sets of fields.
    fn either(a: Vec<BoxedStrategy<Field>>, b: Vec<BoxedStrategy<Field>>) -> BoxedStrategy<Vec<Field>> {
        prop_oneof![a, b].boxed()
    }

    /// The fields of a command Centrifugo accepts for `method`, every optional field random,
    /// unknown fields too, in random order.
    pub fn valid_fields(method: Method) -> BoxedStrategy<Vec<(String, String)>> {
        let publication = || {
            vec![
                opt("skip_history", boolean()),
                opt("tags", object_of(clean_json_string())),
                opt("idempotency_key", clean_json_string()),
                opt("delta", boolean()),
                opt("version", unsigned()),
                opt("version_epoch", clean_json_string()),
            ]
        };
        let data_or_b64 = || {
            either(
                vec![req("data", data()), opt("b64data", Just("null".to_owned()).boxed())],
                vec![req("b64data", base64(1)), opt("data", Just("null".to_owned()).boxed())],
            )
        };
        // Who a user-targeting command is for: a user (maybe anonymous), all users, or a label filter.
        let target = || {
            prop_oneof![
                vec![req("user", clean_json_string())],
                vec![req("all_users", Just("true".to_owned()).boxed()), opt("user", clean_json_string())],
                vec![req("label_filter", object_of(json_value())), opt("user", clean_json_string())],
            ]
            .boxed()
        };
        let targeting = || vec![opt("client", clean_json_string()), opt("session", clean_json_string())];
        let unknown = || vec![opt("future_field", json_value()), opt("ẞ\u{0}", json_value())];
        let channel = || req("channel", non_empty_json_string());
        let fields: Vec<BoxedStrategy<Vec<Field>>> = match method {
            Method::Publish => vec![vec![channel()].boxed(), data_or_b64(), publication().boxed()],
            Method::Broadcast => vec![
                vec![req("channels", array_of(non_empty_json_string(), 1..5))].boxed(),
                data_or_b64(),
                publication().boxed(),
            ],
            Method::Subscribe => vec![
                vec![channel()].boxed(),
                target(),
                targeting().boxed(),
                vec![
                    opt("info", json_value()),
                    opt("b64info", base64(0)),
                    opt("data", json_value()),
                    opt("b64data", base64(0)),
                    opt("recover_since", object_of_members(&[("offset", unsigned()), ("epoch", clean_json_string())])),
                    opt("expire_at", integer()),
                    opt(
                        "override",
                        object_of(
                            prop_oneof![boolean().prop_map(|b| format!("{{\"value\":{b}}}")), Just("null".to_owned())]
                                .boxed(),
                        ),
                    ),
                ]
                .boxed(),
            ],
            Method::Unsubscribe => vec![vec![channel()].boxed(), target(), targeting().boxed()],
            Method::Disconnect => vec![
                target(),
                targeting().boxed(),
                vec![
                    opt("whitelist", array_of(clean_json_string(), 0..4)),
                    opt("disconnect", object_of_members(&[("code", unsigned()), ("reason", clean_json_string())])),
                ]
                .boxed(),
            ],
            Method::Refresh => vec![
                target(),
                targeting().boxed(),
                vec![opt("expired", boolean()), opt("expire_at", integer()), opt("info", json_value())].boxed(),
            ],
            Method::HistoryRemove => vec![vec![channel()].boxed()],
        };
        (fields, unknown())
            .prop_map(|(groups, unknown)| groups.into_iter().flatten().chain(unknown).flatten().collect::<Vec<_>>())
            .prop_shuffle()
            .boxed()
    }

    /// An object with some of `members` (each absent, set or null).
    fn object_of_members(members: &[(&'static str, BoxedStrategy<String>)]) -> BoxedStrategy<String> {
        let members: Vec<BoxedStrategy<Field>> = members.iter().map(|(name, value)| opt(name, value.clone())).collect();
        (members, vec(ws(), 12))
            .prop_map(|(members, spaces)| {
                JsonObject::write(members.into_iter().flatten().collect(), &spaces).text.trim().to_owned()
            })
            .boxed()
    }

    /// A command Centrifugo accepts: its method and its payload as written.
    pub fn valid_command() -> impl Strategy<Value = (Method, JsonObject)> {
        select(Method::ALL.to_vec()).prop_flat_map(|method| {
            (valid_fields(method), vec(ws(), 40))
                .prop_map(move |(fields, spaces)| (method, JsonObject::write(fields, &spaces)))
        })
    }

    /// A method name as a caller may write it: the accepted ones, the refused ones, anything.
    pub fn method_name() -> BoxedStrategy<String> {
        let names: Vec<&str> = Method::ALL
            .iter()
            .map(|m| m.as_str())
            .chain(["batch", "presence", "rpc", "Publish", "publish ", ""])
            .collect();
        prop_oneof![4 => select(names).prop_map(str::to_owned), 1 => any_text(12)].boxed()
    }
}

/// Command payloads: `Command::parse`/`new` (SQL API), `raw_object`/`write_object`, the
/// `PayloadBuilder` of the typed SQL functions, and `prepare`/`prepare_text` (outbox rows, whose
/// payload is the caller's jsonb text).
mod command_payloads {
    use super::*;
    use gen::JsonObject;
    use outbox_core::command::{raw_object, trim_json, write_object};
    use outbox_core::dispatch::{prepare, prepare_text, FailureKind};
    use outbox_core::{Command, ErrorClass, Method, PayloadBuilder};

    /// The fields of an object as text, the way `raw_object` reads them.
    fn raw_fields(text: &str) -> Option<BTreeMap<String, String>> {
        raw_object(text).ok().map(|o| o.into_iter().map(|(k, v)| (k, v.get().to_owned())).collect())
    }

    /// A JSON string holding `text`, as Debezium sends a jsonb column.
    fn as_json_string(text: &str) -> String {
        serde_json::to_string(text).expect("a string serializes")
    }

    /// Any payload text: arbitrary, JSON of any shape, objects of known fields, valid commands,
    /// each of those damaged, or wrapped in a JSON string.
    fn any_payload() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            2 => gen::any_text(40),
            2 => gen::json_value(),
            3 => gen::random_payload().prop_map(|o| o.text),
            3 => gen::valid_command().prop_map(|(_, o)| o.text),
        ];
        prop_oneof![
            6 => text.clone(),
            2 => gen::damaged(text.clone()),
            1 => text.prop_map(|t| as_json_string(&t)),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any method name and payload: a command or an error, never a panic; a command parses
        /// again to itself (its payload is what `raw_object`+`write_object` make of the input).
        #[test]
        fn any_payload_is_a_command_or_an_error(
            (method, payload) in prop_oneof![
                (gen::method_name(), any_payload()),
                // A valid command's own method, its payload maybe damaged: the paths past the first check.
                gen::valid_command().prop_map(|(m, o)| (m.as_str().to_owned(), o.text)),
                (gen::valid_command(), any::<prop::sample::Index>(), gen::json_value()).prop_map(|((m, o), at, value)| {
                    let mut fields = o.fields;
                    if !fields.is_empty() {
                        let at = at.index(fields.len());
                        fields[at].1 = value;
                    }
                    (m.as_str().to_owned(), JsonObject::write(fields, &[""]).text)
                }),
                gen::damaged(gen::valid_command().prop_map(|(m, o)| format!("{}\u{1}{}", m.as_str(), o.text)))
                    .prop_map(|t| t.split_once('\u{1}').map_or_else(|| ("publish".to_owned(), t.clone()), |(m, p)| (m.to_owned(), p.to_owned()))),
            ],
        ) {
            match Command::parse(&method, &payload) {
                Ok(command) => {
                    prop_assert_eq!(command.method.as_str(), method.as_str());
                    prop_assert_eq!(&command.payload, &write_object(&raw_object(&payload).unwrap()));
                    prop_assert_eq!(Command::parse(&method, &command.payload), Ok(command.clone()));
                    prop_assert_eq!(Command::new(command.method, &as_json_string(&command.payload)), Ok(command));
                }
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
            prop_assert_eq!(Method::parse(&method).is_ok(), Method::ALL.iter().any(|m| m.as_str() == method));
        }

        /// An object of random fields: `raw_object` keeps each value's exact text (a repeated key
        /// keeps its last value), `write_object` writes it back compact, also when the object
        /// comes as a JSON string holding it.
        #[test]
        fn raw_object_keeps_every_value_as_written(object in gen::random_payload()) {
            let expected = object.last_wins();
            prop_assert_eq!(raw_fields(&object.text), Some(expected.clone()));
            prop_assert_eq!(raw_fields(&as_json_string(&object.text)), Some(expected));
            let compact = write_object(&raw_object(&object.text).unwrap());
            prop_assert_eq!(&compact, &object.compact());
            prop_assert_eq!(write_object(&raw_object(&compact).unwrap()), compact);
        }

        /// A valid command with random fields is accepted, with every value exactly as written;
        /// the JSON-string form gives the same command.
        #[test]
        fn valid_commands_pass_with_their_values_as_written((method, object) in gen::valid_command()) {
            let command = Command::new(method, &object.text);
            let expected = object.compact();
            prop_assert_eq!(command.as_ref().map(|c| c.payload.as_str()), Ok(expected.as_str()), "{}", object.text);
            prop_assert_eq!(Command::new(method, &as_json_string(&object.text)), command.clone());
            prop_assert_eq!(Command::parse(method.as_str(), &object.text), command);
        }

        /// A valid command with one field's value replaced by any JSON: accepted with every value
        /// as written, or refused with an error of a documented class.
        #[test]
        fn valid_commands_with_a_random_value_pass_or_fail_cleanly(
            (method, object) in gen::valid_command(),
            at in any::<prop::sample::Index>(),
            key in gen::field_key(),
            value in gen::json_value(),
        ) {
            let mut fields = object.fields.clone();
            let key = serde_json::from_str::<String>(&key).unwrap();
            if fields.is_empty() {
                fields.push((key, value));
            } else {
                let at = at.index(fields.len());
                fields[at].1 = value;
            }
            let object = JsonObject::write(fields, &[" "]);
            match Command::new(method, &object.text) {
                Ok(command) => prop_assert_eq!(command.payload, object.compact()),
                Err(e) => prop_assert!(
                    matches!(e.class, ErrorClass::InvalidParameter | ErrorClass::NullValue | ErrorClass::InvalidJson),
                    "{:?}", e
                ),
            }
        }

        /// The typed SQL functions' builder: a jsonb argument goes in as written (JSON's own
        /// whitespace around it trimmed) or is refused as not JSON; bytes go in as base64 that
        /// decodes back to them; a field given twice keeps the last value.
        #[test]
        fn payload_builder_keeps_arguments_as_given(
            channel in gen::any_text(12),
            data in prop_oneof![gen::json_value(), gen::any_text(20), gen::damaged(gen::json_value())],
            info in proptest::option::of(gen::json_value()),
            bytes in gen::any_bytes(),
            presence in proptest::option::of(any::<bool>()),
        ) {
            let data_is_json = serde_json::from_str::<&RawValue>(&data).is_ok();
            let built = PayloadBuilder::new()
                .field("channel", Some("placeholder"))
                .field("channel", Some(channel.as_str()))
                .raw("data", Some(&data))
                .build(Method::Publish);
            match &built {
                Ok(c) => prop_assert_eq!(&c.payload, &format!(r#"{{"channel":{},"data":{}}}"#, serde_json::to_string(&channel).unwrap(), trim_json(&data))),
                Err(e) if !data_is_json => prop_assert_eq!(e.class, ErrorClass::InvalidJson),
                // Valid JSON data fails only as a command: an empty channel or null data.
                Err(e) => prop_assert!(channel.is_empty() || trim_json(&data) == "null", "{:?}", e),
            }
            let built = PayloadBuilder::new()
                .field("user", Some("u"))
                .field("channel", Some("c"))
                .raw("info", info.as_deref())
                .base64("b64data", Some(&bytes))
                .override_flag("presence", presence)
                .build(Method::Subscribe);
            let fields = raw_fields(&built.map_err(|e| TestCaseError::fail(e.message))?.payload).unwrap();
            use base64::Engine as _;
            let b64: String = serde_json::from_str(&fields["b64data"]).unwrap();
            prop_assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), bytes);
            prop_assert_eq!(fields.get("info").map(String::as_str), info.as_deref().map(trim_json));
            prop_assert_eq!(fields.contains_key("override"), presence.is_some());
        }

        /// An outbox row, as the workers read it: `prepare_text` (the fast path, which passes an
        /// object through as written) agrees with `prepare` on the method and every field, keeps
        /// a caller's non-empty idempotency key, adds one to publish/broadcast rows otherwise, and
        /// refuses only as a malformed row.
        #[test]
        fn prepare_text_agrees_with_prepare(
            method in gen::method_name(),
            payload in prop_oneof![
                3 => any_payload(),
                3 => (gen::valid_command(), idempotency_key()).prop_map(|((_, object), key)| with_key(object, key)),
            ],
        ) {
            let fast = prepare_text(&method, &payload, || "generated".into());
            let slow = prepare(&method, &payload, || "generated".into());
            match (&fast, &slow) {
                (Ok(fast), Ok(slow)) => {
                    prop_assert_eq!(fast.method, slow.method);
                    let fields = raw_fields(&fast.payload);
                    prop_assert!(fields.is_some(), "not an object: {}", fast.payload);
                    prop_assert_eq!(&fields, &raw_fields(&slow.payload), "{}", payload);
                    let fields = fields.unwrap();
                    let key = fields.get("idempotency_key");
                    if matches!(fast.method, Method::Publish | Method::Broadcast) {
                        // Any non-empty JSON string counts, as in Go (a lone surrogate reads as U+FFFD).
                        prop_assert!(key.is_some_and(|k| k.starts_with('"') && k.len() > 2), "{:?}", key);
                    }
                    // The caller's fields are all there, as written.
                    let given = raw_fields(&payload).unwrap();
                    for (name, value) in &given {
                        if name != "idempotency_key" || key != Some(&"\"generated\"".to_owned()) {
                            prop_assert_eq!(fields.get(name), Some(value));
                        }
                    }
                }
                (Err(fast), Err(slow)) => {
                    prop_assert_eq!(fast.kind, FailureKind::Malformed);
                    prop_assert_eq!(slow.kind, FailureKind::Malformed);
                }
                _ => prop_assert!(false, "prepare_text {:?} but prepare {:?} for {:?}", fast, slow, payload),
            }
        }
    }

    /// An idempotency key as a caller may set it (or not).
    fn idempotency_key() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            Just("null".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"\\ud800\"".to_owned()),
            Just("5".to_owned()),
            gen::json_string(),
        ])
    }

    /// `object` with its idempotency key replaced by `key` (None: removed).
    fn with_key(object: JsonObject, key: Option<String>) -> String {
        let mut fields: Vec<_> = object.fields.into_iter().filter(|(k, _)| k != "idempotency_key").collect();
        fields.extend(key.map(|k| ("idempotency_key".to_owned(), k)));
        JsonObject::write(fields, &[" ", ""]).text
    }
}

/// Kafka records: `parse_record` over the three formats (envelope, method header with a bare
/// payload, publication data mode), with any value bytes and any headers.
mod kafka_records {
    use super::*;
    use gen::JsonObject;
    use outbox_core::command::raw_object;
    use outbox_core::dispatch::{prepare_text, FailureKind};
    use outbox_core::kafka::{kafka_idempotency_key, parse_record, KafkaConsumer, PublicationDataMode, RecordPosition};
    use outbox_core::Method;
    use proptest::collection::vec;
    use proptest::sample::select;

    const POS: RecordPosition<'static> =
        RecordPosition { topic: "orders", partition: 3, offset: 77, timestamp_ms: Some(1_700_000_000_000) };

    fn key() -> String {
        kafka_idempotency_key(&POS)
    }

    type Headers = Vec<(String, Vec<u8>)>;

    /// A header name a consumer may be set to: the default, empty, short, any string.
    fn header_name(default: &'static str) -> BoxedStrategy<String> {
        prop_oneof![4 => Just(default.to_owned()), 1 => Just(String::new()), 1 => Just("m".to_owned()), 1 => gen::any_text(16)].boxed()
    }

    /// A consumer with any method header and, half the time, publication data mode with any header names.
    fn consumer() -> impl Strategy<Value = KafkaConsumer> {
        let mode = (
            header_name("centrifugo-channels"),
            header_name("centrifugo-idempotency-key"),
            header_name("centrifugo-delta"),
            header_name("centrifugo-version"),
            header_name("centrifugo-version-epoch"),
            header_name("centrifugo-tag-"),
        )
            .prop_map(|(channels, idempotency_key, delta, version, version_epoch, tags)| PublicationDataMode {
                channels_header: channels,
                idempotency_key_header: idempotency_key,
                delta_header: delta,
                version_header: version,
                version_epoch_header: version_epoch,
                tags_header_prefix: tags,
            });
        (header_name("centrifugo-method"), proptest::option::of(mode)).prop_map(|(method_header, mode)| {
            let mut consumer = KafkaConsumer::new("kc", vec!["b:9092".into()], vec!["orders".into()], "g");
            consumer.method_header = method_header;
            consumer.publication_data_mode = mode;
            consumer
        })
    }

    /// Header values the code reads: method names, booleans, numbers, channel lists, and any bytes.
    fn header_value() -> BoxedStrategy<Vec<u8>> {
        let meaningful = select(
            &[
                "publish",
                "broadcast",
                "subscribe",
                "history_remove",
                "batch",
                "presence",
                "nope",
                "",
                "true",
                "0",
                "maybe",
                "5",
                "+5",
                "-1",
                "18446744073709551615",
                "18446744073709551616",
                "a",
                "a,b",
                " a , ,b ",
                ",",
                "é,\u{0}",
            ][..],
        )
        .prop_map(|s| s.as_bytes().to_vec());
        prop_oneof![3 => meaningful, 2 => gen::any_bytes(), 1 => gen::any_text(20).prop_map(String::into_bytes)].boxed()
    }

    /// Headers for `consumer`: its own header names (some repeated), tags, and any other names.
    fn headers(consumer: &KafkaConsumer) -> BoxedStrategy<Headers> {
        let mut names = vec![consumer.method_header.clone(), "centrifugo-method".to_owned(), String::new()];
        if let Some(mode) = &consumer.publication_data_mode {
            names.extend(
                [
                    &mode.channels_header,
                    &mode.idempotency_key_header,
                    &mode.delta_header,
                    &mode.version_header,
                    &mode.version_epoch_header,
                ]
                .map(String::clone),
            );
        }
        let prefix = consumer.publication_data_mode.as_ref().map_or_else(String::new, |m| m.tags_header_prefix.clone());
        // In publication data mode, a channels header that names channels, most of the time.
        let channels = match consumer.publication_data_mode.as_ref().map(|m| m.channels_header.clone()) {
            Some(header) => proptest::option::weighted(
                0.75,
                select(vec!["a", "a,b", " a , ,b ", "é,\u{0}", "orders:1"])
                    .prop_map(move |list| (header.clone(), list.as_bytes().to_vec())),
            )
            .boxed(),
            None => Just(None).boxed(),
        };
        let name = prop_oneof![
            4 => select(names),
            2 => gen::any_text(8).prop_map(move |tag| format!("{prefix}{tag}")),
            1 => gen::any_text(30),
            1 => (any::<char>(), 65_536usize..70_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        ];
        (channels, vec((name, header_value()), 0..8))
            .prop_map(|(channels, others)| channels.into_iter().chain(others).collect())
            .boxed()
    }

    /// Any record value: any bytes, JSON of any shape, envelopes, bare payloads, each maybe damaged.
    fn any_value() -> impl Strategy<Value = Option<Vec<u8>>> {
        let text = prop_oneof![
            gen::json_value(),
            envelope().prop_map(|(_, _, text)| text),
            gen::valid_command().prop_map(|(_, o)| o.text),
        ];
        proptest::option::of(prop_oneof![
            2 => gen::any_bytes(),
            4 => text.clone().prop_map(String::into_bytes),
            2 => gen::damaged(text).prop_map(String::into_bytes),
        ])
    }

    /// A `{"method": ..., "payload": ...}` envelope: the method as decoded, the payload as written,
    /// and the envelope's text, with other fields around and, sometimes, earlier values of
    /// `method` and `payload` that the later ones replace (Go keeps the last).
    fn envelope() -> impl Strategy<Value = (String, String, String)> {
        let method = prop_oneof![
            4 => gen::method_name().prop_map(|m| serde_json::to_string(&m).unwrap()),
            1 => Just("\"publi\\u0073h\"".to_owned()),
            1 => gen::clean_json_string(),
        ];
        let payload = prop_oneof![
            4 => gen::valid_command().prop_map(|(_, o)| o.text.trim_matches([' ', '\t', '\n', '\r']).to_owned()),
            1 => gen::valid_command().prop_map(|(_, o)| serde_json::to_string(&o.text).unwrap()),
            2 => gen::json_value(),
        ];
        let others = vec((gen::field_key(), gen::json_value()), 0..3);
        let earlier = proptest::option::of((gen::json_value(), gen::json_value()));
        (method, payload, others, earlier, vec(gen::ws(), 30)).prop_flat_map(
            |(method, payload, others, earlier, spaces)| {
                let mut fields: Vec<(String, String)> = others
                    .into_iter()
                    .map(|(k, v)| (serde_json::from_str::<String>(&k).unwrap(), v))
                    .filter(|(k, _)| k != "method" && k != "payload")
                    .collect();
                fields.push(("method".into(), method.clone()));
                fields.push(("payload".into(), payload.clone()));
                (Just(fields).prop_shuffle(), Just((method, payload, earlier, spaces))).prop_map(
                    |(fields, (method, payload, earlier, spaces))| {
                        let mut all: Vec<(String, String)> =
                            earlier.map_or_else(Vec::new, |(m, p)| vec![("method".into(), m), ("payload".into(), p)]);
                        all.extend(fields);
                        let text = JsonObject::write(all, &spaces).text;
                        (serde_json::from_str::<String>(&method).unwrap(), payload, text)
                    },
                )
            },
        )
    }

    /// A channel name as the channels header may carry it: no comma, no surrounding whitespace.
    fn channel_name() -> impl Strategy<Value = String> {
        gen::any_text(12).prop_map(|c| c.replace(',', "").trim().to_owned()).prop_map(|c| {
            if c.is_empty() {
                "ch".to_owned()
            } else {
                c
            }
        })
    }

    proptest! {
        #![proptest_config(config())]

        /// Any record, any headers, any consumer settings: a prepared command or a malformed
        /// record, never a panic. A prepared command is an object whose publish/broadcast has
        /// an idempotency key.
        #[test]
        fn any_record_is_prepared_or_malformed(
            (consumer, headers) in consumer().prop_flat_map(|c| { let h = headers(&c); (Just(c), h) }),
            value in any_value(),
        ) {
            match parse_record(&consumer, value.as_deref(), &headers, &POS) {
                Ok(prepared) => {
                    let fields = raw_object(&prepared.payload);
                    prop_assert!(fields.is_ok(), "not an object: {}", prepared.payload);
                    if matches!(prepared.method, Method::Publish | Method::Broadcast) {
                        let key = fields.unwrap().get("idempotency_key").map(|k| k.get().to_owned());
                        prop_assert!(key.is_some_and(|k| k.starts_with('"') && k.len() > 2));
                    }
                }
                Err(failure) => prop_assert_eq!(failure.kind, FailureKind::Malformed),
            }
        }

        /// An envelope record is exactly its payload prepared as an outbox row is (the payload's
        /// bytes passed through), whatever else the envelope holds.
        #[test]
        fn an_envelope_is_its_payload_as_written((method, payload, text) in envelope()) {
            let consumer = KafkaConsumer::new("kc", vec!["b".into()], vec!["orders".into()], "g");
            let from_record = parse_record(&consumer, Some(text.as_bytes()), &[], &POS);
            prop_assert_eq!(&from_record, &prepare_text(&method, &payload, key), "{}", text);
            // A valid object payload of a known method: passed on as written, a key in front
            // when it lacks one, rewritten compact when its key is not a non-empty string.
            let as_written = payload.starts_with('{') && Method::parse(&method).is_ok();
            if let (true, Ok(prepared)) = (as_written, &from_record) {
                let fields = raw_object(&payload).unwrap();
                let given_key = fields.get("idempotency_key").map(|k| k.get());
                let needs_key = matches!(prepared.method, Method::Publish | Method::Broadcast);
                if !needs_key || given_key.is_some_and(|k| k.starts_with('"') && k.len() > 2) {
                    prop_assert_eq!(&prepared.payload, &payload);
                } else if given_key.is_some() {
                    let mut expected: BTreeMap<String, String> = fields.iter().map(|(k, v)| (k.clone(), v.get().to_owned())).collect();
                    expected.insert("idempotency_key".into(), format!("\"{}\"", key()));
                    prop_assert_eq!(&prepared.payload, &gen::compact(&expected));
                } else if fields.is_empty() {
                    prop_assert_eq!(&prepared.payload, &format!("{{\"idempotency_key\":\"{}\"}}", key()));
                } else {
                    let rest = payload[1..].trim_start_matches([' ', '\t', '\n', '\r']);
                    prop_assert_eq!(&prepared.payload, &format!("{{\"idempotency_key\":\"{}\",{rest}", key()));
                }
            }
        }

        /// With the method header set, the record value is the bare payload, prepared as an
        /// outbox row is; the first header of that name counts.
        #[test]
        fn a_method_header_makes_the_value_the_payload(
            // An empty header counts as none, and a header without a name is never read.
            method in gen::method_name().prop_map(|m| if m.is_empty() { "publish".to_owned() } else { m }),
            later in header_value(),
            payload in prop_oneof![gen::valid_command().prop_map(|(_, o)| o.text), gen::json_value(), gen::any_text(20)],
            header_name in header_name("centrifugo-method").prop_map(|n| if n.is_empty() { "x".to_owned() } else { n }),
        ) {
            let mut consumer = KafkaConsumer::new("kc", vec!["b".into()], vec!["orders".into()], "g");
            consumer.method_header = header_name.clone();
            let headers = vec![("other".to_owned(), b"x".to_vec()), (header_name.clone(), method.clone().into_bytes()), (header_name, later)];
            prop_assert_eq!(parse_record(&consumer, Some(payload.as_bytes()), &headers, &POS), prepare_text(&method, &payload, key));
        }

        /// Publication data mode: the value is the data, passed on as written (JSON's own
        /// whitespace around it trimmed); one channel publishes, several broadcast; the other
        /// headers become their fields, tags keep their bytes (lossily, as Go's JSON encoder
        /// would), and a header that is not UTF-8 makes the record malformed.
        #[test]
        fn publication_data_keeps_the_data_and_the_headers(
            data in gen::json_value(),
            spaces in (gen::ws(), gen::ws()),
            channels in vec(channel_name(), 1..5),
            channel_spacing in vec(select(&["", " ", "  ", " , "][..]), 8),
            idempotency_key in proptest::option::of(gen::any_text(20)),
            delta in proptest::option::of(select(&["1", "t", "T", "true", "TRUE", "True", "0", "f", "F", "false", "FALSE", "False"][..])),
            version in proptest::option::of(any::<u64>()),
            version_epoch in proptest::option::of(gen::any_text(10)),
            tags in vec((gen::any_text(8), gen::any_bytes()), 0..4),
            not_utf8 in proptest::option::of(0usize..5),
        ) {
            let mut consumer = KafkaConsumer::new("kc", vec!["b".into()], vec!["orders".into()], "g");
            let mode = PublicationDataMode::default();
            consumer.publication_data_mode = Some(mode.clone());
            let mut spacing = channel_spacing.iter().cycle();
            let channel_list: String = channels.iter().map(|c| format!("{}{c}{}", spacing.next().unwrap(), spacing.next().unwrap())).collect::<Vec<_>>().join(",");
            let mut headers: Headers = vec![(mode.channels_header.clone(), channel_list.into_bytes())];
            let text_header = |name: &str, value: &Option<String>| value.as_ref().map(|v| (name.to_owned(), v.clone().into_bytes()));
            headers.extend(text_header(&mode.idempotency_key_header, &idempotency_key));
            headers.extend(text_header(&mode.delta_header, &delta.map(str::to_owned)));
            headers.extend(text_header(&mode.version_header, &version.map(|v| v.to_string())));
            headers.extend(text_header(&mode.version_epoch_header, &version_epoch));
            headers.extend(tags.iter().map(|(name, value)| (format!("{}{name}", mode.tags_header_prefix), value.clone())));
            // Spoil one of the text headers (if it is there) with bytes that are not UTF-8.
            let spoiled = not_utf8.and_then(|i| headers.get_mut(i)).filter(|(name, _)| !name.starts_with(&mode.tags_header_prefix)).map(|(_, value)| value.push(0xff)).is_some();
            let value = format!("{}{data}{}", spaces.0, spaces.1);
            let result = parse_record(&consumer, Some(value.as_bytes()), &headers, &POS);
            if spoiled {
                prop_assert_eq!(result.map_err(|f| f.kind), Err(FailureKind::Malformed));
                return Ok(());
            }
            let prepared = result.map_err(|f| TestCaseError::fail(f.to_string()))?;
            let fields: BTreeMap<String, String> = raw_object(&prepared.payload).unwrap().into_iter().map(|(k, v)| (k, v.get().to_owned())).collect();
            prop_assert_eq!(&fields["data"], &data);
            if let [channel] = channels.as_slice() {
                prop_assert_eq!(prepared.method, Method::Publish);
                prop_assert_eq!(serde_json::from_str::<String>(&fields["channel"]).unwrap(), channel.clone());
            } else {
                prop_assert_eq!(prepared.method, Method::Broadcast);
                prop_assert_eq!(serde_json::from_str::<Vec<String>>(&fields["channels"]).unwrap(), channels);
            }
            let expected_key = idempotency_key.filter(|k| !k.is_empty()).unwrap_or_else(key);
            prop_assert_eq!(serde_json::from_str::<String>(&fields["idempotency_key"]).unwrap(), expected_key);
            let delta = delta.map(|d| matches!(d, "1" | "t" | "T" | "true" | "TRUE" | "True"));
            prop_assert_eq!(fields.get("delta").map(|d| d == "true"), delta);
            prop_assert_eq!(fields.get("version").map(|v| v.parse::<u64>().unwrap()), version);
            let version_epoch = version_epoch.filter(|e| !e.is_empty());
            prop_assert_eq!(fields.get("version_epoch").map(|e| serde_json::from_str::<String>(e).unwrap()), version_epoch);
            let tags: BTreeMap<String, String> = tags.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect();
            let got_tags: BTreeMap<String, String> = fields.get("tags").map_or_else(BTreeMap::new, |t| serde_json::from_str(t).unwrap());
            prop_assert_eq!(got_tags, tags);
        }
    }
}

/// Centrifugo's replies: `classify_batch` over any HTTP status and body of `/api/batch` (a
/// single command is sent as a batch of one), for any commands.
mod centrifugo_replies {
    use super::*;
    use outbox_core::command::raw_object;
    use outbox_core::dispatch::{
        classify_batch, is_retryable_code, prepare_text, BatchVerdict, FailureKind, Outcome, Prepared, Response,
    };
    use outbox_core::Method;
    use proptest::collection::vec;
    use proptest::sample::select;

    /// Commands as the workers send them: valid ones of every method, broadcasts often.
    fn commands(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Prepared>> {
        let broadcast =
            gen::valid_fields(Method::Broadcast).prop_map(|f| (Method::Broadcast, gen::JsonObject::write(f, &[" "])));
        let command = prop_oneof![gen::valid_command(), broadcast].prop_map(|(method, object)| {
            prepare_text(method.as_str(), &object.text, || "k".into()).expect("a valid command prepares")
        });
        vec(command, len)
    }

    /// An error code: the retryable ones, common final ones, zero, any.
    fn code() -> impl Strategy<Value = u32> {
        prop_oneof![select(vec![0u32, 100, 101, 102, 103, 104, 107, 108, 111, 113]), any::<u32>()]
    }

    /// One reply of a batch, as modelled: an error (code omitted means 0), a result, or a
    /// broadcast's per-channel responses (None: success, Some: that error code).
    #[derive(Debug, Clone)]
    enum Reply {
        Error { code: Option<u32>, message: String },
        Result(String),
        Broadcast(Vec<Option<u32>>),
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            (proptest::option::of(code()), gen::any_text(12))
                .prop_map(|(code, message)| Reply::Error { code, message }),
            gen::json_value().prop_map(Reply::Result),
            vec(proptest::option::of(code()), 0..6).prop_map(Reply::Broadcast),
        ]
    }

    /// The reply written for `command` as Centrifugo would, with an unknown field now and then.
    fn write_reply(command: &Prepared, reply: &Reply, extra: &Option<String>) -> String {
        let error = |code: &Option<u32>, message: &str| {
            let message = serde_json::to_string(message).unwrap();
            match code {
                Some(code) => format!(r#"{{"code":{code},"message":{message}}}"#),
                None => format!(r#"{{"message":{message}}}"#),
            }
        };
        let body = match reply {
            Reply::Error { code, message } => format!(r#""error":{}"#, error(code, message)),
            // A broadcast's result always has Centrifugo's shape (any other makes the whole
            // reply unreadable, which retries the batch: tested with any body above).
            Reply::Result(value) if command.method == Method::Broadcast => {
                format!(r#""broadcast":{{"future":{value}}}"#)
            }
            Reply::Result(value) => format!(r#""{}":{value}"#, command.method),
            Reply::Broadcast(responses) => {
                let responses: Vec<String> = responses
                    .iter()
                    .map(|r| match r {
                        Some(code) => format!(r#"{{"error":{}}}"#, error(&Some(*code), "channel failed")),
                        None => r#"{"result":{}}"#.to_owned(),
                    })
                    .collect();
                format!(r#""broadcast":{{"responses":[{}]}}"#, responses.join(","))
            }
        };
        match extra {
            Some(value) => format!(r#"{{"future":{value},{body}}}"#),
            None => format!("{{{body}}}"),
        }
    }

    /// What must become of `command` given `reply`, by Centrifugo's rules: an error code that is
    /// retryable retries, any other is a dead letter; a broadcast with a retryable channel error
    /// retries, with final channel errors is a dead letter to just the failed channels (written
    /// as they were), else it is delivered.
    fn expected(command: &Prepared, reply: &Reply) -> Outcome {
        let failure = |code: u32, message: &str| outbox_core::dispatch::Failure::centrifugo(code, message);
        match reply {
            Reply::Error { code, message } => {
                let code = code.unwrap_or(0);
                if is_retryable_code(code) {
                    Outcome::Retry(failure(code, message))
                } else {
                    Outcome::DeadLetter { failure: failure(code, message), payload: None }
                }
            }
            Reply::Broadcast(responses)
                if command.method == Method::Broadcast && responses.iter().any(Option::is_some) =>
            {
                let codes: Vec<u32> = responses.iter().flatten().copied().collect();
                if let Some(code) = codes.iter().find(|c| is_retryable_code(**c)) {
                    // Only kind and code are compared for this one (the message names the channel).
                    return Outcome::Retry(failure(*code, ""));
                }
                let mut fields: BTreeMap<String, String> =
                    raw_object(&command.payload).unwrap().into_iter().map(|(k, v)| (k, v.get().to_owned())).collect();
                let channels: Vec<&RawValue> = serde_json::from_str(&fields["channels"]).unwrap();
                let failed: Vec<&str> =
                    responses.iter().zip(&channels).filter(|(r, _)| r.is_some()).map(|(_, c)| c.get()).collect();
                fields.insert("channels".into(), format!("[{}]", failed.join(",")));
                Outcome::DeadLetter { failure: failure(codes[0], ""), payload: Some(gen::compact(&fields)) }
            }
            _ => Outcome::Delivered,
        }
    }

    /// Outcomes compared on what the workers act on: the kind, the failure's kind and code, the
    /// dead letter's payload; messages only where no channel name is added to them.
    fn same(got: &Outcome, want: &Outcome) -> bool {
        match (got, want) {
            (Outcome::Delivered, Outcome::Delivered) => true,
            (Outcome::Retry(g), Outcome::Retry(w)) => {
                g.kind == w.kind && g.code == w.code && (w.message.is_empty() || g.message == w.message)
            }
            (Outcome::DeadLetter { failure: g, payload: gp }, Outcome::DeadLetter { failure: w, payload: wp }) => {
                g.kind == w.kind && g.code == w.code && (w.message.is_empty() || g.message == w.message) && gp == wp
            }
            _ => false,
        }
    }

    /// Any HTTP status, weighted to the ones with a meaning.
    fn status() -> impl Strategy<Value = u16> {
        prop_oneof![4 => Just(200u16), 2 => select(vec![400u16, 413, 401, 403, 404, 429, 500, 502, 503]), 1 => any::<u16>()]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any status and body: exactly one outcome per command, never a panic; a batch split
        /// only when it has more than one command; statuses other than 200/400/413 retry all.
        #[test]
        fn any_reply_gives_one_outcome_per_command(
            commands in commands(1..5),
            status in status(),
            body in prop_oneof![
                2 => gen::any_bytes(),
                2 => gen::json_value().prop_map(String::into_bytes),
                2 => gen::damaged(gen::json_value()).prop_map(String::into_bytes),
                3 => (vec(reply(), 0..6), proptest::option::of(gen::json_value()))
                    .prop_map(|(replies, top_error)| {
                        let command = Prepared { method: Method::Broadcast, payload: "{}".into() };
                        let replies: Vec<String> = replies.iter().map(|r| write_reply(&command, r, &None)).collect();
                        let top = top_error.map_or_else(String::new, |e| format!(r#""error":{e},"#));
                        format!(r#"{{{top}"replies":[{}]}}"#, replies.join(",")).into_bytes()
                    }),
            ],
        ) {
            let verdict = classify_batch(&Response::Http { status, body }, &commands);
            match &verdict {
                BatchVerdict::PerCommand(outcomes) => prop_assert_eq!(outcomes.len(), commands.len()),
                BatchVerdict::SplitAndResend(_) => prop_assert!(commands.len() > 1),
                BatchVerdict::RetryAll(failure) => prop_assert!(failure.kind == FailureKind::Http || failure.code.is_some_and(is_retryable_code)),
            }
            if !matches!(status, 200 | 400 | 413) {
                prop_assert!(matches!(verdict, BatchVerdict::RetryAll(_)), "{}: {:?}", status, verdict);
            }
            let transport = classify_batch(&Response::Transport("connection refused".into()), &commands);
            prop_assert!(matches!(transport, BatchVerdict::RetryAll(_)));
        }

        /// A 200 with one reply per command: each outcome is what Centrifugo's reply means, and a
        /// broadcast dead-lettered for some channels keeps just those channels and every other
        /// field as written.
        #[test]
        fn replies_classify_as_centrifugo_means_them(
            (commands, replies) in commands(1..6).prop_flat_map(|c| { let r = vec(reply(), c.len()); (Just(c), r) }),
            extras in vec(proptest::option::of(gen::json_value()), 6),
            ws in gen::ws(),
        ) {
            let replies_text: Vec<String> = commands.iter().zip(&replies).zip(&extras).map(|((c, r), e)| write_reply(c, r, e)).collect();
            let body = format!(r#"{{{ws}"replies"{ws}:{ws}[{}]}}"#, replies_text.join(&format!(",{ws}")));
            let verdict = classify_batch(&Response::Http { status: 200, body: body.clone().into_bytes() }, &commands);
            let BatchVerdict::PerCommand(outcomes) = verdict else {
                return Err(TestCaseError::fail(format!("{verdict:?} for {body}")));
            };
            for ((command, reply), outcome) in commands.iter().zip(&replies).zip(&outcomes) {
                let want = expected(command, reply);
                prop_assert!(same(outcome, &want), "{:?} for {:?} of {}: want {:?}", outcome, reply, command.payload, want);
            }
        }

        /// A 200 whose top-level error or reply count says the batch as a whole failed: a
        /// retryable code or a miscount retries all, a final code splits or dead-letters one.
        #[test]
        fn batch_wide_replies_classify_as_a_whole(
            commands in commands(1..5),
            top_code in proptest::option::of(code()),
            replies in 0usize..7,
        ) {
            let body = match top_code {
                Some(code) => format!(r#"{{"error":{{"code":{code},"message":"m"}}}}"#),
                None => format!(r#"{{"replies":[{}]}}"#, vec!["{}"; replies].join(",")),
            };
            let verdict = classify_batch(&Response::Http { status: 200, body: body.into_bytes() }, &commands);
            match top_code {
                Some(code) if is_retryable_code(code) => prop_assert!(matches!(verdict, BatchVerdict::RetryAll(_))),
                Some(_) if commands.len() > 1 => prop_assert!(matches!(verdict, BatchVerdict::SplitAndResend(_))),
                Some(_) => {
                    let one_dead_letter = matches!(&verdict, BatchVerdict::PerCommand(o) if matches!(o[..], [Outcome::DeadLetter { .. }]));
                    prop_assert!(one_dead_letter, "{:?}", verdict);
                }
                None if replies == commands.len() => prop_assert_eq!(verdict, BatchVerdict::PerCommand(vec![Outcome::Delivered; replies])),
                None => prop_assert!(matches!(verdict, BatchVerdict::RetryAll(_))),
            }
        }
    }
}

/// The `centrifugo.consumers` JSON: `parse_consumers`, and the duration and DSN values in it.
mod consumers_json {
    use super::*;
    use outbox_core::consumers::{dsn_database, parse_consumers, ConsumerEntry, OutboxConsumer};
    use outbox_core::kafka::{duration_ms, KafkaConsumer, Pem, PublicationDataMode, SaslMechanism, Tls};
    use proptest::collection::vec;
    use proptest::sample::select;
    use serde_json::{json, Value};

    /// A duration as a consumer may write it, with its value in milliseconds.
    fn duration() -> impl Strategy<Value = (Value, u64)> {
        prop_oneof![
            (0u64..1_000_000_000).prop_map(|ms| (json!(ms), ms)),
            (0u64..1_000_000_000).prop_map(|ms| (json!(format!("{ms}ms")), ms)),
            (0u64..1_000_000).prop_map(|s| (json!(format!(" {s}s ")), s * 1000)),
            (0u64..1_000_000).prop_map(|s| (json!(format!("{s}")), s * 1000)),
            (0u64..1_000_000, 0u64..10).prop_map(|(s, tenth)| (json!(format!("{s}.{tenth}s")), s * 1000 + tenth * 100)),
            (0u64..100_000).prop_map(|m| (json!(format!("{m}m")), m * 60_000)),
            (0u64..10_000).prop_map(|h| (json!(format!("{h}h")), h * 3_600_000)),
        ]
    }

    /// A name Centrifugo accepts, made unique by its index in the array.
    fn name(i: usize) -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_]{1,10}".prop_map(move |n| format!("{n}_{i}"))
    }

    /// How an entry says it is on: not at all (on by default), or v5 `disabled` / v6 `enabled`.
    fn switch() -> impl Strategy<Value = (Option<(&'static str, bool)>, bool)> {
        prop_oneof![
            3 => Just((None, true)),
            1 => Just((Some(("enabled", true)), true)),
            1 => Just((Some(("disabled", false)), true)),
            1 => Just((Some(("enabled", false)), false)),
            1 => Just((Some(("disabled", true)), false)),
        ]
    }

    /// A valid `postgresql` consumer: its JSON config and the entry it must parse to.
    fn postgresql(name: String) -> impl Strategy<Value = (Value, ConsumerEntry)> {
        let db = "[a-zA-Z0-9_]{1,12}";
        let dsn = prop_oneof![
            Just((None, None)),
            db.prop_map(|db| (Some(format!("postgresql://u:secret@db:5432/{db}?sslmode=disable")), Some(db))),
            db.prop_map(|db| (Some(format!("postgres://h/{db}")), Some(db))),
            db.prop_map(|db| (Some(format!("host=h dbname={db} user=u")), Some(db))),
            db.prop_map(|db| (Some(format!(" dbname='{db}' ")), Some(db))),
            Just((Some("postgresql://h:5432".to_owned()), None)),
        ];
        (
            dsn,
            table_names::table_name(),
            proptest::option::of(1i64..=128),
            proptest::option::of(1i64..=10_000),
            proptest::option::of(duration()),
            proptest::option::of(gen::any_text(10)),
        )
            .prop_map(move |(dsn, (table, _), partitions, limit, poll, channel)| {
                let mut cfg = serde_json::Map::new();
                cfg.insert("outbox_table_name".into(), json!(table));
                if let Some(dsn) = &dsn.0 {
                    cfg.insert("dsn".into(), json!(dsn));
                }
                partitions.map(|n| cfg.insert("num_partitions".into(), json!(n)));
                limit.map(|n| cfg.insert("partition_select_limit".into(), json!(n)));
                poll.as_ref().map(|(v, _)| cfg.insert("partition_poll_interval".into(), v.clone()));
                channel.as_ref().map(|c| cfg.insert("partition_notification_channel".into(), json!(c)));
                let entry = ConsumerEntry::Postgresql(OutboxConsumer {
                    name: name.clone(),
                    database: dsn.1,
                    table,
                    num_partitions: partitions.unwrap_or(1) as i32,
                    select_limit: limit.unwrap_or(100) as i32,
                    poll_interval_ms: poll.map_or(300, |(_, ms)| ms.max(1)),
                    notification_channel: channel.unwrap_or_default(),
                });
                (json!({"type": "postgresql", "postgresql": Value::Object(cfg)}), entry)
            })
    }

    /// A list as a consumer may write it (array or comma/space separated string), and its items.
    fn list() -> impl Strategy<Value = (Value, Vec<String>)> {
        vec("[a-z0-9.:-]{1,12}", 1..4).prop_flat_map(|items| {
            let as_array = json!(items.clone());
            let separated = select(vec![",", " ", ", ", " ,  "]).prop_map({
                let items = items.clone();
                move |sep| json!(items.join(sep))
            });
            (prop_oneof![Just(as_array), separated], Just(items))
        })
    }

    /// A valid `kafka` consumer: its JSON config and the entry it must parse to.
    fn kafka(name: String) -> impl Strategy<Value = (Value, ConsumerEntry)> {
        let sasl = proptest::option::of((
            select(vec![
                ("plain", SaslMechanism::Plain),
                ("SCRAM-SHA-256", SaslMechanism::ScramSha256),
                ("scram-sha-512", SaslMechanism::ScramSha512),
            ]),
            "[a-z]{1,8}",
            gen::any_text(12),
        ));
        let pem_or_path = prop_oneof![
            Just(String::new()),
            "/etc/[a-z]{1,8}\\.pem",
            Just("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----".to_owned())
        ];
        let tls = prop_oneof![
            Just(None),
            (pem_or_path.clone(), any::<bool>()).prop_map(|(root_ca, skip)| Some((true, root_ca, skip))),
            (pem_or_path, any::<bool>()).prop_map(|(root_ca, skip)| Some((false, root_ca, skip))),
        ];
        let headers = proptest::option::of(proptest::option::of(("[a-z-]{1,12}", "[a-z-]{0,12}")));
        (
            (
                list(),
                list(),
                "[a-zA-Z0-9_.-]{1,12}",
                // Larger values are refused (kafka::MAX_RECORDS_SETTING; a unit test checks it).
                proptest::option::of(0u64..=1_000_000),
                proptest::option::of(any::<u64>()),
            ),
            (
                proptest::option::of(duration()),
                proptest::option::of(any::<bool>()),
                proptest::option::of(i64::MIN..=1_000_000),
                proptest::option::of(duration()),
            ),
            (proptest::option::of("[a-z0-9]{0,8}"), sasl, tls, proptest::option::of("[a-z-]{1,12}"), headers),
        )
            .prop_map(
                move |(
                    (brokers, topics, group, max_poll, fetch_bytes),
                    (fetch_wait, uncommitted, queue, dial),
                    (instance, sasl, tls, method_header, mode),
                )| {
                    let mut cfg = serde_json::Map::new();
                    let mut c = KafkaConsumer::new(&name, brokers.1, topics.1, &group);
                    cfg.insert("brokers".into(), brokers.0);
                    cfg.insert("topics".into(), topics.0);
                    cfg.insert("consumer_group".into(), json!(group));
                    if let Some(n) = max_poll {
                        cfg.insert("max_poll_records".into(), json!(n));
                        c.max_poll_records = n.max(1) as usize;
                    }
                    if let Some(n) = fetch_bytes {
                        cfg.insert("fetch_max_bytes".into(), json!(n));
                        c.fetch_max_bytes = n;
                    }
                    if let Some((v, ms)) = fetch_wait {
                        cfg.insert("fetch_max_wait".into(), v);
                        c.fetch_max_wait_ms = ms;
                    }
                    if let Some(b) = uncommitted {
                        cfg.insert("fetch_read_uncommitted".into(), json!(b));
                        c.fetch_read_uncommitted = b;
                    }
                    if let Some(n) = queue {
                        cfg.insert("partition_queue_max_size".into(), json!(n));
                        c.partition_queue_max_size = n.max(1) as usize;
                    }
                    if let Some((v, ms)) = dial {
                        cfg.insert("dial_timeout".into(), v);
                        c.dial_timeout_ms = ms;
                    }
                    if let Some(id) = instance {
                        cfg.insert("instance_id".into(), json!(id));
                        c.instance_id = id;
                    }
                    if let Some(((text, mechanism), user, password)) = sasl {
                        cfg.insert("sasl_mechanism".into(), json!(text));
                        cfg.insert("sasl_user".into(), json!(user));
                        cfg.insert("sasl_password".into(), json!(password));
                        c.sasl = Some((mechanism, user, password));
                    }
                    if let Some((v5, root_ca, skip)) = tls {
                        let pem = if root_ca.starts_with("-----BEGIN") {
                            Pem::Text(root_ca.clone())
                        } else {
                            Pem::File(root_ca.clone())
                        };
                        let root_ca_pem = (!root_ca.is_empty()).then_some(pem);
                        if v5 {
                            cfg.insert("tls".into(), json!(true));
                            cfg.insert("tls_root_ca".into(), json!(root_ca));
                            cfg.insert("tls_insecure_skip_verify".into(), json!(skip));
                        } else {
                            cfg.insert(
                                "tls".into(),
                                json!({"enabled": true, "server_ca_pem": root_ca, "insecure_skip_verify": skip}),
                            );
                        }
                        c.tls = Some(Tls { root_ca: root_ca_pem, insecure_skip_verify: skip, ..Tls::default() });
                    }
                    if let Some(h) = method_header {
                        cfg.insert("method_header".into(), json!(h));
                        c.method_header = h;
                    }
                    match mode {
                        None => {}
                        Some(None) => {
                            cfg.insert("publication_data_mode".into(), json!(true));
                            c.publication_data_mode = Some(PublicationDataMode::default());
                        }
                        Some(Some((channels, prefix))) => {
                            cfg.insert(
                                "publication_data_mode".into(),
                                json!({"enabled": true, "channels_header": channels, "tags_header_prefix": prefix}),
                            );
                            let mut m = PublicationDataMode { channels_header: channels, ..Default::default() };
                            if !prefix.is_empty() {
                                m.tags_header_prefix = prefix;
                            }
                            c.publication_data_mode = Some(m);
                        }
                    }
                    (json!({"type": "kafka", "kafka": Value::Object(cfg)}), ConsumerEntry::Kafka(c))
                },
            )
    }

    /// A valid consumers array and the entries it must parse to (disabled ones left out).
    fn consumers() -> impl Strategy<Value = (String, Vec<ConsumerEntry>)> {
        let entry = |i: usize| {
            (name(i), switch(), any::<bool>()).prop_flat_map(|(name, switch, is_kafka)| {
                let entry = if is_kafka { kafka(name.clone()).boxed() } else { postgresql(name.clone()).boxed() };
                (Just((name, switch)), entry)
            })
        };
        (0usize..4).prop_flat_map(move |n| (0..n).map(entry).collect::<Vec<_>>()).prop_map(|entries| {
            let mut array = Vec::new();
            let mut expected = Vec::new();
            for ((name, (switch, on)), (mut value, entry)) in entries {
                value["name"] = json!(name);
                if let Some((key, flag)) = switch {
                    value[key] = json!(flag);
                }
                array.push(value);
                if on {
                    expected.push(entry);
                }
            }
            (Value::Array(array).to_string(), expected)
        })
    }

    proptest! {
        #![proptest_config(config())]

        /// Any text, JSON of any shape, valid consumers arrays and damaged ones: entries or an
        /// error, never a panic.
        #[test]
        fn any_consumers_text_is_parsed_or_refused(
            text in prop_oneof![
                gen::any_text(40),
                gen::json_value(),
                consumers().prop_map(|(text, _)| text),
                gen::damaged(consumers().prop_map(|(text, _)| text)),
            ],
        ) {
            match parse_consumers(&text) {
                Ok(entries) => prop_assert!(entries.len() <= text.len()),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        /// A valid consumers array with every setting random: each enabled entry parses to
        /// exactly the consumer that was written, disabled ones are left out.
        #[test]
        fn consumers_parse_to_what_was_written((text, expected) in consumers()) {
            prop_assert_eq!(parse_consumers(&text), Ok(expected), "{}", text);
        }

        /// A valid consumers array with one setting of one entry replaced by any JSON value:
        /// entries or an error, never a panic; a valid entry's name stays as written.
        #[test]
        fn consumers_with_a_random_setting_parse_or_fail_cleanly(
            (text, _) in consumers(),
            at in any::<prop::sample::Index>(),
            key in prop_oneof![
                select(vec!["name", "type", "enabled", "disabled", "kafka", "postgresql"]).prop_map(|k| (false, k)),
                select(vec!["brokers", "topics", "consumer_group", "max_poll_records", "fetch_max_wait", "dial_timeout",
                            "partition_queue_max_size", "sasl_mechanism", "tls", "publication_data_mode", "outbox_table_name",
                            "dsn", "num_partitions", "partition_select_limit", "partition_poll_interval"]).prop_map(|k| (true, k)),
            ],
            value in gen::json_value(),
        ) {
            let mut array: Vec<Value> = serde_json::from_str(&text).unwrap();
            let Ok(value) = serde_json::from_str::<Value>(&value) else { return Ok(()) };
            if !array.is_empty() {
                let at = at.index(array.len());
                let entry = &mut array[at];
                let kind = entry["type"].as_str().unwrap().to_owned();
                match key {
                    (false, key) => entry[key] = value,
                    (true, key) => entry[kind.as_str()][key] = value,
                }
            }
            if let Ok(entries) = parse_consumers(&Value::Array(array.clone()).to_string()) {
                for entry in entries {
                    let name = match &entry { ConsumerEntry::Kafka(k) => &k.name, ConsumerEntry::Postgresql(p) => &p.name };
                    prop_assert!(array.iter().any(|e| e["name"].as_str() == Some(name)));
                }
            }
        }

        /// Durations: any JSON value is a number of milliseconds or an error, never a panic;
        /// every written form ("250ms", "1.5s", "2m", a number) reads back as its milliseconds.
        #[test]
        fn durations_read_back_as_written(value in gen::json_value(), text in gen::any_text(30), (written, ms) in duration()) {
            if let Ok(value) = serde_json::from_str::<Value>(&value) {
                let _ = duration_ms(Some(&value));
            }
            let _ = duration_ms(Some(&json!(text)));
            prop_assert_eq!(duration_ms(Some(&written)), Ok(ms), "{}", written);
        }

        /// DSNs: any text gives a database name or none, never a panic; a URL DSN (name
        /// percent-encoded) and a key/value DSN (spaces around `=`, value quoted or not, other
        /// keys around it) give the database name as written.
        #[test]
        fn dsns_name_the_database_as_written(
            text in gen::any_text(40),
            db in gen::any_text(12).prop_map(|d| if d.is_empty() { "app".to_owned() } else { d.replace('\0', "_") }),
            url in (select(vec!["postgresql://", "postgres://"]), select(vec!["", "u@", "u:p%2Fw@"]), select(vec!["h", "h:5432", "[::1]:5432", "a,b:5433"]),
                    select(vec!["", "?sslmode=disable", "?a=b&c=d#x", "#f"])),
            encode_all in any::<bool>(),
            others in vec(select(vec!["host=h", "port = 5432", "user='u'", "password='p \\' w'", "sslmode=disable"]), 0..4),
            (at, around_eq, quote) in (any::<prop::sample::Index>(), select(vec![("", ""), (" ", " "), ("\t", "")]), any::<bool>()),
        ) {
            let _ = dsn_database(&text);
            let encoded: String = db.bytes().map(|b| {
                let keep = b.is_ascii_alphanumeric() || (!encode_all && b"-._~".contains(&b));
                if keep { char::from(b).to_string() } else { format!("%{b:02X}") }
            }).collect();
            let (scheme, user, host, tail) = url;
            let dsn = format!("{scheme}{user}{host}/{encoded}{tail}");
            prop_assert_eq!(dsn_database(&dsn), Some(db.clone()), "{}", dsn);
            // Key/value: quoted with \ and ' escaped, or bare when nothing in it needs quoting.
            let bare = !quote && !db.chars().any(|c| c.is_ascii_whitespace() || c == '\'' || c == '\\');
            let value = if bare { db.clone() } else { format!("'{}'", db.replace('\\', "\\\\").replace('\'', "\\'")) };
            let mut pairs: Vec<String> = others.iter().map(|p| p.to_string()).collect();
            pairs.insert(at.index(pairs.len() + 1), format!("dbname{}={}{value}", around_eq.0, around_eq.1));
            let dsn = pairs.join(" ");
            prop_assert_eq!(dsn_database(&dsn), Some(db), "{}", dsn);
        }
    }
}

/// Table-name and URL settings: `table_name_parts`, `quoted_table_name`, `qualified_table_name`,
/// `validate_api_url`, consumer names, the command size limit.
mod table_names {
    use super::*;
    use outbox_core::settings::{
        check_command_size, qualified_table_name, quoted_table_name, table_name_parts, valid_consumer_name,
        validate_api_url,
    };
    use proptest::collection::vec;
    use proptest::sample::select;

    /// An identifier PostgreSQL takes unquoted (letters, here Latin and Greek, digits, `_`, `$`),
    /// in random case. (PostgreSQL takes any non-ASCII char; outbox_core only letters and digits.)
    fn unquoted() -> impl Strategy<Value = String> {
        "[a-zA-Z_À-ÖØ-öø-ÿĀ-ſΑ-ΡΣ-ω][a-zA-Z0-9_$À-ÖØ-öø-ÿĀ-ſΑ-ΡΣ-ω]{0,20}"
    }

    /// A part of a table name as PostgreSQL resolves it: unquoted identifiers are folded to lower
    /// case, ASCII letters only (as in any multibyte server encoding, UTF-8 included).
    fn pg_fold(ident: &str) -> String {
        ident.to_ascii_lowercase()
    }

    /// A table name as written (1 or 2 parts, each quoted or not, spacing around) and the parts
    /// PostgreSQL resolves it to.
    pub fn table_name() -> impl Strategy<Value = (String, Vec<String>)> {
        let part = prop_oneof![
            unquoted().prop_map(|p| (p.clone(), pg_fold(&p))),
            // Quoted: any chars but NUL (no PostgreSQL identifier holds one), `"` doubled.
            vec(any::<char>().prop_map(|c| if c == '\0' { '.' } else { c }), 1..16)
                .prop_map(String::from_iter)
                .prop_map(|p| (format!("\"{}\"", p.replace('"', "\"\"")), p)),
        ];
        (vec(part, 1..3), select(vec!["", " ", "\t\n"])).prop_map(|(parts, space)| {
            let written: Vec<&str> = parts.iter().map(|(w, _)| w.as_str()).collect();
            (format!("{space}{}{space}", written.join(".")), parts.into_iter().map(|(_, p)| p).collect())
        })
    }

    /// Text made mostly of the characters that matter in a table name.
    fn name_like() -> impl Strategy<Value = String> {
        vec(select(vec!['"', '"', '.', 'a', 'Z', 'é', 'É', ' ', '_', '$', '1', ';', '\0', '\u{130}']), 0..16)
            .prop_map(String::from_iter)
    }

    proptest! {
        #![proptest_config(config())]

        /// Any text: parts or an error, never a panic. Parts are one or two, none empty, none
        /// holding NUL; quoting them gives a name that parses back to the same parts; the three
        /// functions agree on what is a name.
        #[test]
        fn any_table_name_is_parsed_or_refused(name in prop_oneof![gen::any_text(24), name_like()]) {
            let parts = table_name_parts(&name);
            prop_assert_eq!(quoted_table_name(&name).is_ok(), parts.is_ok());
            prop_assert_eq!(qualified_table_name(&name, "s").is_ok(), parts.is_ok());
            if let Ok(parts) = parts {
                prop_assert!(matches!(parts.len(), 1 | 2));
                prop_assert!(parts.iter().all(|p| !p.is_empty() && !p.contains('\0')), "{:?}", parts);
                let quoted = quoted_table_name(&name).unwrap();
                prop_assert_eq!(table_name_parts(&quoted), Ok(parts.clone()));
                let qualified = qualified_table_name(&name, "s").unwrap();
                let qualified_parts = table_name_parts(&qualified).unwrap();
                prop_assert_eq!(&qualified_parts[qualified_parts.len() - parts.len()..], &parts[..]);
            }
        }

        /// A table name as written resolves to the parts PostgreSQL would resolve it to, and its
        /// quoted forms say the same.
        #[test]
        fn table_names_resolve_as_postgresql_does((written, parts) in table_name(), schema in gen::any_text(8)) {
            prop_assert_eq!(table_name_parts(&written), Ok(parts.clone()), "{}", written);
            let quote = |p: &String| format!("\"{}\"", p.replace('"', "\"\""));
            let quoted: Vec<String> = parts.iter().map(quote).collect();
            prop_assert_eq!(quoted_table_name(&written), Ok(quoted.join(".")));
            let qualified = if parts.len() == 1 { format!("{}.{}", quote(&schema), quoted[0]) } else { quoted.join(".") };
            prop_assert_eq!(qualified_table_name(&written, &schema), Ok(qualified));
        }

        /// API URLs: any text is accepted or refused, never a panic; what is accepted is an
        /// http(s) URL with a host, as the HTTP client reads it.
        #[test]
        fn api_urls_are_http_with_a_host(
            url in prop_oneof![
                gen::any_text(30),
                (select(vec!["http://", "https://", "HTTP://", "ftp://", "http:/", ""]), gen::any_text(20)).prop_map(|(s, r)| format!("{s}{r}")),
                (select(vec!["http://", "https://"]), "[a-z0-9.-]{1,20}(:[0-9]{1,5})?(/[a-z]{0,8}){0,3}").prop_map(|(s, r)| format!("{s}{r}")),
            ],
        ) {
            let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            let accepted = validate_api_url(&url);
            if accepted.is_ok() {
                prop_assert!(rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')));
                let parsed = reqwest::Url::parse(&outbox_core::settings::batch_url(&url));
                prop_assert!(parsed.as_ref().is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty())), "{:?} accepted but {:?}", url, parsed);
            }
        }

        /// Endpoint lists: any text is accepted or refused, never a panic; what is accepted is
        /// 1..=8 distinct URLs each accepted alone, in the order written.
        #[test]
        fn api_url_lists_are_lists_of_accepted_urls(
            entries in proptest::collection::vec(prop_oneof![
                gen::any_text(12),
                (select(vec!["http://", "https://"]), "[a-c]{1,2}(:[0-9]{1,4})?(/api)?/?").prop_map(|(s, r)| format!("{s}{r}")),
            ], 0..11),
            separator in select(vec![",", ", ", " ,", ",,"]),
        ) {
            let setting = entries.join(separator);
            if let Ok(urls) = outbox_core::endpoints::parse_api_urls(&setting) {
                prop_assert!((1..=outbox_core::endpoints::MAX_ENDPOINTS).contains(&urls.len()));
                for (i, url) in urls.iter().enumerate() {
                    prop_assert!(validate_api_url(url).is_ok(), "{:?}", url);
                    prop_assert!(urls[..i].iter().all(|u| u.trim_end_matches('/').to_lowercase() != url.trim_end_matches('/').to_lowercase()));
                }
            }
        }

        /// Consumer names are Centrifugo's ^[a-zA-Z0-9_]{2,}$; the size limit refuses exactly
        /// what is over a positive limit.
        #[test]
        fn consumer_names_and_size_limits(name in prop_oneof![gen::any_text(6), "[a-zA-Z0-9_-]{0,4}"], len in any::<usize>(), limit in any::<i32>()) {
            let expected = name.chars().count() >= 2 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            prop_assert_eq!(valid_consumer_name(&name), expected);
            prop_assert_eq!(check_command_size(len, limit).is_err(), limit > 0 && len > limit as usize);
        }
    }
}
