"""The fleet's sender (sdk/fleet/transfer.py): the typed deploy command for a signed bundle, its chunks, and
refusals of broken bundles, bad chunk sizes, bad broker URLs and empty selections before anything is sent."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from edgefleet.agent.core.protocol import DeployCommand, parse_command
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.errors import BundleRefused, FleetError
from edgefleet.sdk.fleet.transfer import BundleTransfer, choose_chunk_size
from tests.fleet_support import tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("push"))


def test_deploy_command_describes_every_signed_file(bundle: Path) -> None:
    # prepare
    transfer = BundleTransfer(bundle, chunk_size=100)
    # act: the command as a device receives it
    cmd = parse_command(transfer.deploy_command("d1", "dev-1").to_wire())
    # assert: every file's signed hash and size, chunks that rebuild it and match their digests
    assert isinstance(cmd, DeployCommand) and cmd.device == "dev-1"
    assert cmd.manifest == (bundle / "manifest.json").read_bytes()
    assert [f.sha256 for f in cmd.files] == transfer.shas()
    for spec in cmd.files:
        data = (bundle / spec.file).read_bytes()
        assert spec.sha256 == hashlib.sha256(data).hexdigest() and spec.size == len(data)
        blob = transfer.blobs[spec.sha256]
        rebuilt = b"".join(blob.chunk(i) or b"" for i in range(spec.chunks))
        assert rebuilt == data
        assert all(
            hashlib.sha256(blob.chunk(i) or b"").hexdigest() == h for i, h in enumerate(spec.chunk_sha256)
        )
        assert spec.delta is None
    assert transfer.blobs[cmd.files[0].sha256].chunk(cmd.files[0].chunks) is None
    transfer.close()


def test_a_bundle_whose_file_changed_is_refused(bundle: Path, tmp_path: Path) -> None:
    # prepare: a copy whose model gained a byte after signing
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    model = next(p for p in copy.iterdir() if p.suffix == ".onnx")
    model.write_bytes(model.read_bytes() + b"\0")
    # act / assert: refused before anything is cut into chunks
    with pytest.raises(BundleRefused, match="does not match its manifest entry"):
        BundleTransfer(copy)
    model.write_bytes(model.read_bytes()[:-1][::-1])  # same size, other bytes
    with pytest.raises(BundleRefused, match="does not match its manifest entry"):
        BundleTransfer(copy)
    (copy / "signature.json").unlink()
    with pytest.raises(BundleRefused, match="signature.json"):
        BundleTransfer(copy)


def test_bad_chunk_sizes_are_refused(bundle: Path) -> None:
    # a chunk size the agents would refuse (tiny chunks blow up their per-chunk bookkeeping) never leaves
    with pytest.raises(BundleRefused, match="below the 64 bytes agents accept"):
        BundleTransfer(bundle, chunk_size=0)
    with pytest.raises(BundleRefused, match="below the 64 bytes agents accept"):
        BundleTransfer(bundle, chunk_size=63)
    with pytest.raises(BundleRefused, match="--chunk-size 64 or more"):
        choose_chunk_size(None, 8)
    assert choose_chunk_size(65536, 256) == 256
    # what the sender cuts at the minimum parses on a device
    cmd = parse_command(BundleTransfer(bundle, chunk_size=64).deploy_command("d", "dev-1").to_wire())
    assert isinstance(cmd, DeployCommand) and {f.chunk_size for f in cmd.files} == {64}


def test_bad_broker_url_and_no_targets(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="mqtt://"):
        Fleet("http://x", store=f"sqlite:///{tmp_path / 'f.db'}")
    fleet = Fleet("mqtt://127.0.0.1:1", store=f"sqlite:///{tmp_path / 'f.db'}", trusted_keys=[])
    try:
        # act: a deploy to a fleet with no devices (the store is empty; no broker is asked)
        with pytest.raises(FleetError, match="no devices yet"):
            fleet.plan([bundle], "all", refresh=False)
        with pytest.raises(FleetError, match="rollout id"):
            fleet.deploy(bundle, "all", rollout_id="bad id/with slash")
    finally:
        fleet.close()
