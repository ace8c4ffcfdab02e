"""Every source a user brings (issue 13): what each can become, static batches, ties, releases, fast errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from build_support import FakeProfile  # noqa: E402

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.converters.runners import open_runner  # noqa: E402
from edgefleet.converters.torch_onnx import exported_batch, torch_outputs  # noqa: E402
from edgefleet.sdk.build import builder  # noqa: E402
from edgefleet.sdk.build.candidate import Candidate  # noqa: E402
from edgefleet.sdk.build.choose import choose  # noqa: E402
from edgefleet.sdk.build.errors import BuildError, DataError  # noqa: E402
from edgefleet.sdk.build.measure import MIN_RATIO_NOISE, LatencyStats, Quality, ratio_noise  # noqa: E402
from edgefleet.sdk.build.model_io import load_model, source_kind  # noqa: E402
from edgefleet.sdk.build.plan import CandidateSpec, PlanOptions, plan_candidates, source_limits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = PlanOptions(prune_levels=(), mixed_precision=False, static_calibrations=())


class Residual(torch.nn.Module):
    """A small residual CNN (a user's own model, not the zoo's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.block = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = Residual().eval()
    example = torch.zeros(4, 1, 8, 8)
    dynamic = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(root / "dynamic.pt2"))
    torch.export.save(torch.export.export(model, (example[:1],)), str(root / "batch1.pt2"))
    torch.jit.save(torch.jit.script(model), str(root / "model.pt"))
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32))
    np.savez(root / "eval.npz", x=rng.random((30, 1, 8, 8), dtype=np.float32))
    np.savez(root / "wide.npz", x=rng.random((30, 1, 9, 9), dtype=np.float32))
    from edgefleet.sdk.trust.keys import init_keys

    return {"root": root, "model": model, "key": init_keys(root / "keys").private_path}


# --- what each source can become ---------------------------------------------------------------


def test_source_kinds_are_told_apart_without_torch(sources: dict[str, Any]) -> None:
    root = sources["root"]
    assert source_kind(root / "dynamic.pt2") == "exported"
    assert source_kind(root / "model.pt") == "torchscript"
    assert load_model(root / "batch1.pt2").static_batch == 1
    assert load_model(root / "dynamic.pt2").static_batch is None
    assert load_model(root / "model.pt").kind == "torchscript"


def test_plan_gives_each_source_only_what_it_can_become() -> None:
    from edgefleet.sdk.build.plugins import load_plugins

    load_plugins()  # registers the pruning and TFLite plug-ins the plan looks up
    runtimes = ["onnxruntime", "tflite"]
    for source, prunes, tflite in (
        ("module", True, True),
        ("exported", False, True),
        ("torchscript", False, False),
    ):
        ids = {s.id for s in plan_candidates("torch", runtimes=runtimes, precisions=["fp32", "int8"],
                                             has_calib=True, source=source)}  # fmt: skip
        assert any(i.startswith("pruned") for i in ids) == prunes, source
        assert ("tflite-fp32" in ids) == (tflite and "tflite-fp32" in _module_ids()), source
    limits = dict(source_limits("torchscript", "torch", runtimes))
    assert "nn.Module" in limits["pruned*"] and "no convolution" not in limits["pruned*"]
    assert ".pt2" in limits["tflite-*"]
    assert dict(source_limits("tflite", "tflite", runtimes))["onnx-*"].startswith(
        "a .tflite file cannot become ONNX"
    )


def _module_ids() -> set[str]:
    return {
        s.id
        for s in plan_candidates(
            "torch", runtimes=["tflite"], precisions=["fp32"], has_calib=True, source="module"
        )
    }


def test_torchscript_to_tflite_is_refused_before_any_work(sources: dict[str, Any], tmp_path: Path) -> None:
    # prepare: a TFLite-only profile; any plug-in import would mean work started
    profile = FakeProfile(name="tfl", runtimes=("tflite-xnnpack",))
    with mock.patch.object(builder, "load_plugins", side_effect=AssertionError("work started")):
        # act
        with pytest.raises(BuildError) as caught:
            builder.build(
                sources["root"] / "model.pt", profile, calib=sources["root"] / "calib.npz", out=tmp_path / "o"
            )
        with pytest.raises(BuildError) as only:
            builder.build(
                sources["root"] / "model.pt", FakeProfile(runtimes=("onnxruntime-cpu", "tflite-xnnpack")),
                calib=sources["root"] / "calib.npz", plan=PlanOptions(only=("tflite-fp32",)),
            )  # fmt: skip
    # assert: both name the source that can, with the one-line re-export
    for message in (str(caught.value), str(only.value)):
        assert "cannot convert a TorchScript file to TFLite" in message
        assert "torch.export.export(model, (x,), dynamic_shapes=" in message


