"""The extension in a real PostgreSQL 15 cluster started like a user's: preloaded, configured
through postgresql.conf. Covers what the in-database tests cannot see from inside one rolled-back
transaction: preload enforcement, NOTIFY at commit, a user's own outbox table, settings checks,
secrets, and drop-in compatibility with Centrifugo's own PostgreSQL consumer."""

import json
import uuid

import psycopg
import pytest

from harness.centrifugo import Centrifugo
from harness.common import wait_until
from harness.subscriber import Subscriber

SEED_INSERT = """INSERT INTO centrifugo_outbox (method, payload, partition)
VALUES ('publish', '{"channel": "updates", "data": {"text": "Hello, world!"}}', 0)"""


def notifications(conn, timeout=2.0):
    """Drains the notifications a LISTENing connection received within `timeout`."""
    got = []
    for n in conn.notifies(timeout=timeout, stop_after=None):
        got.append((n.channel, n.payload))
    return got


def test_create_extension_requires_preload(make_cluster):
    pg = make_cluster(preload=False, create_extension=False)
    with pytest.raises(psycopg.Error) as err:
        pg.sql("CREATE EXTENSION centrifugo_outbox")
    assert "shared_preload_libraries" in str(err.value)
    assert pg.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'centrifugo_outbox'") == 0


def test_seed_insert_notifies_at_commit_only(make_cluster):
    pg = make_cluster({"centrifugo.num_partitions": 4,
                       "centrifugo.partition_notification_channel": "centrifugo_partition_change"})
    listener = pg.connect()
    listener.execute("LISTEN centrifugo_partition_change")
    pg.sql(SEED_INSERT)
    pg.sql("SELECT centrifugo_publish('c', '1', partition => 2)")
    with pg.connect(autocommit=False) as conn:
        conn.execute("SELECT centrifugo_publish('c', '1', partition => 3)")
        conn.rollback()
    got = notifications(listener)
    assert got == [("centrifugo_partition_change", "0"), ("centrifugo_partition_change", "2")]
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 2
    listener.close()


def test_no_notification_channel_sends_nothing(make_cluster):
    pg = make_cluster()
    listener = pg.connect()
    listener.execute("LISTEN centrifugo_partition_change")
    pg.sql(SEED_INSERT)
    assert notifications(listener, 1.0) == []
    listener.close()


def test_users_own_outbox_table(make_cluster):
    pg = make_cluster({"centrifugo.outbox_table_name": "app.chat_outbox"})
    pg.sql("""CREATE SCHEMA app;
        CREATE TABLE app.chat_outbox (
            id BIGSERIAL PRIMARY KEY, method text NOT NULL, payload JSONB NOT NULL,
            partition INTEGER NOT NULL default 0, created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL);
        CREATE OR REPLACE TRIGGER centrifugo_notify_partition_trigger AFTER INSERT ON app.chat_outbox
            FOR EACH ROW EXECUTE FUNCTION centrifugo_notify_partition_change('chat_changes');""")
    listener = pg.connect()
    listener.execute("LISTEN chat_changes")
    new_id = pg.scalar("SELECT centrifugo_publish('chat:1', '{\"m\": 1}')")
    row = pg.sql("SELECT id, method, payload FROM app.chat_outbox")
    assert row == [(new_id, "publish", {"channel": "chat:1", "data": {"m": 1}})]
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0
    assert notifications(listener) == [("chat_changes", "0")]
    listener.close()


def test_invalid_settings_are_refused_with_a_reason(make_cluster):
    pg = make_cluster()
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        pg.sql("ALTER SYSTEM SET centrifugo.outbox_table_name = 'x; DROP TABLE y'")
    assert "not a valid table name" in str(err.value.diag.message_detail)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        pg.sql("ALTER SYSTEM SET centrifugo.api_url = 'ftp://example'")
    assert "http://" in str(err.value.diag.message_detail)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        pg.sql("ALTER SYSTEM SET centrifugo.num_partitions = 0")
    with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
        pg.sql("SET centrifugo.api_url = 'http://other:8000/api'")


def test_secrets_are_superuser_only_masked_and_never_logged(make_cluster):
    key, password = "k-" + uuid.uuid4().hex, "p-" + uuid.uuid4().hex
    pg = make_cluster({"centrifugo.api_key": key, "centrifugo.kafka_sasl_password": password,
                       "log_min_messages": "debug1"})
    assert pg.scalar("SHOW centrifugo.api_key") == "********"
    assert pg.scalar("SELECT setting FROM pg_settings WHERE name = 'centrifugo.kafka_sasl_password'") == "********"
    pg.sql("CREATE ROLE app LOGIN IN ROLE centrifugo_publisher")
    with pg.connect(user="app") as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SHOW centrifugo.api_key")
        assert app.execute("SELECT count(*) FROM pg_settings WHERE name = 'centrifugo.api_key'").fetchone()[0] == 0
        # The publisher role can use the API.
        assert app.execute("SELECT centrifugo_publish('c', '1')").fetchone()[0] > 0
    pg.restart()
    pg.sql("SELECT 1")
    log = pg.log()
    assert key not in log and password not in log


