"""The one quality vocabulary and scorer: classification, detection, CTC and embedding metrics.

Every side uses these names and this code: the build's measurement (converters/parity.py,
sdk/build/measure.py), the device's health check (agent/health.py), telemetry, the store's columns and the
rollout gate. The table of where each name appears is docs/quality.md.

- `accuracy`  (eval kind `labels`): share of rows whose top-1 output equals the label.
- `agreement` (eval kind `reference`): share of rows whose top-1 equals the reference (fp32) model's top-1,
  on every classifier output (an output with more than one column per row).
- `fidelity`  (eval kind `reference`): mean over rows of cosine(output row, reference row), every output
  of a row concatenated; `fidelity_min` (the worst row) rides along in `detail`.
- `map50` (task detection; labels or reference): mAP at IoU 0.5 of post-NMS boxes (agent/core/quality_tasks.py).
- `token_error_rate` (task ctc; labels or reference): greedy-decoded token edit distance over reference
  length; lower is better.
- `embedding_cosine` (task embedding; labels or reference): mean cosine of embedding vectors;
  `embedding_cosine_min` in `detail`.

Standard library and numpy only (Python 3.8): the agent imports it on devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from edgefleet.agent.core import quality_tasks as tasks
from edgefleet.agent.core.errors import AgentError

if TYPE_CHECKING:
    import numpy as np

ACCURACY = "accuracy"
AGREEMENT = "agreement"
FIDELITY = "fidelity"
MAP50 = "map50"
TOKEN_ERROR_RATE = "token_error_rate"
EMBEDDING_COSINE = "embedding_cosine"
# The metrics with a store column and a rollout-rule field of their own (sdk/store, sdk/fleet/strategy.py).
METRIC_NAMES = (ACCURACY, AGREEMENT, FIDELITY)
# The task metrics: stored in telemetry payloads and gated through the manifest's health floor.
TASK_METRIC_NAMES = (MAP50, TOKEN_ERROR_RATE, EMBEDDING_COSINE)
ALL_METRIC_NAMES = METRIC_NAMES + TASK_METRIC_NAMES
# `--task` values: one of the tasks, or `auto` (inferred from outputs and labels; docs/quality.md).
TASKS = tasks.TASKS
AUTO = tasks.AUTO
EVAL_KINDS = ("labels", "reference")
# Where a reading came from: the bundle's eval set, users' feedback labels, or a shadow (reference) model.
SOURCES = ("eval", "feedback", "shadow")
# Names older manifests, reports and agents used for the same quantities; they still parse.
LEGACY_NAMES = {
    "cosine": FIDELITY,
    "mean_cosine": FIDELITY,
    "top1_agreement": AGREEMENT,
    "eval_accuracy": ACCURACY,
}

Outputs = Union["np.ndarray", Sequence["np.ndarray"]]
Reading = Union["Quality", float, int, None]


class QualityError(AgentError, ValueError):
    """A quality metric name, reading or eval data is invalid; the reason names the fix."""

    default_code = "quality-invalid"


@dataclass(frozen=True)
class Metric:
    """One quality metric: the eval kind it needs, its direction and the names it goes by elsewhere."""

    name: str
    eval_kinds: Tuple[str, ...]
    higher_is_better: bool
    meaning: str
    task: str = tasks.CLASSIFICATION

    @property
    def eval_kind(self) -> str:
        """The first eval kind that scores this metric (`labels` or `reference`)."""
        return self.eval_kinds[0]

    @property
    def gate(self) -> str:
        """The rollout rule's field that bounds this metric: `min_accuracy`, or `max_` for lower-is-better."""
        return ("min_" if self.higher_is_better else "max_") + self.name

    @property
    def flag(self) -> str:
        """The deploy command's flag for that bound, e.g. `--min-accuracy`."""
        return "--" + self.gate.replace("_", "-")


