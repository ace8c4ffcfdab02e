"""Read-only views the API and dashboard need beyond `Store`'s own methods (aggregates over its tables)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Optional

from sqlalchemy import and_, case, func, select

from edgefleet.agent.core.codes import ENDED_ROLLOUT, FINISHED_DEVICE, DeviceStatus
from edgefleet.agent.core.quality import METRIC_NAMES
from edgefleet.sdk.store import (
    SeriesPoint,
    Store,
    events,
    gaps,
    rollout_devices,
    rollouts,
    telemetry,
)
from edgefleet.sdk.store import (
    devices as devices_table,
)

# The largest ids and versions the store's columns hold (bundles.id is a 32-bit INTEGER on PostgreSQL,
# versions are BIGINT): larger numbers in a request are refused (422) before they reach the database.
MAX_BUNDLE_ID = 2**31 - 1
MAX_VERSION = 2**63 - 1

# The contract (agent/core/codes.py) owns the status names; the API only groups them.
FINISHED_DEVICE_STATUSES = frozenset(FINISHED_DEVICE)
SUCCESS_DEVICE_STATUSES = frozenset({DeviceStatus.DEPLOYED})
FINISHED_ROLLOUT_STATUSES = frozenset(ENDED_ROLLOUT)


def jsonable(value: Any) -> Any:
    """Replace non-finite floats (NaN from an agent, inf) with None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def point_dict(point: SeriesPoint) -> dict[str, Any]:
    """A series point as a JSON object: latency, and quality under the vocabulary's names."""
    return jsonable(asdict(point))


def _weight() -> Any:
    """Weight of one telemetry window: its inference count, at least 1 (as `Store.series` weights)."""
    return case((telemetry.c.count > 0, telemetry.c.count), else_=1)


def _weighted_mean(column: Any) -> Any:
    """SQL for the count-weighted mean of a column over the rows where it is present."""
    weight = _weight()
    return func.sum(column * weight) / func.nullif(func.sum(case((column.is_(None), 0), else_=weight)), 0)


def latest_per_device(store: Store, fleet: str) -> dict[str, dict[str, Any]]:
    """Each device's newest telemetry row (any model)."""
    newest = (
        select(telemetry.c.device_id, func.max(telemetry.c.ts).label("ts"))
        .where(telemetry.c.fleet == fleet)
        .group_by(telemetry.c.device_id)
        .subquery()
    )
    query = select(telemetry).join(
        newest,
        and_(
            telemetry.c.fleet == fleet,
            telemetry.c.device_id == newest.c.device_id,
            telemetry.c.ts == newest.c.ts,
        ),
    )
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[str(row.device_id)] = dict(row._mapping)
    return out


