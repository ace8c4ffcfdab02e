"""The fleet on a 3-node NATS cluster (JetStream, MQTT 3.1.1): a node killed mid-rollout.

The control plane (the real `Fleet`: ingest, registry, rollout engine) talks to node 0; real
`edgefleet-agent` processes with default agent settings talk to nodes 1 and 2, each with a `--broker`
list of both. Node 1 is killed (SIGKILL) while the rollout's broadcast is under way: its devices must move
to node 2 (their persistent sessions live in JetStream, replicated on all three nodes), the rollout must
complete on every device, and every telemetry message an agent put on the wire must be in the store once.
Each agent reaches its nodes through a tapping TCP proxy, so what it sent is known from the wire.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.store import Store
from tests.chaos_support import ChaosProxy, export_wide_onnx
from tests.fleet_support import agents, build_artifacts, device_statuses, stored_seqs, wait_for, wait_online
from tests.nats_support import NatsCluster, nats_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.chaos]

KILLED = 1  # the node that goes down; node 0 carries the control plane, node 2 survives with it


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.agent_net_support import eval_set, make_bundle

    d = tmp_path_factory.mktemp("nats-bundles")
    out = build_artifacts(d)
    # ~1 MB in 16 KiB chunks: a broadcast long enough for a node to die in its middle.
    wide = export_wide_onnx(d / "wide.onnx")
    out["wide"] = make_bundle(d / "wide", d / "keys", wide, eval_set(wide, d / "ew.npz"), version=2)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def _all_stored(store: Store, fleet: str, device: str, sent: set[int]) -> bool:
    """Whether every seq in `sent` is in the store."""
    return sent <= set(stored_seqs(store, fleet, device))


def _progress_of(store: Store, fleet: str, rollout_id: str) -> set[str]:
    """Devices that reported progress on this rollout (their download started)."""
    return {
        e["device_id"]
        for e in store.events(fleet, limit=2000)
        if e["kind"] == "progress" and e["payload"].get("deploy") == rollout_id
    }


def test_a_node_killed_mid_rollout_devices_move_to_another_node_and_nothing_is_lost(
    tmp_path: Path,
    nats_cluster: NatsCluster,  # noqa: F811 - the fixture
    fleet_name: str,
    store: Store,
    artifacts: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prepare: the host's home holds the fleet's keys, so it signs commands with their online key as a
    # host made by `edgefleet keys init` does; a tapping proxy in front of nodes 1 and 2; two agents
    # prefer node 1, two node 2
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    shutil.copytree(artifacts["key"].parent, tmp_path / "home" / "keys")
    cluster = nats_cluster
    proxies = {i: ChaosProxy(cluster.nodes[i].mqtt_port).start() for i in (1, 2)}
    homes = {"a1": (1, 2), "a2": (1, 2), "b1": (2, 1), "b2": (2, 1)}
    fleet = Fleet(broker=cluster.nodes[0].url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    measured: dict[str, Any] = {}
    started: dict[str, Any] = {}
    try:
        fleet.start_ingest()
        for device, order in homes.items():
            brokers = ",".join(proxies[i].url for i in order)
            started[device] = agents(tmp_path, brokers, fleet_name, artifacts["key"], [device])
            started[device].__enter__()
        ids = list(homes)
        wait_online(store, fleet_name, fleet.options, ids, timeout=60)
        # act: roll the ~1 MB bundle out to all four; kill node 1 once downloads are under way
        handle = fleet.deploy(
            artifacts["wide"], "all", timeout_s=90, chunk_size=16 * 1024, delta=False, wait=False
        )
        wait_for(lambda: _progress_of(store, fleet_name, handle.id), 60, "a device to start downloading")
        killed_at = time.monotonic()
        cluster.kill(KILLED)
        status = handle.wait(150)
        measured["kill_to_end_s"] = round(time.monotonic() - killed_at, 2)
        measured["transfer"] = handle.engine.stats.to_dict()
        # assert: the rollout completed on every device, including those whose node died
        assert handle.error is None, handle.error
        assert status == "succeeded", (store.rollout(handle.id) or {}).get("devices")
        assert device_statuses(store, handle.id) == {i: "deployed" for i in ids}
        # ... and the devices of node 1 now talk to node 2 (their births arrived through its proxy)
        for device in ("a1", "a2"):
            wait_for(
                partial(proxies[2].sent_seqs, "/state", device), 30, f"{device} to announce itself on node 2"
            )
        wait_for(
            lambda: all((store.device(fleet_name, i) or {}).get("active_version") == 2 for i in ids),
            30,
            "the ingest to see every device on v2",
        )
        # Telemetry keeps flowing for a moment after the rollout, then the agents stop.
        time.sleep(2.0)
        for ctx in started.values():
            ctx.__exit__(None, None, None)
        started.clear()
        # assert: every telemetry seq an agent put on the wire (to either node) is stored exactly once
        for device in ids:
            sent = {
                s for p in proxies.values() for s in p.sent_seqs("/telemetry", device)
            }  # a QoS 1 resend to the other node repeats a seq: a set
            wait_for(
                partial(_all_stored, store, fleet_name, device, sent),
                60,
                f"every telemetry message of {device} in the store",
            )
            stored = stored_seqs(store, fleet_name, device)
            duplicates = sorted(s for s, n in Counter(stored).items() if n > 1)
            measured[device] = {"sent": len(sent), "stored": len(stored), "duplicates": len(duplicates)}
            assert sent, f"{device} sent no telemetry"
            assert duplicates == [], (device, duplicates)
            assert set(stored) == sent, (device, sorted(sent ^ set(stored)))
            assert store.gaps(fleet_name, device) == []
    finally:
        print(f"\nmeasured (NATS node killed mid-rollout): {json.dumps(measured)}")
        for device in homes:  # what each agent had to say beyond debug lines, for a failing run
            log = tmp_path / f"{device}.log"
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            print(f"--- {device}: " + "\n".join([ln for ln in lines if " DEBUG " not in ln][-8:]))
        for ctx in started.values():
            ctx.__exit__(None, None, None)
        fleet.close()
        for proxy in proxies.values():
            proxy.close()
