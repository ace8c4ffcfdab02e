"""Sensitivity-driven mixed precision: INT8 everywhere except the nodes that break the fidelity budget.

Public API:
    mixed_precision_int8(fp32_path, out_path, calib, eval, *, min_mean_cosine=0.995, min_cosine=0.98,
                         max_size_ratio=None, max_excluded=16, smoothing=True,
                         mask_input="attention_mask", threads=2, progress=None) -> MixedPrecisionResult
    MixedPrecisionStep(min_mean_cosine=0.995, min_cosine=0.98, max_size_ratio=None, batch_size=1,
                       max_samples=64, smoothing=True)
        .apply(model: Path (fp32 .onnx), ctx) -> Path   (registered as "mixed-int8", stage "onnx")

How: first each activation group is smoothed (SmoothQuant-style, see smoothing.py) where simulation
says it lowers INT8 distortion; then per-node sensitivity (each MatMul/Gemm/Conv/Gather quantized alone, simulated in fp32 — see
onnx_fakequant) ranks the nodes; starting from "everything INT8" the most sensitive nodes are kept
fp32 one by one (skipping any whose fp32 weight would break `max_size_ratio`) until the simulated
fidelity on the eval batches meets the budget. The chosen plan is then quantized for real with
onnxruntime's dynamic per-channel INT8 (`nodes_to_exclude`) and measured again; `budget_met` reports
those real numbers, and when no plan within the size limit meets the budget the closest one is
returned with `budget_met=False` (the build marks it over budget).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.onnx_fakequant import FakeQuantGraph, batch_cosines, make_session, run_session
from edgefleet.sdk.compress.sensitivity import LayerSensitivity, Progress, SensitivityTable
from edgefleet.sdk.compress.smoothing import choose_smoothing

Batches = Sequence[dict[str, np.ndarray]]


@dataclass
class MixedPrecisionResult:
    """The quantized model, the nodes kept fp32, its size and fidelity, and each plan tried."""

    path: Path
    excluded: list[str]
    smoothed: list[str]
    size_bytes: int
    fp32_size_bytes: int
    mean_cosine: float
    min_cosine: float
    budget_met: bool
    sensitivity: SensitivityTable
    trace: list[dict[str, Any]] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        """Quantized size / fp32 size."""
        return self.size_bytes / self.fp32_size_bytes

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for report.json."""
        return {
            "excluded": list(self.excluded),
            "smoothed_activations": list(self.smoothed),
            "size_bytes": self.size_bytes,
            "size_ratio": self.size_ratio,
            "mean_cosine": self.mean_cosine,
            "min_cosine": self.min_cosine,
            "budget_met": self.budget_met,
            "plans_tried": self.trace,
        }


def _meets(cos: np.ndarray, min_mean: float, min_each: float) -> bool:
    return bool(cos.mean() >= min_mean and cos.min() >= min_each)


