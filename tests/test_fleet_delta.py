"""Delta updates: the agent's pure-Python bspatch rebuilds what bsdiff4 diffs; the host picks deltas with care."""

from __future__ import annotations

import json
import random
from pathlib import Path

import bsdiff4
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.bspatch import apply_patch
from edgefleet.agent.core.errors import TransferError
from edgefleet.agent.core.protocol import parse_command
from edgefleet.sdk.fleet.delta import base_bundle, make_patch, plan_patch, supports_delta
from edgefleet.sdk.fleet.transfer import Blob, BundleTransfer
from tests.fleet_support import build_artifacts


@settings(max_examples=60, deadline=None)
@given(
    old=st.binary(max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 3000), st.binary(max_size=40), st.integers(0, 40)), max_size=8),
)
def test_bspatch_rebuilds_what_bsdiff4_diffed(old: bytes, edits: list[tuple[int, bytes, int]]) -> None:
    new = bytearray(old)
    for at, insert, cut in edits:
        at = min(at, len(new))
        new[at : at + cut] = insert
    patch = bsdiff4.diff(old, bytes(new))
    assert apply_patch(old, patch, len(new)) == bytes(new)


def test_bspatch_refuses_bad_patches_without_crashing() -> None:
    old = bytes(range(256)) * 20
    new = old[:1000] + b"changed" + old[1000:]
    patch = bsdiff4.diff(old, new)
    with pytest.raises(TransferError, match="more than"):
        apply_patch(old, patch, len(new) - 1)
    with pytest.raises(TransferError, match="not a BSDIFF40"):
        apply_patch(old, b"garbage" * 10, 10_000)
    rng = random.Random(0)
    for _ in range(50):
        broken = bytearray(patch)
        for _ in range(3):
            broken[rng.randrange(len(broken))] ^= 0xFF
        try:
            out = apply_patch(old, bytes(broken), len(new))
        except TransferError:
            continue
        # A patch corrupted in its data can still build bytes: the signed sha256 catches that.
        assert len(out) == len(new)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("delta-bundles"))


def _row(bundle: Path, bid: int) -> dict[str, object]:
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    return {
        "id": bid,
        "name": manifest["name"],
        "version": manifest["version"],
        "profile": manifest["target"]["profile"],
        "path": str(bundle),
        "manifest": manifest,
    }


def test_a_delta_goes_only_to_devices_that_run_the_previous_version_and_can_patch(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    v1, v2, arm = _row(artifacts["v1"], 1), _row(artifacts["v2"], 2), _row(artifacts["v1-arm64"], 3)
    able = {"active_model": "tiny", "active_version": 1, "state": {"delta": ["bsdiff4"]}}
    assert supports_delta(able) and not supports_delta({"state": {}})
    assert base_bundle(able, v2, [v1, v2, arm]) == v1
    assert base_bundle({**able, "active_version": 2}, v2, [v1, v2]) is None
    assert base_bundle({**able, "active_model": "other"}, v2, [v1, v2]) is None
    assert plan_patch({**able, "state": {}}, v2, [v1, v2], tmp_path) is None
    # Two unrelated tiny models differ everywhere: the patch is not worth it, the full file goes.
    assert plan_patch(able, v2, [v1, v2], tmp_path, max_ratio=0.01) is None
    planned = plan_patch(able, v2, [v1, v2], tmp_path, max_ratio=10.0)
    assert planned is not None
    file, patch = planned
    manifest = json.loads((artifacts["v2"] / "manifest.json").read_bytes())
    assert file == manifest["model"]["file"] and patch.target_sha256 == manifest["files"][file]["sha256"]
    assert (
        make_patch(
            Path(str(v1["path"]))
            / str(json.loads((artifacts["v1"] / "manifest.json").read_bytes())["model"]["file"]),
            artifacts["v2"] / file,
            tmp_path,
        ).path
        == patch.path
    )


def test_the_deploy_command_carries_the_delta_and_still_parses_for_old_agents(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    transfer = BundleTransfer(artifacts["v2"], chunk_size=64)
    file = transfer.files[0].spec.file
    patch_path = tmp_path / "p.bsdiff4"
    patch_path.write_bytes(b"x" * 150)
    blob = Blob(patch_path, "ab" * 32, 64)
    payload = transfer.deploy_command("r-1", "d1", {file: ("cd" * 32, blob)}).to_wire()
    obj = json.loads(payload)
    delta = next(f for f in obj["files"] if f["file"] == file)["delta"]
    assert (delta["format"], delta["base_sha256"], delta["sha256"], delta["size"], delta["chunks"]) == (
        "bsdiff4",
        "cd" * 32,
        "ab" * 32,
        150,
        3,
    )
    assert len(delta["chunk_sha256"]) == 3
    # An agent that knows nothing of deltas reads the same command and downloads the full file.
    cmd = parse_command(payload)
    assert [f.sha256 for f in cmd.files] == transfer.shas()


def test_the_agent_finds_its_base_and_rebuilds_only_the_signed_file(tmp_path: Path) -> None:
    import hashlib

    from edgefleet.agent.core.protocol import FileTransfer
    from edgefleet.agent.delta import find_base, patch_transfer, rebuild

    old = bytes(range(256)) * 64
    new = old[:5000] + b"fine-tuned last layer" + old[5100:]
    slot = tmp_path / "slots" / "b"
    slot.mkdir(parents=True)
    (slot / "model.onnx").write_bytes(old)
    old_sha = hashlib.sha256(old).hexdigest()
    (slot / "manifest.json").write_text(
        json.dumps({"files": {"model.onnx": {"sha256": old_sha, "size": len(old)}}})
    )
    assert find_base(tmp_path, old_sha) == slot / "model.onnx"
    assert find_base(tmp_path, "0" * 64) is None
    target = FileTransfer("model.onnx", hashlib.sha256(new).hexdigest(), len(new), 4096, -(-len(new) // 4096))
    patch = bsdiff4.diff(old, new)
    spec = patch_transfer(
        target,
        {
            "format": "bsdiff4",
            "base_sha256": old_sha,
            "sha256": hashlib.sha256(patch).hexdigest(),
            "size": len(patch),
            "chunk_size": 4096,
            "chunks": -(-len(patch) // 4096),
        },
    )
    assert (spec.file, spec.size) == ("model.onnx.bsdiff4", len(patch))
    (tmp_path / "p").write_bytes(patch)
    assert rebuild(slot / "model.onnx", tmp_path / "p", tmp_path / "out", target).read_bytes() == new
    wrong = FileTransfer("model.onnx", "ab" * 32, len(new), 4096, target.chunks)
    with pytest.raises(TransferError, match="does not match its signed sha256"):
        rebuild(slot / "model.onnx", tmp_path / "p", tmp_path / "out2", wrong)
    assert not (tmp_path / "out2").exists()
    from edgefleet.agent.core.errors import ProtocolError

    with pytest.raises(ProtocolError, match="delta.format"):
        patch_transfer(target, {"format": "xdelta"})
