"""Manifest parsing, the version ledger, and bundle creation that never leaves a half-written bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import Manifest, canonical_bytes
from edgefleet.sdk.trust.bundle import BundleError, create_bundle
from edgefleet.sdk.trust.keys import init_keys, load_private_key

SHA = "ab" * 32


def good() -> dict[str, Any]:
    return {
        "schema": "edgefleet.manifest/1",
        "name": "digits",
        "version": 3,
        "created": "2026-01-01T00:00:00Z",
        "expires": "2026-02-01T00:00:00+00:00",
        "target": {"profile": "rpi4b", "device_ids": ["a"]},
        "model": {"file": "model.onnx", "format": "onnx", "runtime": "onnxruntime", "opset": 17},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 64]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 10]}],
        "files": {"model.onnx": {"size": 10, "sha256": SHA}, "eval.npz": {"size": 5, "sha256": SHA}},
        "eval": {"file": "eval.npz", "kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 5},
        "future_field": {"kept": True},
    }


def test_parse_round_trip_keeps_unknown_fields() -> None:
    m = Manifest.from_bytes(canonical_bytes(good()))
    assert m.target.device_ids == ("a",)
    assert m.inputs[0].shape == (None, 64)
    assert m.health.warmup_runs == 3
    assert m.extra == {"future_field": {"kept": True}}
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.expires_at > m.created_at


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("version",), "3", "version"),
        (("version",), True, "version"),
        (("version",), 0, "version"),
        (("name",), "../etc", "name"),
        (("expires",), "2025-01-01T00:00:00Z", "expires"),
        (("created",), "yesterday", "created"),
        (("created",), "2026-01-01T00:00:00", "created"),
        (("model", "format"), "pickle", "model.format"),
        (("model", "file"), "other.onnx", "model.file"),
        (("inputs", 0, "dtype"), "complex64", "inputs[0].dtype"),
        (("files", "model.onnx", "sha256"), "XYZ", "files.model.onnx.sha256"),
        (("files", "model.onnx", "size"), -1, "files.model.onnx.size"),
        (("eval", "metric"), "cosine", "eval.metric"),
        (("health", "min_accuracy"), 1.5, "health.min_accuracy"),
        (("health", "timeout_s"), float("nan"), "health.timeout_s"),
    ],
)
def test_invalid_field_is_named(path: tuple[Any, ...], value: Any, field: str) -> None:
    obj = good()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(VerifyError) as info:
        Manifest.from_dict(obj)
    assert info.value.code == "manifest-invalid"
    assert f"`{field}`" in info.value.reason


@pytest.mark.parametrize("relpath", ["../x", "/abs", "a/../b", "a\\b", "manifest.json", ".hidden/../x", ""])
def test_unsafe_or_reserved_file_names_are_refused(relpath: str) -> None:
    obj = good()
    obj["files"][relpath] = {"size": 1, "sha256": SHA}
    with pytest.raises(VerifyError) as info:
        Manifest.from_dict(obj)
    assert info.value.code == "manifest-invalid"


def test_unknown_schema_is_its_own_code() -> None:
    obj = good()
    obj["schema"] = "edgefleet.manifest/2"
    with pytest.raises(VerifyError) as info:
        Manifest.from_dict(obj)
    assert info.value.code == "schema-unsupported"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=2000))
def test_mangled_manifest_bytes_raise_only_verify_errors(junk: bytes, at: int) -> None:
    data = canonical_bytes(good())
    at = at % len(data)
    mangled = data[:at] + junk + data[at + len(junk) :]
    try:
        Manifest.from_bytes(mangled)
    except VerifyError as exc:
        assert exc.code in {"manifest-invalid", "schema-unsupported"}


def test_ledger_only_moves_forward_and_survives_reopen(tmp_path: Path) -> None:
    ledger = VersionLedger(tmp_path)
    assert ledger.last("m") is None
    assert ledger.record("m", 5) == 5
    assert ledger.record("m", 3) == 5
    assert VersionLedger(tmp_path).last("m") == 5
    assert VersionLedger(tmp_path).all() == {"m": 5}


def test_corrupt_ledger_is_refused_not_reset(tmp_path: Path) -> None:
    (tmp_path / "versions.json").write_text(json.dumps({"m": "five"}))
    with pytest.raises(VerifyError) as info:
        VersionLedger(tmp_path).last("m")
    assert info.value.code == "ledger-corrupt"


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Any]:
    keys = init_keys(tmp_path / "keys")
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(100))
    np.savez(tmp_path / "eval.npz", x=np.zeros(3))
    fields = good()
    for key in ("schema", "files", "version", "created", "expires", "future_field"):
        fields.pop(key)
    fields["model"].pop("file")
    fields["eval"].pop("file")
    return {
        "model_path": model,
        "eval_npz_path": tmp_path / "eval.npz",
        "manifest_fields": fields,
        "private_key": load_private_key(keys.private_path),
    }


def test_create_bundle_fills_defaults(tmp_path: Path, inputs: dict[str, Any]) -> None:
    out = create_bundle(tmp_path / "b", **inputs)
    m = Manifest.from_bytes((out / "manifest.json").read_bytes())
    assert len(str(m.version)) == 14  # YYYYMMDDHHMMSS
    assert 29 <= (m.expires_at - m.created_at).days <= 30
    assert sorted(m.files) == ["eval.npz", "model.onnx"]
    assert (out / "manifest.json").read_bytes() == canonical_bytes(
        json.loads((out / "manifest.json").read_bytes())
    )


def test_failed_create_leaves_no_folder_and_keeps_the_old_bundle(
    tmp_path: Path, inputs: dict[str, Any]
) -> None:
    out = create_bundle(tmp_path / "b", **inputs)
    before = (out / "manifest.json").read_bytes()
    bad = dict(inputs, manifest_fields=dict(inputs["manifest_fields"], health={"min_accuracy": 7}))
    with pytest.raises(BundleError) as info:
        create_bundle(tmp_path / "b", **bad)
    assert info.value.code == "manifest-invalid"
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "eval.npz", "keys", "model.onnx"]


def test_create_replaces_a_bundle_but_not_other_folders(tmp_path: Path, inputs: dict[str, Any]) -> None:
    create_bundle(tmp_path / "b", **inputs)
    second = create_bundle(
        tmp_path / "b", **dict(inputs, manifest_fields=dict(inputs["manifest_fields"], version=99))
    )
    assert Manifest.from_bytes((second / "manifest.json").read_bytes()).version == 99
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError) as info:
        create_bundle(tmp_path / "docs", **inputs)
    assert info.value.code == "output-not-bundle"
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"
