"""Helpers for the agent core tests: a tiny ONNX classifier, signed bundles, a duck-typed profile."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

IN_FEATURES = 8
CLASSES = 4
PROFILE_NAME = "x86-64"


def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """A linear classifier built with onnx.helper: `x` [N, 8] float32 → `logits` [N, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((IN_FEATURES, CLASSES)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", IN_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of a model file through a bare onnxruntime session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def eval_npz(
    model_path: Path, path: Path, *, wrong: bool = False, reference: bool = False, n: int = 48
) -> Path:
    """eval.npz: labels = the model's own argmax (accuracy 1.0; `wrong` shifts them), or reference logits."""
    x = np.random.default_rng(7).standard_normal((n, IN_FEATURES)).astype(np.float32)
    logits = predict(model_path, x)
    if reference:
        np.savez(path, x=x, reference=logits)
    else:
        y = logits.argmax(axis=1)
        np.savez(path, x=x, y=((y + 1) % CLASSES if wrong else y).astype(np.int64))
    return path


def make_keys(directory: Path) -> Path:
    """A fleet key pair; returns the folder holding fleet.key and fleet.pub."""
    from edgefleet.sdk.trust.keys import init_keys

    init_keys(directory)
    return directory


def make_bundle(
    out: Path,
    key_dir: Path,
    model_path: Path,
    eval_path: Path,
    *,
    version: int,
    name: str = "tiny",
    min_accuracy: Optional[float] = 0.9,
    min_fidelity: Optional[float] = None,
    max_p95_ms: float = 1000.0,
    reference: bool = False,
    timeout_s: float = 30.0,
) -> Path:
    """A signed bundle written by the SDK's bundle writer."""
    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key

    health: dict[str, Any] = {"max_p95_ms": max_p95_ms, "warmup_runs": 2, "timeout_s": timeout_s}
    if min_accuracy is not None and not reference:
        health["min_accuracy"] = min_accuracy
    if min_fidelity is not None:
        health["min_fidelity"] = min_fidelity
    fields = {
        "name": name,
        "version": version,
        "target": {"profile": PROFILE_NAME, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, IN_FEATURES]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
        "eval": {"kind": "reference", "metric": "cosine"}
        if reference
        else {"kind": "labels", "metric": "accuracy"},
        "health": health,
    }
    return create_bundle(
        out,
        model_path=model_path,
        eval_npz_path=eval_path,
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )


def bundle_parts(bundle: Path) -> tuple[bytes, dict[str, Any], dict[str, Path]]:
    """(manifest bytes, signatures doc, staged files) as the daemon hands them to Installer.install."""
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    files = json.loads(manifest_bytes)["files"]
    return manifest_bytes, json.loads((bundle / "signature.json").read_text()), {f: bundle / f for f in files}


def profile(max_model_mb: float = 50.0) -> Any:
    """A stand-in for edgefleet.device_profiles.Profile with the attributes the agent reads."""
    return SimpleNamespace(
        name=PROFILE_NAME,
        cores=2,
        threads=1,
        max_model_mb=max_model_mb,
        runtime_names=lambda: ["onnxruntime", "tflite"],
        onnx_providers=lambda: ["CPUExecutionProvider"],
    )
