"""onnxruntime quantization plug-ins: dynamic INT8, static QDQ INT8 (3 calibrations), FP16, exclusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgefleet.converters import CONVERTERS, compare_outputs  # noqa: E402
from edgefleet.converters.runners import open_runner  # noqa: E402
from edgefleet.sdk.compress import (  # noqa: E402
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    ort_quant,  # noqa: F401  (registers the plug-ins)
)


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory, data: np.ndarray) -> Path:
    out = tmp_path_factory.mktemp("q") / "net.onnx"
    CONVERTERS.get("torch-onnx")().convert(small_net(), out, {"input": data[:8]})
    return out


@pytest.fixture
def ctx(tmp_path: Path, data: np.ndarray) -> CompressionContext:
    return CompressionContext(workdir=tmp_path, calib={"input": data})


def _fidelity(fp32: Path, quant: Path, data: np.ndarray) -> float:
    ref = open_runner(fp32).run({"input": data})[0]
    got = open_runner(quant).run({"input": data})[0]
    return compare_outputs(ref, got).fidelity_min


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_dynamic_int8_shrinks_and_stays_close(
    fp32_model: Path, ctx: CompressionContext, data: np.ndarray
) -> None:
    # act
    out = COMPRESSORS.get("ort-dynamic-int8")().apply(fp32_model, ctx)
    # assert
    assert out.stat().st_size < 0.4 * fp32_model.stat().st_size
    assert "MatMulInteger" in _op_types(out) or "DynamicQuantizeLinear" in _op_types(out)
    assert _fidelity(fp32_model, out, data) > 0.99


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_qdq_each_calibration(
    fp32_model: Path, ctx: CompressionContext, data: np.ndarray, calibration: str
) -> None:
    out = COMPRESSORS.get("ort-static-int8")(calibration=calibration).apply(fp32_model, ctx)
    ops = _op_types(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert _fidelity(fp32_model, out, data) > 0.98


def test_static_int8_excluded_node_stays_fp32(fp32_model: Path, ctx: CompressionContext) -> None:
    # prepare: the first convolution's name in the exported graph
    conv = next(n.name for n in onnx.load(str(fp32_model)).graph.node if n.op_type == "Conv")
    # act
    full = COMPRESSORS.get("ort-static-int8")().apply(fp32_model, ctx)
    partial = COMPRESSORS.get("ort-static-int8")(nodes_to_exclude=[conv]).apply(fp32_model, ctx)

    # assert: only the partial graph still feeds the convolution a plain float weight
    def conv_weight_is_initializer(path: Path) -> bool:
        model = onnx.load(str(path))
        inits = {i.name for i in model.graph.initializer}
        node = next(n for n in model.graph.node if n.op_type == "Conv")
        return node.input[1] in inits

    assert conv_weight_is_initializer(partial)
    assert not conv_weight_is_initializer(full)


def test_fp16_halves_weights_and_keeps_fp32_io(
    fp32_model: Path, ctx: CompressionContext, data: np.ndarray
) -> None:
    out = COMPRESSORS.get("ort-fp16")().apply(fp32_model, ctx)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert out.stat().st_size < 0.6 * fp32_model.stat().st_size
    assert _fidelity(fp32_model, out, data) > 0.999


def test_static_without_calibration_data_is_a_clear_error(fp32_model: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="--calib"):
        COMPRESSORS.get("ort-static-int8")().apply(fp32_model, CompressionContext(workdir=tmp_path))


def test_static_with_wrong_rank_calibration_is_a_clear_error(fp32_model: Path, tmp_path: Path) -> None:
    ctx = CompressionContext(workdir=tmp_path, calib={"input": np.zeros((4, 8, 8), np.float32)})
    with pytest.raises(CompressionError, match="expects rank 4"):
        COMPRESSORS.get("ort-static-int8")().apply(fp32_model, ctx)


def test_unknown_calibration_method(fp32_model: Path, ctx: CompressionContext) -> None:
    with pytest.raises(CompressionError, match="unknown calibration 'kl'"):
        COMPRESSORS.get("ort-static-int8")(calibration="kl").apply(fp32_model, ctx)


def test_quantizing_a_non_onnx_input_is_a_clear_error(ctx: CompressionContext, tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="convert the model first"):
        COMPRESSORS.get("ort-dynamic-int8")().apply(tmp_path / "model.pt", ctx)


def test_outputs_of_different_parameters_do_not_collide(fp32_model: Path, ctx: CompressionContext) -> None:
    a = COMPRESSORS.get("ort-static-int8")(calibration="minmax").apply(fp32_model, ctx)
    b = COMPRESSORS.get("ort-static-int8")(calibration="percentile").apply(fp32_model, ctx)
    assert a != b
    assert a.is_file()
    assert b.is_file()
