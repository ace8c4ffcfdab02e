"""Candidates in a worker process: a native crash or a hang fails one candidate, and the build goes on.

onnxruntime and LiteRT are C++ libraries: a graph they choke on can kill the process with SIGSEGV or
SIGABRT, or never return. The build therefore runs each candidate's ONNX-stage steps (quantizers and
optimizers, which load the graph) and its measurements (outputs, quality, latency, the target estimate)
in one worker process (`python -c` bootstrap into `main()` below, never a fork of the torch-holding
parent), reused from candidate to candidate. The parent keeps the torch stage: pruning runs there, and
the conversions (torch → ONNX with its parity check, torch → TFLite) each run in a child forked from it
(isolate_torch.py). The parent waits for each answer with a deadline:

- the worker dies by a signal → the candidate fails with "crashed (signal 11)" (SIGSEGV; SIGABRT is 6),
- it exits on its own → "crashed (exit code N)",
- no answer within `timeout` seconds → it is killed and the candidate fails with "timed out after N s",
- a Python exception → the candidate fails with the exception's type and first line, as in-process.

After a crash or a timeout the next candidate starts a fresh worker. The wire is a pipe pair: 8-byte
length + pickle, parent and child of the same installation; the child's own stdout is moved to its
stderr, so a library that prints cannot corrupt it, and its stderr is the build's (the CLI's build log).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

import numpy as np

from edgefleet.sdk.build.errors import BuildError
from edgefleet.sdk.build.measure import LatencyStats, Quality

Progress = Optional[Callable[[str, float], None]]
# A MiniLM static INT8 calibration plus its side-by-side timing takes minutes on a 2-core host; a hang
# should still end the same day. `build(candidate_timeout=...)` / `--candidate-timeout` change it.
DEFAULT_CANDIDATE_TIMEOUT_S = 900.0
START_TIMEOUT_S = 120.0  # python + numpy + onnxruntime imports on a loaded host
STOP_TIMEOUT_S = 5.0
_HEADER = struct.Struct(">Q")
_PATH_ENV = "EDGEFLEET_WORKER_SYS_PATH"
# The child's sys.path is the parent's, so plug-ins the parent registered from its own modules import.
_BOOT = (
    f"import json, os, sys; sys.path[:] = json.loads(os.environ.pop({_PATH_ENV!r})); "
    "from edgefleet.sdk.build.isolate import main; main()"
)


class CandidateFailed(BuildError):
    """The worker crashed, hung or raised on one candidate; `reason` is what report.json records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One candidate's work for the worker: ONNX steps to apply to `source`, then the measurements."""

    id: str
    source: Path
    steps: tuple[tuple[str, dict[str, Any]], ...] = ()
    modules: tuple[str, ...] = ()  # modules that register the steps (imported in the worker first)
    baseline: bool = False  # the fp32 baseline: its outputs become the reference for the others
    baseline_path: Optional[Path] = None  # timed side by side with the candidate
    reference: tuple[Path, ...] = ()  # the baseline's outputs (.npy), for fidelity
    batch_size: int = 1
    threads: int = 1
    latency_runs: int = 50
    precision: str = "fp32"


@dataclass(frozen=True)
class SensitivityJob:
    """Per-node INT8 sensitivity of an ONNX file (a model file gives no torch layers to perturb)."""

    id: str
    source: Path
    rows: int = 32
    batch_size: int = 1


@dataclass
class Measured:
    """What the worker measured about one candidate."""

    path: Path
    steps: list[dict[str, Any]]
    size_bytes: int
    quality: Quality
    latency: LatencyStats
    speedup: float
    speedup_noise: Optional[float]
    estimate_ms: Optional[float]
    estimated: bool  # False: the worker could not read the profile; the parent estimates instead
    reference: tuple[Path, ...] = ()  # set for the baseline: where its outputs were saved


@dataclass
class WorkData:
    """The data every job reads: calibration and eval sets, the work folder, the device profile."""

    workdir: Path
    calib: dict[str, np.ndarray]
    calib_labels: Optional[np.ndarray]
    eval_inputs: dict[str, np.ndarray]
    eval_labels: Optional[np.ndarray]
    profile: Any = None  # None: the parent estimates the target latency itself
    _reference: dict[tuple[Path, ...], list[np.ndarray]] = field(default_factory=dict)

    def reference(self, files: tuple[Path, ...]) -> Optional[list[np.ndarray]]:
        """The baseline's outputs, memory-mapped from the files the baseline job wrote."""
        if not files:
            return None
        if files not in self._reference:
            self._reference = {files: [np.load(f, mmap_mode="r") for f in files]}
        return self._reference[files]


