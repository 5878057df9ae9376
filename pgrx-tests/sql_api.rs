// In-database tests of the SQL API (`cargo pgrx test`): every SQL function, its success path and each
// validation error with its SQLSTATE, against a real PostgreSQL with the library preloaded
// (`centrifugo.num_partitions = 4`, see `pg_test` in lib.rs). Each test runs in a transaction
// that is rolled back, so tests see only their own rows.

use pgrx::prelude::*;
use serde_json::{json, Value};

/// Creates `pg_temp.expect_error(sql, sqlstate)`, which runs `sql` in a subtransaction, fails
/// unless it raised exactly `sqlstate`, and returns the error message.
fn install_expect_error() {
    Spi::run(
        r#"
        CREATE OR REPLACE FUNCTION pg_temp.expect_error(stmt text, expected text) RETURNS text
        LANGUAGE plpgsql AS $f$
        DECLARE st text; msg text;
        BEGIN
            BEGIN
                EXECUTE stmt;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                IF st <> expected THEN
                    RAISE EXCEPTION 'expected SQLSTATE % but got %: % (statement: %)', expected, st, msg, stmt;
                END IF;
                RETURN msg;
            END;
            RAISE EXCEPTION 'expected SQLSTATE % but the statement succeeded: %', expected, stmt;
        END
        $f$"#,
    )
    .expect("create expect_error");
}

/// Runs `sql`, asserts it fails with `sqlstate` and that nothing was enqueued; returns the message.
fn expect_error(sql: &str, sqlstate: &str) -> String {
    install_expect_error();
    let before = outbox_count();
    let msg = Spi::get_one_with_args::<String>(
        "SELECT pg_temp.expect_error($1, $2)",
        &[sql.into(), sqlstate.into()],
    )
    .expect("expect_error")
    .expect("a message");
    assert_eq!(outbox_count(), before, "a failed call must not enqueue anything: {sql}");
    msg
}

fn outbox_count() -> i64 {
    Spi::get_one::<i64>("SELECT count(*) FROM centrifugo_outbox").unwrap().unwrap()
}

/// Runs an enqueueing `sql` and returns the row it inserted as (method, payload, partition).
fn enqueued(sql: &str) -> (String, Value, i32) {
    let id = Spi::get_one::<i64>(sql).expect(sql).expect("an outbox id");
    let (method, payload, partition) = Spi::get_three_with_args::<String, pgrx::JsonB, i32>(
        "SELECT method, payload, partition FROM centrifugo_outbox WHERE id = $1",
        &[id.into()],
    )
    .unwrap();
    (method.unwrap(), payload.unwrap().0, partition.unwrap())
}

#[pg_test]
fn publish_enqueues_the_exact_payload() {
    let (m, p, part) = enqueued(r#"SELECT centrifugo_publish('chat:1', '{"text": "hi"}')"#);
    assert_eq!((m.as_str(), part), ("publish", 0));
    assert_eq!(p, json!({"channel": "chat:1", "data": {"text": "hi"}}));

    let (_, p, part) = enqueued(
        r#"SELECT centrifugo_publish('chat:1', '[1, 2]', idempotency_key => 'k1', tags => '{"a": "b"}',
               skip_history => true, delta => false, version => 7, version_epoch => 'e1', partition => 3)"#,
    );
    assert_eq!(part, 3);
    assert_eq!(
        p,
        json!({"channel": "chat:1", "data": [1, 2], "idempotency_key": "k1", "tags": {"a": "b"},
               "skip_history": true, "delta": false, "version": 7, "version_epoch": "e1"})
    );
}

