"""Federated fine-tuning on a real fleet: Mosquitto, five agent processes with their own digits shares.

One fleet serves the module (starting five agents and deploying to them is the slow part); the tests
run in file order: rounds that train and leak nothing, stragglers and bad updates, a broker restart
mid-round, a device killed mid-round, and last the CLI end to end (federate → VERIFIED bundle → canary).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.federated_msgs import FedUpdate
from edgefleet.agent.core.protocol import parse_device_message
from tests.agent_net_support import AgentProcess, agent_args
from tests.conftest import Mosquitto, free_port
from tests.federated_support import (
    DroppingSecAggDevice,
    Recorder,
    RogueDevice,
    digits,
    digits_bundle,
    digits_mlp,
    payload_views,
    shares,
)
from tests.fleet_support import wait_for

DEVICES = [f"dev{i}" for i in range(5)]
FEEDBACK_DEVICE, FEEDBACK_KEEP = "dev4", 5
FAST = dict(local_epochs=2, lr=0.5, batch=16, min_clients=3, round_timeout_s=20.0)


@dataclass
class FedFleet:
    """The module's fleet: broker, agents, host Fleet, keys and the federation-ready bundle (v2)."""

    root: Path
    broker: Mosquitto
    agents: dict[str, AgentProcess]
    fleet: Any
    keys: Path
    bundle: Path
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    fleet_name: str


def _wait_serving(fleet: Any, ids: list[str], version: int, timeout: float = 60.0) -> None:
    def ready() -> bool:
        rows = {d["device_id"]: d for d in fleet.devices(refresh=True)}
        return all(rows.get(i, {}).get("online") and rows[i].get("active_version") == version for i in ids)

    wait_for(ready, timeout, f"{ids} online serving v{version}")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FedFleet]:
    """Keys, the digits model as bundle v1 → federation-ready v2, a broker, five agents serving v2."""
    import uuid

    from edgefleet.sdk.federated.result import prepare_bundle
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.fleet.strategy import AbortRules
    from edgefleet.sdk.trust.keys import init_keys, load_private_key

    root = tmp_path_factory.mktemp("fed")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEFLEET_HOME", str(root / "home"))
    keys = root / "keys"
    init_keys(keys)
    x, y = digits()
    model = digits_mlp(root / "digits.onnx", x[:300], y[:300])
    v1 = digits_bundle(root / "v1", keys, model, x[-300:], y[-300:])
    v2 = prepare_bundle(v1, root / "v2", private_key=load_private_key(keys / "fleet.key"))
    broker = Mosquitto(port=free_port(), workdir=root / "broker")
    broker.start()
    name = f"f{uuid.uuid4().hex[:10]}"
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    agents: dict[str, AgentProcess] = {}
    for device, (dx, dy) in zip(DEVICES, shares(x[300:-300], y[300:-300], len(DEVICES))):
        folder = root / device / "train"
        folder.mkdir(parents=True)
        np.savez(folder / "local.npz", x=dx, y=dy)
        data[device] = (dx, dy)
        extra = ["--train-data", str(folder), "--tag", "fed"]
        if device == FEEDBACK_DEVICE:
            # This one also keeps labelled requests (HTTP on a port of its own, 0: any).
            extra += ["--keep-feedback", str(FEEDBACK_KEEP), "--http-port", "0"]
        args = agent_args(root / device / "state", broker.url, name, device, keys / "fleet.pub", *extra)
        if device == FEEDBACK_DEVICE:
            args.remove("--no-http")
        agents[device] = AgentProcess(args, root / f"{device}.log")
        agents[device].start()
    fleet = Fleet(
        broker.url, store=f"sqlite:///{root / 'host.db'}", fleet=name, trusted_keys=[keys / "fleet.pub"]
    )
    try:
        wait_for(
            lambda: len([d for d in fleet.devices() if d.get("online")]) == len(DEVICES), 60, "agents online"
        )
        handle = fleet.deploy(
            v2, "tag:fed", rules=AbortRules(telemetry=False), ready_timeout_s=5.0, timeout_s=60.0
        )
        assert str(handle.status) in ("succeeded", "completed"), fleet.rollout(handle.id)
        _wait_serving(fleet, DEVICES, 2)
        yield FedFleet(root, broker, agents, fleet, keys, v2, data, name)
    finally:
        fleet.close()
        for proc in agents.values():
            proc.stop()
        broker.stop(kill=True)
        mp.undo()


def _run(fed: FedFleet, out: str, **options: Any) -> dict[str, Any]:
    settings = {**FAST, **options}
    return fed.fleet.federate(fed.bundle, "all", fed.root / out, key=fed.keys / "fleet.key", **settings)


