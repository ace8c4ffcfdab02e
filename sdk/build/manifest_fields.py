"""The manifest fields a build fills (schema `edgefleet.manifest/1`, defined in `agent/manifest.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from edgefleet.converters.runners import ModelRunner
    from edgefleet.sdk.build.builder import Candidate
    from edgefleet.sdk.build.measure import Quality

# Margins between what the host measured and what the device must reach on the same eval.npz: the
# device runs the same file, but ARM kernels round differently from x86 ones.
ACCURACY_MARGIN = 0.02
FIDELITY_MARGIN = 0.005
MANIFEST_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


def _onnx_opset(path: Path) -> Optional[int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def _tensor(spec: Any, note: str = "") -> dict[str, Any]:
    dtype = spec.dtype if spec.dtype in MANIFEST_DTYPES else "float32"
    return {"name": spec.name, "dtype": dtype, "shape": list(spec.shape), "preprocessing": note}


def manifest_fields_for(
    chosen: Candidate,
    profile: Any,
    runner: ModelRunner,
    *,
    name: str,
    subset_quality: Quality,
    max_p95_ms: Optional[float],
) -> dict[str, Any]:
    """Everything but `files`/times: target, model, I/O specs, eval kind, compression, metrics, health."""
    spec = chosen.spec
    model: dict[str, Any] = {
        # A stable name on the device, whatever work-folder name the candidate had on the host.
        "file": f"model.{spec.format}",
        "format": spec.format,
        "runtime": spec.runtime,
        "batch_size": chosen.fixed_batch or (chosen.latency.batch_size if chosen.latency else 1),
    }
    if spec.format == "onnx" and chosen.path is not None:
        model["opset"] = _onnx_opset(chosen.path)
        providers = (
            profile.onnx_providers() if hasattr(profile, "onnx_providers") else ["CPUExecutionProvider"]
        )
        model["execution_providers"] = list(providers)
    note = ""
    if (
        spec.format == "tflite"
        and spec.precision == "int8"
        and spec.tflite_quant is not None
        and spec.tflite_quant.name == "tflite-int8"
    ):
        note = "int8 tensor: quantize with the tensor's scale/zero point (outputs: dequantize)"
    labels = subset_quality.metric == "accuracy"
    if labels:
        health = {"min_accuracy": max(0.0, subset_quality.value - ACCURACY_MARGIN)}
    else:
        health = {"min_fidelity": float(np.clip(subset_quality.value - FIDELITY_MARGIN, 0.0, 1.0))}
    if max_p95_ms:
        health["max_p95_ms"] = float(max_p95_ms)
    health["warmup_runs"] = 3
    return {
        "name": name,
        "target": {"profile": profile.name},
        "model": model,
        "inputs": [_tensor(s, note) for s in runner.inputs],
        "outputs": [_tensor(s, note) for s in runner.outputs],
        "eval": {
            "file": "eval.npz",
            "kind": "labels" if labels else "reference",
            "metric": "accuracy" if labels else "cosine",
        },
        "compression": [{"candidate": chosen.id, "precision": spec.precision}, *chosen.steps],
        "metrics": {
            "size_bytes": chosen.size_bytes,
            "quality": chosen.quality.to_dict() if chosen.quality else None,
            "accuracy_drop": chosen.accuracy_drop,
            "host_latency_ms": {"p50": chosen.latency.p50_ms, "p95": chosen.latency.p95_ms}
            if chosen.latency
            else None,
            "estimated_target_latency_ms": chosen.estimate_ms,
        },
        "health": health,
    }
