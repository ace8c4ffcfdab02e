"""Key rotation on the device: a new root is trusted only when enough current (and new) keys signed it."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import read_json
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import canonical_bytes
from edgefleet.agent.core.trust import (
    ROOT_FILE,
    TrustStore,
    load_public_key_pem,
    load_rotation,
    make_root,
    public_key_pem,
)
from edgefleet.agent.core.verify import verify_bundle_dir
from edgefleet.sdk.trust.bundle import create_bundle
from edgefleet.sdk.trust.keys import KeyPair, KeysError, init_keys, load_private_key, make_rotation, sign

PROFILE = "rpi5"


def _pair(tmp: Path, name: str) -> tuple[KeyPair, Any]:
    pair = init_keys(tmp / name)
    return pair, load_private_key(pair.private_path)


def _bundle(tmp: Path, key: Any, version: int) -> Path:
    model = tmp / "m.tflite"
    model.write_bytes(os.urandom(512))
    np.savez(tmp / "eval.npz", x=np.ones((2, 4), np.float32), ref=np.ones((2, 3), np.float32))
    return create_bundle(
        tmp / f"bundle-{version}",
        model_path=model,
        eval_npz_path=tmp / "eval.npz",
        manifest_fields={
            "name": "embedder",
            "version": version,
            "target": {"profile": PROFILE},
            "model": {"format": "tflite", "runtime": "tflite", "batch_size": 1},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
            "eval": {"kind": "reference", "metric": "cosine"},
            "health": {"min_fidelity": 0.99},
        },
        private_key=key,
    )


def _verify(tmp: Path, trust: TrustStore, bundle: Path) -> int:
    return verify_bundle_dir(
        bundle,
        trust,
        profile=PROFILE,
        device_id="d1",
        ledger=VersionLedger(tmp / "state"),
        max_model_bytes=10**6,
    ).version


def test_valid_rotation_then_bundle_signed_with_the_new_key_is_accepted(tmp_path: Path) -> None:
    # prepare
    old, old_key = _pair(tmp_path, "old")
    new, new_key = _pair(tmp_path, "new")
    state = tmp_path / "state"
    trust = TrustStore.open(state, [old.public_path])
    before_new = _bundle(tmp_path, new_key, 1)
    with pytest.raises(VerifyError) as info:
        _verify(tmp_path, trust, before_new)
    assert info.value.code == "untrusted-key"
    # act: the host replaces the old key by the new one; both sign, as TUF requires
    statement = make_rotation(trust.root, [new.public_path], [old_key, new_key])
    doc_bytes, sigs = load_rotation(json.dumps(statement).encode())
    assert trust.apply_root(doc_bytes, sigs) == 2
    # assert
    assert _verify(tmp_path, trust, _bundle(tmp_path, new_key, 2)) == 2
    with pytest.raises(VerifyError) as info:
        _verify(tmp_path, trust, _bundle(tmp_path, old_key, 3))
    assert info.value.code == "untrusted-key"
    # the rotation survived a restart: the persisted root wins over the --trusted-key file
    reopened = TrustStore.open(state, [old.public_path])
    assert reopened.version == 2 and reopened.keyids == [new.keyid]
    assert {s["keyid"] for s in reopened.signatures} == {old.keyid, new.keyid}


def test_rotation_signed_below_threshold_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    # prepare: a root of three keys that needs two signatures to rotate
    pairs = [_pair(tmp_path, f"k{i}") for i in range(3)]
    state = tmp_path / "state"
    trust = TrustStore.open(state, [p.public_path for p, _ in pairs], threshold=2)
    attacker, attacker_key = _pair(tmp_path, "attacker")
    doc = make_root([load_public_key_pem(attacker.public_path)], version=2)
    doc_bytes = canonical_bytes(doc)
    stored_before = (state / ROOT_FILE).read_bytes()
    # act: one compromised fleet key plus the attacker's own key
    sigs = {"signatures": [sign(doc_bytes, pairs[0][1]), sign(doc_bytes, attacker_key)]}
    with pytest.raises(VerifyError) as info:
        trust.apply_root(doc_bytes, sigs)
    # assert
    assert info.value.code == "rotation-threshold-not-met"
    assert trust.version == 1 and trust.keyids == sorted(p.keyid for p, _ in pairs)
    assert (state / ROOT_FILE).read_bytes() == stored_before
    # the same signature repeated does not count twice
    with pytest.raises(VerifyError) as info:
        trust.apply_root(
            doc_bytes, {"signatures": [sign(doc_bytes, pairs[0][1])] * 2 + sigs["signatures"][1:]}
        )
    assert info.value.code == "rotation-threshold-not-met"
    # two distinct fleet keys (and the new key itself) are enough
    ok = {
        "signatures": [
            sign(doc_bytes, pairs[0][1]),
            sign(doc_bytes, pairs[1][1]),
            sign(doc_bytes, attacker_key),
        ]
    }
    assert trust.apply_root(doc_bytes, ok) == 2


def test_rotation_needs_the_new_roots_own_threshold(tmp_path: Path) -> None:
    old, old_key = _pair(tmp_path, "old")
    new, _ = _pair(tmp_path, "new")
    trust = TrustStore.from_public_keys([old.public_path])
    doc_bytes = canonical_bytes(make_root([load_public_key_pem(new.public_path)], version=2))
    with pytest.raises(VerifyError) as info:
        trust.apply_root(doc_bytes, {"signatures": [sign(doc_bytes, old_key)]})
    assert info.value.code == "rotation-threshold-not-met"
    assert trust.version == 1


def test_rotation_must_be_the_next_version(tmp_path: Path) -> None:
    old, old_key = _pair(tmp_path, "old")
    trust = TrustStore.from_public_keys([old.public_path])
    doc_bytes = canonical_bytes(make_root([load_public_key_pem(old.public_path)], version=3))
    with pytest.raises(VerifyError) as info:
        trust.apply_root(doc_bytes, {"signatures": [sign(doc_bytes, old_key)]})
    assert info.value.code == "root-version"


def test_expired_rotation_is_refused(tmp_path: Path) -> None:
    old, old_key = _pair(tmp_path, "old")
    trust = TrustStore.from_public_keys([old.public_path])
    past = datetime.now(timezone.utc) - timedelta(days=1)
    doc_bytes = canonical_bytes(make_root([load_public_key_pem(old.public_path)], version=2, expires=past))
    with pytest.raises(VerifyError) as info:
        trust.apply_root(doc_bytes, {"signatures": [sign(doc_bytes, old_key)]})
    assert info.value.code == "root-expired"


def test_host_make_rotation_refuses_what_devices_would_refuse(tmp_path: Path) -> None:
    old, _ = _pair(tmp_path, "old")
    new, new_key = _pair(tmp_path, "new")
    trust = TrustStore.from_public_keys([old.public_path])
    with pytest.raises(KeysError) as info:
        make_rotation(trust.root, [new.public_path], [new_key])
    assert info.value.code == "rotation-threshold-not-met"


def test_public_key_pem_round_trip_and_rejects_other_keys(tmp_path: Path) -> None:
    pair, _ = _pair(tmp_path, "k")
    raw = load_public_key_pem(pair.public_path)
    assert load_public_key_pem(public_key_pem(raw)) == raw
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(VerifyError) as info:
        load_public_key_pem(ec_pem)
    assert info.value.code == "key-invalid"


def test_init_keys_is_0600_refuses_overwrite_and_supports_a_passphrase(tmp_path: Path) -> None:
    pair = init_keys(tmp_path / "keys", passphrase="s3cret")
    assert pair.private_path.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" in pair.private_path.read_bytes()
    with pytest.raises(KeysError) as info:
        init_keys(tmp_path / "keys")
    assert info.value.code == "keys-exist"
    with pytest.raises(KeysError) as info:
        load_private_key(pair.private_path)
    assert info.value.code == "passphrase-required"
    with pytest.raises(KeysError) as info:
        load_private_key(pair.private_path, "wrong")
    assert info.value.code == "key-unreadable"
    assert load_private_key(pair.private_path, "s3cret") is not None
    root = read_json(tmp_path / "keys" / ROOT_FILE)
    assert root["root"]["version"] == 1 and list(root["root"]["keys"]) == [pair.keyid]
