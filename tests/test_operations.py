"""Operating it from SQL: status views whose values follow real traffic, failures and replays;
Kafka partition status; dead-letter tools; waiting for and restarting workers; live reloads;
bounded bloat under sustained load; ALTER EXTENSION UPDATE and pg_dump/pg_restore with data."""

import json
import os
import time
import uuid

import psycopg
import pytest

from conftest import delivery_settings, wait_for_workers
from harness.common import wait_until
from harness.fault_double import FaultDouble, ok_replies
from harness.pg import PG_BIN, _as_postgres

# The version `CREATE EXTENSION` installs (Cargo.toml's); updates must end there.
CURRENT_VERSION = next(line.split('"')[1] for line in open(os.path.join(os.path.dirname(__file__), "..", "Cargo.toml"))
                       if line.startswith("version = "))
from harness.subscriber import Subscriber


def uid():
    return uuid.uuid4().hex[:8]


def status(pg, partition=0):
    cur = pg.connect().execute("SELECT * FROM centrifugo_outbox_status WHERE partition = %s", (partition,))
    row = cur.fetchone()
    return dict(zip([d.name for d in cur.description], row))


def test_outbox_status_follows_deliveries_failures_and_replays(make_cluster):
    double = FaultDouble().start()
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", retry_backoff_base=50, retry_backoff_max=300))
        assert pg.scalar("SELECT centrifugo_wait_until_running('10 seconds')") is True
        double.script = lambda r: ("reply", 503, b"maintenance")
        pg.sql("SELECT centrifugo_publish('c', to_jsonb(g)) FROM generate_series(1, 5) g")
        # Between two back-offs the worker is briefly "sending": wait for a snapshot taken while it waits.
        def backing_off_after_retries():
            s = status(pg)
            return s if s["retries"] >= 2 and s["state"] == "backing off" else None

        s = wait_until(backing_off_after_retries, 10, what="retries, seen while backing off")
        assert s["backlog"] == 5 and s["oldest_pending_age"].total_seconds() > 0
        assert s["last_error_code"] == 503 and "503" in s["last_error"] and s["last_error_at"] is not None
        assert s["backoff_ms"] > 0 and s["delivered"] == 0 and s["last_success_at"] is None

        def reply(r):
            replies = ok_replies(r)
            for k, c in enumerate(r["body"]["commands"]):
                if c.get("publish", {}).get("channel") == "bad":
                    replies[k] = {"error": {"code": 102, "message": "unknown channel"}}
            return ("reply", 200, json.dumps({"replies": replies}).encode())

        double.script = reply
        # The rows are gone at COMMIT; the worker says "idle" a moment later.
        s = wait_until(lambda: (lambda s: s if s["backlog"] == 0 and s["state"] == "idle" else None)(status(pg)),
                       10, what="the backlog to drain and the worker to be idle")
        assert s["delivered"] == 5 and s["backoff_ms"] == 0 and s["last_success_at"] is not None
        assert sum(s["latency_histogram"].values()) == 5
        pg.sql("SELECT centrifugo_publish('bad', '1') FROM generate_series(1, 3)")
        wait_until(lambda: status(pg)["dead_lettered"] == 3, 10, what="3 dead letters")
        assert status(pg)["last_error_code"] == 102
        assert pg.sql("SELECT source, method, error_kind, error_code, dead_letters FROM centrifugo_dead_letter_counts") == [
            ("outbox", "publish", "centrifugo", 102, 3)]

        # Replay one, purge the rest: counts follow.
        first = pg.scalar("SELECT min(id) FROM centrifugo_dead_letters")
        assert pg.scalar("SELECT centrifugo_replay_dead_letters(ids => ARRAY[%s]::bigint[])", (first,)) == 1
        wait_until(lambda: status(pg)["dead_lettered"] == 4, 10, what="the replayed command to fail again")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            pg.sql("SELECT centrifugo_purge_dead_letters()")
        assert pg.scalar("SELECT centrifugo_purge_dead_letters(error_code => 102)") == 3
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letter_counts") == 0
    finally:
        double.stop()


def test_wait_until_running_and_restart_workers(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, num_partitions=2))
    assert pg.scalar("SELECT centrifugo_wait_until_running()") is True
    before = {r[0] for r in pg.sql("SELECT pid FROM centrifugo_outbox_status")}
    assert pg.scalar("SELECT centrifugo_restart_workers()") == 2
    wait_until(lambda: pg.scalar("SELECT centrifugo_wait_until_running('1 second')")
               and not ({r[0] for r in pg.sql("SELECT pid FROM centrifugo_outbox_status")} & before), 15,
               what="new workers")
    channel = f"chat:restart{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        pg.sql("SELECT centrifugo_publish(%s, '1', partition => 1)", (channel,))
        sub.wait_for_publications(1, channel)
    finally:
        sub.stop()
    # Not for applications.
    pg.sql("CREATE ROLE app LOGIN IN ROLE centrifugo_publisher")
    with pg.connect(user="app") as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT * FROM centrifugo_outbox_status")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT centrifugo_restart_workers()")