def save_data(path: Path, data: WorkData) -> None:
    """Write the data sets as one .npz (no pickles), their input names in order beside them."""
    arrays: dict[str, np.ndarray] = {}
    names = {"calib": list(data.calib), "eval": list(data.eval_inputs)}
    for part, inputs in (("calib", data.calib), ("eval", data.eval_inputs)):
        for index, array in enumerate(inputs.values()):
            arrays[f"{part}.{index}"] = np.asarray(array)
    if data.calib_labels is not None:
        arrays["calib.labels"] = np.asarray(data.calib_labels)
    if data.eval_labels is not None:
        arrays["eval.labels"] = np.asarray(data.eval_labels)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    path.with_suffix(".json").write_text(json.dumps(names), encoding="utf-8")


def load_data(path: Path, workdir: Path, profile: Any) -> WorkData:
    """Read what save_data wrote."""
    names = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return WorkData(
        workdir=workdir,
        calib={n: arrays[f"calib.{i}"] for i, n in enumerate(names["calib"])},
        calib_labels=arrays.get("calib.labels"),
        eval_inputs={n: arrays[f"eval.{i}"] for i, n in enumerate(names["eval"])},
        eval_labels=arrays.get("eval.labels"),
        profile=profile,
    )


def run_job(job: Job, data: WorkData, progress: Progress = None) -> Measured:
    """Apply the job's ONNX steps, then measure the file: outputs, quality, latency, target estimate."""
    from edgefleet.sdk.build.choose import estimate_target_ms
    from edgefleet.sdk.build.measure import (
        build_task,
        evaluate,
        measure_latency,
        measure_side_by_side,
        run_model,
    )
    from edgefleet.sdk.build.produce import apply_onnx_steps
    from edgefleet.sdk.compress import CompressionContext

    def note(message: str) -> None:
        if progress is not None:
            progress(f"{job.id}: {message}", 0.0)

    for module in job.modules:
        importlib.import_module(module)
    path = Path(job.source)
    steps: list[dict[str, Any]] = []
    if job.steps:
        ctx = CompressionContext(
            workdir=data.workdir / "steps",
            calib=data.calib,
            calib_labels=data.calib_labels,
            eval_inputs=data.eval_inputs,
            eval_labels=data.eval_labels,
            progress=progress,
            options={} if build_task() == "auto" else {"task": build_task()},  # --task, through the env
        )
        samples = {k: v[:8] for k, v in data.calib.items()}
        for name, params in job.steps:
            note(f"running {name}")
            path, done = apply_onnx_steps(path, job.id, [(name, params)], data.workdir, samples, ctx)
            steps.extend(done)
    note("loading and running on the eval data")
    outputs = run_model(path, data.eval_inputs, threads=job.threads)
    saved: tuple[Path, ...] = ()
    if job.baseline:
        saved = _save_reference(outputs, data.workdir / "reference")
        reference: Optional[list[np.ndarray]] = outputs
    else:
        reference = data.reference(job.reference)
    quality = evaluate(outputs, labels=data.eval_labels, reference=reference)
    del outputs
    note("timing latency")
    if job.baseline_path is None:
        latency = measure_latency(
            path, data.eval_inputs, batch_size=job.batch_size, threads=job.threads, runs=job.latency_runs
        )
        speedup, noise = 1.0, None
    else:
        base, latency = measure_side_by_side(
            job.baseline_path,
            path,
            data.eval_inputs,
            batch_size=job.batch_size,
            threads=job.threads,
            runs=job.latency_runs,
        )
        speedup, noise = base.p50_ms / latency.p50_ms, latency.ratio_noise
    estimate = None
    if data.profile is not None:
        note("estimating target latency")
        estimate = estimate_target_ms(path, data.profile, job.batch_size, job.precision)
    return Measured(
        path=path,
        steps=steps,
        size_bytes=path.stat().st_size,
        quality=quality,
        latency=latency,
        speedup=speedup,
        speedup_noise=noise,
        estimate_ms=estimate,
        estimated=data.profile is not None,
        reference=saved,
    )


def run_sensitivity(job: SensitivityJob, data: WorkData, progress: Progress = None) -> dict[str, Any]:
    """The sensitivity table (sdk/compress/sensitivity.py `onnx_sensitivity`) as report.json keeps it."""
    from edgefleet.converters.runners import named_feeds, open_runner
    from edgefleet.sdk.compress.sensitivity import onnx_sensitivity

    runner = open_runner(job.source, threads=1)
    feeds = named_feeds(runner, {k: v[: job.rows] for k, v in data.eval_inputs.items()})
    rows = len(next(iter(feeds.values())))
    step = max(1, min(job.batch_size, rows))
    batches = [{k: v[i : i + step] for k, v in feeds.items()} for i in range(0, rows, step)]
    table = onnx_sensitivity(job.source, batches, progress=progress)
    return {"source": f"build, on {rows} eval rows of {job.id}", **table.to_json()}


