"""Faults, each followed by counting what arrived: Centrifugo down, a worker killed mid-batch,
PostgreSQL restarted, and a fault-injecting double for code 100, 5xx, slow replies, connection
resets, partial broadcast failures and final errors (dead letters that do not block the partition)."""

import json
import os
import signal
import threading
import time
import uuid

import pytest

from conftest import delivery_settings, wait_for_workers
from harness.centrifugo import Centrifugo
from harness.common import wait_until
from harness.fault_double import FaultDouble, RandomCode100, ok_replies, reorders_outside_first_batch
from harness.subscriber import Subscriber
from harness.grpc_double import GrpcFaultDouble

FAST_RETRY = {"retry_backoff_base": 10, "retry_backoff_max": 200, "http_timeout": 500, "http_connect_timeout": 300}


def uid():
    return uuid.uuid4().hex[:8]


def outbox_count(pg):
    return pg.scalar("SELECT count(*) FROM centrifugo_outbox")


def publish_many(pg, channel, n, start=0, partition=0):
    pg.sql("SELECT count(centrifugo_publish(%s, jsonb_build_object('i', g), partition => %s)) "
           "FROM generate_series(%s::int, %s::int) g", (channel, partition, start, start + n - 1))


@pytest.fixture
def double_cluster(make_cluster):
    """A cluster delivering to a fault double (answering by itself unless given an upstream), over
    HTTP or, with transport="grpc", over Centrifugo's gRPC API."""
    doubles = []

    def make(upstream=None, transport="http", **extra):
        if transport == "grpc":
            double = GrpcFaultDouble(upstream.endpoint("grpc") if upstream else None).start()
        else:
            double = FaultDouble(upstream.api_url if upstream else None).start()
        doubles.append(double)
        key = upstream.api_key if upstream else "double-key"
        pg = make_cluster(delivery_settings(double.api_url, key, **{**FAST_RETRY, **extra}))
        wait_for_workers(pg)
        return pg, double

    yield make
    for d in doubles:
        d.stop()


def test_centrifugo_down_for_8s_then_backlog_drains_in_order(make_cluster, transport):
    server = Centrifugo().start()
    try:
        pg = make_cluster(delivery_settings(server.endpoint(transport), server.api_key, retry_backoff_max=1000))
        wait_for_workers(pg)
        channel = f"chat:down{uid()}"
        publish_many(pg, channel, 50)
        wait_until(lambda: len(server.history(channel)) == 50, 10, what="the first 50")
        server.kill()
        publish_many(pg, channel, 200, start=50)
        time.sleep(8)
        assert outbox_count(pg) == 200, "commands must wait in the outbox while Centrifugo is down"
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        assert pg.scalar("SELECT sum(retries) FROM centrifugo_worker_status()") > 5
        server.start()
        publish_many(pg, channel, 10, start=250)
        wait_until(lambda: outbox_count(pg) == 0, 15, what="the backlog to drain")
        # A restarted Centrifugo (memory engine) starts with empty history: it holds what came after.
        assert [d["i"] for d in server.history(channel)] == list(range(50, 260))
        assert "retrying in" in pg.log() and server.api_key not in pg.log()
    finally:
        server.stop()


def voluntary_context_switches(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_a_worker_backing_off_is_not_woken_by_every_commit(make_cluster):
    """While a worker sleeps out its back-off, commits do not set its latch: each wake-up would
    cost it and the committing backend a context switch, for nothing (it reads everything
    committed once the back-off ends)."""
    pg = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", retry_backoff_base=20000,
                                        retry_backoff_max=60000))
    wait_for_workers(pg)
    pg.sql("SELECT centrifugo_publish('chat:x', '1')")
    wait_until(lambda: pg.scalar("SELECT state FROM centrifugo_outbox_status") == "backing off", 10,
               what="the worker to back off")
    pid = pg.scalar("SELECT pid FROM centrifugo_outbox_status")
    before = voluntary_context_switches(pid)
    with pg.connect() as conn:
        for i in range(500):
            conn.execute("SELECT centrifugo_publish('chat:x', %s::jsonb)", (str(i),))
    woken = voluntary_context_switches(pid) - before
    assert woken < 50, f"the backing-off worker was woken {woken} times by 500 commits"
    assert pg.scalar("SELECT state FROM centrifugo_outbox_status") == "backing off"
    assert outbox_count(pg) == 501


