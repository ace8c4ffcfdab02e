"""Issue 15 point 8: a bad network, not just a dead one: a 5 MB rollout through latency, a rate cap and resets.

Two real agents reach a real Mosquitto only through tests/fault_proxy.py: 300 ms added latency each way,
1 Mbit/s per connection and direction, and every connection reset (RST) at a random moment 20-60 s after
it opened. The host (rollout engine, ingest) sits next to the broker. The rollout of a ~5 MB bundle must
complete, each device must install it exactly once, and every telemetry message the agents put on the
wire must be stored. The measured figures are printed for the README's Reliability table.
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
from edgefleet.sdk.store import Store
from tests.fault_proxy import FaultProxy
from tests.fleet_support import agents, build_artifacts, device_statuses, stored_seqs, wait_for, wait_online

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.slow]

# Agents retry quickly after a reset (production defaults are 0.5-60 s); telemetry every second.
AGENT_CONFIG = "reconnect_min_s = 0.2\nreconnect_max_s = 2.0\n"
TELEMETRY_INTERVAL_S = 1.0
# hidden² float32 weights: 1120² × 4 B ≈ 5.0 MB of incompressible model.
HIDDEN = 1120


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.agent_net_support import eval_set, make_bundle
    from tests.chaos_support import export_wide_onnx

    d = tmp_path_factory.mktemp("netem-bundles")
    out = build_artifacts(d)
    big = export_wide_onnx(d / "big.onnx", hidden=HIDDEN)
    out["v2-big"] = make_bundle(d / "v2-big", d / "keys", big, eval_set(big, d / "eb.npz"), version=2)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def _sent_seqs(proxy: FaultProxy, device: str) -> set[int]:
    out = set()
    for message in proxy.messages("/telemetry"):
        try:
            obj = json.loads(message.payload)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("device") == device and isinstance(obj.get("seq"), int):
            out.add(int(obj["seq"]))
    return out


def _slots(state_dir: Path) -> dict[str, Any]:
    state = json.loads((state_dir / "install.json").read_text())
    out: dict[str, Any] = {"rejected": state.get("rejected") or []}
    for role in ("active", "previous"):
        slot = state.get(role)
        manifest = state_dir / "slots" / str(slot) / "manifest.json"
        out[role] = json.loads(manifest.read_text())["version"] if slot and manifest.is_file() else None
    out["ledger"] = json.loads((state_dir / "versions.json").read_text())
    return out


def test_a_5mb_rollout_over_a_slow_lossy_link_completes_installs_once_and_loses_no_telemetry(
    tmp_path: Path, mosquitto: Any, fleet_name: str, store: Store, artifacts: dict[str, Path]
) -> None:
    # prepare
    ids = ["n1", "n2"]
    bundle_bytes = sum(f.stat().st_size for f in artifacts["v2-big"].rglob("*") if f.is_file())
    proxy = FaultProxy(mosquitto.port, latency_s=0.3, rate_bps=1_000_000, reset_every_s=(20.0, 60.0)).start()
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    config = tmp_path / "agent.toml"
    config.write_text(AGENT_CONFIG)
    extra = ("--config", str(config), "--telemetry-interval", str(TELEMETRY_INTERVAL_S))
    measured: dict[str, Any] = {"bundle_mb": round(bundle_bytes / 1e6, 2), "devices": len(ids)}
    try:
        fleet.start_ingest()
        with agents(tmp_path, proxy.url, fleet_name, artifacts["key"], ids, *extra):
            wait_online(store, fleet_name, fleet.options, ids, timeout=60)
            assert fleet.deploy(artifacts["v1"], "all", timeout_s=120).status == "succeeded"
            resets_before = proxy.resets
            # act
            started = time.monotonic()
            handle = fleet.deploy(artifacts["v2-big"], "all", timeout_s=400, delta=False, wait=False)
            status = handle.wait(480)
            measured["rollout_s"] = round(time.monotonic() - started, 1)
            measured["resets_during_rollout"] = proxy.resets - resets_before
            measured.update(handle.engine.stats.to_dict())
            # assert: the rollout finished, each device installed v2 exactly once
            assert handle.error is None
            assert status == "succeeded", (store.rollout(handle.id) or {}).get("devices")
            assert device_statuses(store, handle.id) == {i: "deployed" for i in ids}
            for device in ids:
                assert _slots(tmp_path / device) == {
                    "active": 2,
                    "previous": 1,
                    "rejected": [],
                    "ledger": {"tiny": 2},
                }, device
        # assert: every telemetry message an agent put on the wire is stored once
        for device in ids:
            sent = _sent_seqs(proxy, device)
            wait_for(
                lambda d=device, s=sent: s <= set(stored_seqs(store, fleet_name, d)),
                60,
                f"every telemetry message of {device} in the store",
            )
            stored = stored_seqs(store, fleet_name, device)
            measured[f"{device}_telemetry_sent"] = len(sent)
            measured[f"{device}_telemetry_stored"] = len(set(stored))
            assert sorted(s for s, n in Counter(stored).items() if n > 1) == []
            assert set(stored) == sent
    finally:
        measured["resets_total"] = proxy.resets
        measured["connections_total"] = proxy.connections
        print(f"\nmeasured (netem rollout): {json.dumps(measured)}")
        fleet.close()
        proxy.close()
