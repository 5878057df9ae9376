"""The harness really starts the real servers: Centrifugo answers its API with our key (and
refuses a wrong one), a real WebSocket subscriber receives a publication, and the Kafka broker
creates topics and carries records over its plaintext, SASL (PLAIN and SCRAM) and TLS listeners."""

import uuid

import pytest

from harness.subscriber import Subscriber


def test_centrifugo_api_answers_with_our_key(centrifugo):
    status, body = centrifugo.call("info")
    assert status == 200, body
    assert body["result"]["nodes"][0]["name"]
    status, _ = centrifugo.call("info", api_key="wrong-key")
    assert status == 401


def test_subscriber_receives_a_publication(centrifugo):
    channel = f"smoke-{uuid.uuid4().hex[:8]}"
    sub = Subscriber(centrifugo, channels=[channel]).start()
    try:
        status, body = centrifugo.call("publish", {"channel": channel, "data": {"n": 1}})
        assert status == 200 and "result" in body, body
        pubs = sub.wait_for_publications(1, channel)
        assert pubs[0].data == {"n": 1}
    finally:
        sub.stop()


def _round_trip(kafka, topic, client_conf):
    kafka.create_topic(topic, partitions=2)
    producer = kafka.producer(**client_conf)
    for i in range(10):
        producer.produce(topic, key=str(i % 2).encode(), value=f"m{i}".encode())
    assert producer.flush(30) == 0
    consumer = kafka.consumer(f"g-{topic}", **client_conf)
    consumer.subscribe([topic])
    values = []
    try:
        for _ in range(200):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                values.append(msg.value().decode())
            if len(values) == 10:
                break
    finally:
        consumer.close()
    assert sorted(values) == sorted(f"m{i}" for i in range(10))


def test_kafka_plaintext_round_trip(kafka):
    _round_trip(kafka, f"smoke-{uuid.uuid4().hex[:8]}", {})


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_kafka_sasl_round_trip(kafka, mechanism):
    user, password = next(iter(kafka.users.items()))
    conf = {"bootstrap.servers": kafka.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": mechanism, "sasl.username": user, "sasl.password": password}
    _round_trip(kafka, f"sasl-{uuid.uuid4().hex[:8]}", conf)


def test_kafka_sasl_rejects_a_wrong_password(kafka):
    from confluent_kafka.admin import AdminClient
    from confluent_kafka import KafkaException
    admin = AdminClient({"bootstrap.servers": kafka.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
                         "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "alice", "sasl.password": "wrong"})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)


def test_kafka_tls_round_trip(kafka):
    conf = {"bootstrap.servers": kafka.ssl_bootstrap, "security.protocol": "SSL",
            "ssl.ca.location": kafka.ca_file, "ssl.certificate.location": kafka.client_cert,
            "ssl.key.location": kafka.client_key}
    _round_trip(kafka, f"tls-{uuid.uuid4().hex[:8]}", conf)
