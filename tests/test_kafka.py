"""The Kafka bridge against a real Apache Kafka broker (KRaft) and the real Centrifugo: message
formats, per-partition order, dead letters for garbage, at-least-once across SIGTERM/SIGKILL,
Centrifugo and broker outages, a consumer group shared by two PostgreSQL clusters, SASL/SCRAM and
TLS listeners, and invalid settings."""

import json
import os
import shutil
import signal
import tempfile
import time
import uuid

import pytest

from conftest import delivery_settings
from harness.centrifugo import Centrifugo
from harness.common import wait_until
from harness.fault_double import FaultDouble, RandomCode100, reorders_outside_first_batch
from harness.subscriber import Subscriber


def uid():
    return uuid.uuid4().hex[:8]


def produce(kafka, topic, records, **conf):
    """records: (value, headers dict or None, partition or None)."""
    producer = kafka.producer(**conf)
    for value, headers, partition in records:
        kwargs = {"headers": list(headers.items())} if headers else {}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, value=value if isinstance(value, bytes) else json.dumps(value).encode(), **kwargs)
    assert producer.flush(30) == 0


def command(channel, data, method="publish"):
    return {"method": method, "payload": {"channel": channel, "data": data}}


def bridge_cluster(make_cluster, centrifugo_server, kafka, topics, group=None, api_url=None, **extra):
    extra.setdefault("retry_backoff_max", 500)
    settings = delivery_settings(api_url or centrifugo_server.api_url, centrifugo_server.api_key, **extra)
    settings.setdefault("centrifugo.kafka_brokers", kafka.bootstrap)
    settings["centrifugo.kafka_topics"] = ",".join(topics)
    settings["centrifugo.kafka_consumer_group"] = group or f"g{uid()}"
    return make_cluster(settings)


def kafka_worker_pid(pg, name="kafka"):
    return pg.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = %s",
                     (f"centrifugo_outbox kafka {name}",))


def committed(kafka, group, topic, partitions):
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return [tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        c.close()


def test_every_message_format_reaches_the_subscriber(make_cluster, centrifugo, kafka, transport):
    t_cmd, t_pdm = f"cmd{uid()}", f"pdm{uid()}"
    kafka.create_topic(t_cmd)
    kafka.create_topic(t_pdm)
    a, b = f"chat:ka{uid()}", f"chat:kb{uid()}"
    consumers = [
        {"name": "data_mode", "type": "kafka", "enabled": True, "kafka": {
            "brokers": [kafka.bootstrap], "topics": [t_pdm], "consumer_group": f"g{uid()}",
            "publication_data_mode": {"enabled": True}}},
        {"name": "old_style_off", "type": "kafka", "disabled": True, "kafka": {}},
    ]
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [t_cmd], api_url=centrifugo.endpoint(transport),
                        **{"consumers": json.dumps(consumers)})
    sub = Subscriber(centrifugo, channels=[a, b]).start()
    try:
        produce(kafka, t_cmd, [
            (command(a, {"n": 1}), None, None),
            # payload as a JSON string holding the object (Debezium)
            ({"method": "publish", "payload": json.dumps({"channel": a, "data": {"n": 2}})}, None, None),
            # method header + bare payload
            ({"channel": a, "data": {"n": 3}}, {"centrifugo-method": "publish"}, None),
            ({"channels": [a, b], "data": {"n": 4}}, {"centrifugo-method": "broadcast"}, None),
        ])
        produce(kafka, t_pdm, [
            ({"n": 5}, {"centrifugo-channels": a, "centrifugo-tag-kind": "pdm"}, None),
            ({"n": 6}, {"centrifugo-channels": f"{a},{b}", "centrifugo-idempotency-key": "k-6"}, None),
        ])
        pubs = sub.wait_for_publications(6, a, timeout=30)
        by_n = {p.data["n"]: p for p in pubs}
        assert sorted(by_n) == [1, 2, 3, 4, 5, 6]
        assert [p.data["n"] for p in pubs if p.data["n"] <= 4] == [1, 2, 3, 4], "one partition, offset order"
        assert by_n[5].tags == {"kind": "pdm"}
        assert sorted(p.data["n"] for p in sub.wait_for_publications(2, b)) == [4, 6]
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        assert pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'centrifugo_outbox kafka %%'") == 2
    finally:
        sub.stop()