def test_worker_killed_mid_batch_loses_nothing_and_duplicates_are_suppressed(double_cluster, centrifugo, transport):
    pg, double = double_cluster(upstream=centrifugo, transport=transport, http_timeout=10000)
    channel = f"chat:kill{uid()}"
    held = {"first": True}

    def script(request):
        # Centrifugo executes the first batch, but its answer is held back until the worker is dead.
        if held["first"] and request["body"] and any(
                c.get("publish", {}).get("channel") == channel for c in request["body"]["commands"]):
            held["first"] = False
            return ("hold", 5)
        return ("forward",)

    double.script = script
    publish_many(pg, channel, 40)
    wait_until(lambda: len(centrifugo.history(channel)) == 40, 10, what="Centrifugo to run the first batch")
    pid = pg.scalar("SELECT pid FROM centrifugo_worker_status() WHERE partition = 0")
    os.kill(pid, signal.SIGKILL)  # the postmaster restarts every backend (crash recovery)
    wait_until(lambda: outbox_count(pg) == 0, 30, interval=0.2, what="the resend after the crash")
    sent = [p["idempotency_key"] for m, p in double.commands() if p.get("channel") == channel]
    assert len(sent) == 80, "every command was sent twice: once before the kill, once after"
    assert len(set(sent)) == 40
    assert [d["i"] for d in centrifugo.history(channel)] == list(range(40)), "no duplicates, no gaps, in order"


def test_worker_killed_in_the_middle_of_a_multi_batch_round_loses_nothing(double_cluster, centrifugo):
    # Batches of 10: the first three are delivered, the fourth is held in flight (the next one
    # already read, nothing committed yet), and then the worker dies.
    pg, double = double_cluster(upstream=centrifugo, http_timeout=10000, partition_select_limit=10)
    channel = f"chat:killround{uid()}"
    seen = {"batches": 0}

    def script(request):
        if request["body"] and any(c.get("publish", {}).get("channel") == channel for c in request["body"]["commands"]):
            seen["batches"] += 1
            if seen["batches"] == 4:
                return ("hold", 5)
        return ("forward",)

    double.script = script
    publish_many(pg, channel, 100)
    wait_until(lambda: len(centrifugo.history(channel)) == 40, 10, what="Centrifugo to run four batches")
    pid = pg.scalar("SELECT pid FROM centrifugo_worker_status() WHERE partition = 0")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: outbox_count(pg) == 0, 30, interval=0.2, what="the resend after the crash")
    sent = [p["idempotency_key"] for m, p in double.commands() if p.get("channel") == channel]
    assert len(set(sent)) == 100
    assert len(sent) >= 110, "at least the batch in flight was sent again"
    assert [d["i"] for d in centrifugo.history(channel)] == list(range(100)), "no duplicates, no gaps, in order"


def executed_by(double):
    """Makes `double` answer success and record, in order, the commands it ran (data["i"])."""
    double.executed = []

    def run(request):
        for c in request["body"]["commands"]:
            (method, payload), = c.items()
            double.executed.append(payload["data"]["i"])
        return ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())
    return run


def test_postgres_restart_keeps_the_backlog(double_cluster):
    pg, double = double_cluster()
    double.script = lambda r: ("reply", 503, b"unavailable")
    publish_many(pg, f"r{uid()}", 30)
    time.sleep(1)
    assert outbox_count(pg) == 30
    pg.restart()
    double.script = executed_by(double)
    wait_until(lambda: outbox_count(pg) == 0, 20, what="delivery after the restart")
    assert double.executed == list(range(30)), "each command ran once, in order"
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0


