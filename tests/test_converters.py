"""Converters: torch → ONNX, ONNX → optimized ONNX, torch → TFLite, with parity and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgefleet.agent.core.registry import UnknownPluginError  # noqa: E402
from edgefleet.converters import (  # noqa: E402
    CONVERTERS,
    ConversionError,
    ParityError,
    ParityTolerance,
    check_parity,
    compare_outputs,
)
from edgefleet.converters.runners import named_feeds, open_runner  # noqa: E402


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, np.ndarray]) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny.onnx"
    CONVERTERS.get("torch-onnx")().convert(tiny_cnn(), out, samples)
    return out


def test_compare_outputs_identical_and_flipped() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    same = compare_outputs(ref, ref.copy())
    assert same.max_abs_err == 0.0
    assert same.agreement == 1.0
    assert same.fidelity == pytest.approx(1.0)
    flipped = compare_outputs(ref, ref[:, ::-1])
    assert flipped.agreement == 0.0
    assert flipped.fidelity_min < 0.8


def test_compare_outputs_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)))


def test_check_parity_names_every_broken_limit() -> None:
    report = compare_outputs(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    with pytest.raises(ParityError, match="top-1 agreement") as info:
        check_parity(report, ParityTolerance(), "test")
    assert "max abs error" in str(info.value)
    assert info.value.report is report


def test_unknown_converter_lists_known_names() -> None:
    with pytest.raises(UnknownPluginError, match="torch-onnx"):
        CONVERTERS.get("torch-coreml")


def test_torch_onnx_parity_and_dynamic_batch(onnx_file: Path, samples: dict[str, np.ndarray]) -> None:
    # prepare
    runner = open_runner(onnx_file)
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    # act
    got = runner.run({"input": x})[0]
    # assert: a batch size other than the traced one runs and matches torch
    with torch.no_grad():
        want = tiny_cnn()(torch.from_numpy(x)).numpy()
    assert runner.inputs[0].shape[0] is None
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_torch_onnx_reports_parity(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    result = CONVERTERS.get("torch-onnx")(opset=18).convert(tiny_cnn(), tmp_path / "m.onnx", samples)
    assert result.parity.agreement == 1.0
    assert result.parity.max_abs_err < 1e-5
    assert result.details["opset"] == 18
    assert result.inputs[0].name == "input"


def test_torch_onnx_unsupported_operator_is_a_clear_error(tmp_path: Path) -> None:
    class Bessel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(x)

    with pytest.raises(ConversionError, match="bessel_j0.*not supported"):
        CONVERTERS.get("torch-onnx")().convert(
            Bessel(), tmp_path / "b.onnx", {"x": np.ones((2, 3), np.float32)}
        )
    assert not (tmp_path / "b.onnx").exists()


def test_torch_onnx_parity_break_fails_and_leaves_no_file(tmp_path: Path) -> None:
    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    with pytest.raises(ParityError, match="no longer match"):
        CONVERTERS.get("torch-onnx")().convert(
            Noisy(), tmp_path / "n.onnx", {"x": np.ones((4, 5), np.float32)}
        )
    assert not (tmp_path / "n.onnx").exists()


def test_torch_onnx_rejects_old_opset(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    with pytest.raises(ConversionError, match="opset 13 is too old"):
        CONVERTERS.get("torch-onnx")(opset=13).convert(tiny_cnn(), tmp_path / "m.onnx", samples)


def test_onnx_optimize_keeps_parity(onnx_file: Path, samples: dict[str, np.ndarray], tmp_path: Path) -> None:
    result = CONVERTERS.get("onnx-optimize")().convert(onnx_file, tmp_path / "opt.onnx", samples)
    assert result.path.is_file()
    assert result.parity.max_abs_err < 1e-5
    got = open_runner(result.path).run(samples)[0]
    want = open_runner(onnx_file).run(samples)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_onnx_optimize_rejects_unknown_level(
    onnx_file: Path, samples: dict[str, np.ndarray], tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match="unknown ort_level 'all'"):
        CONVERTERS.get("onnx-optimize")(ort_level="all").convert(onnx_file, tmp_path / "o.onnx", samples)


def test_runner_rejects_corrupt_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf")
    with pytest.raises(ConversionError, match="cannot load"):
        open_runner(bad)


@pytest.mark.tflite
def test_torch_tflite_parity_and_fixed_batch(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    pytest.importorskip("litert_torch")
    # act
    result = CONVERTERS.get("torch-tflite")(batch_size=4).convert(tiny_cnn(), tmp_path / "m.tflite", samples)
    # assert: batch baked in, yet the runner serves 5 samples by chunking and padding
    assert result.fixed_batch == 4
    assert result.parity.agreement == 1.0
    runner = open_runner(result.path)
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    got = runner.run(named_feeds(runner, {"input": x}))[0]
    with torch.no_grad():
        want = tiny_cnn()(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_torch_onnx_auto_measures_both_exporters(tmp_path: Path, samples: dict[str, np.ndarray]) -> None:
    # act
    result = CONVERTERS.get("torch-onnx")(exporter="auto").convert(tiny_cnn(), tmp_path / "m.onnx", samples)
    # assert: both exporters were timed, the faster one kept, no leftovers
    timings = result.details["exporter_ms"]
    assert set(timings) == {"torchscript", "dynamo"}
    assert result.details["exporter"] == min(timings, key=lambda k: timings[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert result.parity.max_abs_err < 1e-5
