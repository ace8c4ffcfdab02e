"""Hash lists once per file (issue 14, point 6): the deploy command's size does not grow with the bundle, the
agent takes the per-chunk digests from the retained hash index, and old agents still parse the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.commands import DeployCommand, FileTransfer, hashes_payload, parse_command
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.sdk.fleet.rollout import INLINE_HASH_CHUNKS
from edgefleet.sdk.fleet.transfer import BundleTransfer
from tests.agent_net_support import eval_set, export_tiny_onnx, make_bundle
from tests.rollout_support import export_heavy


def _bundle(tmp_path: Path, layers: int, name: str) -> Path:
    from edgefleet.sdk.trust.keys import init_keys

    if not (tmp_path / "keys" / "fleet.key").exists():
        init_keys(tmp_path / "keys")
    model = export_heavy(tmp_path / f"{name}.onnx", layers=layers)
    return make_bundle(
        tmp_path / name, tmp_path / "keys", model, eval_set(model, tmp_path / f"{name}.npz"), version=1
    )


def test_the_command_size_does_not_grow_with_the_bundle(tmp_path: Path) -> None:
    # prepare: two bundles, one about twice the other, cut in 1 KiB chunks
    small = BundleTransfer(_bundle(tmp_path, 1, "small"), 1024)
    large = BundleTransfer(_bundle(tmp_path, 4, "large"), 1024)
    assert large.total_bytes > 1.8 * small.total_bytes
    # act
    inline = len(large.deploy_command("r-1", "d1").to_wire())
    sizes = [
        len(t.deploy_command("r-1", "d1", inline_max=INLINE_HASH_CHUNKS).to_wire()) for t in (small, large)
    ]
    # assert: the same size whatever the bundle (a few digits of size/chunks differ), far below inline
    assert abs(sizes[0] - sizes[1]) < 16, sizes
    assert sizes[1] < 3000 < inline, (sizes, inline)


def test_the_hash_index_fills_the_lists_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    transfer = BundleTransfer(_bundle(tmp_path, 1, "b"), 1024)
    cmd = parse_command(transfer.deploy_command("r-1", "d1", inline_max=INLINE_HASH_CHUNKS).to_wire())
    assert isinstance(cmd, DeployCommand)
    big = [f for f in cmd.files if f.hashes_sha256 is not None]
    assert big and all(not f.chunk_sha256 for f in big)
    indexes = transfer.hash_indexes(INLINE_HASH_CHUNKS)
    for spec in big:
        # act
        full = spec.with_hashes(indexes[spec.sha256])
        # assert: the lists the inline command would have carried
        inline = next(f.spec for f in transfer.files if f.spec.sha256 == spec.sha256)
        assert (full.chunk_sha256, full.prefix_sha256) == (inline.chunk_sha256, inline.prefix_sha256)
        forged = hashes_payload(["0" * 64] * spec.chunks, inline.prefix_sha256)
        with pytest.raises(ProtocolError):
            spec.with_hashes(forged)


def test_an_old_agent_parses_the_command_and_keeps_the_new_key() -> None:
    # An agent that predates `hashes_sha256` keeps it in `extra` and downloads with no per-chunk hint.
    obj = {
        "file": "m.onnx",
        "sha256": "ab" * 32,
        "size": 10,
        "chunk_size": 64,
        "chunks": 1,
        "hashes_sha256": "cd" * 32,
    }
    keys = set(FileTransfer.KEYS) - {"hashes_sha256"}
    unknown = {k: v for k, v in obj.items() if k not in keys}
    assert unknown == {"hashes_sha256": "cd" * 32}
    spec = FileTransfer.from_obj(json.loads(json.dumps(obj)))
    assert spec.hashes_sha256 == "cd" * 32 and spec.chunk_sha256 == ()


@pytest.mark.slow
@pytest.mark.broker
def test_a_tampered_chunk_is_refused_with_the_published_hash_index(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    from tests.fleet_support import Host, agents, wait_online

    # prepare: a bundle of ~60 chunks (its command carries the index sha256, not the lists)
    bundle = _bundle(tmp_path, 1, "b")
    host = Host(mosquitto.url, fleet_name, tmp_path / "host", tmp_path / "keys" / "fleet.pub")
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    model_sha = next(e["sha256"] for name, e in files.items() if name.endswith(".onnx"))

    def tamper(sha: str, index: int, data: bytes) -> bytes:
        return b"\0" * len(data) if sha == model_sha and index == 20 else data

    try:
        with agents(tmp_path, mosquitto.url, fleet_name, tmp_path / "keys" / "fleet.pub", ["h1"]):
            wait_online(host.fleet.store, fleet_name, host.fleet.options, ["h1"])
            # act
            outcome = host.deploy(bundle, "h1", chunk_size=4096, chunk_filter=tamper)
    finally:
        host.close()
    # assert: chunk 20 was refused at once (the digests came from the index) and repaired
    assert outcome.status == "deployed", outcome
    assert any(e.code == "chunk-hash-mismatch" for e in outcome.errors), outcome.errors
    assert outcome.repairs >= 1


def test_the_tiny_bundle_keeps_its_lists_inline(tmp_path: Path) -> None:
    from edgefleet.sdk.trust.keys import init_keys

    init_keys(tmp_path / "keys")
    model = export_tiny_onnx(tmp_path / "m.onnx")
    bundle = make_bundle(
        tmp_path / "b", tmp_path / "keys", model, eval_set(model, tmp_path / "e.npz"), version=1
    )
    cmd = BundleTransfer(bundle, 32 * 1024).deploy_command("r", "d", inline_max=INLINE_HASH_CHUNKS)
    assert all(f.hashes_sha256 is None and f.chunk_sha256 for f in cmd.files)
