//! Validation of settings that PostgreSQL's GUC machinery cannot check by itself: identifiers,
//! URLs and size limits. Used both at call time (SQL API) and when a worker starts.

use crate::error::{CommandError, ErrorClass};

/// Default of `centrifugo.max_command_size`: Centrifugo's default HTTP API body limit is larger,
/// but a real-time message of more than 1 MiB is almost always a mistake.
pub const DEFAULT_MAX_COMMAND_SIZE: i32 = 1024 * 1024;

/// Turns `table` or `schema.table` (each part optionally double-quoted) into a safely quoted SQL
/// name, so the outbox table name setting can never inject SQL.
pub fn quoted_table_name(name: &str) -> Result<String, String> {
    Ok(table_name_parts(name)?.iter().map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join("."))
}

/// The outbox table as a schema-qualified, quoted SQL name. An unqualified name means the table
/// in `default_schema` (the extension's schema), never whatever a `search_path` finds first: a
/// database owner could otherwise shadow the outbox with a table of their own.
pub fn qualified_table_name(name: &str, default_schema: &str) -> Result<String, String> {
    let quote = |p: &str| format!("\"{}\"", p.replace('"', "\"\""));
    let parts = table_name_parts(name)?;
    Ok(match parts.as_slice() {
        [table] => format!("{}.{}", quote(default_schema), quote(table)),
        parts => parts.iter().map(|p| quote(p)).collect::<Vec<_>>().join("."),
    })
}

/// The longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The parts of `table` or `schema.table` as PostgreSQL resolves them (unquoted parts folded
/// to lower case).
pub fn table_name_parts(name: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut rest = name.trim();
    while !rest.is_empty() {
        let (part, tail) = if let Some(stripped) = rest.strip_prefix('"') {
            // A quoted identifier: "" stands for one quote.
            let mut ident = String::new();
            let mut chars = stripped.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if matches!(chars.peek(), Some((_, '"'))) {
                        ident.push('"');
                        chars.next();
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    ident.push(c);
                }
            }
            let end = end.ok_or_else(|| format!("unterminated quoted identifier in \"{name}\""))?;
            (ident, &stripped[end..])
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            let ident = &rest[..end];
            let valid = ident.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
                && ident.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$');
            if !valid {
                return Err(format!("\"{name}\" is not a valid table name"));
            }
            // PostgreSQL folds only A-Z in a multibyte encoding such as UTF-8 (downcase_identifier).
            (ident.to_ascii_lowercase(), &rest[end..])
        };
        if part.is_empty() {
            return Err(format!("\"{name}\" has an empty name part"));
        }
        // PostgreSQL identifiers are C strings: a quoted NUL would name no table and break the query text.
        if part.contains('\0') {
            return Err(format!("\"{name}\" contains a NUL character"));
        }
        // PostgreSQL would cut a longer one short where it parses it, but the workers look the
        // table up by its whole name: one name must mean one table everywhere.
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!(
                "\"{name}\" has a name part longer than {MAX_IDENTIFIER_BYTES} bytes (PostgreSQL's identifier limit)"
            ));
        }
        parts.push(part);
        rest = match tail.strip_prefix('.') {
            Some(t) if !t.is_empty() => t,
            Some(_) => return Err(format!("\"{name}\" ends with a dot")),
            None if tail.is_empty() => "",
            None => return Err(format!("\"{name}\" is not a valid table name")),
        };
    }
    match parts.len() {
        1 | 2 => Ok(parts),
        0 => Err("the outbox table name is empty".into()),
        _ => Err(format!("\"{name}\" has too many dots: use table or schema.table")),
    }
}

/// Rejects a serialized command larger than the limit (0 disables the check).
pub fn check_command_size(len: usize, limit: i32) -> Result<(), CommandError> {
    if limit > 0 && len > limit as usize {
        return Err(CommandError::new(
            ErrorClass::TooLarge,
            format!("command payload is {len} bytes, over the limit of {limit} bytes"),
        )
        .with_hint("Raise centrifugo.max_command_size, or send a reference instead of the data."));
    }
    Ok(())
}

/// The length of JSON `text` without the whitespace between tokens: what the SQL API measures
/// against `max_command_size` (its compact text), so that the workers measure a row a plain
/// INSERT wrote (jsonb prints `{"a": 1}` with a space) the same way.
pub fn compact_json_len(text: &str) -> usize {
    let (mut len, mut in_string, mut escaped) = (0, false, false);
    for b in text.bytes() {
        if in_string {
            len += 1;
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            len += 1;
            in_string = b == b'"';
        }
    }
    len
}

