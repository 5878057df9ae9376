"""Delivery end to end: SQL → the partition workers → the real Centrifugo → a real WebSocket
subscriber, for every method that has a visible effect, in partition order under concurrency."""

import threading
import time
import uuid

import pytest

from conftest import delivery_settings, wait_for_workers
from harness.common import wait_until
from harness.subscriber import Subscriber


def uid():
    return uuid.uuid4().hex[:8]


def test_publish_broadcast_and_binary_reach_a_subscriber(outbox, centrifugo):
    pg = outbox()
    a, b = f"chat:a{uid()}", f"chat:b{uid()}"
    sub = Subscriber(centrifugo, channels=[a, b]).start()
    binary_channel = f"bin{uid()}"
    binary_sub = Subscriber(centrifugo, channels=[binary_channel], binary=True).start()
    try:
        pg.sql("SELECT centrifugo_publish(%s, %s::jsonb, tags => '{\"kind\": \"greeting\"}')",
               (a, '{"text": "hello", "n": [1, 2.5, null]}'))
        pg.sql("SELECT centrifugo_broadcast(ARRAY[%s, %s], '{\"both\": true}')", (a, b))
        payload = bytes(range(256))
        pg.sql("SELECT centrifugo_publish_binary(%s, %s)", (binary_channel, payload))
        pubs = sub.wait_for_publications(2, a)
        assert pubs[0].data == {"text": "hello", "n": [1, 2.5, None]}
        assert pubs[0].tags == {"kind": "greeting"}
        assert pubs[1].data == {"both": True}
        assert sub.wait_for_publications(1, b)[0].data == {"both": True}
        assert binary_sub.wait_for_publications(1, binary_channel)[0].data == payload
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 5, what="an empty outbox")
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        sub.stop()
        binary_sub.stop()


def test_server_side_subscribe_unsubscribe_disconnect_refresh_history_remove(outbox, centrifugo):
    pg = outbox()
    user = f"user{uid()}"
    client_channel, server_channel = f"chat:c{uid()}", f"chat:s{uid()}"
    sub = Subscriber(centrifugo, user=user, channels=[client_channel]).start()
    try:
        # subscribe: the connection gets a server-side subscription with our data, then its publications.
        pg.sql("SELECT centrifugo_subscribe(%s, %s, data => '{\"welcome\": 1}')", (user, server_channel))
        wait_until(lambda: any(e.channel == server_channel for e in sub.of_kind("server_subscribed")), 10,
                   what="the server-side subscription")
        pg.sql("SELECT centrifugo_publish(%s, '{\"via\": \"server sub\"}')", (server_channel,))
        assert sub.wait_for_publications(1, server_channel)[0].data == {"via": "server sub"}

        # history_remove: the channel's history is gone.
        pg.sql("SELECT centrifugo_publish(%s, '{\"h\": 1}')", (client_channel,))
        sub.wait_for_publications(1, client_channel)
        assert centrifugo.history(client_channel) == [{"h": 1}]
        pg.sql("SELECT centrifugo_history_remove(%s)", (client_channel,))
        wait_until(lambda: centrifugo.history(client_channel) == [], 10, what="history removal")

        # unsubscribe: the client's subscription is ended by the server.
        pg.sql("SELECT centrifugo_unsubscribe(%s, %s)", (user, client_channel))
        wait_until(lambda: any(e.channel == client_channel for e in sub.of_kind("unsubscribed")), 10,
                   what="the unsubscribe")

        # disconnect: the connection is closed with our code and reason.
        pg.sql("SELECT centrifugo_disconnect(%s, code => 4503, reason => 'bye from sql')", (user,))
        wait_until(lambda: any(e.data.get("code") == 4503 for e in sub.of_kind("disconnected")), 10,
                   what="the disconnect")
        assert [e.data["reason"] for e in sub.of_kind("disconnected") if e.data["code"] == 4503] == ["bye from sql"]
    finally:
        sub.stop()

    # refresh expired => true: Centrifugo drops the user's connection as expired (the client
    # then reconnects with a fresh token, as a browser would).
    sub = Subscriber(centrifugo, user=user, channels=[client_channel]).start()
    try:
        pg.sql("SELECT centrifugo_refresh(%s, expired => true)", (user,))
        expired = lambda: [e for e in sub.of_kind("connecting") + sub.of_kind("disconnected")
                           if "expired" in (e.data.get("reason") or "")]
        wait_until(expired, 10, what="the expiry")
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        sub.stop()


