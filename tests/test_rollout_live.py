"""Issue 14 end to end, with real Mosquitto and real agent processes: the live agreement gate aborts a
release that disagrees with the serving model, a first rollout's abort leaves no model serving, a stopped
device is known with its profile to a fresh store (and a deploy waits for it), and a mixed emulated fleet
rolls out healthy releases with default flags."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.errors import BundleRefused
from edgefleet.sdk.trust.command_signing import use_command_keys
from tests.agent_net_support import AgentProcess, agent_args, eval_set, export_tiny_onnx, make_bundle
from tests.fleet_support import device_statuses, wait_for, wait_online
from tests.rollout_support import disagreeing_pair, export_heavy, live_inputs

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def _args(state: Path, url: str, fleet: str, device: str, key: Path, *extra: str) -> list[str]:
    """An agent command line with the local HTTP API on a free port (written to state/http.port)."""
    args = agent_args(state, url, fleet, device, key, *extra)
    args.remove("--no-http")
    return [*args, "--http-port", "0"]


@contextmanager
def _agents(
    tmp: Path,
    url: str,
    fleet: str,
    key: Path,
    ids: list[str],
    *extra: str,
    emulate: dict[str, str] | None = None,
) -> Iterator[dict[str, AgentProcess]]:
    procs: dict[str, AgentProcess] = {}
    try:
        for device in ids:
            (tmp / device).mkdir(parents=True, exist_ok=True)
            more = ["--emulate", emulate[device]] if emulate and device in emulate else []
            procs[device] = AgentProcess(
                _args(tmp / device, url, fleet, device, key, *extra, *more), tmp / f"{device}.log"
            )
            procs[device].start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _port(state: Path) -> int:
    """The agent's local API port (state/http.port holds {"port": N})."""
    path = state / "http.port"
    text = wait_for(lambda: path.is_file() and path.read_text().strip(), 20, f"{path}")
    return int(json.loads(text)["port"])


