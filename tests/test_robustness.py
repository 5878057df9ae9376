"""Robustness (issue 10): an ERROR inside a worker's round rolls the round back and the worker goes
on (same process, a visible reason, a rate-limited log line), without sending again what
Centrifugo already ran; Kafka records jsonb cannot hold are dead-lettered with their bytes and the
partition moves on; the Kafka bridge leaves when the postmaster dies."""

import contextlib
import json
import os
import signal
import time
import uuid

import pytest

from conftest import delivery_settings, wait_for_workers
from harness.common import wait_until
from test_kafka import bridge_cluster, command, kafka_worker_pid, produce
from test_trust import FAST_RETRY, enqueue_non_idempotent, executing_double


def uid():
    return uuid.uuid4().hex[:8]


def process_alive(pid):
    """Whether `pid` runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return False


def partition_worker_pid(pg):
    return pg.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'centrifugo_outbox partition 0'")


# A delete trigger on the outbox that raises while the gate is closed (a maintenance freeze, a
# buggy audit trigger): every round fails after its commands were sent.
CLOSED_GATE = """
CREATE TABLE public.gate (open bool NOT NULL);
INSERT INTO public.gate VALUES (false);
CREATE FUNCTION public.guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT open FROM public.gate) THEN
        RAISE EXCEPTION 'outbox closed for maintenance';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER guard BEFORE DELETE ON centrifugo_outbox FOR EACH ROW EXECUTE FUNCTION public.guard();
