"""TFLite quantization plug-ins (litert-torch): dynamic-range INT8, FP16 and full INT8 keep accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from edgefleet.agent.core.runtimes.tflite import TfliteRuntime
from edgefleet.converters.runners import named_feeds, open_runner
from edgefleet.sdk.compress import COMPRESSORS, CompressionContext, CompressionError
from edgefleet.sdk.compress import tflite_quant as _registers  # noqa: F401
from edgefleet.sdk.zoo import accuracy, trained_digits_cnn

pytestmark = [pytest.mark.tflite, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained() -> tuple[Any, Any, float]:
    model, split = trained_digits_cnn(epochs=15)
    return model, split, accuracy(model, split.x_test, split.y_test)


def _tflite_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    runner = open_runner(path)
    logits = runner.run(named_feeds(runner, {"x": x}))[0]
    return float(np.mean(logits.argmax(1) == y))


@pytest.mark.parametrize(
    ("step", "max_drop"), [("tflite-dynamic", 0.01), ("tflite-fp16", 0.005), ("tflite-int8", 0.02)]
)
def test_tflite_quantization_keeps_accuracy(
    trained: tuple[Any, Any, float], tmp_path: Path, step: str, max_drop: float
) -> None:
    # prepare
    model, split, fp32_acc = trained
    ctx = CompressionContext(workdir=tmp_path, calib={"input": split.x_train})
    # act
    path = COMPRESSORS.get(step)(batch_size=4).apply(model, ctx)
    # assert: a real TFLite file with the batch baked in, accuracy within the step's tolerance
    runner = open_runner(path)
    assert runner.fixed_batch == 4
    assert fp32_acc - _tflite_accuracy(path, split.x_test, split.y_test) <= max_drop


def test_full_int8_has_integer_io_and_quarter_size(trained: tuple[Any, Any, float], tmp_path: Path) -> None:
    model, split, _ = trained
    ctx = CompressionContext(workdir=tmp_path, calib={"input": split.x_train})
    int8 = COMPRESSORS.get("tflite-int8")().apply(model, ctx)
    runtime = open_runner(int8)
    assert isinstance(runtime, TfliteRuntime)
    details = runtime.tensor_details()["inputs"][0]
    assert np.dtype(details["dtype"]) == np.int8
    # callers see float32: the runtime quantizes inputs and dequantizes outputs itself
    assert runtime.inputs[0].dtype == "float32"
    assert runtime.outputs[0].dtype == "float32"
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert int8.stat().st_size < 0.5 * fp32_bytes


def test_tflite_quantization_without_calibration_is_a_clear_error(
    trained: tuple[Any, Any, float], tmp_path: Path
) -> None:
    model, _, _ = trained
    with pytest.raises(CompressionError, match="--calib"):
        COMPRESSORS.get("tflite-int8")().apply(model, CompressionContext(workdir=tmp_path))
