"""Simulate onnxruntime's dynamic INT8 quantization of chosen nodes inside an fp32 ONNX graph.

Quantizing a 90 MB transformer once per node to measure per-node sensitivity would take minutes;
instead each chosen node gets exactly the arithmetic onnxruntime's `quantize_dynamic` gives it:
its activation goes through DynamicQuantizeLinear → DequantizeLinear (uint8, per-tensor, asymmetric,
as MatMulInteger receives it) and its weight is rounded to int8 (symmetric; per output channel for
MatMul/Gemm/Conv, per tensor for Gather) and stored dequantized. The graph stays fp32, so one
session build per node set is all it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from edgefleet.sdk.compress.base import CompressionError

if TYPE_CHECKING:
    import onnx

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv", "Gather")


@dataclass(frozen=True)
class QuantNode:
    """A node with a constant weight that INT8 quantization would rewrite."""

    name: str
    op_type: str
    weight: str  # initializer name
    activation: Optional[str]  # quantized activation input (None for Gather: weight-only)
    channel_axis: Optional[int]  # per-channel axis of the weight, None for per-tensor
    params: int


def fake_quantize_array(weight: np.ndarray, axis: Optional[int], bits: int = 8) -> np.ndarray:
    """Symmetric round-to-nearest INT8 (per channel along `axis`, or per tensor), dequantized."""
    qmax = float(2 ** (bits - 1) - 1)
    if axis is None:
        amax = np.abs(weight).max(keepdims=True)
    else:
        reduce = tuple(d for d in range(weight.ndim) if d != axis)
        amax = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.maximum(amax, 1e-12) / qmax
    return (np.clip(np.round(weight / scale), -qmax, qmax) * scale).astype(weight.dtype)


class FakeQuantGraph:
    """An fp32 ONNX model plus the ability to run it with any subset of its nodes INT8-simulated."""

    def __init__(self, model: onnx.ModelProto, threads: int = 2) -> None:
        from onnx import numpy_helper

        self.model = model
        self.threads = threads
        self._initializers = {init.name: init for init in model.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self._nodes = {}
        for index, node in enumerate(model.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{index}"
            info = self._describe(node)
            if info is not None:
                self._nodes[node.name] = info
        self._numpy_helper = numpy_helper

    @classmethod
    def load(cls, path: Union[str, Path], threads: int = 2) -> FakeQuantGraph:
        """Load an fp32 ONNX file; a missing or corrupt file raises CompressionError."""
        import onnx

        try:
            model = onnx.load(str(path))
        except FileNotFoundError:
            raise CompressionError(f"ONNX model {path} does not exist") from None
        except Exception as exc:
            raise CompressionError(f"{path} is not a readable ONNX model ({exc})") from exc
        return cls(model, threads)

    def _describe(self, node: Any) -> Optional[QuantNode]:
        """The QuantNode for `node` when it has a constant float weight onnxruntime would quantize."""
        from onnx import TensorProto

        if node.op_type not in QUANTIZABLE_OPS:
            return None
        weight_index = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= weight_index:
            return None
        init = self._initializers.get(node.input[weight_index])
        if init is None or init.data_type != TensorProto.FLOAT:
            return None
        dims = list(init.dims)
        params = int(np.prod(dims)) if dims else 1
        if node.op_type == "Gather":
            return QuantNode(node.name, "Gather", init.name, None, None, params)
        if node.op_type == "MatMul":
            if len(dims) != 2:
                return None
            return QuantNode(node.name, "MatMul", init.name, node.input[0], 1, params)
        if node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            return QuantNode(node.name, "Gemm", init.name, node.input[0], 0 if trans_b else 1, params)
        return QuantNode(node.name, "Conv", init.name, node.input[0], 0, params)

    def quantizable_nodes(self) -> dict[str, QuantNode]:
        """Nodes INT8 quantization would rewrite, in graph order, by node name."""
        return dict(self._nodes)

    def weight_array(self, name: str) -> np.ndarray:
        """The fp32 array of initializer `name` (cached)."""
        if name not in self._arrays:
            self._arrays[name] = self._numpy_helper.to_array(self._initializers[name])
        return self._arrays[name]

    def build(self, quantized: set[str]) -> onnx.ModelProto:
        """A copy of the model with the nodes in `quantized` INT8-simulated."""
        import onnx
        from onnx import helper

        unknown = quantized - set(self._nodes)
        if unknown:
            raise CompressionError(f"nodes {sorted(unknown)} are not quantizable weight nodes")
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        if not quantized:
            return out
        new_nodes = []
        new_inits = []
        for node in out.graph.node:
            info = self._nodes.get(node.name)
            if info is not None and node.name in quantized:
                fq_name = f"{info.weight}__fq_{node.name}"
                fq = fake_quantize_array(self.weight_array(info.weight), info.channel_axis)
                new_inits.append(self._numpy_helper.from_array(fq, fq_name))
                weight_index = 0 if info.op_type == "Gather" else 1
                node.input[weight_index] = fq_name
                if info.activation is not None:
                    prefix = f"{node.name}__dq"
                    new_nodes.append(
                        helper.make_node(
                            "DynamicQuantizeLinear",
                            [info.activation],
                            [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                            name=f"{prefix}_quant",
                        )
                    )
                    new_nodes.append(
                        helper.make_node(
                            "DequantizeLinear",
                            [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                            [f"{prefix}_x"],
                            name=f"{prefix}_dequant",
                        )
                    )
                    node.input[0] = f"{prefix}_x"
            new_nodes.append(node)
        del out.graph.node[:]
        out.graph.node.extend(new_nodes)
        out.graph.initializer.extend(new_inits)
        return out

    def session(self, quantized: set[str]) -> Any:
        """An onnxruntime session of the model with `quantized` nodes simulated."""
        return make_session(self.build(quantized).SerializeToString(), self.threads)

    def run(self, quantized: set[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of the model with `quantized` nodes simulated, on `feeds`."""
        return run_session(self.session(quantized), feeds)

    def run_batches(
        self, quantized: set[str], batches: list[dict[str, np.ndarray]], output_index: int = 0
    ) -> list[np.ndarray]:
        """Output `output_index` for each batch, with `quantized` nodes simulated (one session)."""
        session = self.session(quantized)
        return [run_session(session, feeds)[output_index] for feeds in batches]


