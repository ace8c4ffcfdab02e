"""The estimator on optimized graphs: fused contrib ops costed as their unfused equivalent, unknown ops never 0."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.sdk.build.estimate import count_flops, estimate_latency

ROOT = Path(__file__).resolve().parents[1]


def _bench_models() -> Any:
    """bench/estimate_models.py: the held-out detector and speech encoder (random weights)."""
    spec = importlib.util.spec_from_file_location("estimate_models", ROOT / "bench" / "estimate_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("estimate_models", module)
    spec.loader.exec_module(module)
    return module


def _export(module: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch

    torch.onnx.export(
        module,
        (torch.randn(*shape),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
        opset_version=17,
    )
    return path


def _optimize(path: Path, shape: tuple[int, ...]) -> Path:
    """The build's onnx-fp32-opt step: onnxslim, then onnxruntime's "extended" level (contrib ops)."""
    from edgefleet.converters.onnx_optimize import OnnxOptimize

    dst = path.with_name(path.stem + "-opt.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    OnnxOptimize(ort_level="extended").convert(path, dst, feed)
    return dst


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer speech encoder (80 mel × 64 frames) exported as-is and after onnx-optimize."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("speech")
    shape = (1, 80, 64)
    plain = _export(
        _bench_models().speech_encoder(d_model=64, layers=2, heads=2), shape, folder / "speech.onnx"
    )
    return plain, _optimize(plain, shape)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A narrow YOLO-style detector at 64² exported as-is and after onnx-optimize (FusedConv, QuickGelu)."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("detector")
    shape = (1, 3, 64, 64)
    plain = _export(
        _bench_models().yolo_detector(width=0.0625, depth=0.34, classes=4), shape, folder / "det.onnx"
    )
    return plain, _optimize(plain, shape)


def test_optimized_speech_encoder_costs_what_fp32_costs(speech: tuple[Path, Path]) -> None:
    # prepare
    plain, opt = speech
    assert _ops(opt) & {"SkipLayerNormalization", "FusedMatMul", "Gelu", "BiasGelu", "Attention"}
    # act
    base = estimate_latency(plain, "rpi4b", precision="fp32")
    fused = estimate_latency(opt, "rpi4b", precision="fp32")
    # assert: the same arithmetic, and fusion saves memory traffic, never half the cost
    assert fused.flops == pytest.approx(base.flops, rel=0.05)
    assert fused.estimate_ms >= 0.5 * base.estimate_ms
    assert fused.estimate_ms <= 1.05 * base.estimate_ms
    assert fused.unknown_op_types == ()


def test_optimized_detector_costs_what_fp32_costs(detector: tuple[Path, Path]) -> None:
    plain, opt = detector
    assert "FusedConv" in _ops(opt) or "QuickGelu" in _ops(opt)
    base = estimate_latency(plain, "rpi4b", precision="fp32")
    fused = estimate_latency(opt, "rpi4b", precision="fp32")
    assert fused.flops == pytest.approx(base.flops, rel=0.05)
    assert 0.5 * base.estimate_ms <= fused.estimate_ms <= 1.05 * base.estimate_ms
    assert base.class_ms["conv"] > 0 and fused.class_ms["conv"] == pytest.approx(
        base.class_ms["conv"], rel=0.05
    )


def _contrib_model(
    tmp_path: Path, name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]
) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _w(name: str, shape: tuple[int, ...]) -> Any:
    return numpy_helper.from_array(np.full(shape, 0.01, dtype=np.float32), name)


def test_attention_contrib_op_counted_by_hand(tmp_path: Path) -> None:
    # prepare: com.microsoft Attention, batch 1, sequence 8, hidden 16, 2 heads; onnx's own shape
    # inference does not know it, so its output shape comes from the symbolic pass or a run
    batch, seq, hidden, heads = 1, 8, 16, 2
    path = _contrib_model(
        tmp_path,
        "attention",
        [helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=heads)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_w("w", (hidden, 3 * hidden)), _w("b", (3 * hidden,))],
    )
    # act
    cost = count_flops(path)
    # assert
    projection = 2 * batch * seq * hidden * 3 * hidden + batch * seq * 3 * hidden
    scores_and_mix = 2 * (2 * batch * seq * seq * hidden)
    softmax = 5 * batch * heads * seq * seq
    assert cost.flops == pytest.approx(projection + scores_and_mix + softmax)
    assert cost.ops[0].op_class == "matmul" and cost.ops[0].heavy
    assert cost.unknown_op_types == ()


def test_fused_matmul_with_transposed_a_uses_the_right_k(tmp_path: Path) -> None:
    # A is [K=6, M=4] transposed: out [4, 5], K = 6
    path = _contrib_model(
        tmp_path,
        "fmm",
        [helper.make_node("FusedMatMul", ["a", "w"], ["y"], domain="com.microsoft", transA=1)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
        [_w("w", (6, 5))],
    )
    assert count_flops(path).flops == 2 * 4 * 5 * 6


def test_unknown_op_is_listed_and_costed_like_its_weights(tmp_path: Path) -> None:
    # prepare: an op no table lists, holding a [32, 64] weight, output [1, 10, 64] declared by the graph
    path = _contrib_model(
        tmp_path,
        "custom",
        [helper.make_node("FancyLinear", ["x", "w"], ["y"], domain="com.microsoft")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 64])],
        [_w("w", (32, 64))],
    )
    # act
    est = estimate_latency(path, "rpi4b")
    # assert: named in the report, costed as the matrix product it fuses (plus one FLOP per element)
    assert est.unknown_op_types == ("FancyLinear",)
    assert est.flops == pytest.approx(2 * 10 * 32 * 64 + 10 * 64)
    assert est.to_dict()["unknown_op_types"] == ["FancyLinear"]


def test_unknown_op_without_any_shape_is_never_free(tmp_path: Path) -> None:
    path = _contrib_model(
        tmp_path,
        "mystery",
        [helper.make_node("Mystery", ["x"], ["y"], domain="com.microsoft")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    est = estimate_latency(path, "rpi4b")
    assert est.unknown_op_types == ("Mystery",)
    assert est.flops > 0 and est.estimate_ms > est.overhead_ms


def test_conv_batchnorm_relu_folds_into_the_conv(tmp_path: Path) -> None:
    # prepare: Conv → BatchNormalization → Relu; onnxruntime folds the last two into the conv
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    inits = [_w("w", (c, 3, 3, 3)), _w("s", (c,)), _w("bb", (c,)), _w("m", (c,)), _w("v", (c,))]
    path = _contrib_model(
        tmp_path,
        "cbr",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        inits,
    )
    # act
    cost = count_flops(path)
    # assert: only the conv moves bytes or costs FLOPs
    costed = [op.op_type for op in cost.ops if op.flops or op.bytes_moved]
    assert costed == ["Conv"]


def test_activation_quantize_dequantize_pairs_are_fused_away(tmp_path: Path) -> None:
    # prepare: a QDQ graph: x → Q → DQ → Conv (weight DQ'd from int8) → y
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "z")
    w8 = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.int8), "w8")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w8", "s", "z"], ["w"]),
        helper.make_node("Conv", ["xd", "w"], ["y"]),
    ]
    path = _contrib_model(
        tmp_path,
        "qdq",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [scale, zero, w8],
    )
    # act
    cost = count_flops(path)
    # assert: the activation's Q/DQ pair is gone; the weight's DQ is folded (it only carries the int8
    # weight's bytes); the int8 conv reads the int8 activation and writes fp32
    costed = {op.name: op for op in cost.ops if op.flops or op.bytes_moved}
    assert sorted(op.op_type for op in costed.values()) == ["Conv", "DequantizeLinear"]
    conv = next(op for op in costed.values() if op.op_type == "Conv")
    assert conv.precision == "int8"
    assert conv.bytes_moved == 3 * 8 * 8 + 4 * 4 * 6 * 6
    assert sum(op.flops for op in costed.values()) == conv.flops


def test_op_classes_split_dense_and_depthwise_convolutions(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "wd"], ["d"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "wp"], ["p"]),
        helper.make_node("Sigmoid", ["p"], ["s"]),
        helper.make_node("Mul", ["p", "s"], ["y"]),
    ]
    path = _contrib_model(
        tmp_path,
        "classes",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [_w("wd", (4, 1, 3, 3)), _w("wp", (8, 4, 1, 1))],
    )
    classes = [(op.op_type, op.op_class) for op in count_flops(path).ops]
    assert classes == [
        ("Conv", "dwconv"),
        ("Conv", "conv"),
        ("Sigmoid", "elementwise"),
        ("Mul", "elementwise"),
    ]
    est = estimate_latency(path, "rpi4b")
    assert set(est.class_ms) == {"dwconv", "conv", "elementwise", "overhead"}
    assert sum(est.class_ms.values()) == pytest.approx(est.estimate_ms)