def test_a_command_failing_again_is_resent_alone_so_only_its_own_first_batch_ever_overtakes_it(make_cluster, centrifugo):
    # Issue 22: Centrifugo runs a whole batch, so the commands after one that fails temporarily
    # have run: that much reordering is unavoidable. Before the fix the failed command was resent
    # at the head of a full batch of newer rows, which overtook it too when it failed again.
    writers, partitions, per_writer = 4, 4, 240
    channels = [f"chat:resend{p}-{uid()}" for p in range(partitions)]
    script = RandomCode100(key=lambda payload: (payload["channel"], payload["data"]["w"], payload["data"]["s"]))
    double = FaultDouble(centrifugo.api_url).start()
    double.script = script
    pg = make_cluster(delivery_settings(double.api_url, centrifugo.api_key, num_partitions=partitions,
                                        partition_select_limit=40, retry_backoff_base=5, retry_backoff_max=40))
    sub = Subscriber(centrifugo, channels=channels).start()
    errors = []

    def write(w):
        try:
            with pg.connect() as conn:
                for s in range(per_writer):
                    p = (w + s) % partitions
                    conn.execute("SELECT centrifugo_publish(%s, jsonb_build_object('w', %s::int, 's', %s::int), partition => %s)",
                                 (channels[p], w, s, p))
                    if s % 40 == 0:
                        time.sleep(0.05)
        except Exception as e:  # surfaced below
            errors.append(e)

    try:
        wait_for_workers(pg)
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        # A worker terminated mid-way resumes the resend it was in (its slot outlives it).
        time.sleep(1)
        assert pg.scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE backend_type = 'centrifugo_outbox partition 1'")
        for t in threads:
            t.join()
        assert not errors, errors
        total = writers * per_writer
        wait_until(lambda: sum(len(sub.publications(c)) for c in channels) >= total, 120,
                   what=f"{total} publications")
        script.on = False
        assert script.failed > 100, f"only {script.failed} failures injected: the test would prove little"
        outside = []
        for channel in channels:
            got = [(channel, e.data["w"], e.data["s"]) for e in sub.publications(channel)]
            assert len(got) == len(set(got)), f"{channel}: duplicates"
            for w in range(writers):
                mine = [k for k in got if k[1] == w]
                outside += reorders_outside_first_batch(mine, script.first_batch)
        assert not outside, (f"{len(outside)} reorders beyond the failed command's first batch, e.g. "
                             f"{outside[:5]}")
        assert sum(len(sub.publications(c)) for c in channels) == total
        # The last rows are deleted once their round commits, just after their replies.
        wait_until(lambda: outbox_count(pg) == 0, 10, what="the last rows deleted")
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        # Drained: every partition batches again, and says so.
        assert pg.sql("SELECT partition, batch_limit FROM centrifugo_outbox_status WHERE batch_limit IS NOT NULL") == []
    finally:
        sub.stop()
        double.stop()


def test_a_batch_that_keeps_timing_out_is_halved_down_to_one_command(double_cluster):
    # Issue 22: a batch that times out was resent at the same size forever.
    pg, double = double_cluster(partition_select_limit=16, http_timeout=300)
    sizes = []

    def script(request):
        commands = request["body"]["commands"]
        if commands:
            sizes.append(len(commands))
        # Centrifugo too slow for any batch of more than one command.
        if len(commands) > 1:
            return ("delay", 1.0, ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode()))
        return ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())

    double.script = script
    publish_many(pg, "c", 16)
    wait_until(lambda: pg.scalar("SELECT batch_limit FROM centrifugo_outbox_status WHERE partition = 0") == 1, 20,
               what="the batch halved down to one command, in the status view")
    wait_until(lambda: outbox_count(pg) == 0, 20, what="delivery one command at a time")
    assert sizes[:5] == [16, 8, 4, 2, 1], sizes
    assert "timeout" in pg.scalar("SELECT last_error FROM centrifugo_outbox_status WHERE partition = 0")
    # Answered batches grow back towards the configured limit.
    publish_many(pg, "c", 40, start=16)
    wait_until(lambda: outbox_count(pg) == 0, 30, what="the rest")
    assert max(sizes[5:]) > 1, sizes