def test_commit_wakes_the_worker_without_waiting_for_the_poll(outbox, centrifugo):
    pg = outbox(partition_poll_interval=10000)
    channel = f"latency{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        time.sleep(0.5)  # let the workers settle into their 10 s wait
        for i in range(5):
            start = time.monotonic()
            pg.sql("SELECT centrifugo_publish(%s, %s::jsonb)", (channel, f'{{"i": {i}}}'))
            pub = sub.wait_for_publications(i + 1, channel, timeout=9)[i]
            assert pub.data == {"i": i}
            assert pub.at - start < 2.0, f"delivery took {pub.at - start:.3f}s: the commit did not wake the worker"
        # A plain INSERT wakes it too (the trigger, not the SQL API, does the waking).
        start = time.monotonic()
        pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('publish', %s)",
               (f'{{"channel": "{channel}", "data": "raw"}}',))
        assert sub.wait_for_publications(6, channel, timeout=9)[5].at - start < 2.0
        # A rolled-back insert delivers nothing.
        with pg.connect(autocommit=False) as conn:
            conn.execute("SELECT centrifugo_publish(%s, '\"rolled back\"')", (channel,))
            conn.rollback()
        time.sleep(1)
        assert [p.data for p in sub.publications(channel)][5:] == ["raw"]
    finally:
        sub.stop()


def test_a_connection_centrifugo_closed_while_idle_costs_no_retry(make_cluster, centrifugo):
    # Centrifugo's HTTP server closes keep-alive connections idle for 30 s; the worker's client
    # sleeps with the worker, so it must notice (or not reuse) such a connection by itself.
    # HTTP only: Centrifugo's gRPC API server sets no idle limit (no MaxConnectionIdle), so
    # there nothing closes an idle connection and the 32 s wait would check nothing.
    pg = make_cluster(delivery_settings(centrifugo.endpoint("http"), centrifugo.api_key))
    wait_for_workers(pg)
    channel = f"idle{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        time.sleep(0.5)
        pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
        sub.wait_for_publications(1, channel, timeout=10)
        time.sleep(32)
        start = time.monotonic()
        pg.sql("SELECT centrifugo_publish(%s, '2')", (channel,))
        assert sub.wait_for_publications(2, channel, timeout=10)[1].at - start < 1.0
        assert pg.scalar("SELECT retries FROM centrifugo_outbox_status WHERE partition = 0") == 0
    finally:
        sub.stop()


def test_concurrent_writers_each_keep_their_own_order_per_partition(outbox, centrifugo):
    # What this checks: per partition, each writer's commands arrive in the order it wrote them,
    # all of them, once. The order across writers is checked by the test after this one.
    pg = outbox(num_partitions=4, partition_select_limit=100)
    channels = [f"chat:order{p}-{uid()}" for p in range(4)]
    sub = Subscriber(centrifugo, channels=channels).start()
    writers, per_writer = 6, 500
    errors = []

    def write(w):
        try:
            with pg.connect() as conn:
                seq = [0] * 4
                i = 0
                while i < per_writer:
                    # Mix single-row and multi-row transactions.
                    batch = 1 if i % 3 else 5
                    with conn.transaction():
                        for _ in range(min(batch, per_writer - i)):
                            p = (w + i) % 4
                            conn.execute("SELECT centrifugo_publish(%s, jsonb_build_object('w', %s::int, 's', %s::int), partition => %s)",
                                         (channels[p], w, seq[p], p))
                            seq[p] += 1
                            i += 1
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        total = writers * per_writer
        wait_until(lambda: sum(len(sub.publications(c)) for c in channels) >= total, 60,
                   what=f"{total} publications")
        for p, channel in enumerate(channels):
            got = [(d.data["w"], d.data["s"]) for d in sub.publications(channel)]
            for w in range(writers):
                seqs = [s for (ww, s) in got if ww == w]
                assert seqs == list(range(len(seqs))), (
                    f"partition {p} writer {w}: out of order or missing: "
                    f"{[(i, s) for i, s in enumerate(seqs) if s != i][:10]}, {len(seqs)} received")
            assert len(got) == len(set(got)), f"partition {p}: duplicates"
        assert sum(len(sub.publications(c)) for c in channels) == total
        assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0
        status = pg.sql("SELECT partition, delivered, batches FROM centrifugo_worker_status() ORDER BY partition")
        assert sum(r[1] for r in status) == total
        assert all(r[1] > 0 for r in status), status
        assert sum(r[2] for r in status) < total, "commands should travel in batches"
    finally:
        sub.stop()