def test_kafka_status_shows_committed_offsets_and_lag(make_cluster, centrifugo, kafka):
    topic, group = f"st{uid()}", f"g{uid()}"
    kafka.create_topic(topic, partitions=2)
    pg = make_cluster({**delivery_settings(centrifugo.api_url, centrifugo.api_key),
                       "centrifugo.kafka_brokers": kafka.bootstrap, "centrifugo.kafka_topics": topic,
                       "centrifugo.kafka_consumer_group": group})
    producer = kafka.producer()
    for i in range(30):
        producer.produce(topic, json.dumps({"method": "publish", "payload": {"channel": "chat:kst", "data": i}}).encode(),
                         partition=i % 2)
    producer.produce(topic, b"garbage", partition=0)
    producer.flush(30)
    rows = lambda: pg.sql("SELECT topic, partition, assigned, committed_offset, high_watermark, lag, delivered, dead_lettered "
                          "FROM centrifugo_kafka_status ORDER BY partition")
    wait_until(lambda: [(r[3], r[5]) for r in rows()] == [(16, 0), (15, 0)], 30, what="offsets committed, no lag")
    assert [(r[0], r[1], r[2], r[6], r[7]) for r in rows()] == [(topic, 0, True, 15, 1), (topic, 1, True, 15, 0)]


def test_tunables_reload_live(make_cluster, centrifugo):
    wrong = FaultDouble().start()
    try:
        wrong.script = lambda r: ("reply", 503, b"not me")
        pg = make_cluster(delivery_settings(wrong.api_url, centrifugo.api_key, retry_backoff_max=200,
                                            partition_poll_interval=60000))
        wait_for_workers(pg)
        channel = f"chat:reload{uid()}"
        sub = Subscriber(centrifugo, channels=[channel]).start()
        try:
            pg.sql("SELECT centrifugo_publish(%s, '\"first\"')", (channel,))
            wait_until(lambda: len(wrong.requests) >= 2, 10, what="attempts at the wrong URL")
            pid = pg.scalar("SELECT pid FROM centrifugo_outbox_status")
            pg.sql("ALTER SYSTEM SET centrifugo.api_url = %s" % psycopg.sql.quote(centrifugo.api_url))
            pg.sql("SELECT pg_reload_conf()")
            assert sub.wait_for_publications(1, channel, timeout=10)[0].data == "first"
            assert pg.scalar("SELECT pid FROM centrifugo_outbox_status") == pid, "no restart needed"

            # The poll interval: with the wake trigger disabled only the poll finds new rows.
            pg.sql("ALTER TABLE centrifugo_outbox DISABLE TRIGGER centrifugo_wake_at_commit_trigger")
            pg.sql("SELECT centrifugo_publish(%s, '\"polled\"')", (channel,))
            time.sleep(3)
            assert len(sub.publications(channel)) == 1, "a 60 s poll interval does not find it in 3 s"
            pg.sql("ALTER SYSTEM SET centrifugo.partition_poll_interval = '200ms'")
            pg.sql("SELECT pg_reload_conf()")
            # The worker applies the new interval after its current 60 s wait; restarting it is
            # not needed, a commit wake-up ends the wait (here: one more row with the trigger on).
            pg.sql("ALTER TABLE centrifugo_outbox ENABLE TRIGGER centrifugo_wake_at_commit_trigger")
            pg.sql("SELECT centrifugo_publish(%s, '\"wake\"')", (channel,))
            sub.wait_for_publications(3, channel, timeout=5)
            pg.sql("ALTER TABLE centrifugo_outbox DISABLE TRIGGER centrifugo_wake_at_commit_trigger")
            start = time.monotonic()
            pg.sql("SELECT centrifugo_publish(%s, '\"polled again\"')", (channel,))
            sub.wait_for_publications(4, channel, timeout=5)
            assert time.monotonic() - start < 2, "found by the 200 ms poll"
        finally:
            sub.stop()
    finally:
        wrong.stop()


