"""Latency estimate of an ONNX or TFLite model on a device profile: per-op FLOPs and bytes, roofline.

Each op costs max(flops / throughput, bytes / bandwidth) plus a fixed dispatch overhead; the model's
estimate is the sum over ops (ops run one after another at batch 1, so per-op roofline is closer than
one whole-model roofline, which would let a memory-bound op hide behind a compute-bound one).
FLOPs count a multiply-add as 2. Bytes moved are the op's inputs read and outputs written; a weight
(an initializer or constant) is counted once, by the first op that reads it. Ops that only change
metadata (Reshape, Squeeze, Shape...) cost nothing.

Each op's roofline time is divided by the efficiency of its op class (conv, dwconv, matmul,
elementwise): the share of the profile's sustained figures that a runtime's batch-1 kernels reach for
that kind of op. The efficiencies come from the profile's [efficiency] table; the `host` profile
measures them with a short onnxruntime micro-benchmark (estimate_calibrate, cached); other profiles
without a table use DEFAULT_EFFICIENCY (one host calibration, docs/profiles.md), and
`edgefleet profiles calibrate` fits a table from the latencies devices report.

Throughput per op is the profile's sustained figure at the op's precision: int8 when the op is
quantized (ConvInteger, QLinear*, MatMulNBits, a DequantizeLinear-fed Conv/MatMul/Gemm in a QDQ graph,
int8 TFLite weights), fp16 when its inputs are fp16, fp32 otherwise; a precision the device lacks runs at
the fp32 rate. On a profile whose preferred ONNX runtime is CUDA/TensorRT the ONNX model is costed on
the GPU (ops at a precision the GPU lacks fall back to the CPU figures); TFLite runs on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from edgefleet.device_profiles import Profile, load_profile
from edgefleet.sdk.errors import EdgefleetError

# Per-op dispatch cost on the host (µs), measured by bench/estimate.py (0.44-1.05 µs over four runs on a
# shared, busy 2-core host; 0.65 is the first run's): a chain of 200 tiny Add ops in
# onnxruntime, latency / op count (2-core Xeon, onnxruntime 1.32, 2026-11-28). Scaled to a profile by
# its clock against HOST_CLOCK_GHZ: dispatch is serial, single-thread work.
OP_OVERHEAD_US = 0.65
HOST_CLOCK_GHZ = 2.0

# Op classes an efficiency applies to ("free" ops cost nothing) and the [efficiency] keys of a profile.
OP_CLASSES = ("conv", "dwconv", "matmul", "elementwise")
# Share of the profile's sustained GFLOP/s (conv, matmul) and GB/s (dwconv and elementwise ops are
# memory-bound) that onnxruntime's batch-1 kernels reach, for profiles without an [efficiency] table:
# the host's one-thread micro-benchmark (bench/estimate.py, 2026-12-03: conv 1.58, dwconv 0.73,
# matmul 1.74, elementwise 1.12 of the host profile's figures), conv and matmul halved because the
# host probe counts the two hyperthreads of one core as two cores. A guess for other CPUs until their
# fleet calibrates them (`edgefleet profiles calibrate`).
DEFAULT_EFFICIENCY: dict[str, float] = {"conv": 0.8, "dwconv": 0.7, "matmul": 0.85, "elementwise": 1.0}
# GPU ops: no calibration yet; a profile's efficiency.gpu replaces it.
DEFAULT_GPU_EFFICIENCY = 0.5

ProfileLike = Union[Profile, str, Path]


class EstimateError(EdgefleetError):
    """The model cannot be costed: unreadable file, unknown format, or an unbound dynamic dimension."""


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one op, and the precision it runs at."""

    name: str
    op_type: str
    flops: float
    bytes_moved: float
    precision: str
    heavy: bool = False  # a Conv/MatMul/Gemm-like op: the one a precision override applies to
    op_class: str = "elementwise"  # one of OP_CLASSES, or "free"


