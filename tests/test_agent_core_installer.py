"""Installer: verify → write → load → health → switch, rejections keep the old model, rollback, recovery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.errors import InstallError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.installer import Installer
from edgefleet.agent.server import ModelServer
from tests.agent_core_support import bundle_parts, eval_npz, make_bundle, make_keys, profile, tiny_onnx


class Env:
    """Keys, two model versions' files, a device state folder, a server and an installer."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = make_keys(tmp / "keys")
        self.state = tmp / "state"
        self.state.mkdir()
        self.trust = TrustStore.from_public_keys([self.keys / "fleet.pub"])
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.made = 0
        self.server, self.installer = self.fresh()

    def fresh(self) -> tuple[ModelServer, Installer]:
        server = ModelServer(threads=1)
        installer = Installer(
            self.state,
            profile(),
            server,
            self.trust,
            "dev-1",
            on_progress=lambda s, d: self.events.append((s, d)),
        )
        return server, installer

    def bundle(self, version: int, seed: int = 0, **kw: Any) -> Path:
        self.made += 1
        folder = self.tmp / f"src{self.made}"
        folder.mkdir()
        model = tiny_onnx(folder / "model.onnx", seed=seed)
        ev = eval_npz(
            model, folder / "eval.npz", wrong=kw.pop("wrong", False), reference=kw.get("reference", False)
        )
        return make_bundle(self.tmp / f"bundle{self.made}", self.keys, model, ev, version=version, **kw)

    def install(self, bundle: Path) -> Any:
        return self.installer.install(*bundle_parts(bundle))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def serving_version(server: ModelServer) -> int:
    return server.infer(np.zeros((1, 8), np.float32)).model_version


def test_install_then_update_then_rollback(env: Env) -> None:
    # act
    first = env.install(env.bundle(1))
    second = env.install(env.bundle(2, seed=1))
    # assert: v2 serves from the other slot, v1 is the previous one
    assert (first.slot, second.slot) == ("a", "b")
    assert second.previous == {"name": "tiny", "version": 1}
    assert second.health["passed"] is True and second.health["value"] == 1.0
    assert serving_version(env.server) == 2
    status = env.installer.status()
    assert status["slots"] == {"a": {"name": "tiny", "version": 1}, "b": {"name": "tiny", "version": 2}}
    assert (status["active_slot"], status["previous_slot"]) == ("b", "a")
    assert VersionLedger(env.state).last("tiny") == 2
    steps = [s for s, _ in env.events]
    assert steps[:6] == ["verify", "write", "load", "health", "switch", "switched"]
    # rollback returns to v1 (and a second one goes back to v2)
    back = env.installer.rollback()
    assert (back.slot, back.version) == ("a", 1) and serving_version(env.server) == 1
    assert env.installer.status()["previous_slot"] == "b"


def test_reference_bundle_checks_fidelity(env: Env) -> None:
    result = env.install(env.bundle(1, reference=True, min_fidelity=0.999))
    # an old manifest (eval.metric cosine, health.min_fidelity) is scored in the vocabulary's names
    assert result.health["metric"] == "fidelity" and result.health["value"] > 0.999
    report = env.installer.evaluate()
    assert report["metric"] == "fidelity" and report["detail"]["agreement"] == 1.0


@pytest.mark.parametrize(
    "make, step, code",
    [
        (lambda e: e.bundle(2, seed=1, wrong=True), "health", "below-minimum"),
        (lambda e: e.bundle(2, seed=1, max_p95_ms=1e-6), "health", "latency-above-maximum"),
        (lambda e: e.bundle(1, seed=1), "verify", "version-not-newer"),
    ],
    ids=["accuracy", "latency", "replay"],
)
def test_rejected_bundle_keeps_old_model(env: Env, make: Any, step: str, code: str) -> None:
    env.install(env.bundle(1))
    bad = make(env)
    with pytest.raises(InstallError) as info:
        env.install(bad)
    assert (info.value.step, info.value.code) == (step, code)
    assert serving_version(env.server) == 1
    status = env.installer.status()
    assert status["active_slot"] == "a"
    assert status["rejected"][-1]["code"] == code
    assert VersionLedger(env.state).last("tiny") == 1


