"""Per-op FLOPs and bytes of an ONNX graph, from onnx shape inference with dynamic dims bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from edgefleet.sdk.build.estimate import EstimateError, ModelCost, OpCost, prod
from edgefleet.sdk.build.estimate_contrib import INT8_CONTRIB, contrib_flops, unknown_flops

# FLOPs per output element of cheap ops; a multiply-add counts 2 everywhere.
_PER_ELEMENT: dict[str, float] = {
    **dict.fromkeys(
        (
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Relu",
            "LeakyRelu",
            "PRelu",
            "Sigmoid",
            "Tanh",
            "Clip",
            "Erf",
            "Sqrt",
            "Pow",
            "Max",
            "Min",
            "Neg",
            "Exp",
            "Log",
            "Abs",
            "Reciprocal",
            "HardSigmoid",
            "HardSwish",
            "Elu",
            "Selu",
            "Softplus",
            "Gelu",
            "FastGelu",
            "BiasGelu",
            "QuickGelu",
            "Where",
            "Equal",
            "Less",
            "LessOrEqual",
            "Greater",
            "GreaterOrEqual",
            "Not",
            "And",
            "Or",
            "Mod",
            "Floor",
            "Ceil",
            "Round",
            "Sign",
            "Sin",
            "Cos",
            "Mish",
            "Sum",
            "Mean",
            "BiasAdd",
            "IsNaN",
            "IsInf",
        ),
        1.0,
    ),
    # max, subtract, exp, sum, divide
    "Softmax": 5.0,
    "LogSoftmax": 5.0,
    # mean, variance, normalise, scale, shift
    **dict.fromkeys(
        (
            "LayerNormalization",
            "SimplifiedLayerNormalization",
            "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization",
            "InstanceNormalization",
            "GroupNormalization",
        ),
        8.0,
    ),
    "BatchNormalization": 2.0,
    "QuantizeLinear": 2.0,
    "DequantizeLinear": 2.0,
    "DynamicQuantizeLinear": 4.0,
}
# Ops whose FLOPs are one per input element (reductions, global pools).
_PER_INPUT_ELEMENT = frozenset(
    (
        "GlobalAveragePool",
        "GlobalMaxPool",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL2",
        "ReduceL1",
        "ReduceSumSquare",
        "ReduceLogSumExp",
        "ArgMax",
        "ArgMin",
        "TopK",
        "CumSum",
    )
)
# Ops that only move data: no FLOPs, but their bytes count.
_DATA_MOVEMENT = frozenset(
    (
        "Transpose",
        "Concat",
        "Gather",
        "GatherElements",
        "GatherND",
        "Slice",
        "Split",
        "Cast",
        "Expand",
        "Pad",
        "Tile",
        "Resize",
        "Upsample",
        "DepthToSpace",
        "SpaceToDepth",
        "ScatterND",
        "ScatterElements",
        "ConstantOfShape",
        "Range",
        "Trilu",
        "NonZero",
        "OneHot",
    )
)
_GATHERS = frozenset(("Gather", "GatherElements", "GatherND"))
# Ops that change only metadata (or vanish at inference): free.
_FREE = frozenset(
    ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size", "Identity", "Constant", "Dropout")
)
_INT8_OPS = frozenset(
    (
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        *INT8_CONTRIB,
    )
)
_CONVS = frozenset(("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "NhwcFusedConv"))
_HEAVY = frozenset(
    (
        *_CONVS,
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "FusedMatMul",
        "FusedGemm",
        "MatMulNBits",
        "MatMulInteger",
        "QLinearMatMul",
        "DynamicQuantizeMatMul",
    )
)
# Fused ops that add an activation to their conv / matrix product: one more FLOP per output element.
_FUSED_ACTIVATION = frozenset(("FusedConv", "NhwcFusedConv", "FusedGemm"))
_FP16 = 10  # onnx.TensorProto.FLOAT16
_INT8_TYPES = (2, 3)  # UINT8, INT8


class _Graph:
    """Shapes, element sizes and weights of a shape-inferred graph."""

    def __init__(self, model: Any) -> None:
        import onnx

        graph = model.graph
        self.shapes: dict[str, Optional[tuple[int, ...]]] = {}
        self.elem: dict[str, int] = {}
        self.weights: set[str] = set()
        self.producer: dict[str, Any] = {}
        for init in graph.initializer:
            self.shapes[init.name] = tuple(int(d) for d in init.dims)
            self.elem[init.name] = init.data_type
            self.weights.add(init.name)
        for info in [*graph.input, *graph.value_info, *graph.output]:
            if info.name in self.weights or not info.type.HasField("tensor_type"):
                continue
            ttype = info.type.tensor_type
            self.elem[info.name] = ttype.elem_type
            if not ttype.HasField("shape"):
                self.shapes.setdefault(info.name, None)
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            self.shapes[info.name] = tuple(dims) if all(d >= 0 for d in dims) else None
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                # Constant outputs are weights: read once, by the op that first uses them.
                self.weights.update(node.output)
                for attr in node.attribute:
                    if attr.name == "value":
                        self.shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
                        self.elem[node.output[0]] = attr.t.data_type
        self._itemsize: dict[int, int] = {}
        self._onnx = onnx

    def add_runtime_shapes(self, shapes: dict[str, tuple[tuple[int, ...], int]]) -> None:
        """Fill in shapes and element types measured by running the graph (only the unknown ones)."""
        for name, (shape, elem) in shapes.items():
            if self.shapes.get(name) is None:
                self.shapes[name] = shape
                self.elem.setdefault(name, elem)
                if not self.elem.get(name):
                    self.elem[name] = elem

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The static shape of a tensor, None when unknown."""
        return self.shapes.get(name)

    def nbytes(self, name: str) -> int:
        """Bytes of a tensor with a known shape, 0 when unknown."""
        shape = self.shape(name)
        elem = self.elem.get(name)
        if shape is None or elem is None or elem == 0:
            return 0
        if elem not in self._itemsize:
            try:
                self._itemsize[elem] = int(self._onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize)
            except (KeyError, TypeError, ValueError):
                self._itemsize[elem] = 4
        return prod(shape) * self._itemsize[elem]

    def is_quantized_input(self, name: str) -> bool:
        """Whether a tensor comes from DequantizeLinear of int8/uint8 data (a QDQ graph)."""
        node = self.producer.get(name)
        return bool(
            node is not None
            and node.op_type == "DequantizeLinear"
            and self.elem.get(node.input[0]) in _INT8_TYPES
        )