/// The length of the JSON string literal PostgreSQL writes for `bytes`, quotes included: a quote,
/// a backslash and the C escapes (`\b \f \n \r \t`) take two bytes, other control characters
/// six (`\u001f`), the rest one. What a jsonb's strings add to its compact text.
pub fn json_string_literal_len(bytes: &[u8]) -> usize {
    2 + bytes
        .iter()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Checks the Centrifugo API base URL: http(s), with a host.
pub fn validate_api_url(url: &str) -> Result<(), String> {
    api_url_problem(url).map_or(Ok(()), |problem| Err(format!("centrifugo.api_url \"{url}\" {problem}")))
}

/// What is wrong with the API base URL `url`, in words that do not repeat it (a list's entry
/// may be a fragment of a credential).
pub fn api_url_problem(url: &str) -> Option<String> {
    if let Some(rest) = url.strip_prefix("grpc://").or_else(|| url.strip_prefix("grpcs://")) {
        return grpc_url_problem(rest);
    }
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return Some("must start with http://, https://, grpc:// or grpcs://".into());
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Some("has no host".into());
    }
    // The URL the client posts to must parse: a host it cannot read ("http://a b/api", an empty
    // host before a port, a bad IDNA name) must fail the setting, not every request.
    reqwest::Url::parse(&batch_url(url)).err().map(|e| format!("is not a valid URL: {e}"))
}