def test_model_that_fails_to_load_is_rejected(env: Env) -> None:
    env.install(env.bundle(1))
    src = env.tmp / "junk"
    src.mkdir()
    model = src / "model.onnx"
    model.write_bytes(b"not an onnx model at all")
    np.savez(src / "eval.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    bundle = make_bundle(env.tmp / "bundle-junk", env.keys, model, src / "eval.npz", version=2)
    with pytest.raises(InstallError) as info:
        env.install(bundle)
    assert (info.value.step, info.value.code) == ("load", "model-load-failed")
    assert serving_version(env.server) == 1
    # the failed write went to slot b; a rollback has nothing verified to go to
    with pytest.raises(InstallError) as rb:
        env.installer.rollback()
    assert rb.value.code == "no-previous"


def test_tampered_staged_file_is_refused(env: Env) -> None:
    manifest, sigs, staged = bundle_parts(env.bundle(1))
    data = bytearray(staged["model.onnx"].read_bytes())
    data[-1] ^= 0xFF
    staged["model.onnx"].write_bytes(bytes(data))
    with pytest.raises(InstallError) as info:
        env.installer.install(manifest, sigs, staged)
    assert (info.value.step, info.value.code) == ("write", "file-hash-mismatch")
    assert env.server.active is None


def test_edited_manifest_is_refused(env: Env) -> None:
    manifest, sigs, staged = bundle_parts(env.bundle(1))
    edited = manifest.replace(b'"min_accuracy":0.9', b'"min_accuracy":0.1')
    assert edited != manifest
    with pytest.raises(InstallError) as info:
        env.installer.install(edited, sigs, staged)
    assert (info.value.step, info.value.code) == ("verify", "manifest-edited")


def test_recover_after_restart_and_after_damage(env: Env) -> None:
    env.install(env.bundle(1))
    env.install(env.bundle(2, seed=1))
    # restart: a new process serves the active slot
    server, installer = env.fresh()
    installer.recover()
    assert serving_version(server) == 2
    # a half-written slot folder left by kill -9 is cleaned up
    (env.state / "slots" / ".a.tmp-123-456").mkdir()
    # the active slot's model is damaged on disk: fall back to the previous verified slot
    model = env.state / "slots" / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-3])
    server, installer = env.fresh()
    installer.recover()
    assert serving_version(server) == 1
    assert not (env.state / "slots" / ".a.tmp-123-456").exists()
    state = json.loads((env.state / "install.json").read_text())
    assert (state["active"], state["previous"]) == ("a", None)
    # both damaged: serve nothing rather than an unverified model
    model = env.state / "slots" / "a" / "model.onnx"
    model.write_bytes(b"x")
    server, installer = env.fresh()
    installer.recover()
    assert server.active is None


def test_kill_during_write_leaves_old_state(env: Env) -> None:
    """A kill between the slot write and install.json leaves install.json pointing at the old slot."""
    env.install(env.bundle(1))
    manifest, sigs, staged = bundle_parts(env.bundle(2, seed=1))
    from edgefleet.agent.core.manifest import Manifest

    # simulate: the new slot is fully written, then the process dies before the switch
    env.installer.slots.write_slot(
        "b", Manifest.from_bytes(manifest), manifest, json.dumps(sigs).encode(), staged, 10**8
    )
    server, installer = env.fresh()
    installer.recover()
    assert serving_version(server) == 1
    # the deploy, resumed after the restart, installs cleanly over the leftover slot
    result = installer.install(manifest, sigs, staged)
    assert result.version == 2 and serving_version(server) == 2
