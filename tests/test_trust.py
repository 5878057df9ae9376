"""Trust (issue 9): what a database owner can create never runs with the workers' rights, the SQL
API writes only into the extension's tables, the workers can run as a role without superuser
rights, payloads arrive byte for byte, a command Centrifugo already ran is not sent again, row ids
reused after a sequence went back are still delivered, and hostile database defaults change
nothing. Each attack is run as a real database owner would run it, then checked for what it
gained (nothing) and whether the real outbox still drained."""

import json
import time
import uuid

import psycopg
import pytest

from conftest import delivery_settings, wait_for_workers
from harness.common import wait_until
from harness.fault_double import FaultDouble, ok_replies
from harness.subscriber import Subscriber

FAST_RETRY = {"retry_backoff_base": 10, "retry_backoff_max": 200, "http_timeout": 2000, "http_connect_timeout": 500}

# What README "Security" documents as the worker role's privileges (extension in schema public).
# None on outbox tables: their rows are read and deleted with their owner's rights.
WORKER_ROLE_GRANTS = """
CREATE ROLE cfo_worker LOGIN;
GRANT USAGE ON SCHEMA public TO cfo_worker;
GRANT INSERT ON centrifugo_dead_letters TO cfo_worker;
GRANT USAGE ON SEQUENCE centrifugo_dead_letters_id_seq TO cfo_worker;
"""

# A trigger that records who ran it (and whether that role is a superuser: `is_superuser` is
# the session's, not the current user's) and tries to make the database owner a superuser.
ESCALATE = """
CREATE TABLE {schema}.fired (who text, superuser bool);
GRANT INSERT ON {schema}.fired TO PUBLIC;
CREATE FUNCTION {schema}.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.fired SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;
    BEGIN
        EXECUTE 'ALTER ROLE app_owner SUPERUSER';
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    RETURN OLD;
END $$;
"""

OUTBOX_COLUMNS = """(id bigserial PRIMARY KEY, method text NOT NULL, payload jsonb NOT NULL,
                     partition integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now())"""


def trapped_outbox(schema, table):
    """The owner's statements for an outbox-shaped table whose delete trigger is the trap."""
    return [ESCALATE.format(schema=schema), f"CREATE TABLE {schema}.{table} {OUTBOX_COLUMNS}",
            f"CREATE TRIGGER t BEFORE DELETE ON {schema}.{table} FOR EACH ROW EXECUTE FUNCTION {schema}.escalate()"]


def assert_nothing_gained(pg, schema):
    assert is_superuser(pg, "app_owner") is False
    assert pg.scalar(f"SELECT count(*) FROM {schema}.fired WHERE superuser", dbname="app") == 0, "no trap ran as superuser"


def uid():
    return uuid.uuid4().hex[:8]


def owned_app_database(make_cluster, settings):
    """A cluster whose drained database `app` belongs to `app_owner`, a role without superuser
    rights, with the extension created in it by a superuser, and a plain application role."""
    pg = make_cluster({**settings, "centrifugo.database": "app"}, create_extension=False)
    pg.sql("CREATE ROLE app_owner LOGIN")
    pg.sql("CREATE ROLE app_user LOGIN")
    pg.sql("CREATE DATABASE app OWNER app_owner")
    pg.sql("CREATE EXTENSION centrifugo_outbox", dbname="app")
    pg.sql("GRANT centrifugo_publisher TO app_user")
    return pg


def as_role(pg, role, statements, dbname="app"):
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname=dbname, user=role, autocommit=True) as conn:
        for statement in statements if isinstance(statements, list) else [statements]:
            conn.execute(statement)


def is_superuser(pg, role):
    return pg.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))


def test_a_schema_named_after_the_worker_role_cannot_hijack_the_worker(make_cluster, centrifugo):
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key))
    # The owner's trap: a schema named after the workers' role ("$user" comes first in the
    # default search_path) with an outbox whose delete trigger makes the owner a superuser.
    as_role(pg, "app_owner", [
        "CREATE SCHEMA postgres",
        *trapped_outbox("postgres", "centrifugo_outbox"),
        "GRANT ALL ON postgres.centrifugo_outbox, postgres.centrifugo_outbox_id_seq TO PUBLIC",
        """INSERT INTO postgres.centrifugo_outbox (method, payload) VALUES ('publish', '{"channel": "trap", "data": 1}')""",
    ])
    pg.sql("SELECT centrifugo_restart_workers()", dbname="app")
    channel = f"chat:real{uid()}"
    as_role(pg, "app_user", f"SELECT centrifugo_publish('{channel}', '{{\"n\": 1}}')")
    wait_until(lambda: centrifugo.history(channel) == [{"n": 1}], 15, what="the real outbox to drain")
    time.sleep(1)
    assert_nothing_gained(pg, "postgres")
    assert pg.scalar("SELECT count(*) FROM postgres.fired", dbname="app") == 0, "the trap never ran"
    assert pg.scalar("SELECT count(*) FROM postgres.centrifugo_outbox", dbname="app") == 1, "the worker never read it"
    assert pg.scalar("SELECT count(*) FROM public.centrifugo_outbox", dbname="app") == 0


