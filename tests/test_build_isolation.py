"""Candidate isolation: a candidate that crashes, aborts, hangs or raises in the worker fails alone.

The misbehaving candidates are real: compression steps registered by a module this test writes (the
worker imports it, as it would a third-party plug-in) read a null pointer (SIGSEGV), call abort()
(SIGABRT), sleep past the deadline, or raise.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from build_support import FakeProfile  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.sdk.build import builder  # noqa: E402
from edgefleet.sdk.build.builder import build  # noqa: E402
from edgefleet.sdk.build.errors import BuildError  # noqa: E402
from edgefleet.sdk.build.isolate import CandidateFailed, Job, WorkData, make_runner  # noqa: E402
from edgefleet.sdk.build.plan import CandidateSpec, PlanOptions, Step  # noqa: E402
from edgefleet.sdk.compress import COMPRESSORS  # noqa: E402

PLUGIN = """
import ctypes, os, time

from edgefleet.sdk.compress.base import COMPRESSORS, CompressionError, CompressionStep, Requirements


class _Misbehaving(CompressionStep):
    requires = Requirements(stage="onnx", runtime="onnxruntime")


@COMPRESSORS.register("test-segv")
class Segv(_Misbehaving):
    name = "test-segv"

    def apply(self, model, ctx):
        ctypes.string_at(0)  # a null-pointer read, as a native runtime bug would do


@COMPRESSORS.register("test-abort")
class Abort(_Misbehaving):
    name = "test-abort"

    def apply(self, model, ctx):
        os.abort()


@COMPRESSORS.register("test-hang")
class Hang(_Misbehaving):
    name = "test-hang"

    def apply(self, model, ctx):
        time.sleep(3600)


@COMPRESSORS.register("test-raise")
class Raise(_Misbehaving):
    name = "test-raise"

    def apply(self, model, ctx):
        raise CompressionError("this step always fails")
