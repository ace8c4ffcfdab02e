"""The compression plug-in contract: what a step needs, what it takes and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

import numpy as np

from edgefleet.agent.core.registry import Registry
from edgefleet.sdk.errors import EdgefleetError

Stage = Literal["torch", "onnx", "tflite"]


class CompressionError(EdgefleetError):
    """A compression step could not run on this model or data; the message says why and what to do."""


@dataclass(frozen=True)
class Requirements:
    """What a step needs: the model stage it works on, the runtime and precision it yields, extras."""

    stage: Stage
    precision: str = "fp32"
    runtime: Optional[str] = None
    extras: tuple[str, ...] = ()  # importable module names, checked before the step runs

    def missing_extras(self) -> list[str]:
        """Names of the extra modules that cannot be imported here."""
        from edgefleet.converters.base import unimportable

        return unimportable(self.extras)


@dataclass
class CompressionContext:
    """Data and settings a step may use: calibration/eval data, labels, a work folder, progress."""

    workdir: Path
    calib: dict[str, np.ndarray] = field(default_factory=dict)
    calib_labels: Optional[np.ndarray] = None
    eval_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    eval_labels: Optional[np.ndarray] = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: Optional[Callable[[str, float], None]] = None

    def report(self, message: str, fraction: float) -> None:
        """Forward progress (0..1) to whoever shows it; silent when nobody listens."""
        if self.progress is not None:
            self.progress(message, fraction)


class CompressionStep:
    """Base of every compression plug-in: `apply` takes a model of `requires.stage` and returns one.

    For stage "torch" the model is an `nn.Module`; for "onnx"/"tflite" it is a `Path` to a file and
    the step writes its result into `ctx.workdir` and returns that path.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[Requirements] = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        self.params = params

    def describe(self) -> dict[str, Any]:
        """What this step did, for the manifest and report: its name and parameters."""
        return {"step": self.name, "params": dict(self.params)}

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """Compress `model` and return the result (same stage unless the step converts)."""
        raise CompressionError(f"compression step {self.name!r} does not implement apply()")


COMPRESSORS: Registry[type[CompressionStep]] = Registry("compression step")
