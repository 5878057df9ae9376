"""Centrifugo clusters: two real Centrifugo nodes sharing a real Redis broker (PUB/SUB, history,
presence and the idempotency cache in Redis), subscribers on both, and `centrifugo.api_url`
listing both nodes. The workers use one node at a time, move to the other when it dies, and come
back when it answers again; nothing is lost and nothing reaches a channel twice."""

import json
import threading
import time
import uuid

import pytest

from conftest import delivery_settings, wait_for_workers
from harness.centrifugo import Centrifugo
from harness.common import wait_until
from harness.fault_double import FaultDouble
from harness.redis import Redis
from harness.subscriber import Subscriber


def uid():
    return uuid.uuid4().hex[:8]


@pytest.fixture
def redis():
    server = Redis().start()
    yield server
    server.stop()


@pytest.fixture
def nodes(redis):
    """Nodes A and B of one cluster (same API key, token secret and Redis prefix)."""
    key, secret, prefix = f"cluster-key-{uid()}", uuid.uuid4().hex, f"c{uid()}"
    made = [Centrifugo.cluster_node(redis, key, secret, prefix).start() for _ in range(2)]
    yield made
    for node in made:
        node.stop()


def cluster_settings(urls, key, **extra):
    return delivery_settings(",".join(urls), key, retry_backoff_max=300, **extra)


def endpoints(pg):
    return pg.sql("SELECT partition, endpoint, endpoint_failures FROM centrifugo_outbox_status ORDER BY partition")


def test_commands_sent_through_one_node_reach_subscribers_on_both(make_cluster, nodes, transport):
    a, b = nodes
    pg = make_cluster(cluster_settings([a.endpoint(transport), b.endpoint(transport)], a.api_key, num_partitions=2))
    wait_for_workers(pg)
    channels = [f"chat:both{uid()}", f"chat:both{uid()}"]
    on_a, on_b = Subscriber(a, channels=channels).start(), Subscriber(b, channels=channels).start()
    try:
        for p, channel in enumerate(channels):
            pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g), partition => %s) FROM generate_series(1, 50) g", (channel, p))
        for sub in (on_a, on_b):
            for channel in channels:
                assert [x.data for x in sub.wait_for_publications(50, channel)] == list(range(1, 51))
        # Every command went through A, the preferred node; B only relayed them to its clients.
        assert a.api_commands() == 100 and b.api_commands() == 0
        for partition, endpoint, failures in endpoints(pg):
            assert endpoint == a.endpoint(transport), partition
            assert failures == {a.endpoint(transport): 0, b.endpoint(transport): 0}
    finally:
        on_a.stop()
        on_b.stop()


def test_a_node_killed_mid_backlog_fails_over_with_nothing_lost_or_published_twice(make_cluster, nodes, transport):
    a, b = nodes
    partitions = 4
    pg = make_cluster(cluster_settings([a.endpoint(transport), b.endpoint(transport)], a.api_key, num_partitions=partitions,
                                       request_timeout=2000))
    wait_for_workers(pg)
    channels = [f"chat:fo{uid()}" for _ in range(partitions)]
    per_channel = 3000
    sub = Subscriber(b, channels=channels).start()
    try:
        # Writers keep adding while A dies: 20 commands per channel and transaction.
        failed = []
        def write():
          try:
            with pg.connect() as conn:
                for start in range(1, per_channel + 1, 20):
                    for p, channel in enumerate(channels):
                        conn.execute("SELECT centrifugo_publish(%s, to_jsonb(g), partition => %s) "
                                     "FROM generate_series(%s::int, %s::int) g", (channel, p, start, start + 19))
                    time.sleep(0.005)
          except Exception as e:
            failed.append(e)
            raise
        writer = threading.Thread(target=write)
        writer.start()
        wait_until(lambda: len(sub.publications()) >= partitions * per_channel // 4, 60, what="a quarter delivered")
        a.kill()
        killed_at = time.monotonic()
        writer.join()
        assert not failed
        for channel in channels:
            got = [x.data for x in sub.wait_for_publications(per_channel, channel, timeout=60)]
            assert got == list(range(1, per_channel + 1)), f"{channel}: order, loss or duplicates"
        time.sleep(0.5)
        assert len(sub.publications()) == partitions * per_channel, "a publication reached the subscriber twice"
        # The channel history (in Redis, shared by the nodes) holds each command once, in order.
        for channel in channels:
            assert b.history(channel) == list(range(1, per_channel + 1))
        assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        # Every worker now sends to B; A's failures were counted by the workers that met them
        # (the others took their word through the shared node board).
        rows = endpoints(pg)
        for partition, endpoint, failures in rows:
            assert endpoint == b.endpoint(transport), partition
            assert failures[b.endpoint(transport)] == 0, (partition, failures)
        assert sum(failures[a.endpoint(transport)] for _, _, failures in rows) >= 1, rows
        assert f"failed (" in pg.log() and f"sending to {b.endpoint(transport)} from now on" in pg.log()
        # How long delivery paused: the widest gap between publications after the kill.
        after = sorted(e.at for e in sub.publications() if e.at >= killed_at - 1)
        gap = max((y - x for x, y in zip(after, after[1:])), default=0)
        print(f"\nfailover: widest gap between publications around the kill {gap * 1000:.1f} ms")
    finally:
        sub.stop()


def test_a_batch_the_dying_node_ran_is_not_published_again_by_the_next(make_cluster, nodes):
    """A node that ran a batch and died before answering: the worker sends the batch to the next
    node, whose idempotency cache (in the shared Redis) knows every key, so the channel gets each
    publication once although both nodes ran every command."""
    a, b = nodes
    dying = FaultDouble(a.api_url).start()
    batches = []
    # The first batch reaches A, which runs it; its answer is lost. Then A is gone for good.
    def script(request):
        commands = (request["body"] or {}).get("commands")
        if not commands:
            return ("reset",)
        batches.append(len(commands))
        return ("forward_then_reset",) if len(batches) == 1 else ("reset",)
    dying.script = script
    try:
        pg = make_cluster(cluster_settings([dying.api_url, b.api_url], a.api_key))
        wait_for_workers(pg)
        channel = f"chat:idem{uid()}"
        sub = Subscriber(b, channels=[channel]).start()
        try:
            pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 10) g", (channel,))
            assert [x.data for x in sub.wait_for_publications(10, channel)] == list(range(1, 11))
            time.sleep(0.5)
            assert len(sub.publications(channel)) == 10
            assert b.history(channel) == list(range(1, 11))
            # Both nodes ran all ten commands: A before dying, B when the worker sent them again.
            assert batches[0] == 10
            assert a.api_commands() == 10 and b.api_commands() == 10
            assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0
        finally:
            sub.stop()
    finally:
        dying.stop()