def test_a_database_search_path_redirects_neither_the_workers_nor_the_sql_api(make_cluster, centrifugo):
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key, **FAST_RETRY))
    # The owner shadows the outbox, the dead letters and the catalog functions the worker calls,
    # ahead of pg_catalog, for every session of the database.
    as_role(pg, "app_owner", [
        "CREATE SCHEMA evil",
        *trapped_outbox("evil", "centrifugo_outbox"),
        "CREATE TABLE evil.centrifugo_dead_letters (LIKE evil.centrifugo_outbox)",
        "GRANT ALL ON ALL TABLES IN SCHEMA evil TO PUBLIC",
        "GRANT ALL ON ALL SEQUENCES IN SCHEMA evil TO PUBLIC",
        "GRANT USAGE ON SCHEMA evil TO PUBLIC",
        """CREATE FUNCTION evil.hashtext(text) RETURNS integer LANGUAGE plpgsql AS $$
           BEGIN IF current_setting('is_superuser')::bool THEN EXECUTE 'ALTER ROLE app_owner SUPERUSER'; END IF;
                 INSERT INTO evil.fired VALUES (current_user, current_setting('is_superuser')::bool); RETURN 0; END $$""",
        """CREATE FUNCTION evil.to_regclass(text) RETURNS regclass LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO evil.fired VALUES (current_user, current_setting('is_superuser')::bool);
                 RETURN 'evil.centrifugo_outbox'::regclass; END $$""",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA evil TO PUBLIC",
        "ALTER DATABASE app SET search_path = evil, pg_catalog, public",
    ])
    pg.sql("SELECT public.centrifugo_restart_workers()", dbname="app")
    time.sleep(1.5)
    channel = f"chat:sp{uid()}"
    # The application calls the SQL API as it always does (unqualified), under the owner's path.
    as_role(pg, "app_user", [f"SELECT centrifugo_publish('{channel}', '{{\"n\": {i}}}')" for i in range(3)])
    wait_until(lambda: centrifugo.history(channel) == [{"n": 0}, {"n": 1}, {"n": 2}], 15, what="delivery")
    # A malformed command becomes a dead letter in the extension's table, and replay, purge and
    # the status view work on the extension's tables too, whatever the caller's search_path.
    pg.sql("""INSERT INTO public.centrifugo_outbox (method, payload) VALUES ('nope', '{"channel": "x"}')""", dbname="app")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM public.centrifugo_dead_letters", dbname="app") == 1, 10,
               what="the dead letter")
    assert pg.scalar("SELECT sum(delivered) FROM public.centrifugo_outbox_status", dbname="app") == 3
    assert pg.scalar("SELECT public.centrifugo_purge_dead_letters(older_than => '0')", dbname="app") == 1
    pg.sql(f"""INSERT INTO public.centrifugo_dead_letters (source, method, payload, error_kind, error_message)
               VALUES ('outbox', 'publish', '{{"channel": "{channel}", "data": {{"n": 3}}}}', 'http', 'x')""", dbname="app")
    assert pg.scalar("SELECT public.centrifugo_replay_dead_letters()", dbname="app") == 1
    wait_until(lambda: len(centrifugo.history(channel)) == 4, 15, what="the replayed command")
    time.sleep(1)
    assert_nothing_gained(pg, "evil")
    assert pg.scalar("SELECT count(*) FROM evil.fired", dbname="app") == 0, "no shadowing function or trigger ran"
    assert pg.scalar("SELECT count(*) FROM evil.centrifugo_outbox", dbname="app") == 0, "the SQL API wrote elsewhere"
    assert pg.scalar("SELECT count(*) FROM evil.centrifugo_dead_letters", dbname="app") == 0


def test_an_outbox_a_role_without_superuser_owns_is_drained_with_its_owners_rights(make_cluster, centrifugo):
    # The superuser workers drain the owner's table as its owner, in a security-restricted
    # operation (as VACUUM and ANALYZE do): the trap runs, but gains nothing.
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            outbox_table_name="box.outbox"))
    channel = f"chat:own{uid()}"
    as_role(pg, "app_owner", [
        "CREATE SCHEMA box",
        *trapped_outbox("box", "outbox"),
        f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": 1}}')""",
    ])
    wait_until(lambda: centrifugo.history(channel) == [1], 15, what="the owner's table to drain")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 0, 10, what="the row to be deleted")
    assert pg.sql("SELECT DISTINCT who, superuser FROM box.fired", dbname="app") == [("app_owner", False)]
    assert_nothing_gained(pg, "box")
    # A deferred trigger would fire at commit, after the worker left the owner's rights: refused,
    # the round rolled back and retried with the reason in the status view; nothing ran as superuser.
    as_role(pg, "app_owner", [
        "CREATE CONSTRAINT TRIGGER later AFTER DELETE ON box.outbox DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION box.escalate()",
        f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": 2}}')""",
    ])
    wait_until(lambda: "deferred trigger" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status", dbname="app") or ""),
               15, what="the status to say why the round was rolled back")
    assert pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 1
    assert_nothing_gained(pg, "box")
    # Centrifugo ran it once; the rolled-back rounds did not send it again.
    time.sleep(1)
    assert centrifugo.history(channel) == [1, 2]


