"""TFLite plug-in: ai_edge_litert, else tflite_runtime; XNNPACK with the profile's thread count."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo, run_in_chunks

# The TFLite converter's prefix for a signature's tensors ('serving_default_x:0').
SIGNATURE_PREFIX = "serving_default_"

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


def tensor_names(raw: Sequence[str]) -> List[str]:
    """Tensor names as the model's author wrote them: 'serving_default_x:0' -> 'x'.

    The TFLite converter prefixes signature inputs with `serving_default_` and suffixes tensor indices;
    these short names are the ones the build writes into the manifest and eval.npz and the ones callers
    use. When shortening would make two names equal (or empty), the raw names are kept.
    """
    short = []
    for name in raw:
        name = name.split(":", 1)[0]
        if name.startswith(SIGNATURE_PREFIX):
            name = name[len(SIGNATURE_PREFIX) :]
        short.append(name)
    return short if all(short) and len(set(short)) == len(short) else list(raw)


class _Quant:
    """Scale and zero point of an integer tensor of a fully quantized model."""

    __slots__ = ("dtype", "scale", "zero")

    def __init__(self, dtype: Any, scale: float, zero: int) -> None:
        self.dtype = dtype
        self.scale = scale
        self.zero = zero


def _quant(detail: Mapping[str, Any]) -> Optional[_Quant]:
    """The tensor's quantization when it is an integer tensor with a scale (full-INT8 I/O), else None."""
    import numpy as np

    scale, zero = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"])
    if scale and np.issubdtype(dtype, np.integer):
        return _Quant(dtype, float(scale), int(zero))
    return None


@RUNTIMES.register("tflite")
class TfliteRuntime(Runtime):
    """A TFLite Interpreter. It is not thread-safe, so runs are serialised by a lock.

    Callers see float32 for the integer input/output tensors of a fully quantized model: the runtime
    quantizes float inputs with the tensor's scale and zero point and dequantizes outputs, so the same
    eval.npz and the same requests work for every precision of a model.
    """

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
        self._in_quant = [_quant(d) for d in self._in]
        self._out_quant = [_quant(d) for d in self._out]
        self._in_names = tensor_names([d["name"] for d in self._in])
        out_names = tensor_names([d["name"] for d in self._out])
        self._inputs = [
            TensorInfo(n, "float32" if q else d["dtype"].__name__, _shape(d))
            for n, d, q in zip(self._in_names, self._in, self._in_quant)
        ]
        self._outputs = [
            TensorInfo(n, "float32" if q else d["dtype"].__name__, _shape(d))
            for n, d, q in zip(out_names, self._out, self._out_quant)
        ]
        first = self._inputs[0].shape if self._inputs else ()
        self._fixed_batch: Optional[int] = int(first[0]) if first and first[0] else None

    @property
    def inputs(self) -> List[TensorInfo]:
        """The interpreter's inputs (short names; float32 for quantized integer tensors)."""
        return list(self._inputs)

    @property
    def outputs(self) -> List[TensorInfo]:
        """The interpreter's outputs (short names; float32 for quantized integer tensors)."""
        return list(self._outputs)

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the converter baked in (litert-torch models have one), or None."""
        return self._fixed_batch

    @property
    def providers(self) -> List[str]:
        """The package and the delegate the default resolver applies."""
        return [f"{self.package}:XNNPACK"]

    def _invoke(self, arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
        import numpy as np

        interp = self._interp
        for detail, quant, value in zip(self._in, self._in_quant, arrays):
            index = int(detail["index"])
            if quant is not None and value.dtype != quant.dtype:
                info = np.iinfo(quant.dtype)
                value = np.clip(np.round(value / quant.scale) + quant.zero, info.min, info.max)
                value = value.astype(quant.dtype)
            if tuple(value.shape) != self._shapes[index]:
                interp.resize_tensor_input(index, list(value.shape))
                interp.allocate_tensors()
                self._shapes[index] = tuple(value.shape)
            interp.set_tensor(index, np.ascontiguousarray(value, dtype=detail["dtype"]))
        interp.invoke()
        outputs = []
        for detail, quant in zip(self._out, self._out_quant):
            value = interp.get_tensor(detail["index"])
            if quant is not None:
                value = ((value.astype(np.float32) - quant.zero) * quant.scale).astype(np.float32)
            else:
                value = value.copy()
            outputs.append(value)
        return outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """Run on any number of rows; a model with a fixed batch runs in chunks of it, the last one padded."""

        if self._interp is None:
            raise RuntimeLoadError("runtime-closed", f"{self.model_path.name} was unloaded")
        named = {n: feeds[n] for n in self._in_names}
        batch = self._fixed_batch
        with self._lock:
            if batch is None:
                return self._invoke(list(named.values()))
            # litert-torch fixes the batch at conversion: other row counts run in chunks of it.
            return run_in_chunks(lambda part: self._invoke(list(part.values())), named, batch)

    def close(self) -> None:
        """Drop the interpreter."""
        with self._lock:
            self._interp = None

    def tensor_details(self) -> Dict[str, Any]:
        """Raw input/output details (engine names, integer dtypes, quantisation parameters), for diagnostics."""
        return {"inputs": self._in, "outputs": self._out}