def test_dead_tuples_stay_bounded_under_sustained_load(make_cluster, centrifugo):
    pg = make_cluster({**delivery_settings(centrifugo.api_url, centrifugo.api_key, num_partitions=2),
                       "autovacuum_naptime": "1s"})
    wait_for_workers(pg)
    peak, samples = 0, []
    deadline = time.monotonic() + 20
    batches = 0
    with pg.connect() as conn:
        while time.monotonic() < deadline:
            conn.execute("SELECT centrifugo_publish('chat:bloat', to_jsonb(g), partition => g % 2) "
                         "FROM generate_series(1, 500) g")
            batches += 1
            dead = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'centrifugo_outbox'").fetchone()[0]
            samples.append(dead)
            peak = max(peak, dead)
            time.sleep(0.05)
    rows = batches * 500
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 30, what="the queue to drain")
    vacuums = pg.scalar("SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'centrifugo_outbox'")
    print(f"\nbloat: {rows} commands in 20 s, peak n_dead_tup {peak}, autovacuum runs {vacuums}")
    assert rows >= 20000
    # The workers' deletes reach the statistics autovacuum reads (a background worker has to
    # report them itself), so the dead tuples counted above were real ones.
    wait_until(lambda: pg.scalar("SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'centrifugo_outbox'") >= rows,
               10, what="the workers' deletes in pg_stat_user_tables")
    assert peak > 0
    assert vacuums >= 3, "the queue table's autovacuum settings make it vacuum often"
    assert peak < rows / 2, f"dead tuples should stay bounded, peak {peak} of {rows}"


def test_alter_extension_update_from_0_1_0_through_0_2_0_with_data(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", retry_backoff_max=200), create_extension=False)
    pg.sql("CREATE EXTENSION centrifugo_outbox VERSION '0.1.0'")
    channel = f"chat:upgrade{uid()}"
    pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('nope', '{}')")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1, 10, what="a 0.1.0 dead letter")
    pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 3) g", (channel,))
    pg.sql("ALTER EXTENSION centrifugo_outbox UPDATE")
    assert pg.scalar("SELECT extversion FROM pg_extension WHERE extname = 'centrifugo_outbox'") == CURRENT_VERSION
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 3
    assert pg.scalar("SELECT backlog FROM centrifugo_outbox_status") == 3
    assert pg.scalar("SELECT dead_letters FROM centrifugo_dead_letter_counts") == 1
    # Point it at Centrifugo: the commands enqueued under 0.1.0 are delivered.
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        pg.set(**{"centrifugo.api_url": centrifugo.api_url, "centrifugo.api_key": centrifugo.api_key})
        pg.restart()
        assert [p.data for p in sub.wait_for_publications(3, channel)] == [1, 2, 3]
    finally:
        sub.stop()
    # The updated schema is the same as a fresh 0.2.0 install.
    fresh = make_cluster()
    objects = ("SELECT pg_describe_object(classid, objid, 0) FROM pg_depend "
               "WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'centrifugo_outbox') AND deptype = 'e' ORDER BY 1")
    assert [r[0] for r in pg.sql(objects)] == [r[0] for r in fresh.sql(objects)]
    # Down to each function's pinned settings, privileges and body.
    functions = ("SELECT p.oid::regprocedure::text, p.proconfig, p.proacl::text[], p.prosrc FROM pg_proc p "
                 "JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' "
                 "WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'centrifugo_outbox') ORDER BY 1")
    assert pg.sql(functions) == fresh.sql(functions)
    # And each table's columns (0.3.0 adds the dead letters' raw_value).
    columns = ("SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull "
               "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
               "WHERE c.relname IN ('centrifugo_outbox', 'centrifugo_dead_letters') AND a.attnum > 0 AND NOT a.attisdropped "
               "ORDER BY 1, a.attnum")
    assert pg.sql(columns) == fresh.sql(columns)
    # And the views' columns (0.4.0 adds the endpoint columns to the status views).
    view_columns = ("SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod) "
                    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                    "WHERE c.relkind = 'v' AND c.relname LIKE 'centrifugo%' AND a.attnum > 0 ORDER BY 1, a.attnum")
    assert pg.sql(view_columns) == fresh.sql(view_columns)
    # And the outbox's triggers (0.6.0 drops the PL/pgSQL NOTIFY trigger: the wake trigger notifies).
    triggers = ("SELECT tgname::text, pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE tgrelid = 'centrifugo_outbox'::regclass AND NOT tgisinternal ORDER BY 1")
    assert pg.sql(triggers) == fresh.sql(triggers)
    assert [r[0] for r in pg.sql("SELECT relacl::text FROM pg_class WHERE relkind = 'v' AND relname LIKE 'centrifugo%' ORDER BY relname")] == \
        [r[0] for r in fresh.sql("SELECT relacl::text FROM pg_class WHERE relkind = 'v' AND relname LIKE 'centrifugo%' ORDER BY relname")]


