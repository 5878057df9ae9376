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
            if create_extension:
                cluster.sql("CREATE EXTENSION centrifugo_outbox")
        return cluster

    yield make
    for cluster in clusters:
        cluster.destroy()
