"""Host measurements of a converted model: latency p50/p95 at a batch size, and quality (agent/core/quality.py)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.agent.core.quality import Quality, measure
from edgefleet.converters.runners import ModelRunner, named_feeds, open_runner

__all__ = [
    "LatencyStats",
    "Quality",
    "evaluate",
    "measure_latency",
    "measure_side_by_side",
    "ratio_noise",
    "run_model",
]


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
) -> LatencyStats:
    """Time single-batch inferences: at least `runs` and `min_seconds`, at most `max_seconds`/`max_runs`.

    Sub-millisecond models get hundreds of runs so their percentiles are stable; big models stop at
    `max_seconds` (never fewer than 5 runs). A model with a fixed batch (TFLite) is timed at its own
    batch size, which the result records.
    """
    runner = model if isinstance(model, ModelRunner) else open_runner(Path(model), threads=threads)
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
    return _stats(times, batch, threads)


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
) -> tuple[LatencyStats, LatencyStats]:
    """Time two models in alternation (one batch each, turn by turn): (reference stats, candidate stats).

    Other load on the host drifts over seconds; alternating run by run exposes both models to the same
    drift, so their ratio is trustworthy even where each absolute figure moves between builds.
    """
    pair = [
        m if isinstance(m, ModelRunner) else open_runner(Path(m), threads=threads)
        for m in (reference, candidate)
    ]
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
        _stats(times[0], pair[0].fixed_batch or batch_size, threads),
        replace(cand, ratio_noise=ratio_noise(times[0], times[1])),
    )


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


def evaluate(
    outputs: list[np.ndarray],
    *,
    labels: Optional[np.ndarray] = None,
    reference: Optional[list[np.ndarray]] = None,
) -> Quality:
    """Accuracy against `labels`, else fidelity to `reference` outputs; the other scores ride in `detail`.

    One scorer for host and device (agent/core/quality.py): every output counts, as on the device.
    """
    if labels is None and reference is None:
        raise ValueError("evaluate() needs labels or reference outputs")
    return measure(outputs, labels=labels, reference=reference)