def test_an_owners_trigger_keeps_its_own_search_path_and_settings(make_cluster, centrifugo):
    # Its function's SET clause applies (the worker's pinned path must not override it), and what
    # it changes with set_config is undone when it returns.
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            outbox_table_name="box.outbox"))
    as_role(pg, "app_owner", [
        "CREATE SCHEMA box", f"CREATE TABLE box.outbox {OUTBOX_COLUMNS}", "CREATE TABLE box.audit (id bigint, lock_timeout text)",
        """CREATE FUNCTION box.audit_delete() RETURNS trigger LANGUAGE plpgsql SET search_path = box AS $$
           BEGIN INSERT INTO audit VALUES (OLD.id, current_setting('lock_timeout'));   -- unqualified: box.audit
                 PERFORM set_config('lock_timeout', '1ms', false);
                 RETURN OLD; END $$""",
        "CREATE TRIGGER audit BEFORE DELETE ON box.outbox FOR EACH ROW EXECUTE FUNCTION box.audit_delete()",
    ])
    channel = f"chat:sp{uid()}"
    for i in range(3):
        as_role(pg, "app_owner", f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": {i}}}')""")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 0, 15, what="the row to drain")
    assert centrifugo.history(channel) == [0, 1, 2]
    assert [r[0] for r in pg.sql("SELECT lock_timeout FROM box.audit ORDER BY id", dbname="app")] == ["10s", "10s", "10s"], \
        "each trigger saw the worker's own lock_timeout, not the one the previous one set"


def test_workers_run_as_the_worker_role_with_the_documented_privileges(make_cluster, centrifugo):
    # The role does not exist yet when the server starts: the workers wait and say so, without a
    # restart and a FATAL line every second.
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            worker_role="cfo_worker", outbox_table_name="box.outbox",
                                                            retry_backoff_max=200))
    wait_until(lambda: "cannot connect" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status", dbname="app") or ""),
               15, what="the status to say the workers cannot connect")
    time.sleep(6)
    fatal = pg.log().count('role "cfo_worker" does not exist')
    assert 2 <= fatal <= 5, f"connection attempts back off ({fatal} in ~8 s)"
    pg.sql(WORKER_ROLE_GRANTS, dbname="app")
    # The table a role without superuser rights owns is drained with no grant to cfo_worker: its
    # trigger runs as its owner, never as cfo_worker (which could then be taken over).
    as_role(pg, "app_owner", [
        "CREATE SCHEMA box",
        *trapped_outbox("box", "outbox"),
        "CREATE TRIGGER wake AFTER INSERT ON box.outbox FOR EACH ROW EXECUTE FUNCTION public.centrifugo_wake_at_commit()",
    ])
    wait_until(lambda: pg.scalar("SELECT bool_and(state = 'idle') FROM centrifugo_outbox_status", dbname="app"), 20,
               what="the workers to connect as cfo_worker")
    assert pg.scalar("SELECT array_agg(DISTINCT usename::text) FROM pg_stat_activity WHERE backend_type LIKE 'centrifugo_outbox %'",
                     dbname="app") == ["cfo_worker"]
    channel = f"chat:role{uid()}"
    as_role(pg, "app_owner", [
        f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": {i}}}')"""
        for i in range(3)] + ["""INSERT INTO box.outbox (method, payload) VALUES ('nope', '{}')"""])
    wait_until(lambda: centrifugo.history(channel) == [0, 1, 2], 15, what="delivery under the worker role")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters", dbname="app") == 1, 10, what="a dead letter")
    assert pg.sql("SELECT DISTINCT who, superuser FROM box.fired", dbname="app") == [("app_owner", False)]
    assert_nothing_gained(pg, "box")
    assert pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 0


def test_the_kafka_bridge_runs_as_the_worker_role(make_cluster, centrifugo, kafka):
    topic = f"t{uid()}"
    kafka.create_topic(topic)
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, worker_role="cfo_worker",
                                        kafka_brokers=kafka.bootstrap, kafka_topics=topic, kafka_consumer_group=f"g{uid()}"),
                      create_extension=False)
    pg.sql("CREATE EXTENSION centrifugo_outbox")
    pg.sql(WORKER_ROLE_GRANTS)
    channel = f"chat:kr{uid()}"
    producer = kafka.producer()
    producer.produce(topic, value=json.dumps({"method": "publish", "payload": {"channel": channel, "data": 1}}).encode())
    producer.produce(topic, value=b"not json")
    assert producer.flush(30) == 0
    wait_until(lambda: centrifugo.history(channel) == [1], 40, what="the record to reach Centrifugo")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters WHERE source = 'kafka'") == 1, 20,
               what="the garbage record's dead letter")
    assert pg.scalar("SELECT usename::text FROM pg_stat_activity WHERE backend_type = 'centrifugo_outbox kafka kafka'") == "cfo_worker"