def test_order_across_writers_is_id_order_of_what_is_committed_when_read(make_cluster):
    # README, "what in order means": id order among the rows committed when the worker reads; a
    # row whose transaction commits after a higher id was delivered comes later, never skipped.
    from harness.fault_double import FaultDouble, ok_replies
    import json as _json
    gate = {"open": False}
    executed = []

    seen_closed = []

    def script(request):
        if not gate["open"]:
            seen_closed.append([list(c.values())[0]["data"] for c in request["body"]["commands"]])
            return ("reply", 503, b"closed")
        for c in request["body"]["commands"]:
            (method, payload), = c.items()
            executed.append(payload["data"])
        return ("reply", 200, _json.dumps({"replies": ok_replies(request)}).encode())

    double = FaultDouble().start()
    double.script = script
    try:
        from conftest import delivery_settings, wait_for_workers
        pg = make_cluster(delivery_settings(double.api_url, "k", retry_backoff_base=10, retry_backoff_max=100))
        wait_for_workers(pg)
        # While the worker cannot deliver: "late" takes the lower id but commits after "early".
        late, early = pg.connect(autocommit=False), pg.connect(autocommit=False)
        late.execute("SELECT centrifugo_publish('c', '\"late\"')")
        early.execute("SELECT centrifugo_publish('c', '\"early\"')")
        early.commit()
        late.commit()
        # Open only once a read saw both (a retry read before "late" committed has only "early").
        wait_until(lambda: ["late", "early"] in seen_closed, 10, what="a read with both rows")
        gate["open"] = True
        wait_until(lambda: executed == ["late", "early"], 10, what="both, in id order")
        # Now the worker is draining: a transaction that took its id before "next" committed
        # but commits after "next" was delivered is delivered after it, not skipped.
        slow = pg.connect(autocommit=False)
        slow.execute("SELECT centrifugo_publish('c', '\"slow\"')")
        pg.sql("SELECT centrifugo_publish('c', '\"next\"')")
        wait_until(lambda: executed[-1:] == ["next"], 10, what="the committed row")
        slow.commit()
        wait_until(lambda: executed == ["late", "early", "next", "slow"], 10, what="the late commit")
        for conn in (late, early, slow):
            conn.close()
    finally:
        double.stop()


def test_worker_terminated_comes_back_by_itself(outbox, centrifugo):
    pg = outbox()
    old = pg.scalar("SELECT pid FROM centrifugo_worker_status() WHERE partition = 0")
    assert pg.scalar("SELECT pg_terminate_backend(%s)", (old,))
    wait_until(lambda: pg.scalar("SELECT pid FROM centrifugo_worker_status() WHERE partition = 0") not in (None, old),
               15, what="a new worker")
    channel = f"back{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        pg.sql("SELECT centrifugo_publish(%s, '\"after restart\"')", (channel,))
        assert sub.wait_for_publications(1, channel)[0].data == "after restart"
    finally:
        sub.stop()


def test_hot_standby_does_no_work_until_promoted(make_cluster, centrifugo):
    from conftest import delivery_settings
    from harness.pg import PgCluster
    # The primary cannot reach Centrifugo, so its commands wait in the (replicated) outbox.
    primary = make_cluster(delivery_settings("http://127.0.0.1:9/api", "unused", retry_backoff_max=200))
    wait_for_workers(primary)
    standby = PgCluster.standby_of(primary, delivery_settings(centrifugo.api_url, centrifugo.api_key))
    channel = f"chat:standby{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        standby.start()
        standby.wait_ready()
        primary.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 5) g", (channel,))
        lsn = primary.scalar("SELECT pg_current_wal_lsn()::text")
        wait_until(lambda: standby.scalar("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)), 15,
                   what="the standby to replay the outbox rows")
        primary.stop()
        time.sleep(1)
        workers = "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'centrifugo_outbox%%'"
        assert standby.scalar(workers) == 0, "no worker runs on a hot standby"
        assert standby.scalar("SELECT count(*) FROM centrifugo_outbox") == 5
        assert standby.sql("SELECT DISTINCT state FROM centrifugo_outbox_status") == [("standby",)]
        assert sub.publications(channel) == []
        standby.promote()
        wait_until(lambda: standby.scalar(workers) == 1, 15, what="workers after promotion")
        assert [p.data for p in sub.wait_for_publications(5, channel)] == [1, 2, 3, 4, 5]
    finally:
        sub.stop()
        standby.destroy()


def test_dead_letters_are_replayed_while_another_consumer_drains_another_database(make_cluster, centrifugo):
    import json as _json
    from conftest import delivery_settings
    consumers = [{"name": "elsewhere", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://user:secret@db.example:5432/other_db", "outbox_table_name": "other_outbox"}}]
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, consumers=_json.dumps(consumers)))
    pg.sql("SELECT centrifugo_publish('nope:x', '1')")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1, 15, what="the dead letter")
    # The other consumer's table is in its own database: this one's replay does not look for it here.
    with pg.connect(autocommit=False) as conn:
        assert conn.execute("SELECT centrifugo_replay_dead_letters()").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM centrifugo_outbox").fetchone()[0] == 1
        conn.rollback()


