"""The manifest fields a build fills (schema `edgefleet.manifest/1`, defined in `agent/core/manifest.py`).

The health floor is the build's one quality budget: `health.min_quality` = the reference (fp32) model's
value of `health.metric` on the bundle's eval set − `--max-accuracy-drop` (+ for a lower-is-better metric
such as token_error_rate: then it is a ceiling; docs/quality.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from edgefleet.agent.core.quality import ACCURACY, ALL_METRICS, Quality, floor_for, passes
from edgefleet.agent.core.quality_tasks import CLASSIFICATION
from edgefleet.sdk.build.errors import BudgetError

if TYPE_CHECKING:
    from edgefleet.converters.runners import ModelRunner
    from edgefleet.sdk.build.builder import Candidate

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
    reference_quality: Quality,
    max_accuracy_drop: float,
    max_p95_ms: Optional[float],
) -> dict[str, Any]:
    """Everything but `files`/times: target, model, I/O specs, eval kind, compression, metrics, health.

    `subset_quality` / `reference_quality`: the chosen model's and the fp32 model's reading on the
    bundle's eval set (the rows the device scores). Raises BudgetError when the chosen model already
    misses the floor there, since every device would then reject the bundle.
    """
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
        note = "int8 inside: the runtime quantizes float32 inputs and dequantizes outputs (scale/zero point)"
    # A task metric scores labels or reference outputs; the build's reading says which (measure.py).
    labels = getattr(subset_quality, "against", None) == "labels" or subset_quality.metric == ACCURACY
    metric = subset_quality.metric
    task = ALL_METRICS[metric].task
    floor = floor_for(metric, reference_quality.value, max_accuracy_drop)
    higher = ALL_METRICS[metric].higher_is_better
    if not passes(subset_quality, floor, metric):
        raise BudgetError(
            f"the chosen candidate {chosen.id} scores {metric} {subset_quality.value:.4f} on the bundle's "
            f"{subset_quality.samples} eval rows, {'below' if higher else 'above'} the device's {'floor' if higher else 'ceiling'} "
            f"{floor:.4f} (the fp32 model's {reference_quality.value:.4f} {'−' if higher else '+'} "
            f"--max-accuracy-drop {max_accuracy_drop}); raise "
            "--max-accuracy-drop or give more eval data",
            [chosen.to_dict()],
        )
    health: dict[str, Any] = {"metric": metric, "min_quality": round(floor, 6)}
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
            "metric": metric,
            # Named for the task metrics only, so classification manifests keep their old form.
            **({"task": task} if task != CLASSIFICATION else {}),
        },
        "compression": [{"candidate": chosen.id, "precision": spec.precision}, *chosen.steps],
        "metrics": {
            "size_bytes": chosen.size_bytes,
            "quality": chosen.quality.to_dict() if chosen.quality else None,
            "eval_quality": subset_quality.to_dict(),
            "reference_quality": reference_quality.to_dict(),
            "accuracy_drop": chosen.accuracy_drop,
            "host_latency_ms": {"p50": chosen.latency.p50_ms, "p95": chosen.latency.p95_ms}
            if chosen.latency
            else None,
            "estimated_target_latency_ms": chosen.estimate_ms,
        },
        "health": health,
    }