def test_preexisting_publisher_role_is_refused_unless_it_is_harmless(make_cluster):
    pg = make_cluster(create_extension=False)
    pg.sql("CREATE ROLE mallory LOGIN CREATEROLE")
    as_role(pg, "mallory", "CREATE ROLE centrifugo_publisher LOGIN", dbname="postgres")
    with pytest.raises(psycopg.errors.DuplicateObject) as err:
        pg.sql("CREATE EXTENSION centrifugo_outbox")
    assert 'role "centrifugo_publisher" already exists and it can log in' in str(err.value)
    pg.sql("DROP ROLE centrifugo_publisher")
    # Made by the extension in one database, found again by a second one.
    pg.sql("CREATE EXTENSION centrifugo_outbox")
    pg.sql("CREATE DATABASE second")
    pg.sql("CREATE EXTENSION centrifugo_outbox", dbname="second")
    # Administered by a role without superuser rights: it could hand the SQL API to anyone.
    pg.sql("GRANT centrifugo_publisher TO mallory WITH ADMIN OPTION")
    pg.sql("CREATE DATABASE third")
    with pytest.raises(psycopg.errors.DuplicateObject) as err:
        pg.sql("CREATE EXTENSION centrifugo_outbox", dbname="third")
    assert "role mallory can administer it" in str(err.value)


def test_operator_functions_are_not_executable_by_public(make_cluster):
    pg = make_cluster()
    pg.sql("CREATE ROLE nobody LOGIN")
    for call in ["SELECT * FROM centrifugo_worker_status()", "SELECT * FROM centrifugo_outbox_status",
                 "SELECT centrifugo_restart_workers()", "SELECT centrifugo_replay_dead_letters()"]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(pg, "nobody", call, dbname="postgres")
    unpinned = pg.sql("""SELECT p.proname FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
                         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'centrifugo_outbox'
                         WHERE p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                           AND p.prorettype <> 'trigger'::regtype
                           AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)""")
    assert unpinned == [], "every function pins its search_path"


def test_hostile_database_defaults_change_nothing(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key))
    for setting in ["default_transaction_isolation = 'serializable'", "statement_timeout = '1ms'", "lock_timeout = '1ms'",
                    "idle_in_transaction_session_timeout = '1ms'", "session_replication_role = 'replica'",
                    "default_transaction_read_only = on"]:
        pg.sql(f"ALTER DATABASE postgres SET {setting}")
    safe = ("-c default_transaction_read_only=off -c statement_timeout=0 -c lock_timeout=0 -c session_replication_role=origin"
            " -c default_transaction_isolation=read\\ committed")
    with pg.connect(options=safe) as conn:
        conn.execute("SELECT centrifugo_restart_workers()")
    time.sleep(1.5)
    channel = f"chat:hostile{uid()}"
    with pg.connect(options=safe) as conn:
        for i in range(20):
            conn.execute("SELECT centrifugo_publish(%s, %s::jsonb)", (channel, json.dumps(i)))
        conn.execute("INSERT INTO centrifugo_outbox (method, payload) VALUES ('nope', '{}')")
    wait_until(lambda: centrifugo.history(channel) == list(range(20)), 15, what="delivery under hostile defaults")
    with pg.connect(options=safe) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM centrifugo_dead_letters").fetchone()[0] == 1, 10,
                   what="the dead letter")
        assert conn.execute("SELECT count(*) FROM centrifugo_outbox").fetchone()[0] == 0
    assert "could not serialize" not in pg.log() and "read-only transaction" not in pg.log()


# -- Exact data --------------------------------------------------------------------------------

# Every number and string form JSON allows, as a producer writes it; PostgreSQL's jsonb text of it
# is what must arrive.
TRICKY = ('{"big": 123456789012345678901234567890, "dec": -0.12345678901234567890123456789, "exp": 1e40,'
          ' "tiny": -2.5E-30, "e2": 1E+2, "s": "\\u00e9\\ud83d\\ude00 \\u0001 \\"q\\" \\\\ /", "deep": '
          + "[" * 300 + "1" + "]" * 300 + "}")


def test_every_path_delivers_data_byte_for_byte(make_cluster, centrifugo, kafka, transport):
    topic = f"t{uid()}"
    kafka.create_topic(topic)
    pg = make_cluster(delivery_settings(centrifugo.endpoint(transport), centrifugo.api_key, kafka_brokers=kafka.bootstrap,
                                        kafka_topics=topic, kafka_consumer_group=f"g{uid()}"))
    wait_for_workers(pg)
    exact = pg.scalar("SELECT %s::jsonb::text", (TRICKY,))
    assert "123456789012345678901234567890" in exact and "1" + "0" * 40 in exact
    paths = ["publish", "broadcast", "command", "insert", "replay", "kafka"]
    channels = {p: f"chat:exact{p}{uid()}" for p in paths}
    sub = Subscriber(centrifugo, channels=list(channels.values())).start()
    try:
        pg.sql("SELECT centrifugo_publish(%s, %s::jsonb)", (channels["publish"], TRICKY))
        pg.sql("SELECT centrifugo_broadcast(ARRAY[%s, 'nope:x'], %s::jsonb)", (channels["broadcast"], TRICKY))
        pg.sql("SELECT centrifugo_command('publish', jsonb_build_object('channel', %s::text, 'data', %s::jsonb))",
               (channels["command"], TRICKY))
        pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('publish', jsonb_build_object('channel', %s::text, 'data', %s::jsonb))",
               (channels["insert"], TRICKY))
        pg.sql("""INSERT INTO centrifugo_dead_letters (source, method, payload, error_kind, error_message)
                  VALUES ('outbox', 'publish', jsonb_build_object('channel', %s::text, 'data', %s::jsonb), 'http', 'x')""",
               (channels["replay"], TRICKY))
        pg.sql("SELECT centrifugo_replay_dead_letters(method => 'publish', error_kind => 'http')")
        # Kafka: the record's own bytes, not PostgreSQL's spelling of them.
        record = '{"method": "publish", "payload": {"channel": "%s", "data": %s}}' % (channels["kafka"], TRICKY)
        producer = kafka.producer()
        producer.produce(topic, value=record.encode())
        assert producer.flush(30) == 0
        sub.wait_for_publications(len(paths), timeout=40)
        frames = sub.raw_publication_frames()
        for path, channel in channels.items():
            frame = next(f for f in frames if f'"channel":"{channel}"' in f)
            expected = TRICKY if path == "kafka" else exact
            assert '"data":' + expected in frame, f"{path}: {frame[:300]}"
        # The broadcast's failed channel is a dead letter holding the same data.
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters WHERE error_kind = 'centrifugo'") == 1,
                   10, what="the broadcast's dead letter")
        assert pg.scalar("SELECT payload->'data' = %s::jsonb FROM centrifugo_dead_letters WHERE error_kind = 'centrifugo'",
                         (TRICKY,))
        assert pg.scalar("SELECT payload->'channels' FROM centrifugo_dead_letters WHERE error_kind = 'centrifugo'") == ["nope:x"]
    finally:
        sub.stop()


