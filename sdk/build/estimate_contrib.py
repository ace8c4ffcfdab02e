"""FLOPs of onnxruntime's fused contrib ops and of ops the tables in estimate_onnx do not list.

An optimized graph (onnxruntime "extended" level, the transformer optimizer) replaces chains of plain
ops by one fused op: Attention, SkipLayerNormalization, FusedConv, FusedMatMul, BiasGelu... Each is costed
here as the plain ops it replaced (its unfused equivalent), so an optimized fp32 graph costs what the
plain fp32 graph costs, less the memory traffic the fusion saves. An op nobody listed is costed by a
rule that never gives 0 when its output shape is known: like a matrix product of its weights when it
has any (a fused layer), else one FLOP per output element; estimate_onnx names it in the report.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from edgefleet.sdk.build.estimate import prod

Shape = Optional[tuple[int, ...]]
# (flops, heavy, op class) or None when a needed shape is unknown
Result = Optional[tuple[float, bool, str]]

# FLOPs per output element of fused element-wise contrib ops (the unfused chain's count).
ELEMENTWISE_CONTRIB: dict[str, float] = {
    "BiasGelu": 9.0,  # add + erf-based gelu (~8)
    "FastGelu": 9.0,  # tanh approximation
    "Gelu": 8.0,
    "QuickGelu": 4.0,  # x * sigmoid(1.702 x)
    "BiasAdd": 2.0,
    "BiasDropout": 2.0,
    "BiasSoftmax": 6.0,
    "BiasSplitGelu": 10.0,
    "SkipLayerNormalization": 9.0,  # add + layer norm
    "SkipSimplifiedLayerNormalization": 7.0,
    "SimplifiedLayerNormalization": 6.0,
    "SkipGroupNorm": 9.0,
    "GroupNorm": 8.0,
    "EmbedLayerNormalization": 10.0,  # gathers + adds + layer norm
    "RotaryEmbedding": 4.0,
    "GemmFastGelu": 0.0,  # costed as a matmul below
    "QLinearAdd": 5.0,  # dequantize both, add, quantize
    "QLinearMul": 5.0,
    "QLinearSigmoid": 5.0,
    "QLinearLeakyRelu": 4.0,
    "QLinearSoftmax": 8.0,
    "QLinearConcat": 2.0,
    "QuantizeBFP": 2.0,
    "DynamicQuantizeLSTM": 0.0,
}
INT8_CONTRIB = frozenset(
    (
        "QAttention",
        "QGemm",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearConcat",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
    )
)


def contrib_flops(
    node: Any,
    shape: Callable[[str], Shape],
    attr: Callable[[Any, str, Any], Any],
    is_weight: Callable[[str], bool],
) -> Result:
    """(FLOPs, heavy, op class) of a contrib/fused/sequence op, or None when this module does not know it."""
    op = node.op_type
    out = shape(node.output[0]) if node.output and node.output[0] else None
    if op in ("Attention", "QAttention"):
        return _attention(node, shape, attr, out)
    if op in (
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedMultiHeadAttention",
        "DecoderMaskedMultiHeadAttention",
    ):
        return _mha(node, shape, attr, out)
    if op in ELEMENTWISE_CONTRIB and op != "GemmFastGelu":
        return (ELEMENTWISE_CONTRIB[op] * prod(out), False, "elementwise") if out is not None else None
    if op in ("QLinearGlobalAveragePool", "QLinearAveragePool"):
        x = shape(node.input[0])
        return (3.0 * prod(x), False, "elementwise") if x is not None else None
    if op in ("QGemm", "GemmFastGelu", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        a = shape(node.input[0])
        if a is None or out is None or not a:
            return None
        k = a[0] if op == "QGemm" and attr(node, "transA", 0) else a[-1]
        extra = 9.0 * prod(out) if op == "GemmFastGelu" else float(prod(out))
        return 2.0 * prod(out) * k + extra, True, "matmul"
    if op == "Einsum":
        return _einsum(node, shape, attr)
    if op in ("LSTM", "GRU", "RNN"):
        return _recurrent(node, shape, attr)
    if op in ("ConvTransposeWithDynamicPads",):
        x, w = shape(node.input[0]), shape(node.input[1])
        return (2.0 * prod(x) * prod(w[1:]), True, "conv") if x is not None and w is not None else None
    return None


def unknown_flops(node: Any, shape: Callable[[str], Shape], is_weight: Callable[[str], bool]) -> float:
    """FLOPs of an op no table lists: a matrix product of its weights (a fused layer), else 1 per output element.

    A weight W of rank ≥ 2 applied to the output's positions costs 2·|W|·positions, where positions are
    the output's elements divided by the output dim that matches one of W's dims (its channels). An
    output whose shape nobody could find is assumed to have its first input's shape.
    """
    out = shape(node.output[0]) if node.output and node.output[0] else None
    if out is None and node.input and node.input[0]:
        out = shape(node.input[0])  # no shape anywhere for the output: assume it keeps its input's
    if out is None:
        return 0.0
    flops = float(prod(out))
    for name in node.input[1:]:
        w = shape(name) if name and is_weight(name) else None
        if w is None or len(w) < 2:
            continue
        channels = [d for d in out if d in w and d > 1]
        positions = prod(out) / (max(channels) if channels else (out[-1] or 1))
        flops += 2.0 * prod(w) * positions
    return flops


def _attention(
    node: Any, shape: Callable[[str], Shape], attr: Callable[[Any, str, Any], Any], out: Shape
) -> Result:
    """com.microsoft Attention: QKV projection + QKᵀ + softmax + ·V, with `num_heads` heads."""
    x = shape(node.input[0])
    w = shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if x is None or out is None or len(x) < 3:
        return None
    batch, seq, hidden_in = x[0], x[1], x[2]
    heads = int(attr(node, "num_heads", 1) or 1)
    sizes = attr(node, "qkv_hidden_sizes", None)
    if sizes:
        qk, v = int(sizes[0]), int(sizes[2])
    else:
        total = w[-1] if w is not None else 3 * out[-1]
        qk = v = total // 3
    proj = 2.0 * batch * seq * hidden_in * (2 * qk + v) if w is not None else 0.0
    kv_len = seq + _past_len(node, shape)
    scores = 2.0 * batch * seq * kv_len * qk
    mixed = 2.0 * batch * seq * kv_len * v
    softmax = 5.0 * batch * heads * seq * kv_len
    return proj + batch * seq * (2 * qk + v) + scores + mixed + softmax, True, "matmul"


def _past_len(node: Any, shape: Callable[[str], Shape]) -> int:
    """Length of the past key/value cache an attention op reads (0 without one)."""
    if len(node.input) > 4 and node.input[4]:
        past = shape(node.input[4])
        if past is not None and len(past) == 5:
            return int(past[3])
    return 0


def _mha(
    node: Any, shape: Callable[[str], Shape], attr: Callable[[Any, str, Any], Any], out: Shape
) -> Result:
    """MultiHeadAttention-like ops: already-projected Q, K, V → QKᵀ + softmax + ·V."""
    q = shape(node.input[0])
    if q is None or out is None or len(q) < 3:
        return None
    heads = int(attr(node, "num_heads", 1) or 1)
    batch, seq = q[0], q[1]
    k = shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    kv_len = k[1] if k is not None and len(k) == 3 else seq
    d_qk = q[-1] if len(q) == 3 else out[-1]
    if len(q) == 5:  # packed QKV: (B, S, heads, 3, head_size)
        d_qk = q[2] * q[4]
    d_v = out[-1]
    flops = 2.0 * batch * seq * kv_len * (d_qk + d_v) + 5.0 * batch * heads * seq * kv_len
    return flops, True, "matmul"


def _einsum(node: Any, shape: Callable[[str], Shape], attr: Callable[[Any, str, Any], Any]) -> Result:
    """Einsum: 2 × the product of every index's size (one multiply-add per term) for 2+ operands."""
    equation = str(attr(node, "equation", "") or "")
    if isinstance(attr(node, "equation", ""), bytes):
        equation = attr(node, "equation", b"").decode()
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, name in zip(lhs, node.input):
        s = shape(name)
        if s is None or "." in term or len(term) != len(s):
            return None
        sizes.update(zip(term, s))
    total = float(prod(list(sizes.values())))
    return (2.0 * total if len(lhs) > 1 else total), len(lhs) > 1, "matmul" if len(lhs) > 1 else "elementwise"


def _recurrent(node: Any, shape: Callable[[str], Shape], attr: Callable[[Any, str, Any], Any]) -> Result:
    """LSTM (4 gates), GRU (3), RNN (1): per step and direction, 2·gates·H·(I+H) plus the gate math."""
    x, w = shape(node.input[0]), shape(node.input[1])
    if x is None or w is None or len(x) < 3 or len(w) < 3:
        return None
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op_type]
    directions, hidden = w[0], w[1] // gates
    layout = int(attr(node, "layout", 0) or 0)
    steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
    per_step = 2.0 * gates * hidden * (x[2] + hidden) + 8.0 * gates * hidden
    return directions * steps * batch * per_step, True, "matmul"