def test_secrets_rotate_on_reload_and_no_role_or_log_ever_sees_them(make_cluster):
    """The API key, the SASL password and the userinfo of api_url follow pg_reload_conf(); what
    scrubs logs and errors follows too; no unprivileged role sees any of them, in any way a
    setting can be read, nor in an error or the status views."""
    from harness.fault_double import FaultDouble
    tag = uuid.uuid4().hex[:8]
    key1, key2 = f"key-one-{tag}", f"key-two-{tag}"
    sasl1, sasl2 = f"sasl-one-{tag}", f"sasl-two-{tag}"
    url_pass = f"urlpass-{tag}"
    double = FaultDouble(None).start()
    # Centrifugo's error text echoes the key it was sent (a proxy's might): it must be scrubbed.
    double.script = lambda r: ("reply", 200, json.dumps(
        {"error": {"code": 100, "message": f"internal: rejected key {r['key']}"}}).encode())
    url = double.api_url.replace("http://", f"http://proxyuser:{url_pass}@")
    pg = make_cluster({"centrifugo.api_url": url, "centrifugo.api_key": key1,
                       "centrifugo.kafka_sasl_password": sasl1, "centrifugo.retry_backoff_max": 200,
                       "log_min_messages": "debug1"})
    try:
        pg.sql("SELECT centrifugo_publish('chat:rot', '1')")
        wait_until(lambda: any(r["key"] == key1 for r in double.requests), 15, what="a request with the first key")
        pg.set(**{"centrifugo.api_key": key2, "centrifugo.kafka_sasl_password": sasl2,
                  "centrifugo.api_url": url.replace("127.0.0.1", "localhost")})
        pg.reload()
        wait_until(lambda: any(r["key"] == key2 for r in double.requests[-5:]), 15,
                   what="the rotated key in use without a restart")
        wait_until(lambda: "rejected key ********" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status") or ""),
                   15, what="the echoed key scrubbed in the status view")
        # A refused value in the file is quoted by the postmaster's log line: scrubbed too.
        refused_pass = f"refusedpass-{tag}"
        pg.set(**{"centrifugo.api_url": f"ftp://u:{refused_pass}@h/api"})
        pg.reload()
        wait_until(lambda: 'invalid value for parameter "centrifugo.api_url"' in pg.log(), 10,
                   what="the refused value in the log")
        assert refused_pass not in pg.log()
        pg.set(**{"centrifugo.api_url": url.replace("127.0.0.1", "localhost")})
        pg.reload()
        pg.sql("CREATE ROLE app LOGIN IN ROLE centrifugo_publisher")
        pg.sql("GRANT SELECT ON centrifugo_outbox_status, centrifugo_kafka_status TO app; "
               "GRANT EXECUTE ON FUNCTION centrifugo_outbox_status_rows, centrifugo_kafka_status_rows TO app")
        with pg.connect(user="app") as app:
            seen = [app.execute("SHOW centrifugo.api_url").fetchone()[0],
                    app.execute("SELECT current_setting('centrifugo.api_url')").fetchone()[0]]
            seen += [str(row) for row in app.execute(
                "SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'centrifugo.%'")]
            seen += [str(row) for row in app.execute("SELECT * FROM centrifugo_outbox_status")]
            seen += [str(row) for row in app.execute("SELECT * FROM centrifugo_kafka_status")]
            for secret in ("centrifugo.api_key", "centrifugo.kafka_sasl_password", "centrifugo.consumers"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as denied:
                    app.execute(f"SHOW {secret}")
                seen.append(str(denied.value))
            with pytest.raises(psycopg.Error) as denied:
                app.execute("SET centrifugo.api_url = 'http://x/api'")
            seen.append(str(denied.value))
        assert seen[0] == "http://********@localhost:%d/api" % double.port, seen[0]
        # Superusers see the masked forms too.
        assert pg.scalar("SHOW centrifugo.api_key") == "********"
        assert url_pass not in pg.scalar("SHOW centrifugo.api_url")
        log = pg.log()
        for secret in (key1, key2, sasl1, sasl2, url_pass):
            assert not any(secret in text for text in seen), (secret, seen)
            assert secret not in log, secret
    finally:
        double.stop()


def test_centrifugo_own_consumer_drains_our_table(make_cluster):
    """Drop-in the other way: Centrifugo's built-in PostgreSQL consumer delivers what our SQL API enqueued."""
    pg = make_cluster({"centrifugo.num_partitions": 2,
                       "centrifugo.partition_notification_channel": "centrifugo_partition_change"})
    consumer = {"name": "our_outbox", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "outbox_table_name": "centrifugo_outbox",
        "num_partitions": 2, "partition_select_limit": 100, "partition_poll_interval": "300ms",
        "partition_notification_channel": "centrifugo_partition_change"}}
    server = Centrifugo(extra_config={"consumers": [consumer]}).start()
    sub = Subscriber(server, channels=["chat:a", "chat:b"]).start()
    try:
        pg.sql(SEED_INSERT.replace("updates", "chat:a"))
        pg.sql("SELECT centrifugo_publish('chat:a', '{\"n\": 1}', partition => 1)")
        pg.sql("SELECT centrifugo_broadcast(ARRAY['chat:a', 'chat:b'], '{\"n\": 2}')")
        pg.sql("SELECT centrifugo_publish_binary('chat:b', convert_to('{\"n\": 3}', 'UTF8'))")
        sub.wait_for_publications(3, "chat:a")
        sub.wait_for_publications(2, "chat:b")
        assert sorted(json.dumps(p.data, sort_keys=True) for p in sub.publications("chat:a")) == sorted(
            json.dumps(d, sort_keys=True) for d in [{"text": "Hello, world!"}, {"n": 1}, {"n": 2}])
        assert sorted(json.dumps(p.data, sort_keys=True) for p in sub.publications("chat:b")) == sorted(
            json.dumps(d, sort_keys=True) for d in [{"n": 2}, {"n": 3}])
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 10, what="an empty outbox")
    finally:
        sub.stop()
        server.stop()


