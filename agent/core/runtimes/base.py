"""The `Runtime` plug-in contract and the `RUNTIMES` registry (onnxruntime, tflite).

Plug-in modules import their engine only when a model is loaded, so an agent with no model never pays
for onnxruntime or TFLite in memory.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.registry import Registry, UnknownPluginError

if TYPE_CHECKING:
    import numpy as np

# Plug-in modules that register themselves; imported on first lookup (cheap: no engine import).
_PLUGIN_MODULES = ("onnx", "tflite")


def run_in_chunks(
    run: Callable[[Mapping[str, np.ndarray]], List[np.ndarray]], feeds: Mapping[str, np.ndarray], batch: int
) -> List[np.ndarray]:
    """`run` over any number of rows for a model that takes exactly `batch` rows at a time.

    A static-batch export (torch.export at batch 1, litert-torch's fixed batch) runs in chunks of its
    batch; the last chunk is filled by repeating its last row, and the padded rows' outputs are dropped.
    """
    import numpy as np

    total = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    if total == batch:
        return list(run(feeds))
    chunks: List[List[np.ndarray]] = []
    for start in range(0, total, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        count = int(next(iter(part.values())).shape[0])
        if count < batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch - count, axis=0)]) for k, v in part.items()}
        chunks.append([o[:count] for o in run(part)])
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))] if chunks else []


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the runtime sees it: name, numpy dtype name, shape (None = dynamic)."""

    name: str
    dtype: str
    shape: Tuple[Optional[int], ...]

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Runtime(ABC):
    """A loaded model in one inference engine; `run` may be called from several threads at once."""

    #: registry name, also the manifest's `model.runtime`
    name: str = ""

    def __init__(self, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None) -> None:
        self.model_path = Path(model_path)
        self.threads = max(1, int(threads))
        self.requested_providers = list(providers or [])

    @property
    @abstractmethod
    def inputs(self) -> List[TensorInfo]:
        """The model's inputs in order."""

    @property
    @abstractmethod
    def outputs(self) -> List[TensorInfo]:
        """The model's outputs in order."""

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size baked into the model (`run` splits other sizes into chunks of it), or None."""
        return None

    @property
    @abstractmethod
    def providers(self) -> List[str]:
        """What actually executes the model (execution providers or delegates), best first."""

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """Run the model on inputs named as in `inputs`, of their dtypes; outputs in `outputs` order."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory; `run` must not be called afterwards."""

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], List[np.ndarray]]:
        """The cheapest callable doing what `run` does, for feeds the caller has already checked.

        The model server calls it on every request after validating names, dtypes and shapes itself,
        so an engine whose `run` re-checks its inputs (onnxruntime's Python layer) can skip that here.
        The default is `run` itself.
        """
        return self.run

    def describe(self) -> Dict[str, Any]:
        """Runtime name, providers, threads and tensor specs, for status and telemetry."""
        return {
            "runtime": self.name,
            "providers": self.providers,
            "threads": self.threads,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


RUNTIMES: Registry[Type[Runtime]] = Registry("runtime")


def _import_plugins() -> None:
    for module in _PLUGIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def runtime_class(name: str) -> Type[Runtime]:
    """The plug-in class registered as `name`; raises RuntimeLoadError('runtime-unknown') listing the known ones."""
    if name not in RUNTIMES:
        _import_plugins()
    try:
        return RUNTIMES.get(name)
    except UnknownPluginError as exc:
        raise RuntimeLoadError("runtime-unknown", f"{exc}; build the bundle for one of these") from None


def load_runtime(
    name: str, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None
) -> Runtime:
    """Load `model_path` into the runtime called `name`; every failure becomes a RuntimeLoadError."""
    cls = runtime_class(name)
    try:
        return cls(Path(model_path), threads, providers)
    except RuntimeLoadError:
        raise
    except Exception as exc:  # engines raise their own types; the caller needs one with a reason
        raise RuntimeLoadError(
            "model-load-failed", f"{name} could not load {Path(model_path).name}: {type(exc).__name__}: {exc}"
        ) from None