def test_only_with_an_id_no_profile_has_is_an_error(sources: dict[str, Any]) -> None:
    with pytest.raises(BuildError, match="no such candidate.*onnx-fp32-opt"):
        builder.build(
            sources["model"], FakeProfile(), calib=sources["root"] / "calib.npz",
            plan=PlanOptions(only=("onnx-fp23",)),
        )  # fmt: skip


# --- static batch -------------------------------------------------------------------------------


def test_static_batch_program_runs_any_number_of_rows(sources: dict[str, Any]) -> None:
    program = torch.export.load(str(sources["root"] / "batch1.pt2"))
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    assert exported_batch(program) == 1
    [got] = torch_outputs(program, {"x": x})
    with torch.no_grad():
        expected = sources["model"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_static_batch_onnx_keeps_its_batch_and_runs_in_chunks(
    sources: dict[str, Any], tmp_path: Path
) -> None:
    # prepare / act: export the batch-1 program through the dynamo exporter
    program = torch.export.load(str(sources["root"] / "batch1.pt2"))
    x = np.random.default_rng(2).random((7, 1, 8, 8), dtype=np.float32)
    result = CONVERTERS.get("torch-onnx")().convert(program, tmp_path / "b1.onnx", {"x": x})
    runner = open_runner(result.path, threads=1)
    [got] = runner.run({runner.inputs[0].name: x})
    # assert: the graph keeps batch 1, the host runner feeds it 7 rows in chunks, parity holds
    assert result.fixed_batch == 1 and result.details["exporter"] == "dynamo"
    assert runner.inputs[0].shape[0] == 1 and runner.fixed_batch == 1
    with torch.no_grad():
        np.testing.assert_allclose(got, sources["model"](torch.from_numpy(x)).numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dynamic.pt2", "batch1.pt2"])
def test_pt2_builds_from_the_cli_with_dynamic_or_static_batch(
    sources: dict[str, Any], tmp_path: Path, name: str
) -> None:
    # act: the command, onnx candidates only (TFLite is the journey matrix's)
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app

    root = sources["root"]
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, [
        "build", str(root / name), "--profile", "rpi4b", "--calib", str(root / "calib.npz"),
        "--eval", str(root / "eval.npz"), "--only", "onnx-fp32-opt", "--no-prune", "--key", str(sources["key"]),
        "-o", str(out), "--version", "5", "--exporter", "dynamo", "--max-accuracy-drop", "0.05",
    ])  # fmt: skip
    # assert
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 5
    assert manifest["model"]["batch_size"] == 1
    report = json.loads((out / "report.json").read_text())
    baseline = report["baseline"]
    assert baseline["status"] == "ok" and baseline["steps"][0]["exporter"] == "dynamo"
    assert ("batch 1 (source)" in result.output) == (name == "batch1.pt2")


# --- ranking: a tie goes to the smaller model ---------------------------------------------------


def _measured(cid: str, size: int, speedup: float, noise: float, value: float = 0.9) -> Candidate:
    cand = Candidate(spec=CandidateSpec(cid, "onnx", "fp16" if "16" in cid else "fp32", "onnxruntime",
                                        baseline=cid == "onnx-fp32"))  # fmt: skip
    cand.size_bytes, cand.speedup, cand.speedup_noise = size, speedup, noise
    cand.quality = Quality("accuracy", value, 100)
    cand.latency = LatencyStats(1.0 / speedup, 1.2 / speedup, 1.0 / speedup, 50, 1, 1, noise)
    return cand


def test_a_speed_inside_the_noise_is_a_tie_and_the_smaller_model_wins() -> None:
    # prepare: fp16 at 0.99× fp32's speed (noise ±0.03) and 0.58× its size; a model clearly slower
    base = _measured("onnx-fp32", 1000, 1.0, 0.0)
    fp16 = _measured("onnx-fp16", 580, 0.99, 0.03)
    slow = _measured("onnx-int8-dynamic", 300, 0.5, 0.03)
    # act
    chosen, reason = choose([base, fp16, slow], base, 0.01, None, None)
    # assert
    assert chosen is fp16 and fp16.status == "ok" and "tie" in reason
    assert slow.status == "over-budget" and "±0.03 noise" in slow.reason
    assert fp16.to_dict()["speedup_noise"] == 0.03


def test_a_much_slower_candidate_is_never_a_tie_however_wide_the_noise() -> None:
    # prepare: on a loaded host the band grew to ±0.46; INT8 measured at 0.6× fp32's speed
    base = _measured("onnx-fp32", 1000, 1.0, 0.0)
    slow = _measured("onnx-int8-dynamic", 300, 0.6, 0.46)
    near = _measured("onnx-fp16", 580, 0.85, 0.46)
    # act
    chosen, _ = choose([base, slow, near], base, 0.01, None, None)
    # assert: the band counts up to MAX_TIE_BAND only, so 0.85× is a tie and 0.6× is not
    assert not slow.speed_tie and slow.status == "over-budget"
    assert near.speed_tie and chosen is near


def test_ratio_noise_grows_with_spread_and_has_a_floor() -> None:
    steady = ratio_noise([1.0] * 50, [1.0] * 50)
    rng = np.random.default_rng(0)
    noisy = ratio_noise(list(1 + rng.random(50)), list(1 + rng.random(50)))
    assert steady == MIN_RATIO_NOISE
    assert noisy > 0.05


# --- fast failures: before torch ----------------------------------------------------------------


def _fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_mistyped_profile_and_bad_npz_fail_before_torch_is_imported(sources: dict[str, Any]) -> None:
    # prepare: a fresh interpreter per call, so what the error path imported is visible in sys.modules
    root = sources["root"]
    code = f"""
        import sys
        from typer.testing import CliRunner
        from edgefleet.sdk.cli import app
        runs = [
            ["build", "{root / "dynamic.pt2"}", "--profile", "rpi4bx", "--calib", "{root / "calib.npz"}"],
            ["build", "{root / "dynamic.pt2"}", "--profile", "rpi4b", "--calib", "{root / "calib.npz"}",
             "--eval", "{root / "wide.npz"}"],
            ["build", "{root / "missing.pt2"}", "--profile", "rpi4b"],
        ]
        for args in runs:
            result = CliRunner().invoke(app, args)
            print(result.exit_code, result.output.strip().replace(chr(10), " "))
        print("torch imported:", "torch" in sys.modules)
    """
    # act
    done = _fresh_python(code, ROOT)
    # assert
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0].startswith("1 ") and "unknown device profile 'rpi4bx'" in lines[0]
    assert lines[1].startswith("1 ") and "calibration data but" in lines[1]
    assert lines[2].startswith("1 ") and "does not exist" in lines[2]
    assert lines[-1] == "torch imported: False"