def test_a_consumer_entrys_own_notification_channel_wakes_centrifugos_consumer(make_cluster):
    """Each consumer's trigger notifies its own entry's channel (not the global one): Centrifugo's
    own consumer, listening on that channel with a 60 s poll, drains the entry's table at once."""
    ours = {"name": "ours_chat", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://x@h/postgres", "outbox_table_name": "chat_outbox", "num_partitions": 2,
        "partition_notification_channel": "chat_outbox_change"}}
    # Our workers cannot reach a Centrifugo (port 9), and take another lock key (another name):
    # whatever arrives was delivered by Centrifugo's consumer.
    pg = make_cluster({"centrifugo.api_url": "http://127.0.0.1:9/api", "centrifugo.retry_backoff_base": 60000,
                       "centrifugo.partition_notification_channel": "global_change",
                       "centrifugo.consumers": json.dumps([ours])})
    pg.sql("""CREATE TABLE chat_outbox (id BIGSERIAL PRIMARY KEY, method text NOT NULL, payload JSONB NOT NULL,
                  partition INTEGER NOT NULL default 0, created_at TIMESTAMPTZ NOT NULL DEFAULT now());
              CREATE TRIGGER wake AFTER INSERT ON chat_outbox FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit()""")
    with pg.connect() as listener:
        listener.execute("LISTEN chat_outbox_change")
        listener.execute("LISTEN global_change")
        pg.sql("INSERT INTO chat_outbox (method, payload, partition) VALUES ('publish', '{\"channel\": \"x\", \"data\": 0}', 1)")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=2, stop_after=1)]
        assert got == [("chat_outbox_change", "1")], got
    pg.sql("DELETE FROM chat_outbox")
    theirs = {"name": "cf_chat", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "outbox_table_name": "chat_outbox",
        "num_partitions": 2, "partition_select_limit": 100, "partition_poll_interval": "60s",
        "partition_notification_channel": "chat_outbox_change"}}
    server = Centrifugo(extra_config={"consumers": [theirs]}).start()
    channel = f"chat:own{uuid.uuid4().hex[:8]}"
    sub = Subscriber(server, channels=[channel]).start()
    try:
        # Centrifugo's consumer polls once at start: let that pass, then only a NOTIFY wakes it.
        import time
        time.sleep(2)
        start = time.monotonic()
        for n, partition in [(1, 0), (2, 1), (3, 0)]:
            pg.sql("INSERT INTO chat_outbox (method, payload, partition) VALUES ('publish', "
                   "jsonb_build_object('channel', %s::text, 'data', %s::int), %s)", (channel, n, partition))
        got = sub.wait_for_publications(3, channel, timeout=20)
        assert time.monotonic() - start < 10, "woken by the entry's channel, not by the 60 s poll"
        assert sorted(p.data for p in got) == [1, 2, 3]
    finally:
        sub.stop()
        server.stop()
