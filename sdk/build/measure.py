"""Host measurements of a converted model: latency p50/p95 at a batch size, accuracy or fidelity."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.converters.parity import compare_many
from edgefleet.converters.runners import ModelRunner, open_runner


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one batch on this host, over `runs` timed runs after warm-up."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int
    batch_size: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Quality:
    """Accuracy on labels, or fidelity (cosine / top-1 agreement) to the fp32 model's outputs."""

    metric: str  # "accuracy" or "cosine"
    value: float
    top1_agreement: Optional[float] = None
    min_cosine: Optional[float] = None
    samples: int = 0

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
    feeds = _named(runner, batch_feeds(inputs, batch))
    for _ in range(warmup):
        runner.run_batch(feeds)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_runs:
        elapsed = time.perf_counter() - began
        enough = len(times) >= runs and elapsed >= min_seconds
        if len(times) >= 5 and (enough or elapsed >= max_seconds):
            break
        start = time.perf_counter()
        runner.run_batch(feeds)
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
    feeds = [_named(r, batch_feeds(inputs, r.fixed_batch or batch_size)) for r in pair]
    for _ in range(warmup):
        for runner, feed in zip(pair, feeds):
            runner.run_batch(feed)
    times: list[list[float]] = [[], []]
    began = time.perf_counter()
    while len(times[1]) < max_runs:
        elapsed = time.perf_counter() - began
        enough = len(times[1]) >= runs and elapsed >= 2 * min_seconds
        if len(times[1]) >= 5 and (enough or elapsed >= 2 * max_seconds):
            break
        for i, (runner, feed) in enumerate(zip(pair, feeds)):
            start = time.perf_counter()
            runner.run_batch(feed)
            times[i].append((time.perf_counter() - start) * 1000.0)
    return (
        _stats(times[0], pair[0].fixed_batch or batch_size, threads),
        _stats(times[1], pair[1].fixed_batch or batch_size, threads),
    )


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


def _named(runner: ModelRunner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs keyed by the runner's input names (by name when they match, else by position)."""
    names = [s.name for s in runner.inputs]
    if all(n in inputs for n in names):
        return {n: inputs[n] for n in names}
    return dict(zip(names, inputs.values()))


def run_model(model: Path | ModelRunner, inputs: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """All outputs of the model on all inputs (in chunks of at most 256 rows, to bound memory)."""
    runner = model if isinstance(model, ModelRunner) else open_runner(Path(model), threads=threads)
    feeds = _named(runner, inputs)
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
    """Accuracy of the first output's argmax against `labels`, else fidelity to `reference` outputs."""
    if labels is not None:
        predicted = outputs[0].reshape(len(outputs[0]), -1).argmax(axis=1)
        top1 = None
        min_cos = None
        if reference is not None:
            parity = compare_many(reference, outputs)
            top1, min_cos = parity.top1_agreement, parity.min_cosine
        return Quality(
            metric="accuracy",
            value=float(np.mean(predicted == labels)),
            top1_agreement=top1,
            min_cosine=min_cos,
            samples=len(labels),
        )
    if reference is None:
        raise ValueError("evaluate() needs labels or reference outputs")
    parity = compare_many(reference, outputs)
    return Quality(
        metric="cosine",
        value=parity.cosine,
        top1_agreement=parity.top1_agreement,
        min_cosine=parity.min_cosine,
        samples=parity.samples,
    )