def test_a_frozen_node_found_by_one_worker_is_skipped_by_every_worker(make_cluster, nodes):
    # Issue 22: each worker learnt of a frozen node by itself, a whole http_timeout each, so the
    # partitions that had rows after the freeze each waited one timeout in turn.
    import os
    import signal
    a, b = nodes
    partitions, timeout_ms = 8, 2000
    settings = cluster_settings([a.api_url, b.api_url], a.api_key, num_partitions=partitions, http_timeout=timeout_ms)
    pg = make_cluster({**settings, "max_worker_processes": 16})
    wait_for_workers(pg)
    channels = [f"chat:frozen{p}-{uid()}" for p in range(partitions)]
    sub = Subscriber(b, channels=channels).start()
    try:
        for p in range(partitions):
            pg.sql("SELECT centrifugo_publish(%s, '0', partition => %s)", (channels[p], p))
        for p in range(partitions):
            sub.wait_for_publications(1, channels[p])
        assert all(endpoint == a.api_url for _, endpoint, _ in endpoints(pg))
        os.kill(a.proc.pid, signal.SIGSTOP)
        # One partition after the other gets a row, each once the one before was delivered.
        delays = []
        for p in range(partitions):
            start = time.monotonic()
            pg.sql("SELECT centrifugo_publish(%s, '1', partition => %s)", (channels[p], p))
            sub.wait_for_publications(2, channels[p], timeout=30)
            delays.append(time.monotonic() - start)
        print(f"\nfrozen node: delivery delay per partition in turn (s): {[round(d, 3) for d in delays]}")
        # The first pays about one timeout (then its back-off); every other partition's worker
        # already knows, and sends straight to B.
        assert delays[0] < 2 * timeout_ms / 1000, delays
        assert all(d < timeout_ms / 2000 for d in delays[1:]), delays
        failures_at_a = [failures[a.api_url] for _, _, failures in endpoints(pg)]
        assert sum(failures_at_a) == 1, f"one worker found A frozen, the others took its word: {failures_at_a}"
        assert all(endpoint == b.api_url for _, endpoint, _ in endpoints(pg))
        assert "another worker found" in pg.log()
        # A thaws: once one probe finds it answering, every worker goes back to it.
        os.kill(a.proc.pid, signal.SIGCONT)
        n = 1

        def all_back():
            nonlocal n
            n += 1
            pg.sql("SELECT centrifugo_publish(%s, to_jsonb(%s::int), partition => 0)", (channels[0], n))
            return all(endpoint == a.api_url for _, endpoint, _ in endpoints(pg)[:1])
        wait_until(all_back, 20, interval=0.2, what="partition 0's worker back on A")
        for p in range(1, partitions):
            pg.sql("SELECT centrifugo_publish(%s, '2', partition => %s)", (channels[p], p))
            sub.wait_for_publications(3, channels[p])
        assert all(endpoint == a.api_url for _, endpoint, _ in endpoints(pg)), endpoints(pg)
        for p in range(1, partitions):
            assert [x.data for x in sub.publications(channels[p])] == [0, 1, 2]
    finally:
        if a.proc is not None:
            os.kill(a.proc.pid, signal.SIGCONT)
        sub.stop()