"""


@pytest.mark.parametrize("limit", [2, 10])
def test_an_error_in_a_round_rolls_it_back_and_no_command_runs_twice(make_cluster, limit):
    # limit 2: the ERROR comes while the next batch is in flight; 10: after the only batch.
    double = executing_double(lambda m, p: False, times=0)
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", partition_select_limit=limit, **FAST_RETRY))
        wait_for_workers(pg)
        pid = partition_worker_pid(pg)
        pg.sql(CLOSED_GATE)
        enqueue_non_idempotent(pg, "c")
        wait_until(lambda: "outbox closed for maintenance" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status") or ""),
                   15, what="the status to show the ERROR")
        time.sleep(2)  # many rounds fail meanwhile (back-off at most 200 ms)
        # (A round in flight shows "sending" for a moment; between rounds it backs off.)
        wait_until(lambda: pg.scalar("SELECT state FROM centrifugo_outbox_status") == "backing off", 5,
                   what="the worker to back off")
        assert "P0001" in pg.scalar("SELECT last_error FROM centrifugo_outbox_status")
        assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 8, "every round was rolled back"
        assert partition_worker_pid(pg) == pid, "the worker survived every ERROR"
        # What was sent before the ERROR ran once, and is not sent again by the rounds after it
        # (batches of 2: the first two, the second in flight when the ERROR came; 10: all 8).
        ran = len(double.executed)
        assert ran == (4 if limit == 2 else 8), double.executed
        assert len(set(double.executed)) == ran and len(double.commands()) == ran, "nothing was sent twice"
        log = pg.log()
        assert "round rolled back by an error: outbox closed for maintenance" in log
        assert log.count("round rolled back by an error") <= 2, "one line per 10 s"
        assert "terminated by signal" not in log and "exited with exit code" not in log
        pg.sql("UPDATE public.gate SET open = true")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the outbox to drain")
        wait_until(lambda: pg.scalar("SELECT state FROM centrifugo_outbox_status") == "idle", 10, what="the worker to be idle")
        assert len(double.commands()) == 8 and len(set(double.executed)) == 8
        assert sorted(m for m, _ in double.executed) == sorted(
            ["subscribe", "publish", "unsubscribe", "disconnect", "refresh", "history_remove", "subscribe", "publish"])
        assert pg.scalar("SELECT sum(delivered) FROM centrifugo_outbox_status") == 8
        assert "working again after" in pg.log()
    finally:
        double.stop()


def test_a_round_that_cannot_delete_a_dead_letter_row_sends_nothing_after_it(make_cluster):
    # A malformed row first, then five good ones, batches of 2: the dead letter is settled before
    # sending, and its row must go before anything after it is sent. While DELETE raises, every
    # round fails at that delete and Centrifugo receives nothing.
    double = executing_double(lambda m, p: False, times=0)
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", partition_select_limit=2, **FAST_RETRY))
        wait_for_workers(pg)
        pg.sql(CLOSED_GATE)
        pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('no_such_method', '{}')")
        for i in range(5):
            pg.sql(f"SELECT centrifugo_publish('c', '{i}')")
        wait_until(lambda: "outbox closed for maintenance" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status") or ""),
                   15, what="the status to show the ERROR")
        time.sleep(1.5)  # many rounds fail meanwhile
        assert double.executed == [], "nothing after the dead letter was sent while its row stayed"
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0, "rolled back with the round"
        pg.sql("UPDATE public.gate SET open = true")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the outbox to drain")
        assert [json.loads(p)["data"] for m, p in double.executed] == [0, 1, 2, 3, 4]
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1
    finally:
        double.stop()


def test_kafka_records_jsonb_cannot_hold_are_dead_lettered_with_their_bytes(make_cluster, centrifugo, kafka):
    topic = f"nul{uid()}"
    kafka.create_topic(topic, partitions=1)
    channel = f"chat:nul{uid()}"
    binary = b"\x00\xff\xfe binary \x00"
    escaped_nul = b'{"method": "nope", "payload": {"channel": "c", "data": "\\u0000"}}'
    lone_surrogate = b'{"method": "nope", "payload": {"data": "\\ud800"}}'
    huge_number = b'{"method": "nope", "payload": {"data": 1e1000000}}'
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    produce(kafka, topic, [(binary, None, None), (escaped_nul, None, None), (lone_surrogate, None, None),
                           (huge_number, None, None), (command(channel, "after"), None, None)])
    wait_until(lambda: centrifugo.history(channel) == ["after"], 40, what="the record after them")
    rows = pg.sql("SELECT kafka_offset, payload IS NOT DISTINCT FROM 'null'::jsonb, raw_value "
                  "FROM centrifugo_dead_letters WHERE source = 'kafka' ORDER BY kafka_offset")
    assert [(o, bytes(raw)) for o, _, raw in rows] == [(0, binary), (1, escaped_nul), (2, lone_surrogate), (3, huge_number)]
    assert rows[0][1] and rows[1][1], "jsonb can hold neither a NUL byte nor a \\u0000 escape: JSON null"
    log = pg.log()
    assert "panicked" not in log and "exited with exit code" not in log, "the bridge never restarted"


def test_the_kafka_bridge_leaves_when_the_postmaster_dies(make_cluster, centrifugo, kafka):
    topic = f"pm{uid()}"
    kafka.create_topic(topic, partitions=1)
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    wait_until(lambda: kafka_worker_pid(pg) is not None, 20, what="the bridge")
    bridge = kafka_worker_pid(pg)
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGKILL)

    wait_until(lambda: not process_alive(bridge), 3, interval=0.1, what="the orphaned bridge to exit")
    # Nothing of the old cluster holds its shared memory: it starts again, bridge included.
    wait_until(lambda: pg.start(check=False).returncode == 0, 30, interval=1, what="PostgreSQL to start again")
    channel = f"chat:pm{uid()}"
    produce(kafka, topic, [(command(channel, 1), None, None)])
    wait_until(lambda: centrifugo.history(channel) == [1], 40, what="the bridge to deliver after the restart")


def test_a_worker_that_cannot_connect_is_never_shown_with_a_dead_pid(make_cluster, centrifugo):
    # The database does not exist: each attempt ends in FATAL, not in the worker's own exit path.
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, database="not_yet"))
    wait_until(lambda: "cannot connect" in (pg.scalar("SELECT last_error FROM centrifugo_outbox_status") or ""), 20,
               what="the status to say the worker cannot connect")
    for _ in range(20):
        pid, state = pg.sql("SELECT pid, state FROM centrifugo_outbox_status")[0]
        if pid is not None:
            assert process_alive(pid), f"a dead process shown as {state}: {pid}"
        assert state not in ("idle", "sending"), state
        time.sleep(0.25)


def test_a_partition_another_session_holds_shows_locked_and_by_whom(outbox, centrifugo):
    pg = outbox()
    channel = f"chat:lock{uid()}"
    with pg.connect() as holder:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        holder.execute("SELECT pg_advisory_lock(hashtext('centrifugo_partition_lock_centrifugo_outbox0'))")
        pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
        wait_until(lambda: pg.scalar("SELECT state FROM centrifugo_outbox_status") == "locked", 10, what="the locked state")
        assert f"pid {pid}" in pg.scalar("SELECT last_error FROM centrifugo_outbox_status")
        assert f"partition lock held by the session with pid {pid}" in pg.log()
        assert centrifugo.history(channel) == []
    wait_until(lambda: centrifugo.history(channel) == [1], 10, what="delivery once the lock is released")
    wait_until(lambda: pg.scalar("SELECT state FROM centrifugo_outbox_status") == "idle", 10, what="the idle state")


# -- Settings that would strand committed rows ---------------------------------------------------

def status_rows(pg):
    return pg.sql("SELECT consumer, partition, state, backlog, last_error FROM centrifugo_outbox_status ORDER BY consumer, partition")


def test_rows_left_in_partitions_beyond_a_lowered_num_partitions_are_reported(make_cluster):
    pg = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", num_partitions=4, retry_backoff_max=200))
    pg.sql("INSERT INTO centrifugo_outbox (method, payload, partition) "
           "SELECT 'publish', '{\"channel\": \"c\", \"data\": 1}', p FROM generate_series(0, 3) p, generate_series(1, 3)")
    pg.set(**{"centrifugo.num_partitions": 2})
    pg.restart()
    stranded = [r for r in status_rows(pg) if r[2] == "stranded"]
    assert [(r[1], r[3]) for r in stranded] == [(2, 3), (3, 3)]
    assert all("num_partitions = 2" in r[4] for r in stranded)
    wait_until(lambda: "6 row(s) of \"public\".\"centrifugo_outbox\" are in partitions 2..3" in pg.log(), 15,
               what="the warning at start")


def test_rows_with_a_null_partition_written_before_the_trigger_are_reported(make_cluster):
    # A table of one's own whose partition column allows NULL, filled before the wake trigger
    # was attached: no worker reads `partition = NULL`.
    pg = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", outbox_table_name="public.own_outbox",
                                        num_partitions=2, retry_backoff_max=200))
    pg.sql("CREATE TABLE public.own_outbox (id bigserial PRIMARY KEY, method text NOT NULL, payload jsonb NOT NULL, "
           "partition integer, created_at timestamptz NOT NULL DEFAULT now())")
    pg.sql("INSERT INTO public.own_outbox (method, payload, partition) "
           "SELECT 'publish', '{\"channel\": \"c\", \"data\": 1}', p FROM (VALUES (NULL::int), (NULL), (5)) v(p)")
    pg.restart()
    stranded = [r for r in status_rows(pg) if r[2] == "stranded"]
    assert [(r[1], r[3]) for r in stranded] == [(5, 1), (None, 2)], stranded
    assert "NULL partition" in stranded[1][4]
    wait_until(lambda: "2 row(s) of \"public\".\"own_outbox\" have a NULL partition" in pg.log(), 15,
               what="the warning at start")


def test_more_partitions_than_worker_slots_and_too_few_background_workers_are_reported(make_cluster):
    consumers = [{"name": "second", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://x@h/postgres", "outbox_table_name": "centrifugo_outbox", "num_partitions": 40}}]
    pg = make_cluster({**delivery_settings("http://127.0.0.1:9/api", "k", num_partitions=100, consumers=json.dumps(consumers)),
                       "max_worker_processes": 8})
    log = pg.log()
    assert "140 outbox partitions are configured in total, and at most 128 have a worker" in log
    assert "needs 128 background workers and max_worker_processes is 8" in log
    time.sleep(10)
    rows = status_rows(pg)
    assert [r[1] for r in rows if r[2] == "no worker"] == list(range(28, 40)), "second's last 12 partitions"
    assert any(r[0] == "(settings)" and "at most 128 have a worker" in r[4] for r in rows)
    not_started = [r for r in rows if r[2] == "not started"]
    assert len(not_started) >= 100 and "max_worker_processes is 8" in not_started[0][4]


def test_invalid_consumers_json_is_reported_and_the_default_consumer_runs(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, consumers='[{"name": "x", "type": "postgresql"'))
    wait_for_workers(pg)
    assert any(r[0] == "(settings)" and "centrifugo.consumers is invalid" in r[4] for r in status_rows(pg))
    assert "centrifugo.consumers is invalid" in pg.log()
    channel = f"chat:inv{uid()}"
    pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
    wait_until(lambda: centrifugo.history(channel) == [1], 10, what="the default consumer to deliver")


def test_consumer_name_reloaded_to_an_entrys_name_changes_no_slot(make_cluster, centrifugo):
    consumers = [{"name": "second", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://x@h/postgres", "outbox_table_name": "second_outbox", "num_partitions": 2}}]
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, consumers=json.dumps(consumers)))
    pg.sql("CREATE TABLE second_outbox (LIKE centrifugo_outbox INCLUDING ALL)")
    wait_for_workers(pg)
    pg.set(**{"centrifugo.consumer_name": "second"})
    pg.reload()
    time.sleep(0.5)
    pg.sql("SELECT centrifugo_restart_workers()")
    time.sleep(2)
    wait_for_workers(pg)
    assert [r[0] for r in status_rows(pg)] == ["centrifugo_outbox", "second", "second"], "the default keeps its name"
    channel = f"chat:ren{uid()}"
    pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
    wait_until(lambda: centrifugo.history(channel) == [1], 10, what="delivery after the reload")
    assert "panicked" not in pg.log()


# -- Bounded memory ------------------------------------------------------------------------------

def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def measured_worker(make_cluster, **settings):
    """A cluster delivering to a double that accepts everything, and `growth(done_sql, timeout,
    what)`: polls its partition worker's RssAnon until `done_sql` is true and returns the peak's
    growth in MiB over the worker at rest."""
    double = executing_double(lambda m, p: False, times=0)
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", **settings))
        wait_for_workers(pg)
        pid = partition_worker_pid(pg)
        baseline = rss_anon_kib(pid)
        yield pg, double, lambda done_sql, timeout, what: rss_growth_mib(pg, pid, baseline, done_sql, timeout, what)
    finally:
        double.stop()


def rss_growth_mib(pg, pid, baseline, done_sql, timeout, what):
    peak = baseline
    deadline = time.monotonic() + timeout
    with pg.connect() as conn:
        while not conn.execute(done_sql).fetchone()[0]:
            peak = max(peak, rss_anon_kib(pid))
            assert time.monotonic() < deadline, what
            time.sleep(0.01)
    growth_mib = (peak - baseline) / 1024
    print(f"worker RssAnon: baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    return growth_mib


def test_a_backlog_of_large_rows_drains_with_bounded_worker_memory(make_cluster):
    # 400 rows of 512 KiB (200 MiB of payload text) behind a limit of 10 000 rows per batch: only
    # the byte budget (4 MiB by default, the batch read ahead included) keeps the worker small.
    with measured_worker(make_cluster, partition_select_limit=10000, max_command_size=0) as (pg, double, growth):
        pg.sql("INSERT INTO centrifugo_outbox (method, payload) SELECT 'publish', "
               "jsonb_build_object('channel', 'big', 'data', repeat(chr(65 + g % 26), 512 * 1024)) FROM generate_series(1, 400) g")
        growth_mib = growth("SELECT count(*) = 0 FROM centrifugo_outbox", 120, "the backlog drained")
        assert len(double.executed) == 400
        assert growth_mib < 48, f"the worker grew by {growth_mib:.1f} MiB"


def test_small_rows_then_large_ones_in_one_fetch_keep_the_worker_small(make_cluster):
    # 48 small rows grow the fetch to 64 rows; the 64 rows of 8 MiB after them must not all be
    # made text at once (512 MiB): only what the byte budget lets into a batch is.
    with measured_worker(make_cluster, partition_select_limit=10000, max_command_size=0) as (pg, double, growth):
        with pg.connect() as conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO centrifugo_outbox (method, payload) SELECT 'publish', "
                         "jsonb_build_object('channel', 'small', 'data', g) FROM generate_series(1, 48) g")
            conn.execute("INSERT INTO centrifugo_outbox (method, payload) SELECT 'publish', "
                         "jsonb_build_object('channel', 'big', 'data', repeat(chr(65 + g % 26), 8 * 1024 * 1024)) "
                         "FROM generate_series(1, 64) g")
            conn.execute("COMMIT")
        growth_mib = growth("SELECT count(*) = 0 FROM centrifugo_outbox", 120, "the backlog drained")
        assert [json.loads(p)["channel"] for _, p in double.executed] == ["small"] * 48 + ["big"] * 64
        assert growth_mib < 160, f"the worker grew by {growth_mib:.1f} MiB"


def test_a_payload_postgresql_cannot_make_text_of_is_a_dead_letter_and_the_partition_moves_on(outbox, centrifugo):
    # 8,300 numbers of 131,072 digits each: 130 KiB of jsonb whose text would pass 1 GiB, which
    # PostgreSQL refuses ("out of memory", 54000). Written by a plain INSERT (centrifugo_publish()
    # refuses it at call time), it must not fail every round of the partition forever; with no
    # max_command_size, only its text's length says it cannot be sent.
    pg = outbox(max_command_size=0)
    channel = f"chat:huge{uid()}"
    huge = "(SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 8300))"
    pg.sql(f"INSERT INTO centrifugo_outbox (method, payload) VALUES "
           f"('publish', jsonb_build_object('channel', %s::text, 'data', {huge})), "
           f"('publish', jsonb_build_object('channel', %s::text, 'data', 'after'))", (channel, channel))
    wait_until(lambda: centrifugo.history(channel) == ["after"], 30, what="the command after the unreadable one")
    kind, reason, kept = pg.sql(f"SELECT error_kind, error_message, payload = jsonb_build_object('channel', %s::text, 'data', {huge}) "
                                "FROM centrifugo_dead_letters", (channel,))[0]
    assert kind == "malformed" and "cannot be made text: its text would pass 1 GB" in reason, reason
    assert kept, "the payload is kept whole in the dead letter"
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0


def test_a_small_jsonb_with_a_huge_text_is_a_dead_letter_at_little_cost(make_cluster):
    # 2,000 numbers of 131,072 digits: 32 KiB of jsonb, 262 MB of text. Under the default
    # max_command_size (1 MiB) its text is written no further than the limit.
    with measured_worker(make_cluster) as (pg, double, growth):
        pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES "
               "('publish', jsonb_build_object('channel', 'huge', 'data', "
               "(SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 2000))))")
        growth_mib = growth("SELECT count(*) > 0 FROM centrifugo_dead_letters", 30, "the dead letter")
        reason = pg.scalar("SELECT error_message FROM centrifugo_dead_letters")
        assert "exceeds centrifugo.max_command_size (1048576 bytes)" in reason, reason
        assert double.executed == []
        assert growth_mib < 64, f"the worker grew by {growth_mib:.1f} MiB"


# -- Found by the review of this change ------------------------------------------------------------

def test_a_partitioned_outbox_is_refused_and_loses_no_row(make_cluster):
    # Rows are deleted by ctid, which is unique only within one table: delivering p0's row at
    # (0,1) must not delete p1's row at (0,1).
    double = executing_double(lambda m, p: False, times=0)
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", outbox_table_name="parted", num_partitions=2))
        pg.sql("""CREATE TABLE parted (id bigserial, method text NOT NULL, payload jsonb NOT NULL,
                                       partition integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(),
                                       PRIMARY KEY (partition, id)) PARTITION BY LIST (partition);
                  CREATE TABLE parted_0 PARTITION OF parted FOR VALUES IN (0);
                  CREATE TABLE parted_1 PARTITION OF parted FOR VALUES IN (1);
                  INSERT INTO parted (method, payload, partition) VALUES
                      ('publish', '{"channel": "c", "data": 0}', 0), ('publish', '{"channel": "c", "data": 1}', 1)""")
        wait_until(lambda: all("is partitioned, which is not supported" in (e or "")
                               for e in [r[0] for r in pg.sql("SELECT last_error FROM centrifugo_outbox_status WHERE partition IS NOT NULL")]),
                   15, what="the status to say why")
        assert pg.scalar("SELECT count(*) FROM parted") == 2
        assert double.executed == []
    finally:
        double.stop()


def test_a_restart_cancels_an_owners_trigger_that_never_returns(make_cluster, centrifugo):
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key))
    wait_for_workers(pg)
    # It even catches a query cancel and goes on sleeping.
    pg.sql("""CREATE FUNCTION public.hang() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN IF EXISTS (SELECT FROM public.hold) THEN
                        LOOP BEGIN PERFORM pg_catalog.pg_sleep(3600); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP;
                    END IF;
                    RETURN OLD; END $$;
              CREATE TABLE public.hold (); INSERT INTO public.hold DEFAULT VALUES;
              CREATE TRIGGER hang BEFORE DELETE ON centrifugo_outbox FOR EACH ROW EXECUTE FUNCTION public.hang()""")
    channel = f"chat:hang{uid()}"
    pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
    wait_until(lambda: pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                                 "AND backend_type = 'centrifugo_outbox partition 0'") == 1, 10, what="the worker to hang")
    stuck = partition_worker_pid(pg)
    pg.sql("DELETE FROM public.hold")
    pg.sql("SELECT centrifugo_restart_workers()")
    wait_until(lambda: partition_worker_pid(pg) not in (None, stuck), 10, what="a new worker")
    # The round was rolled back, so the row is still there, and it is published once.
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the row to be delivered")
    assert centrifugo.history(channel) == [1]


def test_a_long_kafka_topic_name_keeps_one_status_row(make_cluster, centrifugo, kafka):
    topic = "t" + uid() + "x" * 200   # Kafka allows 249 characters; the status slot held 128
    kafka.create_topic(topic, partitions=1)
    channel = f"chat:long{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    produce(kafka, topic, [(command(channel, i), None, None) for i in range(5)])
    wait_until(lambda: centrifugo.history(channel) == list(range(5)), 40, what="delivery from the long topic")
    time.sleep(2.5)  # status updates every second
    rows = pg.sql("SELECT topic, delivered FROM centrifugo_kafka_status")
    assert rows == [(topic, 5)], rows


def test_a_restart_does_not_wait_for_a_slow_centrifugo(make_cluster):
    from harness.fault_double import FaultDouble, ok_replies
    double = FaultDouble().start()
    first = {"held": False}

    def script(request):
        reply = ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())
        if not first["held"]:
            first["held"] = True
            return ("delay", 30, reply)
        return reply

    double.script = script
    try:
        pg = make_cluster(delivery_settings(double.api_url, "k", http_timeout=60000))
        wait_for_workers(pg)
        pg.sql("SELECT centrifugo_publish('c', '1')")
        wait_until(lambda: first["held"], 10, what="the request Centrifugo sits on")
        stuck = partition_worker_pid(pg)
        started = time.monotonic()
        pg.sql("SELECT centrifugo_restart_workers()")
        wait_until(lambda: not process_alive(stuck), 5, interval=0.05, what="the worker to stop")
        assert time.monotonic() - started < 5, "it stopped waiting for the reply after its 3 s grace"
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the resend by the next worker")
    finally:
        double.stop()


def test_a_kafka_header_key_that_is_not_utf8_does_not_stop_the_bridge(make_cluster, centrifugo, kafka):
    from harness.kafka import produce_with_raw_header_keys
    topic = f"hdr{uid()}"
    kafka.create_topic(topic, partitions=1)
    channel = f"chat:hdr{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    wait_until(lambda: kafka_worker_pid(pg) is not None, 20, what="the bridge")
    bridge = kafka_worker_pid(pg)
    produce_with_raw_header_keys(kafka.bootstrap, topic, json.dumps(command(channel, 1)).encode(),
                                 [(b"\xff\xfe-trace", b"x"), (b"ok", b"\x00\x01")])
    produce(kafka, topic, [(command(channel, 2), None, None)])
    wait_until(lambda: centrifugo.history(channel) == [1, 2], 40, what="both records delivered")
    assert kafka_worker_pid(pg) == bridge, "the bridge never restarted"
    assert "panicked" not in pg.log()


def test_a_row_over_max_command_size_written_by_a_plain_insert_is_a_dead_letter(outbox, centrifugo):
    pg = outbox(max_command_size=65536)
    channel = f"chat:size{uid()}"
    pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES "
           "('publish', jsonb_build_object('channel', %s::text, 'data', repeat('x', 100000))), "
           "('publish', jsonb_build_object('channel', %s::text, 'data', 'small'))", (channel, channel))
    wait_until(lambda: centrifugo.history(channel) == ["small"], 10, what="the small command after the large one")
    reason = pg.scalar("SELECT error_message FROM centrifugo_dead_letters WHERE error_kind = 'malformed'")
    assert "exceeds centrifugo.max_command_size (65536 bytes)" in reason
    assert pg.scalar("SELECT length(payload->>'data') FROM centrifugo_dead_letters") == 100000, "kept whole"


def test_a_revoked_kafka_partition_is_not_sent_by_its_old_owner(make_cluster, centrifugo, kafka):
    import datetime
    from harness.fault_double import FaultDouble
    topic, group = f"rev{uid()}", f"g{uid()}"
    kafka.create_topic(topic, partitions=2)
    channel = f"chat:rev{uid()}"
    down = FaultDouble().start()   # the first cluster's Centrifugo is down: its records wait, queued
    down.script = lambda r: ("reply", 503, b"down")
    try:
        a = bridge_cluster(make_cluster, centrifugo, kafka, [topic], group=group, api_url=down.api_url)
        assigned = lambda pg: pg.scalar("SELECT count(*) FROM centrifugo_kafka_status WHERE assigned AND topic = %s", (topic,))
        wait_until(lambda: assigned(a) == 2, 30, what="the first cluster to own both partitions")
        produce(kafka, topic, [(command(channel, {"s": s}), None, s % 2) for s in range(40)])
        wait_until(lambda: {c[1]["data"]["s"] % 2 for c in down.commands()} == {0, 1}, 30, what="both partitions queued and retried")
        b = bridge_cluster(make_cluster, centrifugo, kafka, [topic], group=group)
        wait_until(lambda: assigned(b) == 1, 60, interval=0.2, what="the rebalance")
        moved = b.scalar("SELECT partition FROM centrifugo_kafka_status WHERE assigned AND topic = %s", (topic,))
        wait_until(lambda: sorted(d["s"] for d in centrifugo.history(channel)) == [s for s in range(40) if s % 2 == moved], 60,
                   what="the new owner to deliver the moved partition")
        line = next(l for l in a.log().splitlines() if f"{topic}[{moved}] revoked" in l)
        revoked_at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc).timestamp()
        time.sleep(2)
        stray = [c["publish"]["data"]["s"] for r in down.requests if r["at"] > revoked_at + 0.001
                 for c in r["body"]["commands"] if c["publish"]["data"]["s"] % 2 == moved]
        assert stray == [], f"the old owner sent records of a partition it no longer owns: {stray}"
        assert any(r["at"] > revoked_at for r in down.requests), "the old owner kept retrying its own partition"
    finally:
        down.stop()


def test_one_bad_consumers_entry_stops_only_itself_at_start_and_after_a_reload(make_cluster, centrifugo):
    table = ("CREATE TABLE {t} (id BIGSERIAL PRIMARY KEY, method text NOT NULL, payload JSONB NOT NULL, "
             "partition INTEGER NOT NULL default 0, created_at TIMESTAMPTZ NOT NULL DEFAULT now()); "
             "CREATE TRIGGER wake AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit()")
    entry = lambda name, **pg: {"name": name, "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://x@h/postgres", "partition_poll_interval": "100ms", **pg}}
    good_a, good_b = entry("box_a", outbox_table_name="box_a"), entry("box_b", outbox_table_name="box_b")
    broken = entry("broken", num_partitions=2)  # no outbox_table_name
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key,
                                        consumers=json.dumps([good_a, broken, good_b])))
    pg.sql(table.format(t="box_a") + "; " + table.format(t="box_b"))
    wait_for_workers(pg)
    rows = status_rows(pg)
    assert any(r[0] == "(settings)" and 'entry "broken" does not run' in r[4] and "outbox_table_name is required" in r[4]
               for r in rows), rows
    assert pg.log().count('centrifugo.consumers entry "broken" does not run') == 1
    channel = f"chat:bad{uid()}"
    publish = "INSERT INTO {t} (method, payload) VALUES ('publish', jsonb_build_object('channel', %s::text, 'data', %s::int))"
    pg.sql(publish.format(t="box_a"), (channel, 1))
    pg.sql(publish.format(t="box_b"), (channel, 2))
    wait_until(lambda: sorted(centrifugo.history(channel)) == [1, 2], 15, what="both good entries delivering")
    # A reload breaks box_a (its partition count becomes invalid); box_b drains on.
    pg.set(**{"centrifugo.consumers": json.dumps([entry("box_a", outbox_table_name="box_a", partition_select_limit=0),
                                                  broken, good_b])})
    pg.reload()
    wait_until(lambda: pg.scalar("SELECT last_error FROM centrifugo_outbox_status WHERE consumer = 'box_a'") and
               "partition_select_limit" in pg.scalar("SELECT last_error FROM centrifugo_outbox_status WHERE consumer = 'box_a'"),
               15, what="box_a's reason in its status row")
    pg.sql(publish.format(t="box_a"), (channel, 3))
    pg.sql(publish.format(t="box_b"), (channel, 4))
    wait_until(lambda: 4 in centrifugo.history(channel), 15, what="box_b still delivering")
    time.sleep(1)
    assert 3 not in centrifugo.history(channel), "the refused entry does not drain"
    assert pg.log().count("consumer box_a partition 0: not draining: postgresql consumer \"box_a\": partition_select_limit") == 1, \
        "one log line"
    # Mended by the next reload: the row waiting in box_a goes out.
    pg.set(**{"centrifugo.consumers": json.dumps([good_a, broken, good_b])})
    pg.reload()
    wait_until(lambda: 3 in centrifugo.history(channel), 15, what="box_a draining again")