# -- A command Centrifugo ran is not sent again ------------------------------------------------

def executing_double(fail_first, times):
    """A double that executes commands in arrival order (records them) and fails the command
    `fail_first(method, payload)` picks with code 100 `times` times."""
    double = FaultDouble().start()
    double.executed = []
    left = {"n": times}

    def script(request):
        replies = ok_replies(request)
        for k, c in enumerate(request["body"]["commands"]):
            (method, payload), = c.items()
            if left["n"] > 0 and fail_first(method, payload):
                left["n"] -= 1
                replies[k] = {"error": {"code": 100, "message": "internal server error"}}
            else:
                double.executed.append((method, json.dumps(payload, sort_keys=True)))
        return ("reply", 200, json.dumps({"replies": replies}).encode())

    double.script = script
    return double


def enqueue_non_idempotent(pg, channel):
    pg.sql(f"""SELECT centrifugo_subscribe('u1', '{channel}');
               SELECT centrifugo_publish('{channel}', '1');
               SELECT centrifugo_unsubscribe('u1', '{channel}');
               SELECT centrifugo_disconnect('u2');
               SELECT centrifugo_refresh('u3', expired => true);
               SELECT centrifugo_history_remove('{channel}');
               SELECT centrifugo_subscribe('u4', '{channel}');
               SELECT centrifugo_publish('{channel}', '2');""")


@pytest.mark.parametrize("strict", [False, True])
def test_commands_that_succeeded_are_never_run_again(make_cluster, strict):
    double = executing_double(lambda m, p: m == "disconnect", times=2)
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", partition_select_limit=10, strict_order=strict, **FAST_RETRY))
        wait_for_workers(pg)
        enqueue_non_idempotent(pg, "c")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the outbox to drain")
        methods = [m for m, _ in double.executed]
        assert len(double.executed) == 8 and len(set(double.executed)) == 8, f"each command ran once: {double.executed}"
        assert sorted(methods) == sorted(["subscribe", "publish", "unsubscribe", "disconnect", "refresh",
                                          "history_remove", "subscribe", "publish"])
        sent = [m for m, _ in double.commands()]
        assert sent.count("disconnect") == 3, "the failed command was retried until it succeeded"
        if strict:
            # One command per request: nothing after the failed one ran before it.
            assert all(len(r["body"]["commands"]) == 1 for r in double.requests)
            assert methods == ["subscribe", "publish", "unsubscribe", "disconnect", "refresh",
                               "history_remove", "subscribe", "publish"]
        else:
            # Batched: what came after the failed command ran once, in the first batch.
            assert methods[-1] == "disconnect"
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        double.stop()


def test_kafka_records_that_succeeded_behind_a_failing_one_are_never_run_again(make_cluster, kafka):
    from test_kafka import committed, produce
    fail = {"on": True}
    double = executing_double(lambda m, p: m == "disconnect" and fail["on"], times=10**6)
    topic, group = f"nr{uid()}", f"g{uid()}"
    kafka.create_topic(topic, partitions=1)
    methods = ["subscribe", "publish", "unsubscribe", "disconnect", "refresh", "history_remove", "subscribe", "publish"]
    payloads = {"subscribe": {"user": "u", "channel": "c"}, "publish": {"channel": "c", "data": 1},
                "unsubscribe": {"user": "u", "channel": "c"}, "disconnect": {"user": "u2"},
                "refresh": {"user": "u3", "expired": True}, "history_remove": {"channel": "c"}}
    try:
        make_cluster(delivery_settings(double.api_url, "k", kafka_brokers=kafka.bootstrap, kafka_topics=topic,
                                       kafka_consumer_group=group, kafka_max_poll_records=10, **FAST_RETRY))
        produce(kafka, topic, [({"method": m, "payload": {**payloads[m], "n": i}}, None, None) for i, m in enumerate(methods)])
        wait_until(lambda: len(double.executed) == 7, 30, what="every command but the failing one to run")
        time.sleep(1.5)  # the disconnect is retried meanwhile
        assert len(double.executed) == 7 and len(set(double.executed)) == 7, double.executed
        # The offset never moves past the record still waiting, though the ones behind it are done.
        assert committed(kafka, group, topic, 1) in ([3], [-1001]), "nothing past the undone record is committed"
        fail["on"] = False
        wait_until(lambda: committed(kafka, group, topic, 1) == [8], 20, what="the offset to move past every record")
        assert sorted(m for m, _ in double.executed) == sorted(methods)
        assert len(set(double.executed)) == 8 and len(double.executed) == 8, "each command ran exactly once"
        assert sum(1 for m, _ in double.commands() if m == "disconnect") >= 3, "the failing one was retried"
    finally:
        double.stop()