def test_per_partition_order_over_thousands_of_records(make_cluster, centrifugo, kafka, transport):
    topic = f"order{uid()}"
    kafka.create_topic(topic, partitions=4)
    channels = [f"chat:kord{p}-{uid()}" for p in range(4)]
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], api_url=centrifugo.endpoint(transport),
                        kafka_max_poll_records=50)
    sub = Subscriber(centrifugo, channels=channels).start()
    try:
        n = 1000
        produce(kafka, topic, [(command(channels[p], {"s": s}), None, p) for s in range(n) for p in range(4)])
        for p in range(4):
            got = [x.data["s"] for x in sub.wait_for_publications(n, channels[p], timeout=60)]
            assert got == list(range(n)), f"partition {p} out of order or incomplete"
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        sub.stop()


def test_partitions_are_dispatched_side_by_side_each_in_order(make_cluster, centrifugo, kafka):
    """The bridge puts every ready Kafka partition's batch on the wire at once (and reads the
    next records meanwhile) instead of waiting for one partition's reply before sending the
    next partition's batch; within a partition a batch still waits for the one before it."""
    topic = f"pipe{uid()}"
    kafka.create_topic(topic, partitions=4)
    channels = [f"chat:kpipe{p}-{uid()}" for p in range(4)]
    double = FaultDouble(centrifugo.api_url).start()
    # Every answer comes 300 ms late: one at a time, 4 partitions' batches would take 1.2 s a round.
    double.script = lambda request: ("hold", 0.3)
    try:
        produce(kafka, topic, [(command(channels[p], {"s": s}), None, p) for s in range(60) for p in range(4)])
        pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], api_url=double.api_url,
                            kafka_max_poll_records=20)
        for p in range(4):
            wait_until(lambda: len(centrifugo.history(channels[p])) >= 60, 60, interval=0.2,
                       what=f"partition {p}'s records")
            got = [d["s"] for d in centrifugo.history(channels[p])]
            assert got == list(range(60)), f"partition {p} out of order, lost or duplicated"
        assert double.max_in_flight >= 2, "batches of different partitions should be in flight together"
        per_request = [{c[1]["channel"] for c in ([next(iter(x.items())) for x in r["body"]["commands"]])}
                       for r in double.requests]
        assert all(len(chs) == 1 for chs in per_request), "a batch carries one partition's records"
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        double.stop()


def test_a_record_failing_again_is_resent_alone_so_only_its_own_first_batch_ever_overtakes_it(make_cluster, centrifugo, kafka):
    # Issue 22, for the bridge: a record that failed temporarily was resent at the head of a full
    # batch of newer records, which overtook it too when it failed again.
    topic = f"resend{uid()}"
    kafka.create_topic(topic, partitions=4)
    channels = [f"chat:kresend{p}-{uid()}" for p in range(4)]
    script = RandomCode100(key=lambda payload: (payload["channel"], payload["data"]["s"]))
    double = FaultDouble(centrifugo.api_url).start()
    double.script = script
    sub = Subscriber(centrifugo, channels=channels).start()
    try:
        n = 250
        produce(kafka, topic, [(command(channels[p], {"s": s}), None, p) for s in range(n) for p in range(4)])
        bridge_cluster(make_cluster, centrifugo, kafka, [topic], api_url=double.api_url,
                       kafka_max_poll_records=40, retry_backoff_base=5, retry_backoff_max=40)
        outside = []
        for p, channel in enumerate(channels):
            got = [(channel, e.data["s"]) for e in sub.wait_for_publications(n, channel, timeout=120)]
            assert sorted(got) == [(channel, s) for s in range(n)], f"partition {p}: lost or duplicated"
            outside += reorders_outside_first_batch(got, script.first_batch)
        assert script.failed > 100, f"only {script.failed} failures injected: the test would prove little"
        assert not outside, f"{len(outside)} reorders beyond the failed record's first batch, e.g. {outside[:5]}"
    finally:
        sub.stop()
        double.stop()