def latest_per_device_version(store: Store, fleet: str) -> list[dict[str, Any]]:
    """The newest telemetry row of every (device, model, version) pair, with totals over all windows."""
    key = (telemetry.c.device_id, telemetry.c.model_name, telemetry.c.model_version)
    agg = (
        select(
            *key,
            func.max(telemetry.c.ts).label("ts"),
            func.sum(telemetry.c.count).label("total_count"),
            func.sum(telemetry.c.errors).label("total_errors"),
        )
        .where(telemetry.c.fleet == fleet)
        .group_by(*key)
        .subquery()
    )
    query = (
        select(telemetry, agg.c.total_count, agg.c.total_errors)
        .join(
            agg,
            and_(
                telemetry.c.fleet == fleet,
                telemetry.c.device_id == agg.c.device_id,
                telemetry.c.model_name.is_not_distinct_from(agg.c.model_name),
                telemetry.c.model_version.is_not_distinct_from(agg.c.model_version),
                telemetry.c.ts == agg.c.ts,
            ),
        )
        .order_by(telemetry.c.device_id, telemetry.c.model_name, telemetry.c.model_version)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    seen: set[tuple[Any, ...]] = set()
    out = []
    for row in rows:
        ident = (row.device_id, row.model_name, row.model_version)
        if ident in seen:  # two windows with the same timestamp: keep one
            continue
        seen.add(ident)
        out.append(dict(row._mapping))
    return out


def model_versions(store: Store, fleet: str, model_name: Optional[str] = None) -> list[dict[str, Any]]:
    """Every model version seen in telemetry with its fleet-wide summary, newest version first."""
    query = (
        select(
            telemetry.c.model_name,
            telemetry.c.model_version,
            func.count(func.distinct(telemetry.c.device_id)).label("devices"),
            func.count().label("windows"),
            func.sum(telemetry.c.count).label("count"),
            func.sum(telemetry.c.errors).label("errors"),
            func.min(telemetry.c.ts).label("first_ts"),
            func.max(telemetry.c.ts).label("last_ts"),
            _weighted_mean(telemetry.c.p50_ms).label("p50_ms"),
            _weighted_mean(telemetry.c.p95_ms).label("p95_ms"),
            _weighted_mean(telemetry.c.p99_ms).label("p99_ms"),
            # One mean per quality metric of the vocabulary; a version reports those its eval scores.
            *(func.avg(telemetry.c[name]).label(name) for name in METRIC_NAMES),
            _weighted_mean(telemetry.c.live_accuracy).label("live_accuracy"),
        )
        .where((telemetry.c.fleet == fleet) & telemetry.c.model_name.is_not(None))
        .group_by(telemetry.c.model_name, telemetry.c.model_version)
        .order_by(telemetry.c.model_name, telemetry.c.model_version.desc())
    )
    if model_name is not None:
        query = query.where(telemetry.c.model_name == model_name)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    shadow = live_agreement(store, fleet, model_name)
    out = []
    for row in rows:
        item = dict(row._mapping)
        for field in ("p50_ms", "p95_ms", "p99_ms", *METRIC_NAMES, "live_accuracy"):
            item[field] = None if item[field] is None else float(item[field])
        item["count"] = int(item["count"] or 0)
        item["errors"] = int(item["errors"] or 0)
        live = shadow.get((item["model_name"], item["model_version"]))
        item["live_agreement"] = None if live is None else live[0]
        item["live_agreement_samples"] = 0 if live is None else live[1]
        out.append(jsonable(item))
    return out


# Telemetry windows read for the live (shadow) agreement per version, newest first: a bound on the work.
SHADOW_WINDOWS = 5000


def live_agreement(
    store: Store, fleet: str, model_name: Optional[str] = None
) -> dict[tuple[Any, Any], tuple[float, int]]:
    """(model, version) → (live agreement with the model it replaced, live requests compared).

    Read from the `shadow` quality readings in the stored telemetry payloads (agent/shadow.py): the
    agreement weighted by each window's compared requests, over the newest `SHADOW_WINDOWS` windows.
    """
    query = (
        select(telemetry.c.model_name, telemetry.c.model_version, telemetry.c.payload)
        .where((telemetry.c.fleet == fleet) & telemetry.c.model_name.is_not(None))
        .order_by(telemetry.c.ts.desc())
        .limit(SHADOW_WINDOWS)
    )
    if model_name is not None:
        query = query.where(telemetry.c.model_name == model_name)
    sums: dict[tuple[Any, Any], list[float]] = {}
    with store.engine.connect() as conn:
        for name, version, payload in conn.execute(query):
            for reading in (payload or {}).get("quality") or []:
                if not isinstance(reading, dict) or reading.get("source") != "shadow":
                    continue
                value = reading.get("value") if reading.get("metric") == "agreement" else None
                if value is None:
                    value = (reading.get("detail") or {}).get("agreement")
                samples = reading.get("samples") or 0
                if isinstance(value, (int, float)) and isinstance(samples, int) and samples > 0:
                    acc = sums.setdefault((name, version), [0.0, 0])
                    acc[0] += float(value) * samples
                    acc[1] += samples
    return {key: (total / n, int(n)) for key, (total, n) in sums.items() if n}


def gap_totals(store: Store, fleet: str) -> dict[str, int]:
    """Device id → how many of its messages never reached the store."""
    query = (
        select(gaps.c.device_id, func.sum(gaps.c.last_missing - gaps.c.first_missing + 1))
        .where(gaps.c.fleet == fleet)
        .group_by(gaps.c.device_id)
    )
    with store.engine.connect() as conn:
        return {str(dev): int(n or 0) for dev, n in conn.execute(query).all()}


def progress(devices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A rollout's progress from its per-device rows: counts by status, finished share."""
    by_status: dict[str, int] = {}
    for dev in devices:
        status = str(dev.get("status") or "unknown")
        by_status[status] = by_status.get(status, 0) + 1
    return progress_of_counts(by_status)


def progress_of_counts(by_status: Mapping[str, int]) -> dict[str, Any]:
    """A rollout's progress from its device counts by status (`Store.rollout_status_counts`)."""
    total = sum(by_status.values())
    finished = sum(n for s, n in by_status.items() if s in FINISHED_DEVICE_STATUSES)
    succeeded = sum(n for s, n in by_status.items() if s in SUCCESS_DEVICE_STATUSES)
    return {
        "total": total,
        "finished": finished,
        "succeeded": succeeded,
        "by_status": dict(sorted(by_status.items())),
        "fraction": (finished / total) if total else 0.0,
        # Per-device truth in one line ("2 rolled-back, 1 not-notified"): an aborted rollout whose
        # devices all "finished" must not read as done.
        "summary": ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())),
    }