def test_calib_and_eval_rows_must_match(sources: dict[str, Any]) -> None:
    root = sources["root"]
    with mock.patch.object(builder, "load_plugins", side_effect=AssertionError("work started")):
        with pytest.raises(
            DataError, match=r"rows of shape \(1, 8, 8\) in the calibration data but \(1, 9, 9\)"
        ):
            builder.build(
                root / "dynamic.pt2", FakeProfile(), calib=root / "calib.npz", eval=root / "wide.npz"
            )


# --- releases -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_release_builds_each_profile_with_one_name_and_version(
    sources: dict[str, Any], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app

    root = sources["root"]
    onnx = tmp_path / "model.onnx"
    CONVERTERS.get("torch-onnx")().convert(sources["model"], onnx, {"x": np.zeros((2, 1, 8, 8), np.float32)})
    out = tmp_path / "release"
    # act
    result = CliRunner().invoke(app, [
        "build", str(onnx), "--profile", "rpi4b", "--profile", "x86-64", "--calib", str(root / "calib.npz"),
        "--only", "onnx-fp32-opt", "--key", str(sources["key"]), "-o", str(out), "--version", "9", "--name", "res",
    ])  # fmt: skip
    # assert
    assert result.exit_code == 0, result.output
    manifests = [json.loads((out / p / "manifest.json").read_text()) for p in ("rpi4b", "x86-64")]
    assert [(m["name"], m["version"], m["target"]["profile"]) for m in manifests] == [
        ("res", 9, "rpi4b"),
        ("res", 9, "x86-64"),
    ]
    assert "edgefleet deploy" in result.output
    # a retry of the same release refuses the non-empty folder unless --force
    again = CliRunner().invoke(app, ["build", str(onnx), "--profile", "rpi4b", "--profile", "x86-64",
                                     "--calib", str(root / "calib.npz"), "-o", str(out)])  # fmt: skip
    assert again.exit_code == 1 and "--force" in again.output


def test_pruning_a_torchscript_model_says_it_needs_the_nn_module(
    sources: dict[str, Any], tmp_path: Path
) -> None:
    from edgefleet.sdk.build.plugins import load_plugins
    from edgefleet.sdk.compress import COMPRESSORS, CompressionContext
    from edgefleet.sdk.compress.base import CompressionError

    load_plugins()
    script = torch.jit.load(str(sources["root"] / "model.pt"))
    x = np.zeros((4, 1, 8, 8), np.float32)
    ctx = CompressionContext(workdir=tmp_path, calib={"x": x}, eval_inputs={"x": x})
    with pytest.raises(CompressionError, match="needs the model as a Python nn.Module"):
        COMPRESSORS.get("prune-channels")(amount=0.5).apply(script, ctx)