@pytest.mark.parametrize("fault", ["code100", "http500", "slow", "reset"])
def test_temporary_faults_are_retried_in_order(double_cluster, fault, transport):
    pg, double = double_cluster(transport=transport, partition_select_limit=5)
    failures = {"left": 3}
    # What the double ran, in order, as Centrifugo would: every command of a batch it answers,
    # except one it fails with code 100 (a slow reply ran too: the worker just stopped waiting).
    executed = []

    def run(cmds, failed=None):
        executed.extend(c["publish"]["data"]["i"] for c in cmds if c["publish"]["data"]["i"] != failed)

    def script(request):
        cmds = request["body"]["commands"]
        if failures["left"] > 0 and any(c["publish"]["data"]["i"] == 7 for c in cmds):
            failures["left"] -= 1
            if fault == "code100":
                run(cmds, failed=7)
                replies = ok_replies(request)
                k = [c["publish"]["data"]["i"] for c in cmds].index(7)
                replies[k] = {"error": {"code": 100, "message": "internal server error"}}
                return ("reply", 200, json.dumps({"replies": replies}).encode())
            if fault == "http500":
                return ("reply", 500, b"internal")
            if fault == "slow":
                run(cmds)
                return ("delay", 1.5, ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode()))
            return ("reset",)
        run(cmds)
        return ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())

    double.script = script
    publish_many(pg, "c", 20)
    wait_until(lambda: outbox_count(pg) == 0, 20, what="delivery after the faults")
    seen = [p["data"]["i"] for m, p in double.commands()]
    # First sight of each command is in order, everything got through, and retries resent the
    # failed command before anything after it was considered done.
    first_sight = list(dict.fromkeys(seen))
    assert first_sight == list(range(20))
    assert seen.count(7) == 4, seen
    last_try_of_7 = len(seen) - 1 - seen[::-1].index(7)
    assert all(i > 7 for i in seen[last_try_of_7 + 1:]), "after the retry, only later commands follow"
    # The worker reads the next batch (10..14) while 5..9 is in flight; once 7 failed, that
    # prefetched batch must be dropped: the resend starts at 7.
    first_resend_of_7 = seen.index(7, seen.index(7) + 1)
    assert max(seen[:first_resend_of_7]) <= 9, seen
    # The effects: everything ran; nothing ran twice except what a timed-out (slow) batch ran
    # before the worker gave up on its reply, and the retried 7 ran after the rest of its batch.
    assert sorted(set(executed)) == list(range(20))
    if fault == "slow":
        assert all(executed.count(i) <= 4 for i in range(20))
    else:
        assert len(executed) == 20, f"each command ran once: {executed}"
        assert executed.index(7) < executed.index(10) if fault != "code100" else executed.index(7) > executed.index(9)
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    assert pg.scalar("SELECT retries FROM centrifugo_worker_status() WHERE partition = 0") >= 3


def test_broadcast_with_one_internal_error_is_retried_whole(double_cluster, transport):
    pg, double = double_cluster(transport=transport)
    attempts = {"n": 0}

    def script(request):
        replies = ok_replies(request)
        for k, c in enumerate(request["body"]["commands"]):
            if "broadcast" in c:
                attempts["n"] += 1
                if attempts["n"] == 1:
                    replies[k] = {"broadcast": {"responses": [
                        {"result": {}}, {"error": {"code": 100, "message": "internal"}}, {"result": {}}]}}
        return ("reply", 200, json.dumps({"replies": replies}).encode())

    double.script = script
    pg.sql("SELECT centrifugo_broadcast(ARRAY['a', 'b', 'c'], '1')")
    wait_until(lambda: outbox_count(pg) == 0, 10, what="the broadcast")
    broadcasts = [p for m, p in double.commands() if m == "broadcast"]
    assert len(broadcasts) == 2 and broadcasts[0] == broadcasts[1], "the same broadcast, same idempotency key"
    assert broadcasts[0]["channels"] == ["a", "b", "c"]


def test_final_errors_become_dead_letters_and_do_not_block_the_partition(double_cluster, transport):
    pg, double = double_cluster(transport=transport)

    def script(request):
        replies = ok_replies(request)
        for k, c in enumerate(request["body"]["commands"]):
            (m, p), = c.items()
            if m == "publish" and p["channel"] == "nope:x":
                replies[k] = {"error": {"code": 102, "message": "unknown channel"}}
            if m == "broadcast":
                replies[k] = {"broadcast": {"responses": [
                    {"result": {}}, {"error": {"code": 103, "message": "permission denied"}}]}}
        return ("reply", 200, json.dumps({"replies": replies}).encode())

    double.script = script
    pg.sql("SELECT centrifugo_publish('ok', '1')")
    first_bad = pg.scalar("SELECT centrifugo_publish('nope:x', '{\"lost\": false}')")
    pg.sql("SELECT centrifugo_broadcast(ARRAY['fine', 'forbidden'], '2')")
    pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('no_such_method', '{}'), ('publish', '[1, 2]')")
    pg.sql("SELECT centrifugo_publish('ok', '3')")
    wait_until(lambda: outbox_count(pg) == 0, 10, what="the partition to drain past the bad commands")
    rows = pg.sql("SELECT outbox_id, method, payload, error_kind, error_code, error_message, attempts "
                  "FROM centrifugo_dead_letters ORDER BY id")
    assert [(r[1], r[3], r[4]) for r in rows] == [
        ("publish", "centrifugo", 102), ("broadcast", "centrifugo", 103),
        ("no_such_method", "malformed", None), ("publish", "malformed", None)]
    assert rows[0][0] == first_bad and rows[0][2]["channel"] == "nope:x" and rows[0][2]["data"] == {"lost": False}
    assert rows[1][2]["channels"] == ["forbidden"], "only the failed channel is kept"
    assert "1 of 2 channels" in rows[1][5]
    assert [p["data"] for m, p in double.commands() if m == "publish" and p["channel"] == "ok"] == [1, 3]
    assert pg.scalar("SELECT dead_lettered FROM centrifugo_worker_status() WHERE partition = 0") == 4

    # Once the cause is fixed, a replay puts them back in the outbox, in order.
    double.script = lambda r: ("reply", 200, json.dumps({"replies": ok_replies(r)}).encode())
    assert pg.scalar("SELECT centrifugo_replay_dead_letters(error_code => 102)") == 1
    wait_until(lambda: outbox_count(pg) == 0, 10, what="the replay")
    assert [p["data"] for m, p in double.commands() if p.get("channel") == "nope:x"] == [{"lost": False}] * 2
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 3


