"""End to end against a real Mosquitto: deploy → verify → install → health → switch → telemetry, rejections,
tampered chunks, broker restarts and kill -9 of the agent mid-download and mid-install."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgefleet.agent.config import load_config
from edgefleet.agent.core.protocol import (
    InferCommand,
    Result,
    RollbackCommand,
    State,
    StatusCommand,
    Telemetry,
    Topics,
    decode_array,
    encode_array,
)
from edgefleet.agent.daemon import Agent
from tests.agent_net_support import (
    IN_FEATURES,
    PERSISTENT_BROKER,
    PROFILE,
    AgentProcess,
    Observer,
    agent_args,
    eval_set,
    export_tiny_onnx,
    make_bundle,
)
from tests.command_support import signed
from tests.fleet_support import Host, Outcome

pytestmark = pytest.mark.broker
CHUNK = 256


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys and five signed bundles: v1, v2 (good), v3 broken file, v4 inaccurate, v5 too slow."""
    from edgefleet.sdk.trust.keys import init_keys

    d = tmp_path_factory.mktemp("bundles")
    keys = init_keys(d / "keys")
    m1 = export_tiny_onnx(d / "m1.onnx", seed=0)
    m2 = export_tiny_onnx(d / "m2.onnx", seed=1)
    e1, e2 = eval_set(m1, d / "e1.npz"), eval_set(m2, d / "e2.npz")
    garbage = d / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model " * 40)
    wrong = eval_set(m2, d / "wrong.npz", wrong_labels=True)
    k = d / "keys"
    return {
        "key": keys.public_path,
        "v1": make_bundle(d / "v1", k, m1, e1, version=1),
        "v2": make_bundle(d / "v2", k, m2, e2, version=2),
        "broken": make_bundle(d / "broken", k, garbage, e1, version=3),
        "inaccurate": make_bundle(d / "inaccurate", k, m2, wrong, version=4, min_accuracy=0.9),
        "slow": make_bundle(d / "slow", k, m2, e2, version=5, max_p95_ms=1e-6),
        # tens of thousands of warm-up runs keep its health check busy for a second or two: time to kill it
        "v6": make_bundle(d / "v6", k, m1, e1, version=6, warmup_runs=40_000),
    }


@pytest.fixture
def broker(mosquitto_factory):  # type: ignore[no-untyped-def]
    return mosquitto_factory(PERSISTENT_BROKER)


@pytest.fixture
def host(tmp_path, broker, fleet_name, artifacts):  # type: ignore[no-untyped-def]
    """The fleet's control plane (its real sender), trusting the test key."""
    h = Host(broker.url, fleet_name, tmp_path / "host", artifacts["key"])
    yield h
    h.close()


def _agent(tmp_path: Path, url: str, fleet: str, key: Path, device: str = "dev-1", **extra: Any) -> Agent:
    cfg = load_config(
        None,
        {
            "device_id": device,
            "profile": PROFILE,
            "trusted_keys": [str(key)],
            "broker": url,
            "fleet": fleet,
            "state_dir": str(tmp_path / device),
            "telemetry_interval_s": 0.3,
            "http_enabled": False,
            "repair_after_s": 0.3,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **extra,
        },
    )
    agent = Agent(cfg)
    agent.start()
    assert agent.session is not None and agent.session.wait_connected(10)
    return agent


def _push(host: Host, bundle: Path, device: str = "dev-1", **kw: Any) -> Outcome:
    """Deploy through the fleet's sender in small chunks, so a transfer spans many messages."""
    return host.deploy(bundle, device, timeout_s=kw.pop("timeout_s", 60), chunk_size=CHUNK, **kw)


def _x() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((3, IN_FEATURES)).astype(np.float32)


def _telemetry(obs: Observer, want: Callable[[Telemetry], bool], timeout: float = 10) -> Telemetry:
    _, msg, _ = obs.next(
        lambda t, p: t.endswith("/telemetry") and want(Telemetry.from_wire(p)), timeout=timeout
    )
    assert isinstance(msg, Telemetry)
    return msg


def _telemetry_with_version(obs: Observer, version: int, timeout: float = 10) -> Telemetry:
    return _telemetry(obs, lambda m: m.model is not None and m.model.version == version, timeout)


def _active_version(payload: bytes) -> int | None:
    active = json.loads(payload).get("active")
    return active.get("version") if isinstance(active, dict) else None