def test_alter_extension_update_from_0_3_0_keeps_what_operators_were_granted(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key), create_extension=False)
    pg.sql("CREATE EXTENSION centrifugo_outbox VERSION '0.3.0'")
    pg.sql("CREATE ROLE monitor LOGIN")
    pg.sql("GRANT SELECT ON centrifugo_outbox_status, centrifugo_kafka_status TO monitor")
    pg.sql("GRANT EXECUTE ON FUNCTION centrifugo_outbox_status_rows, centrifugo_kafka_status_rows TO monitor")
    # The database's owner (who owns schema public) plants a look-alike of the renamed old
    # function, executable by everybody: its grants must not be copied to the new one.
    pg.sql("CREATE ROLE dbowner LOGIN")
    pg.sql("ALTER DATABASE postgres OWNER TO dbowner")
    with pg.connect(user="dbowner") as conn:
        conn.execute("CREATE FUNCTION public._centrifugo_outbox_status_rows_0_3_0(int) RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.execute("GRANT EXECUTE ON FUNCTION public._centrifugo_outbox_status_rows_0_3_0(int) TO PUBLIC")
    pg.sql("ALTER EXTENSION centrifugo_outbox UPDATE")
    assert pg.scalar("SELECT extversion FROM pg_extension WHERE extname = 'centrifugo_outbox'") == CURRENT_VERSION
    wait_for_workers(pg)
    with pg.connect(user="monitor") as conn:
        # The monitor may not read the outbox itself: the backlog is unknown to it, not an error.
        rows = conn.execute("SELECT partition, backlog, endpoint, endpoint_failures FROM centrifugo_outbox_status").fetchall()
        assert rows == [(0, None, centrifugo.api_url, {centrifugo.api_url: 0})]
        assert conn.execute("SELECT count(*) FROM centrifugo_kafka_status").fetchone()[0] == 0
    # Nobody else gained anything: not through the views, not through the functions.
    pg.sql("CREATE ROLE nobody LOGIN")
    for role, allowed in (("monitor", True), ("nobody", False), ("dbowner", False)):
        for function in ("centrifugo_outbox_status_rows()", "centrifugo_kafka_status_rows()"):
            assert pg.scalar("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, function)) is allowed, (role, function)
    with pg.connect(user="nobody") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM centrifugo_outbox_status")


def test_an_update_refuses_a_publisher_role_somebody_else_made(make_cluster):
    # 0.1.0 and 0.2.0 reused whatever centrifugo_publisher they found; 0.3.0 refuses it on update too.
    pg = make_cluster(create_extension=False)
    pg.sql("CREATE ROLE centrifugo_publisher LOGIN")
    pg.sql("CREATE EXTENSION centrifugo_outbox VERSION '0.2.0'")
    with pytest.raises(psycopg.errors.DuplicateObject, match="it can log in"):
        pg.sql("ALTER EXTENSION centrifugo_outbox UPDATE")
    assert pg.scalar("SELECT extversion FROM pg_extension WHERE extname = 'centrifugo_outbox'") == "0.2.0"
    pg.sql("ALTER ROLE centrifugo_publisher NOLOGIN")
    pg.sql("ALTER EXTENSION centrifugo_outbox UPDATE")
    assert pg.scalar("SELECT extversion FROM pg_extension WHERE extname = 'centrifugo_outbox'") == CURRENT_VERSION


def test_create_extension_refuses_a_database_that_is_not_utf8(make_cluster):
    pg = make_cluster(create_extension=False)
    pg.sql("CREATE DATABASE latin ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs a UTF8 database"):
        pg.sql("CREATE EXTENSION centrifugo_outbox", dbname="latin")


def test_pg_dump_and_restore_keep_a_working_setup(make_cluster, centrifugo):
    source = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", retry_backoff_max=200))
    channel = f"chat:dump{uid()}"
    source.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('nope', '{}')")
    wait_until(lambda: source.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1, 10, what="a dead letter")
    source.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 4) g", (channel,))
    dump = os.path.join(source.root, "app.dump")
    _as_postgres(os.path.join(PG_BIN, "pg_dump"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
                 "-Fc", "-f", dump, "postgres")
    target = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, database="app"), create_extension=False)
    target.sql("CREATE DATABASE app")
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        result = _as_postgres(os.path.join(PG_BIN, "pg_restore"), "-h", "127.0.0.1", "-p", str(target.port), "-U",
                              "postgres", "-d", "app", dump, check=False)
        assert result.returncode == 0, result.stderr
        # The restored pending commands are delivered by the target's workers, in order.
        assert [p.data for p in sub.wait_for_publications(4, channel, timeout=20)] == [1, 2, 3, 4]
        assert target.scalar("SELECT count(*) FROM centrifugo_dead_letters", dbname="app") == 1
        # And the restored setup keeps working: new commands get fresh ids, the trigger wakes the worker.
        target.sql("SELECT centrifugo_publish(%s, '5')", (channel,), dbname="app")
        assert [p.data for p in sub.wait_for_publications(5, channel)][-1] == 5
    finally:
        sub.stop()
