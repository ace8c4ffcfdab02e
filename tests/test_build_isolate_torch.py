"""The torch stage's conversions in a forked child: a crash or hang in a converter fails one candidate.

The misbehaving conversions are real: the model's forward reads a null pointer, aborts or sleeps, but
only while LiteRT's converter traces it (its frames are on the stack), so the fp32 ONNX baseline exports
and the build goes on past the TFLite candidates.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from edgefleet.sdk.build.isolate_torch import ConversionFailed, ForkedCalls, fork_available  # noqa: E402

pytestmark = pytest.mark.skipif(not fork_available(), reason="conversions are forked on Linux only")


@pytest.fixture(autouse=True)
def _no_fork_hazard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The children here run only this file's own code (never XLA or TensorFlow), so they may fork even
    when another test loaded those into this process; only the hazard test sees the real check."""
    if "tensorflow" not in request.node.name:
        from edgefleet.sdk.build import isolate_torch

        monkeypatch.setattr(isolate_torch, "fork_hazard", lambda: None)


def _segv(progress: Any) -> None:
    ctypes.string_at(0)


def _abort(progress: Any) -> None:
    os.abort()


def _hang(progress: Any) -> None:
    progress("sleeping", 0.5)
    time.sleep(3600)


def _raise(progress: Any) -> None:
    raise ValueError("this conversion always fails\nsecond line")


def test_forked_call_returns_the_result_and_relays_progress() -> None:
    # prepare: a torch computation in the child (one thread there: libgomp is not fork-safe)
    torch.set_num_threads(2)
    net = torch.nn.Conv2d(3, 8, 3)
    net(torch.zeros(2, 3, 16, 16))  # the parent's OpenMP team exists before the fork
    seen: list[tuple[str, float]] = []
    calls = ForkedCalls(60.0, lambda message, fraction: seen.append((message, fraction)))

    def work(progress: Any) -> tuple[int, list[int]]:
        progress("halfway", 0.5)
        return os.getpid(), list(net(torch.ones(1, 3, 16, 16)).shape)

    # act
    pid, shape = calls.call(work, "a test conversion")
    # assert: it ran elsewhere, answered, and its progress came through
    assert pid != os.getpid()
    assert shape == [1, 8, 14, 14]
    assert seen == [("halfway", 0.5)]
    assert calls.mode == "fork" and calls.crashes == 0


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (_segv, "crashed (signal 11): SIGSEGV while a test conversion"),
        (_abort, "crashed (signal 6): SIGABRT while a test conversion"),
        (_raise, "ValueError: this conversion always fails"),
    ],
)
def test_a_failing_child_becomes_a_reason(fn: Any, reason: str) -> None:
    calls = ForkedCalls(60.0)
    with pytest.raises(ConversionFailed) as failed:
        calls.call(fn, "a test conversion")
    assert failed.value.reason.startswith(reason), failed.value.reason
    assert calls.crashes == (0 if fn is _raise else 1)


def test_a_hung_child_is_killed_at_its_deadline() -> None:
    calls = ForkedCalls(2.0)
    started = time.monotonic()
    with pytest.raises(ConversionFailed) as hung:
        calls.call(_hang, "a test conversion")
    # the stage named is the last the child reported
    assert hung.value.reason == "timed out after 2 s (while sleeping); the conversion was stopped"
    assert time.monotonic() - started < 60  # killed, not waited out (an hour)


def test_a_process_already_running_tensorflow_converts_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a fork-unsafe runtime loaded in this process (as in a session that converted before);
    # a forked child would hang in it, so the call must not fork
    import sys
    import types

    monkeypatch.delitem(sys.modules, "jax._src.xla_bridge", raising=False)  # another test's, if any
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    calls = ForkedCalls(60.0)
    # act
    pid = calls.call(lambda progress: os.getpid(), "a conversion")
    # assert: it ran here, and why is recorded for report.json
    assert pid == os.getpid()
    assert calls.unforked == ["a conversion: TensorFlow is loaded in this process"]


def test_an_unpicklable_result_is_a_clear_failure() -> None:
    with pytest.raises(ConversionFailed, match="cannot be sent back to the build"):
        ForkedCalls(60.0).call(lambda progress: lambda: None, "a test conversion")


