"""Issue 14 without a broker: fair telemetry rules, the shadow gate, shadow evaluation on the serving path,
the first-rollout drop, offline states in the registry, the rollout summary and emulated threads."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.commands import RollbackCommand, parse_command
from edgefleet.agent.core.events import State
from edgefleet.agent.core.manifest import HealthPolicy
from edgefleet.agent.core.parts import Latency, ModelRef, Requests
from edgefleet.agent.core.protocol import Telemetry
from edgefleet.agent.core.quality import Quality
from edgefleet.agent.model import InferError
from edgefleet.agent.server import ModelServer
from edgefleet.agent.shadow import Shadow, ShadowRunner
from edgefleet.sdk.fleet.registry import apply_state
from edgefleet.sdk.fleet.strategy import MIN_REQUESTS, MIN_WINDOWS, AbortRules, TelemetrySample
from edgefleet.sdk.server.queries import progress
from edgefleet.sdk.store import Store
from tests.rollout_support import disagreeing_pair, live_inputs


def _window(device: str, count: int, p95: float, **shadow: float) -> TelemetrySample:
    samples = count if shadow else 0
    return TelemetrySample(device, count, p95, {}, None, shadow, samples)


# ---- fair rules ------------------------------------------------------------------------------------


def test_each_device_is_judged_against_its_own_bundles_budget() -> None:
    # prepare: an rpi4b (budget 100 ms) at 60 ms and a Jetson (budget 20 ms) at 10 ms, 3 busy windows each
    rpi = HealthPolicy(max_p95_ms=100.0)
    jetson = HealthPolicy(max_p95_ms=20.0)
    rpi_windows = [_window("pi", 40, 60.0) for _ in range(3)]
    jetson_windows = [_window("nano", 40, 10.0) for _ in range(3)]
    rules = AbortRules()
    # act / assert: each bundle's devices against that bundle's budget pass (the engine groups them so)
    assert rules.check_telemetry(rpi_windows, rpi) is None
    assert rules.check_telemetry(jetson_windows, jetson) is None
    # the old pooling (every device against the Jetson's budget) is what aborted healthy releases;
    # per device, only the rpi is over 20 ms and the reason names it alone
    reason = rules.check_telemetry(rpi_windows + jetson_windows, jetson)
    assert reason is not None and "on pi " in reason and "nano" not in reason


def test_an_abort_needs_enough_windows_and_requests() -> None:
    health = HealthPolicy(max_p95_ms=5.0)
    rules = AbortRules()
    assert (rules.min_samples, rules.min_requests) == (MIN_WINDOWS, MIN_REQUESTS) == (3, 50)
    # one noisy 3-request window: no abort
    assert rules.check_telemetry([_window("a", 3, 900.0)], health) is None
    # three windows but only 30 requests: no abort
    assert rules.check_telemetry([_window("a", 10, 900.0) for _ in range(3)], health) is None
    # three windows, 60 requests, slow: abort
    reason = rules.check_telemetry([_window("a", 20, 900.0) for _ in range(3)], health)
    assert reason is not None and "3 telemetry windows, 60 requests" in reason
    with pytest.raises(Exception, match="at least 1"):
        AbortRules(min_requests=0)


def test_live_agreement_gates_only_with_a_floor_the_rule_sets() -> None:
    low = [_window("a", 30, 1.0, agreement=0.7, fidelity=0.95) for _ in range(3)]
    # act / assert: 90 compared requests at 0.7 < 0.9 aborts, naming live agreement
    reason = AbortRules(min_agreement=0.9).check_telemetry(low, None)
    assert reason is not None and "live agreement 0.7000" in reason and "minimum 0.9" in reason
    assert "90 live requests" in reason
    assert AbortRules(min_agreement=0.6).check_telemetry(low, None) is None
    # too few compared requests: no verdict yet
    assert AbortRules(min_agreement=0.9).check_telemetry(low[:1], None) is None
    # --min-fidelity reads the live cosine
    assert "live fidelity" in str(AbortRules(min_fidelity=0.99).check_telemetry(low, None))
    # the manifest's reference floor is not a floor for two versions against each other
    assert AbortRules().check_telemetry(low, HealthPolicy(metric="agreement", min_quality=0.95)) is None


def test_a_sample_reads_the_shadow_reading() -> None:
    message = Telemetry(
        device="cam-1",
        seq=1,
        ts=1.0,
        model=ModelRef("tiny", 2),
        requests=Requests(count=40),
        latency=Latency(count=40, p95_ms=1.0),
        quality=(Quality("agreement", 0.7, 12, {"fidelity": 0.93}, "shadow"),),
    )
    sample = TelemetrySample.of(message)
    assert dict(sample.shadow) == {"agreement": 0.7, "fidelity": 0.93}
    assert sample.shadow_samples == 12 and dict(sample.quality) == {}


# ---- shadow evaluation on the serving path ---------------------------------------------------------


def test_the_shadow_measures_agreement_without_changing_the_answer(tmp_path: Path) -> None:
    # prepare: v1 and v2 disagree on ~30 % of inputs; v2 serves, v1 shadows every request
    v1, v2, measured = disagreeing_pair(tmp_path)
    server = ModelServer(threads=1)
    server.activate(server.load(v2, name="tiny", version=2, slot="b"))
    shadow = Shadow(
        server.load(v1, name="tiny", version=1, slot="a"), share=1.0, cpu_share=1.0, duration_s=60
    )
    x = live_inputs(400)
    plain = [server.infer({"x": x[i : i + 1]}).outputs["logits"] for i in range(40)]
    # act
    server.set_tap(shadow.offer)
    served = []
    for i in range(400):
        served.append(server.infer({"x": x[i : i + 1]}).outputs["logits"])
        time.sleep(0.0005)  # let the one worker keep up (the queue drops what it cannot take)
    deadline = time.monotonic() + 10
    while shadow.window.requests + shadow.dropped < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    reading = shadow.reading()
    shadow.stop()
    server.set_tap(None)
    # assert: the answers are v2's, unchanged by the tap
    assert all(np.array_equal(a, b) for a, b in zip(plain, served[:40]))
    assert reading is not None and reading.source == "shadow" and reading.metric == "agreement"
    assert reading.samples >= 100
    assert abs(reading.value - (1 - measured)) < 0.12, (reading, measured)
    assert "fidelity" in reading.detail
    # without a tap the request path is the model's own closure again
    assert server.infer is server._untapped


def test_the_shadow_worker_never_blocks_serving(tmp_path: Path) -> None:
    # prepare: a shadow whose model is very slow (a stand-in), a full queue
    v1, v2, _ = disagreeing_pair(tmp_path)
    server = ModelServer(threads=1)
    server.activate(server.load(v2, name="tiny", version=2, slot="b"))
    slow = server.load(v1, name="tiny", version=1, slot="a")
    real_run = slow.run
    slow.run = lambda feeds: (time.sleep(0.5), real_run(feeds))[1]  # type: ignore[method-assign]
    shadow = Shadow(slow, share=1.0, cpu_share=0.5, duration_s=60)
    server.set_tap(shadow.offer)
    x = live_inputs(200)
    # act
    start = time.perf_counter()
    for i in range(200):
        server.infer({"x": x[i : i + 1]})
    took = time.perf_counter() - start
    shadow.stop()
    # assert: 200 requests in far less than one shadow run each; most were dropped, not queued
    assert took < 2.0, took
    assert shadow.dropped >= 150


def test_the_runner_shadows_with_the_previous_slot_and_releases_it() -> None:
    # prepare: stand-ins for the installer and server (the loaded model records its close)
    closed: list[bool] = []
    model = SimpleNamespace(info=SimpleNamespace(name="tiny", version=1), close=lambda: closed.append(True))
    manifest = SimpleNamespace(eval=SimpleNamespace(metric="accuracy"))
    taps: list[Any] = []
    server = SimpleNamespace(set_tap=taps.append)
    installer = SimpleNamespace(load_previous=lambda: (model, manifest))
    runner = ShadowRunner(share=0.5, cpu_share=0.25, duration_s=0.3)
    # act / assert: started, tapped; the window ends by itself and releases the model
    assert runner.start(installer, server) is True
    assert runner.active is not None and taps[-1] is not None
    deadline = time.monotonic() + 5
    while runner.active is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.active is None and taps[-1] is None and closed == [True]
    # off when no previous model, or when configured off
    assert ShadowRunner(0.5, 0.25, 10).start(SimpleNamespace(load_previous=lambda: None), server) is False
    assert ShadowRunner(0.0, 0.25, 10).enabled is False


# ---- first-rollout abort ---------------------------------------------------------------------------


def test_a_first_install_rolled_back_with_abandon_stops_serving(tmp_path: Path) -> None:
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.agent.installer import Installer
    from tests.agent_core_support import bundle_parts, eval_npz, make_bundle, make_keys, profile, tiny_onnx

    # prepare: a device whose only model is v1 (its first install)
    keys = make_keys(tmp_path / "keys")
    model = tiny_onnx(tmp_path / "m.onnx")
    bundle = make_bundle(tmp_path / "b", keys, model, eval_npz(model, tmp_path / "e.npz"), version=1)
    server = ModelServer(threads=1)
    state = tmp_path / "state"
    state.mkdir()
    installer = Installer(state, profile(), server, TrustStore.from_public_keys([keys / "fleet.pub"]), "d")
    installer.install(*bundle_parts(bundle))
    # act / assert: a plain rollback still refuses (nothing named to drop)
    with pytest.raises(Exception, match="no previous"):
        installer.rollback()
    assert server.active is not None
    # a rollback naming another model drops nothing either
    with pytest.raises(Exception, match="no previous"):
        installer.rollback(("tiny", 7))
    result = installer.rollback(("tiny", 1))
    # assert: nothing serves, requests answer no-model, the slot state says so (also after a restart)
    assert result.serving is False and result.to_dict()["previous"] == {"name": "tiny", "version": 1}
    assert server.active is None
    with pytest.raises(InferError) as err:
        server.infer({"x": np.zeros((1, 8), np.float32)})
    assert err.value.code == "no-model"
    assert installer.status()["active"] is None
    restarted = ModelServer(threads=1)
    Installer(state, profile(), restarted, installer.trust, "d").recover()
    assert restarted.active is None


def test_the_rollback_command_names_the_model_to_abandon_and_old_payloads_parse() -> None:
    cmd = RollbackCommand(id="r-1", abandon=("tiny", 2))
    back = parse_command(cmd.to_wire())
    assert isinstance(back, RollbackCommand) and back.abandon == ("tiny", 2)
    old = parse_command(b'{"v":1,"type":"rollback","id":"r-2"}')
    assert isinstance(old, RollbackCommand) and old.abandon is None


def test_an_aborted_rollout_reads_as_aborted_with_each_device() -> None:
    p = progress([{"status": "rolled-back"}, {"status": "not-notified"}, {"status": "rolled-back"}])
    assert p["summary"] == "1 not-notified, 2 rolled-back"


# ---- registry --------------------------------------------------------------------------------------


def test_a_clean_offline_state_keeps_profile_tags_and_model(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        info = {"profile": "rpi4b", "tags": ["lab"], "active": {"name": "tiny", "version": 3}}
        # act: a fresh store reads a cleanly stopped device's retained state
        apply_state(store, "f", State.from_info("pi-1", 9, 100.0, False, info))
        row = store.devices("f")[0]
        assert (row["online"], row["profile"], row["tags"], row["active_model"], row["active_version"]) == (
            False,
            "rpi4b",
            ["lab"],
            "tiny",
            3,
        )
        # a bare Last Will keeps what was known
        apply_state(store, "f", State.from_info("pi-1", -1, 0.0, False, {}))
        row = store.devices("f")[0]
        assert (row["online"], row["profile"]) == (False, "rpi4b")
    finally:
        store.close()


# ---- emulated threads ------------------------------------------------------------------------------


def test_emulate_uses_at_most_the_hosts_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.startup import load_profile

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    config = AgentConfig(device_id="d", profile="x86-64", trusted_keys=[], emulate="jetson-orin-nano")
    _, threads = load_profile(config)
    assert threads == 2


def test_the_dashboard_api_shows_live_agreement_per_version(tmp_path: Path) -> None:
    from edgefleet.sdk.fleet.ingest import flatten_telemetry
    from edgefleet.sdk.server.queries import model_versions

    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        # prepare: v2 windows with shadow readings (0.6 over 30 requests, 0.9 over 10), v1 without
        rows = []
        for seq, (version, shadow) in enumerate([(2, (0.6, 30)), (2, (0.9, 10)), (1, None)]):
            quality = (
                ()
                if shadow is None
                else (Quality("agreement", shadow[0], shadow[1], {"fidelity": 0.9}, "shadow"),)
            )
            message = Telemetry(
                device="d",
                seq=seq,
                ts=100.0 + seq,
                model=ModelRef("tiny", version),
                requests=Requests(count=40),
                latency=Latency(count=40, p95_ms=1.0),
                quality=quality,
            )
            rows.append(flatten_telemetry(message))
        store.add_telemetry("f", rows)
        # act
        versions = {v["model_version"]: v for v in model_versions(store, "f")}
    finally:
        store.close()
    # assert: weighted by compared requests
    assert versions[2]["live_agreement"] == pytest.approx((0.6 * 30 + 0.9 * 10) / 40)
    assert versions[2]["live_agreement_samples"] == 40
    assert versions[1]["live_agreement"] is None


def test_deploy_has_the_new_flags_with_documented_defaults() -> None:
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app

    result = CliRunner().invoke(app, ["deploy", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--min-requests", "--skip-offline", "--min-samples", "--min-agreement", "--min-fidelity"):
        assert flag in result.output