def test_a_user_is_not_disconnected_again_when_an_earlier_command_is_retried(make_cluster, centrifugo):
    double = FaultDouble(centrifugo.api_url).start()
    failed = {"done": False}

    def script(request):
        datas = [c.get("publish", {}).get("data") for c in request["body"]["commands"]]
        if not failed["done"] and 2 in datas:
            failed["done"] = True
            k = datas.index(2)

            def fail_one(reply):
                reply["replies"][k] = {"error": {"code": 100, "message": "internal server error"}}
                return reply
            return ("rewrite", fail_one)
        return ("forward",)

    double.script = script
    victim = f"victim{uid()}"
    channel = f"chat:victim{uid()}"
    sub = Subscriber(centrifugo, user=victim, channels=[channel]).start()
    try:
        # The resend comes after the victim has reconnected: a resent disconnect would hit it again.
        pg = make_cluster(delivery_settings(double.api_url, centrifugo.api_key, retry_backoff_base=3000,
                                            retry_backoff_max=3000))
        wait_for_workers(pg)
        pg.sql(f"""BEGIN;
                   SELECT centrifugo_publish('{channel}', '1');
                   SELECT centrifugo_publish('{channel}', '2');
                   SELECT centrifugo_disconnect('{victim}', code => 4001, reason => 'moved');
                   SELECT centrifugo_publish('{channel}', '3');
                   COMMIT;""")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 20, what="the outbox to drain")
        time.sleep(1)
        disconnects = [e for e in sub.of_kind("connecting") if (e.data or {}).get("code") == 4001]
        assert len(disconnects) == 1, sub.events
        assert [d for d in centrifugo.history(channel)] == [1, 2, 3], "the retried publish was not published twice"
        assert sum(1 for m, _ in double.commands() if m == "disconnect") == 1
    finally:
        sub.stop()
        double.stop()


# -- Idempotency keys ---------------------------------------------------------------------------

def test_a_reused_row_id_is_delivered_not_swallowed_by_the_idempotency_cache(outbox, centrifugo):
    pg = outbox()
    channel = f"chat:reuse{uid()}"
    first = pg.scalar("SELECT centrifugo_publish(%s, '\"before\"')", (channel,))
    wait_until(lambda: centrifugo.history(channel) == ["before"], 10, what="the first command")
    # The sequence goes back (a restore, a failover that lost its end, setval): the id is reused.
    pg.sql("SELECT setval('centrifugo_outbox_id_seq', %s, false)", (first,))
    again = pg.scalar("SELECT centrifugo_publish(%s, '\"after\"')", (channel,))
    assert again == first
    wait_until(lambda: centrifugo.history(channel) == ["before", "after"], 10, what="the command with the reused id")


# -- Found by the review of this change --------------------------------------------------------

def test_a_table_swapped_under_the_outbox_name_mid_round_is_drained_with_its_new_owners_rights(make_cluster, centrifugo):
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            outbox_table_name="box.outbox", partition_poll_interval=50))
    # A superuser's table in a schema the owner owns: the owner may drop it and make its own.
    as_role(pg, "app_owner", "CREATE SCHEMA box")
    pg.sql(f"CREATE TABLE box.outbox {OUTBOX_COLUMNS}", dbname="app")
    channel = f"chat:swap{uid()}"
    pg.sql(f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": 0}}')""", dbname="app")
    wait_until(lambda: centrifugo.history(channel) == [0], 10, what="the superuser's table to drain")
    # The swap stays uncommitted while the worker polls: its checks see the old table, and its
    # statements wait for the lock the DROP holds.
    as_role(pg, "app_owner", ["BEGIN", "DROP TABLE box.outbox", *trapped_outbox("box", "outbox"),
                              f"""INSERT INTO box.outbox (method, payload) VALUES ('publish', '{{"channel": "{channel}", "data": 1}}')""",
                              "SELECT pg_sleep(2)", "COMMIT"])
    wait_until(lambda: "was replaced while the worker checked it" in pg.log(), 10, what="the race to be run")
    # The owner's new table is drained with the owner's rights, never the superuser's.
    wait_until(lambda: centrifugo.history(channel) == [0, 1], 15, what="the new table to drain")
    assert_nothing_gained(pg, "box")
    assert pg.sql("SELECT DISTINCT who, superuser FROM box.fired", dbname="app") == [("app_owner", False)]


