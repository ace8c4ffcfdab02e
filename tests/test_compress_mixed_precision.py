"""ONNX per-node sensitivity and the sensitivity-driven mixed INT8/fp32 plan, on a tiny crafted graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.sdk.compress import COMPRESSORS, CompressionContext, CompressionError
from edgefleet.sdk.compress.mixed_precision import mixed_precision_int8
from edgefleet.sdk.compress.onnx_fakequant import FakeQuantGraph, make_session, run_session
from edgefleet.sdk.compress.sensitivity import onnx_sensitivity


def two_path_model(path: Path) -> Path:
    """y = (x·c) @ W_out + x @ W_in: c blows channel 0 up 300× but W_out ignores that channel, so
    per-tensor INT8 of `fragile`'s input wipes out the small channels it relies on; `sturdy` sees x."""
    rng = np.random.default_rng(0)
    c = np.ones(16, np.float32)
    c[0] = 300.0
    w_fragile = rng.normal(size=(16, 8)).astype(np.float32)
    w_fragile[0] = 0.0
    w_sturdy = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["xc"], name="scale"),
        helper.make_node("MatMul", ["xc", "w_fragile"], ["a"], name="fragile"),
        helper.make_node("MatMul", ["x", "w_sturdy"], ["b"], name="sturdy"),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_paths",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [
            numpy_helper.from_array(c, "c"),
            numpy_helper.from_array(w_fragile, "w_fragile"),
            numpy_helper.from_array(w_sturdy, "w_sturdy"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def batches(n: int, seed: int, size: int = 4) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    return [{"x": x[i : i + size]} for i in range(0, n, size)]


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    return two_path_model(tmp_path / "two_paths.onnx")


def test_simulated_int8_matches_onnxruntime_quantization(model_path: Path, tmp_path: Path) -> None:
    # prepare
    from edgefleet.sdk.compress.mixed_precision import quantize_dynamic_per_channel

    feeds = {"x": np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)}
    graph = FakeQuantGraph.load(model_path)
    # act
    simulated = graph.run({"fragile", "sturdy"}, feeds)[0]
    real_path = quantize_dynamic_per_channel(model_path, tmp_path / "q.onnx")
    real = run_session(make_session(real_path), feeds)[0]
    # assert
    assert set(graph.quantizable_nodes()) == {"fragile", "sturdy"}
    np.testing.assert_allclose(simulated, real, rtol=1e-3, atol=1e-3)


def test_node_that_hurts_more_ranks_higher(model_path: Path) -> None:
    table = onnx_sensitivity(model_path, batches(64, 2))
    assert table.ranking() == ["fragile", "sturdy"]
    scores = table.scores()
    assert scores["fragile"] < 10 * scores["sturdy"] < 0  # S = −(1 − cosine): more harm, more negative


def test_mixed_precision_keeps_only_the_sensitive_node_fp32(model_path: Path, tmp_path: Path) -> None:
    # act
    result = mixed_precision_int8(
        model_path,
        tmp_path / "mixed.onnx",
        batches(64, 3),
        batches(64, 4),
        min_mean_cosine=0.999,
        min_cosine=0.995,
        smoothing=False,
    )
    # assert
    assert result.excluded == ["fragile"]
    assert result.budget_met and result.min_cosine >= 0.995
    ops = {node.name: node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert ops["fragile"] == "MatMul"  # kept fp32
    assert "MatMulInteger" in ops.values()  # sturdy was quantized
    assert result.trace[0]["kept_fp32"] == [] and result.trace[0]["simulated_min_cosine"] < 0.995
    assert not list(tmp_path.glob("*.partial"))


def test_smoothing_fixes_the_outlier_channel_instead_of_keeping_fp32(
    model_path: Path, tmp_path: Path
) -> None:
    result = mixed_precision_int8(
        model_path,
        tmp_path / "mixed.onnx",
        batches(64, 3),
        batches(64, 4),
        min_mean_cosine=0.999,
        min_cosine=0.995,
    )
    assert "xc" in result.smoothed  # the activation `fragile` reads
    assert result.excluded == [] and result.budget_met
    ops = [node.op_type for node in onnx.load(str(result.path)).graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("Mul") >= 2
    assert not list(tmp_path.glob("*smoothed-fp32*"))  # the temporary fp32 graph is gone


def test_smoothing_leaves_fp32_outputs_unchanged(model_path: Path) -> None:
    from edgefleet.sdk.compress.smoothing import activation_absmax, activation_groups, smooth

    model = onnx.load(str(model_path))
    groups = activation_groups(model)
    assert groups == {"xc": ["fragile"], "x": ["sturdy"]}
    feeds = batches(16, 8, size=16)
    smoothed = smooth(model, groups, activation_absmax(model, feeds, list(groups)))
    before = run_session(make_session(model.SerializeToString()), feeds[0])[0]
    after = run_session(make_session(smoothed.SerializeToString()), feeds[0])[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert sum(node.op_type == "Mul" for node in smoothed.graph.node) == 3


def test_unreachable_budget_returns_the_closest_plan_marked_unmet(model_path: Path, tmp_path: Path) -> None:
    result = mixed_precision_int8(
        model_path, tmp_path / "m.onnx", batches(16, 5), batches(16, 6), min_mean_cosine=1.01, smoothing=False
    )
    assert not result.budget_met
    assert len(result.trace) == 3  # all-INT8, then one and two nodes kept fp32
    assert result.path.exists()


def test_mixed_precision_step(model_path: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(7).normal(size=(32, 16)).astype(np.float32)
    ctx = CompressionContext(workdir=tmp_path / "work", calib={"x": x}, eval_inputs={"x": x})
    step = COMPRESSORS.get("mixed-int8")(
        min_mean_cosine=0.999, min_cosine=0.99, batch_size=8, smoothing=False
    )
    out = step.apply(model_path, ctx)
    assert Path(out).parent == tmp_path / "work"
    assert step.describe()["result"]["excluded"] == ["fragile"]


def test_bad_inputs_raise_clear_errors(model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model_path.read_bytes()[:50])
    with pytest.raises(CompressionError, match="not a readable ONNX model"):
        onnx_sensitivity(broken, batches(4, 0))
    with pytest.raises(CompressionError, match="does not exist"):
        onnx_sensitivity(tmp_path / "missing.onnx", batches(4, 0))
    with pytest.raises(CompressionError, match="lacks model inputs"):
        onnx_sensitivity(model_path, [{"wrong": np.zeros((1, 16), np.float32)}])
    with pytest.raises(CompressionError, match="cannot run"):
        onnx_sensitivity(model_path, [{"x": np.zeros((1, 5), np.float32)}])
    with pytest.raises(CompressionError, match="size limit"):
        mixed_precision_int8(
            model_path, tmp_path / "o.onnx", batches(4, 0), batches(4, 1), max_size_ratio=0.01
        )
    with pytest.raises(CompressionError, match="calibration"):
        mixed_precision_int8(model_path, tmp_path / "o.onnx", [], batches(4, 1))
    assert not (tmp_path / "o.onnx").exists()