def rollout_view(rollout: Mapping[str, Any], counts: Optional[Mapping[str, int]] = None) -> dict[str, Any]:
    """A rollout row as the API shows it: its progress added (from `devices`, or from `counts` for a row
    read without them), finished flagged."""
    out = dict(rollout)
    out["progress"] = progress(out.get("devices", [])) if counts is None else progress_of_counts(counts)
    out["finished"] = str(out.get("status")) in FINISHED_ROLLOUT_STATUSES
    return jsonable(out)


def rollouts_with_devices(
    store: Store, fleet: str, status: Optional[Iterable[str]] = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The newest rollouts of a fleet with their devices and progress."""
    out = []
    for row in store.rollouts(fleet, status=status)[:limit]:
        full = store.rollout(str(row["id"]))
        if full is not None:
            out.append(rollout_view(full))
    return out


def change_marks(store: Store, fleet: str) -> dict[str, Any]:
    """Cheap fingerprints of what the dashboard shows; a changed value means that part needs a refresh."""
    with store.engine.connect() as conn:
        tel = conn.execute(
            select(func.max(telemetry.c.id), func.count()).where(telemetry.c.fleet == fleet)
        ).one()
        evt = conn.execute(select(func.max(events.c.id)).where(events.c.fleet == fleet)).scalar()
        rol = conn.execute(
            select(func.max(rollouts.c.updated_at), func.count()).where(rollouts.c.fleet == fleet)
        ).one()
        rdev = conn.execute(
            select(func.max(rollout_devices.c.updated_at), func.count())
            .select_from(rollout_devices.join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id))
            .where(rollouts.c.fleet == fleet)
        ).one()
        # last_seen and last_seq move with every telemetry message: leave them to the telemetry mark.
        # Only these columns, as tuples: no JSON columns decoded for thousands of devices a second.
        dev_mark = [
            tuple(row)
            for row in conn.execute(
                select(
                    devices_table.c.device_id,
                    devices_table.c.online,
                    devices_table.c.profile,
                    devices_table.c.active_model,
                    devices_table.c.active_version,
                    devices_table.c.desired_model,
                    devices_table.c.desired_version,
                    devices_table.c.agent_version,
                )
                .where(devices_table.c.fleet == fleet)
                .order_by(devices_table.c.device_id)
            ).all()
        ]
    return {
        "devices": dev_mark,
        "telemetry": [tel[0], tel[1]],
        "events": evt,
        "rollouts": [rol[0], rol[1], rdev[0], rdev[1]],
    }