def test_rounds_train_the_head_and_no_raw_data_leaves_a_device(fed: FedFleet) -> None:
    # prepare: a subscriber to every topic of the broker, for the whole task
    recorder = Recorder(fed.broker.url)
    # act
    try:
        report = _run(fed, "out-a", rounds=3)
    finally:
        recorder.close()
    # assert: every round had all five devices, and the head learned (from a zeroed head's ~0.1)
    assert [len(r["participants"]) for r in report["rounds"]] == [5, 5, 5]
    assert all(r["aggregated"] and not r["dropouts"] and not r["refused"] for r in report["rounds"])
    assert report["baseline_accuracy"] < 0.3 and report["accuracy"] > 0.7
    manifest = json.loads((Path(report["bundle"]) / "manifest.json").read_text())
    assert manifest["name"] == "digits" and manifest["version"] == 3 and manifest["federated"]["rounds"] == 3
    assert json.loads((Path(report["bundle"]) / "report.json").read_text())["rounds"][2]["round"] == 3
    # assert: no input row and no run of labels of any device in any message, whatever its encoding
    views = [v for _, payload in recorder.messages for v in payload_views(payload)]
    assert any(b"fed-update" in v for v in views), "the recorder saw no update: it proves nothing"
    for device, (x, y) in fed.data.items():
        needles = [row.astype(dtype).tobytes() for row in x[:50] for dtype in (np.float32, np.float64)]
        needles += [y[:12].astype(dtype).tobytes() for dtype in (np.int64, np.int32, np.uint8)]
        needles.append(json.dumps(y[:12].tolist()).encode())
        for i, needle in enumerate(needles):
            hits = [v[:200] for v in views if needle in v]
            assert not hits, f"raw data of {device} (needle {i}) left the device: {hits[:2]}"
    # assert: an update costs at most 2.5x the head's fp32 size on the wire
    head_bytes = 4 * (16 * 10 + 10)
    updates = [p for t, p in recorder.messages if isinstance(_parsed(p), FedUpdate)]
    assert len(updates) == 15 and max(len(p) for p in updates) <= 2.5 * head_bytes


def _parsed(payload: bytes) -> Any:
    try:
        return parse_device_message(payload)
    except Exception:
        return None