def test_a_stream_locked_by_another_thread_at_the_fork_does_not_hang_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prepare: sys.stdout is a pipe nobody reads, and a thread is stuck in a write to it, holding the
    # stream's lock (as a progress display refreshing the terminal might at the moment of the fork)
    import sys
    import threading

    read_fd, write_fd = os.pipe()
    stuck = os.fdopen(write_fd, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stuck)

    def write_forever() -> None:
        try:
            stuck.write("x" * 10_000_000 + "\n")
        except (OSError, ValueError):
            pass  # the pipe closed at the end of the test

    writer = threading.Thread(target=write_forever, daemon=True)
    writer.start()
    time.sleep(0.5)
    try:
        # act: a conversion that prints, as torch.onnx does
        answer = ForkedCalls(30.0).call(lambda progress: print("exporting...") or 42, "printing")
    finally:
        os.close(read_fd)
        writer.join(5)
    # assert: it answered instead of waiting on the inherited lock until the deadline
    assert answer == 42


def test_in_process_mode_runs_here() -> None:
    calls = ForkedCalls(60.0, isolate=False)
    assert calls.mode == "in-process"
    assert calls.call(lambda progress: os.getpid(), "here") == os.getpid()


def test_bad_timeout_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ForkedCalls(0)


# A user's build script: the model class lives in its `__main__` (a fresh interpreter could not unpickle
# it; the forked conversion has it in memory). Its forward misbehaves only while LiteRT's converter
# traces it. It runs in an interpreter of its own, so that a fork-unsafe runtime another test loaded
# into this process (XLA, which would make the build convert in-process) cannot turn the crash into
# pytest's own.
BUILD_SCRIPT = """
import ctypes, inspect, json, sys, time

import numpy as np
import torch

from build_support import FakeProfile
from edgefleet.sdk.build.builder import build
from edgefleet.sdk.build.plan import PlanOptions
from edgefleet.sdk.trust.keys import init_keys


class TracedBadly(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
        )

    def forward(self, x):
        if any("litert" in frame.filename for frame in inspect.stack(0)):
            if self.how == "segv":
                ctypes.string_at(0)
            elif self.how == "hang":
                time.sleep(3600)
        return self.body(x)


how, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
result = build(
    TracedBadly(how).eval(),
    FakeProfile(precisions=("fp32",), runtimes=("onnxruntime-cpu", "tflite")),
    eval={"x": x},
    calib={"x": x},
    plan=PlanOptions(prune_levels=(), mixed_precision=False, static_calibrations=(), sensitivity=False),
    out=out + "/bundle",
    latency_runs=5,
    candidate_timeout=45.0,
    private_key=init_keys(out + "/keys").private_path,
)
print(json.dumps({
    "candidates": [[c.spec.format, c.id, c.status, c.reason] for c in result.candidates],
    "chosen": result.chosen.spec.format,
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "reason"), [("segv", "crashed (signal 11)"), ("hang", "timed out after 45 s")]
)
def test_build_goes_on_past_a_crashing_tflite_conversion(how: str, reason: str, tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    import subprocess
    import sys

    # prepare: an ONNX baseline that exports fine, and TFLite candidates whose conversion misbehaves
    script = tmp_path / "build_it.py"
    script.write_text(BUILD_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    # act
    run = subprocess.run(
        [sys.executable, str(script), how, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    # assert: the build finished; every TFLite candidate failed with the cause, the ONNX ones were
    # measured, one was chosen
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    tflite = [c for c in answer["candidates"] if c[0] == "tflite"]
    onnx = [c for c in answer["candidates"] if c[0] == "onnx"]
    assert tflite and all(c[2] == "failed" and c[3].startswith(reason) for c in tflite), tflite
    assert onnx and all(c[2] != "failed" for c in onnx)
    assert answer["chosen"] == "onnx"
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    assert report["isolation"]["conversions"] == "fork"
    assert report["isolation"]["conversion_crashes"] == len(tflite)
    assert report["isolation"]["conversions_unforked"] == []
