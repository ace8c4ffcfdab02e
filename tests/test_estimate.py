"""The latency estimator: FLOPs and bytes of tiny models counted by hand, and the roofline arithmetic."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.device_profiles import Profile, load_profile
from edgefleet.sdk.build.estimate import EstimateError, count_flops, estimate_latency


def _save(
    tmp_path: Path, name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]
) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _init(name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def conv_model(tmp_path: Path) -> Path:
    """X[N,3,8,8] * W[4,3,3,3] + B[4] → Y[N,4,6,6], batch dynamic."""
    return _save(
        tmp_path,
        "conv",
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [_init("w", (4, 3, 3, 3)), _init("b", (4,))],
    )


def gemm_relu_model(tmp_path: Path) -> Path:
    """Gemm A[N,16]·B[16,8] + C[8] → Relu; the two ops share nothing but the activation."""
    return _save(
        tmp_path,
        "gemm",
        [helper.make_node("Gemm", ["a", "w", "c"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("w", (16, 8)), _init("c", (8,))],
    )


def unit_profile(**changes: Any) -> Profile:
    """rpi4b with round figures: 1 GFLOP/s on 4 threads, 1 GB/s, int8 2x, fp16 supported at 4x, efficiency 1."""
    base = load_profile("rpi4b")
    fields: dict[str, Any] = {
        "efficiency": {"conv": 1.0, "dwconv": 1.0, "matmul": 1.0, "elementwise": 1.0, "gpu": 1.0},
        "sustained_gflops": 1.0,
        "mem_bandwidth_gbs": 1.0,
        "int8_speedup": 2.0,
        "fp16_speedup": 4.0,
        "precisions": ("fp32", "fp16", "int8"),
        "threads": 4,
    }
    fields.update(changes)
    return dataclasses.replace(base, **fields)


def test_conv_flops_and_bytes_counted_by_hand(tmp_path: Path) -> None:
    # prepare
    path = conv_model(tmp_path)
    n = 2
    # act
    cost = count_flops(path, batch_size=n)
    # assert: 2 FLOPs per MAC over Cin·k·k = 27 MACs per output, plus one bias add per output
    outputs = n * 4 * 6 * 6
    assert cost.flops == 2 * outputs * 27 + outputs
    assert cost.bytes_moved == 4 * (n * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 4 + outputs)
    assert cost.batch_size == n
    assert [op.op_type for op in cost.ops] == ["Conv"]


def test_gemm_relu_flops_and_bytes_counted_by_hand(tmp_path: Path) -> None:
    path = gemm_relu_model(tmp_path)
    cost = count_flops(path, batch_size=3)
    gemm, relu = cost.ops
    assert gemm.flops == 2 * 3 * 16 * 8 + 3 * 8
    assert gemm.bytes_moved == 4 * (3 * 16 + 16 * 8 + 8 + 3 * 8)
    assert relu.flops == 3 * 8
    assert relu.bytes_moved == 4 * (3 * 8 + 3 * 8)


def test_roofline_arithmetic_on_a_known_model(tmp_path: Path) -> None:
    # prepare: 1 GFLOP/s → FLOPs / 1e6 ms; 1 GB/s → bytes / 1e6 ms
    path = gemm_relu_model(tmp_path)
    profile = unit_profile()
    # act
    est = estimate_latency(path, profile, batch_size=3, op_overhead_us=0.0)
    # assert
    gemm_c, gemm_m = (2 * 3 * 16 * 8 + 24) / 1e6, 4 * (48 + 128 + 8 + 24) / 1e6
    relu_c, relu_m = 24 / 1e6, 4 * 48 / 1e6
    assert est.compute_ms == pytest.approx(gemm_c + relu_c)
    assert est.memory_ms == pytest.approx(gemm_m + relu_m)
    assert est.estimate_ms == pytest.approx(max(gemm_c, gemm_m) + max(relu_c, relu_m))
    assert est.bound == "memory"  # 4 bytes per FLOP at 1 FLOP/byte machine balance
    assert est.flops == 2 * 3 * 16 * 8 + 24 + 24


def test_per_op_overhead_is_added_per_executed_op(tmp_path: Path) -> None:
    path = gemm_relu_model(tmp_path)
    profile = unit_profile(clock_ghz=2.0)
    without = estimate_latency(path, profile, batch_size=1, op_overhead_us=0.0)
    with_overhead = estimate_latency(path, profile, batch_size=1, op_overhead_us=5.0)
    assert with_overhead.overhead_ms == pytest.approx(2 * 0.005)
    assert with_overhead.estimate_ms == pytest.approx(without.estimate_ms + 0.01)


def test_fewer_threads_means_less_compute(tmp_path: Path) -> None:
    path = conv_model(tmp_path)
    four = estimate_latency(path, unit_profile(threads=4), batch_size=1, op_overhead_us=0.0)
    one = estimate_latency(path, unit_profile(threads=1), batch_size=1, op_overhead_us=0.0)
    assert one.compute_ms == pytest.approx(4 * four.compute_ms)


def test_batch_defaults_to_the_profile_and_scales_flops(tmp_path: Path) -> None:
    path = conv_model(tmp_path)
    one = estimate_latency(path, unit_profile(batch_size=1))
    eight = estimate_latency(path, unit_profile(batch_size=8))
    assert one.batch_size == 1 and eight.batch_size == 8
    assert eight.flops == 8 * one.flops


def test_integer_matmul_uses_int8_throughput(tmp_path: Path) -> None:
    # prepare: MatMulInteger A[4,64] uint8 · B[64,32] int8 → int32
    path = _save(
        tmp_path,
        "mmi",
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 32])],
        [_init("b", (64, 32), np.int8)],
    )
    # act
    est = estimate_latency(path, unit_profile(), op_overhead_us=0.0)
    # assert: int8 runs 2x the fp32 rate on this profile
    flops = 2 * 4 * 64 * 32
    assert est.flops == flops
    assert est.compute_ms == pytest.approx(flops / 2.0 / 1e6)
    assert est.precision == "int8"
    assert est.bytes_moved == 4 * 64 + 64 * 32 + 4 * 4 * 32


def test_int8_on_a_device_without_int8_runs_at_fp32_rate(tmp_path: Path) -> None:
    path = conv_model(tmp_path)
    fp32 = estimate_latency(path, unit_profile(), precision="fp32", op_overhead_us=0.0)
    no_int8 = estimate_latency(path, unit_profile(precisions=("fp32",)), precision="int8", op_overhead_us=0.0)
    with_int8 = estimate_latency(path, unit_profile(), precision="int8", op_overhead_us=0.0)
    assert no_int8.compute_ms == pytest.approx(fp32.compute_ms)
    assert with_int8.compute_ms == pytest.approx(fp32.compute_ms / 2.0)


def test_qdq_conv_counts_as_int8_and_folds_weight_dequantization(tmp_path: Path) -> None:
    # prepare: x → Conv(x, DequantizeLinear(int8 w)) as a static QDQ export has it
    path = _save(
        tmp_path,
        "qdq",
        [
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [
            _init("wq", (4, 3, 3, 3), np.int8),
            numpy_helper.from_array(np.array(0.1, dtype=np.float32), "ws"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "wz"),
        ],
    )
    # act
    cost = count_flops(path)
    # assert
    dq, conv = cost.ops
    assert dq.flops == 0 and dq.bytes_moved == 108 + 4 + 1  # int8 weight, scale, zero point
    assert conv.precision == "int8" and conv.flops == 2 * 4 * 36 * 27
    assert conv.bytes_moved == 4 * (3 * 64 + 4 * 36)  # the folded weight is not read again


def test_shared_weight_is_read_once(tmp_path: Path) -> None:
    path = _save(
        tmp_path,
        "shared",
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [_init("w", (8, 8))],
    )
    first, second = count_flops(path).ops
    assert first.bytes_moved == 4 * (8 + 64 + 8)
    assert second.bytes_moved == 4 * (8 + 8)


def test_fp16_override_uses_fp16_rate_for_heavy_ops_only(tmp_path: Path) -> None:
    path = gemm_relu_model(tmp_path)
    fp32 = estimate_latency(path, unit_profile(), batch_size=64, op_overhead_us=0.0)
    fp16 = estimate_latency(path, unit_profile(), batch_size=64, precision="fp16", op_overhead_us=0.0)
    gemm_flops = 2 * 64 * 16 * 8 + 64 * 8
    relu_flops = 64 * 8
    assert fp16.compute_ms == pytest.approx(gemm_flops / 4.0 / 1e6 + relu_flops / 1e6)
    assert fp32.compute_ms == pytest.approx((gemm_flops + relu_flops) / 1e6)


def test_jetson_runs_onnx_on_the_gpu(tmp_path: Path) -> None:
    path = conv_model(tmp_path)
    jetson = dataclasses.replace(load_profile("jetson-orin-nano"), efficiency={"gpu": 1.0})
    est = estimate_latency(path, jetson, op_overhead_us=0.0)
    assert est.device == "gpu"
    assert jetson.gpu is not None
    assert est.compute_ms == pytest.approx(est.flops / (jetson.gpu.sustained_gflops * 1e9) * 1e3)
    assert estimate_latency(path, "rpi4b").device == "cpu"


def test_unbound_dynamic_dim_names_it(tmp_path: Path) -> None:
    path = _save(
        tmp_path,
        "seq",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [],
    )
    with pytest.raises(EstimateError, match="sequence"):
        count_flops(path)
    assert count_flops(path, batch_size=2, dims={"sequence": 5}).flops == 2 * 5 * 4


@pytest.mark.parametrize("name", ["model.pt", "absent.onnx"])
def test_unusable_model_files_raise_estimate_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".pt"):
        path.write_bytes(b"not a model")
    with pytest.raises(EstimateError, match=name):
        estimate_latency(path, "rpi4b")


def test_corrupt_onnx_raises_estimate_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EstimateError, match="broken.onnx"):
        count_flops(path)


def test_unknown_precision_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match="int4"):
        estimate_latency(conv_model(tmp_path), "rpi4b", precision="int4")


def _tflite(tmp_path: Path, quant: Optional[str]) -> Path:
    import torch
    from torch import nn

    litert_torch = pytest.importorskip("litert_torch")
    from edgefleet.converters.torch_tflite import quiet_litert

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    kwargs: dict[str, Any] = {}
    if quant == "dynamic":
        from litert_torch.generative.quantize import quant_recipes

        kwargs["quant_config"] = quant_recipes.full_dynamic_recipe()
    path = tmp_path / f"tiny-{quant or 'fp32'}.tflite"
    with quiet_litert():
        litert_torch.convert(model, (torch.randn(2, 3, 8, 8),), **kwargs).export(str(path))
    return path


@pytest.mark.tflite
@pytest.mark.slow
def test_tflite_flops_counted_by_hand(tmp_path: Path) -> None:
    # prepare
    path = _tflite(tmp_path, None)
    # act
    cost = count_flops(path)
    est = estimate_latency(path, unit_profile(), op_overhead_us=0.0)
    # assert
    by_type = {op.op_type: op for op in cost.ops}
    conv_out = 2 * 6 * 6 * 8
    assert by_type["CONV_2D"].flops == 2 * conv_out * 27 + conv_out
    assert by_type["FULLY_CONNECTED"].flops == 2 * 2 * 10 * 288 + 2 * 10
    assert by_type["CONV_2D"].precision == "fp32"
    assert (by_type["CONV_2D"].op_class, by_type["FULLY_CONNECTED"].op_class) == ("conv", "matmul")
    assert cost.batch_size == 2 and cost.format == "tflite"
    assert est.device == "cpu" and est.flops == cost.flops
    # weights are read once: conv 8·3·3·3 + 8 floats, fc 10·288 + 10 floats
    weights = 4 * (216 + 8 + 2880 + 10)
    assert cost.bytes_moved > weights


@pytest.mark.tflite
@pytest.mark.slow
def test_tflite_dynamic_range_model_runs_int8(tmp_path: Path) -> None:
    path = _tflite(tmp_path, "dynamic")
    est = estimate_latency(path, unit_profile(), op_overhead_us=0.0)
    heavy = [op for op in est.ops if op.heavy]
    assert heavy and all(op.precision == "int8" for op in heavy)
    assert est.precision == "int8"


def test_mixed_precision_keeps_each_ops_own_precision(tmp_path: Path) -> None:
    path = gemm_relu_model(tmp_path)
    mixed = estimate_latency(path, unit_profile(), precision="int8-mixed", op_overhead_us=0.0)
    graph = estimate_latency(path, unit_profile(), op_overhead_us=0.0)
    assert mixed.compute_ms == pytest.approx(graph.compute_ms)
    assert mixed.precision == "fp32"
