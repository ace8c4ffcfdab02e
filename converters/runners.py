"""Open an .onnx or .tflite file on this host in the device's own runtime (`edgefleet.agent.core.runtimes`).

The build measures, and the converters check parity with, exactly what an agent runs: the same engine
wrapper, the same dtypes (float32 for the integer tensors of a fully quantized TFLite model, which the
runtime quantizes and dequantizes), the same input names (TFLite's `serving_default_x:0` is `x`) and
the same fixed-batch chunking. This module adds only the host's defaults (CPU execution, every core)
and turns a load failure into a ConversionError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes import Runtime, load_runtime
from edgefleet.agent.core.runtimes.base import run_in_chunks
from edgefleet.converters.errors import ConversionError

# A loaded model on the host is the agent's Runtime; the name says how the host uses it.
ModelRunner = Runtime
RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".tflite": "tflite"}
# Host measurements run on the CPU: the number must not depend on a GPU this machine happens to have.
HOST_PROVIDERS = ("CPUExecutionProvider",)


def open_runner(
    path: Path,
    threads: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
    runtime: Optional[str] = None,
) -> Runtime:
    """The device runtime for an `.onnx` or `.tflite` file, loaded on this host's CPU.

    `runtime` ("onnxruntime" or "tflite") names it for a file whose suffix does not (a temporary file).
    """
    path = Path(path)
    runtime = runtime or RUNTIME_BY_SUFFIX.get(path.suffix.lower())
    if runtime is None:
        raise ConversionError(f"no runner for {path}: expected a .onnx or .tflite file")
    try:
        loaded = load_runtime(
            runtime, path, threads or os.cpu_count() or 1, list(providers or HOST_PROVIDERS)
        )
    except RuntimeLoadError as exc:
        raise ConversionError(f"cannot load {path}: {exc.reason}") from None
    return loaded


def named_feeds(runner: Runtime, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` keyed by the model's input names: by name when every name is there, else by position."""
    names = [spec.name for spec in runner.inputs]
    if all(name in inputs for name in names):
        return {name: inputs[name] for name in names}
    if len(inputs) != len(names):
        raise ConversionError(
            f"the model takes {len(names)} inputs {names}; got {len(inputs)} ({list(inputs)})"
        )
    return dict(zip(names, inputs.values()))


__all__ = [
    "HOST_PROVIDERS",
    "ModelRunner",
    "named_feeds",
    "open_runner",
    "run_in_chunks",
]
