"""The typed, frozen `Profile` of a target device and the vocabularies its fields are drawn from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

# Fixed vocabularies: a profile file naming anything else is rejected with the allowed list.
ISA_FEATURES: Tuple[str, ...] = (
    "neon",  # Armv8 Advanced SIMD
    "dotprod",  # Armv8.2 SDOT/UDOT: int8 dot products
    "fp16",  # Armv8.2 half-precision arithmetic
    "i8mm",  # Armv8.6 int8 matrix multiply
    "sve",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512",
    "vnni",  # AVX512-VNNI or AVX-VNNI: int8 dot products on x86
    "amx",
)
RUNTIMES: Tuple[str, ...] = (
    "tflite-xnnpack",
    "tflite",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-tensorrt",
)
PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "int8")
# Keys of a profile's [efficiency] table: per op class, the share of the sustained GFLOP/s and GB/s that
# the runtime's kernels reach (0 < x ≤ 4), "gpu" for ops on the GPU, and the per-op dispatch cost.
EFFICIENCY_KEYS: Tuple[str, ...] = ("conv", "dwconv", "matmul", "elementwise", "gpu", "op_overhead_us")

# onnxruntime execution provider behind each ONNX runtime name.
_ORT_PROVIDERS: Dict[str, str] = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-cpu": "CPUExecutionProvider",
}


@dataclass(frozen=True)
class Gpu:
    """An accelerator next to the CPU: its name, precisions and sustained fp32 throughput."""

    name: str
    precisions: Tuple[str, ...]
    sustained_gflops: float
    fp16_speedup: float = 1.0
    int8_speedup: float = 1.0

    def throughput_gflops(self, precision: str) -> float:
        """Sustained GOP/s at a precision; one the GPU lacks runs at the fp32 rate."""
        return self.sustained_gflops * _speedup(
            precision, self.precisions, self.fp16_speedup, self.int8_speedup
        )


@dataclass(frozen=True)
class Profile:
    """What build and deploy decide on for one kind of target device.

    Throughput is CPU fp32 `sustained_gflops` (what real benchmarks sustain, not the peak) times
    `fp16_speedup` / `int8_speedup` for the precisions the device runs natively; a precision missing
    from `precisions` runs at the fp32 rate. `sources` maps a field name to "figure — source".
    """

    name: str
    description: str
    cpu_model: str
    cores: int
    clock_ghz: float
    isa: Tuple[str, ...]
    ram_mb: int
    gpu: Optional[Gpu]
    runtimes: Tuple[str, ...]
    precisions: Tuple[str, ...]
    sustained_gflops: float
    fp16_speedup: float
    int8_speedup: float
    mem_bandwidth_gbs: float
    max_model_mb: float
    p95_latency_ms: float
    python: str
    os: str
    batch_size: int = 1
    threads: int = 0
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    path: str = ""
    # [efficiency]: empty means "not calibrated" (the estimator then uses its defaults)
    efficiency: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.threads <= 0:
            # threads default to one per core: what inference runtimes use when left alone
            object.__setattr__(self, "threads", self.cores)
        if not isinstance(self.sources, MappingProxyType):
            object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        if not isinstance(self.efficiency, MappingProxyType):
            object.__setattr__(self, "efficiency", MappingProxyType(dict(self.efficiency)))

    def runtime_names(self) -> List[str]:
        """Runtime families in preference order: "tflite" and/or "onnxruntime" (the packages to import)."""
        out: List[str] = []
        for runtime in self.runtimes:
            family = "onnxruntime" if runtime.startswith("onnxruntime") else "tflite"
            if family not in out:
                out.append(family)
        return out

    def onnx_providers(self) -> List[str]:
        """onnxruntime execution providers in preference order, always ending with the CPU one."""
        out = [_ORT_PROVIDERS[r] for r in self.runtimes if r in _ORT_PROVIDERS]
        if "CPUExecutionProvider" not in out:
            out.append("CPUExecutionProvider")
        return out

    def cpu_throughput_gflops(self, precision: str = "fp32", threads: Optional[int] = None) -> float:
        """Sustained CPU GOP/s at a precision using `threads` cores (default: the profile's threads)."""
        used = min(self.cores, max(1, threads if threads is not None else self.threads))
        base = self.sustained_gflops * used / self.cores
        return base * _speedup(precision, self.precisions, self.fp16_speedup, self.int8_speedup)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready values."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Gpu):
                value = {
                    k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(value).items()
                }
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, MappingProxyType):
                value = dict(value)
            out[f.name] = value
        return out


def _speedup(precision: str, supported: Tuple[str, ...], fp16: float, int8: float) -> float:
    """Factor over fp32 for a precision the hardware runs natively, 1.0 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision not in supported:
        return 1.0
    if precision == "fp16":
        return fp16
    if precision == "int8":
        return int8
    return 1.0
