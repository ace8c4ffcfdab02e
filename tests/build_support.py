"""Shared helpers of the build tests: a stand-in device profile with only the fields the build reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class FakeProfile:
    """Just the Profile fields the build reads, so these tests do not depend on the built-in TOMLs."""

    name: str = "test-device"
    threads: int = 1
    cores: int = 1
    batch_size: int = 1
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    runtimes: tuple[str, ...] = ("onnxruntime-cpu",)
    max_model_mb: Optional[float] = 50.0
    p95_latency_ms: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def runtime_names(self) -> list[str]:
        return list(self.runtimes)

    def onnx_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]
