"""Robustness (issue 10): an ERROR inside a worker's round rolls the round back and the worker goes
on (same process, a visible reason, a rate-limited log line), without sending again what
Centrifugo already ran; Kafka records jsonb cannot hold are dead-lettered with their bytes and the
partition moves on; the Kafka bridge leaves when the postmaster dies."""

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
        assert pg.scalar("SELECT state FROM centrifugo_outbox_status") == "backing off"
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