def test_a_kafka_batch_over_the_grpc_message_cap_is_sent_in_parts_in_order(make_cluster, centrifugo, kafka):
    # Issue 22: the partition workers split a batch at the gRPC server's 4 MiB message cap; the
    # bridge sent all of max_poll_records at once, which the real server refuses as a whole (and
    # the bridge then resent one record per request).
    from harness.common import free_port
    topic = f"big{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:kbig{uid()}"
    # Centrifugo unreachable at first, so the records pile up in the bridge's queue.
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], api_url=f"grpc://127.0.0.1:{free_port()}",
                        kafka_max_poll_records=20, retry_backoff_max=200)
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        blob = "x" * (700 << 10)
        produce(kafka, topic, [(command(channel, {"s": s, "blob": blob}), None, None) for s in range(12)])
        time.sleep(3)
        assert pg.scalar("SELECT retries FROM centrifugo_kafka_status WHERE topic = %s", (topic,)) > 0
        before = pg.scalar("SELECT batches FROM centrifugo_kafka_status WHERE topic = %s", (topic,))
        pg.set(**{"centrifugo.api_url": centrifugo.endpoint("grpc")})
        pg.reload()
        got = [e.data["s"] for e in sub.wait_for_publications(12, channel, timeout=60)]
        assert got == list(range(12))
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        # 12 records of 700 kB in batches under 4 MiB: 3 or 4 requests (and perhaps one more to
        # the old address before the reload). Refused as a whole, the batch would be resent one
        # record per request (13 requests).
        batches = pg.scalar("SELECT batches FROM centrifugo_kafka_status WHERE topic = %s", (topic,)) - before
        assert 3 <= batches <= 5, f"{batches} requests"
    finally:
        sub.stop()


def test_a_dead_letter_write_that_fails_reaches_both_status_views_with_its_sqlstate(make_cluster, centrifugo, kafka):
    # Issue 22: the bridge only logged a failed dead-letter write; its status row said nothing.
    topic = f"dlfail{uid()}"
    kafka.create_topic(topic)
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], retry_backoff_max=200)
    # The operator's own constraint refuses every dead letter for now (SQLSTATE 23514).
    pg.sql("ALTER TABLE centrifugo_dead_letters ADD CONSTRAINT not_now CHECK (false) NOT VALID")
    produce(kafka, topic, [(b"not json", None, None)])
    pg.sql("INSERT INTO centrifugo_outbox (method, payload) VALUES ('no_such_method', '{}')")
    for view, where in (("centrifugo_kafka_status", f"topic = '{topic}'"), ("centrifugo_outbox_status", "partition = 0")):
        wait_until(lambda: "SQLSTATE 23514" in (pg.scalar(f"SELECT last_error FROM {view} WHERE {where}") or ""), 20,
                   what=f"the failed dead-letter write in {view}")
        message = pg.scalar(f"SELECT last_error FROM {view} WHERE {where}")
        assert "dead letter" in message and "not_now" in message, message
    assert pg.scalar("SELECT state FROM centrifugo_kafka_status WHERE topic = %s", (topic,)) == "backing off"
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 1, "the row stays until its dead letter is written"
    # Once the constraint goes, both dead letters are written and both sources move on.
    pg.sql("ALTER TABLE centrifugo_dead_letters DROP CONSTRAINT not_now")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 2, 20, what="both dead letters")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 10, what="the outbox row gone")
    assert sorted(r[0] for r in pg.sql("SELECT source FROM centrifugo_dead_letters")) == ["kafka", "outbox"]


def test_an_unreadable_consumers_json_on_reload_leaves_the_running_bridge_as_it_was(make_cluster, centrifugo, kafka):
    # Found by review: a reload that made centrifugo.consumers unreadable as a whole parked every
    # bridge, the flat one too, until the next reload.
    topic = f"keep{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:keep{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, {"n": 1}), None, None)])
        sub.wait_for_publications(1, channel, timeout=30)
        pid = kafka_worker_pid(pg)
        pg.set(**{"centrifugo.consumers": "[not json"})
        pg.reload()
        wait_until(lambda: "running on with the settings it started with" in pg.log(), 10,
                   what="the bridge saying it runs on")
        produce(kafka, topic, [(command(channel, {"n": 2}), None, None)])
        assert [p.data["n"] for p in sub.wait_for_publications(2, channel, timeout=30)] == [1, 2]
        assert kafka_worker_pid(pg) == pid, "the bridge was not restarted"
    finally:
        sub.stop()


