"""Rollouts end to end: a real Mosquitto, real agent processes (`edgefleet-agent`), tiny signed bundles."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.core.protocol import InferCommand, Topics, encode_array
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.errors import BundleRefused, RolloutConflict, SelectorError
from edgefleet.sdk.fleet.progress import engine_alive
from edgefleet.sdk.fleet.strategy import AbortRules
from edgefleet.sdk.store import Store
from edgefleet.sdk.trust.command_signing import COMMAND_KEYS_ENV
from tests.command_support import signed
from tests.fleet_support import agents, build_artifacts, device_statuses, wait_for, wait_online

pytestmark = [pytest.mark.broker, pytest.mark.slow]
EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("fleet-bundles"))


@pytest.fixture
def env(tmp_path: Path, mosquitto: Any, fleet_name: str, artifacts: dict[str, Path]) -> Any:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    client = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    yield client
    client.close()
    store.close()


def _active(client: Fleet) -> dict[str, Any]:
    client.refresh()
    return {
        d["device_id"]: (d["active_model"], d["active_version"]) for d in client.store.devices(client.fleet)
    }


def _bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name not in ("manifest.json", "signature.json"))


def test_canary_succeeds_then_the_rest_follow(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    # prepare
    ids = ["d1", "d2", "d3"]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids):
        wait_online(env.store, env.fleet, env.options, ids)
        assert env.deploy(artifacts["v1"], "all").status == "succeeded"
        # act
        handle = env.deploy(artifacts["v2"], "all", strategy="canary:30", soak_s=1.0, timeout_s=60)
        # assert
        assert handle.status == "succeeded"
        row = env.store.rollout(handle.id)
        assert row is not None
        assert sorted(d["wave"] for d in row["devices"]) == [0, 1, 1]
        assert all(d["status"] == "deployed" for d in row["devices"])
        assert _active(env) == {i: ("tiny", 2) for i in ids}
        # One broadcast per wave, whatever the number of devices in it.
        assert handle.engine.stats.broadcast_bytes == 2 * _bundle_bytes(artifacts["v2"])
        assert env.differences() == []


def test_canary_failing_its_health_check_aborts_and_spares_the_rest(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    ids = ["d1", "d2", "d3"]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids):
        wait_online(env.store, env.fleet, env.options, ids)
        assert env.deploy(artifacts["v1"], "all").status == "succeeded"
        handle = env.deploy(artifacts["broken"], "all", strategy="canary:30", soak_s=1.0, timeout_s=60)
        assert handle.status == "aborted"
        statuses = device_statuses(env.store, handle.id)
        assert statuses == {"d1": "rejected", "d2": "not-notified", "d3": "not-notified"}
        row = env.store.rollout(handle.id)
        assert row is not None and "1 rejected" in str(row["reason"])
        assert _active(env) == {i: ("tiny", 1) for i in ids}
        # Desired goes back to what runs: nothing left to reconcile.
        assert env.differences() == []


def _infer_load(url: str, fleet: str, device: str, stop: threading.Event, keys: Path) -> None:
    """Send inferences over MQTT (signed with the online key in `keys`) so telemetry windows carry traffic."""
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"load-{device}-{os.getpid()}")
    client.connect(host, int(port))
    client.loop_start()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    n = 0
    while not stop.wait(0.05):
        n += 1
        cmd = InferCommand(id=f"load-{n}", inputs={"x": encode_array(x)})
        client.publish(Topics(fleet, device).cmd, signed(keys, cmd.to_wire(), device), qos=1)
    client.disconnect()
    client.loop_stop()


def test_canary_over_its_latency_budget_in_telemetry_aborts_and_rolls_back(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    ids = ["d1", "d2", "d3"]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids, "--mqtt-infer"):
        wait_online(env.store, env.fleet, env.options, ids)
        assert env.deploy(artifacts["v1"], "all").status == "succeeded"
        # A budget no real request meets: the canary passes its health check (the manifest allows
        # 1000 ms) but its live p95 in telemetry is over the rollout's budget.
        rules = AbortRules(max_p95_ms=1e-6)
        handle = env.deploy(
            artifacts["v2"], "all", strategy="canary:30", soak_s=30.0, timeout_s=60, rules=rules, wait=False
        )
        wait_for(
            lambda: device_statuses(env.store, handle.id)["d1"] == "deployed", 30, "the canary to deploy"
        )
        stop = threading.Event()
        load = threading.Thread(
            target=_infer_load,
            args=(mosquitto.url, env.fleet, "d1", stop, artifacts["key"].parent),
            daemon=True,
        )
        load.start()
        try:
            assert handle.wait(30) == "aborted"
        finally:
            stop.set()
            load.join(5)
        row = env.store.rollout(handle.id)
        assert row is not None and "p95 latency" in str(row["reason"]) and "budget" in str(row["reason"])
        assert device_statuses(env.store, handle.id) == {
            "d1": "rolled-back",
            "d2": "not-notified",
            "d3": "not-notified",
        }
        assert _active(env) == {i: ("tiny", 1) for i in ids}


def test_mixed_profiles_each_get_their_own_bundle(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    with (
        agents(tmp_path / "x", mosquitto.url, env.fleet, artifacts["key"], ["x1", "x2"]),
        agents(tmp_path / "a", mosquitto.url, env.fleet, artifacts["key"], ["a1"], profile="arm64"),
    ):
        wait_online(env.store, env.fleet, env.options, ["x1", "x2", "a1"])
        # A build output folder holding one bundle per profile is accepted as is.
        out = tmp_path / "build-out"
        out.mkdir()
        shutil.copytree(artifacts["v1"], out / "x86-64")
        shutil.copytree(artifacts["v1-arm64"], out / "arm64")
        handle = env.deploy([out], "all", strategy="waves:50,100")
        assert handle.status == "succeeded"
        row = env.store.rollout(handle.id)
        assert row is not None
        profile_of = {b: env.store.bundle(b)["profile"] for b in {d["bundle_id"] for d in row["devices"]}}
        assert {d["device_id"]: profile_of[d["bundle_id"]] for d in row["devices"]} == {
            "x1": "x86-64",
            "x2": "x86-64",
            "a1": "arm64",
        }
        assert _active(env) == {"x1": ("tiny", 1), "x2": ("tiny", 1), "a1": ("tiny", 1)}


def test_an_offline_device_gets_the_rollout_when_it_returns(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    ids = ["d1", "d2", "d3"]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids) as procs:
        wait_online(env.store, env.fleet, env.options, ids)
        procs["d3"].kill9()
        wait_for(lambda: not _online(env)["d3"], 60, "the Last Will to mark d3 offline")
        handle = env.deploy(artifacts["v1"], "all", timeout_s=120, wait=False)
        wait_for(
            lambda: (
                device_statuses(env.store, handle.id) == {"d1": "deployed", "d2": "deployed", "d3": "sent"}
            ),
            30,
            "the online devices to deploy",
        )
        procs["d3"].start()
        assert handle.wait(60) == "succeeded"
        assert _active(env)["d3"] == ("tiny", 1)


def test_a_device_back_after_its_timeout_is_not_sent_the_stale_deploy(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    # prepare: d2 goes away (its persistent session stays on the broker)
    ids = ["d1", "d2"]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids) as procs:
        wait_online(env.store, env.fleet, env.options, ids)
        procs["d2"].kill9()
        wait_for(lambda: not _online(env)["d2"], 60, "the Last Will to mark d2 offline")
        rules = AbortRules(max_failed_pct=99, min_finished=1)

        # act: the rollout gives d2 up; d2 returns only after that
        handle = env.deploy(artifacts["v1"], "all", timeout_s=3, rules=rules, wait=False)
        assert handle.wait(60) in ("completed", "succeeded")
        assert device_statuses(env.store, handle.id)["d2"] == "timed-out"
        time.sleep(1.5)  # past the command's expiry, counted from when it was sent
        procs["d2"].start()
        wait_online(env.store, env.fleet, env.options, ["d2"])
        time.sleep(3)  # time for a queued command to arrive and be acted on

        # assert: the broker dropped the expired command, so d2 started no download that nobody serves
        assert not (tmp_path / "d2" / "deploy.json").exists(), "d2 acted on an expired deploy command"
        assert _active(env)["d2"] != ("tiny", 1)


def _online(client: Fleet) -> dict[str, bool]:
    client.refresh()
    return {d["device_id"]: bool(d["online"]) for d in client.store.devices(client.fleet)}


def test_a_host_killed_mid_rollout_is_resumed_and_finishes(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    ids = ["d1", "d2", "d3"]
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    common = [
        "--broker",
        mosquitto.url,
        "--db",
        db,
        "--fleet",
        env.fleet,
        "--trusted-key",
        str(artifacts["key"]),
    ]
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids):
        wait_online(env.store, env.fleet, env.options, ids)
        cli = [EDGEFLEET]
        host = subprocess.Popen(
            [
                *cli,
                "deploy",
                str(artifacts["v1"]),
                "--to",
                "all",
                "--strategy",
                "canary:30",
                "--soak",
                "3",
                "--json",
                *common,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rollout_id = wait_for(
                lambda: next(iter(r["id"] for r in env.store.rollouts(env.fleet)), None), 30, "the rollout"
            )
            wait_for(lambda: device_statuses(env.store, rollout_id)["d1"] == "deployed", 30, "the canary")
        finally:
            host.send_signal(signal.SIGKILL)
            host.wait(10)
        assert device_statuses(env.store, rollout_id)["d2"] == "pending"
        # act: a new host process carries on once the dead one's heartbeat is stale
        wait_for(
            lambda: not engine_alive(env.store.rollout(rollout_id) or {}), 20, "the heartbeat to go stale"
        )
        done = subprocess.run(
            [*cli, "rollout", rollout_id, "--resume", "--json", *common[:-2]],
            # `rollout` takes no --trusted-key: say where the online key that signs its commands lies
            env={**os.environ, COMMAND_KEYS_ENV: str(artifacts["key"].parent)},
            check=False,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert device_statuses(env.store, rollout_id) == {i: "deployed" for i in ids}
        assert _active(env) == {i: ("tiny", 1) for i in ids}


def test_bad_input_is_refused_and_nothing_is_sent(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    from tests.agent_net_support import Observer

    with (
        agents(tmp_path / "x", mosquitto.url, env.fleet, artifacts["key"], ["x1"]),
        agents(tmp_path / "a", mosquitto.url, env.fleet, artifacts["key"], ["a1"], profile="arm64"),
    ):
        wait_online(env.store, env.fleet, env.options, ["x1", "a1"])
        sent = Observer(mosquitto.url, Topics.fleet_filter(env.fleet))
        try:
            with pytest.raises(SelectorError, match="unknown device 'nope'"):
                env.deploy(artifacts["v1"], "nope")
            with pytest.raises(SelectorError, match="no device has tag 'roof'"):
                env.deploy(artifacts["v1"], "tag:roof")
            tampered = tmp_path / "tampered"
            shutil.copytree(artifacts["v1"], tampered)
            model = tampered / "m1.onnx"
            model.write_bytes(model.read_bytes()[:-1] + b"\x00")
            with pytest.raises(BundleRefused, match="does not verify"):
                env.deploy(tampered, "all")
            with pytest.raises(BundleRefused, match=r"no bundle for the profile of a1 \(arm64\)"):
                env.deploy(artifacts["v1"], "a1")
            with pytest.raises(BundleRefused, match="--skip-unmatched"):
                env.deploy(artifacts["v1"], "all")
            env.store.create_rollout(
                "r-busy",
                fleet=env.fleet,
                selector="x1",
                strategy="all",
                settings={},
                targets=[("x1", None, 0)],
            )
            env.store.set_rollout_status("r-busy", "running")
            with pytest.raises(RolloutConflict, match=r"x1 \(rollout r-busy\)"):
                env.deploy(artifacts["v1"], "x1")
            db = f"sqlite:///{tmp_path / 'fleet.db'}"
            cli = subprocess.run(
                [
                    EDGEFLEET,
                    "deploy",
                    str(artifacts["v1"]),
                    "--to",
                    "nope",
                    "--broker",
                    mosquitto.url,
                    "--db",
                    db,
                    "--fleet",
                    env.fleet,
                ],
                check=False,
                capture_output=True,
                timeout=60,
            )
            assert cli.returncode == 2
            assert b"unknown device 'nope'" in cli.stderr and b"Traceback" not in cli.stderr
            time.sleep(0.5)
            topics = []
            while not sent.inbox.empty():
                topics.append(sent.inbox.get()[0])
            assert not [t for t in topics if t.endswith("/cmd") or "/artifact/" in t or "/chunk/" in t]
        finally:
            sent.close()


@pytest.fixture
def persistent_broker(mosquitto_factory: Any) -> Any:
    from tests.agent_net_support import PERSISTENT_BROKER

    return mosquitto_factory(PERSISTENT_BROKER)


def test_a_broker_restart_mid_rollout_is_ridden_out(
    tmp_path: Path, persistent_broker: Any, fleet_name: str, artifacts: Any
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    client = Fleet(
        broker=persistent_broker.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]]
    )
    ids = ["d1", "d2", "d3"]
    try:
        with agents(tmp_path, persistent_broker.url, fleet_name, artifacts["key"], ids):
            wait_online(store, fleet_name, client.options, ids)
            handle = client.deploy(
                artifacts["v1"], "all", strategy="canary:30", soak_s=2.0, timeout_s=90, wait=False
            )
            wait_for(lambda: device_statuses(store, handle.id)["d1"] == "deployed", 30, "the canary")
            # act: the broker goes away during the soak and comes back; the next wave must still go out
            persistent_broker.restart()
            assert handle.wait(90) == "succeeded"
            assert _active(client) == {i: ("tiny", 1) for i in ids}
    finally:
        client.close()
        store.close()


def test_abort_from_another_process_rolls_back_the_canary(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    ids = ["d1", "d2", "d3"]
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ids):
        wait_online(env.store, env.fleet, env.options, ids)
        assert env.deploy(artifacts["v1"], "all").status == "succeeded"
        handle = env.deploy(
            artifacts["v2"], "all", strategy="canary:30", soak_s=60.0, timeout_s=60, wait=False
        )
        wait_for(lambda: device_statuses(env.store, handle.id)["d1"] == "deployed", 30, "the canary")
        done = subprocess.run(
            [
                EDGEFLEET,
                "rollout",
                handle.id,
                "--abort",
                "--reason",
                "operator saw a drift",
                "--json",
                "--broker",
                mosquitto.url,
                "--db",
                db,
                "--fleet",
                env.fleet,
            ],
            check=False,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert handle.wait(30) == "aborted"
        row = env.store.rollout(handle.id)
        assert row is not None and row["reason"] == "operator saw a drift"
        assert device_statuses(env.store, handle.id) == {
            "d1": "rolled-back",
            "d2": "not-notified",
            "d3": "not-notified",
        }
        assert _active(env) == {i: ("tiny", 1) for i in ids}


def test_a_delta_update_installs_and_verifies_on_a_real_agent(
    tmp_path: Path, mosquitto: Any, env: Fleet, artifacts: Any
) -> None:
    from tests.agent_net_support import make_bundle
    from tests.test_fleet_delta_rollout import _fine_tuned

    m1 = next(p for p in artifacts["v1"].iterdir() if p.suffix == ".onnx")
    m2 = _fine_tuned(m1, tmp_path / "m1.onnx")
    v2 = make_bundle(
        tmp_path / "v2d",
        artifacts["key"].parent,
        m2,
        artifacts["v1"] / "eval.npz",
        version=2,
        min_accuracy=0.0,
    )
    with agents(tmp_path, mosquitto.url, env.fleet, artifacts["key"], ["d1"]):
        wait_online(env.store, env.fleet, env.options, ["d1"])
        assert env.deploy(artifacts["v1"], "all").status == "succeeded"
        handle = env.deploy(v2, "all", timeout_s=60)
        assert handle.status == "succeeded"
        row = env.store.rollout(handle.id)
        assert row is not None and "d1" in (row["settings"].get("patches") or {})
        assert _active(env) == {"d1": ("tiny", 2)}
        manifest = json.loads((v2 / "manifest.json").read_bytes())
        model_file = manifest["model"]["file"]
        others = sum(e["size"] for name, e in manifest["files"].items() if name != model_file)
        # The model file itself never went out: only the patch and the other files did.
        assert handle.engine.stats.broadcast_bytes == others + row["settings"]["patches"]["d1"]["size"]