def test_a_schema_renamed_mid_round_puts_no_table_of_the_owners_under_the_workers_statements(make_cluster, centrifugo):
    # The extension lives in `public`, which the database owner owns (PostgreSQL 15's default):
    # renaming it takes no lock on the tables inside, and a kept statement is parsed again by name.
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key, partition_select_limit=1))
    # A superuser's slow delete trigger holds the worker mid-round while the owner swaps, then
    # reads a table it had not locked yet, which makes the backend take in the swap (any new lock
    # in the round does, a dead letter's for instance).
    pg.sql("""CREATE SCHEMA ops; CREATE TABLE ops.slow (n int); INSERT INTO ops.slow VALUES (1); CREATE TABLE ops.later (n int);
              CREATE FUNCTION ops.slow_once() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN IF EXISTS (SELECT FROM ops.slow) THEN
                        DELETE FROM ops.slow; PERFORM pg_catalog.pg_sleep(3); PERFORM FROM ops.later;
                    END IF;
                    RETURN OLD; END $$;
              CREATE TRIGGER slow BEFORE DELETE ON public.centrifugo_outbox FOR EACH ROW EXECUTE FUNCTION ops.slow_once()""",
           dbname="app")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
                                 "AND backend_type = 'centrifugo_outbox partition 0'") == 1, 20, what="the worker")
    time.sleep(0.5)
    channel = f"chat:ren{uid()}"
    as_role(pg, "app_user", ["BEGIN", *[f"SELECT centrifugo_publish('{channel}', '{i}')" for i in (1, 2, 3)], "COMMIT"])
    time.sleep(1)
    as_role(pg, "app_owner", ["BEGIN", "ALTER SCHEMA public RENAME TO real", "CREATE SCHEMA public",
                              *trapped_outbox("public", "centrifugo_outbox"),
                              # Rows at every id and tuple position the worker could ask for next.
                              f"""INSERT INTO public.centrifugo_outbox (method, payload)
                                  SELECT 'publish', '{{"channel": "{channel}", "data": 99}}' FROM generate_series(1, 50)""",
                              "COMMIT"])
    wait_until(lambda: pg.scalar("SELECT count(*) FROM real.centrifugo_outbox", dbname="app") == 0, 20,
               what="the real outbox to drain under its new schema name")
    time.sleep(1)
    assert_nothing_gained(pg, "public")
    assert pg.scalar("SELECT count(*) FROM public.fired", dbname="app") == 0, "the owner's table was never touched"
    assert centrifugo.history(channel) == [1, 2, 3]
    assert "was replaced (its schema renamed?)" in pg.log(), "the race was run"


def test_a_superuser_sessions_planned_insert_follows_the_extension_not_the_name(make_cluster, centrifugo):
    """The SQL API plans its INSERT once per session. After the database owner renames the
    extension's schema and puts a table of their own under the old name, the same superuser
    session still writes only the extension's outbox, under its new schema name."""
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key))
    channel = f"chat:plan{uid()}"
    with pg.connect(dbname="app") as superuser:
        superuser.execute("SELECT centrifugo_publish(%s, '1')", (channel,))   # plans and keeps the INSERT
        as_role(pg, "app_owner", ["BEGIN", "ALTER SCHEMA public RENAME TO real", "CREATE SCHEMA public",
                                  *trapped_outbox("public", "centrifugo_outbox"), "COMMIT"])
        # The functions moved with the schema.
        superuser.execute("SELECT real.centrifugo_publish(%s, '2')", (channel,))
        superuser.execute("SET ROLE app_user")
        superuser.execute("SELECT real.centrifugo_publish(%s, '3')", (channel,))
        superuser.execute("RESET ROLE")
        superuser.execute("SELECT real.centrifugo_publish(%s, '4')", (channel,))
    wait_until(lambda: centrifugo.history(channel) == [1, 2, 3, 4], 15, what="all four through the extension's outbox")
    assert_nothing_gained(pg, "public")
    assert pg.scalar("SELECT count(*) FROM public.fired", dbname="app") == 0, "the owner's table was never touched"
    assert pg.scalar("SELECT count(*) FROM public.centrifugo_outbox", dbname="app") == 0


def test_set_role_does_not_let_a_superusers_session_run_an_owners_code(make_cluster, centrifugo):
    """Found by review: a superuser's session that SET ROLE to an application role passed the
    owner check as that role, and the owner's trigger could RESET ROLE back to superuser."""
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            outbox_table_name="box.outbox"))
    as_role(pg, "app_owner", ["CREATE SCHEMA box", *trapped_outbox("box", "outbox"),
                              """CREATE FUNCTION box.on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                                 BEGIN
                                     RESET ROLE;
                                     INSERT INTO box.fired SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;
                                     BEGIN EXECUTE 'ALTER ROLE app_owner SUPERUSER';
                                     EXCEPTION WHEN insufficient_privilege THEN NULL; END;
                                     RETURN NEW;
                                 END $$""",
                              "CREATE TRIGGER i BEFORE INSERT ON box.outbox FOR EACH ROW EXECUTE FUNCTION box.on_insert()",
                              "GRANT USAGE ON SCHEMA box TO app_user", "GRANT INSERT, SELECT ON box.outbox TO app_user",
                              "GRANT USAGE ON SEQUENCE box.outbox_id_seq TO app_user"])
    with pg.connect(dbname="app") as superuser:
        superuser.execute("SET ROLE app_user")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="SET ROLE does not prevent that"):
            superuser.execute("SELECT centrifugo_publish('c', '1')")
    assert_nothing_gained(pg, "box")
    assert pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 0
    # Connected as the application role itself, the same call is the application's business.
    as_role(pg, "app_user", "SELECT centrifugo_publish('c', '1')")
    assert pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 1
    assert_nothing_gained(pg, "box")


