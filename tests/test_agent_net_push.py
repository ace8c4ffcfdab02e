"""Host-side pusher: reads a signed bundle, cuts it into chunks, refuses broken bundles before sending."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgefleet.agent.core.protocol import DeployCommand, parse_command
from edgefleet.sdk.push import BundlePusher, PushError
from tests.agent_net_support import eval_set, export_tiny_onnx, make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.sdk.trust.keys import init_keys

    d = tmp_path_factory.mktemp("push")
    init_keys(d / "keys")
    model = export_tiny_onnx(d / "m.onnx")
    return make_bundle(d / "bundle", d / "keys", model, eval_set(model, d / "e.npz"), version=1)


def test_deploy_command_describes_every_signed_file(bundle: Path) -> None:
    pusher = BundlePusher(bundle, chunk_size=100)
    cmd = parse_command(pusher.deploy_command("d1", "dev-1").to_wire())
    assert isinstance(cmd, DeployCommand) and cmd.device == "dev-1"
    assert cmd.manifest == (bundle / "manifest.json").read_bytes()
    for spec in cmd.files:
        data = (bundle / spec.file).read_bytes()
        assert spec.sha256 == hashlib.sha256(data).hexdigest() and spec.size == len(data)
        rebuilt = b"".join(pusher.chunk(spec.sha256, i) for i in range(spec.chunks))
        assert rebuilt == data
        assert all(
            hashlib.sha256(pusher.chunk(spec.sha256, i)).hexdigest() == h
            for i, h in enumerate(spec.chunk_sha256)
        )
    with pytest.raises(PushError):
        pusher.chunk(cmd.files[0].sha256, cmd.files[0].chunks)


def test_a_bundle_whose_file_changed_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    model = next(p for p in copy.iterdir() if p.suffix == ".onnx")
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(PushError, match="does not match"):
        BundlePusher(copy)
    (copy / "signature.json").unlink()
    with pytest.raises(PushError, match="signature.json"):
        BundlePusher(copy)


def test_bad_broker_url_and_no_targets(bundle: Path) -> None:
    with pytest.raises(PushError, match="mqtt://"):
        BundlePusher(bundle, broker_url="http://x").push(["dev-1"], timeout_s=1)
    with pytest.raises(PushError, match="no target"):
        BundlePusher(bundle).push([], timeout_s=1)
    with pytest.raises(PushError, match="chunk size"):
        BundlePusher(bundle, chunk_size=0)