def onnx_costs(path: Path, batch_size: int, dims: dict[str, int]) -> ModelCost:
    """Shape-infer the ONNX model at `batch_size` and cost every node of its main graph."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise EstimateError(f"{path}: not a readable ONNX model ({exc})") from None
    batch = _bind_inputs(model, batch_size, dims, path)
    inferred = _infer_shapes(model, path)
    graph = _Graph(inferred)
    ops: list[OpCost] = []
    unknown: list[str] = []
    read_weights: set[str] = set()
    if any(
        node.output and node.output[0] and graph.shape(node.output[0]) is None and node.op_type not in _FREE
        for node in inferred.graph.node
    ):
        # Shape inference stopped somewhere (an op it does not know): run the graph once to learn them.
        graph.add_runtime_shapes(_runtime_shapes(model, path))
    fused = _runtime_fused(inferred.graph) | _qdq_pairs(inferred.graph, graph)
    for node in inferred.graph.node:
        flops, heavy, known, op_class = _node_flops(node, graph)
        if not known and node.op_type not in unknown:
            unknown.append(node.op_type)
        if node.op_type in _FREE or id(node) in fused:
            ops.append(OpCost(node.name or node.op_type, node.op_type, 0.0, 0.0, "fp32", False, "free"))
            continue
        moved = 0
        for position, name in enumerate(node.input):
            if not name:
                continue
            if position == 0 and node.op_type in _GATHERS:
                # an embedding lookup reads the rows it returns, not the whole table
                moved += min(graph.nbytes(name), graph.nbytes(node.output[0]))
                continue
            if name in graph.weights:
                if name in read_weights:
                    continue
                read_weights.add(name)
            moved += graph.nbytes(name)
        if node.op_type == "DequantizeLinear" and node.input[0] in graph.weights:
            # Runtimes fold the dequantization of a constant weight; its consumer reads the int8 weight.
            graph.weights.add(node.output[0])
            read_weights.add(node.output[0])
            flops = 0.0
        else:
            moved += sum(graph.nbytes(out) for out in node.output if out)
        ops.append(
            OpCost(
                node.name or node.op_type,
                node.op_type,
                float(flops),
                float(moved),
                _precision(node, graph),
                heavy,
                op_class,
            )
        )
    return ModelCost("onnx", batch, tuple(ops), tuple(unknown))


def _runtime_fused(graph: Any) -> set[int]:
    """ids of the nodes every onnxruntime session folds into the convolution before them.

    A BatchNormalization or activation that is the only reader of a Conv's output is folded into the
    convolution's weights or its fused activation at session start, so the plain graph and the
    offline-optimized one (FusedConv) cost the same.
    """
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for out in graph.output:
        consumers[out.name] = consumers.get(out.name, 0) + 1
    producer_op = {out: node.op_type for node in graph.node for out in node.output}
    fused: set[int] = set()
    for node in graph.node:
        if node.op_type not in _CONV_FOLLOWERS or not node.input:
            continue
        source = node.input[0]
        if producer_op.get(source) in _CONVS and consumers.get(source) == 1:
            fused.add(id(node))
            # the follower's own output becomes the conv's: a second follower (BN then Relu) folds too
            producer_op[node.output[0]] = producer_op[source]
    return fused


def _qdq_pairs(graph: Any, shapes: _Graph) -> set[int]:
    """ids of activation QuantizeLinear → DequantizeLinear pairs of a QDQ graph: the runtime fuses them.

    onnxruntime (and TensorRT) turn DQ → Conv/MatMul → Q into one int8 kernel (QLinearConv...), so the
    pairs between two quantized ops are not executed; the int8 tensor between them is what moves, so
    the DequantizeLinear output is counted at the int8 size.
    """
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: set[int] = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not node.output:
            continue
        readers = consumers.get(node.output[0], [])
        if readers and all(r.op_type == "DequantizeLinear" for r in readers):
            out.add(id(node))
            for reader in readers:
                out.add(id(reader))
                if reader.output and reader.input:
                    shapes.elem[reader.output[0]] = shapes.elem.get(reader.input[0], 3)
    return out


# Ops onnxruntime folds into a preceding convolution (Conv+BN fusion, Conv+activation fusion).
_CONV_FOLLOWERS = frozenset(
    ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")
)


def _runtime_shapes(model: Any, path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """{tensor: (shape, onnx elem type)} of every node output, from one onnxruntime run on zero inputs.

    Every intermediate is made a graph output and optimizations are off, so each tensor keeps its
    name; inputs are the bound shapes filled with zeros. Any failure gives {} (shapes stay unknown).
    """
    import numpy as np
    import onnx

    try:
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        for node in probe.graph.node:
            for name in node.output:
                if name and name not in known:
                    probe.graph.output.append(onnx.ValueInfoProto(name=name))
                    known.add(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for inp in session.get_inputs():
            dtype = _ort_dtype(inp.type)
            feeds[inp.name] = np.zeros([int(d) if isinstance(d, int) else 1 for d in inp.shape], dtype=dtype)
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception:  # a graph that does not run on zeros (or at all) keeps its unknown shapes
        return {}
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, value in zip(names, values):
        arr = np.asarray(value)
        try:
            elem = int(onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))
        except (KeyError, TypeError, ValueError):
            elem = 1
        out[name] = (tuple(int(d) for d in arr.shape), elem)
    return out


def _ort_dtype(type_name: str) -> Any:
    """The numpy dtype of an onnxruntime input type name ("tensor(int64)"), float32 when unlisted."""
    import numpy as np

    return {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }.get(type_name, np.float32)


def _infer_shapes(model: Any, path: Path) -> Any:
    """The model with static shapes on every value it can infer.

    onnxruntime's symbolic shape inference first: it resolves shapes computed at run time (BERT's
    Shape→Gather→Concat→Reshape chains) that onnx's own inference leaves unknown; onnx's is the fallback
    for graphs the symbolic pass rejects (it gives up on some contrib ops).
    """
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # The loop of `SymbolicShapeInference.infer_shapes`, without its side effect: on a partial
        # result that method saves the model (with external data) into the current folder.
        sym = SymbolicShapeInference(2**31 - 1, True, False, 0)
        sym._preprocess(model)
        complete = False
        while sym.run_:
            complete = sym._infer_impl()
        sym._update_output_from_vi()
        if complete:
            return sym.out_mp_
    except Exception:  # any failure of the optional pass: onnx's inference below still works
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors on exotic graphs: name the file and keep the cause
        raise EstimateError(f"{path}: ONNX shape inference failed: {exc}") from None


def _bind_inputs(model: Any, batch_size: int, dims: dict[str, int], path: Path) -> int:
    """Give every dynamic input dim a value: the first dim is the batch, others come from `dims`."""
    initializers = {init.name for init in model.graph.initializer}
    unbound: list[str] = []
    batch = batch_size
    for inp in model.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                if index == 0:
                    batch = int(dim.dim_value)  # a static batch is what the model runs at
                continue
            label = dim.dim_param or f"{inp.name}[{index}]"
            if label in dims:
                dim.dim_value = int(dims[label])
            elif index == 0:
                dim.dim_value = batch_size
            else:
                unbound.append(label)
    if unbound:
        names = ", ".join(sorted(set(unbound)))
        raise EstimateError(
            f"{path}: dynamic input dimensions {names} need a value; pass dims={{'{unbound[0]}': N, ...}} "
            "(e.g. the sequence length)"
        )
    return batch


def _attr(node: Any, name: str, default: Any = None) -> Any:
    """An attribute's value (ints, int, float) or `default`."""
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _node_flops(node: Any, graph: _Graph) -> tuple[float, bool, bool, str]:
    """(FLOPs, is heavy, op type known, op class) of one node; unknown shapes give 0 FLOPs."""
    op = node.op_type
    out = graph.shape(node.output[0]) if node.output else None
    if op in _FREE:
        return 0.0, False, True, "free"
    if op in _DATA_MOVEMENT:
        return 0.0, False, True, "elementwise"
    if op in _PER_ELEMENT:
        return (_PER_ELEMENT[op] * prod(out) if out is not None else 0.0), False, True, "elementwise"
    if op in _PER_INPUT_ELEMENT:
        shape = graph.shape(node.input[0])
        return (float(prod(shape)) if shape is not None else 0.0), False, True, "elementwise"
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = _attr(node, "kernel_shape", [])
        return (float(prod(out) * prod(kernel)) if out is not None else 0.0), False, True, "elementwise"
    if op in _HEAVY:
        flops = _heavy_flops(node, graph, out)
        if op in _FUSED_ACTIVATION and out is not None:
            flops += prod(out)
        return flops, True, True, _heavy_class(node, graph)
    contrib = contrib_flops(node, graph.shape, _attr, graph.weights.__contains__)
    if contrib is not None:
        return contrib[0], contrib[1], True, contrib[2]
    if op in _CONTRIB_KNOWN:
        return 0.0, False, True, "elementwise"  # a known op whose shapes stayed unknown
    # Unknown op: costed like the layer it most likely fuses (estimate_contrib), and named in the report.
    return unknown_flops(node, graph.shape, graph.weights.__contains__), False, False, "elementwise"


