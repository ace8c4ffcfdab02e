"""The converter plug-in contract: source → target format, what it needs, and the parity it proves."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from edgefleet.agent.core.registry import Registry
from edgefleet.converters.errors import ConversionError
from edgefleet.converters.parity import ParityReport, ParityTolerance


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (None for a dynamic dimension) and numpy dtype name."""

    name: str
    shape: tuple[Optional[int], ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (shape as a list)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ConversionResult:
    """The converted file, its parity with the source on the sample inputs, and its I/O specs."""

    path: Path
    parity: ParityReport
    format: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    fixed_batch: Optional[int] = None  # set when the target format bakes the batch size in
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": str(self.path),
            "format": self.format,
            "parity": self.parity.to_dict(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "fixed_batch": self.fixed_batch,
            "details": dict(self.details),
        }


class Converter:
    """Base of every converter: `convert(model, out_path, sample_inputs)` writes `out_path`.

    `sample_inputs` is an ordered mapping input name → array (batch first); for a torch source its
    order is the order of `forward`'s positional arguments. Every converter runs the source and the
    result on those inputs and raises ParityError when they disagree beyond `tolerance`.
    """

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    target: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules the converter needs
    default_tolerance: ClassVar[ParityTolerance] = ParityTolerance()

    def __init__(self, tolerance: Optional[ParityTolerance] = None, **options: Any) -> None:
        self.tolerance = tolerance or self.default_tolerance
        self.options = options

    @classmethod
    def missing(cls) -> list[str]:
        """Modules this converter needs that cannot be imported here."""
        return [name for name in cls.requires if importlib.util.find_spec(name) is None]

    def check_available(self) -> None:
        """Raise ConversionError naming the packages to install when something is missing."""
        missing = self.missing()
        if missing:
            raise ConversionError(
                f"converter {self.name!r} needs {', '.join(missing)}; install them (pip install "
                f"'edgefleet[host]') or pick another target format"
            )

    def describe(self) -> dict[str, Any]:
        """Name, formats and options, for reports."""
        return {
            "converter": self.name,
            "source": self.source,
            "target": self.target,
            "options": dict(self.options),
            "tolerance": asdict(self.tolerance),
        }

    def convert(self, model: Any, out_path: Path, sample_inputs: dict[str, np.ndarray]) -> ConversionResult:
        """Convert `model` into `out_path` and prove parity on `sample_inputs`."""
        raise ConversionError(f"converter {self.name!r} does not implement convert()")


CONVERTERS: Registry[type[Converter]] = Registry("converter")
"""Converters registered by name (e.g. "torch-onnx", "onnx-optimize", "torch-tflite")."""


def short_reason(exc: BaseException, limit: int = 400) -> str:
    """The first meaningful line of a library's exception, for an error message that stays readable."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text
    return first if len(first) <= limit else first[: limit - 1] + "…"
