"""Fit a profile's [efficiency] table from latencies devices reported for known models (telemetry).

Each telemetry row names a model (`model_name`, `model_version`), the device's `profile` and its
latency (`p50_ms`, with `count` inferences behind it). For every model the fit needs the model file:
the estimator splits its latency at efficiency 1 into per-op-class times T_c and an op count n, and
the device's latency is modelled as Σ_c T_c / e_c + n · overhead. The unknowns x_c = 1 / e_c are solved
by least squares on the relative error, pulled slightly towards the profile's current table (a ridge
term); a class that no reported model exercises keeps its value. `edgefleet profiles calibrate` writes the
result into a user profile TOML.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from edgefleet.sdk.build.estimate import (
    DEFAULT_GPU_EFFICIENCY,
    OP_CLASSES,
    EstimateError,
    count_flops,
    estimate_cost,
    profile_efficiency,
)

# Weight of the pull towards the current table: tiny, so the reports decide every class they exercise
# (it only steadies classes the reports barely separate; a class no reported model runs is not fitted).
RIDGE = 0.001
# Bounds of a fitted efficiency (the [efficiency] table's allowed range is (0, 4]).
MIN_EFFICIENCY, MAX_EFFICIENCY = 0.002, 4.0


class CalibrationError(EstimateError):
    """Telemetry that cannot calibrate the profile: unreadable, empty, or about no known model."""


@dataclass(frozen=True)
class Observation:
    """One model's latency on the profile's devices: the count-weighted median of reported p50s."""

    model: str
    path: Path
    latency_ms: float
    reports: int
    inferences: int


@dataclass
class FitResult:
    """The fitted table and, per model, estimate / reported latency before and after the fit."""

    efficiency: dict[str, float]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)


def read_telemetry(path: Path) -> list[dict[str, Any]]:
    """Telemetry rows from a recorded export: a JSON list, {"rows"/"telemetry": [...]}, JSON lines or CSV."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the telemetry file: {exc.strerror}") from None
    if path.suffix.lower() == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    try:
        doc: Any = json.loads(text)
    except ValueError:
        try:
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise CalibrationError(
                f"{path}: not JSON, JSON lines or CSV ({exc}); export telemetry as a JSON list of rows"
            ) from None
    if isinstance(doc, dict):
        doc = doc.get("rows", doc.get("telemetry"))
    if not isinstance(doc, list) or not all(isinstance(row, dict) for row in doc):
        raise CalibrationError(f"{path}: expected a list of telemetry rows (objects with model_name, p50_ms)")
    return [_flatten(row) for row in doc]


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A v2 telemetry message (model / latency parts) or a store row (payload) as flat columns."""
    flat = dict(row.get("payload") or {}) if isinstance(row.get("payload"), dict) else {}
    flat.update({k: v for k, v in row.items() if k != "payload"})
    model = flat.get("model")
    if isinstance(model, dict):
        flat.setdefault("model_name", model.get("name"))
        flat.setdefault("model_version", model.get("version"))
    latency = flat.get("latency")
    if isinstance(latency, dict):
        for key in ("p50_ms", "count"):
            flat.setdefault(key, latency.get(key))
    return flat


def observations(
    rows: Sequence[Mapping[str, Any]], profile: str, models: Mapping[str, Path]
) -> list[Observation]:
    """One Observation per known model from the rows of devices on `profile`.

    `models` maps "name" or "name:version" to the model file; a row whose profile is another one, or
    that has no p50, is skipped.
    """
    by_model: dict[str, list[tuple[float, int]]] = {}
    for row in rows:
        if row.get("profile") not in (None, "", profile):
            continue
        p50 = _number(row.get("p50_ms"))
        if p50 is None or p50 <= 0:
            continue
        name, version = str(row.get("model_name") or ""), row.get("model_version")
        key = f"{name}:{version}" if f"{name}:{version}" in models else name
        if key not in models:
            continue
        count = int(_number(row.get("count")) or 1)
        by_model.setdefault(key, []).append((p50, max(count, 1)))
    out = []
    for key, reports in sorted(by_model.items()):
        out.append(
            Observation(
                key, Path(models[key]), _weighted_median(reports), len(reports), sum(c for _, c in reports)
            )
        )
    return out


def store_rows(store: Any, fleet: str, profile: str) -> list[dict[str, Any]]:
    """The fleet store's latency windows of devices on `profile`, as telemetry rows for `observations`."""
    return [
        {
            "device_id": r.device_id,
            "profile": r.profile,
            "model_name": r.model_name,
            "model_version": r.model_version,
            "p50_ms": r.p50_ms,
            "count": r.count,
        }
        for readings in store.latency_readings(fleet, profile=profile).values()
        for r in readings
    ]