def test_a_dead_letter_from_an_outbox_whose_ids_repeat(make_cluster, centrifugo):
    # A user's outbox keyed by (id, partition) after its sequence went back: two rows share an id.
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, outbox_table_name="shared_ids",
                                        num_partitions=2), create_extension=False)
    pg.sql("CREATE EXTENSION centrifugo_outbox")
    pg.sql("""CREATE TABLE shared_ids (id bigint NOT NULL, method text NOT NULL, payload jsonb NOT NULL,
                                        partition integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(),
                                        PRIMARY KEY (id, partition))""")
    pg.sql("""INSERT INTO shared_ids (id, method, payload, partition) VALUES (7, 'nope', '{}', 0), (7, 'nope', '{}', 1)""")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 2, 15, what="both dead letters")
    assert pg.scalar("SELECT count(*) FROM shared_ids") == 0
    assert pg.scalar("SELECT count(DISTINCT enqueued_at) FROM centrifugo_dead_letters") >= 1
    assert "more than one row returned" not in pg.log()


def test_superuser_sessions_do_not_touch_an_outbox_a_role_without_superuser_owns(make_cluster, centrifugo):
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            outbox_table_name="box.outbox"))
    as_role(pg, "app_owner", ["CREATE SCHEMA box", *trapped_outbox("box", "outbox"),
                              """CREATE FUNCTION box.on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                                 BEGIN INSERT INTO box.fired VALUES (current_user, current_setting('is_superuser')::bool);
                                       RETURN NEW; END $$""",
                              "CREATE TRIGGER i BEFORE INSERT ON box.outbox FOR EACH ROW EXECUTE FUNCTION box.on_insert()"])
    # A superuser publishing, replaying or reading the status would run the owner's code as superuser.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not a superuser"):
        pg.sql("SELECT centrifugo_publish('c', '1')", dbname="app")
    pg.sql("""INSERT INTO centrifugo_dead_letters (source, method, payload, error_kind, error_message)
              VALUES ('outbox', 'publish', '{"channel": "c", "data": 1}', 'http', 'x')""", dbname="app")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not a superuser"):
        pg.sql("SELECT centrifugo_replay_dead_letters()", dbname="app")
    assert pg.scalar("SELECT backlog FROM centrifugo_outbox_status", dbname="app") is None
    assert_nothing_gained(pg, "box")
    assert pg.scalar("SELECT count(*) FROM box.fired", dbname="app") == 0
    # The application itself (no superuser rights) publishes into its own table as before.
    pg.sql("GRANT USAGE ON SCHEMA box TO app_user; GRANT INSERT, SELECT ON box.outbox TO app_user;"
           "GRANT USAGE ON SEQUENCE box.outbox_id_seq TO app_user;"
           "GRANT INSERT ON box.fired TO app_user", dbname="app")
    as_role(pg, "app_user", "SELECT centrifugo_publish('c', '1')")
    assert pg.scalar("SELECT count(*) FROM box.outbox", dbname="app") == 1


def test_a_dead_letter_trigger_that_publishes_under_the_worker_role(make_cluster, centrifugo):
    # An alert published by a trigger on the dead-letter table, with the workers under a role
    # without superuser rights: the SQL API's INSERT runs inside the worker's dead-letter INSERT,
    # which is held to the dead-letter table, and must not inherit that pin (the round failed
    # and was retried forever, the dead letter never written).
    pg = owned_app_database(make_cluster, delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                                            worker_role="cfo_worker", retry_backoff_max=200))
    pg.sql(WORKER_ROLE_GRANTS + "GRANT centrifugo_publisher TO cfo_worker;", dbname="app")
    alerts = f"chat:alerts{uid()}"
    pg.sql(f"""CREATE FUNCTION public.alert() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   PERFORM public.centrifugo_publish('{alerts}', pg_catalog.jsonb_build_object('outbox_id', NEW.outbox_id));
                   RETURN NULL;
               END $$;
               CREATE TRIGGER alert AFTER INSERT ON centrifugo_dead_letters FOR EACH ROW EXECUTE FUNCTION public.alert()""",
           dbname="app")
    wait_until(lambda: pg.scalar("SELECT bool_and(state = 'idle') FROM centrifugo_outbox_status", dbname="app"), 20,
               what="the workers to connect as cfo_worker")
    bad = pg.scalar("INSERT INTO centrifugo_outbox (method, payload) VALUES ('nope', '{}') RETURNING id", dbname="app")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters", dbname="app") == 1, 15,
               what="the dead letter (and its trigger's publication) to be written")
    wait_until(lambda: centrifugo.history(alerts) == [{"outbox_id": bad}], 15, what="the alert to be delivered")
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox", dbname="app") == 0
