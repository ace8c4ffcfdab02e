"""The end of a federated task: the trained head back in the ONNX model, and a new signed bundle.

The new bundle keeps the source bundle's name, target, tensors, eval data and health policy, takes the
next version, and carries the federated run in the manifest (`federated`: rounds, privacy ε/δ) and in
report.json (every round's participants, dropouts, bytes and accuracy, and the privacy spent). It is
written by the SDK's bundle writer and checked with the host's own verifier, as `edgefleet build` does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgefleet.sdk.federated.task import FEATURE_OUTPUT, HeadSpec, Task, find_head, prepare_model

# Manifest keys the bundle writer fills again (files and their hashes, times) or that belong to the old build.
_REFILLED = ("files", "created", "expires", "schema")


def write_head(
    model_path: Path, spec: HeadSpec, weight: np.ndarray, bias: np.ndarray, out_path: Path
) -> Path:
    """Write a copy of the model with the head's weight and bias replaced (in the graph's own layout)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        if init.name == spec.weight_name:
            stored = weight.T if spec.trans_b else weight
            old = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(np.asarray(stored, dtype=old.dtype).reshape(old.shape), init.name)
            )
        elif init.name == spec.bias_name:
            old = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(np.asarray(bias, dtype=old.dtype).reshape(old.shape), init.name)
            )
    onnx.checker.check_model(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


def _fields_from(manifest: Mapping[str, Any], version: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in manifest.items() if k not in _REFILLED}
    fields["version"] = version
    fields.update(extra)
    return fields


def _with_feature_output(outputs: list[dict[str, Any]], features: int) -> list[dict[str, Any]]:
    if any(o.get("name") == FEATURE_OUTPUT for o in outputs):
        return outputs
    return [*outputs, {"name": FEATURE_OUTPUT, "dtype": "float32", "shape": [None, features]}]


def write_bundle(
    source_dir: Path,
    manifest: Mapping[str, Any],
    model_path: Path,
    out_dir: Path,
    *,
    private_key: Any,
    extra_fields: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
) -> Path:
    """A new signed bundle from `source_dir`'s manifest: the given model, the next version, the same eval data."""
    from edgefleet.sdk.trust.bundle import create_bundle

    eval_file = manifest.get("eval", {}).get("file", "eval.npz")
    fields = _fields_from(manifest, int(manifest["version"]) + 1, extra_fields or {})
    fields["model"] = {**fields.get("model", {}), "file": model_path.name}
    return create_bundle(
        out_dir,
        model_path=model_path,
        eval_npz_path=source_dir / eval_file,
        manifest_fields=fields,
        private_key=private_key,
        report=report,
    )


def prepare_bundle(
    source_dir: Path, out_dir: Path, *, private_key: Any, head: list[str] | None = None
) -> Path:
    """A federation-ready bundle: the same model, also outputting its features; same name, next version."""
    import json

    import onnx

    manifest = json.loads((source_dir / "manifest.json").read_bytes())
    model_file = manifest["model"]["file"]
    model = onnx.load(str(source_dir / model_file))
    spec = find_head(model, head)
    prepared = prepare_model(model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / model_file
        onnx.save(prepared, str(path))
        extra = {
            "outputs": _with_feature_output(list(manifest.get("outputs") or []), int(spec.weight.shape[0]))
        }
        return write_bundle(source_dir, manifest, path, out_dir, private_key=private_key, extra_fields=extra)


def result_bundle(
    task: Task,
    weight: np.ndarray,
    bias: np.ndarray,
    out_dir: Path,
    *,
    private_key: Any,
    report: Mapping[str, Any],
    federated: Mapping[str, Any],
) -> Path:
    """The trained head in the task's model, as a new signed bundle with report.json and the privacy spent."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_head(task.model_path, task.head, weight, bias, Path(tmp) / task.model_path.name)
        return write_bundle(
            task.bundle_dir,
            task.manifest,
            path,
            out_dir,
            private_key=private_key,
            extra_fields={"federated": dict(federated)},
            report=report,
        )


__all__ = ["prepare_bundle", "result_bundle", "write_bundle", "write_head"]