def store_models(
    store: Any, rows: Sequence[Mapping[str, Any]], profile: str, given: Mapping[str, Path]
) -> tuple[dict[str, Path], list[str]]:
    """Model files for the rows' model versions: `given` (NAME[:VERSION]) first, else the stored bundle.

    A version's bundle is the one built for `profile`, else the only bundle of that version. Returns the
    NAME:VERSION → file map and one line per reported version left without a file (and why).
    """
    models = {k: Path(v) for k, v in given.items()}
    missing: list[str] = []
    wanted = sorted({(str(r.get("model_name") or ""), r.get("model_version")) for r in rows}, key=str)
    for name, version in wanted:
        key = f"{name}:{version}"
        if not name or key in models or name in models:
            continue
        found = [b for b in store.bundles(name) if b["version"] == version]
        own = [b for b in found if b["profile"] == profile]
        files = {f for f in (_bundle_model(b) for b in (own or found)) if f is not None}
        if len(files) == 1:
            models[key] = files.pop()
        elif not found:
            missing.append(f"{key}: no bundle of this version in the store")
        elif not files:
            missing.append(f"{key}: its stored bundle's model file is not on this host")
        else:
            which = f"built for {profile}" if own else f"and none built for {profile}"
            missing.append(f"{key}: {len(files)} bundles of this version {which}; say which with --model")
    return models, missing


def _bundle_model(row: Mapping[str, Any]) -> Optional[Path]:
    """The model file inside a stored bundle folder (manifest `model.file`), None when it is not there."""
    manifest = row.get("manifest") or {}
    spec = manifest.get("model") if isinstance(manifest, Mapping) else None
    name = spec.get("file") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    path = Path(str(row.get("path") or "")) / name
    return path if path.is_file() else None


def fit_efficiency(
    obs: Sequence[Observation], profile: Any, dims: Optional[Mapping[str, int]] = None
) -> FitResult:
    """Least-squares fit of 1 / efficiency per op class to the observed latencies (see the module doc)."""
    import numpy as np

    if not obs:
        raise CalibrationError(
            f"no telemetry row of profile {profile.name!r} names a model given with --model; "
            "check the profile name and the model names (NAME or NAME:VERSION=PATH)"
        )
    prior = profile_efficiency(profile)
    prior.setdefault("gpu", DEFAULT_GPU_EFFICIENCY)
    unit = {**{c: 1.0 for c in OP_CLASSES}, "gpu": 1.0, "op_overhead_us": 0.0}
    rows: list[
        tuple[dict[str, float], float, float]
    ] = []  # (class ms at efficiency 1, overhead ms, measured)
    classes: list[str] = []
    before: dict[str, float] = {}
    costs = {}
    for ob in obs:
        cost = _first_cost(ob, profile, dims)
        costs[ob.model] = cost
        raw = estimate_cost(cost, profile, efficiency=unit)
        per_class = {k: v for k, v in raw.class_ms.items() if k != "overhead" and v > 0}
        ops = sum(1 for op in cost.ops if op.flops or op.bytes_moved)
        overhead_ms = ops * _overhead_us(profile, prior) / 1000.0
        rows.append((per_class, overhead_ms, ob.latency_ms))
        classes += [c for c in per_class if c not in classes]
        before[ob.model] = estimate_cost(cost, profile, efficiency=prior).estimate_ms / ob.latency_ms
    x0 = np.array([1.0 / prior[c] for c in classes])
    a = np.array([[per[c] / meas if c in per else 0.0 for c in classes] for per, _, meas in rows])
    b = np.array([1.0 - over / meas for _, over, meas in rows])
    ridge = math.sqrt(RIDGE)
    a_full = np.vstack([a, np.diag(ridge / x0)])
    b_full = np.concatenate([b, np.full(len(classes), ridge)])
    x, *_ = np.linalg.lstsq(a_full, b_full, rcond=None)
    fitted = dict(prior)
    for cls, value in zip(classes, x):
        eff = 1.0 / value if value > 0 else MAX_EFFICIENCY
        fitted[cls] = round(min(MAX_EFFICIENCY, max(MIN_EFFICIENCY, eff)), 4)
    after = {
        ob.model: estimate_cost(costs[ob.model], profile, efficiency=fitted).estimate_ms / ob.latency_ms
        for ob in obs
    }
    return FitResult(fitted, before, after, list(obs))


