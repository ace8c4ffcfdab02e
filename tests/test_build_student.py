"""The build's distilled-student candidate (`--student`) and its per-layer sensitivity table."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from build_support import FakeProfile  # noqa: E402
from rich.console import Console  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgefleet.sdk.build.analysis import resolve_student  # noqa: E402
from edgefleet.sdk.build.builder import build  # noqa: E402
from edgefleet.sdk.build.errors import BuildError  # noqa: E402
from edgefleet.sdk.build.plan import PlanOptions, plan_candidates, source_limits  # noqa: E402
from edgefleet.sdk.cli.build import print_sensitivity  # noqa: E402
from edgefleet.sdk.zoo import digits_cnn, trained_digits_cnn  # noqa: E402

QUICK = PlanOptions(
    prune_levels=(), mixed_precision=False, tflite=False, static_calibrations=(), student_epochs=2
)


@pytest.fixture(scope="module")
def digits() -> tuple[Any, Any]:
    return trained_digits_cnn(epochs=5)


def _plan(student: Any, source: str = "module") -> list[str]:
    options = resolve_student(PlanOptions(student=student))  # registers the "student" step
    specs = plan_candidates("torch", runtimes=["onnxruntime"], precisions=["fp32", "int8"], has_calib=True,
                            options=options, source=source)  # fmt: skip
    return [s.id for s in specs]


def test_plan_has_student_candidates_only_when_asked() -> None:
    assert "student-onnx-fp32" in _plan("auto")
    assert "student-onnx-int8-dynamic" in _plan("auto")
    assert not any(i.startswith("student") for i in _plan(None))


def test_auto_student_needs_a_python_module_and_says_why() -> None:
    # a TorchScript teacher cannot be narrowed automatically; a .pt2 cannot be trained at all
    assert not any(i.startswith("student") for i in _plan("auto", source="torchscript"))
    limits = dict(source_limits("torchscript", "torch", ["onnxruntime"], PlanOptions(student="auto")))
    assert "--student STUDENT.pt" in limits["student-*"]
    limits = dict(source_limits("exported", "torch", ["onnxruntime"], PlanOptions(student="auto")))
    assert "cannot be" in limits["student-*"]


def test_build_distils_a_smaller_student_and_keeps_the_sensitivity_table(digits: tuple[Any, Any]) -> None:
    # prepare
    model, split = digits
    plan = replace(QUICK, student="auto", only=("student-onnx-fp32",))
    # act
    result = build(
        model, FakeProfile(precisions=("fp32",)), calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test), plan=plan, latency_runs=5, max_accuracy_drop=0.5,
    )  # fmt: skip
    # assert: the student was distilled, is smaller, and was measured like any candidate
    student = {c.id: c for c in result.candidates}["student-onnx-fp32"]
    assert student.status != "failed", student.reason
    step = next(s for s in student.steps if s.get("step") == "student")
    assert 0 < step["params_after"] < step["params_before"]
    assert student.size_bytes is not None and student.size_bytes < result.baseline.size_bytes  # type: ignore[operator]
    # the sensitivity table: every conv/linear layer, the formula and the perturbation used
    table = result.report["sensitivity"]
    assert table["formula"] == "S = (L − L_perturbed) / L"
    assert table["perturbation"] == "zero" and "θ_i = 0" in table["description"]
    layers = {row["layer"] for row in table["layers"]}
    assert layers == {
        n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }
    scores = [row["S"] for row in table["layers"]]
    assert scores == sorted(scores)  # most sensitive (lowest S) first


@pytest.mark.slow  # ten distillation epochs: about a minute on a shared 2-core host
def test_torchscript_student_file_is_trained(digits: tuple[Any, Any], tmp_path: Path) -> None:
    # prepare: an untrained student of the same shape, saved as TorchScript
    model, split = digits
    path = tmp_path / "student.pt"
    torch.jit.save(torch.jit.script(digits_cnn()), str(path))
    plan = replace(QUICK, student=str(path), only=("student-onnx-fp32",), student_epochs=10)
    # act
    result = build(
        model, FakeProfile(precisions=("fp32",)), calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test), plan=plan, latency_runs=5,
    )  # fmt: skip
    # assert: distilled (well above the untrained 10 % chance level) and measured
    student = {c.id: c for c in result.candidates}["student-onnx-fp32"]
    step = next(s for s in student.steps if s.get("step") == "student")
    assert step["result"]["epochs_run"] >= 1
    assert student.quality is not None and student.quality.value > 0.3, student.reason


def test_student_file_mistakes_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no such file"):
        build(tmp_path / "m.onnx", FakeProfile(), plan=PlanOptions(student=str(tmp_path / "missing.pt")))
    (tmp_path / "student.onnx").write_bytes(b"not a torch file")
    with pytest.raises(BuildError, match="not a TorchScript file"):
        build(tmp_path / "m.onnx", FakeProfile(), plan=PlanOptions(student=str(tmp_path / "student.onnx")))


def test_cli_student_option_reaches_the_build(tmp_path: Path) -> None:
    from edgefleet.sdk.cli import app

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = CliRunner().invoke(
        app, ["build", str(model), "--profile", "rpi4b", "--student", str(tmp_path / "nope.pt")]
    )
    assert result.exit_code != 0
    assert "--student" in result.output and "no such file" in result.output


def test_sensitivity_prints_as_plain_lines_in_a_pipe() -> None:
    # prepare: a report as a build writes it
    report = {
        "sensitivity": {
            "source": "build, on 8 calibration rows",
            "formula": "S = (L − L_perturbed) / L",
            "perturbation": "zero",
            "description": "every weight of the layer set to 0 (θ_i = 0)",
            "loss": "cross-entropy",
            "baseline_loss": 0.5,
            "layers": [
                {
                    "rank": 1,
                    "layer": "features.0",
                    "kind": "Conv2d",
                    "params": 144,
                    "loss_perturbed": 2.0,
                    "S": -3.0,
                },
                {
                    "rank": 2,
                    "layer": "head",
                    "kind": "Linear",
                    "params": 640,
                    "loss_perturbed": 0.6,
                    "S": -0.2,
                },
            ],
        }
    }
    buffer = io.StringIO()
    # act
    print_sensitivity(report, Console(file=buffer, width=60))
    # assert: title with the formula, one line per layer, the perturbation under it
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("per-layer sensitivity: S = (L − L_perturbed) / L")
    assert any(line.startswith("1  features.0") and line.endswith("-3") for line in lines)
    assert lines[-1].startswith("perturbation: every weight of the layer set to 0")


def test_sensitivity_missing_prints_why() -> None:
    buffer = io.StringIO()
    print_sensitivity(
        {"sensitivity": {"unavailable": "needs the model as a Python nn.Module"}}, Console(file=buffer)
    )
    assert "per-layer sensitivity: needs the model as a Python nn.Module" in buffer.getvalue()


def test_model_file_gets_the_onnx_node_table(tmp_path: Path) -> None:
    # prepare: an ONNX model file (no torch layers to perturb: its graph nodes are)
    import numpy as np

    from edgefleet.converters import CONVERTERS

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    ).eval()
    model = tmp_path / "net.onnx"
    CONVERTERS.get("torch-onnx")().convert(net, model, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    # act
    result = build(model, FakeProfile(precisions=("fp32",)), eval=x, plan=QUICK, latency_runs=5)
    # assert: one row per weight node, INT8 per node as the perturbation, computed in the worker
    table = result.report["sensitivity"]
    assert table["perturbation"] == "int8-dynamic-per-channel"
    assert {row["kind"] for row in table["layers"]} == {"Conv", "Gemm"}
    assert all(row["S"] <= 1e-6 for row in table["layers"])  # S = −(1 − cosine)