_BOTH = ("labels", "reference")
# The metrics with a store column and a rollout-rule field (`min_accuracy`, ...), as before tasks existed.
METRICS: Dict[str, Metric] = {
    ACCURACY: Metric(ACCURACY, ("labels",), True, "share of rows whose top-1 output equals the label"),
    AGREEMENT: Metric(
        AGREEMENT, ("reference",), True, "share of rows whose top-1 equals the reference model's top-1"
    ),
    FIDELITY: Metric(
        FIDELITY,
        ("reference",),
        True,
        "mean cosine of output rows to reference rows, all outputs concatenated",
    ),
}
# The task metrics (docs/quality.md): gated through the manifest's health bound.
TASK_METRICS: Dict[str, Metric] = {
    MAP50: Metric(
        MAP50,
        _BOTH,
        True,
        "mAP at IoU 0.5 of post-NMS boxes against labels or the fp32 model's boxes",
        tasks.DETECTION,
    ),
    TOKEN_ERROR_RATE: Metric(
        TOKEN_ERROR_RATE,
        _BOTH,
        False,
        "greedy CTC token edit distance over reference tokens (labels or fp32)",
        tasks.CTC,
    ),
    EMBEDDING_COSINE: Metric(
        EMBEDDING_COSINE,
        _BOTH,
        True,
        "mean cosine of embedding vectors to the target (labels or fp32) vectors",
        tasks.EMBEDDING,
    ),
}
ALL_METRICS: Dict[str, Metric] = {**METRICS, **TASK_METRICS}


def canonical_metric(name: Any) -> str:
    """The vocabulary's name for `name` (old names such as `cosine` map to theirs); raises QualityError."""
    if isinstance(name, str):
        key = name.strip().lower()
        key = LEGACY_NAMES.get(key, key)
        if key in ALL_METRICS:
            return key
    raise QualityError(
        reason=f"unknown quality metric {name!r}; use one of {', '.join(ALL_METRIC_NAMES)} "
        "(accuracy with labels, agreement or fidelity with reference outputs, the task metrics with either)"
    )


def metric(name: Any) -> Metric:
    """The registry entry of a metric name (old names accepted)."""
    return ALL_METRICS[canonical_metric(name)]


def metrics_for_kind(kind: str) -> Tuple[str, ...]:
    """The metrics an eval kind (`labels` or `reference`) can score."""
    if kind not in EVAL_KINDS:
        raise QualityError(reason=f"unknown eval kind {kind!r}; use `labels` or `reference`")
    return tuple(m.name for m in ALL_METRICS.values() if kind in m.eval_kinds)


def default_metric(kind: str) -> str:
    """The metric a build budgets and a device gates on for an eval kind: accuracy or fidelity."""
    return ACCURACY if metrics_for_kind(kind)[0] == ACCURACY else FIDELITY


def check_task(task: Any) -> str:
    """`task` checked against the `--task` values (classification, detection, ctc, embedding, auto)."""
    if isinstance(task, str) and task.strip().lower() in (*TASKS, AUTO):
        return task.strip().lower()
    raise QualityError(reason=f"unknown task {task!r}; use one of {', '.join(TASKS)} or {AUTO}")


def metric_for_task(task: str, kind: str) -> str:
    """The metric a task is scored by on an eval kind: accuracy / agreement, map50, token_error_rate, ..."""
    task = check_task(task)
    if task == AUTO:
        return default_metric(kind)
    if task == tasks.CLASSIFICATION:
        metrics_for_kind(kind)
        return ACCURACY if kind == "labels" else AGREEMENT
    return next(m.name for m in ALL_METRICS.values() if m.task == task)


