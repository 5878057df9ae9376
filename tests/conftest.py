"""Fixtures of the end-to-end layer: real servers, started once per session where possible."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness.centrifugo import Centrifugo  # noqa: E402
from harness.kafka import KafkaBroker  # noqa: E402
from harness.pg import PgCluster  # noqa: E402


@pytest.fixture(scope="session")
def centrifugo():
    server = Centrifugo().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka():
    broker = KafkaBroker().start()
    yield broker
    broker.destroy()


@pytest.fixture
def make_cluster():
    """Builds PostgreSQL clusters with given settings; all are destroyed after the test."""
    clusters = []

    def make(settings=None, preload=True, create_extension=True, start=True):
        cluster = PgCluster(settings, preload=preload).init()
        clusters.append(cluster)
        if start:
            cluster.start()
            # scripts/test.sh says which major it means to test: prove the binaries are that one.
            expected = os.environ.get("EXPECTED_PG_MAJOR")
            if expected:
                actual = int(cluster.scalar("SHOW server_version_num")) // 10000
                assert actual == int(expected), f"PostgreSQL {actual} runs, {expected} was meant (PG_BIN?)"
            if create_extension:
                cluster.sql("CREATE EXTENSION centrifugo_outbox")
        return cluster

    yield make
    for cluster in clusters:
        cluster.destroy()


def delivery_settings(api_url, api_key, **extra):
    """postgresql.conf settings for a cluster whose workers deliver to `api_url`."""
    settings = {"centrifugo.api_url": api_url, "centrifugo.api_key": api_key}
    settings.update({f"centrifugo.{k}": v for k, v in extra.items()})
    return settings


TRANSPORTS = os.environ.get("E2E_TRANSPORTS", "http,grpc").split(",")


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """Each test that takes it runs once per transport to Centrifugo: HTTP and gRPC."""
    return request.param


@pytest.fixture
def outbox(make_cluster, centrifugo, transport):
    """A started cluster with the extension, delivering to the session's real Centrifugo over
    `transport`."""
    def make(**extra):
        pg = make_cluster(delivery_settings(centrifugo.endpoint(transport), centrifugo.api_key, **extra))
        wait_for_workers(pg)
        return pg
    return make


def wait_for_workers(pg, timeout=20):
    """Waits until every partition worker runs and sees the extension."""
    from harness.common import wait_until
    # Rows about settings that leave partitions without a worker are not workers.
    wait_until(lambda: all(row[0] is not None and row[1] in ("idle", "sending", "backing off")
                           for row in pg.sql("SELECT pid, state FROM centrifugo_outbox_status "
                                             "WHERE state NOT IN ('invalid settings', 'no worker', 'stranded')")),
               timeout, interval=0.1, what="the partition workers")