#[pg_test]
fn publish_errors() {
    assert!(expect_error("SELECT centrifugo_publish(NULL, '{}')", "22004").contains("requires \"channel\""));
    expect_error("SELECT centrifugo_publish('', '{}')", "22004");
    assert!(expect_error("SELECT centrifugo_publish('c', NULL)", "22004").contains("\"data\""));
    // Data that is not JSON is refused by the jsonb input function itself.
    expect_error("SELECT centrifugo_publish('c', 'not json')", "22P02");
    assert!(expect_error(r#"SELECT centrifugo_publish('c', '1', tags => '{"a": 1}')"#, "22023").contains("tags"));
    expect_error("SELECT centrifugo_publish('c', '1', version => -1)", "22003");
    assert!(expect_error("SELECT centrifugo_publish('c', '1', partition => 4)", "22003").contains("num_partitions is 4"));
    expect_error("SELECT centrifugo_publish('c', '1', partition => -1)", "22003");
    expect_error("SELECT centrifugo_publish('c', '1', partition => 1, partition_key => 'k')", "22023");
}

#[pg_test]
fn payload_size_limit_is_enforced() {
    Spi::run("SET LOCAL centrifugo.max_command_size = 64").unwrap();
    let msg = expect_error(&format!("SELECT centrifugo_publish('c', '\"{}\"')", "x".repeat(100)), "54000");
    assert!(msg.contains("over the limit of 64 bytes"), "{msg}");
    enqueued("SELECT centrifugo_publish('c', '\"small\"')");
}

#[pg_test]
fn binary_variants_send_b64data() {
    let (_, p, _) = enqueued(r#"SELECT centrifugo_publish_binary('bin', '\x00ff10'::bytea)"#);
    assert_eq!(p, json!({"channel": "bin", "b64data": "AP8Q"}));
    let (m, p, _) = enqueued(r#"SELECT centrifugo_broadcast_binary(ARRAY['a', 'b'], 'hi'::bytea)"#);
    assert_eq!(m, "broadcast");
    assert_eq!(p, json!({"channels": ["a", "b"], "b64data": "aGk="}));
    expect_error("SELECT centrifugo_publish_binary('bin', NULL)", "22004");
}

#[pg_test]
fn broadcast_and_its_errors() {
    let (m, p, _) = enqueued(r#"SELECT centrifugo_broadcast(ARRAY['a', 'b'], '{"n": 1}', idempotency_key => 'k')"#);
    assert_eq!(m, "broadcast");
    assert_eq!(p, json!({"channels": ["a", "b"], "data": {"n": 1}, "idempotency_key": "k"}));
    assert!(expect_error("SELECT centrifugo_broadcast(ARRAY[]::text[], '1')", "22023").contains("must not be empty"));
    expect_error("SELECT centrifugo_broadcast(NULL, '1')", "22004");
    expect_error("SELECT centrifugo_broadcast(ARRAY['a', NULL], '1')", "22023");
    expect_error("SELECT centrifugo_broadcast(ARRAY['a', ''], '1')", "22023");
}

#[pg_test]
fn subscribe_unsubscribe_disconnect_refresh_history_remove() {
    let (m, p, _) = enqueued(
        r#"SELECT centrifugo_subscribe('42', 'news', info => '{"n": 1}', client => 'c1', session => 's1',
               data => '{"hello": true}', recover_since => '{"offset": 5, "epoch": "e"}', expire_at => 100,
               override_presence => true, override_join_leave => false)"#,
    );
    assert_eq!(m, "subscribe");
    assert_eq!(
        p,
        json!({"user": "42", "channel": "news", "info": {"n": 1}, "client": "c1", "session": "s1",
               "data": {"hello": true}, "recover_since": {"offset": 5, "epoch": "e"}, "expire_at": 100,
               "override": {"presence": {"value": true}, "join_leave": {"value": false}}})
    );
    let (m, p, _) = enqueued(r#"SELECT centrifugo_unsubscribe("user" => '42', channel => 'news', client => 'c1')"#);
    assert_eq!((m.as_str(), p), ("unsubscribe", json!({"user": "42", "channel": "news", "client": "c1"})));
    let (m, p, _) = enqueued(
        r#"SELECT centrifugo_disconnect('42', whitelist => ARRAY['c9'], code => 4500, reason => 'bye')"#,
    );
    assert_eq!(
        (m.as_str(), p),
        ("disconnect", json!({"user": "42", "whitelist": ["c9"], "disconnect": {"code": 4500, "reason": "bye"}}))
    );
    let (m, p, _) = enqueued("SELECT centrifugo_refresh('42', expired => true)");
    assert_eq!((m.as_str(), p), ("refresh", json!({"user": "42", "expired": true})));
    let (m, p, _) = enqueued("SELECT centrifugo_history_remove('news')");
    assert_eq!((m.as_str(), p), ("history_remove", json!({"channel": "news"})));

    expect_error("SELECT centrifugo_subscribe(NULL, 'news')", "22004");
    expect_error("SELECT centrifugo_subscribe('42', NULL)", "22004");
    expect_error(r#"SELECT centrifugo_subscribe('42', 'news', recover_since => '{"offset": "x"}')"#, "22023");
    expect_error("SELECT centrifugo_unsubscribe('42', NULL)", "22004");
    expect_error("SELECT centrifugo_disconnect(NULL)", "22004");
    expect_error("SELECT centrifugo_disconnect('42', code => -1)", "22003");
    expect_error("SELECT centrifugo_refresh(NULL)", "22004");
    expect_error("SELECT centrifugo_history_remove(NULL)", "22004");
    // Anonymous connections have an empty user id.
    enqueued("SELECT centrifugo_disconnect('')");
}

#[pg_test]
fn generic_command_accepts_what_centrifugo_accepts() {
    let (m, p, _) = enqueued(r#"SELECT centrifugo_command('publish', '{"channel": "c", "data": 1}')"#);
    assert_eq!((m.as_str(), p), ("publish", json!({"channel": "c", "data": 1})));
    // A JSON string holding the object, as Debezium sends JSONB.
    let (_, p, _) = enqueued(r#"SELECT centrifugo_command('broadcast', '"{\"channels\": [\"a\"], \"data\": 2}"')"#);
    assert_eq!(p, json!({"channels": ["a"], "data": 2}));

    let msg = expect_error(r#"SELECT centrifugo_command('batch', '{"commands": []}')"#, "0A000");
    assert!(msg.contains("\"batch\" cannot be enqueued"), "{msg}");
    assert!(expect_error(r#"SELECT centrifugo_command('presence', '{"channel": "c"}')"#, "0A000").contains("read-only"));
    assert!(expect_error(r#"SELECT centrifugo_command('pubish', '{}')"#, "22023").contains("unknown method"));
    expect_error("SELECT centrifugo_command(NULL, '{}')", "22004");
    expect_error("SELECT centrifugo_command('publish', NULL)", "22004");
    expect_error(r#"SELECT centrifugo_command('publish', '[1]')"#, "22023");
    expect_error(r#"SELECT centrifugo_command('publish', '"not json"')"#, "22P02");
    expect_error(r#"SELECT centrifugo_command('publish', '{"data": 1}')"#, "22004");
}

#[pg_test]
fn partition_key_uses_the_documented_hash() {
    // fnv1a_64("chat:42") mod 4, computed independently in SQL from the documented definition.
    let expected = Spi::get_one::<i32>(
        r#"WITH RECURSIVE k(bytes) AS (SELECT convert_to('chat:42', 'UTF8')),
           h(i, v) AS (
               SELECT 0, 14695981039346656037::numeric
               UNION ALL
               SELECT h.i + 1,
                      mod((h.v - mod(h.v, 256) + (mod(h.v, 256)::int # get_byte(k.bytes, h.i))) * 1099511628211,
                          18446744073709551616)
               FROM h, k WHERE h.i < octet_length(k.bytes)
           )
           SELECT mod(v, 4)::int FROM h ORDER BY i DESC LIMIT 1"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(expected, outbox_core::partition::partition_for_key("chat:42", 4));
    let via_sql_api = Spi::get_one::<i32>("SELECT centrifugo_partition_for('chat:42')").unwrap().unwrap();
    assert_eq!(via_sql_api, expected);
    let (_, _, part) = enqueued("SELECT centrifugo_publish('c', '1', partition_key => 'chat:42')");
    assert_eq!(part, expected);
    let spread = Spi::get_one::<i64>(
        "SELECT count(DISTINCT centrifugo_partition_for('user:' || g)) FROM generate_series(1, 200) g",
    )
    .unwrap()
    .unwrap();
    assert_eq!(spread, 4, "200 keys should land in all 4 partitions");
}

#[pg_test]
fn seed_insert_and_documented_trigger_work_on_our_table() {
    // The plain SQL from Centrifugo's docs.
    Spi::run(
        r#"INSERT INTO centrifugo_outbox (method, payload, partition)
           VALUES ('publish', '{"channel": "updates", "data": {"text": "Hello, world!"}}', 0)"#,
    )
    .unwrap();
    let created = Spi::get_one::<bool>(
        "SELECT created_at IS NOT NULL AND id IS NOT NULL FROM centrifugo_outbox WHERE payload->>'channel' = 'updates'",
    )
    .unwrap();
    assert_eq!(created, Some(true));
    // Centrifugo's documented trigger, attached to a table of the user's own.
    Spi::run(
        r#"CREATE TABLE chat_outbox (LIKE centrifugo_outbox INCLUDING DEFAULTS);
           CREATE TRIGGER centrifugo_notify_partition_trigger AFTER INSERT ON chat_outbox
               FOR EACH ROW EXECUTE FUNCTION centrifugo_notify_partition_change('centrifugo_partition_change');
           INSERT INTO chat_outbox (id, method, payload) VALUES (1, 'publish', '{"channel": "c", "data": 1}')"#,
    )
    .unwrap();
    // The outbox itself has one row trigger: the wake trigger sends Centrifugo's NOTIFY too.
    let triggers = Spi::get_one::<String>(
        "SELECT string_agg(c.relname || '.' || t.tgname || ' ' || p.proname, ', ' ORDER BY c.relname)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
         WHERE NOT t.tgisinternal AND c.relname IN ('centrifugo_outbox', 'chat_outbox')",
    )
    .unwrap();
    assert_eq!(
        triggers.as_deref(),
        Some(
            "centrifugo_outbox.centrifugo_wake_at_commit_trigger centrifugo_wake_at_commit, \
             chat_outbox.centrifugo_notify_partition_trigger centrifugo_notify_partition_change"
        )
    );
}

#[pg_test]
fn the_wake_trigger_refuses_to_lose_rows() {
    install_expect_error();
    let refused = |sql: &str, sqlstate: &str| {
        Spi::get_one_with_args::<String>("SELECT pg_temp.expect_error($1, $2)", &[sql.into(), sqlstate.into()])
            .unwrap()
            .unwrap()
    };
    Spi::run("CREATE TABLE chat_outbox (LIKE centrifugo_outbox INCLUDING DEFAULTS)").unwrap();
    let row = "INSERT INTO chat_outbox (id, method, payload, partition) VALUES (1, 'publish', '{\"channel\": \"c\", \"data\": 1}', ";
    // No worker reads a NULL partition: the row would never be sent.
    Spi::run("ALTER TABLE chat_outbox ALTER COLUMN partition DROP NOT NULL").unwrap();
    Spi::run("CREATE TRIGGER wake AFTER INSERT ON chat_outbox FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit()")
        .unwrap();
    let msg = refused(&format!("{row}NULL)"), "23502");
    assert!(msg.contains("partition must not be NULL"), "{msg}");
    // Attached BEFORE, its NULL result would drop every row.
    for attach in ["BEFORE INSERT ON chat_outbox FOR EACH ROW", "BEFORE INSERT ON chat_outbox FOR EACH STATEMENT"] {
        Spi::run(&format!("DROP TRIGGER wake ON chat_outbox; CREATE TRIGGER wake {attach} EXECUTE FUNCTION centrifugo_wake_at_commit()"))
            .unwrap();
        let msg = refused(&format!("{row}0)"), "39P01");
        assert!(msg.contains("AFTER INSERT ... FOR EACH ROW"), "{attach}: {msg}");
    }
    Spi::run("DROP TRIGGER wake ON chat_outbox; CREATE TRIGGER wake AFTER INSERT ON chat_outbox FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit()")
        .unwrap();
    Spi::run(&format!("{row}0)")).unwrap();
    assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM chat_outbox").unwrap(), Some(1));
}

#[pg_test]
fn the_sql_api_is_granted_to_centrifugo_publisher_not_public() {
    install_expect_error();
    Spi::run("CREATE ROLE test_app; CREATE ROLE test_writer IN ROLE centrifugo_publisher").unwrap();
    Spi::run("SET LOCAL ROLE test_app").unwrap();
    let msg = Spi::get_one::<String>("SELECT pg_temp.expect_error($$SELECT centrifugo_publish('c', '1')$$, '42501')")
        .unwrap()
        .unwrap();
    assert!(msg.contains("permission denied"), "{msg}");
    Spi::run("RESET ROLE; SET LOCAL ROLE test_writer").unwrap();
    let id = Spi::get_one::<i64>("SELECT centrifugo_publish('c', '1')").unwrap();
    assert!(id.is_some());
    Spi::run("RESET ROLE").unwrap();
}

#[pg_test]
fn secrets_are_masked_and_settings_are_registered() {
    let shown = Spi::get_one::<String>("SELECT current_setting('centrifugo.api_key')").unwrap().unwrap();
    assert_eq!(shown, "********");
    let flags = Spi::get_one::<String>(
        "SELECT string_agg(name || '=' || context, ',' ORDER BY name) FROM pg_settings
         WHERE name IN ('centrifugo.api_key', 'centrifugo.kafka_sasl_password', 'centrifugo.api_url', 'centrifugo.num_partitions')",
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        flags,
        "centrifugo.api_key=sighup,centrifugo.api_url=sighup,centrifugo.kafka_sasl_password=sighup,centrifugo.num_partitions=postmaster"
    );
    // The prefix is reserved: a typo is an error, not a silent placeholder (PostgreSQL 15 and
    // later; 14 has no reserved prefixes and only warns at load about unknown centrifugo.* lines).
    #[cfg(not(feature = "pg14"))]
    {
        install_expect_error();
        let msg = Spi::get_one::<String>("SELECT pg_temp.expect_error($$SET centrifugo.api_ur = 'x'$$, '42602')")
            .unwrap()
            .unwrap();
        assert!(msg.contains("centrifugo.api_ur"), "{msg}");
    }
}

/// Numbers of any size and precision and deep nesting reach the outbox exactly as given: the
/// SQL API never turns data into a float or a JSON tree.
#[pg_test]
fn every_function_keeps_data_exact() {
    let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
    let data = format!(
        r#"{{"big": 123456789012345678901234567890, "dec": -0.12345678901234567890123456789, "exp": 1e40, "deep": {deep}}}"#
    );
    let calls = [
        "SELECT centrifugo_publish('c', $1::jsonb)",
        "SELECT centrifugo_broadcast(ARRAY['a', 'b'], $1::jsonb)",
        "SELECT centrifugo_subscribe('u', 'c', data => $1::jsonb, info => $1::jsonb)",
        "SELECT centrifugo_refresh('u', info => $1::jsonb)",
        "SELECT centrifugo_command('publish', jsonb_build_object('channel', 'c', 'data', $1::jsonb))",
    ];
    for call in calls {
        let id = Spi::get_one_with_args::<i64>(call, &[data.as_str().into()]).expect(call).expect("an id");
        let exact = Spi::get_one_with_args::<bool>(
            "SELECT coalesce(payload->'data', payload->'info') = $2::jsonb
                    AND (payload->'info' IS NULL OR payload->'info' = $2::jsonb)
             FROM centrifugo_outbox WHERE id = $1",
            &[id.into(), data.as_str().into()],
        )
        .expect("read back");
        assert_eq!(exact, Some(true), "{call}");
    }
}

#[pg_test]
fn the_worker_writes_a_jsonb_as_jsonb_out_does_and_no_further_than_its_limits() {
    use crate::payload::{PayloadDatum, PayloadText, Scratch};
    let values = [
        r#"{"a": 1, "b": [1, 2.50, -3e-5, {"c": null}], "d": {}, "e": [], "f": true, "g": false}"#,
        r#""a raw scalar with \" and \\ and / and \n \r \t \b \f and \u0001 \u001f \u007f""#,
        "12345.678",
        "-0.000",
        "1e40",
        "1e1000",
        "true",
        "null",
        "[]",
        "{}",
        "[{}]",
        r#"{"k": {}}"#,
        r#"[[[]], {"k": [true, false, null]}, "x", {"": ""}]"#,
        r#"{"é": "✓ \t", "nested": {"deeper": {"deepest": [1, [2, [3]], {"x": [{}]}]}}, "z": 0}"#,
    ];
    Spi::connect(|client| {
        let mut scratch = Scratch::new();
        for value in values {
            let table = client.select("SELECT $1::jsonb, $1::jsonb::text", None, &[value.into()]).unwrap().first();
            let datum = table.get::<PayloadDatum>(1).unwrap().unwrap();
            let text = table.get::<String>(2).unwrap().unwrap();
            let compact = outbox_core::settings::compact_json_len(&text);
            match datum.text(&mut scratch, 0).unwrap() {
                PayloadText::Text(written) => assert_eq!(written, text, "{value}"),
                PayloadText::DeadLetter { why, .. } => panic!("{value}: {why}"),
            }
            // At the limit it is written; one byte under, it is a dead letter with the reason.
            assert!(matches!(datum.text(&mut scratch, compact).unwrap(), PayloadText::Text(t) if t == text), "{value}");
            match datum.text(&mut scratch, compact - 1).unwrap() {
                PayloadText::DeadLetter { why, .. } => assert!(
                    why.contains(&format!("exceeds centrifugo.max_command_size ({} bytes)", compact - 1)),
                    "{value}: {why}"
                ),
                PayloadText::Text(t) => panic!("{value} written past its limit: {t}"),
            }
        }
    });
}