@dataclass(frozen=True)
class ModelCost:
    """Per-op costs of a whole model at a batch size."""

    format: str
    batch_size: int
    ops: tuple[OpCost, ...]
    unknown_op_types: tuple[str, ...] = ()

    @property
    def flops(self) -> float:
        """Total FLOPs."""
        return sum(op.flops for op in self.ops)

    @property
    def bytes_moved(self) -> float:
        """Total bytes read and written."""
        return sum(op.bytes_moved for op in self.ops)


@dataclass(frozen=True)
class LatencyEstimate:
    """A roofline latency estimate of one model on one profile."""

    profile: str
    device: str
    precision: str
    batch_size: int
    flops: float
    bytes_moved: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    estimate_ms: float
    bound: str
    ops: tuple[OpCost, ...] = field(default=(), repr=False)
    unknown_op_types: tuple[str, ...] = ()
    efficiency: Mapping[str, float] = field(default_factory=dict)
    class_ms: Mapping[str, float] = field(default_factory=dict)  # estimate per op class (+ "overhead")

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON-ready values (without the per-op list)."""
        return {
            "profile": self.profile,
            "device": self.device,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "flops": self.flops,
            "bytes_moved": self.bytes_moved,
            "compute_ms": self.compute_ms,
            "memory_ms": self.memory_ms,
            "overhead_ms": self.overhead_ms,
            "estimate_ms": self.estimate_ms,
            "bound": self.bound,
            "unknown_op_types": list(self.unknown_op_types),
            "efficiency": dict(self.efficiency),
            "class_ms": dict(self.class_ms),
        }


def count_flops(
    model_path: Union[str, Path], batch_size: int = 1, dims: Optional[Mapping[str, int]] = None
) -> ModelCost:
    """Per-op FLOPs and bytes of an .onnx or .tflite model; `dims` binds named dynamic dims (e.g. sequence)."""
    path = Path(model_path)
    if batch_size < 1:
        raise EstimateError(f"batch_size must be >= 1 (got {batch_size})")
    if not path.is_file():
        raise EstimateError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from edgefleet.sdk.build.estimate_onnx import onnx_costs

        return onnx_costs(path, batch_size, dict(dims or {}))
    if suffix == ".tflite":
        from edgefleet.sdk.build.estimate_tflite import tflite_costs

        return tflite_costs(path, batch_size)
    raise EstimateError(
        f"{path}: cannot estimate a {suffix or 'suffix-less'} file; pass an .onnx or .tflite model"
    )


def estimate_latency(
    model_path: Union[str, Path],
    profile: ProfileLike,
    batch_size: Optional[int] = None,
    precision: Optional[str] = None,
    dims: Optional[Mapping[str, int]] = None,
    op_overhead_us: Optional[float] = None,
    efficiency: Optional[Mapping[str, float]] = None,
) -> LatencyEstimate:
    """Estimated latency (ms) of one inference of `model_path` on `profile` (roofline per op).

    `batch_size` defaults to the profile's; `precision` (fp32/fp16/int8) overrides the precision read
    from the graph for the heavy ops (what a runtime like TensorRT would run them at); a mixed precision
    such as "int8-mixed" keeps each op's own precision, as does None. `efficiency` (op class → share of
    the sustained figures, plus optional "gpu" and "op_overhead_us") replaces the profile's.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    batch = int(batch_size or prof.batch_size or 1)
    if precision is not None and precision.endswith("-mixed"):
        precision = None
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise EstimateError(f"unknown precision {precision!r}; allowed: fp32, fp16, int8")
    cost = count_flops(model_path, batch, dims)
    return estimate_cost(cost, prof, precision, op_overhead_us, efficiency)