def test_unauthorized_is_retried_not_dead_lettered(double_cluster, transport):
    pg, double = double_cluster(transport=transport)
    double.script = lambda r: ("reply", 401, b"")
    publish_many(pg, "c", 3)
    time.sleep(1.5)
    assert outbox_count(pg) == 3 and pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    assert "check centrifugo.api_key" in pg.log()
    assert all(r["key"] == "double-key" for r in double.requests)
    assert "double-key" not in pg.log()


def test_a_writers_transaction_that_commits_while_a_round_reads_ahead_keeps_its_order(double_cluster, transport):
    """Writer A's first transaction (low id) is still open when the worker reads a batch; it
    commits while that batch is in flight, and A's next transaction (higher id) commits right
    after. A read ahead in the same round sees both, but must not send A's second command before
    its first: Centrifugo's consumer, which reads from the partition's start every time, never does."""
    pg, double = double_cluster(transport=transport, partition_select_limit=10)
    channel = f"chat:gap{uid()}"
    in_flight = threading.Event()

    def script(request):
        commands = request["body"]["commands"]
        if not in_flight.is_set() and any(c.get("publish", {}).get("data") == {"f": 1} for c in commands):
            in_flight.set()
            # Within the round's 50 ms, long enough for writer A's two commits.
            return ("delay", 0.03, ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode()))
        return ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())

    double.script = script
    with pg.connect(autocommit=False) as writer_a:
        writer_a.execute("SELECT centrifugo_publish(%s, '{\"a\": 0}', partition => 0)", (channel,))
        # Twenty rows after A's open one: the first batch is in flight, the second read ahead.
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('f', g), partition => 0) "
               "FROM generate_series(1, 20) g", (channel,))
        assert in_flight.wait(10), "the first batch never came"
        writer_a.commit()
        writer_a.execute("SELECT centrifugo_publish(%s, '{\"a\": 1}', partition => 0)", (channel,))
        writer_a.commit()
    wait_until(lambda: outbox_count(pg) == 0, 10,
               what="an empty outbox")
    sent = [payload["data"] for method, payload in double.commands() if payload.get("channel") == channel]
    a = [d["a"] for d in sent if "a" in d]
    assert a == [0, 1], f"writer A's commands were sent as {a}: {sent}"


def test_the_largest_id_there_can_be_is_sent_once(double_cluster):
    # After a full batch the worker reads on from the last id + 1; at the bigint maximum that
    # stayed the same id (saturated), so the row still on its way was read and sent again.
    pg, double = double_cluster(partition_select_limit=1)
    double.script = lambda request: ("reply", 200, json.dumps({"replies": ok_replies(request)}).encode())
    pg.sql("SELECT setval('centrifugo_outbox_id_seq', 9223372036854775806)")
    pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('disconnect', '{\"user\": \"u-max\"}')")
    wait_until(lambda: outbox_count(pg) == 0, 10, what="the last row to drain")
    time.sleep(0.5)
    assert [p["user"] for m, p in double.commands() if m == "disconnect"] == ["u-max"]
