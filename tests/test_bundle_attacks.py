"""One test per attack on a signed bundle: each is refused with its own code and nothing outside staging changes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, canonical_bytes
from edgefleet.agent.core.trust import TrustStore, key_id
from edgefleet.agent.core.verify import (
    ERROR_CODES,
    copy_bounded,
    verify_bundle_dir,
    verify_file,
    verify_manifest,
)
from edgefleet.sdk.trust.bundle import BundleError, create_bundle, pack, sign_bundle, unpack
from edgefleet.sdk.trust.keys import init_keys, load_private_key, public_raw, sign

PROFILE = "rpi4b"
MAX_MODEL = 1024 * 1024


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "digits",
        "version": 5,
        "target": {"profile": PROFILE, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime", "opset": 17, "min_runtime_version": "1.16"},
        "inputs": [
            {"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8], "preprocessing": "pixels / 16"}
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "compression": [{"step": "int8-dynamic"}],
        "metrics": {"accuracy": 0.98, "p95_ms": 0.4, "size_bytes": 4096},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 50, "warmup_runs": 3, "timeout_s": 30},
    }
    base.update(overrides)
    return base


class Fleet:
    """A host with a fleet key and a device with a state dir, a staging dir and an install dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = init_keys(tmp / "host" / "keys")
        self.key = load_private_key(self.keys.private_path)
        self.state = tmp / "device" / "state"
        self.staging = tmp / "device" / "staging"
        self.installed = tmp / "device" / "installed"
        for d in (self.state, self.staging, self.installed):
            d.mkdir(parents=True)
        self.trust = TrustStore.open(self.state, [self.keys.public_path])
        self.ledger = VersionLedger(self.state)
        self.model = tmp / "host" / "model.onnx"
        self.model.write_bytes(os.urandom(4096))
        self.eval = tmp / "host" / "eval.npz"
        np.savez(self.eval, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))

    def build(self, name: str = "bundle", key: Any = None, **overrides: Any) -> Path:
        return create_bundle(
            self.tmp / "host" / name,
            model_path=self.model,
            eval_npz_path=self.eval,
            manifest_fields=fields(**overrides),
            private_key=key or self.key,
            report={"chosen": "int8"},
        )

    def receive(self, bundle: Path, *, device_id: str = "pi-1", profile: str = PROFILE) -> Manifest:
        """What a device does: stage (unpack or copy), verify, and only then install and record."""
        stage = self.staging / "incoming"
        if bundle.is_dir():
            shutil.copytree(bundle, stage, symlinks=True)
        else:
            unpack(bundle, stage)
        # A failed unpack must clean up after itself (checked by the tar tests); past this point the
        # device discards its staging folder whatever happens.
        try:
            manifest = verify_bundle_dir(
                stage,
                self.trust,
                profile=profile,
                device_id=device_id,
                ledger=self.ledger,
                max_model_bytes=MAX_MODEL,
            )
            shutil.copytree(stage, self.installed / f"{manifest.name}-{manifest.version}")
            self.ledger.record(manifest.name, manifest.version)
        finally:
            shutil.rmtree(stage)
        return manifest

    def snapshot(self) -> dict[str, str]:
        """Every file on the device outside staging, with its hash."""
        out = {}
        for path in sorted((self.tmp / "device").rglob("*")):
            if path.is_file() and self.staging not in path.parents:
                out[str(path.relative_to(self.tmp))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def refused(fleet: Fleet, bundle: Path, code: str, **kw: Any) -> VerifyError | BundleError:
    # prepare
    before = fleet.snapshot()
    # act
    with pytest.raises((VerifyError, BundleError)) as info:
        fleet.receive(bundle, **kw)
    # assert
    assert info.value.code == code, info.value
    assert code in ERROR_CODES or isinstance(info.value, BundleError)
    assert fleet.snapshot() == before
    assert not any(fleet.installed.iterdir())
    return info.value


def test_round_trip_sign_pack_unpack_verify_with_only_the_public_key(fleet: Fleet) -> None:
    bundle = fleet.build()
    tar = pack(bundle, fleet.tmp / "host" / "bundle.tar")
    device_trust = TrustStore.from_public_keys([fleet.keys.public_path.read_bytes()])
    fleet.trust = device_trust
    manifest = fleet.receive(tar)
    assert (manifest.name, manifest.version) == ("digits", 5)
    assert fleet.ledger.last("digits") == 5
    assert sorted(manifest.files) == ["eval.npz", "model.onnx", "report.json"]
    assert manifest.health.min_accuracy == 0.9
    assert (fleet.installed / "digits-5" / "model.onnx").read_bytes() == fleet.model.read_bytes()


def test_pack_is_reproducible(fleet: Fleet) -> None:
    bundle = fleet.build()
    a = pack(bundle, fleet.tmp / "a.tar").read_bytes()
    b = pack(bundle, fleet.tmp / "b.tar").read_bytes()
    assert a == b


def test_flipped_byte_in_model(fleet: Fleet) -> None:
    bundle = fleet.build()
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    refused(fleet, bundle, "file-hash-mismatch")


def test_file_added(fleet: Fleet) -> None:
    bundle = fleet.build()
    (bundle / "payload.sh").write_text("rm -rf /")
    refused(fleet, bundle, "file-unlisted")


def test_file_removed(fleet: Fleet) -> None:
    bundle = fleet.build()
    (bundle / "eval.npz").unlink()
    refused(fleet, bundle, "file-missing")


def test_manifest_edited_after_signing(fleet: Fleet) -> None:
    bundle = fleet.build()
    obj = json.loads((bundle / "manifest.json").read_bytes())
    obj["health"]["min_accuracy"] = 0.0
    (bundle / "manifest.json").write_bytes(canonical_bytes(obj))
    refused(fleet, bundle, "manifest-edited")


def test_signature_by_untrusted_key(fleet: Fleet) -> None:
    other = init_keys(fleet.tmp / "attacker")
    bundle = fleet.build(key=load_private_key(other.private_path))
    refused(fleet, bundle, "untrusted-key")


def test_unsigned_bundle(fleet: Fleet) -> None:
    bundle = fleet.build()
    (bundle / "signature.json").write_bytes(b'{"signatures":[]}')
    refused(fleet, bundle, "unsigned")


def test_replayed_older_version_is_rollback(fleet: Fleet) -> None:
    old = fleet.build("old", version=5)
    new = fleet.build("new", version=6)
    fleet.receive(new)
    shutil.rmtree(fleet.installed / "digits-6")
    refused(fleet, old, "version-rollback")
    assert fleet.ledger.last("digits") == 6


def test_same_version_again_is_not_newer(fleet: Fleet) -> None:
    bundle = fleet.build()
    fleet.receive(bundle)
    shutil.rmtree(fleet.installed / "digits-5")
    refused(fleet, bundle, "version-not-newer")


def test_expired_manifest_is_freeze(fleet: Fleet) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=10)
    bundle = fleet.build(
        created=past.strftime("%Y-%m-%dT%H:%M:%SZ"),
        expires=(past + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    refused(fleet, bundle, "manifest-expired")


def test_bundle_for_another_profile(fleet: Fleet) -> None:
    bundle = fleet.build(target={"profile": "jetson-nano", "device_ids": []})
    refused(fleet, bundle, "wrong-profile")


def test_bundle_for_another_device(fleet: Fleet) -> None:
    bundle = fleet.build(target={"profile": PROFILE, "device_ids": ["pi-2", "pi-3"]})
    refused(fleet, bundle, "wrong-device", device_id="pi-1")
    assert fleet.receive(bundle, device_id="pi-2").version == 5


def test_manifest_over_one_mib_is_refused_before_reading(fleet: Fleet) -> None:
    bundle = fleet.build(metrics={"padding": "x" * MAX_MANIFEST_BYTES})
    assert (bundle / "manifest.json").stat().st_size > MAX_MANIFEST_BYTES
    refused(fleet, bundle, "manifest-too-large")


def test_file_longer_than_declared(fleet: Fleet) -> None:
    bundle = fleet.build()
    with (bundle / "model.onnx").open("ab") as fh:
        fh.write(b"\0" * 10)
    refused(fleet, bundle, "file-too-long")


def test_file_declared_over_the_profile_limit(fleet: Fleet, tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (MAX_MODEL + 1))
    fleet.model = big
    bundle = fleet.build(model={"format": "onnx", "runtime": "onnxruntime", "file": "model.onnx"})
    refused(fleet, bundle, "file-too-large")


def test_symlink_inside_a_bundle_folder(fleet: Fleet) -> None:
    bundle = fleet.build()
    (bundle / "model.onnx").unlink()
    os.symlink("/etc/passwd", bundle / "model.onnx")
    refused(fleet, bundle, "file-not-regular")


def _evil_tar(path: Path, add: Callable[[tarfile.TarFile], None], bundle: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for f in sorted(bundle.iterdir()):
            tar.add(f, arcname=f.name)
        add(tar)
    return path


def _file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


@pytest.mark.parametrize(
    ("member", "code"),
    [
        ("../escaped.txt", "tar-parent-path"),
        ("sub/../../escaped.txt", "tar-parent-path"),
        ("/tmp/edgefleet-escaped.txt", "tar-absolute-path"),
    ],
)
def test_tar_with_unsafe_paths(fleet: Fleet, member: str, code: str) -> None:
    bundle = fleet.build()
    tar = _evil_tar(fleet.tmp / "evil.tar", lambda t: t.addfile(*_file_member(member, b"owned")), bundle)
    refused(fleet, tar, code)
    assert not (fleet.staging / "incoming").exists()
    assert not (fleet.staging / "escaped.txt").exists()
    assert not Path("/tmp/edgefleet-escaped.txt").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "fifo"])
def test_tar_with_links_and_devices(fleet: Fleet, kind: str) -> None:
    bundle = fleet.build()

    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("extra")
        info.type = {
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
            "device": tarfile.CHRTYPE,
            "fifo": tarfile.FIFOTYPE,
        }[kind]
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    tar = _evil_tar(fleet.tmp / "evil.tar", add, bundle)
    refused(fleet, tar, "tar-link" if kind.endswith("link") else "tar-special-file")
    assert not (fleet.staging / "incoming").exists()


def test_copy_bounded_cuts_off_an_endless_stream(tmp_path: Path) -> None:
    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            self.served += len(buf)
            buf[:] = b"\xff" * len(buf)
            return len(buf)

    stream = Endless()
    dest = tmp_path / "part"
    with pytest.raises(VerifyError) as info:
        copy_bounded(stream, dest, declared_size=3 * 1024 * 1024, max_bytes=MAX_MODEL * 8)
    assert info.value.code == "file-too-long"
    assert not dest.exists()
    # It read the declared size plus a one-byte probe, never more than one chunk beyond it.
    assert stream.served <= 3 * 1024 * 1024 + 1024 * 1024


def test_copy_bounded_refuses_a_declared_size_over_the_limit_before_reading(tmp_path: Path) -> None:
    src = io.BytesIO(b"abc")
    with pytest.raises(VerifyError) as info:
        copy_bounded(src, tmp_path / "x", declared_size=MAX_MODEL + 1, max_bytes=MAX_MODEL)
    assert info.value.code == "file-too-large"
    assert src.tell() == 0
    assert not (tmp_path / "x").exists()


def test_copy_bounded_short_stream_is_truncated(tmp_path: Path) -> None:
    with pytest.raises(VerifyError) as info:
        copy_bounded(io.BytesIO(b"abc"), tmp_path / "x", declared_size=10, max_bytes=MAX_MODEL)
    assert info.value.code == "file-truncated"
    assert not (tmp_path / "x").exists()


def test_copy_bounded_returns_the_sha256(tmp_path: Path) -> None:
    digest = copy_bounded(io.BytesIO(b"abc"), tmp_path / "x", declared_size=3, max_bytes=MAX_MODEL)
    assert digest == hashlib.sha256(b"abc").hexdigest()
    verify_file(tmp_path / "x", FileEntry(3, digest), MAX_MODEL)


def test_each_attack_has_a_distinct_documented_code() -> None:
    codes = [
        "file-hash-mismatch",
        "file-unlisted",
        "file-missing",
        "manifest-edited",
        "untrusted-key",
        "version-rollback",
        "manifest-expired",
        "wrong-profile",
        "wrong-device",
        "manifest-too-large",
        "file-too-long",
        "rotation-threshold-not-met",
    ]
    assert len(set(codes)) == len(codes)
    assert all(ERROR_CODES[c] for c in codes)


def test_cryptography_signature_verifies_with_nacl(fleet: Fleet) -> None:
    from nacl.signing import VerifyKey

    data = b"interop"
    entry = sign(data, fleet.key)
    import base64

    VerifyKey(public_raw(fleet.key)).verify(data, base64.b64decode(entry["sig"]))
    assert entry["keyid"] == key_id(public_raw(fleet.key)) == fleet.keys.keyid


def test_verify_manifest_checks_signature_before_parsing(fleet: Fleet) -> None:
    garbage = b"{not json"
    with pytest.raises(VerifyError) as info:
        verify_manifest(
            garbage,
            {"signatures": [sign(b"other", fleet.key)]},
            fleet.trust,
            profile=PROFILE,
            device_id=None,
            ledger=None,
        )
    assert info.value.code == "manifest-edited"


def test_multi_signature_bundle_threshold(fleet: Fleet, tmp_path: Path) -> None:
    second = init_keys(tmp_path / "second")
    trust = TrustStore.from_public_keys([fleet.keys.public_path, second.public_path], 1, bundle_threshold=2)
    bundle = fleet.build()
    fleet.trust = trust
    refused(fleet, bundle, "threshold-not-met")
    sign_bundle(bundle, load_private_key(second.private_path), append=True)
    assert fleet.receive(bundle).version == 5