def make_session(model: Union[str, Path, bytes], threads: int = 2) -> Any:
    """A CPU onnxruntime session with `threads` intra-op threads and quiet logging."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressionError(f"onnxruntime cannot load the model: {exc}") from exc


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run `session` on the feeds it takes (extra feeds are ignored; missing ones are an error)."""
    names = [i.name for i in session.get_inputs()]
    missing = [name for name in names if name not in feeds]
    if missing:
        raise CompressionError(f"the data lacks model inputs {missing}; it has {sorted(feeds)}")
    try:
        outputs: list[np.ndarray] = session.run(None, {name: feeds[name] for name in names})
        return outputs
    except Exception as exc:
        raise CompressionError(f"the model cannot run on this data: {exc}") from exc


def batch_cosines(
    reference: list[np.ndarray],
    outputs: list[np.ndarray],
    batches: list[dict[str, np.ndarray]],
    mask_input: Optional[str] = "attention_mask",
) -> np.ndarray:
    """Per-sample cosines over all batches (token outputs pooled with the batch's mask input)."""
    parts = [
        sample_cosines(ref, out, feeds.get(mask_input) if mask_input else None)
        for ref, out, feeds in zip(reference, outputs, batches)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def sample_cosines(
    reference: np.ndarray, output: np.ndarray, attention_mask: Optional[np.ndarray] = None
) -> np.ndarray:
    """Per-sample cosine between reference and output (token-mean-pooled first for [B, T, H])."""
    ref = reference.astype(np.float64)
    out = output.astype(np.float64)
    if ref.ndim == 3 and attention_mask is not None:
        mask = attention_mask[..., None].astype(np.float64)
        ref = (ref * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        out = (out * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    ref = ref.reshape(len(ref), -1)
    out = out.reshape(len(out), -1)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    return np.asarray((ref * out).sum(1) / np.clip(denom, 1e-12, None))


def output_distortion(
    reference: np.ndarray, output: np.ndarray, attention_mask: Optional[np.ndarray] = None
) -> float:
    """1 − mean per-sample cosine between reference and output."""
    return float(1.0 - sample_cosines(reference, output, attention_mask).mean())