def test_traffic_returns_to_the_preferred_node_once_it_answers_again(make_cluster, nodes, transport):
    a, b = nodes
    pg = make_cluster(cluster_settings([a.endpoint(transport), b.endpoint(transport)], a.api_key))
    wait_for_workers(pg)
    channel = f"chat:back{uid()}"
    sub = Subscriber(b, channels=[channel]).start()
    try:
        a.kill()
        pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 5) g", (channel,))
        sub.wait_for_publications(5, channel)
        assert endpoints(pg)[0][1] == b.endpoint(transport)
        a.start()  # the same port and configuration
        # Traffic probes A (an empty batch) alongside its requests to B and returns to A.
        n = 5
        def returned():
            nonlocal n
            n += 1
            pg.sql("SELECT centrifugo_publish(%s, to_jsonb(%s))", (channel, n))
            return endpoints(pg)[0][1] == a.endpoint(transport)
        wait_until(returned, 15, interval=0.2, what="the worker back on node A")
        before = a.api_commands()
        pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(%s::int, %s::int) g", (channel, n + 1, n + 5))
        assert [x.data for x in sub.wait_for_publications(n + 5, channel)] == list(range(1, n + 6))
        assert a.api_commands() == before + 5, "the last five went through A"
        assert b.history(channel) == list(range(1, n + 6))
        assert f"{a.endpoint(transport)} answers again: sending to it instead of {b.endpoint(transport)}" in pg.log()
    finally:
        sub.stop()


def test_a_node_that_refuses_the_key_is_reported_and_not_failed_over(make_cluster, nodes, transport):
    a, b = nodes
    misconfigured = Centrifugo(api_key="some-other-key").start()
    try:
        pg = make_cluster(cluster_settings([misconfigured.endpoint(transport), a.endpoint(transport)], a.api_key))
        wait_for_workers(pg)
        channel = f"chat:refused{uid()}"
        pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 3) g", (channel,))
        row = wait_until(lambda: pg.sql("SELECT last_error, endpoint, endpoint_failures, backlog "
                                        "FROM centrifugo_outbox_status "
                                        "WHERE last_error_code = 401 AND state = 'backing off'"), 10,
                         what="the 401 in the status view, while backing off")[0]
        last_error, endpoint, failures, backlog = row
        assert backlog == 3
        assert f"{misconfigured.endpoint(transport)}: unauthorized: check centrifugo.api_key" in last_error, last_error
        assert endpoint == misconfigured.endpoint(transport)
        assert failures == {misconfigured.endpoint(transport): 0, a.endpoint(transport): 0}, "a refusal is not a node failure"
        time.sleep(1)
        assert a.api_commands() == 0, "the other node was not used to hide the refusal"
        wait_until(lambda: f"{misconfigured.endpoint(transport)}: unauthorized" in pg.log(), 5, what="the refusal in the log")
        # Reloadable: the operator fixes the list and the backlog goes out.
        sub = Subscriber(b, channels=[channel]).start()
        try:
            pg.sql(f"ALTER SYSTEM SET centrifugo.api_url = '{a.endpoint(transport)}, {b.endpoint(transport)}'")
            pg.sql("SELECT pg_reload_conf()")
            assert [x.data for x in sub.wait_for_publications(3, channel)] == [1, 2, 3]
        finally:
            sub.stop()
    finally:
        misconfigured.stop()


@pytest.mark.parametrize("value, message", [
    ("http://a/api,,http://b/api", "empty entry"),
    ("http://a/api, http://a/api/", "twice"),
    ("http://a/api, ftp://b/api", "must start with http"),
])
def test_a_bad_endpoint_list_is_refused_at_set_time(make_cluster, value, message):
    pg = make_cluster()
    import psycopg
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        pg.sql(f"ALTER SYSTEM SET centrifugo.api_url = '{value}'")


def test_the_kafka_bridge_fails_over_between_the_same_endpoints(make_cluster, nodes, kafka, transport):
    from test_kafka import bridge_cluster, produce, command
    a, b = nodes
    topic = f"fo{uid()}"
    kafka.create_topic(topic)
    pg = bridge_cluster(make_cluster, a, kafka, [topic], api_url=f"{a.endpoint(transport)},{b.endpoint(transport)}")
    channel = f"chat:kfo{uid()}"
    sub = Subscriber(b, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, i), None, 0) for i in range(1, 101)])
        sub.wait_for_publications(100, channel, timeout=60)
        assert a.api_commands() == 100
        a.kill()
        produce(kafka, topic, [(command(channel, i), None, 0) for i in range(101, 201)])
        assert [x.data for x in sub.wait_for_publications(200, channel, timeout=60)] == list(range(1, 201))
        assert b.history(channel) == list(range(1, 201))
        endpoint, failures = wait_until(lambda: pg.sql(
            "SELECT endpoint, endpoint_failures FROM centrifugo_kafka_status WHERE topic = %s AND endpoint = %s",
            (topic, b.endpoint(transport))), 10, what="the bridge on node B")[0]
        assert failures[a.endpoint(transport)] >= 1
        assert f"sending to {b.endpoint(transport)} from now on" in pg.log()
    finally:
        sub.stop()