def _infer(port: int, row: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/infer",
        data=json.dumps({"inputs": {"x": row}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextmanager
def _traffic(ports: list[int]) -> Iterator[list[int]]:
    """Unlabelled live requests to the agents' local APIs on a thread; yields the answered count."""
    stop = threading.Event()
    answered = [0]
    x = live_inputs(5000, seed=3)

    def run() -> None:
        i = 0
        while not stop.is_set():
            for port in ports:
                status, _ = _infer(port, x[i % len(x)][None, :].tolist())
                answered[0] += status == 200
            i += 1
            stop.wait(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        stop.set()
        thread.join(10)


def _active(fleet: Fleet) -> dict[str, tuple[Any, Any]]:
    fleet.refresh()
    return {
        d["device_id"]: (d.get("active_model"), d.get("active_version"))
        for d in fleet.store.devices(fleet.fleet)
    }


def _versions_on_disk(state: Path) -> set[int]:
    """Versions of every manifest a device holds in its state folder (slots, staging)."""
    found = set()
    for path in state.rglob("manifest.json"):
        try:
            found.add(int(json.loads(path.read_text())["version"]))
        except (ValueError, KeyError, OSError):
            continue
    return found


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: Any, fleet_name: str) -> Iterator[Fleet]:
    f = Fleet(mosquitto.url, store=f"sqlite:///{tmp_path / 'fleet.db'}", fleet=fleet_name, trusted_keys=[])
    yield f
    f.close()


def test_a_release_that_disagrees_on_live_inputs_is_aborted_by_min_agreement(
    tmp_path: Path, mosquitto: Any, fleet_name: str, fleet: Fleet
) -> None:
    from edgefleet.sdk.trust.keys import init_keys

    # prepare: v2 disagrees with v1 on ~30 % of inputs (both pass their own health check)
    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    m1, m2, disagreement = disagreeing_pair(tmp_path)
    assert 0.2 < disagreement < 0.4
    v1 = make_bundle(tmp_path / "v1", tmp_path / "keys", m1, eval_set(m1, tmp_path / "e1.npz"), version=1)
    v2 = make_bundle(tmp_path / "v2", tmp_path / "keys", m2, eval_set(m2, tmp_path / "e2.npz"), version=2)
    ids = ["c1", "c2"]
    shadow = ("--shadow-share", "1", "--shadow-cpu", "0.5")
    with _agents(tmp_path, mosquitto.url, fleet_name, keys.public_path, ids, *shadow):
        wait_online(fleet.store, fleet_name, fleet.options, ids)
        assert fleet.deploy(v1, "all", timeout_s=60).status == "succeeded"
        # act: canary:50 (c1 first) with the live agreement gate; traffic to the canary during the soak
        handle = fleet.deploy(
            v2, "all", strategy="canary:50", soak_s=40, timeout_s=60, min_agreement=0.9, wait=False
        )
        wait_for(lambda: device_statuses(fleet.store, handle.id)["c1"] == "deployed", 30, "the canary")
        with _traffic([_port(tmp_path / "c1")]) as answered:
            status = handle.wait(40)
        row = fleet.rollout(handle.id)
        active = _active(fleet)
        served = _infer(_port(tmp_path / "c1"), live_inputs(1)[0][None, :].tolist())
    # assert: aborted on agreement, canary back on v1, the other device never received v2
    assert status == "aborted", row
    assert "live agreement" in str(row["reason"]) and "minimum 0.9" in str(row["reason"]), row["reason"]
    assert answered[0] >= 50
    assert device_statuses(fleet.store, handle.id) == {"c1": "rolled-back", "c2": "not-notified"}
    assert active == {"c1": ("tiny", 1), "c2": ("tiny", 1)}
    assert served[0] == 200 and served[1].get("version") == 1, served
    assert 2 not in _versions_on_disk(tmp_path / "c2")


def test_an_aborted_first_rollout_leaves_no_model_serving(
    tmp_path: Path, mosquitto: Any, fleet_name: str, fleet: Fleet
) -> None:
    from edgefleet.sdk.cli import app
    from edgefleet.sdk.trust.keys import init_keys

    # prepare: two fresh devices, no model ever installed
    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    m1 = export_tiny_onnx(tmp_path / "m1.onnx")
    v1 = make_bundle(tmp_path / "v1", tmp_path / "keys", m1, eval_set(m1, tmp_path / "e1.npz"), version=1)
    ids = ["f1", "f2"]
    with _agents(tmp_path, mosquitto.url, fleet_name, keys.public_path, ids):
        wait_online(fleet.store, fleet_name, fleet.options, ids)
        handle = fleet.deploy(v1, "all", strategy="canary:50", soak_s=60, timeout_s=60, wait=False)
        wait_for(lambda: device_statuses(fleet.store, handle.id)["f1"] == "deployed", 30, "the canary")
        # act: the release is aborted during its soak
        handle.abort("bad release")
        status = handle.wait(30)
        code, body = _infer(_port(tmp_path / "f1"), [[0.0] * 8])
        active = _active(fleet)
    listing = CliRunner().invoke(
        app, ["rollouts", "--db", f"sqlite:///{tmp_path / 'fleet.db'}", "--fleet", fleet_name]
    )
    # assert: the canary dropped the model (503 no-model, state says no model), per-device truth shown
    assert status == "aborted"
    statuses = device_statuses(fleet.store, handle.id)
    assert statuses == {"f1": "rolled-back", "f2": "not-notified"}
    reason = {d["device_id"]: d["reason"] for d in fleet.rollout(handle.id)["devices"]}["f1"]
    assert "no previous model" in str(reason)
    assert (
        code,
        body.get("error", {}).get("code") if isinstance(body.get("error"), dict) else body.get("code"),
    ) == (
        503,
        "no-model",
    ), body
    assert active["f1"] == (None, None)
    assert listing.exit_code == 0 and "aborted" in listing.output and "1 rolled-back" in listing.output


def test_a_stopped_device_is_known_offline_and_a_deploy_waits_for_it(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    m1 = export_tiny_onnx(tmp_path / "m1.onnx")
    v1 = make_bundle(tmp_path / "v1", tmp_path / "keys", m1, eval_set(m1, tmp_path / "e1.npz"), version=1)
    first = Fleet(mosquitto.url, store=f"sqlite:///{tmp_path / 'a.db'}", fleet=fleet_name, trusted_keys=[])
    proc = AgentProcess(
        agent_args(tmp_path / "s1", mosquitto.url, fleet_name, "s1", keys.public_path, "--tag", "lab"),
        tmp_path / "s1.log",
    )
    (tmp_path / "s1").mkdir()
    proc.start()
    try:
        wait_online(first.store, fleet_name, first.options, ["s1"])
    finally:
        first.close()
    assert proc.stop() == 0
    # act: a fresh store learns the fleet from the broker
    fresh = Fleet(mosquitto.url, store=f"sqlite:///{tmp_path / 'b.db'}", fleet=fleet_name, trusted_keys=[])
    try:
        rows = fresh.devices()
        # assert: offline, with its profile and tags
        assert [(r["device_id"], r["online"], r["profile"], r["tags"]) for r in rows] == [
            ("s1", False, "x86-64", ["lab"])
        ]
        with pytest.raises(BundleRefused, match="offline"):
            fresh.deploy(v1, "all", skip_offline=True)
        # a deploy to it waits: the device comes back and installs
        handle = fresh.deploy(v1, "all", timeout_s=60, wait=False)
        proc.start()
        assert handle.wait(60) == "succeeded", fresh.rollout(handle.id)
    finally:
        proc.stop()
        fresh.close()


def _median_ms(model: Path, runs: int = 15) -> float:
    """Median single-row latency of `model` on one thread of this host (sets the test's budgets)."""
    import time

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.zeros((1, session.get_inputs()[0].shape[1]), dtype=np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def test_a_mixed_emulated_fleet_rolls_out_healthy_releases_with_default_flags(
    tmp_path: Path, mosquitto: Any, fleet_name: str, fleet: Fleet
) -> None:
    from edgefleet.sdk.trust.keys import init_keys

    # prepare: an emulated rpi4b running a model of ~10-30 ms (its budget: 100 ms) and an emulated
    # Jetson Orin Nano running the tiny model (its 20 ms budget). Pooled, the rpi's latency is over the
    # Jetson's budget (what aborted healthy releases); each against its own budget, both are healthy.
    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    ids = ["pi", "nano"]
    profiles = {"pi": "rpi4b", "nano": "jetson-orin-nano"}
    # The budgets follow this host's speed, so the test means the same on a fast or a loaded machine:
    # the rpi's own budget far above its model's latency, the Jetson's well below it (and still far
    # above the tiny model's). The test asserts outcomes, never a time.
    # The Jetson's budget keeps a floor of 2.5 ms: on a loaded host the tiny model's p95 reached 1.65 ms
    # (once above a 1 ms floor); the 10-layer model stays several times above it.
    heavy_ms = _median_ms(export_heavy(tmp_path / "probe.onnx", seed=0, layers=10))
    budgets = {"rpi4b": max(100.0, 20 * heavy_ms), "jetson-orin-nano": max(2.5, heavy_ms / 3)}
    with _agents(tmp_path, mosquitto.url, fleet_name, keys.public_path, ids, emulate=profiles):
        wait_online(fleet.store, fleet_name, fleet.options, ids)
        ports = [_port(tmp_path / d) for d in ids]
        outcomes = []
        slow: list[float | None] = []
        with _traffic(ports):
            for version in range(1, 6):
                models = {
                    "rpi4b": export_heavy(tmp_path / f"h{version}.onnx", seed=version, layers=10),
                    "jetson-orin-nano": export_tiny_onnx(tmp_path / f"t{version}.onnx", seed=version),
                }
                bundles = [
                    make_bundle(
                        tmp_path / f"v{version}-{p}",
                        tmp_path / "keys",
                        model,
                        eval_set(model, tmp_path / f"e{version}-{p}.npz", n=16),
                        version=version,
                        profile=p,
                        max_p95_ms=budgets[p],
                    )
                    for p, model in models.items()
                ]
                # act: default flags, with a soak so the telemetry rules do judge
                handle = fleet.deploy(bundles, "all", soak_s=3.0, timeout_s=60)
                outcomes.append((str(handle.status), fleet.rollout(handle.id)["reason"]))
                slow += [
                    s.p95_ms
                    for s in handle.engine.telemetry
                    if s.device_id == "pi" and s.count and (s.p95_ms or 0) > budgets["jetson-orin-nano"]
                ]
    # assert: five out of five, although the rpi's p95 was above the Jetson's budget
    assert outcomes == [("succeeded", None)] * 5, outcomes
    assert slow, "the rpi's model must be slower than the Jetson's budget for this test to mean anything"


def test_the_registry_asks_devices_to_re_announce_when_the_broker_lost_their_state(
    tmp_path: Path, mosquitto: Any, fleet_name: str, fleet: Fleet
) -> None:
    import paho.mqtt.client as mqtt

    from edgefleet.agent.core.topics import Topics
    from edgefleet.sdk.fleet import registry
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    with _agents(tmp_path, mosquitto.url, fleet_name, keys.public_path, ["r1"]):
        wait_online(fleet.store, fleet_name, fleet.options, ["r1"])
        # prepare: the broker loses the retained state (as brokers with weak retained support do)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        client.publish(Topics(fleet_name, "r1").state, b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        fleet.store.upsert_device(fleet_name, "r1", profile=None, tags=[])
        # act: a refresh finds no retained state for a device it believes online
        seen = registry.refresh(fleet.store, fleet.options, fleet_name)
        row = fleet.store.device(fleet_name, "r1")
    # assert: the device answered the status command with its state
    assert seen == 1
    assert row is not None and row["online"] and row["profile"] == "x86-64"
