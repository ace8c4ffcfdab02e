"""TFLite plug-in: ai_edge_litert, else tflite_runtime; XNNPACK with the profile's thread count."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo

if TYPE_CHECKING:
    import numpy as np


def _interpreter_class() -> Tuple[Any, str]:
    """The Interpreter class of the first TFLite package present, and its name."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        raise RuntimeLoadError(
            "runtime-missing",
            "no TFLite runtime on this device: pip install ai-edge-litert (or tflite-runtime)",
        ) from None


def _shape(detail: Mapping[str, Any]) -> Tuple[Optional[int], ...]:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return tuple(int(d) if int(d) >= 0 else None for d in dims)


@RUNTIMES.register("tflite")
class TfliteRuntime(Runtime):
    """A TFLite Interpreter. It is not thread-safe, so runs are serialised by a lock."""

    name = "tflite"

    def __init__(self, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(model_path, threads, providers)
        interpreter_cls, self.package = _interpreter_class()
        # The default op resolver applies XNNPACK to float models; num_threads sizes its pool.
        self._interp: Any = interpreter_cls(model_path=str(self.model_path), num_threads=self.threads)
        self._interp.allocate_tensors()
        self._lock = threading.Lock()
        self._in = list(self._interp.get_input_details())
        self._out = list(self._interp.get_output_details())
        self._shapes = {int(d["index"]): tuple(int(x) for x in d["shape"]) for d in self._in}
        self._inputs = [TensorInfo(d["name"], d["dtype"].__name__, _shape(d)) for d in self._in]
        self._outputs = [TensorInfo(d["name"], d["dtype"].__name__, _shape(d)) for d in self._out]

    @property
    def inputs(self) -> List[TensorInfo]:
        """The interpreter's inputs."""
        return list(self._inputs)

    @property
    def outputs(self) -> List[TensorInfo]:
        """The interpreter's outputs."""
        return list(self._outputs)

    @property
    def providers(self) -> List[str]:
        """The package and the delegate the default resolver applies."""
        return [f"{self.package}:XNNPACK"]

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        interp = self._interp
        for detail in self._in:
            value = feeds[detail["name"]]
            index = int(detail["index"])
            if tuple(value.shape) != self._shapes[index]:
                interp.resize_tensor_input(index, list(value.shape))
                interp.allocate_tensors()
                self._shapes[index] = tuple(value.shape)
            interp.set_tensor(index, value)
        interp.invoke()
        return [interp.get_tensor(d["index"]).copy() for d in self._out]

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """Run once; a batch other than the converted one is split into rows when the model's batch is fixed at 1."""
        import numpy as np

        if self._interp is None:
            raise RuntimeLoadError("runtime-closed", f"{self.model_path.name} was unloaded")
        first = self._in[0]
        batch = int(feeds[first["name"]].shape[0]) if feeds[first["name"]].ndim else 1
        fixed = self._inputs[0].shape[:1] == (1,)
        with self._lock:
            if not fixed or batch == 1:
                return self._invoke(feeds)
            # litert-torch fixes the batch at conversion; row by row keeps batched callers working.
            rows: List[List[np.ndarray]] = []
            for i in range(batch):
                rows.append(self._invoke({k: v[i : i + 1] for k, v in feeds.items()}))
        return [np.concatenate([r[j] for r in rows]) for j in range(len(self._out))]

    def close(self) -> None:
        """Drop the interpreter."""
        with self._lock:
            self._interp = None

    def tensor_details(self) -> Dict[str, Any]:
        """Raw input/output details (quantisation parameters included), for diagnostics."""
        return {"inputs": self._in, "outputs": self._out}
