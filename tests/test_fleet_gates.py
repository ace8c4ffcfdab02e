"""The rollout's quality gates by the vocabulary's names: `min_accuracy`, `min_agreement`, `min_fidelity` as
Fleet.deploy keyword arguments, `edgefleet deploy` flags and REST fields, down to the rules the engine reads,
and a rollout that a real agent's agreement telemetry aborts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.errors import StrategyError
from edgefleet.sdk.fleet.strategy import AbortRules, rules_with
from edgefleet.sdk.server.actions import FleetAdapter
from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store
from edgefleet.sdk.trust.command_signing import use_command_keys
from tests.agent_net_support import PROFILE
from tests.fleet_support import tiny_bundle


class GateRecorder:
    """Stands in for the control plane behind the API: records the gates each start carries."""

    def __init__(self, store: Store, fleet: str) -> None:
        self.store, self.fleet = store, fleet
        self.gates: list[Optional[dict[str, float]]] = []

    def start_rollout(
        self,
        bundle_paths: list[str],
        selector: str,
        strategy: str,
        *,
        soak_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
        gates: Optional[dict[str, float]] = None,
    ) -> str:
        self.gates.append(gates)
        rid = f"r{len(self.gates)}"
        self.store.create_rollout(
            rid, fleet=self.fleet, selector=selector, strategy=strategy, settings={}, targets=[]
        )
        return rid

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        raise AssertionError("not used")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("gates"))


def test_rest_fields_reach_the_control_plane(store: Store, fleet_name: str, bundle: Path) -> None:
    # prepare: one stored bundle and an API with a recording control plane
    bid = store.add_bundle(
        name="tiny",
        version=1,
        profile=PROFILE,
        manifest_sha256="a" * 64,
        path=str(bundle),
        size_bytes=1,
        manifest={},
    )
    actions = GateRecorder(store, fleet_name)
    with TestClient(create_app(store, actions, fleet_name=fleet_name)) as client:
        # act
        ok = client.post(
            "/api/rollouts", json={"bundles": [bid], "to": "all", "min_agreement": 0.9, "min_fidelity": 0.99}
        )
        plain = client.post("/api/rollouts", json={"bundles": [bid], "to": "all"})
        bad = client.post("/api/rollouts", json={"bundles": [bid], "to": "all", "min_fidelity": 1.5})
    # assert: the named floors travel, absent ones do not, nonsense is a 422 naming the field
    assert ok.status_code == 202 and plain.status_code == 202, (ok.text, plain.text)
    assert actions.gates == [{"min_agreement": 0.9, "min_fidelity": 0.99}, None]
    assert bad.status_code == 422 and "min_fidelity" in bad.text


def test_the_adapter_hands_gates_to_fleet_deploy() -> None:
    # prepare: a Fleet stand-in that records deploy's keyword arguments
    seen: dict[str, Any] = {}

    class Recorder:
        def deploy(self, bundles: list[str], to: str, **kwargs: Any) -> str:
            seen.update(kwargs)
            return "r-1"

        def abort(self, rollout_id: str, reason: str) -> None:
            return None

    # act
    FleetAdapter(Recorder()).start_rollout(["b"], "all", "all", gates={"min_agreement": 0.8})
    # assert
    assert seen == {"strategy": "all", "wait": False, "min_agreement": 0.8}


def test_fleet_deploy_kwargs_become_the_stored_rules(
    tmp_path: Path, mosquitto: Any, fleet_name: str, bundle: Path
) -> None:
    # prepare: a known (offline) device of the bundle's profile; nothing will answer, the rollout times out
    fleet = Fleet(mosquitto.url, store=f"sqlite:///{tmp_path / 'f.db'}", fleet=fleet_name, trusted_keys=[])
    fleet.store.upsert_device(fleet_name, "cam-1", online=False, profile=PROFILE)
    try:
        # act
        handle = fleet.deploy(
            bundle,
            "cam-1",
            timeout_s=0.5,
            rules=AbortRules(min_accuracy=0.5, max_p95_ms=50),
            min_agreement=0.9,
            min_fidelity=0.99,
            wait=True,
        )
        stored = AbortRules.from_dict(fleet.rollout(handle.id)["settings"]["rules"])
    finally:
        fleet.close()
    # assert: the kwargs join the rules given (which keep their own floors and budget)
    assert (stored.min_accuracy, stored.min_agreement, stored.min_fidelity) == (0.5, 0.9, 0.99)
    assert stored.max_p95_ms == 50


def test_deploy_flags_name_every_gate_and_refuse_nonsense(tmp_path: Path) -> None:
    # act
    helptext = CliRunner().invoke(app, ["deploy", "--help"], env={"COLUMNS": "200"}).output
    bad = CliRunner().invoke(
        app,
        [
            "deploy",
            str(tmp_path),
            "--to",
            "all",
            "--min-agreement",
            "2",
            "--db",
            f"sqlite:///{tmp_path / 'f.db'}",
        ],
    )
    # assert
    assert all(flag in helptext for flag in ("--min-accuracy", "--min-agreement", "--min-fidelity"))
    assert bad.exit_code == 2 and "--min-agreement 2.0 must be in [0, 1]" in bad.output
    with pytest.raises(StrategyError, match="unknown quality gate min_cosine"):
        rules_with(AbortRules(), {"min_cosine": 0.9})


@pytest.mark.broker
def test_a_rollout_aborts_when_agreement_on_the_device_is_below_the_floor(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    # prepare: a reference-eval bundle whose model agrees with its reference (another model) on few rows;
    # the device's own health floor lets it install, the rollout's min_agreement does not
    import numpy as np
    import onnxruntime as ort

    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import init_keys, load_private_key
    from tests.agent_net_support import CLASSES, IN_FEATURES, eval_set, export_tiny_onnx, make_bundle
    from tests.fleet_support import agents, wait_online

    keys = init_keys(tmp_path / "keys")
    use_command_keys(fleet_name, [keys.public_path])  # the host signs commands, though it checks no bundle
    model, other = (
        export_tiny_onnx(tmp_path / "m.onnx", seed=0),
        export_tiny_onnx(tmp_path / "o.onnx", seed=3),
    )
    x = np.random.default_rng(2).standard_normal((64, IN_FEATURES)).astype(np.float32)
    reference = ort.InferenceSession(str(other), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    mine = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    agreement = float((mine.argmax(1) == reference.argmax(1)).mean())
    assert agreement < 0.9, "the two seeds must disagree for this test"
    np.savez(tmp_path / "eval.npz", x=x, reference=reference)
    bundle = create_bundle(
        tmp_path / "bundle",
        model_path=model,
        eval_npz_path=tmp_path / "eval.npz",
        manifest_fields={
            "name": "tiny",
            "version": 2,
            "target": {"profile": PROFILE, "device_ids": []},
            "model": {"format": "onnx", "runtime": "onnxruntime"},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, IN_FEATURES]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
            "eval": {"kind": "reference", "metric": "agreement"},
            "health": {"metric": "agreement", "min_quality": 0.0, "max_p95_ms": 1000.0, "timeout_s": 60},
        },
        private_key=load_private_key(keys.private_path),
    )
    base = make_bundle(
        tmp_path / "v1", tmp_path / "keys", model, eval_set(model, tmp_path / "e1.npz"), version=1
    )
    fleet = Fleet(mosquitto.url, store=f"sqlite:///{tmp_path / 'f.db'}", fleet=fleet_name, trusted_keys=[])
    try:
        with agents(
            tmp_path, mosquitto.url, fleet_name, keys.public_path, ["cam-1"], "--eval-interval", "0.5"
        ):
            wait_online(fleet.store, fleet_name, fleet.options, ["cam-1"])
            first = fleet.deploy(base, "cam-1", timeout_s=60)  # v1, so a rollback has a model to return to
            assert first.status == "succeeded"
            # act: the floor sits above what the device measures
            handle = fleet.deploy(bundle, "cam-1", soak_s=20, timeout_s=60, min_agreement=0.9)
            row = fleet.rollout(handle.id)
    finally:
        fleet.close()
    # assert: the telemetry gate named the metric by its name and rolled the device back
    assert row["status"] == "aborted", row
    assert "agreement" in str(row["reason"]) and "minimum 0.9" in str(row["reason"]), row["reason"]
    assert [(d["device_id"], d["status"]) for d in row["devices"]] == [("cam-1", "rolled-back")], row[
        "devices"
    ]