def test_dead_letters_the_default_consumer_takes_are_not_replayed_where_it_does_not_drain(make_cluster):
    from conftest import delivery_settings
    # The default consumer drains another database: a Kafka dead letter here has no outbox here
    # a worker drains, so it stays, and the caller is told why.
    pg = make_cluster(delivery_settings("http://127.0.0.1:9/api", "k", database="elsewhere"))
    pg.sql("INSERT INTO centrifugo_dead_letters (source, method, payload, error_kind, error_message) "
           "VALUES ('kafka', 'publish', '{\"channel\": \"c\", \"data\": 1}', 'centrifugo', 'unknown channel')")
    notices = []
    with pg.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        assert conn.execute("SELECT centrifugo_replay_dead_letters()").fetchone()[0] == 0
    assert any("1 dead letter(s) of Kafka or of consumers no longer configured are not replayed" in n
               and 'drains database "elsewhere"' in n for n in notices), notices
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0


def test_postgresql_entries_of_centrifugo_consumers_get_their_own_workers(make_cluster, centrifugo):
    import json as _json
    from conftest import delivery_settings
    consumers = [{"name": "chat_pg", "type": "postgresql", "enabled": True, "postgresql": {
        "dsn": "postgresql://user:secret@db.example:5432/postgres", "outbox_table_name": "chat_outbox",
        "num_partitions": 2, "partition_select_limit": 10, "partition_poll_interval": "10s"}}]
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, consumers=_json.dumps(consumers)))
    pg.sql("""CREATE TABLE chat_outbox (id BIGSERIAL PRIMARY KEY, method text NOT NULL, payload JSONB NOT NULL,
                  partition INTEGER NOT NULL default 0, created_at TIMESTAMPTZ NOT NULL DEFAULT now());
              CREATE TRIGGER wake AFTER INSERT ON chat_outbox FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit()""")
    wait_for_workers(pg)
    status = pg.sql("SELECT consumer, partition FROM centrifugo_worker_status() ORDER BY consumer, partition")
    assert status == [("centrifugo_outbox", 0), ("chat_pg", 0), ("chat_pg", 1)]
    channel = f"chat:pgentry{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        start = time.monotonic()
        pg.sql("INSERT INTO chat_outbox (method, payload, partition) SELECT 'publish', "
               "jsonb_build_object('channel', %s::text, 'data', g), g %% 2 FROM generate_series(1, 30) g", (channel,))
        got = sub.wait_for_publications(30, channel, timeout=9)
        assert time.monotonic() - start < 5, "woken at commit, not by the 10 s poll"
        assert sorted(p.data for p in got) == list(range(1, 31))
        for parity in (0, 1):
            seq = [p.data for p in got if p.data % 2 == parity]
            assert seq == sorted(seq)
        assert pg.scalar("SELECT count(*) FROM chat_outbox") == 0
        # The entry's table takes 2 partitions; a third is refused at insert time.
        import psycopg
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):
            pg.sql("INSERT INTO chat_outbox (method, payload, partition) VALUES ('publish', '{}', 2)")
        # A dead letter remembers its consumer and is replayed into that consumer's table.
        pg.sql("INSERT INTO chat_outbox (method, payload) VALUES ('publish', '{\"channel\": \"nope:x\", \"data\": 1}')")
        wait_until(lambda: pg.scalar("SELECT consumer FROM centrifugo_dead_letters") == "chat_pg", 15,
                   what="the dead letter")
        with pg.connect(autocommit=False) as conn:
            assert conn.execute("SELECT centrifugo_replay_dead_letters()").fetchone()[0] == 1
            assert conn.execute("SELECT count(*) FROM chat_outbox").fetchone()[0] == 1
            conn.rollback()
    finally:
        sub.stop()


def test_rows_read_ahead_that_are_all_dead_letters_do_not_end_the_round_before_the_rows_after_them(outbox, centrifugo):
    # Strict order: one row per batch, so the row read ahead while the first is in flight is a
    # batch of its own; it is malformed (a plain INSERT with a method nobody knows), a dead letter
    # before sending. The rows after it were committed with it: no commit wakes the worker again,
    # and the poll interval is a minute, so they come at once only if the round reads on.
    pg = outbox(strict_order="on", partition_poll_interval="60s", num_partitions=1)
    channel = f"chat:ahead{uid()}"
    pg.sql("""INSERT INTO centrifugo_outbox (method, payload, partition)
              SELECT CASE WHEN g = 2 THEN 'no_such_method' ELSE 'publish' END,
                     jsonb_build_object('channel', %s::text, 'data', jsonb_build_object('n', g)), 0
              FROM generate_series(1, 10) g ORDER BY g""", (channel,))
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15,
               what="the rows after the dead letter, delivered by the same round")
    assert [h["n"] for h in centrifugo.history(channel)] == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 1