# ---- readings ------------------------------------------------------------------------------------


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, np.generic) and np.issubdtype(type(value), np.number):
                value = float(value)
            else:
                return None
        except ImportError:  # pragma: no cover - numpy is always there on the agent
            return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Quality:
    """One quality reading: a metric's value over `samples` rows, from `source`, with other scores in `detail`."""

    metric: str
    value: float
    samples: int = 0
    detail: Dict[str, float] = field(default_factory=dict)
    source: str = "eval"

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", canonical_metric(self.metric))
        if self.source not in SOURCES:
            raise QualityError(
                reason=f"unknown quality source {self.source!r}; use one of {', '.join(SOURCES)}"
            )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form: {metric, value, samples, source} plus `detail` when there is any."""
        out: Dict[str, Any] = {
            "metric": self.metric,
            "value": round(self.value, 6),
            "samples": self.samples,
            "source": self.source,
        }
        if self.detail:
            out["detail"] = {k: round(v, 6) for k, v in self.detail.items()}
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Quality:
        """Parse the JSON form (old metric names accepted); raises QualityError naming the bad field."""
        if not isinstance(obj, Mapping):
            raise QualityError(
                reason="a quality reading must be a JSON object {metric, value, samples, source}"
            )
        value = _finite(obj.get("value"))
        if value is None:
            raise QualityError(reason=f"quality `value` must be a finite number, got {obj.get('value')!r}")
        samples = obj.get("samples", 0)
        detail_obj = obj.get("detail") if isinstance(obj.get("detail"), Mapping) else {}
        assert isinstance(detail_obj, Mapping)
        detail = {str(k): v for k, v in ((k, _finite(v)) for k, v in detail_obj.items()) if v is not None}
        source = obj.get("source") or "eval"
        return cls(
            metric=canonical_metric(obj.get("metric")),
            value=value,
            samples=int(samples) if isinstance(samples, int) and not isinstance(samples, bool) else 0,
            detail=detail,
            source=source if source in SOURCES else "eval",
        )

    def get(self, name: str) -> Optional[float]:
        """The value of any metric this reading carries (its own or one in `detail`), else None."""
        if name == self.metric:
            return self.value
        return self.detail.get(name)


def reading_from(obj: Any) -> Optional[Quality]:
    """A Quality from a telemetry part in any form the agents sent, or None when it carries none.

    Reads the current `quality` part ({metric, value, samples, source, detail}), a Quality itself, and the
    older `eval` dicts: a health report or eval result ({metric: accuracy|cosine|top1_agreement, value,
    samples, accuracy, cosine, min_cosine, top1_agreement, ...}) or a bare {accuracy: x}.
    """
    if obj is None or isinstance(obj, Quality):
        return obj
    if not isinstance(obj, Mapping) or obj.get("error"):
        return None
    scores: Dict[str, float] = {}
    for key, raw in obj.items():
        value = _finite(raw)
        if value is None or not isinstance(key, str):
            continue
        if key in ALL_METRICS or key in LEGACY_NAMES:
            scores.setdefault(canonical_metric(key), value)
        elif key in ("min_cosine", "fidelity_min"):
            scores["fidelity_min"] = value
    detail_obj = obj.get("detail")
    if isinstance(detail_obj, Mapping):
        for key, raw in detail_obj.items():
            value = _finite(raw)
            if value is not None and isinstance(key, str):
                scores.setdefault(
                    LEGACY_NAMES.get(key, "fidelity_min" if key == "min_cosine" else key), value
                )
    named: Optional[str] = None
    value = _finite(obj.get("value"))
    try:
        named = canonical_metric(obj.get("metric")) if obj.get("metric") is not None else None
    except QualityError:
        named = None
    if named is not None and value is not None:
        scores[named] = value
    elif named is None:
        present = [m for m in ALL_METRIC_NAMES if m in scores]
        if not present:
            return None
        # Without a named metric, accuracy wins (labels), else the build's default for reference evals.
        named = ACCURACY if ACCURACY in scores else (FIDELITY if FIDELITY in scores else present[0])
    elif named not in scores:
        return None
    name: str = named
    samples = obj.get("samples", 0)
    source = obj.get("source")
    return Quality(
        metric=name,
        value=scores[name],
        samples=int(samples) if isinstance(samples, int) and not isinstance(samples, bool) else 0,
        detail={k: v for k, v in scores.items() if k != name},
        source=source if source in SOURCES else "eval",
    )


def columns(reading: Any) -> Dict[str, Optional[float]]:
    """The store's quality columns {accuracy, agreement, fidelity} from a reading in any form."""
    quality = reading_from(reading)
    return {name: None if quality is None else quality.get(name) for name in METRIC_NAMES}


def passes(reading: Reading, floor: Optional[float], metric_name: str = ACCURACY) -> bool:
    """Whether a reading (a Quality or a bare value of `metric_name`) meets `floor`; no floor always passes."""
    if floor is None:
        return True
    name = canonical_metric(metric_name)
    value = reading.get(name) if isinstance(reading, Quality) else _finite(reading)
    if value is None:
        return False
    return value >= floor if ALL_METRICS[name].higher_is_better else value <= floor


