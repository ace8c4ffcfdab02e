"""Issue 15 point 2: `serve`'s ingest keeps a persistent session, so telemetry sent == stored across restarts.

`edgefleet serve` starts its ingest with `Fleet.start_ingest()` and no client id. It used a clean session:
whatever the agents published while the broker restarted (they reconnect within 0.1 s here and flush
their buffers) or while `serve` itself restarted never reached the store (51-78 of ~330 per trial).
Real Mosquitto with persistence, real agent processes behind a tapping proxy (what they put on the wire
is the truth), the real Fleet and ingest over SQLite.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.ingest import Ingest
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.store import Store
from tests.chaos_support import ChaosProxy
from tests.fleet_support import agents, build_artifacts, stored_seqs, wait_for, wait_online

pytestmark = [pytest.mark.broker]

TELEMETRY_INTERVAL_S = 0.1
FAST_RECONNECT = "reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("ingest-bundles"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def _run_for(seconds: float, proxy: ChaosProxy, ids: list[str]) -> None:
    want = {d: len(proxy.sent_seqs("/telemetry", d)) + int(seconds / TELEMETRY_INTERVAL_S) for d in ids}
    wait_for(
        lambda: all(len(proxy.sent_seqs("/telemetry", d)) >= n for d, n in want.items()),
        seconds * 10 + 30,
        "the agents to keep publishing",
    )


def test_an_ingest_without_a_given_client_id_gets_a_fixed_one_and_a_persistent_session(store: Store) -> None:
    # act
    one = Ingest(store, MqttOptions("mqtt://127.0.0.1:1"), "f1")
    again = Ingest(store, MqttOptions("mqtt://127.0.0.1:1"), "f1")
    other_fleet = Ingest(store, MqttOptions("mqtt://127.0.0.1:1"), "f2")
    worker = Ingest(store, MqttOptions("mqtt://127.0.0.1:1"), "f1", share_group="g", worker="w2")
    # assert
    assert one.client_id == again.client_id  # what a restarted `serve` uses again
    assert one.client_id != other_fleet.client_id
    assert worker.client_id not in (one.client_id, None)
    assert one.persistent and worker.persistent


@pytest.mark.slow
def test_serve_ingest_stores_every_telemetry_message_across_broker_and_serve_restarts(
    tmp_path: Path, mosquitto: Any, fleet_name: str, store: Store, artifacts: dict[str, Path]
) -> None:
    # prepare
    ids = ["h1", "h2"]
    proxy = ChaosProxy(mosquitto.port).start()
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    config = tmp_path / "agent.toml"
    config.write_text(FAST_RECONNECT)
    extra = ("--config", str(config), "--telemetry-interval", str(TELEMETRY_INTERVAL_S))
    measured: dict[str, Any] = {}
    started = time.monotonic()
    try:
        fleet.start_ingest()  # exactly what `edgefleet serve --broker` does
        with agents(tmp_path, proxy.url, fleet_name, artifacts["key"], ids, *extra):
            wait_online(store, fleet_name, fleet.options, ids)
            _run_for(1.0, proxy, ids)
            # act 1: the broker restarts under live traffic (SIGTERM: it saves its sessions)
            mosquitto.restart()
            _run_for(1.0, proxy, ids)
            # act 2: kill -9, back on the same port and persistence folder
            mosquitto.stop(kill=True)
            mosquitto.start()
            _run_for(1.0, proxy, ids)
            # act 3: `serve` restarts (its ingest goes away and comes back)
            fleet.close()
            _run_for(1.0, proxy, ids)
            fleet.start_ingest()
            _run_for(1.0, proxy, ids)
        # assert
        for device in ids:
            sent = set(proxy.sent_seqs("/telemetry", device))
            wait_for(
                lambda d=device, s=sent: s <= set(stored_seqs(store, fleet_name, d)),
                30,
                f"every telemetry message of {device} in the store",
            )
            stored = stored_seqs(store, fleet_name, device)
            measured[device] = {"sent": len(sent), "stored": len(set(stored))}
            assert sorted(s for s, n in Counter(stored).items() if n > 1) == []
            assert set(stored) == sent, (device, len(sent - set(stored)), "lost")
    finally:
        measured["seconds"] = round(time.monotonic() - started, 1)
        print(f"\nmeasured (serve ingest, sent == stored): {json.dumps(measured)}")
        fleet.close()
        proxy.close()