def _save_reference(outputs: list[np.ndarray], folder: Path) -> tuple[Path, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, array in enumerate(outputs):
        target = folder / f"output{index}.npy"
        np.save(target, array)
        files.append(target)
    return tuple(files)


def load_reference(files: tuple[Path, ...]) -> Optional[list[np.ndarray]]:
    """The baseline's outputs as the worker saved them (memory-mapped), or None."""
    return [np.load(f, mmap_mode="r") for f in files] if files else None


def failure_reason(exc: BaseException) -> str:
    """`Type: first line` of an exception, at most 500 characters (what report.json records)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


# ----------------------------------------------------------------------------------------------
# parent side


class InProcess:
    """Runs jobs in this process (`build(isolate=False)`): no protection, for debugging a plug-in."""

    restarts = 0
    mode = "in-process"

    def __init__(self, data: WorkData, progress: Progress) -> None:
        self.data = data
        self.progress = progress

    def run(self, job: Job) -> Measured:
        """Run the job here; exceptions propagate."""
        return run_job(job, self.data, self.progress)

    def sensitivity(self, job: SensitivityJob) -> dict[str, Any]:
        """The ONNX sensitivity table, computed here."""
        return run_sensitivity(job, self.data, self.progress)

    def close(self) -> None:
        """Nothing to stop."""


class Worker:
    """One reusable worker process; a crash or timeout costs the candidate, and the next job restarts it."""

    mode = "process"

    def __init__(
        self,
        data_file: Path,
        workdir: Path,
        profile: Any,
        timeout: float,
        progress: Progress,
        warm: tuple[str, ...] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"candidate timeout must be positive, got {timeout}")
        self.data_file = data_file
        self.warm = warm  # modules the worker imports while the parent exports the first model
        self.workdir = workdir
        self.timeout = timeout
        self.progress = progress
        try:
            self.profile_blob: Optional[bytes] = pickle.dumps(profile)
        except Exception:  # a profile class the worker cannot rebuild: the parent estimates instead
            self.profile_blob = None
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.restarts = 0  # workers started after a crash or a timeout
        self._buffer = b""
        self._ready = False
        self._stage = "starting"

    def start(self) -> None:
        """Start the worker now (it imports its libraries while this process does the torch stage)."""
        if self.proc is None or self.proc.poll() is not None:
            self._launch()

    def _launch(self) -> None:
        env = dict(os.environ)
        env[_PATH_ENV] = json.dumps([p for p in sys.path if isinstance(p, str)])
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.proc, self._buffer, self._ready = proc, b"", False
        self._stage = "starting"
        setup = {
            "data": str(self.data_file),
            "workdir": str(self.workdir),
            "profile": self.profile_blob,
            "warm": list(self.warm),
        }
        self._send(setup)

    def run(self, job: Job) -> Measured:
        """Run one job in the worker; raises CandidateFailed on a crash, a timeout or an exception."""
        measured: Measured = self._exchange(job)
        return measured

    def sensitivity(self, job: SensitivityJob) -> dict[str, Any]:
        """The ONNX sensitivity table, computed in the worker (it loads the graph in onnxruntime)."""
        table: dict[str, Any] = self._exchange(job)
        return table

    def _exchange(self, job: Union[Job, SensitivityJob]) -> Any:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self._launch()
        if not self._ready:
            kind, *_ = self._receive(START_TIMEOUT_S, "starting the worker")
            if kind != "ready":
                raise CandidateFailed(f"the candidate worker did not start: answered {kind!r}")
            self._ready = True
        # Until the worker reports progress, a crash is in the job's first step (or its loading).
        steps = job.steps if isinstance(job, Job) else (("sensitivity", {}),)
        self._stage = f"{job.id}: " + (f"running {steps[0][0]}" if steps else "loading the model")
        self._send(job)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline - time.monotonic(), "running")
            kind = message[0]
            if kind == "progress":
                self._stage = str(message[1])
                if self.progress is not None:
                    self.progress(str(message[1]), float(message[2]))
            elif kind == "done":
                return message[1]
            elif kind == "error":
                raise CandidateFailed(str(message[1]))
            else:
                raise CandidateFailed(f"the candidate worker sent {kind!r}")

    def close(self) -> None:
        """Ask the worker to stop; kill it when it does not within a few seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(_HEADER.pack(0))
                proc.stdin.flush()
            proc.wait(STOP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def _send(self, obj: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died() from None

    def _receive(self, timeout: float, what: str) -> tuple[Any, ...]:
        """The next message, waiting at most `timeout` seconds; a dead or silent worker raises."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    payload = self._buffer[_HEADER.size : _HEADER.size + size]
                    self._buffer = self._buffer[_HEADER.size + size :]
                    message: tuple[Any, ...] = pickle.loads(payload)
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(what)
            # poll, not select: a busy host process may hold descriptors above select's 1024 limit
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(1, int(left * 1000))):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._died()
            self._buffer += chunk

    def _timed_out(self, what: str) -> CandidateFailed:
        limit = self.timeout if what == "running" else START_TIMEOUT_S
        self._kill()
        return CandidateFailed(f"timed out after {limit:g} s (while {self._stage}); the worker was stopped")

    def _died(self) -> CandidateFailed:
        proc = self.proc
        assert proc is not None
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # the pipe closed but the process lingers: make sure it is gone
            self._kill()
            code = proc.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            how = f"crashed (signal {-code})"
            detail = f"{name} while {self._stage}; the runtime's messages are in the build log"
        else:
            how = f"crashed (exit code {code})"
            detail = f"while {self._stage}; see the build log"
        return CandidateFailed(f"{how}: {detail}")

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def warm_modules(step_modules: list[str], formats: set[str], has_steps: bool) -> tuple[str, ...]:
    """What a worker imports ahead of its first job: the runtimes, and the steps' modules and libraries."""
    out = ["edgefleet.sdk.build.measure", "edgefleet.sdk.build.choose", "edgefleet.sdk.build.produce"]
    if "onnx" in formats:
        out += ["onnxruntime", "edgefleet.sdk.build.estimate_onnx"]
    if "tflite" in formats:
        out += ["ai_edge_litert.interpreter", "edgefleet.sdk.build.estimate_tflite"]
    if has_steps:
        out += ["onnx", "onnxruntime.quantization", *step_modules]
    return tuple(dict.fromkeys(out))


def make_runner(
    isolate: bool,
    data: WorkData,
    profile: Any,
    timeout: float,
    progress: Progress,
    warm: tuple[str, ...] = (),
) -> Union[Worker, InProcess]:
    """A started Worker (data written under data.workdir) or, with isolate=False, an InProcess runner."""
    if not isolate:
        data.profile = profile
        return InProcess(data, progress)
    folder = data.workdir / "worker"
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "data.npz"
    save_data(data_file, data)
    worker = Worker(data_file, data.workdir, profile, timeout, progress, warm)
    worker.start()
    return worker


# ----------------------------------------------------------------------------------------------
# child side


def _read_exact(stream: IO[bytes], size: int) -> Optional[bytes]:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def main() -> None:
    """Worker loop: read the setup, answer "ready", then run jobs until the parent closes the pipe."""
    # Ctrl-C reaches the whole process group; the parent decides, and stops this worker itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the replies
    requests = os.fdopen(0, "rb")

    def send(obj: Any) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        reply.write(_HEADER.pack(len(payload)) + payload)
        reply.flush()

    def receive() -> Any:
        header = _read_exact(requests, _HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size == 0:
            return None
        payload = _read_exact(requests, size)
        return None if payload is None else pickle.loads(payload)

    setup = receive()
    if setup is None:
        os._exit(0)
    profile = None
    if setup["profile"] is not None:
        try:
            profile = pickle.loads(setup["profile"])
        except Exception:  # defined where this process cannot import it: the parent estimates
            profile = None
    data = load_data(Path(setup["data"]), Path(setup["workdir"]), profile)
    for module in setup.get("warm", ()):
        try:
            importlib.import_module(module)
        except Exception:  # a module that fails to import fails the job that needs it, with its reason
            pass
    send(("ready",))  # after the imports: a candidate's deadline counts its own work only
    while True:
        job = receive()
        if job is None:
            break
        try:
            report = lambda message, fraction: send(("progress", message, fraction))  # noqa: E731
            result = (
                run_sensitivity(job, data, report)
                if isinstance(job, SensitivityJob)
                else run_job(job, data, report)
            )
        except Exception as exc:  # reported as this candidate's failure; the worker serves the next one
            send(("error", failure_reason(exc)))
        else:
            send(("done", result))
    reply.close()
    os._exit(0)  # nothing left to flush: skip the interpreter's teardown of onnxruntime and onnx


__all__ = [
    "DEFAULT_CANDIDATE_TIMEOUT_S",
    "CandidateFailed",
    "InProcess",
    "Job",
    "Measured",
    "SensitivityJob",
    "WorkData",
    "Worker",
    "failure_reason",
    "load_reference",
    "make_runner",
    "run_job",
    "run_sensitivity",
    "warm_modules",
]