def _command(obs: Observer, agent_topic_cmd: str, payload: bytes, ref: str, key: Path) -> Result:
    """Publish a command signed as the host signs (the online key beside the fleet key `key`)."""
    device = Topics.device_of(agent_topic_cmd)
    assert device is not None
    obs.publish(agent_topic_cmd, signed(key.parent, payload, device))
    _, msg, _ = obs.next(lambda t, p: t.endswith("/evt") and f'"ref":"{ref}"' in p.decode())
    assert isinstance(msg, Result)
    return msg


def test_deploy_switch_telemetry_and_rollback(tmp_path, broker, fleet_name, artifacts, host) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(
        tmp_path, broker.url, fleet_name, artifacts["key"], mqtt_infer=True, http_enabled=True, http_port=0
    )
    obs = Observer(broker.url, Topics.fleet_filter(fleet_name))
    try:
        # act: first deploy
        first = _push(host, artifacts["v1"])
        # assert: installed through every step, serving, reported in telemetry
        assert first.status == "deployed", first
        assert first.steps[:3] == ["verify-manifest", "download", "downloaded"]
        out = agent.infer({"x": _x()})
        assert out.outputs["logits"].shape == (3, 4) and out.model_version == 1
        telemetry = _telemetry_with_version(obs, 1)
        assert telemetry.model is not None and telemetry.model.name == "tiny"
        assert telemetry.quality_of("accuracy", "eval") is not None  # the install's health check
        # feedback on a prediction shows up as live accuracy in the next telemetry window
        one = agent.infer({"x": _x()[:1]})
        agent.feedback(one.request_id, int(one.outputs["logits"].argmax()))
        live = _telemetry(obs, lambda m: m.requests.feedback > 0).quality_of("accuracy", "feedback")
        assert live is not None and live.value == 1.0
        # the local HTTP endpoint serves the same model
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/v1/model", timeout=5) as reply:
            assert json.loads(reply.read())["version"] == 1
        # second deploy replaces it
        second = _push(host, artifacts["v2"])
        assert second.status == "deployed", second
        assert agent.infer({"x": _x()}).model_version == 2
        _telemetry_with_version(obs, 2)
        # rollback returns to v1
        result = _command(
            obs, agent.topics.cmd, RollbackCommand(id="rb-1").to_wire(), "rb-1", artifacts["key"]
        )
        assert result.command == "rollback"
        assert agent.infer({"x": _x()}).model_version == 1
        status = _command(obs, agent.topics.cmd, StatusCommand(id="st-1").to_wire(), "st-1", artifacts["key"])
        assert status.data["connected"] is True
        # infer over MQTT (enabled for this agent) answers with the outputs of the active model
        x = _x()
        answer = _command(
            obs,
            agent.topics.cmd,
            InferCommand(id="q-1", inputs={"x": encode_array(x)}).to_wire(),
            "q-1",
            artifacts["key"],
        )
        logits = decode_array(answer.data["outputs"]["logits"])
        np.testing.assert_allclose(logits, agent.infer({"x": x}).outputs["logits"], rtol=1e-5)
        assert answer.data["version"] == 1
    finally:
        obs.close()
        agent.stop()


def test_bad_bundles_are_rejected_and_the_old_model_keeps_serving(
    tmp_path, broker, fleet_name, artifacts, host
) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(tmp_path, broker.url, fleet_name, artifacts["key"])
    try:
        assert _push(host, artifacts["v1"]).status == "deployed"
        for name, step in (("broken", "load"), ("inaccurate", "health"), ("slow", "health")):
            outcome = _push(host, artifacts[name])
            assert outcome.status == "rejected" and outcome.rejected is not None, (name, outcome)
            assert outcome.rejected.step == step and outcome.rejected.reason, (name, outcome.rejected)
            assert (outcome.reason or "").startswith(f"{step}: "), (name, outcome.reason)
            assert agent.infer({"x": _x()}).model_version == 1, name
        # a replayed old version is refused before any download
        replay = _push(host, artifacts["v1"])
        assert replay.status == "rejected" and replay.rejected is not None
        assert replay.rejected.step == "verify-manifest"
        assert "download" not in replay.steps
    finally:
        agent.stop()


def test_tampered_chunk_is_refused_and_repaired(tmp_path, broker, fleet_name, artifacts, host) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(tmp_path, broker.url, fleet_name, artifacts["key"])
    try:

        def tamper(sha: str, index: int, data: bytes) -> bytes:
            return b"\0" * len(data) if index == 1 else data

        outcome = _push(host, artifacts["v1"], chunk_filter=tamper)
        assert outcome.status == "deployed", outcome
        assert any(e.code == "chunk-hash-mismatch" for e in outcome.errors)
        assert outcome.repairs >= 1
    finally:
        agent.stop()


