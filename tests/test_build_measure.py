"""Host measurement: latency percentiles at a batch size, accuracy and fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.sdk.build.measure import (  # noqa: E402
    batch_feeds,
    evaluate,
    measure_latency,
    measure_side_by_side,
    run_model,
)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    path = tmp_path_factory.mktemp("measure") / "lin.onnx"
    CONVERTERS.get("torch-onnx")().convert(net, path, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    return path


def test_latency_at_batch_size(onnx_file: Path) -> None:
    x = {"input": np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)}
    stats = measure_latency(onnx_file, x, batch_size=8, threads=1, runs=20, min_seconds=0.0)
    assert stats.batch_size == 8
    assert stats.runs >= 20
    assert 0 < stats.p50_ms <= stats.p95_ms


def test_batch_feeds_repeats_rows_to_fill_a_batch() -> None:
    feeds = batch_feeds({"x": np.arange(3)}, 7)
    assert feeds["x"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert batch_feeds({"x": np.arange(10)}, 4)["x"].tolist() == [0, 1, 2, 3]


def test_accuracy_against_labels(onnx_file: Path) -> None:
    x = {"input": np.random.default_rng(1).random((300, 1, 8, 8), dtype=np.float32)}
    outputs = run_model(onnx_file, x)
    predicted = outputs[0].argmax(1)
    wrong = (predicted + 1) % 10
    labels = np.where(np.arange(300) < 150, predicted, wrong)
    quality = evaluate(outputs, labels=labels)
    assert quality.metric == "accuracy"
    assert quality.value == pytest.approx(0.5)


def test_fidelity_without_labels() -> None:
    ref = [np.array([[1.0, 0.0], [0.0, 1.0]])]
    same = evaluate([ref[0].copy()], reference=ref)
    assert same.metric == "fidelity" and same.value == pytest.approx(1.0)
    swapped = evaluate([ref[0][:, ::-1]], reference=ref)
    assert swapped.value == pytest.approx(0.0)
    assert swapped.detail["agreement"] == 0.0
    with pytest.raises(ValueError, match="labels or reference"):
        evaluate(ref)


def test_side_by_side_ranks_a_much_heavier_model_slower(onnx_file: Path, tmp_path: Path) -> None:
    # prepare: the same input, ~2,000× the arithmetic
    torch.manual_seed(0)
    heavy_net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.Linear(1024, 10),
    ).eval()
    heavy = tmp_path / "heavy.onnx"
    CONVERTERS.get("torch-onnx")().convert(heavy_net, heavy, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    x = {"input": np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)}
    # act
    light_stats, heavy_stats = measure_side_by_side(
        onnx_file, heavy, x, batch_size=16, runs=30, min_seconds=0.0
    )
    # assert
    assert light_stats.runs == heavy_stats.runs >= 30
    assert heavy_stats.p50_ms > light_stats.p50_ms
