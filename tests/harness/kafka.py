"""A real single-node Apache Kafka broker in KRaft mode, from the Maven Central jars that
scripts/setup.sh caches. It listens on loopback with four listeners so every client option can be
tested for real:

- PLAINTEXT       no auth
- SASL_PLAINTEXT  PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (users in `self.users`)
- SSL             a test CA and broker certificate made with openssl (`self.ca_file`)
- CONTROLLER      the KRaft controller (internal)
"""

import base64
import glob
import os
import shutil
import subprocess
import tempfile
import uuid

from .common import CACHE, free_port, kill_process, port_open, read_log, stop_process, wait_until

KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.4.0")
KAFKA_LIBS = os.path.join(CACHE, f"kafka-{KAFKA_VERSION}", "libs")

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders><Console name="out" target="SYSTEM_OUT"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console></Appenders>
  <Loggers>
    <Logger name="kafka" level="WARN"/><Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="kafka.server.KafkaServer" level="INFO"/><Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="out"/></Root>
  </Loggers>
</Configuration>
"""


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_test_pki(directory, server_name="localhost"):
    """A CA, a broker certificate for `server_name` + 127.0.0.1, and a client certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=centrifugo_outbox test CA", cwd=directory)
    for name, cn in (("broker", server_name), ("client", "centrifugo_outbox client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=directory)
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:{server_name},IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)


class KafkaBroker:
    def __init__(self, users=None):
        self.root = tempfile.mkdtemp(prefix="kafka_")
        os.chmod(self.root, 0o755)  # PostgreSQL (user postgres) reads the test CA and client key
        self.port = free_port()
        self.sasl_port = free_port()
        self.ssl_port = free_port()
        self.controller_port = free_port()
        self.users = users or {"alice": "alice-secret"}
        self.logfile = os.path.join(self.root, "kafka.log")
        self.proc = None
        self.formatted = False
        make_test_pki(self.root)
        for f in os.listdir(self.root):
            os.chmod(os.path.join(self.root, f), 0o644)
        self.ca_file = os.path.join(self.root, "ca.pem")
        self.client_cert = os.path.join(self.root, "client.pem")
        self.client_key = os.path.join(self.root, "client.key")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    def _write_config(self):
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in self.users.items())
        first_user, first_password = next(iter(self.users.items()))
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port},"
                          f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},SSL://127.0.0.1:{self.ssl_port}"),
            "advertised.listeners": (f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},"
                                     f"SSL://127.0.0.1:{self.ssl_port}"),
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": os.path.join(self.root, "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{first_user}" '
                f'password="{first_password}" {plain_users};',
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": os.path.join(self.root, "broker-keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": self.ca_file,
            "ssl.client.auth": "requested",
            "ssl.endpoint.identification.algorithm": "",
        }
        with open(os.path.join(self.root, "broker-keystore.pem"), "w") as f:
            for part in ("broker.key", "broker.pem"):
                with open(os.path.join(self.root, part)) as src:
                    f.write(src.read())
        with open(os.path.join(self.root, "server.properties"), "w") as f:
            for key, value in props.items():
                value = value.replace("\\", "\\\\")
                f.write(f"{key}={value}\n")
        with open(os.path.join(self.root, "log4j2.xml"), "w") as f:
            f.write(LOG4J2)

    def _java(self, main, *args, **popen):
        classpath = ":".join(sorted(glob.glob(os.path.join(KAFKA_LIBS, "*.jar"))))
        if not classpath:
            raise RuntimeError(f"no Kafka jars in {KAFKA_LIBS}: run scripts/setup.sh")
        cmd = ["java", "-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={os.path.join(self.root, 'log4j2.xml')}",
               "-cp", classpath, main, *args]
        return cmd

    def start(self, timeout=90):
        if not self.formatted:
            self._write_config()
            cluster_id = "-"
            while cluster_id.startswith("-"):  # a leading "-" would read as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            scram = []
            for user, password in self.users.items():
                for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    scram += ["--add-scram", f"{mech}=[name={user},password={password}]"]
            subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c",
                                      os.path.join(self.root, "server.properties"), *scram),
                           check=True, capture_output=True, text=True)
            self.formatted = True
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self._java("kafka.Kafka", os.path.join(self.root, "server.properties")),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and port_open(self.port) and self._metadata_ok(), timeout,
                   interval=0.25, what=f"Kafka broker (log: {self.logfile})")
        return self

    def _metadata_ok(self):
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        md = admin.list_topics(timeout=2)
        return len(md.brokers) == 1

    def stop(self):
        stop_process(self.proc, 30)
        self.proc = None

    def kill(self):
        kill_process(self.proc)
        self.proc = None

    def destroy(self):
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def admin(self):
        from confluent_kafka.admin import AdminClient
        return AdminClient({"bootstrap.servers": self.bootstrap})

    def create_topic(self, name, partitions=1):
        from confluent_kafka.admin import NewTopic
        admin = self.admin()  # keep the client alive until the future resolves
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        futures[name].result(30)

    def producer(self, **conf):
        from confluent_kafka import Producer
        return Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, **conf})

    def consumer(self, group, **conf):
        from confluent_kafka import Consumer
        return Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000,
                         "heartbeat.interval.ms": 500, **conf})

    def log(self) -> str:
        return read_log(self.logfile)


def produce_with_raw_header_keys(bootstrap, topic, value: bytes, headers):
    """Produces one record whose header keys are arbitrary bytes (confluent-kafka's Python API
    only takes str keys, encoded as UTF-8), through the librdkafka it bundles, via ctypes.
    `headers`: [(key bytes without NUL, value bytes)]."""
    import ctypes
    import confluent_kafka
    libs = os.path.join(os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs")
    lib = ctypes.CDLL(glob.glob(os.path.join(libs, "librdkafka*.so*"))[0])

    class Mem(ctypes.Structure):
        _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]

    class Header(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("val", ctypes.c_void_p), ("size", ctypes.c_ssize_t)]

    class Value(ctypes.Union):
        _fields_ = [("cstr", ctypes.c_char_p), ("mem", Mem), ("header", Header), ("pad", ctypes.c_char * 64)]

    class VU(ctypes.Structure):   # rd_kafka_vu_t
        _fields_ = [("vtype", ctypes.c_int), ("u", Value)]

    TOPIC, VALUE, HEADER = 1, 4, 9   # rd_kafka_vtype_t
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.POINTER(VU), ctypes.c_size_t]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_flush.restype = ctypes.c_int
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    assert lib.rd_kafka_conf_set(conf, b"bootstrap.servers", bootstrap.encode(), errstr, 512) == 0, errstr.value
    rk = lib.rd_kafka_new(0, conf, errstr, 512)   # RD_KAFKA_PRODUCER
    assert rk, errstr.value
    keep = [ctypes.create_string_buffer(value, len(value))]
    vus = (VU * (2 + len(headers)))()
    vus[0].vtype, vus[0].u.cstr = TOPIC, topic.encode()
    vus[1].vtype, vus[1].u.mem = VALUE, Mem(ctypes.cast(keep[0], ctypes.c_void_p), len(value))
    for i, (key, val) in enumerate(headers):
        buf = ctypes.create_string_buffer(val, len(val))
        keep.append(buf)
        vus[2 + i].vtype, vus[2 + i].u.header = HEADER, Header(key, ctypes.cast(buf, ctypes.c_void_p), len(val))
    error = lib.rd_kafka_produceva(rk, vus, len(vus))
    assert not error, "rd_kafka_produceva failed"
    assert lib.rd_kafka_flush(rk, 30000) == 0, "the record was not delivered to the broker"
    lib.rd_kafka_destroy(rk)