# Ops estimate_contrib knows by name (their cost is 0 only when their shapes could not be found).
_CONTRIB_KNOWN = frozenset(
    (
        "Attention",
        "QAttention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedMultiHeadAttention",
        "DecoderMaskedMultiHeadAttention",
        "QGemm",
        "GemmFastGelu",
        "MatMulIntegerToFloat",
        "Einsum",
        "LSTM",
        "GRU",
        "RNN",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
    )
)


def _heavy_class(node: Any, graph: _Graph) -> str:
    """ "conv" for dense convolutions, "dwconv" for grouped/depthwise ones, "matmul" for the rest."""
    if node.op_type in _CONVS or node.op_type == "ConvTranspose":
        group = int(_attr(node, "group", 1) or 1)
        return "dwconv" if group > 1 else "conv"
    return "matmul"


def _heavy_flops(node: Any, graph: _Graph, out: Optional[tuple[int, ...]]) -> float:
    """FLOPs of a convolution or matrix product (multiply-add = 2)."""
    op = node.op_type
    if op == "MatMulNBits":
        a = graph.shape(node.input[0])
        k, n = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
        return 2.0 * prod(a[:-1]) * k * n if a is not None else 0.0
    if out is None:
        return 0.0
    if op in _CONVS:
        w = graph.shape(node.input[3 if op == "QLinearConv" else 1])
        if w is None:
            return 0.0
        flops = 2.0 * prod(out) * prod(w[1:])
        bias_index = 8 if op == "QLinearConv" else 2
        if len(node.input) > bias_index and node.input[bias_index]:
            flops += prod(out)
        return flops
    if op == "ConvTranspose":
        x, w = graph.shape(node.input[0]), graph.shape(node.input[1])
        if x is None or w is None:
            return 0.0
        return 2.0 * prod(x) * prod(w[1:])
    if op in ("Gemm", "FusedGemm"):
        a = graph.shape(node.input[0])
        if a is None:
            return 0.0
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        flops = 2.0 * prod(out) * k
        if len(node.input) > 2 and node.input[2]:
            flops += prod(out)
        return flops
    # MatMul, MatMulInteger, QLinearMatMul, FusedMatMul, DynamicQuantizeMatMul: K is A's last dim
    # (its second-to-last when FusedMatMul transposes A).
    a = graph.shape(node.input[0])
    if a is None or not a:
        return 0.0
    k = a[-2] if op == "FusedMatMul" and _attr(node, "transA", 0) and len(a) >= 2 else a[-1]
    return 2.0 * prod(out) * k


def _precision(node: Any, graph: _Graph) -> str:
    """The precision a node computes in: int8 for quantized kernels, fp16 for fp16 inputs, else fp32."""
    if node.op_type in _INT8_OPS:
        return "int8"
    if node.op_type in _HEAVY and any(graph.is_quantized_input(name) for name in node.input[:2] if name):
        return "int8"
    if node.input and graph.elem.get(node.input[0]) == _FP16:
        return "fp16"
    return "fp32"
