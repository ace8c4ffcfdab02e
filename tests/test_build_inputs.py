"""Bad input to `build`: every kind gets a clear error, and nothing half-written is left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from build_support import FakeProfile  # noqa: E402

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.sdk.build.builder import build  # noqa: E402
from edgefleet.sdk.build.errors import BudgetError, BuildError, DataError, ModelLoadError, ProfileError  # noqa: E402
from edgefleet.sdk.build.model_io import load_dataset, load_model, parse_input_shape  # noqa: E402
from edgefleet.sdk.build.plan import PlanOptions  # noqa: E402

FAST = PlanOptions(prune_levels=(), mixed_precision=False, tflite=False, static_calibrations=("minmax",))


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    ).eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "net.onnx"
    CONVERTERS.get("torch-onnx")().convert(small_net(), path, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    return path


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)


def test_corrupt_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(bad)


def test_truncated_onnx_file(onnx_file: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(cut)


def test_truncated_torchscript_file(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.trace(small_net(), torch.zeros(1, 1, 8, 8)), str(full))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert load_model(full).stage == "torch"
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(cut)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save(small_net(), str(path))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(path)


def test_exported_program_loads_with_input_specs(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(small_net(), (torch.zeros(2, 1, 8, 8),)), str(path))
    dynamic = tmp_path / "dynamic.pt2"
    torch.export.save(
        torch.export.export(
            small_net(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        ),
        str(dynamic),
    )
    loaded = load_model(path)
    assert loaded.stage == "torch"
    assert (loaded.kind, loaded.static_batch) == ("exported", 2)
    assert loaded.inputs[0].shape == (2, 1, 8, 8)
    loaded = load_model(dynamic)
    assert (loaded.kind, loaded.static_batch) == ("exported", None)
    assert loaded.inputs[0].shape == (None, 1, 8, 8)


def test_missing_empty_and_unknown_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is empty"):
        load_model(tmp_path / "empty.onnx")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="cannot tell the format"):
        load_model(tmp_path / "model.h5")


def test_npz_without_x(tmp_path: Path, onnx_file: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="'x'"):
        build(onnx_file, FakeProfile(), eval=path, plan=FAST)
    empty = tmp_path / "labels_only.npz"
    np.savez(empty, y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="no array 'x'"):
        load_dataset(empty, "eval")


def test_npz_that_is_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(path, "calibration")


def test_data_shape_mismatch_onnx(onnx_file: Path) -> None:
    with pytest.raises(DataError, match=r"expects \(N, 1, 8, 8\) \(dimension 2 differs\)"):
        build(onnx_file, FakeProfile(), eval=np.zeros((4, 1, 7, 8), np.float32), plan=FAST)
    with pytest.raises(DataError, match="expects"):
        build(onnx_file, FakeProfile(), eval=np.zeros((4, 64), np.float32), plan=FAST)


def test_data_dtype_mismatch_onnx(onnx_file: Path) -> None:
    with pytest.raises(DataError, match="dtype <U1"):
        build(onnx_file, FakeProfile(), eval=np.full((4, 1, 8, 8), "a"), plan=FAST)


def test_data_shape_mismatch_torch(data: np.ndarray) -> None:
    with pytest.raises(DataError, match="does not accept the calibration data"):
        build(small_net(), FakeProfile(), calib=np.zeros((4, 3, 8, 8), np.float32), plan=FAST)


def test_labels_that_do_not_fit(data: np.ndarray) -> None:
    with pytest.raises(DataError, match="one integer per sample"):
        load_dataset((data, np.zeros(5, np.int64)), "eval")
    with pytest.raises(DataError, match="must be integers"):
        load_dataset((data, np.zeros(len(data), np.float32)), "eval")


def test_unknown_profile(data: np.ndarray) -> None:
    with pytest.raises(ProfileError, match="nosuch"):
        build(small_net(), "nosuch-board", eval=data, plan=FAST)


def test_no_data_and_no_shape(onnx_file: Path) -> None:
    with pytest.raises(DataError, match="--input-shape"):
        build(onnx_file, FakeProfile(), plan=FAST)


def test_input_shape_alone_builds_on_random_data(onnx_file: Path) -> None:
    result = build(
        onnx_file, FakeProfile(), input_shape=parse_input_shape("1,1,8,8"), plan=FAST, latency_runs=5
    )
    assert result.baseline.quality is not None and result.baseline.quality.metric == "fidelity"


def test_bad_input_shape_text() -> None:
    with pytest.raises(DataError, match="list of integers"):
        parse_input_shape("1,a,8")
    with pytest.raises(DataError, match="positive"):
        parse_input_shape("1,0,8")


def test_budget_nobody_meets_leaves_no_bundle(onnx_file: Path, data: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    tiny = FakeProfile(max_model_mb=0.001)
    with pytest.raises(BudgetError, match="closest candidates") as info:
        build(onnx_file, tiny, eval=data, out=out, plan=FAST, latency_runs=5, private_key=object())
    assert "profile limit" in str(info.value)
    assert info.value.candidates
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unsupported_operator_fails_the_baseline_clearly() -> None:
    class Bessel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(x)

    with pytest.raises(BuildError, match=r"fp32 baseline \(onnx-fp32\) failed.*bessel_j0"):
        build(Bessel(), FakeProfile(), eval=np.ones((4, 3), np.float32), plan=FAST)


def test_accuracy_budget_out_of_range(data: np.ndarray) -> None:
    with pytest.raises(BuildError, match="max-accuracy-drop"):
        build(small_net(), FakeProfile(), eval=data, max_accuracy_drop=5.0)


def test_failing_candidate_is_reported_and_search_goes_on(
    onnx_file: Path, data: np.ndarray, monkeypatch: Any
) -> None:
    from edgefleet.sdk.compress import ort_quant

    def broken(self: Any, model: Any, ctx: Any) -> Any:
        raise ort_quant.CompressionError("simulated quantizer crash")

    monkeypatch.setattr(ort_quant.OrtDynamicInt8, "apply", broken)
    result = build(onnx_file, FakeProfile(), eval=data, plan=FAST, latency_runs=5, isolate=False)
    failed = next(c for c in result.candidates if c.id == "onnx-int8-dynamic")
    assert failed.status == "failed"
    assert "simulated quantizer crash" in failed.reason
    assert any(c.status == "ok" for c in result.candidates)
