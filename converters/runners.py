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
from typing import Any, Callable, List, Optional

import numpy as np

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes import Runtime, load_runtime
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
    batch = onnx_fixed_batch(loaded)
    return FixedBatchRunner(loaded, batch) if batch is not None else loaded


def onnx_fixed_batch(runtime: Runtime) -> Optional[int]:
    """The batch an ONNX graph bakes into every input's first dimension (a static-batch export), or None."""
    if runtime.fixed_batch is not None or runtime.name != "onnxruntime" or not runtime.inputs:
        return None
    firsts = {spec.shape[0] if spec.shape else None for spec in runtime.inputs}
    if len(firsts) != 1:
        return None
    first = next(iter(firsts))
    return int(first) if isinstance(first, int) and first > 0 else None


class FixedBatchRunner(Runtime):
    """An ONNX model exported at a fixed batch, run on any number of rows in chunks of it (last one padded).

    A `.pt2` exported without a dynamic batch gives such a graph; the build feeds it calibration and
    evaluation rows at its batch, as the agent's health check does (the manifest records the batch).
    """

    def __init__(self, inner: Runtime, batch: int) -> None:
        self._inner = inner
        self._batch = int(batch)
        self.name = inner.name
        self.model_path = inner.model_path
        self.threads = inner.threads
        self.requested_providers = inner.requested_providers

    @property
    def inputs(self) -> List[Any]:
        """The wrapped model's inputs."""
        return self._inner.inputs

    @property
    def outputs(self) -> List[Any]:
        """The wrapped model's outputs."""
        return self._inner.outputs

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch baked into the graph."""
        return self._batch

    @property
    def providers(self) -> List[str]:
        """The wrapped session's providers."""
        return self._inner.providers

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """Run in chunks of the fixed batch, repeating the last row to fill the final chunk."""
        return run_in_chunks(self._inner.run, feeds, self._batch)

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], List[np.ndarray]]:
        """`run` (chunking needs the Python layer)."""
        return self.run

    def close(self) -> None:
        """Close the wrapped runtime."""
        self._inner.close()


def run_in_chunks(
    run: Callable[[Mapping[str, np.ndarray]], List[np.ndarray]], feeds: Mapping[str, np.ndarray], batch: int
) -> List[np.ndarray]:
    """`run` over any number of rows for a model that takes exactly `batch` rows; padded rows are dropped."""
    total = len(next(iter(feeds.values())))
    if total == batch:
        return list(run(feeds))
    chunks: List[List[np.ndarray]] = []
    for start in range(0, total, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        count = len(next(iter(part.values())))
        if count < batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch - count, axis=0)]) for k, v in part.items()}
        chunks.append([o[:count] for o in run(part)])
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


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
    "FixedBatchRunner",
    "ModelRunner",
    "named_feeds",
    "onnx_fixed_batch",
    "open_runner",
    "run_in_chunks",
]