def test_garbage_becomes_dead_letters_and_offsets_advance(make_cluster, centrifugo, kafka, transport):
    topic, group = f"garbage{uid()}", f"g{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:kg{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], group=group, api_url=centrifugo.endpoint(transport))
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [
            (command(channel, "before"), None, None),
            (b"not json at all", None, None),
            ({"method": "explode", "payload": {}}, None, None),
            ({"method": "publish"}, None, None),
            ({"method": "publish", "payload": "[1, 2]"}, None, None),
            ({"method": "publish", "payload": {"channel": "nope:x", "data": 1}}, None, None),
            (command(channel, "after"), None, None),
        ])
        assert [p.data for p in sub.wait_for_publications(2, channel, timeout=30)] == ["before", "after"]
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 5, 10, what="5 dead letters")
        rows = pg.sql("SELECT source, kafka_topic, kafka_partition, kafka_offset, method, error_kind, error_code, payload "
                      "FROM centrifugo_dead_letters ORDER BY kafka_offset")
        assert [r[3] for r in rows] == [1, 2, 3, 4, 5]
        assert all(r[0] == "kafka" and r[1] == topic and r[2] == 0 for r in rows)
        assert [(r[4], r[5], r[6]) for r in rows] == [
            ("unknown", "malformed", None), ("explode", "malformed", None), ("publish", "malformed", None),
            ("publish", "malformed", None), ("publish", "centrifugo", 102)]
        assert rows[0][7] == "not json at all"
        wait_until(lambda: committed(kafka, group, topic, 1) == [7], 15, what="the committed offset to pass the garbage")
    finally:
        sub.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_at_least_once_when_the_bridge_is_stopped_mid_stream(make_cluster, centrifugo, kafka, sig):
    topic = f"alo{uid()}"
    kafka.create_topic(topic, partitions=2)
    channel = f"chat:kalo{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], kafka_max_poll_records=20)
    wait_until(lambda: kafka_worker_pid(pg), 10, what="the bridge worker")
    n = 2000
    produce(kafka, topic, [(command(channel, {"s": s}), None, s % 2) for s in range(n)])
    wait_until(lambda: len(centrifugo.history(channel)) >= 300, 30, interval=0.02, what="delivery to start")
    os.kill(kafka_worker_pid(pg), sig)
    wait_until(lambda: len(centrifugo.history(channel)) >= n, 90, interval=0.2,
               what="every record after the restart")
    time.sleep(1)
    history = [d["s"] for d in centrifugo.history(channel)]
    assert sorted(history) == list(range(n)), "nothing lost, no duplicates (idempotency keys)"
    for parity in (0, 1):
        seq = [s for s in history if s % 2 == parity]
        assert seq == sorted(seq), "each Kafka partition in offset order"


