"""The deploy state machine on its own: hand-made messages, a fake clock, a real staging folder, no broker."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from edgefleet.agent.core.codes import InstallState
from edgefleet.agent.core.errors import ProtocolError, TransferError, VerifyError
from edgefleet.agent.core.protocol import (
    Code,
    DeployCommand,
    FileTransfer,
    Missing,
    Rejected,
)
from edgefleet.agent.deploy_store import DeployFiles
from edgefleet.agent.deployment import (
    MAX_HASH_FAILURES,
    Action,
    ClearPending,
    DeployMachine,
    Discard,
    Install,
    PublishState,
    Report,
    SaveOutcome,
    SavePending,
    Send,
    Subscribe,
    Unsubscribe,
    verify_deploy,
)
from edgefleet.agent.transfer import StagingArea, chunk_digests

CHUNK = 256
REPAIR_S = 2.0
TIMEOUT_S = 60.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Device:
    """A machine plus what its wiring would do with its actions: persist into the state folder, record the rest."""

    def __init__(self, state_dir: Path, verify: Callable[[DeployCommand], Any], clock: Clock) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.files = DeployFiles(state_dir)
        self.staging = StagingArea(state_dir / "staging", max_chunk_bytes=4 * CHUNK)
        self.machine = DeployMachine(
            self.staging,
            verify,
            device_id="dev-1",
            repair_after_s=REPAIR_S,
            transfer_timeout_s=TIMEOUT_S,
            max_chunk_bytes=4 * CHUNK,
        )
        self.machine.last_outcome = self.files.load_outcome()
        self.subs: set[str] = set()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.installs: list[Install] = []

    def perform(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append((action.cls.TYPE, dict(action.fields)))
            elif isinstance(action, Report):
                self.sent.append(("error", {"code": action.code, "reason": action.reason, "ref": action.ref}))
            elif isinstance(action, Subscribe):
                self.subs.add(action.sha256)
            elif isinstance(action, Unsubscribe):
                self.subs.discard(action.sha256)
            elif isinstance(action, SavePending):
                self.files.save_pending(action.command)
            elif isinstance(action, SaveOutcome):
                self.files.save_outcome(action.deploy, action.event)
            elif isinstance(action, ClearPending):
                self.files.clear_pending()
            elif isinstance(action, Discard):
                for sha in action.sha256s:
                    self.staging.discard(sha)
            elif isinstance(action, Install):
                self.installs.append(action)
        return actions

    def deploy(self, cmd: DeployCommand) -> list[Action]:
        return self.perform(self.machine.deploy(cmd, self.clock.now))

    def chunk(self, sha: str, index: int, data: bytes, repair: bool = False) -> list[Action]:
        return self.perform(self.machine.chunk(sha, index, data, repair=repair, now=self.clock.now))

    def tick(self, connected: bool = True) -> list[Action]:
        return self.perform(self.machine.tick(self.clock.now, connected=connected))

    def types(self) -> list[str]:
        return [t for t, _ in self.sent]


def _blocks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def _spec(name: str, data: bytes, *, hints: bool = True, sha256: str | None = None) -> FileTransfer:
    blocks = _blocks(data)
    chunk_sha, prefix_sha = chunk_digests(blocks) if hints else ([], [])
    return FileTransfer(
        file=name,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=CHUNK,
        chunks=len(blocks),
        chunk_sha256=tuple(chunk_sha),
        prefix_sha256=tuple(prefix_sha),
    )


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A signed bundle, the fleet's public key and the bundle's files' bytes."""
    from edgefleet.sdk.trust.keys import init_keys
    from tests.agent_net_support import make_bundle

    root = tmp_path_factory.mktemp("machine-bundle")
    keys = init_keys(root / "keys")
    (root / "model.onnx").write_bytes(bytes(range(256)) * 9 + b"tail")
    (root / "eval.npz").write_bytes(b"eval" * 100)
    bundle = make_bundle(root / "bundle", root / "keys", root / "model.onnx", root / "eval.npz", version=3)
    manifest = (bundle / "manifest.json").read_bytes()
    files = {name: (bundle / name).read_bytes() for name in json.loads(manifest)["files"]}
    return SimpleNamespace(
        manifest=manifest,
        signatures=json.loads((bundle / "signature.json").read_bytes()),
        files=files,
        pub=str(keys.public_path),
    )


def _command(signed: SimpleNamespace, deploy_id: str = "d-1") -> DeployCommand:
    files = tuple(_spec(name, data) for name, data in sorted(signed.files.items()))
    return DeployCommand(
        id=deploy_id, manifest=signed.manifest, signatures=signed.signatures, files=files, device="dev-1"
    )


