"""The converter plug-in contract: source → target format, what it needs, and the parity it proves."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

import numpy as np

from edgefleet.agent.core.registry import Registry
from edgefleet.agent.core.runtimes.base import TensorInfo
from edgefleet.converters.errors import ConversionError
from edgefleet.converters.parity import ParityReport, ParityTolerance

# One model input or output (name, numpy dtype name, shape with None for a dynamic dimension): the
# device runtime's own type, so host and device describe tensors the same way.
TensorSpec = TensorInfo


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
        return unimportable(cls.requires)

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


def unimportable(modules: Iterable[str]) -> list[str]:
    """The names in `modules` that cannot be imported here (not installed, or blocked), without importing them."""
    out = []
    for name in modules:
        if name in sys.modules:
            # A None entry is how Python (and tests) mark a module whose import must fail.
            if sys.modules[name] is None:
                out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
            found = False
        if not found:
            out.append(name)
    return out


def short_reason(exc: BaseException, limit: int = 400) -> str:
    """The first meaningful line of a library's exception, for an error message that stays readable."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text
    return first if len(first) <= limit else first[: limit - 1] + "…"
