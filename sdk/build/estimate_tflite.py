"""Per-op FLOPs and bytes of a TFLite model, read through the LiteRT interpreter's op and tensor details.

TFLite fixes shapes (the batch too) at conversion, so the model is costed at its own shapes. Pooling
counts one FLOP per input element (the kernel size is not in the op details). DELEGATE ops are the
XNNPACK partitions of ops that are listed (and costed) on their own, so they are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.sdk.build.estimate import EstimateError, ModelCost, OpCost, prod

_PER_ELEMENT: dict[str, float] = {
    **dict.fromkeys(
        (
            "ADD",
            "SUB",
            "MUL",
            "DIV",
            "RELU",
            "RELU6",
            "RELU_N1_TO_1",
            "LOGISTIC",
            "TANH",
            "HARD_SWISH",
            "GELU",
            "EXP",
            "SQRT",
            "RSQRT",
            "POW",
            "MAXIMUM",
            "MINIMUM",
            "NEG",
            "ABS",
            "LEAKY_RELU",
            "PRELU",
            "SQUARED_DIFFERENCE",
            "SQUARE",
            "SELECT",
            "SELECT_V2",
            "LOG",
            "SIN",
            "COS",
            "ELU",
            "FLOOR",
            "CEIL",
            "ROUND",
            "LESS",
            "GREATER",
            "EQUAL",
            "NOT_EQUAL",
            "ADD_N",
            "SIGN",
        ),
        1.0,
    ),
    "SOFTMAX": 5.0,
    "LOG_SOFTMAX": 5.0,
    "QUANTIZE": 2.0,
    "DEQUANTIZE": 2.0,
    "L2_NORMALIZATION": 3.0,
}
_PER_INPUT_ELEMENT = frozenset(
    (
        "MEAN",
        "SUM",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "REDUCE_PROD",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "L2_POOL_2D",
        "ARG_MAX",
        "ARG_MIN",
    )
)
_DATA_MOVEMENT = frozenset(
    (
        "TRANSPOSE",
        "CONCATENATION",
        "GATHER",
        "GATHER_ND",
        "SLICE",
        "STRIDED_SLICE",
        "PAD",
        "PADV2",
        "MIRROR_PAD",
        "CAST",
        "SPLIT",
        "SPLIT_V",
        "TILE",
        "BROADCAST_TO",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "PACK",
        "UNPACK",
        "DEPTH_TO_SPACE",
        "SPACE_TO_DEPTH",
    )
)
_FREE = frozenset(("RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "DELEGATE"))
# Op class of the heavy ops (the estimator's efficiency table); every other op is "elementwise".
_CLASS = {
    "CONV_2D": "conv",
    "CONV_3D": "conv",
    "TRANSPOSE_CONV": "conv",
    "DEPTHWISE_CONV_2D": "dwconv",
    "FULLY_CONNECTED": "matmul",
    "BATCH_MATMUL": "matmul",
}
_HEAVY = frozenset(
    ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
)


def tflite_costs(path: Path, batch_size: int) -> ModelCost:
    """Cost every op of a TFLite model at the shapes fixed in the file."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise EstimateError(
            "estimating a .tflite model needs the LiteRT runtime: pip install ai-edge-litert"
        ) from None
    try:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        tensors = {int(t["index"]): t for t in interpreter.get_tensor_details()}
        op_list = list(interpreter._get_ops_details())
    except (ValueError, RuntimeError) as exc:
        raise EstimateError(f"{path}: not a readable TFLite model ({exc})") from None
    produced = {int(i) for op in op_list for i in op["outputs"]}
    inputs = {int(d["index"]) for d in interpreter.get_input_details()}
    constants = {i for i in tensors if i not in produced and i not in inputs}
    first_input = interpreter.get_input_details()[0]["shape"] if inputs else []
    batch = int(first_input[0]) if len(first_input) else batch_size
    ops: list[OpCost] = []
    unknown: list[str] = []
    read_constants: set[int] = set()

    def shape(index: int) -> tuple[int, ...]:
        return tuple(int(d) for d in tensors[index]["shape"])

    def nbytes(index: int) -> int:
        return prod(shape(index)) * int(tensors[index]["dtype"]().itemsize)

    for op in op_list:
        name = str(op["op_name"])
        ins = [int(i) for i in op["inputs"] if int(i) >= 0]
        outs = [int(i) for i in op["outputs"] if int(i) >= 0]
        if name in _FREE:
            continue
        flops, known = _flops(name, ins, outs, shape)
        if not known and name not in unknown:
            unknown.append(name)
        moved = 0
        for position, index in enumerate(ins):
            if position == 0 and name in ("GATHER", "GATHER_ND") and outs:
                # an embedding lookup reads the rows it returns, not the whole table
                moved += min(nbytes(index), nbytes(outs[0]))
                continue
            if index in constants:
                if index in read_constants:
                    continue
                read_constants.add(index)
            moved += nbytes(index)
        moved += sum(nbytes(i) for i in outs)
        precision = _precision(name, ins, tensors)
        ops.append(
            OpCost(
                f"{name}#{op['index']}",
                name,
                float(flops),
                float(moved),
                precision,
                name in _HEAVY,
                _CLASS.get(name, "elementwise"),
            )
        )
    return ModelCost("tflite", batch, tuple(ops), tuple(unknown))


def _flops(name: str, ins: list[int], outs: list[int], shape: Any) -> tuple[float, bool]:
    """(FLOPs, op type known) of one TFLite op."""
    out: tuple[int, ...] = shape(outs[0]) if outs else ()
    if name in _DATA_MOVEMENT:
        return 0.0, True
    if name in _PER_ELEMENT:
        return _PER_ELEMENT[name] * prod(out), True
    if name in _PER_INPUT_ELEMENT:
        return float(prod(shape(ins[0]))), True
    bias = prod(out) if len(ins) > 2 else 0
    if name in ("CONV_2D", "CONV_3D"):
        w = shape(ins[1])  # [O, kh, kw, I]
        return 2.0 * prod(out) * prod(w[1:]) + bias, True
    if name == "DEPTHWISE_CONV_2D":
        w = shape(ins[1])  # [1, kh, kw, C * multiplier]
        return 2.0 * prod(out) * prod(w[1:-1]) + bias, True
    if name == "FULLY_CONNECTED":
        w = shape(ins[1])  # [O, I]
        return 2.0 * prod(out) * w[-1] + bias, True
    if name == "BATCH_MATMUL":
        a = shape(ins[0])
        # adj_x is not in the op details: K is the dim of A that is not the output's M
        k = a[-1] if len(out) >= 2 and a[-2] == out[-2] else a[-2]
        return 2.0 * prod(out) * k, True
    if name == "TRANSPOSE_CONV":
        w, x = shape(ins[1]), shape(ins[2])  # inputs: output_shape, weights [O, kh, kw, I], input
        return 2.0 * prod(x) * prod(w[:-1]), True
    return float(prod(out)), False


def _precision(name: str, ins: list[int], tensors: dict[int, Any]) -> str:
    """int8 when the op's data or weights are 8-bit (full or dynamic-range quantization), else fp32."""
    kinds = {tensors[i]["dtype"].__name__ for i in ins[:2]}
    if name in _HEAVY and kinds & {"int8", "uint8"}:
        return "int8"
    if ins and tensors[ins[0]]["dtype"].__name__ in ("int8", "uint8") and name not in _DATA_MOVEMENT:
        return "int8"
    return "fp32"