def floor_for(metric_name: str, reference_value: float, max_drop: float) -> float:
    """The health bound a budget sets: the reference value less `max_drop` (plus, lower-is-better), in [0, 1]."""
    if not 0.0 <= max_drop < 1.0:
        raise QualityError(
            reason=f"a quality drop budget must be in [0, 1) (0.01 = one point), got {max_drop}"
        )
    name = canonical_metric(metric_name)
    bound = reference_value - max_drop if ALL_METRICS[name].higher_is_better else reference_value + max_drop
    return min(1.0, max(0.0, float(bound)))


def drop(metric_name: str, reference_value: float, value: float) -> float:
    """How much worse `value` is than the reference model's value of the same metric (negative = better)."""
    name = canonical_metric(metric_name)
    return reference_value - value if ALL_METRICS[name].higher_is_better else value - reference_value


# ---- scoring -------------------------------------------------------------------------------------


def _as_list(outputs: Outputs) -> List[np.ndarray]:
    import numpy as np

    if isinstance(outputs, np.ndarray):
        return [outputs]
    return [np.asarray(o) for o in outputs]


def as_rows(array: Any, rows: Optional[int] = None) -> np.ndarray:
    """An output as float64 (rows, features): the first dimension is the row, the rest is flattened."""
    import numpy as np

    arr = np.asarray(array, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    n = arr.shape[0] if rows is None else rows
    if n <= 0 or arr.size % n:
        raise QualityError(
            "eval-invalid", f"an output of shape {tuple(np.shape(array))} cannot be split into {n} rows"
        )
    return arr.reshape(n, -1)


def _pair(outputs: Outputs, reference: Outputs) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Outputs and reference outputs as row matrices of equal shapes, output by output."""
    got, ref = _as_list(outputs), _as_list(reference)
    if len(got) != len(ref) or not got:
        raise QualityError(
            "eval-invalid",
            f"the model gives {len(got)} output(s), the reference has {len(ref)}; they must match one to one",
        )
    n = as_rows(ref[0]).shape[0]
    got_rows = [as_rows(g, n) for g in got]
    ref_rows = [as_rows(r, n) for r in ref]
    for i, (g, r) in enumerate(zip(got_rows, ref_rows)):
        if g.shape != r.shape:
            raise QualityError(
                "eval-invalid",
                f"output {i} has shape {tuple(np.shape(got[i]))}, its reference {tuple(np.shape(ref[i]))}",
            )
    return got_rows, ref_rows


def top1(output: Any) -> np.ndarray:
    """The top-1 class of every row of one output."""
    return as_rows(output).argmax(axis=1)


def accuracy(outputs: Outputs, labels: Any) -> float:
    """Share of rows whose top-1 of the first (classifier) output equals the label."""
    import numpy as np

    first = as_rows(_as_list(outputs)[0])
    wanted = np.asarray(labels).reshape(len(np.asarray(labels)), -1)[:, 0].astype(np.int64)
    if wanted.shape[0] != first.shape[0]:
        raise QualityError(
            "eval-invalid",
            f"{wanted.shape[0]} labels for {first.shape[0]} output rows; give one label per row",
        )
    return float(np.mean(first.argmax(axis=1) == wanted))


def agreement(outputs: Outputs, reference: Outputs) -> Optional[float]:
    """Share of rows whose top-1 equals the reference's on every classifier output; None without one."""
    import numpy as np

    got, ref = _pair(outputs, reference)
    classifiers = [(g, r) for g, r in zip(got, ref) if g.shape[1] > 1]
    if not classifiers:
        return None
    same = np.ones(got[0].shape[0], dtype=bool)
    for g, r in classifiers:
        same &= g.argmax(axis=1) == r.argmax(axis=1)
    return float(np.mean(same))


def row_cosines(outputs: Outputs, reference: Outputs) -> np.ndarray:
    """cosine(output row, reference row) for every row, every output of a row concatenated."""
    import numpy as np

    got, ref = _pair(outputs, reference)
    g = np.concatenate(got, axis=1)
    r = np.concatenate(ref, axis=1)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    dots = np.sum(g * r, axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one shares no direction.
    same = np.all(g == r, axis=1)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-300), np.where(same, 1.0, 0.0))