def test_labelled_requests_go_into_a_bounded_buffer_on_the_device(fed: FedFleet) -> None:
    import urllib.request

    # prepare: the device's local HTTP API
    state = fed.root / FEEDBACK_DEVICE / "state"
    port = json.loads((state / "http.port").read_text())["port"]
    x, y = fed.data[FEEDBACK_DEVICE]

    def post(path: str, doc: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", json.dumps(doc).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    # act: eight requests, each labelled by the app
    for row, label in zip(x[:8], y[:8]):
        answer = post("/v1/infer", {"inputs": {"x": [row.tolist()]}})
        post("/v1/feedback", {"request_id": answer["request_id"], "label": int(label)})
    # assert: at most FEEDBACK_KEEP examples on disk, the newest ones, with their labels
    files = sorted((state / "feedback").glob("slot-*.npz"))
    assert len(files) == FEEDBACK_KEEP
    kept = sorted(int(np.load(f)["y"]) for f in files)
    assert kept == sorted(int(v) for v in y[3:8])


def test_stragglers_are_cut_and_bad_updates_refused_with_a_code(fed: FedFleet) -> None:
    # prepare: four rogue devices serving the same model: silent, wrong shape, NaN, norm over the bound
    def answer(kind: str) -> Any:
        def make(plan: dict[str, Any], ref: str) -> dict[str, Any] | None:
            size = 16 * 10 + 10
            vector = {
                "shape": np.zeros(size + 3, np.float32),
                "nan": np.full(size, np.nan, np.float32),
                "norm": np.full(size, 1e4, np.float32),
            }.get(kind)
            if vector is None:
                return None
            return {
                "task": plan["task"],
                "round": plan["round"],
                "ref": ref,
                "samples": 100,
                "dtype": "float32",
                "shape": (vector.size,),
                "data": vector.astype("<f4").tobytes(),
            }

        return make

    rogues = [
        RogueDevice(fed.broker.url, fed.fleet_name, f"rogue-{k}", ("digits", 2), answer(k))
        for k in ("slow", "shape", "nan", "norm")
    ]
    # act
    try:
        report = _run(fed, "out-b", rounds=1, round_timeout_s=4.0)
    finally:
        for rogue in rogues:
            rogue.close()
    # assert: the straggler is a dropout, each bad update refused with its code, the round still counts
    [r] = report["rounds"]
    assert r["dropouts"] == ["rogue-slow"]
    assert r["refused"] == {
        "rogue-shape": "update-shape",
        "rogue-nan": "update-not-finite",
        "rogue-norm": "update-norm",
    }
    assert r["participants"] == DEVICES and r["aggregated"]
    assert 3.5 <= r["seconds"] < 10


def test_a_task_refuses_to_start_with_fewer_devices_than_min_clients(fed: FedFleet) -> None:
    from edgefleet.sdk.federated.task import FederatedError

    # act / assert: six needed, five serve the model; nothing is sent
    with pytest.raises(FederatedError, match="fewer than --min-clients 6"):
        _run(fed, "out-m", rounds=1, min_clients=6)


def test_a_broker_restart_mid_round_loses_no_round(fed: FedFleet) -> None:
    # prepare: restart the broker right after the first round's plans went out
    restarted: list[int] = []

    def restart(round_no: int, devices: list[str]) -> None:
        if round_no == 1:
            fed.broker.restart()
            restarted.append(round_no)

    # act: a plain task and a secure one, each with the broker restarting in its first round
    plain = _run(fed, "out-c", rounds=2, on_sent=restart)
    secure = _run(fed, "out-c2", rounds=1, on_sent=restart, secure_agg=True)
    # assert: every round reached min clients (devices answer again after the restart, never twice)
    assert restarted == [1, 1]
    for report in (plain, secure):
        assert all(r["aggregated"] for r in report["rounds"]), report["rounds"]
        assert len(report["rounds"][0]["participants"]) >= 3


def test_secure_aggregation_survives_a_device_dropping_after_it_shared_its_keys(fed: FedFleet) -> None:
    # prepare: a sixth device that shares its keys, then vanishes before sending its masked input
    rogue = DroppingSecAggDevice(fed.broker.url, fed.fleet_name, "rogue-secagg", ("digits", 2))
    # act
    try:
        report = _run(fed, "out-s", rounds=2, secure_agg=True, round_timeout_s=6.0)
    finally:
        rogue.close()
    # assert: its masks were removed from the sum with the others' shares; the head still learned
    first = report["rounds"][0]
    assert first["participants"] == DEVICES and first["dropouts"] == ["rogue-secagg"] and first["aggregated"]
    assert report["accuracy"] > 0.6


def test_device_level_dp_under_secure_aggregation_adds_noise_on_the_devices(fed: FedFleet) -> None:
    # act: clipped updates, each device adding its share of N(0, (σC)²), summed under masks
    report = _run(fed, "out-dl", rounds=2, secure_agg=True, dp_level="device", dp_noise=0.5, dp_clip=1.0)
    # assert: the rounds counted, and ε is accounted at device level
    assert all(r["aggregated"] and len(r["participants"]) == 5 for r in report["rounds"])
    privacy = report["privacy"]
    assert (
        privacy["level"] == "device"
        and 0 < privacy["epsilon"] < float("inf")
        and privacy["noise_multiplier"] == 0.5
    )


def test_a_device_killed_mid_round_is_a_dropout_and_the_task_finishes(fed: FedFleet) -> None:
    # prepare: kill dev0 with SIGKILL as soon as round 1's plans are out
    def kill(round_no: int, devices: list[str]) -> None:
        if round_no == 1:
            fed.agents["dev0"].kill9()

    # act
    try:
        report = _run(fed, "out-d", rounds=2, round_timeout_s=5.0, on_sent=kill)
    finally:
        fed.agents["dev0"].start()
    # assert: dev0 answered before it died or dropped; round 2 went on without it; a bundle came out
    first, second = report["rounds"]
    assert "dev0" in first["participants"] + first["dropouts"]
    assert "dev0" not in second["participants"]
    assert first["aggregated"] and second["aggregated"] and Path(report["bundle"], "manifest.json").is_file()
    _wait_serving(fed.fleet, DEVICES, 2)


@pytest.mark.slow
def test_cli_federate_gives_a_verified_bundle_that_a_canary_rolls_out(fed: FedFleet) -> None:
    # prepare
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app
    from edgefleet.sdk.fleet.strategy import AbortRules

    runner = CliRunner()
    out = fed.root / "out-e"
    common = [
        "--broker",
        fed.broker.url,
        "--fleet",
        fed.fleet_name,
        "--db",
        f"sqlite:///{fed.root / 'host.db'}",
    ]
    # act: federate with record-level DP, then inspect the result
    result = runner.invoke(
        app,
        [
            "federate",
            str(fed.bundle),
            "--to",
            "tag:fed",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--lr",
            "0.5",
            "--min-clients",
            "3",
            "--round-timeout",
            "20",
            "--dp-epsilon",
            "8",
            "--dp-delta",
            "1e-5",
            "--key",
            str(fed.keys / "fleet.key"),
            "--trusted-key",
            str(fed.keys / "fleet.pub"),
            "-o",
            str(out),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "round 2/2: " in result.output and "accuracy" in result.output and "ε" in result.output
    inspected = runner.invoke(app, ["inspect", str(out), "--key", str(fed.keys / "fleet.pub"), "--json"])
    # assert: VERIFIED, next version, ε ≤ 8 in report.json and the manifest
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.output)
    assert info["verified"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 3 and 0 < manifest["federated"]["privacy"]["epsilon"] <= 8
    assert json.loads((out / "report.json").read_text())["privacy"]["delta"] == 1e-5
    # act: a canary rollout of the result with the usual gates (telemetry: quality floor, latency)
    handle = fed.fleet.deploy(
        out,
        "tag:fed",
        strategy="canary:20",
        rules=AbortRules(min_samples=1),
        ready_timeout_s=5.0,
        timeout_s=60.0,
    )
    # assert
    assert str(handle.status) in ("succeeded", "completed"), fed.fleet.rollout(handle.id)
    _wait_serving(fed.fleet, DEVICES, 3)