def _first_cost(ob: Observation, profile: Any, dims: Optional[Mapping[str, int]]) -> Any:
    """The model's per-op cost at the profile's batch size."""
    return count_flops(ob.path, int(profile.batch_size or 1), dims)


def _overhead_us(profile: Any, table: Mapping[str, float]) -> float:
    """Per-op dispatch cost the estimator uses for this profile."""
    from edgefleet.sdk.build.estimate import HOST_CLOCK_GHZ, OP_OVERHEAD_US

    if "op_overhead_us" in table:
        return float(table["op_overhead_us"])
    return OP_OVERHEAD_US * HOST_CLOCK_GHZ / profile.clock_ghz


def _number(value: Any) -> Optional[float]:
    """A float from a JSON number or a CSV string, None when empty or not a number."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _weighted_median(values: Sequence[tuple[float, int]]) -> float:
    """Median of (value, weight) pairs: the value where half the weight lies on either side."""
    ordered = sorted(values)
    total = sum(w for _, w in ordered)
    seen = 0
    for value, weight in ordered:
        seen += weight
        if seen * 2 >= total:
            return value
    return ordered[-1][0]


def profile_toml(profile: Any, efficiency: Mapping[str, float], note: str) -> str:
    """A complete profile TOML: the base profile's fields with the fitted [efficiency] table."""
    doc = profile.to_dict()
    lines = [
        f"# {note}",
        f"name = {_toml(doc['name'])}",
        f"description = {_toml(doc['description'])}",
        "",
        "[cpu]",
        f"model = {_toml(doc['cpu_model'])}",
        f"cores = {doc['cores']}",
        f"clock_ghz = {doc['clock_ghz']!r}",
        f"isa = {_toml(doc['isa'])}",
        f"sustained_gflops = {float(doc['sustained_gflops'])!r}",
        f"fp16_speedup = {float(doc['fp16_speedup'])!r}",
        f"int8_speedup = {float(doc['int8_speedup'])!r}",
        "",
        "[memory]",
        f"ram_mb = {doc['ram_mb']}",
        f"bandwidth_gbs = {float(doc['mem_bandwidth_gbs'])!r}",
    ]
    gpu = doc.get("gpu")
    if gpu:
        lines += ["", "[gpu]"] + [f"{k} = {_toml(v)}" for k, v in gpu.items()]
    lines += [
        "",
        "[software]",
        f"runtimes = {_toml(doc['runtimes'])}",
        f"precisions = {_toml(doc['precisions'])}",
        f"python = {_toml(doc['python'])}",
        f"os = {_toml(doc['os'])}",
        "",
        "[budgets]",
        f"max_model_mb = {float(doc['max_model_mb'])!r}",
        f"p95_latency_ms = {float(doc['p95_latency_ms'])!r}",
        f"batch_size = {doc['batch_size']}",
        f"threads = {doc['threads']}",
        "",
        "[efficiency]",
    ]
    lines += [f"{k} = {float(v)!r}" for k, v in sorted(efficiency.items())]
    sources = dict(doc.get("sources") or {})
    sources["efficiency"] = note
    lines += ["", "[sources]"] + [f"{k} = {_toml(v)}" for k, v in sources.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML literal for a string, number or list of them."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(float(value)) if isinstance(value, float) else str(value)