def estimate_cost(
    cost: ModelCost,
    prof: Profile,
    precision: Optional[str] = None,
    op_overhead_us: Optional[float] = None,
    efficiency: Optional[Mapping[str, float]] = None,
) -> LatencyEstimate:
    """The latency estimate of an already costed model (estimate_latency without reading the file)."""
    device = _device(prof, cost.format)
    eff = profile_efficiency(prof) if efficiency is None else {**DEFAULT_EFFICIENCY, **efficiency}
    if op_overhead_us is not None:
        overhead_us = op_overhead_us
    elif "op_overhead_us" in eff:
        overhead_us = float(eff["op_overhead_us"])
    else:
        overhead_us = OP_OVERHEAD_US * (HOST_CLOCK_GHZ / prof.clock_ghz)
    per_op_ms = overhead_us / 1000.0
    bandwidth = prof.mem_bandwidth_gbs * 1e9
    compute_ms = memory_ms = total_ms = compute_bound_ms = memory_bound_ms = 0.0
    class_ms: dict[str, float] = {}
    counted = 0
    for op in cost.ops:
        if op.flops == 0 and op.bytes_moved == 0:
            continue  # metadata-only ops are folded away by every runtime
        counted += 1
        op_precision = precision if precision is not None and op.heavy else op.precision
        on_gpu = device == "gpu" and prof.gpu is not None and op_precision in prof.gpu.precisions
        c_ms = op.flops / (_throughput_gflops(prof, device, op_precision) * 1e9) * 1000.0
        m_ms = op.bytes_moved / bandwidth * 1000.0
        compute_ms += c_ms
        memory_ms += m_ms
        factor = (
            float(eff.get("gpu", DEFAULT_GPU_EFFICIENCY))
            if on_gpu
            else float(eff.get(op.op_class, DEFAULT_EFFICIENCY.get(op.op_class, 1.0)))
        )
        op_ms = max(c_ms, m_ms) / max(factor, 1e-6)
        total_ms += op_ms
        key = "gpu" if on_gpu else op.op_class
        class_ms[key] = class_ms.get(key, 0.0) + op_ms
        if c_ms >= m_ms:
            compute_bound_ms += c_ms
        else:
            memory_bound_ms += m_ms
    overhead_ms = counted * per_op_ms
    class_ms["overhead"] = overhead_ms
    return LatencyEstimate(
        profile=prof.name,
        device=device,
        precision=precision or _dominant_precision(cost.ops),
        batch_size=cost.batch_size,
        flops=cost.flops,
        bytes_moved=cost.bytes_moved,
        compute_ms=compute_ms,
        memory_ms=memory_ms,
        overhead_ms=overhead_ms,
        estimate_ms=total_ms + overhead_ms,
        bound="compute" if compute_bound_ms >= memory_bound_ms else "memory",
        ops=cost.ops,
        unknown_op_types=cost.unknown_op_types,
        efficiency=dict(eff),
        class_ms=class_ms,
    )


def profile_efficiency(prof: Profile) -> dict[str, float]:
    """The efficiency table for a profile: its own, the host's measured one, or DEFAULT_EFFICIENCY."""
    own = dict(getattr(prof, "efficiency", {}) or {})
    if own:
        return {**DEFAULT_EFFICIENCY, **own}
    if prof.name == "host":
        from edgefleet.sdk.build.estimate_calibrate import host_efficiency

        return {**DEFAULT_EFFICIENCY, **host_efficiency(prof)}
    return dict(DEFAULT_EFFICIENCY)


def _device(prof: Profile, model_format: str) -> str:
    """ "gpu" when the profile runs this format on its GPU first, else "cpu"."""
    from edgefleet.sdk.build.profile import runs_onnx_on_gpu

    return "gpu" if model_format == "onnx" and runs_onnx_on_gpu(prof) else "cpu"


def _throughput_gflops(prof: Profile, device: str, precision: str) -> float:
    """Sustained GOP/s for an op at `precision`; GPU ops at a precision the GPU lacks fall back to the CPU."""
    if device == "gpu" and prof.gpu is not None:
        if precision in prof.gpu.precisions:
            return prof.gpu.throughput_gflops(precision)
        return prof.cpu_throughput_gflops(precision)
    return prof.cpu_throughput_gflops(precision)


def _dominant_precision(ops: Sequence[OpCost]) -> str:
    """The precision that carries most of the FLOPs."""
    by: dict[str, float] = {}
    for op in ops:
        by[op.precision] = by.get(op.precision, 0.0) + op.flops
    return max(by, key=lambda k: by[k]) if by else "fp32"


def prod(values: Sequence[int]) -> int:
    """Product of a shape's dims (1 for a scalar)."""
    return int(math.prod(int(v) for v in values))
