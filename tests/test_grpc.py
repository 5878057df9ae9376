"""The gRPC transport (`centrifugo.api_url = 'grpc://host:port'`) against the real Centrifugo's
gRPC server API: the commands really travel over gRPC, what one transport refuses the other
refuses the same way, a frozen server is a timeout and a retry on both, limits of the gRPC server
split a batch, TLS with a private CA and a client certificate, and addresses checked at SET time.
(Delivery, failover and Kafka tests run on both transports through the `transport` fixture.)"""

import os
import signal
import tempfile
import time
import uuid

import psycopg
import pytest

from conftest import delivery_settings, wait_for_workers
from harness.centrifugo import Centrifugo
from harness.common import wait_until
from harness.kafka import make_test_pki
from harness.subscriber import Subscriber

FAST_RETRY = {"retry_backoff_base": 10, "retry_backoff_max": 300, "http_timeout": 1000, "http_connect_timeout": 500}


def uid():
    return uuid.uuid4().hex[:8]


def test_commands_travel_over_grpc_only(outbox, centrifugo, transport):
    pg = outbox()
    channel = f"chat:proto{uid()}"
    other = "grpc" if transport == "http" else "http"
    before = {p: centrifugo.api_commands("publish", p) for p in ("http", "grpc")}
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('i', g, 'big', 12345678901234567890123::numeric)) "
               "FROM generate_series(1, 20) g", (channel,))
        pubs = sub.wait_for_publications(20, channel)
        assert [p.data["i"] for p in pubs] == list(range(1, 21))
        assert centrifugo.history(channel)[0] == {"i": 1, "big": 12345678901234567890123}
    finally:
        sub.stop()
    assert centrifugo.api_commands("publish", transport) == before[transport] + 20
    assert centrifugo.api_commands("publish", other) == before[other]


def test_a_payload_centrifugo_cannot_read_is_the_same_dead_letter_on_both_transports(outbox, centrifugo, transport):
    pg = outbox(partition_select_limit=10)
    channel = f"chat:unreadable{uid()}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        # Plain INSERTs, as an application bypassing the SQL API would write them: the second
        # row's skip_history is a string, which Centrifugo's API reads as a bad request.
        pg.sql("""INSERT INTO centrifugo_outbox (method, payload, partition) VALUES
                  ('publish', jsonb_build_object('channel', %(c)s::text, 'data', 1), 0),
                  ('publish', jsonb_build_object('channel', %(c)s::text, 'data', 2, 'skip_history', 'yes'), 0),
                  ('publish', jsonb_build_object('channel', %(c)s::text, 'data', 3), 0)""", {"c": channel})
        assert [p.data for p in sub.wait_for_publications(2, channel)] == [1, 3]
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 10, what="an empty outbox")
        (kind, code, message, data), = pg.sql(
            "SELECT error_kind, error_code, error_message, payload->'data' FROM centrifugo_dead_letters")
        assert (kind, code, data) == ("http", 400, 2), message
        if transport == "grpc":  # read here, as Centrifugo would: the reason is ours to give
            assert "expected a boolean" in message, message
    finally:
        sub.stop()


def test_a_frozen_centrifugo_is_a_timeout_then_everything_arrives_once_in_order(make_cluster, transport):
    server = Centrifugo().start()
    try:
        pg = make_cluster(delivery_settings(server.endpoint(transport), server.api_key, **FAST_RETRY))
        wait_for_workers(pg)
        channel = f"chat:frozen{uid()}"
        pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 10) g", (channel,))
        wait_until(lambda: len(server.history(channel)) == 10, 10, what="the first ten")
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(11, 40) g", (channel,))
            wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox_status "
                                         "WHERE last_error LIKE '%%timeout%%'"), 10, what="a timeout in the status view")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 15, what="the backlog to drain")
        # Requests the frozen server read before it stopped ran when it woke; their resends are
        # recognized by the idempotency keys: each command is in the history once, in order.
        assert server.history(channel) == list(range(1, 41))
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        server.stop()


def test_a_batch_over_the_grpc_servers_message_limit_is_split_and_an_oversized_command_dead_lettered(make_cluster):
    server = Centrifugo(extra_config={"grpc_api": {"max_receive_message_size": 64 * 1024}})
    server.config["grpc_api"].update({"enabled": True, "address": "127.0.0.1", "port": server.grpc_port,
                                      "key": server.api_key})
    server.start()
    try:
        pg = make_cluster(delivery_settings(server.grpc_url, server.api_key, partition_select_limit=100, **FAST_RETRY))
        wait_for_workers(pg)
        channel = f"chat:limit{uid()}"
        # 20 commands of 10 kB (200 kB together, over the limit as one batch), one of 100 kB in
        # the middle (over the limit alone), then 5 more.
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('i', g, 'pad', repeat('x', 10000))) "
               "FROM generate_series(1, 20) g", (channel,))
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('i', 0, 'pad', repeat('y', 100000)))", (channel,))
        pg.sql("SELECT centrifugo_publish(%s, jsonb_build_object('i', g)) FROM generate_series(21, 25) g", (channel,))
        wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 30, what="an empty outbox")
        assert [d["i"] for d in server.history(channel)] == list(range(1, 26))
        (kind, code, message, size), = pg.sql(
            "SELECT error_kind, error_code, error_message, length(payload::text) FROM centrifugo_dead_letters")
        assert (kind, code) == ("http", 413) and size > 100000, message
        assert "gRPC status 8" in message, message
    finally:
        server.stop()