def _verifier(signed: SimpleNamespace, state_dir: Path) -> Callable[[DeployCommand], Any]:
    from edgefleet.agent.core.trust import TrustStore

    trust = TrustStore.open(state_dir, [signed.pub])
    return lambda cmd: verify_deploy(cmd, trust, profile="x86-64", device_id="dev-1", ledger=None)


@pytest.fixture
def device(tmp_path: Path, signed: SimpleNamespace) -> Device:
    return Device(tmp_path / "state", _verifier(signed, tmp_path / "state"), Clock())


def _send_all(
    dev: Device, cmd: DeployCommand, signed: SimpleNamespace, order: Callable[[list[int]], list[int]]
) -> None:
    by_sha = {f.sha256: signed.files[f.file] for f in cmd.files}
    for spec in cmd.files:
        blocks = _blocks(by_sha[spec.sha256])
        for i in order(list(range(spec.chunks))):
            dev.chunk(spec.sha256, i, blocks[i])


def test_in_order_chunks_stage_the_exact_files_then_install_and_report(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare
    cmd = _command(signed)
    # act: the command, then every chunk in order
    device.deploy(cmd)
    assert device.machine.state == InstallState.DOWNLOADING, device.sent
    assert device.subs == {f.sha256 for f in cmd.files}
    assert (device.state_dir / "deploy.json").exists()
    _send_all(device, cmd, signed, lambda idx: idx)
    # assert: one install of exactly the signed files, the broadcasts left, the steps reported in order
    assert device.machine.state == InstallState.INSTALLING
    [install] = device.installs
    assert {name: path.read_bytes() for name, path in install.staged.items()} == signed.files
    assert device.subs == set()
    steps = [f["step"] for t, f in device.sent if t == "progress"]
    assert steps == ["verify-manifest", "download", "downloaded"]
    # the wiring reports the install's success: the outcome is persisted, the deploy forgotten
    actions = device.perform(device.machine.installed("d-1", "tiny", 3, {"accuracy": 1.0}))
    assert isinstance(actions[0], SaveOutcome)  # durable before the pending deploy is cleared
    assert [type(a) for a in actions[-2:]] == [Send, PublishState]
    assert device.sent[-1] == (
        "deployed",
        {"deploy": "d-1", "name": "tiny", "version": 3, "health": {"accuracy": 1.0}},
    )
    assert device.machine.state == InstallState.DEPLOYED
    assert not (device.state_dir / "deploy.json").exists()
    assert list((device.state_dir / "staging").iterdir()) == []


def test_out_of_order_chunks_stage_the_same_files(device: Device, signed: SimpleNamespace) -> None:
    cmd = _command(signed)
    device.deploy(cmd)
    _send_all(device, cmd, signed, lambda idx: idx[1::2][::-1] + idx[::2])
    [install] = device.installs
    assert {name: path.read_bytes() for name, path in install.staged.items()} == signed.files


def test_missing_ranges_are_asked_for_after_a_silence_with_backoff_then_repaired(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: a download where every third chunk of the model is lost
    cmd = _command(signed)
    model = next(f for f in cmd.files if f.file == "model.onnx")
    blocks = _blocks(signed.files["model.onnx"])
    device.deploy(cmd)
    for i in range(model.chunks):
        if i % 3:
            device.chunk(model.sha256, i, blocks[i])
    lost = [i for i in range(model.chunks) if i % 3 == 0]
    # act + assert: nothing is asked while the repair delay runs
    device.clock.advance(REPAIR_S - 0.1)
    assert device.tick() == []
    assert device.tick(connected=False) == []
    device.clock.advance(0.2)
    asked = [a for a in device.tick() if isinstance(a, Send) and a.cls is Missing]
    ranges = {a.fields["sha256"]: a.fields["ranges"] for a in asked}
    assert ranges[model.sha256] == tuple((i, i) for i in lost)
    assert set(ranges) == {f.sha256 for f in cmd.files}  # the other file got no chunk at all
    # nothing comes: asked again after the delay, then each request waits twice as long as the last
    device.clock.advance(REPAIR_S)
    assert [a for a in device.tick() if isinstance(a, Send)]
    device.clock.advance(2 * REPAIR_S - 0.1)
    assert device.tick() == []
    device.clock.advance(0.2)
    assert [a for a in device.tick() if isinstance(a, Send)]
    # the repairs arrive on the device's own topic and complete the download
    for i in lost:
        device.chunk(model.sha256, i, blocks[i], repair=True)
    other = next(f for f in cmd.files if f.file != "model.onnx")
    for i, block in enumerate(_blocks(signed.files[other.file])):
        device.chunk(other.sha256, i, block, repair=True)
    assert len(device.installs) == 1


def test_forged_oversized_and_misplaced_chunks_are_refused_and_not_stored(
    device: Device, signed: SimpleNamespace
) -> None:
    cmd = _command(signed)
    model = next(f for f in cmd.files if f.file == "model.onnx")
    device.deploy(cmd)
    bad = {
        (0, b"\0" * CHUNK): Code.CHUNK_HASH,
        (1, b"x" * 10): Code.CHUNK_SIZE,
        (model.chunks, b"x" * CHUNK): Code.CHUNK_INDEX,
        (0, b"x" * (4 * CHUNK + 1)): Code.CHUNK_OVERSIZE,
    }
    for (index, payload), code in bad.items():
        with pytest.raises(TransferError) as refused:
            device.chunk(model.sha256, index, payload)
        assert refused.value.code == code
    assert device.machine.pending is not None and device.machine.pending.received == 0
    # a repair for a file no deploy wants is an error; a broadcast for one is someone else's
    stranger = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(TransferError) as unknown:
        device.chunk(stranger, 0, b"x", repair=True)
    assert unknown.value.code == Code.UNKNOWN_TRANSFER
    assert device.chunk(stranger, 0, b"x") == []


def test_a_restart_resumes_the_download_from_persisted_state(
    tmp_path: Path, device: Device, signed: SimpleNamespace
) -> None:
    # prepare: half of every file arrives, then the process dies (bitmaps flushed, as on close)
    cmd = _command(signed)
    device.deploy(cmd)
    _send_all(device, cmd, signed, lambda idx: idx[: len(idx) // 2])
    have = device.machine.pending.received  # type: ignore[union-attr]
    device.staging.close()
    # act: a new machine on the same state folder resumes
    again = Device(device.state_dir, _verifier(signed, device.state_dir), device.clock)
    again.perform(again.machine.resume(again.files.load_pending(), None, again.clock.now))
    # assert: it asks for the same files, knows what it has, and finishes with the rest only
    assert again.subs == {f.sha256 for f in cmd.files}
    [download] = [f for t, f in again.sent if t == "progress"]
    assert download["detail"]["have"] == have > 0
    _send_all(again, cmd, signed, lambda idx: idx[len(idx) // 2 :])
    [install] = again.installs
    assert {name: path.read_bytes() for name, path in install.staged.items()} == signed.files


def test_a_restart_after_the_outcome_resends_it_and_clears_the_pending_deploy(
    device: Device, signed: SimpleNamespace
) -> None:
    cmd = _command(signed)
    device.deploy(cmd)
    # The outcome was persisted, then the process died before deploy.json was removed.
    device.files.save_outcome(
        "d-1", {"type": "rejected", "deploy": "d-1", "step": "load", "code": "x", "reason": "y"}
    )
    again = Device(device.state_dir, _verifier(signed, device.state_dir), device.clock)
    again.perform(again.machine.resume(again.files.load_pending(), None, again.clock.now))
    assert again.sent == [("rejected", {"deploy": "d-1", "step": "load", "code": "x", "reason": "y"})]
    assert not (device.state_dir / "deploy.json").exists() and again.machine.pending is None


def test_a_restart_after_the_switch_reports_deployed(device: Device, signed: SimpleNamespace) -> None:
    cmd = _command(signed)
    device.deploy(cmd)
    again = Device(device.state_dir, _verifier(signed, device.state_dir), device.clock)
    again.perform(again.machine.resume(again.files.load_pending(), ("tiny", 3), again.clock.now))
    assert again.sent == [("deployed", {"deploy": "d-1", "name": "tiny", "version": 3, "health": {}})]
    assert not (device.state_dir / "deploy.json").exists()
    assert again.files.load_outcome()["deploy"] == "d-1"  # type: ignore[index]


def test_a_download_that_stalls_past_the_timeout_is_rejected_but_offline_time_does_not_count(
    device: Device, signed: SimpleNamespace
) -> None:
    cmd = _command(signed)
    device.deploy(cmd)
    device.clock.advance(TIMEOUT_S - 1)
    device.machine.reconnected(device.clock.now)  # the broker was away: the silence starts again
    device.clock.advance(TIMEOUT_S - 1)
    still = device.tick()  # 2 × TIMEOUT_S since the deploy, but only TIMEOUT_S - 1 since the reconnect
    assert still and not any(isinstance(a, Send) and a.cls is Rejected for a in still)
    device.clock.advance(2)
    device.tick()
    assert device.sent[-1] == (
        "rejected",
        {
            "deploy": "d-1",
            "step": "download",
            "code": Code.TRANSFER_TIMEOUT,
            "reason": f"no chunk arrived for {TIMEOUT_S:g} s",
        },
    )
    assert device.subs == set() and device.machine.pending is None
    assert list((device.state_dir / "staging").iterdir()) == []


def test_a_repeated_command_asks_again_while_downloading_and_gets_the_stored_outcome_after(
    device: Device, signed: SimpleNamespace
) -> None:
    cmd = _command(signed)
    device.deploy(cmd)
    before = len(device.sent)
    device.clock.advance(0.5)
    assert device.deploy(cmd) == []  # a redelivery: no second download
    assert [a for a in device.tick() if isinstance(a, Send) and a.cls is Missing]  # asked at once
    _send_all(device, cmd, signed, lambda idx: idx)
    device.perform(device.machine.install_failed("d-1", "health", "below-floor", "accuracy 0.2 < 0.9"))
    sent = device.deploy(cmd)
    assert [(type(a), a.cls) for a in sent if isinstance(a, Send)] == [(Send, Rejected)]
    assert len(device.installs) == 1 and len(device.sent) > before


def test_an_unverifiable_deploy_is_rejected_before_any_download(
    device: Device, signed: SimpleNamespace
) -> None:
    cmd = _command(signed)
    forged = DeployCommand(
        id="d-bad", manifest=cmd.manifest, signatures={"signatures": []}, files=cmd.files, device="dev-1"
    )
    actions = device.deploy(forged)
    assert not any(isinstance(a, (Subscribe, SavePending)) for a in actions)
    assert device.sent[-1][0] == "rejected" and device.sent[-1][1]["step"] == "verify-manifest"
    assert device.machine.state == InstallState.REJECTED
    with pytest.raises(ProtocolError) as wrong:
        device.deploy(
            DeployCommand(
                id="d-x", manifest=cmd.manifest, signatures=cmd.signatures, files=cmd.files, device="dev-2"
            )
        )
    assert wrong.value.code == Code.WRONG_DEVICE


def test_a_new_deploy_supersedes_a_download_and_a_running_install_refuses_one(
    device: Device, signed: SimpleNamespace
) -> None:
    first, second = _command(signed, "d-1"), _command(signed, "d-2")
    device.deploy(first)
    _send_all(device, first, signed, lambda idx: idx[:1])
    device.deploy(second)
    assert ("rejected", "d-1", "superseded") in [(t, f.get("deploy"), f.get("code")) for t, f in device.sent]
    # the same files: what arrived for d-1 counts for d-2
    assert device.machine.pending is not None and device.machine.pending.received == len(first.files)
    _send_all(device, second, signed, lambda idx: idx[1:])
    assert [i.command.id for i in device.installs] == ["d-2"]
    with pytest.raises(ProtocolError) as busy:
        device.deploy(_command(signed, "d-3"))
    assert busy.value.code == Code.BUSY


def test_a_file_failing_its_signed_hash_is_fetched_again_then_rejected(tmp_path: Path) -> None:
    # prepare: no per-chunk hints, and a declared sha256 the data never matches (a forged broadcast)
    data = bytes(range(200)) * 3
    spec = _spec("model.onnx", data, hints=False, sha256="0" * 64)
    cmd = DeployCommand(id="d-h", manifest=b"{}", files=(spec,), device="dev-1")
    dev = Device(tmp_path, lambda c: SimpleNamespace(name="m", version=1), Clock())
    dev.deploy(cmd)
    for attempt in range(1, MAX_HASH_FAILURES + 1):
        for i, block in enumerate(_blocks(data)):
            dev.chunk(spec.sha256, i, block)
        if attempt < MAX_HASH_FAILURES:
            assert dev.sent[-1][0] == "error" and dev.sent[-1][1]["code"] == Code.HASH_MISMATCH
            assert dev.machine.pending is not None and dev.machine.pending.received == 0
    assert dev.sent[-1][0] == "rejected" and dev.sent[-1][1]["code"] == Code.HASH_MISMATCH
    assert dev.installs == [] and dev.machine.pending is None


def test_verification_failures_become_rejections_with_their_code(tmp_path: Path) -> None:
    def refuse(cmd: DeployCommand) -> Any:
        raise VerifyError("bad-signature", "no valid signature")

    spec = _spec("model.onnx", b"x" * 300)
    dev = Device(tmp_path, refuse, Clock())
    dev.deploy(DeployCommand(id="d-v", manifest=b"{}", files=(spec,)))
    assert dev.sent == [
        ("progress", {"deploy": "d-v", "step": "verify-manifest", "detail": {}}),
        (
            "rejected",
            {
                "deploy": "d-v",
                "step": "verify-manifest",
                "code": "bad-signature",
                "reason": "no valid signature",
            },
        ),
    ]


def _delta_device(tmp_path: Path, old: bytes) -> Device:
    """A device whose slot `a` holds `old` as model.onnx (the base a delta applies to)."""
    slot = tmp_path / "state" / "slots" / "a"
    slot.mkdir(parents=True)
    (slot / "model.onnx").write_bytes(old)
    entry = {"sha256": hashlib.sha256(old).hexdigest(), "size": len(old)}
    (slot / "manifest.json").write_text(json.dumps({"files": {"model.onnx": entry}}))
    dev = Device(tmp_path / "state", lambda c: SimpleNamespace(name="m", version=2), Clock())
    from edgefleet.agent.delta import find_base

    dev.machine.find_base = lambda sha: find_base(dev.state_dir, sha)
    return dev


def _delta_command(old: bytes, new: bytes, patch: bytes) -> DeployCommand:
    from edgefleet.agent.core.protocol import DeltaSpec

    p = _spec("patch", patch)
    delta = DeltaSpec(
        base_sha256=hashlib.sha256(old).hexdigest(),
        sha256=p.sha256,
        size=p.size,
        chunk_size=p.chunk_size,
        chunks=p.chunks,
        chunk_sha256=p.chunk_sha256,
        prefix_sha256=p.prefix_sha256,
    )
    target = dataclasses.replace(_spec("model.onnx", new), delta=delta)
    return DeployCommand(id="d-delta", manifest=b"{}", files=(target,), device="dev-1")


def test_a_delta_is_downloaded_instead_of_the_file_and_rebuilt_into_it(tmp_path: Path) -> None:
    import bsdiff4

    # prepare: the device has v1; v2 differs in a few bytes
    old = bytes(range(256)) * 8
    new = old[:1000] + b"changed!" + old[1008:]
    patch = bsdiff4.diff(old, new)
    dev = _delta_device(tmp_path, old)
    cmd = _delta_command(old, new, patch)
    # act: the machine subscribes to the patch, not the file, and rebuilds the file from it
    dev.deploy(cmd)
    patch_sha = hashlib.sha256(patch).hexdigest()
    assert dev.subs == {patch_sha}
    for i, block in enumerate(_blocks(patch)):
        dev.chunk(patch_sha, i, block)
    # assert: the staged file is the new one, under its own name
    [install] = dev.installs
    assert {name: path.read_bytes() for name, path in install.staged.items()} == {"model.onnx": new}


def test_a_delta_that_does_not_rebuild_the_signed_file_falls_back_to_the_full_file(tmp_path: Path) -> None:
    import bsdiff4

    # prepare: a patch that rebuilds something else than the signed file
    old = bytes(range(256)) * 8
    new = old[:1000] + b"changed!" + old[1008:]
    wrong = bsdiff4.diff(old, old[:1000] + b"tampered" + old[1008:])
    dev = _delta_device(tmp_path, old)
    cmd = _delta_command(old, new, wrong)
    target = cmd.files[0]
    dev.deploy(cmd)
    wrong_sha = hashlib.sha256(wrong).hexdigest()
    for i, block in enumerate(_blocks(wrong)):
        dev.chunk(wrong_sha, i, block)
    # assert: an error, and the whole file is asked for instead
    assert dev.sent[-1][0] == "error" and dev.sent[-1][1]["code"] == Code.HASH_MISMATCH
    assert dev.subs == {target.sha256} and dev.installs == []
    for i, block in enumerate(_blocks(new)):
        dev.chunk(target.sha256, i, block)
    [install] = dev.installs
    assert {name: path.read_bytes() for name, path in install.staged.items()} == {"model.onnx": new}


def test_the_machine_needs_no_mqtt_client_and_no_thread() -> None:
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "import edgefleet.agent.deployment, edgefleet.agent.deploy_store\n"
        "print(sorted(m for m in ('paho', 'edgefleet.agent.mqtt_session', 'edgefleet.agent.daemon') if m in sys.modules),"
        " threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["[]", "1"]