def test_centrifugo_down_pauses_then_resumes(make_cluster, kafka, transport):
    server = Centrifugo().start()
    try:
        topic = f"down{uid()}"
        kafka.create_topic(topic, partitions=2)
        channel = f"chat:kdown{uid()}"
        pg = bridge_cluster(make_cluster, server, kafka, [topic], api_url=server.endpoint(transport))
        produce(kafka, topic, [(command(channel, {"s": s}), None, s % 2) for s in range(20)])
        wait_until(lambda: len(server.history(channel)) == 20, 30, what="the first records")
        server.kill()
        produce(kafka, topic, [(command(channel, {"s": s}), None, s % 2) for s in range(20, 120)])
        time.sleep(5)
        server.start()
        wait_until(lambda: len(server.history(channel)) == 100, 30, interval=0.2, what="the backlog after the outage")
        got = [d["s"] for d in server.history(channel)]
        assert sorted(got) == list(range(20, 120))
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
        assert "retrying in" in pg.log()
    finally:
        server.stop()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_bridge_without_a_client_waits_instead_of_spinning(make_cluster, centrifugo, kafka):
    """Records queued while the client cannot be built (a CA file that is missing): the bridge
    waits in its poll, and delivers once the file is there after a reload."""
    topic = f"noclient{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:knoclient{uid()}"
    ca_dir = tempfile.mkdtemp(prefix="centrifugo_outbox_ca_", dir="/var/tmp")
    os.chmod(ca_dir, 0o755)
    ca = os.path.join(ca_dir, "ca.pem")
    try:
        pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], http_tls_root_ca=ca)
        wait_until(lambda: "cannot reach Centrifugo" in pg.log(), 30, what="the client error")
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_kafka_status WHERE assigned AND topic = %s",
                                     (topic,)) == 1, 30, what="the partition to be assigned")
        produce(kafka, topic, [(command(channel, {"s": s}), None, None) for s in range(5)])
        wait_until(lambda: pg.scalar("SELECT high_watermark FROM centrifugo_kafka_status WHERE topic = %s", (topic,)) == 5,
                   30, what="the bridge to fetch the records")
        time.sleep(0.5)
        pid = kafka_worker_pid(pg)
        before = cpu_seconds(pid)
        time.sleep(3)
        used = cpu_seconds(pid) - before
        assert used < 1.0, f"the bridge used {used:.2f} s of CPU in 3 s without a client"
        assert centrifugo.history(channel) == []
        # A reload with a readable CA file (any PEM certificate will do for plain HTTP) fixes it.
        shutil.copy("/etc/ssl/certs/ISRG_Root_X1.pem", ca)
        os.chmod(ca, 0o644)
        pg.sql("SELECT pg_reload_conf()")
        wait_until(lambda: len(centrifugo.history(channel)) == 5, 30, what="delivery after the reload")
    finally:
        shutil.rmtree(ca_dir, ignore_errors=True)


def test_broker_restart_reconnects(make_cluster, centrifugo, kafka):
    topic = f"restart{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:kre{uid()}"
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic])
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, "before"), None, None)])
        sub.wait_for_publications(1, channel, timeout=30)
        kafka.stop()
        time.sleep(3)
        kafka.start()
        produce(kafka, topic, [(command(channel, "after"), None, None)])
        assert [p.data for p in sub.wait_for_publications(2, channel, timeout=60)] == ["before", "after"]
        assert kafka_worker_pid(pg)
    finally:
        sub.stop()


def test_two_clusters_share_a_group_and_take_over(make_cluster, centrifugo, kafka):
    topic, group = f"shared{uid()}", f"g{uid()}"
    kafka.create_topic(topic, partitions=4)
    channel = f"chat:kshared{uid()}"
    doubles = [FaultDouble(centrifugo.api_url).start() for _ in range(2)]
    try:
        a = bridge_cluster(make_cluster, centrifugo, kafka, [topic], group=group, api_url=doubles[0].api_url)
        b = bridge_cluster(make_cluster, centrifugo, kafka, [topic], group=group, api_url=doubles[1].api_url)
        assigned = lambda pg: pg.scalar("SELECT count(*) FROM centrifugo_kafka_status WHERE assigned AND topic = %s", (topic,))
        wait_until(lambda: assigned(a) > 0 and assigned(b) > 0 and assigned(a) + assigned(b) == 4, 30, interval=0.2,
                   what="both clusters to share the 4 partitions")
        produce(kafka, topic, [(command(channel, {"s": s}), None, s % 4) for s in range(400)])
        wait_until(lambda: len(centrifugo.history(channel)) == 400, 60, what="the first 400")
        sent = [len([c for c in d.commands() if c[1].get("channel") == channel]) for d in doubles]
        assert sent[0] > 0 and sent[1] > 0, f"both clusters should consume: {sent}"
        a.stop("immediate")
        produce(kafka, topic, [(command(channel, {"s": s}), None, s % 4) for s in range(400, 800)])
        wait_until(lambda: len(centrifugo.history(channel)) >= 800, 90, interval=0.2, what="the survivor to take over")
        got = sorted(d["s"] for d in centrifugo.history(channel))
        assert got == list(range(800)), "nothing lost, nothing published twice"
    finally:
        for d in doubles:
            d.stop()


@pytest.mark.parametrize("mechanism", ["plain", "scram-sha-256", "scram-sha-512"])
def test_sasl_listener(make_cluster, centrifugo, kafka, mechanism):
    topic = f"sasl{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:ksasl{uid()}"
    user, password = next(iter(kafka.users.items()))
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], kafka_brokers=kafka.sasl_bootstrap,
                        kafka_sasl_mechanism=mechanism, kafka_sasl_user=user, kafka_sasl_password=password)
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, mechanism), None, None)])
        assert sub.wait_for_publications(1, channel, timeout=30)[0].data == mechanism
        assert password not in pg.log()
    finally:
        sub.stop()


