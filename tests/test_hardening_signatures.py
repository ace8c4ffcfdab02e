"""Issue 15 point 7: a forged signature that claims the fleet key's id is a bad signature, not an edited manifest."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import MANIFEST_FILE, SIGNATURE_FILE, canonical_bytes
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.core.verify import verify_bundle_dir, verify_manifest
from edgefleet.sdk.trust.bundle import create_bundle
from edgefleet.sdk.trust.keys import init_keys, load_private_key

PROFILE = "rpi4b"


def _bundle(tmp: Path) -> tuple[Path, TrustStore, str]:
    keys = init_keys(tmp / "keys")
    model = tmp / "model.onnx"
    model.write_bytes(b"\x00" * 2048)
    evals = tmp / "eval.npz"
    np.savez(evals, x=np.zeros((2, 4), np.float32), y=np.arange(2))
    bundle = create_bundle(
        tmp / "bundle",
        model_path=model,
        eval_npz_path=evals,
        manifest_fields={
            "name": "digits",
            "version": 3,
            "target": {"profile": PROFILE, "device_ids": []},
            "model": {"format": "onnx", "runtime": "onnxruntime"},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}],
            "eval": {"kind": "labels", "metric": "accuracy"},
            "health": {"min_accuracy": 0.9, "max_p95_ms": 50, "warmup_runs": 1, "timeout_s": 30},
        },
        private_key=load_private_key(keys.private_path),
    )
    state = tmp / "state"
    state.mkdir()
    return bundle, TrustStore.open(state, [keys.public_path]), keys.keyid


def _forge(bundle: Path, tmp: Path, keyid: str) -> None:
    """Sign the bundle's manifest with an attacker's key, but label the signature with the fleet key's id."""
    attacker = load_private_key(init_keys(tmp / "attacker").private_path)
    manifest = (bundle / MANIFEST_FILE).read_bytes()
    forged = {"keyid": keyid, "sig": base64.b64encode(attacker.sign(manifest)).decode("ascii")}
    (bundle / SIGNATURE_FILE).write_bytes(canonical_bytes({"signatures": [forged]}))


def test_forged_signature_with_the_fleet_key_id_is_a_bad_signature(tmp_path: Path) -> None:
    # prepare
    bundle, trust, keyid = _bundle(tmp_path)
    _forge(bundle, tmp_path, keyid)
    # act
    with pytest.raises(VerifyError) as info:
        verify_bundle_dir(
            bundle,
            trust,
            profile=PROFILE,
            device_id=None,
            ledger=VersionLedger(tmp_path / "state"),
            max_model_bytes=1 << 20,
        )
    # assert
    assert info.value.code == "bad-signature", info.value


def test_forged_signature_carrying_the_manifest_digest_is_still_a_bad_signature(tmp_path: Path) -> None:
    # prepare: the forger copies the honest entry's digest field, so only the signature is wrong
    bundle, trust, keyid = _bundle(tmp_path)
    honest = json.loads((bundle / SIGNATURE_FILE).read_bytes())["signatures"][0]
    _forge(bundle, tmp_path, keyid)
    doc = json.loads((bundle / SIGNATURE_FILE).read_bytes())
    if "sha256" in honest:
        doc["signatures"][0]["sha256"] = honest["sha256"]
    # act
    with pytest.raises(VerifyError) as info:
        verify_manifest(
            (bundle / MANIFEST_FILE).read_bytes(), doc, trust, profile=PROFILE, device_id=None, ledger=None
        )
    # assert
    assert info.value.code == "bad-signature"


def test_manifest_edited_after_signing_is_still_manifest_edited(tmp_path: Path) -> None:
    # prepare
    bundle, trust, _ = _bundle(tmp_path)
    obj = json.loads((bundle / MANIFEST_FILE).read_bytes())
    obj["health"]["min_accuracy"] = 0.0
    (bundle / MANIFEST_FILE).write_bytes(canonical_bytes(obj))
    # act
    with pytest.raises(VerifyError) as info:
        verify_bundle_dir(
            bundle, trust, profile=PROFILE, device_id=None, ledger=None, max_model_bytes=1 << 20
        )
    # assert
    assert info.value.code == "manifest-edited"
