"""Health check of a freshly loaded model: warm-up, quality on the bundle's eval set, p95 latency, timeout.

Quality is scored by agent/core/quality.py on every model output: accuracy against labels `y`, or
agreement and fidelity against reference outputs, or a task metric (map50, token_error_rate,
embedding_cosine) against either; the bound (`health.metric` ≥ `health.min_quality`, ≤ for a
lower-is-better metric) and the other limits come from the manifest's `health` policy (docs/quality.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.quality import (
    ALL_METRICS,
    Quality,
    QualityError,
    canonical_metric,
    measure,
    passes,
    reading_from,
)
from edgefleet.agent.telemetry import LatencyHistogram

if TYPE_CHECKING:
    import numpy as np

    from edgefleet.agent.core.manifest import EvalSpec, HealthPolicy

PathLike = Union[str, "os.PathLike[str]"]
RunFn = Callable[[Dict[str, "np.ndarray"]], Dict[str, "np.ndarray"]]
# Quality is scored in batches of this many rows when the model takes any batch size.
EVAL_BATCH = 64
# Latency is measured on single requests, like the serving path; at most this many of them.
LATENCY_RUNS = 50


class HealthError(AgentError):
    """The health check failed; `report` holds what was measured up to the failure."""

    default_code = "health-failed"

    def __init__(self, code: str, reason: str, report: Optional[HealthReport] = None) -> None:
        self.report = report
        super().__init__(code, reason)


@dataclass
class HealthReport:
    """What a health check measured and whether it passed; `detail` holds the other quality scores."""

    passed: bool = False
    metric: str = ""
    value: Optional[float] = None
    minimum: Optional[float] = None
    samples: int = 0
    detail: Dict[str, float] = field(default_factory=dict)
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    max_p95_ms: Optional[float] = None
    warmup_runs: int = 0
    duration_s: float = 0.0
    code: str = ""
    reason: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON form (floats rounded)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 6) if math.isfinite(value) else None
        out["detail"] = {k: round(v, 6) for k, v in self.detail.items() if math.isfinite(v)}
        return out

    def quality(self) -> Optional[Quality]:
        """The quality reading this check took, or None when it failed before scoring."""
        return reading_from(self.to_dict()) if self.value is not None else None


@dataclass
class EvalData:
    """The eval set: inputs by model input name, labels or reference outputs."""

    inputs: Dict[str, np.ndarray]
    labels: Optional[np.ndarray]
    reference: Optional[List[np.ndarray]]

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def load_eval(
    path: PathLike, input_names: Sequence[str], kind: str, output_names: Sequence[str] = ()
) -> EvalData:
    """Read eval.npz (never pickles): `x` or one array per input name, plus `y` or the reference outputs.

    Reference outputs are `reference` (the first output, or the only one) and `reference:NAME` for
    outputs after the first; the host writes both forms (sdk/build/builder.py `_eval_npz`).
    """
    import numpy as np

    try:
        with np.load(os.fspath(path), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise HealthError("eval-invalid", f"{os.fspath(path)} is not a readable .npz: {exc}") from None
    if all(n in arrays for n in input_names):
        inputs = {n: arrays[n] for n in input_names}
    elif len(input_names) == 1 and "x" in arrays:
        inputs = {input_names[0]: arrays["x"]}
    else:
        raise HealthError(
            "eval-invalid",
            f"eval.npz has arrays {sorted(arrays)}; it needs `x` or one array per model input {list(input_names)}",
        )
    sizes = {int(v.shape[0]) if v.ndim else 0 for v in inputs.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise HealthError(
            "eval-invalid", f"eval inputs must share a non-zero first dimension, got sizes {sizes}"
        )
    n = sizes.pop()
    labels = arrays.get("y")
    if kind == "labels":
        if labels is None or labels.shape[0] != n:
            raise HealthError("eval-invalid", f"eval.npz needs labels `y` with {n} rows for kind `labels`")
        # Kept as stored: class indices (N,), detection rows (N, G, 5), CTC tokens (N, L), target vectors.
        return EvalData(
            inputs, labels if labels.ndim > 1 or labels.dtype.kind == "f" else labels.astype(np.int64), None
        )
    first = arrays.get("reference")
    if first is None or first.ndim == 0 or first.shape[0] != n:
        raise HealthError(
            "eval-invalid", f"eval.npz needs `reference` outputs with {n} rows for kind `reference`"
        )
    reference = [first]
    for name in list(output_names)[1:]:
        extra = arrays.get("reference:" + name)
        if extra is None:
            break  # an older bundle: only the first output has reference values
        reference.append(extra)
    return EvalData(inputs, None, reference)


def quality_of(outputs: Union[np.ndarray, Sequence[np.ndarray]], data: EvalData, metric: str) -> Quality:
    """The reading of `metric` over the eval set, other scores in its detail; HealthError when it cannot.

    Outputs the eval set has no reference values for (bundles built before every output was kept) are
    left out of agreement and fidelity.
    """
    import numpy as np

    got = [outputs] if isinstance(outputs, np.ndarray) else list(outputs)
    reference = data.reference
    if reference is not None:
        got = got[: len(reference)]
    try:
        return measure(got, labels=data.labels, reference=reference, metric_name=metric)
    except QualityError as exc:
        raise HealthError("eval-invalid", exc.reason) from None


def score(outputs: Union[np.ndarray, Sequence[np.ndarray]], data: EvalData, metric: str) -> Dict[str, float]:
    """Every quality score over the eval set by name (accuracy, agreement, fidelity, fidelity_min)."""
    reading = quality_of(outputs, data, metric)
    return {reading.metric: reading.value, **reading.detail}


def run_outputs(
    run: RunFn,
    data: EvalData,
    output_names: Union[str, Sequence[str]],
    batch: int,
    deadline: float,
) -> List[np.ndarray]:
    """Every named output over the whole eval set, in batches, checking the deadline between batches."""
    import numpy as np

    names = [output_names] if isinstance(output_names, str) else list(output_names)
    parts: List[List[np.ndarray]] = [[] for _ in names]
    n = len(data)
    for start in range(0, n, batch):
        if time.monotonic() > deadline:
            raise HealthError(
                "health-timeout", f"scoring the eval set ran past the timeout at row {start} of {n}"
            )
        feeds = {k: v[start : start + batch] for k, v in data.inputs.items()}
        result = run(feeds)
        for i, name in enumerate(names):
            parts[i].append(result[name])
    return [np.concatenate(p) for p in parts]


def check_health(
    run: RunFn,
    input_names: Sequence[str],
    output_names: Union[str, Sequence[str]],
    eval_path: PathLike,
    eval_spec: EvalSpec,
    policy: HealthPolicy,
    *,
    batch_size: Optional[int] = None,
) -> HealthReport:
    """Warm up, score every output on the eval set, measure p95 latency; raise HealthError naming the failure."""
    started = time.monotonic()
    deadline = started + float(policy.timeout_s)
    names = [output_names] if isinstance(output_names, str) else list(output_names)
    report = HealthReport(
        metric=policy.metric or eval_spec.metric,
        minimum=policy.min_quality,
        max_p95_ms=policy.max_p95_ms,
        warmup_runs=policy.warmup_runs,
    )

    def fail(code: str, reason: str) -> HealthError:
        report.passed, report.code, report.reason = False, code, reason
        report.duration_s = time.monotonic() - started
        return HealthError(code, reason, report)

    try:
        data = load_eval(eval_path, input_names, eval_spec.kind, names)
        report.samples = len(data)
        # A model converted with a fixed batch is timed and scored at that batch, others one row at a time.
        one = max(1, int(batch_size or 1))
        n = len(data)
        single = [{k: v[i : i + one] for k, v in data.inputs.items()} for i in range(0, n - one + 1, one)]
        single = single or [{k: v[:one] for k, v in data.inputs.items()}]
        eval_batch = EVAL_BATCH if batch_size is None else one
        for i in range(policy.warmup_runs):
            if time.monotonic() > deadline:
                raise HealthError("health-timeout", f"warm-up run {i + 1} ran past the timeout")
            run(single[i % len(single)])
        outputs = run_outputs(run, data, names, eval_batch, deadline)
        reading = quality_of(outputs, data, report.metric)
        report.value, report.detail = reading.value, dict(reading.detail)
        hist = LatencyHistogram()
        for i in range(min(LATENCY_RUNS, len(single) * 4)):
            if time.monotonic() > deadline:
                raise HealthError("health-timeout", f"latency run {i + 1} ran past the timeout")
            t0 = time.perf_counter()
            run(single[i % len(single)])
            hist.record((time.perf_counter() - t0) * 1000.0)
        report.p50_ms, report.p95_ms = hist.percentile(50), hist.percentile(95)
    except HealthError as exc:
        raise fail(exc.code, exc.reason) from None
    except AgentError as exc:
        raise fail(exc.code, exc.reason) from None
    except Exception as exc:  # the runtime failed on the bundle's own data: the model is unusable
        raise fail(
            "health-infer-failed", f"the model failed on its eval data: {type(exc).__name__}: {exc}"
        ) from None
    if time.monotonic() > deadline:
        raise fail("health-timeout", f"the health check took longer than its {policy.timeout_s:g} s timeout")
    if not passes(report.value, report.minimum, report.metric):
        higher = ALL_METRICS[canonical_metric(report.metric)].higher_is_better
        raise fail(
            "below-minimum" if higher else "above-maximum",
            f"{report.metric} {report.value:.4f} on {report.samples} eval samples is "
            f"{'below the manifest minimum' if higher else 'above the manifest maximum'} {report.minimum:.4f} "
            "(health.min_quality)",
        )
    if policy.max_p95_ms is not None and report.p95_ms is not None and report.p95_ms > policy.max_p95_ms:
        raise fail(
            "latency-above-maximum",
            f"p95 latency {report.p95_ms:.3f} ms is above the manifest maximum {policy.max_p95_ms:g} ms",
        )
    report.passed = True
    report.duration_s = time.monotonic() - started
    return report
