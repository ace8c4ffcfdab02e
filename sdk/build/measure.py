"""Host measurements of a converted model: latency p50/p95 at a batch size, and quality (agent/core/quality.py).

Latency is timed on this host's CPU, or, for an ONNX model built for a GPU profile, on the GPU
execution providers `providers_scope` names (CUDA / TensorRT, when this host's onnxruntime has them):
`LatencyStats.provider` records what actually ran it, since onnxruntime falls back to the CPU silently.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.agent.core.quality import (
    ALL_METRICS,
    AUTO,
    Quality,
    QualityError,
    check_task,
    measure,
)
from edgefleet.converters.runners import ModelRunner, named_feeds, open_runner

__all__ = [
    "GPU_PROVIDERS",
    "PROVIDERS_ENV",
    "TASK_ENV",
    "BuildQuality",
    "LatencyStats",
    "Quality",
    "build_providers",
    "build_task",
    "evaluate",
    "measure_latency",
    "measure_side_by_side",
    "providers_scope",
    "ratio_noise",
    "run_model",
    "task_scope",
]

# onnxruntime's GPU execution providers: a model timed on one of them was measured on a GPU.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# The build's timing providers, in the environment so its candidate worker processes (isolate.py) see them.
PROVIDERS_ENV = "EDGEFLEET_BUILD_PROVIDERS"


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one batch on this host, over `runs` timed runs after warm-up."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int
    batch_size: int
    threads: int
    # Relative half-width of the band around the speed ratio to the model timed alongside (side by side).
    ratio_noise: Optional[float] = None
    # The execution provider (or TFLite delegate) that ran it: what the session got, not what was asked.
    provider: Optional[str] = None

    @property
    def on_gpu(self) -> bool:
        """Whether a GPU execution provider (CUDA, TensorRT) ran the timed inferences."""
        return self.provider in GPU_PROVIDERS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def batch_feeds(inputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The first `batch_size` rows of every input, repeating rows when there are fewer."""
    out = {}
    for name, array in inputs.items():
        reps = -(-batch_size // len(array))
        out[name] = np.concatenate([array] * reps)[:batch_size] if reps > 1 else array[:batch_size]
    return out


def measure_latency(
    model: Path | ModelRunner,
    inputs: dict[str, np.ndarray],
    *,
    batch_size: int = 1,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 50,
    min_seconds: float = 0.25,
    max_seconds: float = 10.0,
    max_runs: int = 5000,
    providers: Optional[Sequence[str]] = None,
) -> LatencyStats:
    """Time single-batch inferences: at least `runs` and `min_seconds`, at most `max_seconds`/`max_runs`.

    Sub-millisecond models get hundreds of runs so their percentiles are stable; big models stop at
    `max_seconds` (never fewer than 5 runs). A model with a fixed batch (TFLite) is timed at its own
    batch size, which the result records. `providers`: GPU execution providers for an ONNX file
    (default: the build's, `providers_scope`; none = the CPU).
    """
    runner = _open(model, threads, providers)
    batch = runner.fixed_batch or batch_size
    feeds = named_feeds(runner, batch_feeds(inputs, batch))
    for _ in range(warmup):
        runner.run(feeds)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_runs:
        elapsed = time.perf_counter() - began
        enough = len(times) >= runs and elapsed >= min_seconds
        if len(times) >= 5 and (enough or elapsed >= max_seconds):
            break
        start = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return replace(_stats(times, batch, threads), provider=_provider(runner))


def measure_side_by_side(
    reference: Path | ModelRunner,
    candidate: Path | ModelRunner,
    inputs: dict[str, np.ndarray],
    *,
    batch_size: int = 1,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 50,
    min_seconds: float = 0.25,
    max_seconds: float = 10.0,
    max_runs: int = 5000,
    providers: Optional[Sequence[str]] = None,
) -> tuple[LatencyStats, LatencyStats]:
    """Time two models in alternation (one batch each, turn by turn): (reference stats, candidate stats).

    Other load on the host drifts over seconds; alternating run by run exposes both models to the same
    drift, so their ratio is trustworthy even where each absolute figure moves between builds. Both
    ONNX files run on the same `providers` (as `measure_latency`).
    """
    pair = [_open(m, threads, providers) for m in (reference, candidate)]
    feeds = [named_feeds(r, batch_feeds(inputs, r.fixed_batch or batch_size)) for r in pair]
    for _ in range(warmup):
        for runner, feed in zip(pair, feeds):
            runner.run(feed)
    times: list[list[float]] = [[], []]
    began = time.perf_counter()
    while len(times[1]) < max_runs:
        elapsed = time.perf_counter() - began
        enough = len(times[1]) >= runs and elapsed >= 2 * min_seconds
        if len(times[1]) >= 5 and (enough or elapsed >= 2 * max_seconds):
            break
        for i, (runner, feed) in enumerate(zip(pair, feeds)):
            start = time.perf_counter()
            runner.run(feed)
            times[i].append((time.perf_counter() - start) * 1000.0)
    cand = _stats(times[1], pair[1].fixed_batch or batch_size, threads)
    return (
        replace(_stats(times[0], pair[0].fixed_batch or batch_size, threads), provider=_provider(pair[0])),
        replace(cand, ratio_noise=ratio_noise(times[0], times[1]), provider=_provider(pair[1])),
    )


def _open(model: Path | ModelRunner, threads: int, providers: Optional[Sequence[str]]) -> ModelRunner:
    """The model's runner: an ONNX file on the GPU providers asked for (then the CPU), else on the CPU."""
    if isinstance(model, ModelRunner):
        return model
    path = Path(model)
    wanted = list(build_providers() if providers is None else providers)
    if wanted and path.suffix.lower() == ".onnx":
        # the runtime keeps those this onnxruntime has, in this order, and ends with the CPU
        return open_runner(path, threads=threads, providers=[*wanted, "CPUExecutionProvider"])
    return open_runner(path, threads=threads)


def _provider(runner: ModelRunner) -> Optional[str]:
    """What runs the model: the session's first provider (onnxruntime drops those that failed to load)."""
    try:
        names = runner.providers
    except Exception:  # a runner that cannot say: the record stays empty rather than the timing failing
        return None
    return str(names[0]) if names else None


# Host timings repeat to within a few percent at best (caches, frequency, the order of the pair);
# a smaller band would call differences real that the next build reverses.
MIN_RATIO_NOISE = 0.03


def ratio_noise(reference_ms: list[float], candidate_ms: list[float]) -> float:
    """Relative half-width of a ~95 % band around the median speed ratio of paired, alternating runs.

    The median's notch (1.58 · IQR / √n, McGill et al. 1978) on the log of each pair's ratio, never
    below MIN_RATIO_NOISE: two models whose speeds differ by less are a tie.
    """
    pairs = min(len(reference_ms), len(candidate_ms))
    if pairs < 2:
        return 1.0
    logs = np.log(np.asarray(reference_ms[:pairs]) / np.asarray(candidate_ms[:pairs]))
    q75, q25 = np.percentile(logs, [75, 25])
    return max(MIN_RATIO_NOISE, float(np.expm1(1.58 * (q75 - q25) / np.sqrt(pairs))))


def _stats(times: list[float], batch: int, threads: int) -> LatencyStats:
    arr = np.asarray(times)
    return LatencyStats(
        p50_ms=float(np.percentile(arr, 50)),
        p95_ms=float(np.percentile(arr, 95)),
        mean_ms=float(arr.mean()),
        runs=len(times),
        batch_size=batch,
        threads=threads,
    )


def run_model(model: Path | ModelRunner, inputs: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """All outputs of the model on all inputs (in chunks of at most 256 rows, to bound memory)."""
    runner = model if isinstance(model, ModelRunner) else open_runner(Path(model), threads=threads)
    feeds = named_feeds(runner, inputs)
    total = len(next(iter(feeds.values())))
    chunk = 256
    parts = [runner.run({k: v[s : s + chunk] for k, v in feeds.items()}) for s in range(0, total, chunk)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


# The build's `--task`, in the environment so the build's candidate worker processes (isolate.py) see it.
TASK_ENV = "EDGEFLEET_BUILD_TASK"


@contextlib.contextmanager
def task_scope(task: Optional[str]) -> Iterator[None]:
    """Score every `evaluate` inside, in this process and the worker processes it starts, as `task`."""
    name = check_task(task or AUTO)
    before = os.environ.get(TASK_ENV)
    os.environ[TASK_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TASK_ENV, None)
        else:
            os.environ[TASK_ENV] = before


def build_task() -> str:
    """The task the build scores (`task_scope`, else `auto`)."""
    return check_task(os.environ.get(TASK_ENV) or AUTO)


@contextlib.contextmanager
def providers_scope(providers: Sequence[str]) -> Iterator[None]:
    """Time every ONNX model inside, here and in the worker processes started inside, on `providers`.

    The build passes `profile.host_gpu_providers(prof)`: a GPU profile's GPU providers that this host's
    onnxruntime offers. Empty: the CPU, as without the scope.
    """
    before = os.environ.get(PROVIDERS_ENV)
    os.environ[PROVIDERS_ENV] = ",".join(p for p in providers if p != "CPUExecutionProvider")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROVIDERS_ENV, None)
        else:
            os.environ[PROVIDERS_ENV] = before


def build_providers() -> tuple[str, ...]:
    """The GPU providers the build times ONNX models on (`providers_scope`); () = the CPU."""
    return tuple(p.strip() for p in os.environ.get(PROVIDERS_ENV, "").split(",") if p.strip())


@dataclass(frozen=True)
class BuildQuality(Quality):
    """A host reading that also knows its task and whether labels or reference outputs scored it."""

    task: str = "classification"
    against: str = "reference"


def evaluate(
    outputs: list[np.ndarray],
    *,
    labels: Optional[np.ndarray] = None,
    reference: Optional[list[np.ndarray]] = None,
    task: Optional[str] = None,
) -> BuildQuality:
    """The task's metric (docs/quality.md) against `labels`, else `reference` outputs; others in `detail`.

    `task` (default: the build's, `task_scope`, else `auto`): classification scores accuracy / agreement
    (`auto` keeps fidelity for reference evals), detection map50, ctc token_error_rate, embedding
    embedding_cosine. One scorer for host and device (agent/core/quality.py): every output counts.
    """
    if labels is None and reference is None:
        raise ValueError("evaluate() needs labels or reference outputs")
    name = check_task(task) if task is not None else build_task()
    try:
        reading = measure(outputs, labels=labels, reference=reference, task=name)
    except QualityError as exc:
        raise QualityError(
            "eval-invalid", f"{exc.reason} (task {name}; pass --task to pick another, docs/quality.md)"
        ) from None
    return BuildQuality(
        metric=reading.metric,
        value=reading.value,
        samples=reading.samples,
        detail=dict(reading.detail),
        source=reading.source,
        task=ALL_METRICS[reading.metric].task,
        against="labels" if labels is not None else "reference",
    )