def fidelity(outputs: Outputs, reference: Outputs) -> Tuple[float, float]:
    """(mean, min) over rows of the cosine to the reference rows, every output concatenated."""
    cos = row_cosines(outputs, reference)
    return float(cos.mean()), float(cos.min())


def score(
    outputs: Outputs, *, labels: Any = None, reference: Optional[Outputs] = None, task: Optional[str] = None
) -> Dict[str, float]:
    """Every metric the data allows for `task` (None or classification: accuracy, agreement, fidelity).

    A detection, CTC or embedding task scores its own metric against labels when given, else against the
    reference outputs; with reference outputs of the same shapes, fidelity and fidelity_min ride along.
    """
    out: Dict[str, float] = {}
    if task not in (None, tasks.CLASSIFICATION, AUTO):
        if labels is None and reference is None:
            raise QualityError(
                "eval-invalid", f"scoring the {task} task needs labels `y` or reference outputs"
            )
        try:
            out.update(
                tasks.task_scores(str(task), _as_list(outputs), labels=labels, reference=_ref(reference))
            )
        except tasks.TaskDataError as exc:
            raise QualityError("eval-invalid", exc.reason) from None
        if reference is not None:
            try:
                out[FIDELITY], out["fidelity_min"] = fidelity(outputs, reference)
            except QualityError:
                pass  # outputs of varying shape (e.g. ragged detections) have no row-wise fidelity
        return out
    if labels is not None:
        out[ACCURACY] = accuracy(outputs, labels)
    if reference is not None:
        mean, worst = fidelity(outputs, reference)
        agree = agreement(outputs, reference)
        if agree is not None:
            out[AGREEMENT] = agree
        out[FIDELITY] = mean
        out["fidelity_min"] = worst
    if not out:
        raise QualityError("eval-invalid", "scoring needs labels or reference outputs")
    return out


def _ref(reference: Optional[Outputs]) -> Optional[List[np.ndarray]]:
    return None if reference is None else _as_list(reference)


def resolve_task(
    task: Optional[str], outputs: Outputs, *, labels: Any = None, reference: Optional[Outputs] = None
) -> str:
    """The task to score: `task` itself, or for None / `auto` the one inferred from outputs and labels."""
    name = AUTO if task is None else check_task(task)
    if name != AUTO:
        return name
    return tasks.infer_task(_as_list(outputs), labels, _ref(reference))


def measure(
    outputs: Outputs,
    *,
    labels: Any = None,
    reference: Optional[Outputs] = None,
    metric_name: Optional[str] = None,
    source: str = "eval",
    task: Optional[str] = None,
) -> Quality:
    """One reading of `metric_name`, other scores in detail; without a name, the task's metric.

    The task is the metric's own (map50: detection, ...) when a metric is named, else `task` (None or
    `auto`: inferred, docs/quality.md). Classification and `auto` resolving to it keep the defaults from
    before tasks existed when no task is named: accuracy with labels, else fidelity; an explicit
    `classification` scores agreement against reference outputs.
    """
    if metric_name:
        name = canonical_metric(metric_name)
        resolved = ALL_METRICS[name].task
    else:
        explicit = task is not None and check_task(task) != AUTO
        resolved = resolve_task(task, outputs, labels=labels, reference=reference)
        kind = "labels" if labels is not None else "reference"
        if resolved == tasks.CLASSIFICATION and not explicit:
            name = ACCURACY if labels is not None else FIDELITY
        else:
            name = metric_for_task(resolved, kind)
    if ALL_METRICS[name].task != tasks.CLASSIFICATION and labels is not None and reference is not None:
        reference = None  # a task metric scores against labels when there are any
    scores = score(outputs, labels=labels, reference=reference, task=resolved)
    if name not in scores:
        why = {
            ACCURACY: "it has no labels `y`",
            AGREEMENT: "no output has more than one column per row, so there is no top-1 to compare",
            FIDELITY: "it has no reference outputs",
        }.get(name, "it has neither labels `y` nor reference outputs")
        raise QualityError("eval-invalid", f"the eval data cannot score {name}: {why}")
    samples = int(_as_list(outputs)[0].shape[0]) if _as_list(outputs)[0].ndim else 1
    detail = {k: v for k, v in scores.items() if k != name}
    return Quality(metric=name, value=scores[name], samples=samples, detail=detail, source=source)