def quantize_dynamic_per_channel(
    fp32_path: Union[str, Path], out_path: Union[str, Path], exclude: Sequence[str] = ()
) -> Path:
    """onnxruntime dynamic INT8 (per-channel weights) with `exclude` nodes kept fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out_path)
    tmp = out.with_name(out.name + ".partial")
    try:
        quantize_dynamic(
            str(fp32_path),
            str(tmp),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
        )
        os.replace(tmp, out)
    except Exception as exc:
        raise CompressionError(f"onnxruntime could not quantize {fp32_path}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def mixed_precision_int8(
    fp32_path: Union[str, Path],
    out_path: Union[str, Path],
    calib: Batches,
    eval: Batches,
    *,
    min_mean_cosine: float = 0.995,
    min_cosine: float = 0.98,
    max_size_ratio: Optional[float] = None,
    max_excluded: int = 16,
    smoothing: bool = True,
    mask_input: Optional[str] = "attention_mask",
    threads: int = 2,
    progress: Progress = None,
) -> MixedPrecisionResult:
    """Plan and produce the mixed INT8/fp32 model (see module doc)."""
    import onnx

    if not calib or not eval:
        raise CompressionError("mixed precision needs calibration and evaluation batches")
    fp32_path = Path(fp32_path)
    original = FakeQuantGraph.load(fp32_path, threads=threads)
    if not original.quantizable_nodes():
        raise CompressionError(f"{fp32_path} has no weight nodes to quantize")
    calib_list, eval_list = list(calib), list(eval)

    def note(message: str, fraction: float) -> None:
        if progress is not None:
            progress(message, fraction)

    calib_ref = original.run_batches(set(), calib_list)
    eval_ref = original.run_batches(set(), eval_list)
    graph, smoothed = original, []
    if smoothing:
        plan = choose_smoothing(
            original.model,
            calib_list,
            mask_input=mask_input,
            threads=threads,
            progress=lambda message, f: note(message, 0.3 * f),
        )
        if plan.smoothed:
            graph, smoothed = FakeQuantGraph(plan.model, threads=threads), plan.smoothed
    nodes = graph.quantizable_nodes()

    # one node at a time on the calibration data: the ranking
    layers = []
    for index, (name, info) in enumerate(nodes.items()):
        cos = batch_cosines(calib_ref, graph.run_batches({name}, calib_list), calib_list, mask_input)
        loss = float(1.0 - cos.mean())
        layers.append(LayerSensitivity(name, info.op_type, info.params, loss, -loss))  # S = 0 − L_i
        note(f"sensitivity {index + 1}/{len(nodes)}", 0.3 + 0.3 * (index + 1) / len(nodes))
    table = SensitivityTable(
        "int8-dynamic-per-channel", 0.0, layers, loss="1 − mean cosine", normalized=False
    )

    fp32_size = fp32_path.stat().st_size
    # int8 stores one byte per weight instead of four; keeping a node fp32 costs 3 bytes a weight
    int8_estimate = fp32_size - 3 * sum(info.params for info in nodes.values())
    limit = max_size_ratio * fp32_size if max_size_ratio is not None else float("inf")
    if int8_estimate > limit:
        raise CompressionError(
            f"even all-INT8 (~{int8_estimate / 1e6:.1f} MB) exceeds the size limit "
            f"{limit / 1e6:.1f} MB: raise max_size_ratio or prune the model first"
        )

    excluded: list[str] = []
    estimate = int8_estimate
    trace: list[dict[str, Any]] = []
    met = False
    for step in range(max_excluded + 1):
        quantized = set(nodes) - set(excluded)
        cos = batch_cosines(eval_ref, graph.run_batches(quantized, eval_list), eval_list, mask_input)
        met = _meets(cos, min_mean_cosine, min_cosine)
        trace.append(
            {
                "kept_fp32": list(excluded),
                "estimated_size_bytes": int(estimate),
                "simulated_mean_cosine": float(cos.mean()),
                "simulated_min_cosine": float(cos.min()),
                "margin": float(min(cos.mean() - min_mean_cosine, cos.min() - min_cosine)),
            }
        )
        note(f"plan with {len(excluded)} nodes fp32", 0.6 + 0.3 * (step + 1) / (max_excluded + 1))
        if met:
            break
        nxt = next(
            (
                name
                for name in table.ranking()
                if name not in excluded and estimate + 3 * nodes[name].params <= limit
            ),
            None,
        )
        if nxt is None:
            break
        excluded.append(nxt)
        estimate += 3 * nodes[nxt].params
    if not met:
        # no plan met the budget: keep the one that came closest
        excluded = list(max(trace, key=lambda entry: entry["margin"])["kept_fp32"])

    source = fp32_path
    if smoothed:
        # quantize_dynamic reads a file: write the smoothed fp32 graph beside the output, briefly
        source = Path(out_path).with_name(Path(out_path).stem + ".smoothed-fp32.onnx")
        onnx.save(graph.model, str(source))
    try:
        out = quantize_dynamic_per_channel(source, out_path, excluded)
    finally:
        if source != fp32_path:
            source.unlink(missing_ok=True)
    session = make_session(out, threads)
    real = batch_cosines(
        eval_ref, [run_session(session, feeds)[0] for feeds in eval_list], eval_list, mask_input
    )
    note("mixed precision done", 1.0)
    size = out.stat().st_size
    return MixedPrecisionResult(
        path=out,
        excluded=excluded,
        smoothed=smoothed,
        size_bytes=size,
        fp32_size_bytes=fp32_size,
        mean_cosine=float(real.mean()),
        min_cosine=float(real.min()),
        budget_met=_meets(real, min_mean_cosine, min_cosine) and size <= limit,
        sensitivity=table,
        trace=trace,
    )


def split_batches(
    arrays: dict[str, np.ndarray], batch_size: int = 1, max_samples: int = 64
) -> list[dict[str, np.ndarray]]:
    """Cut named input arrays [N, ...] into batches of `batch_size`, using at most `max_samples`."""
    if not arrays:
        return []
    n = min(len(next(iter(arrays.values()))), max_samples)
    return [
        {name: a[start : start + batch_size] for name, a in arrays.items()}
        for start in range(0, n, batch_size)
    ]


@COMPRESSORS.register("mixed-int8")
class MixedPrecisionStep(CompressionStep):
    """Dynamic INT8 with the most sensitive nodes kept fp32 until the cosine budget holds."""

    name = "mixed-int8"
    requires = Requirements(stage="onnx", precision="int8-mixed", runtime="onnxruntime")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[MixedPrecisionResult] = None

    def describe(self) -> dict[str, Any]:
        """Parameters, the nodes kept fp32 and the fidelity reached."""
        out: dict[str, Any] = {"step": self.name, "params": dict(self.params)}
        if self.result is not None:
            out["result"] = self.result.summary()
        return out

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """Write `<stem>.mixed-int8.onnx` into ctx.workdir and return its path."""
        if not ctx.calib:
            raise CompressionError("mixed precision needs calibration inputs (ctx.calib)")
        batch = int(self.params.get("batch_size", 1))
        limit = int(self.params.get("max_samples", 64))
        calib = split_batches(ctx.calib, batch, limit)
        eval_batches = split_batches(ctx.eval_inputs or ctx.calib, batch, limit)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        out = ctx.workdir / f"{Path(model).stem}.mixed-int8.onnx"
        self.result = mixed_precision_int8(
            model,
            out,
            calib,
            eval_batches,
            min_mean_cosine=float(self.params.get("min_mean_cosine", 0.995)),
            min_cosine=float(self.params.get("min_cosine", 0.98)),
            max_size_ratio=self.params.get("max_size_ratio"),
            smoothing=bool(self.params.get("smoothing", True)),
            progress=ctx.report,
        )
        return self.result.path
