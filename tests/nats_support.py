"""A private 3-node NATS cluster (JetStream + MQTT 3.1.1) for the tests that ask for one.

The cluster itself is bench/nats_cluster.py, shared with the load bench; this module gives it a pytest
fixture that starts it under the test's tmp_path and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.nats_cluster import NatsCluster, NatsNode, nats_server_path

__all__ = ["NatsCluster", "NatsNode", "nats_cluster"]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three routed nats-server nodes with MQTT listeners on free ports, ready for QoS 1 across nodes."""
    if nats_server_path() is None:
        pytest.fail("nats-server is not on PATH: install the Debian package 'nats-server'")
    cluster = NatsCluster(tmp_path / "nats").start()
    try:
        yield cluster
    finally:
        cluster.stop()
