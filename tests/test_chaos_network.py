"""Chaos: the network between an agent and the broker is cut (a proxy the test controls drops every byte).

Promises checked: the host marks the cut device offline within 1.5 × its MQTT keepalive; the agent
reconnects with exponential backoff up to its cap; a rollout to the device that does not come back times
out cleanly (that device `timed-out`, the rollout ends with the status its rules give, no exception);
and when the link heals the device is back online.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.protocol import Topics
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.strategy import AbortRules
from edgefleet.sdk.store import Store
from tests.chaos_support import ChaosProxy, TopicWatcher
from tests.fleet_support import agents, build_artifacts, device_statuses, wait_for, wait_online

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.slow]

# The agent refuses a keepalive under 5 s (agent/config.py); the broker allows 1.5 × this of silence.
KEEPALIVE_S = 5
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 2.0
# Attempts seen at the proxy while it refuses: enough to pass the cap (0.5, 1, 2, 2, 2, ... s).
ATTEMPTS = 7
DEVICE_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("chaos-net-bundles"))


@pytest.fixture
def proxy(mosquitto: Any) -> Iterator[ChaosProxy]:
    p = ChaosProxy(mosquitto.port).start()
    yield p
    p.close()


def _agent_config(path: Path) -> Path:
    path.write_text(
        f"keepalive_s = {KEEPALIVE_S}\n"
        f"reconnect_min_s = {RECONNECT_MIN_S}\n"
        f"reconnect_max_s = {RECONNECT_MAX_S}\n"
    )
    return path


def _online(store: Store, fleet: str, device: str) -> bool:
    return bool((store.device(fleet, device) or {}).get("online"))


def test_a_cut_device_goes_offline_in_time_reconnects_with_backoff_and_its_rollout_times_out(
    tmp_path: Path, mosquitto: Any, proxy: ChaosProxy, fleet_name: str, artifacts: dict[str, Path]
) -> None:
    # prepare: one agent behind the proxy, one straight on the broker; a host ingesting (as `serve`)
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    config = _agent_config(tmp_path / "agent.toml")
    wills = TopicWatcher(mosquitto.url, Topics(fleet_name, "cut-1").state)
    measured: dict[str, Any] = {"keepalive_s": KEEPALIVE_S}
    try:
        fleet.start_ingest()
        with (
            agents(
                tmp_path / "a", proxy.url, fleet_name, artifacts["key"], ["cut-1"], "--config", str(config)
            ),
            agents(
                tmp_path / "b", mosquitto.url, fleet_name, artifacts["key"], ["ok-1"], "--config", str(config)
            ),
        ):
            wait_online(store, fleet_name, fleet.options, ["cut-1", "ok-1"])
            wait_for(lambda: store.telemetry_count(fleet_name, "cut-1") >= 2, 30, "telemetry from cut-1")
            # act 1: pull the cable
            t_cut = proxy.cut()
            offline_at = wait_for(
                lambda: not _online(store, fleet_name, "cut-1") and time.monotonic(),
                6 * KEEPALIVE_S,
                "the host to mark cut-1 offline",
            )
            measured["cut_to_offline_s"] = round(offline_at - t_cut, 3)
            # assert 1: MQTT's keepalive rule, 1.5 × keepalive of silence means gone, no slack on top.
            # Measured from the cut, which comes at or after the last packet the rule counts from.
            # (The host's liveness check meets it; Mosquitto 2.0's Last Will alone comes 1.5 × keepalive
            # plus up to 6 s later, at its next keepalive sweep: see cut_to_last_will_s.)
            assert offline_at - t_cut <= 1.5 * KEEPALIVE_S, measured
            assert _online(store, fleet_name, "ok-1"), "the device whose link is fine stays online"

            # act 2: a rollout to both while cut-1 is still unreachable
            rules = AbortRules(max_failed_pct=50)
            handle = fleet.deploy(
                artifacts["v1"],
                "all",
                timeout_s=DEVICE_TIMEOUT_S,
                ready_timeout_s=2.0,
                rules=rules,
                wait=False,
            )
            status = handle.wait(DEVICE_TIMEOUT_S + 60)
            # assert 2: the rollout ends by itself, cut-1 timed out, ok-1 got the model
            assert handle.error is None
            assert status == "completed"
            statuses = device_statuses(store, handle.id)
            assert statuses == {"cut-1": "timed-out", "ok-1": "deployed"}
            row = store.rollout(handle.id)
            assert row is not None and row["reason"] == "1 deployed, 1 timed-out"
            reasons = {d["device_id"]: d["reason"] for d in row["devices"]}
            assert f"no outcome within {DEVICE_TIMEOUT_S:g} s" in str(reasons["cut-1"])
            # The rollout no longer wants its model on cut-1: desired goes back to what ran there.
            assert (store.device(fleet_name, "cut-1") or {}).get("desired_model") is None

            # assert 3: the agent found the link dead by itself and retries with growing, capped delays
            wait_for(
                lambda: len(proxy.attempts_since(t_cut)) >= ATTEMPTS, 60, f"{ATTEMPTS} reconnect attempts"
            )
            attempts = proxy.attempts_since(t_cut)
            intervals = [b - a for a, b in zip(attempts, attempts[1:])]
            measured["reconnect_intervals_s"] = [round(i, 3) for i in intervals]
            for i, interval in enumerate(intervals):
                # Equal jitter: each delay is at least half its step, the step doubles per failure.
                step = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** (i + 1))
                assert interval >= step / 2 - 0.01, measured
            assert intervals[0] < intervals[3], measured
            capped = intervals[3:]
            for i, interval in enumerate(capped, start=3):
                # Without the cap the step would be min × 2^(i+1); its lower half alone is above these.
                assert interval < RECONNECT_MIN_S * 2 ** (i + 1) / 2 + 0.5, measured
            assert statistics.median(capped) <= RECONNECT_MAX_S + 0.5, measured

            # act 4: the link heals; the device comes back by itself
            t_heal = time.monotonic()
            proxy.heal()
            back_at = wait_for(
                lambda: _online(store, fleet_name, "cut-1") and time.monotonic(),
                30,
                "cut-1 to be online again after the link healed",
            )
            measured["heal_to_online_s"] = round(back_at - t_heal, 3)
            # For the record: when the broker itself gave up on the link (its Last Will).
            will_at = wills.offline_since(t_cut)
            measured["cut_to_last_will_s"] = None if will_at is None else round(will_at - t_cut, 3)
    finally:
        print(f"\nmeasured (network cut): {json.dumps(measured)}")
        wills.close()
        fleet.close()
        store.close()
