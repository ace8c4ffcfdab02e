"""Run an ONNX or TFLite file on numpy inputs (parity checks, measurement), importing runtimes lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.converters.base import ConversionError, TensorSpec, short_reason


class ModelRunner:
    """A loaded model that maps a dict of named, batch-first inputs to its list of outputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on `feeds` (any batch size) and return every output."""
        raise ConversionError(f"{type(self).__name__} does not implement run()")

    def run_batch(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch exactly as given (no splitting); latency measurement times this."""
        return self.run(feeds)

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size baked into the model, or None when any batch size runs."""
        return None


def _dim(value: Any) -> Optional[int]:
    """An ONNX Runtime dimension: an int, or None for a symbolic/unknown one."""
    return int(value) if isinstance(value, int) and value > 0 else None


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxRunner(ModelRunner):
    """onnxruntime InferenceSession on the CPU (or the given providers) with a fixed thread count."""

    def __init__(
        self, path: Path, threads: Optional[int] = None, providers: Optional[list[str]] = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or [
            "CPUExecutionProvider"
        ]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ConversionError(f"onnxruntime cannot load {path}: {short_reason(exc)}") from exc
        self.inputs = [
            TensorSpec(i.name, tuple(_dim(d) for d in i.shape), _ORT_TYPES.get(i.type, i.type))
            for i in self.session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, tuple(_dim(d) for d in o.shape), _ORT_TYPES.get(o.type, o.type))
            for o in self.session.get_outputs()
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session once on all of `feeds`."""
        names = [spec.name for spec in self.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise ConversionError(f"inputs {missing} are missing; the model takes {names}")
        return [np.asarray(o) for o in self.session.run(None, {n: feeds[n] for n in names})]


class TfliteRunner(ModelRunner):
    """A TFLite interpreter (ai_edge_litert, else tflite_runtime); splits inputs into its fixed batch."""

    def __init__(self, path: Path, threads: Optional[int] = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
            except ImportError as exc:
                raise ConversionError(
                    "no TFLite runtime: pip install ai-edge-litert (or 'edgefleet[tflite]')"
                ) from exc
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads or 1)
            self.interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError for bad files
            raise ConversionError(f"the TFLite interpreter cannot load {path}: {short_reason(exc)}") from exc
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = [
            TensorSpec(_tflite_name(d["name"]), tuple(int(v) for v in d["shape"]), _visible_dtype(d))
            for d in self._in
        ]
        self.outputs = [
            TensorSpec(_tflite_name(d["name"]), tuple(int(v) for v in d["shape"]), _visible_dtype(d))
            for d in self._out
        ]

    @property
    def fixed_batch(self) -> Optional[int]:
        """TFLite models from litert-torch have a static first dimension."""
        shape = self.inputs[0].shape if self.inputs else ()
        return int(shape[0]) if shape and shape[0] else None

    def _ordered(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs in the interpreter's order: by name when names match, else by position."""
        names = [spec.name for spec in self.inputs]
        if all(n in feeds for n in names):
            return [feeds[n] for n in names]
        if len(feeds) != len(names):
            raise ConversionError(f"the TFLite model takes {len(names)} inputs ({names}); got {len(feeds)}")
        return list(feeds.values())

    def run_batch(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run exactly one batch of the model's fixed size."""
        return self._invoke(self._ordered(feeds))

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self._in, arrays):
            self.interpreter.set_tensor(detail["index"], _to_input(array, detail))
        self.interpreter.invoke()
        return [_from_output(np.array(self.interpreter.get_tensor(d["index"])), d) for d in self._out]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on any number of samples: split into the fixed batch, pad the last chunk, trim after."""
        arrays = self._ordered(feeds)
        batch = self.fixed_batch or len(arrays[0])
        total = len(arrays[0])
        chunks: list[list[np.ndarray]] = []
        for start in range(0, total, batch):
            part = [a[start : start + batch] for a in arrays]
            count = len(part[0])
            if count < batch:
                # Repeat the last row so the static shape fits; the padded rows are dropped after.
                part = [np.concatenate([p, np.repeat(p[-1:], batch - count, axis=0)]) for p in part]
            outs = self._invoke(part)
            chunks.append([o[:count] for o in outs])
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self._out))]


def _visible_dtype(detail: dict[str, Any]) -> str:
    """float32 for a quantized integer tensor (the runner converts), else the tensor's own dtype."""
    scale = detail.get("quantization", (0.0, 0))[0]
    dtype = np.dtype(detail["dtype"])
    return "float32" if scale and np.issubdtype(dtype, np.integer) else dtype.name


def _to_input(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Quantize float data for an integer input tensor (full-INT8 models) with the tensor's scale."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(array.dtype, np.floating):
        info = np.iinfo(dtype)
        q = np.round(array / scale) + zero
        return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))
    return np.ascontiguousarray(array, dtype=dtype)


def _from_output(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Dequantize an integer output tensor back to float32, so callers always compare real values."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(array.dtype, np.integer) and scale:
        return ((array.astype(np.float32) - zero) * scale).astype(np.float32)
    return array


def _tflite_name(name: str) -> str:
    """'serving_default_x:0' → 'x': litert-torch prefixes signature names and suffixes indices."""
    name = name.split(":", maxsplit=1)[0]
    for prefix in ("serving_default_",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def open_runner(
    path: Path, threads: Optional[int] = None, providers: Optional[list[str]] = None
) -> ModelRunner:
    """A runner for an `.onnx` or `.tflite` file, chosen by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return OnnxRunner(Path(path), threads=threads, providers=providers)
    if suffix == ".tflite":
        return TfliteRunner(Path(path), threads=threads)
    raise ConversionError(f"no runner for {path}: expected a .onnx or .tflite file")