def test_grpcs_with_a_private_ca_and_a_client_certificate(make_cluster):
    pki = tempfile.mkdtemp(prefix="grpc_pki_")
    os.chmod(pki, 0o755)  # PostgreSQL (user postgres) reads the CA and the client key
    make_test_pki(pki)
    for name in os.listdir(pki):
        os.chmod(os.path.join(pki, name), 0o644)
    server = Centrifugo()
    server.config["grpc_api"]["tls"] = {
        "enabled": True,
        "cert_pem": os.path.join(pki, "broker.pem"),
        "key_pem": os.path.join(pki, "broker.key"),
        "client_ca_pem": os.path.join(pki, "ca.pem"),  # mutual TLS: a client certificate is required
    }
    server.start()
    try:
        url = f"grpcs://localhost:{server.grpc_port}"
        base = delivery_settings(url, server.api_key, http_tls_root_ca=os.path.join(pki, "ca.pem"), **FAST_RETRY)
        # Without the client certificate the handshake fails: a visible, retried transport error.
        pg = make_cluster(base)
        wait_for_workers(pg)
        channel = f"chat:tls{uid()}"
        pg.sql("SELECT centrifugo_publish(%s, to_jsonb(g)) FROM generate_series(1, 3) g", (channel,))
        wait_until(lambda: pg.scalar("SELECT last_error FROM centrifugo_outbox_status WHERE partition = 0"), 10,
                   what="the handshake failure in the status view")
        assert server.history(channel) == []
        pg.sql(f"ALTER SYSTEM SET centrifugo.http_tls_cert = '{os.path.join(pki, 'client.pem')}'")
        pg.sql(f"ALTER SYSTEM SET centrifugo.http_tls_key = '{os.path.join(pki, 'client.key')}'")
        pg.sql("SELECT pg_reload_conf()")
        wait_until(lambda: server.history(channel) == [1, 2, 3], 15, what="delivery over mutual TLS")
        assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    finally:
        server.stop()


@pytest.mark.parametrize("value, message", [
    ("grpc://127.0.0.1:10000/api", "has a path"),
    ("grpc://user:hunter2secret@127.0.0.1:10000", "has credentials"),
    ("grpc://127.0.0.1:10000, http://127.0.0.1:8000/api", "mixes grpc and http"),
    ("grpc://:10000", "has no host"),
    ("grpc://127.0.0.1:10000, grpc://127.0.0.1:10000/", "twice"),
])
def test_a_bad_grpc_address_is_refused_at_set_time(make_cluster, value, message):
    pg = make_cluster()
    with pytest.raises(psycopg.errors.InvalidParameterValue) as error:
        pg.sql(f"ALTER SYSTEM SET centrifugo.api_url = '{value}'")
    assert message in str(error.value)
    assert "hunter2secret" not in (error.value.diag.message_detail or "")


def test_a_centrifugo_without_grpc_api_is_a_connect_failure_retried(make_cluster, centrifugo):
    port_without_server = Centrifugo().grpc_port  # a free port nobody listens on
    pg = make_cluster(delivery_settings(f"grpc://127.0.0.1:{port_without_server}", centrifugo.api_key, **FAST_RETRY))
    wait_for_workers(pg)
    channel = f"chat:nogrpc{uid()}"
    pg.sql("SELECT centrifugo_publish(%s, '1')", (channel,))
    # The last error may still be the wait for CREATE EXTENSION for a moment: wait for this one.
    last_error = lambda: pg.scalar("SELECT last_error FROM centrifugo_outbox_status WHERE partition = 0") or ""
    wait_until(lambda: "connect failed" in last_error(), 10, what=f"the connect failure (last error: {last_error()!r})")
    time.sleep(0.5)
    assert pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 1
    assert pg.scalar("SELECT count(*) FROM centrifugo_dead_letters") == 0
    # The operator points it at the real gRPC API: the command goes out.
    pg.sql(f"ALTER SYSTEM SET centrifugo.api_url = '{centrifugo.grpc_url}'")
    pg.sql("SELECT pg_reload_conf()")
    wait_until(lambda: pg.scalar("SELECT count(*) FROM centrifugo_outbox") == 0, 10, what="delivery after the fix")