"""
STEPS = ("test-segv", "test-abort", "test-hang", "test-raise")
ONLY_FP32 = PlanOptions(prune_levels=(), mixed_precision=False, tflite=False, static_calibrations=())


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Register the misbehaving steps from an importable module; unregister them afterwards."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "edgefleet_test_misbehaving.py").write_text(PLUGIN)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("edgefleet_test_misbehaving")
        yield module.__name__
    finally:
        for name in STEPS:
            COMPRESSORS._items.pop(name, None)
        sys.modules.pop("edgefleet_test_misbehaving", None)
        sys.path.remove(str(root))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("isolation")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    ).eval()
    model = root / "net.onnx"
    CONVERTERS.get("torch-onnx")().convert(net, model, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    rng = np.random.default_rng(0)
    np.savez(root / "eval.npz", x=rng.random((32, 1, 8, 8), dtype=np.float32))
    from edgefleet.sdk.trust.keys import init_keys

    return {
        "root": root,
        "model": model,
        "eval": root / "eval.npz",
        "key": init_keys(root / "keys").private_path,
    }


def _with_steps(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """The plan gains one candidate per misbehaving step, then a well-behaved one after them."""
    real = builder.plan_candidates

    def plan(*args: Any, **kwargs: Any) -> list[CandidateSpec]:
        specs = real(*args, **kwargs)
        extra = [
            CandidateSpec(name, "onnx", "fp32", "onnxruntime", onnx_steps=(Step(name),)) for name in names
        ]
        after = CandidateSpec(
            "after-them",
            "onnx",
            "fp32",
            "onnxruntime",
            onnx_steps=(Step("onnx-optimize", {"ort_level": "basic"}),),
        )
        return [*specs, *extra, after]

    monkeypatch.setattr(builder, "plan_candidates", plan)


def test_worker_survives_a_segfault_and_reports_the_signal(
    misbehaving: str, files: dict[str, Path], tmp_path: Path
) -> None:
    # prepare: a worker on the eval data
    x = np.load(files["eval"])["x"]
    worker = make_runner(True, WorkData(tmp_path, {"input": x}, None, {"input": x}, None), None, 60.0, None)
    try:
        # act: a job whose step dereferences a null pointer, then a plain measurement
        with pytest.raises(CandidateFailed) as crashed:
            worker.run(Job("segv", files["model"], (("test-segv", {}),), (misbehaving,), baseline=True))
        after = worker.run(Job("fp32", files["model"], baseline=True, latency_runs=5))
    finally:
        worker.close()
    # assert: the signal is named, and a fresh worker measured the next job
    assert crashed.value.reason.startswith("crashed (signal 11)"), crashed.value.reason
    assert "SIGSEGV" in crashed.value.reason
    assert after.quality.samples == len(x)
    assert worker.restarts == 1


def test_worker_stops_a_hung_job_at_its_deadline(
    misbehaving: str, files: dict[str, Path], tmp_path: Path
) -> None:
    x = np.load(files["eval"])["x"]
    worker = make_runner(True, WorkData(tmp_path, {"input": x}, None, {"input": x}, None), None, 2.0, None)
    try:
        with pytest.raises(CandidateFailed) as hung:
            worker.run(Job("hang", files["model"], (("test-hang", {}),), (misbehaving,), baseline=True))
        hung_worker = worker.proc
    finally:
        worker.close()
    assert hung.value.reason.startswith("timed out after 2 s"), hung.value.reason
    assert hung_worker is not None and hung_worker.poll() is not None  # the hung worker was stopped


def test_build_goes_on_past_crashing_and_hanging_candidates(
    misbehaving: str, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: a plan whose middle candidates crash (SIGSEGV, SIGABRT), hang and raise
    _with_steps(monkeypatch, *STEPS)
    out = tmp_path / "bundle"
    # act
    result = build(
        files["model"], FakeProfile(precisions=("fp32",)), eval=files["eval"], plan=ONLY_FP32, out=out,
        private_key=files["key"], latency_runs=5, candidate_timeout=15.0,
    )  # fmt: skip
    # assert: each failure is recorded with its cause, the others were measured, report.json lists them
    by_id = {c.id: c for c in result.candidates}
    assert by_id["test-segv"].status == "failed"
    assert by_id["test-segv"].reason.startswith("crashed (signal 11)")
    assert by_id["test-abort"].reason.startswith("crashed (signal 6)")
    assert by_id["test-hang"].reason.startswith("timed out after 15 s")
    assert by_id["test-raise"].reason == "CompressionError: this step always fails"
    assert by_id["after-them"].status != "failed" and by_id["after-them"].quality is not None
    assert result.chosen.status != "failed"
    report = json.loads((out / "report.json").read_text())
    listed = {c["id"]: c for c in report["candidates"]}
    assert listed["test-segv"]["status"] == "failed"
    assert listed["test-segv"]["reason"].startswith("crashed (signal 11)")
    assert report["isolation"]["mode"] == "process"
    assert report["isolation"]["worker_restarts"] == 3  # after the segfault, the abort and the hang


def test_a_crashing_baseline_stops_the_build_with_its_reason(
    misbehaving: str, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: the fp32 baseline itself goes through a step that segfaults
    real = builder.plan_candidates

    def plan(*args: Any, **kwargs: Any) -> list[CandidateSpec]:
        base = real(*args, **kwargs)[0]
        return [
            CandidateSpec(
                base.id, "onnx", "fp32", "onnxruntime", onnx_steps=(Step("test-segv"),), baseline=True
            )
        ]

    monkeypatch.setattr(builder, "plan_candidates", plan)
    # act / assert
    with pytest.raises(BuildError, match=r"fp32 baseline \(onnx-fp32\) failed.*crashed \(signal 11\)"):
        build(
            files["model"],
            FakeProfile(precisions=("fp32",)),
            eval=files["eval"],
            plan=ONLY_FP32,
            latency_runs=5,
        )


def test_in_process_build_is_still_available(files: dict[str, Path]) -> None:
    result = build(
        files["model"], FakeProfile(precisions=("fp32",)), eval=files["eval"], plan=ONLY_FP32, latency_runs=5,
        isolate=False,
    )  # fmt: skip
    assert result.report["isolation"]["mode"] == "in-process"
    assert all(c.status != "failed" for c in result.candidates)


def test_bad_candidate_timeout_is_a_clear_error(files: dict[str, Path]) -> None:
    with pytest.raises(BuildError, match="--candidate-timeout must be a positive"):
        build(files["model"], FakeProfile(), eval=files["eval"], candidate_timeout=0)


def test_cli_prints_the_crash_in_the_table(
    misbehaving: str, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare
    pytest.importorskip("edgefleet.device_profiles").load_profile("rpi4b")
    from edgefleet.sdk.cli import app

    _with_steps(monkeypatch, "test-segv")
    # act: through a pipe (CliRunner), so the table is plain text
    result = CliRunner().invoke(
        app,
        [
            "build", str(files["model"]), "--profile", "rpi4b", "--eval", str(files["eval"]),
            "--only", "onnx-fp32-opt", "--key", str(files["key"]), "--candidate-timeout", "60",
        ],
    )  # fmt: skip
    # assert
    assert result.exit_code == 0, result.output
    assert "failed: crashed (signal 11)" in result.output
    assert "chosen:" in result.output