def test_broker_restart_mid_transfer_resumes(tmp_path, broker, fleet_name, artifacts, host) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(tmp_path, broker.url, fleet_name, artifacts["key"])
    restarted = []
    try:

        def restart_once(sha: str, index: int, data: bytes) -> bytes | None:
            if index == 3 and not restarted:
                restarted.append(index)
                broker.restart()
                return None
            return data

        outcome = _push(host, artifacts["v1"], chunk_filter=restart_once)
        assert restarted and outcome.status == "deployed", outcome
        assert agent.session is not None and agent.session.connects >= 2
        assert agent.infer({"x": _x()}).model_version == 1
    finally:
        agent.stop()


@pytest.mark.slow
@pytest.mark.chaos
def test_kill9_during_download_resumes_from_the_bitmap(tmp_path, broker, fleet_name, artifacts, host) -> None:  # type: ignore[no-untyped-def]
    proc = AgentProcess(
        agent_args(tmp_path / "state", broker.url, fleet_name, "dev-k", artifacts["key"]),
        tmp_path / "agent.log",
    )
    obs = Observer(broker.url, Topics(fleet_name, "dev-k").all)
    proc.start()
    try:
        obs.next(lambda t, p: t.endswith("/state") and b'"online":true' in p, timeout=30)
        killed = []

        def kill_mid_download(sha: str, index: int, data: bytes) -> bytes | None:
            if index == 4 and not killed:
                killed.append(index)
                time.sleep(0.3)  # let a few chunks land and a bitmap flush happen
                proc.kill9()
                proc.start()
            return data

        outcome = _push(host, artifacts["v1"], "dev-k", chunk_filter=kill_mid_download)
        assert killed and outcome.status == "deployed", (outcome, proc.log()[-3000:])
        _, state, _ = obs.next(lambda t, p: t.endswith("/state") and _active_version(p) == 1, timeout=10)
        assert state.info["active"] == {"name": "tiny", "version": 1}
        assert "resuming deploy" in proc.log()  # the second process finished what the first began
    finally:
        obs.close()
        assert proc.stop() == 0, proc.log()[-3000:]


@pytest.mark.slow
@pytest.mark.chaos
def test_kill9_during_install_restarts_into_a_verified_model(
    tmp_path, broker, fleet_name, artifacts, host
) -> None:  # type: ignore[no-untyped-def]
    proc = AgentProcess(
        agent_args(tmp_path / "state", broker.url, fleet_name, "dev-i", artifacts["key"]),
        tmp_path / "agent.log",
    )
    obs = Observer(broker.url, Topics(fleet_name, "dev-i").all)
    proc.start()
    try:
        obs.next(lambda t, p: t.endswith("/state") and b'"online":true' in p, timeout=30)
        assert _push(host, artifacts["v1"], "dev-i").status == "deployed"
        killed = []

        def kill_on_install(message: Any) -> None:
            if getattr(message, "step", "") == "health" and not killed:
                killed.append(message.step)
                proc.kill9()
                proc.start()

        outcome = _push(host, artifacts["v6"], "dev-i", on_event=kill_on_install)
        assert killed, outcome
        assert outcome.status == "deployed", (outcome, proc.log()[-3000:])
        _, state, _ = obs.next(lambda t, p: t.endswith("/state") and _active_version(p) == 6, timeout=10)
        assert state.info["active"]["name"] == "tiny"
        assert "resuming deploy" in proc.log()  # the second process finished what the first began
    finally:
        obs.close()
        assert proc.stop() == 0, proc.log()[-3000:]


def test_emulated_profile_caps_threads_and_says_so(tmp_path, broker, fleet_name, artifacts) -> None:  # type: ignore[no-untyped-def]
    from edgefleet.device_profiles import load_profile

    obs = Observer(broker.url, Topics.fleet_filter(fleet_name))
    agent = _agent(tmp_path, broker.url, fleet_name, artifacts["key"], profile=None, emulate="rpi4b")
    try:
        _, state, _ = obs.next(lambda t, p: t.endswith("/state") and b'"online":true' in p)
        assert isinstance(state, State) and state.emulated == "rpi4b" and state.profile == "rpi4b"
        assert state.threads is not None and state.threads <= load_profile("rpi4b").cores
        assert _telemetry(obs, lambda m: True).emulated == "rpi4b"
    finally:
        obs.close()
        agent.stop()