/// What is wrong with a gRPC address (`rest` follows `grpc://`): a host and port, nothing else.
fn grpc_url_problem(rest: &str) -> Option<String> {
    if !cfg!(feature = "grpc") {
        return Some("asks for gRPC, which this build does not have (the grpc feature is off)".into());
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.starts_with(':') {
        return Some("has no host".into());
    }
    if authority.contains('@') {
        return Some("has credentials, which gRPC does not send: give the key in centrifugo.api_key".into());
    }
    if authority.contains(['/', '?', '#']) {
        return Some(
            "has a path: a gRPC address is only host:port (Centrifugo's grpc_api port, 10000 by default)".into(),
        );
    }
    match reqwest::Url::parse(&format!("http://{authority}/")) {
        Err(e) => return Some(format!("is not a valid address: {e}")),
        Ok(parsed) if parsed.host_str().is_none_or(str::is_empty) => return Some("has no host".into()),
        Ok(parsed) if parsed.port().is_none() => {
            return Some("has no port: give Centrifugo's grpc_api port (10000 by default)".into())
        }
        Ok(_) => {}
    }
    // What the gRPC client will parse: a host it cannot read fails the setting, not the worker.
    #[cfg(feature = "grpc")]
    if let Err(e) = tonic::transport::Endpoint::from_shared(format!("http://{authority}")) {
        return Some(format!("is not a valid address: {e}"));
    }
    None
}

/// The `/api/batch` endpoint under the API base URL `api_url`.
pub fn batch_url(api_url: &str) -> String {
    format!("{}/batch", api_url.trim_end_matches('/'))
}

/// Centrifugo's rule for consumer names: `^[a-zA-Z0-9_]{2,}$`.
pub fn valid_consumer_name(name: &str) -> bool {
    name.len() >= 2 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A NOTIFY channel is an identifier: PostgreSQL refuses one of NAMEDATALEN (64) bytes or more
/// at NOTIFY time, which would make every outbox INSERT fail; refused at SET instead.
pub fn notification_channel(channel: &str) -> Result<(), String> {
    if channel.len() >= 64 {
        return Err(format!("a NOTIFY channel name has at most 63 bytes, this one has {}", channel.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_and_checked() {
        assert_eq!(quoted_table_name("centrifugo_outbox").unwrap(), "\"centrifugo_outbox\"");
        assert_eq!(quoted_table_name("App.Chat_Outbox").unwrap(), "\"app\".\"chat_outbox\"");
        assert_eq!(quoted_table_name("\"My \"\"Box\"\"\"").unwrap(), "\"My \"\"Box\"\"\"");
        assert_eq!(quoted_table_name("s.\"T.x\"").unwrap(), "\"s\".\"T.x\"");
        for bad in ["", "a;drop table x", "a.b.c", "1abc", "a.", "\"open", "a b"] {
            assert!(quoted_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unqualified_outbox_is_the_one_in_the_extension_schema() {
        assert_eq!(qualified_table_name("centrifugo_outbox", "public").unwrap(), "\"public\".\"centrifugo_outbox\"");
        assert_eq!(qualified_table_name("App.Box", "ext").unwrap(), "\"app\".\"box\"");
        assert_eq!(qualified_table_name("t", "we\"ird").unwrap(), "\"we\"\"ird\".\"t\"");
        assert!(qualified_table_name("a;b", "public").is_err());
    }

    #[test]
    fn table_names_longer_than_postgresql_keeps_are_refused() {
        let longest = "t".repeat(63);
        assert_eq!(table_name_parts(&format!("s.{longest}")).unwrap(), vec!["s".to_owned(), longest.clone()]);
        for bad in [format!("{longest}x"), format!("\"{longest}x\""), format!("{longest}x.t"), "é".repeat(32)] {
            assert!(table_name_parts(&bad).unwrap_err().contains("longer than 63 bytes"), "{bad}");
        }
    }

    /// Found by tests/fuzz.rs: unquoted parts were folded by Unicode rules (PostgreSQL folds only
    /// A-Z in UTF-8), and a quoted NUL was taken (no PostgreSQL identifier holds one).
    #[test]
    fn table_names_fold_ascii_only_and_refuse_nul() {
        assert_eq!(table_name_parts("aÀ").unwrap(), vec!["aÀ"]);
        assert_eq!(quoted_table_name("Schéma.ÄPFEL").unwrap(), "\"schéma\".\"Äpfel\"");
        assert_eq!(table_name_parts("\u{130}X").unwrap(), vec!["\u{130}x"]);
        for bad in ["\"\0\"", "s.\"a\0b\""] {
            assert!(table_name_parts(bad).unwrap_err().contains("NUL"), "{bad:?}");
        }
    }

    #[test]
    fn size_limit() {
        assert!(check_command_size(10, 10).is_ok());
        assert_eq!(check_command_size(11, 10).unwrap_err().class, ErrorClass::TooLarge);
        assert!(check_command_size(usize::MAX, 0).is_ok());
    }

    #[test]
    fn urls_and_names() {
        assert!(validate_api_url("http://127.0.0.1:8000/api").is_ok());
        assert!(validate_api_url("https://c.example/api").is_ok());
        assert!(validate_api_url("ftp://x").is_err());
        assert!(validate_api_url("http:///api").is_err());
        assert!(validate_api_url("http://[::1]:8000/api/").is_ok());
        // Found by tests/fuzz.rs: hosts the HTTP client cannot read passed (every request then
        // failed instead of the setting).
        for bad in ["http://\u{3347a}", "http://&\0", "http://a b/api", "http://:80/api", "https://h:99999/api"] {
            assert!(validate_api_url(bad).unwrap_err().contains("not a valid URL"), "{bad:?}");
        }
        assert!(valid_consumer_name("my_consumer1"));
        assert!(!valid_consumer_name("a"));
        assert!(!valid_consumer_name("bad-name"));
    }

    #[test]
    fn compact_json_length_skips_whitespace_between_tokens_only() {
        assert_eq!(compact_json_len(r#"{"a": 1, "b": [1, 2]}"#), r#"{"a":1,"b":[1,2]}"#.len());
        assert_eq!(compact_json_len(r#"{"s": "a b \" c"}"#), r#"{"s":"a b \" c"}"#.len());
        assert_eq!(compact_json_len("\n\t{ }"), 2);
    }

    #[test]
    fn json_string_literal_length_is_what_the_escaped_text_takes() {
        // serde_json escapes exactly what PostgreSQL's escape_json does.
        for s in ["", "plain", "a \"quoted\" \\ path", "\u{8}\u{c}\n\r\t", "\u{0}\u{1}\u{1f}", "é ✓ \u{7f}", "/"] {
            assert_eq!(json_string_literal_len(s.as_bytes()), serde_json::to_string(s).unwrap().len(), "{s:?}");
        }
    }

    #[test]
    fn notification_channels_are_identifiers() {
        assert!(notification_channel("").is_ok());
        assert!(notification_channel(&"c".repeat(63)).is_ok());
        assert!(notification_channel(&"c".repeat(64)).unwrap_err().contains("at most 63 bytes"));
    }
}

#[cfg(all(test, feature = "grpc"))]
mod grpc_tests {
    use super::api_url_problem;

    #[test]
    fn a_grpc_address_is_a_host_and_port_only() {
        for ok in ["grpc://127.0.0.1:10000", "grpcs://centrifugo.internal:10000/", "grpc://[::1]:10000"] {
            assert_eq!(api_url_problem(ok), None, "{ok}");
        }
        for (bad, problem) in [
            ("grpc://", "has no host"),
            ("grpc://:10000", "has no host"),
            ("grpc://h:10000/api", "has a path"),
            ("grpc://h:1?x=1", "has a path"),
            ("grpc://u:secret@h:1", "has credentials"),
            ("grpc://h:99999", "not a valid address"),
            ("grpc://a b:1", "not a valid address"),
            ("grpc://host", "has no port"),
            ("grpcs://bücher.de:10000", "not a valid address"),
        ] {
            let got = api_url_problem(bad).unwrap_or_default();
            assert!(got.contains(problem) && !got.contains("secret"), "{bad}: {got}");
        }
    }
}