def test_sasl_wrong_password_fails_clearly_without_the_password(make_cluster, centrifugo, kafka):
    topic = f"saslbad{uid()}"
    kafka.create_topic(topic)
    wrong = "wrong-" + uid()
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], kafka_brokers=kafka.sasl_bootstrap,
                        kafka_sasl_mechanism="scram-sha-256", kafka_sasl_user="alice", kafka_sasl_password=wrong)
    wait_until(lambda: "uthentication" in pg.log(), 30, what="an authentication error in the log")
    assert wrong not in pg.log()


def test_tls_listener(make_cluster, centrifugo, kafka):
    topic = f"tls{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:ktls{uid()}"
    bridge_cluster(make_cluster, centrifugo, kafka, [topic], kafka_brokers=kafka.ssl_bootstrap,
                        kafka_tls=True, kafka_tls_root_ca=kafka.ca_file, kafka_tls_cert=kafka.client_cert,
                        kafka_tls_key=kafka.client_key)
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, "over tls"), None, None)])
        assert sub.wait_for_publications(1, channel, timeout=30)[0].data == "over tls"
    finally:
        sub.stop()


def test_tls_with_an_unknown_ca_fails_clearly(make_cluster, centrifugo, kafka):
    topic = f"tlsbad{uid()}"
    kafka.create_topic(topic)
    pg = bridge_cluster(make_cluster, centrifugo, kafka, [topic], kafka_brokers=kafka.ssl_bootstrap, kafka_tls=True)
    wait_until(lambda: "certificate verify failed" in pg.log() or "SSL handshake failed" in pg.log(), 30,
               what="a TLS verification error in the log")


def test_session_timeout_and_max_poll_interval_are_taken(make_cluster, centrifugo, kafka):
    # librdkafka checks both at client creation: values it takes, in Centrifugo's duration
    # style in the consumers JSON, let the bridge join its group and deliver. (The broker here
    # takes any session timeout a classic member asks for, so its refusal cannot show them.)
    topic = f"sess{uid()}"
    kafka.create_topic(topic)
    channel = f"chat:sess{uid()}"
    consumers = [{"name": "tuned", "type": "kafka", "enabled": True, "kafka": {
        "brokers": [kafka.bootstrap], "topics": [topic], "consumer_group": f"g{uid()}",
        "session_timeout": "7s", "max_poll_interval": "20s"}}]
    pg = make_cluster(delivery_settings(centrifugo.api_url, centrifugo.api_key, consumers=json.dumps(consumers)))
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        produce(kafka, topic, [(command(channel, "tuned"), None, None)])
        assert sub.wait_for_publications(1, channel, timeout=30)[0].data == "tuned"
    finally:
        sub.stop()


@pytest.mark.parametrize("settings, message", [
    ({"consumers": "[not json"}, "centrifugo.consumers is not valid JSON"),
    ({"kafka_brokers": "127.0.0.1:9", "kafka_topics": "t", "kafka_session_timeout": 60000,
      "kafka_max_poll_interval": 30000}, "must not be shorter than session_timeout"),
    ({"kafka_brokers": "127.0.0.1:9", "kafka_topics": "t", "kafka_sasl_mechanism": "aws-msk-iam"}, "aws-msk-iam"),
    ({"kafka_brokers": "127.0.0.1:9", "kafka_topics": "t", "kafka_tls": True, "kafka_tls_server_name": "kafka.example"},
     "server_name is not supported"),
])
def test_invalid_settings_log_one_clear_error_and_postgres_keeps_running(make_cluster, settings, message):
    pg = make_cluster({f"centrifugo.{k}": v for k, v in settings.items()})
    wait_until(lambda: "kafka bridge not started" in pg.log(), 15, what="the bridge's error")
    time.sleep(2)
    assert pg.log().count("kafka bridge not started") == 1, "logged once, not restarted in a loop"
    assert message in pg.log()
    assert pg.scalar("SELECT 1") == 1
