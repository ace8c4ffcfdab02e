"""Telemetry rows, per-device sequence tracking (gaps) and time series.

Several ingest processes may write the same devices at once: each batch locks its devices' rows (SELECT
... FOR UPDATE on PostgreSQL, the database's write lock on SQLite) while it advances their sequence
numbers, and a redelivered message conflicts on (fleet, device, seq, ts) and is dropped by ON CONFLICT.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.devices import DEVICE_DEFAULTS
from edgefleet.sdk.store.schema import (
    LEGACY_TELEMETRY_KEYS,
    TELEMETRY_COLUMNS,
    StoreError,
    devices,
    dialect_insert,
    events,
    gaps,
    telemetry,
)


@dataclass(frozen=True)
class Gap:
    """A run of sequence numbers a device sent that never reached the store."""

    device_id: str
    first_missing: int
    last_missing: int

    @property
    def count(self) -> int:
        """How many messages are missing in this run."""
        return self.last_missing - self.first_missing + 1


@dataclass(frozen=True)
class SeriesPoint:
    """One time bucket of latency and quality, weighted by the inferences behind it (docs/quality.md)."""

    ts: float
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    accuracy: float | None
    agreement: float | None
    fidelity: float | None
    live_accuracy: float | None

    @property
    def eval_accuracy(self) -> float | None:
        """Old name of `accuracy` (the eval set's accuracy), for callers written before the vocabulary."""
        return self.accuracy


@dataclass(frozen=True)
class LatencyReading:
    """One telemetry window's median latency, with the device's profile and the model version it served."""

    device_id: str
    profile: str | None
    model_name: str | None
    model_version: int | None
    p50_ms: float
    count: int
    ts: float


def _seq(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def telemetry_row(fleet: str, msg: Mapping[str, Any]) -> dict[str, Any]:
    """One message (a flat dict with `device_id`, `ts`, optional `seq`) as a telemetry table row."""
    if "device_id" not in msg:
        raise StoreError("a telemetry message has no 'device_id'; every message must name its device")
    row: dict[str, Any] = {
        "fleet": fleet,
        "device_id": str(msg["device_id"]),
        "ts": float(msg.get("ts") or time.time()),
        "seq": _seq(msg.get("seq")),
        "payload": dict(msg),  # the engine's JSON serializer turns odd values into strings
    }
    for col in TELEMETRY_COLUMNS:
        row[col] = msg.get(col)
    for old, new in LEGACY_TELEMETRY_KEYS.items():
        if row[new] is None and msg.get(old) is not None:
            row[new] = msg.get(old)
    row["count"] = int(row["count"] or 0)
    row["errors"] = int(row["errors"] or 0)
    return row


class TelemetryMixin(StoreBase):
    """Telemetry, sequence gaps, series and retention."""

    def add_telemetry(self, fleet: str, messages: Sequence[Mapping[str, Any]]) -> int:
        """Insert a batch of telemetry messages (each with `device_id`, `ts`, optional `seq`) in one statement.

        Sequence numbers are checked against each device's last one first: a jump records a gap.
        Redeliveries (a (device, seq, ts) already stored) are skipped. Returns the number of rows written.
        """
        if not messages:
            return 0
        rows = [telemetry_row(fleet, m) for m in messages]
        with self._tx(write=True) as conn:
            self._track_sequences(conn, fleet, [(r["device_id"], r["seq"]) for r in rows])
            result = conn.execute(
                dialect_insert(conn, telemetry).on_conflict_do_nothing().returning(telemetry.c.id), rows
            )
            return len(result.all())

    def add_messages(
        self,
        fleet: str,
        messages: Sequence[Mapping[str, Any]],
        event_rows: Sequence[Mapping[str, Any]] = (),
        seqs: Sequence[tuple[str, Any]] = (),
    ) -> tuple[int, int]:
        """One ingest batch in one transaction: telemetry `messages`, `event_rows` (device_id, kind,
        payload, seq, ts) and the sequence numbers of any other message (states), gaps checked once for
        all. Redeliveries are skipped. Returns (telemetry rows written, events written).

        One commit per batch instead of two or three per event: a 5,000-device rollout sends tens of
        thousands of events, and per-event commits left the ingest a minute behind (bench/load.py).
        """
        rows = [telemetry_row(fleet, m) for m in messages]
        events_in = [
            {
                "fleet": fleet,
                "device_id": str(e["device_id"]),
                "kind": str(e["kind"]),
                "payload": dict(e["payload"]),
                "seq": _seq(e.get("seq")),
                "ts": float(e.get("ts") or time.time()),
            }
            for e in event_rows
        ]
        every_seq = [
            *((r["device_id"], r["seq"]) for r in rows),
            *((e["device_id"], e["seq"]) for e in events_in),
            *seqs,
        ]
        if not rows and not events_in and not every_seq:
            return 0, 0
        with self._tx(write=True) as conn:
            self._track_sequences(conn, fleet, every_seq)
            written = 0
            if rows:
                result = conn.execute(
                    dialect_insert(conn, telemetry).on_conflict_do_nothing().returning(telemetry.c.id), rows
                )
                written = len(result.all())
            stored_events = 0
            if events_in:
                result = conn.execute(
                    dialect_insert(conn, events).on_conflict_do_nothing().returning(events.c.id), events_in
                )
                stored_events = len(result.all())
        return written, stored_events

    def note_sequence(self, fleet: str, device_id: str, seq: int | None) -> None:
        """Check one sequence number of a non-telemetry message (state, evt) for gaps."""
        with self._tx(write=True) as conn:
            self._track_sequences(conn, fleet, [(device_id, seq)])

    def _track_sequences(self, conn: Connection, fleet: str, seqs: Sequence[tuple[str, Any]]) -> None:
        """Advance each device's last sequence number, recording any jump as a gap.

        A sequence at or below the last one is a redelivery (QoS 1 duplicates, retained state) or a late
        message that fills its gap; only forward jumps mean the broker dropped something. The devices'
        rows stay locked until the transaction ends, so two writers never read the same last number.
        """
        by_device: dict[str, list[int]] = {}
        for dev, seq in seqs:
            if _seq(seq) is not None:
                by_device.setdefault(dev, []).append(seq)
        if not by_device:
            return
        now = time.time()
        ids = sorted(by_device)  # one lock order for every writer: no deadlock between two of them
        conn.execute(
            dialect_insert(conn, devices).on_conflict_do_nothing(
                index_elements=[devices.c.fleet, devices.c.device_id]
            ),
            [{**DEVICE_DEFAULTS, "fleet": fleet, "device_id": dev} for dev in ids],
        )
        existing = dict(
            conn.execute(
                select(devices.c.device_id, devices.c.last_seq)
                .where((devices.c.fleet == fleet) & devices.c.device_id.in_(ids))
                .order_by(devices.c.device_id)
                .with_for_update()
            ).all()
        )
        new_gaps: list[dict[str, Any]] = []
        late: list[tuple[str, int]] = []
        updates: list[dict[str, Any]] = []
        for dev in ids:
            last = existing.get(dev)
            for seq in sorted(set(by_device[dev])):
                if last is not None and seq <= last:
                    late.append((dev, seq))
                    continue
                if last is not None and seq > last + 1:
                    new_gaps.append(
                        {
                            "fleet": fleet,
                            "device_id": dev,
                            "first_missing": last + 1,
                            "last_missing": seq - 1,
                            "detected_at": now,
                        }
                    )
                last = seq
            # Host time of the last message: the ingest's liveness check reads it across processes.
            updates.append({"b_device": dev, "b_last_seq": last, "b_last_seen": now})
        if new_gaps:
            conn.execute(insert(gaps), new_gaps)
        for dev, seq in late:
            self._fill_gap(conn, fleet, dev, seq)
        conn.execute(
            update(devices)
            .where((devices.c.fleet == fleet) & (devices.c.device_id == bindparam("b_device")))
            .values(last_seq=bindparam("b_last_seq"), last_seen=bindparam("b_last_seen")),
            updates,
        )

    def _fill_gap(self, conn: Connection, fleet: str, device_id: str, seq: int) -> None:
        """A late message (several ingest processes on a shared subscription, or a reordering) fills its hole."""
        rows = conn.execute(
            select(gaps).where(
                (gaps.c.fleet == fleet)
                & (gaps.c.device_id == device_id)
                & (gaps.c.first_missing <= seq)
                & (gaps.c.last_missing >= seq)
            )
        ).all()
        for row in rows:
            conn.execute(delete(gaps).where(gaps.c.id == row.id))
            parts = [(row.first_missing, seq - 1), (seq + 1, row.last_missing)]
            rest = [
                {
                    "fleet": fleet,
                    "device_id": device_id,
                    "first_missing": a,
                    "last_missing": b,
                    "detected_at": row.detected_at,
                }
                for a, b in parts
                if a <= b
            ]
            if rest:
                conn.execute(insert(gaps), rest)

    def gaps(self, fleet: str, device_id: str | None = None) -> list[Gap]:
        """Every sequence gap recorded for a fleet (or one device), oldest first."""
        query = select(gaps).where(gaps.c.fleet == fleet).order_by(gaps.c.id)
        if device_id is not None:
            query = query.where(gaps.c.device_id == device_id)
        with self._tx() as conn:
            return [Gap(r.device_id, int(r.first_missing), int(r.last_missing)) for r in conn.execute(query)]

    def telemetry_count(self, fleet: str, device_id: str | None = None) -> int:
        """How many telemetry rows are stored."""
        query = select(func.count()).select_from(telemetry).where(telemetry.c.fleet == fleet)
        if device_id is not None:
            query = query.where(telemetry.c.device_id == device_id)
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one())

    def latest_telemetry(self, fleet: str, device_id: str, limit: int = 1) -> list[dict[str, Any]]:
        """The newest telemetry rows of one device, newest first."""
        query = (
            select(telemetry)
            .where((telemetry.c.fleet == fleet) & (telemetry.c.device_id == device_id))
            .order_by(telemetry.c.ts.desc())
            .limit(limit)
        )
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def series(
        self,
        fleet: str,
        *,
        device_id: str | None = None,
        model_name: str | None = None,
        model_version: int | None = None,
        profile: str | None = None,
        since: float | None = None,
        bucket_s: float = 60.0,
    ) -> list[SeriesPoint]:
        """Latency percentiles and quality over time, in buckets of `bucket_s` seconds.

        Each bucket weights the windows' percentiles by their inference counts: an approximation (the
        exact percentile of merged windows needs the histograms), good enough to see a regression.
        """
        if bucket_s <= 0:
            raise StoreError(f"bucket_s must be > 0 seconds, got {bucket_s}")
        query = select(telemetry).where(telemetry.c.fleet == fleet).order_by(telemetry.c.ts)
        if device_id is not None:
            query = query.where(telemetry.c.device_id == device_id)
        if model_name is not None:
            query = query.where(telemetry.c.model_name == model_name)
        if model_version is not None:
            query = query.where(telemetry.c.model_version == model_version)
        if profile is not None:
            query = query.where(telemetry.c.profile == profile)
        if since is not None:
            query = query.where(telemetry.c.ts >= since)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        buckets: dict[float, list[Any]] = {}
        for r in rows:
            buckets.setdefault(r.ts - (r.ts % bucket_s), []).append(r)
        return [_merge_bucket(ts, rs) for ts, rs in sorted(buckets.items())]

    def latency_readings(
        self, fleet: str, *, profile: str | None = None, since: float | None = None
    ) -> dict[tuple[str | None, str | None, int | None], list[LatencyReading]]:
        """Windows with a p50 latency, grouped by (profile, model name, model version), oldest first.

        A row without a profile (an agent that did not report one) takes its device row's profile.
        `profile` keeps one profile's groups; windows without requests (no p50) are left out.
        """
        prof = func.coalesce(telemetry.c.profile, devices.c.profile)
        query = (
            select(
                telemetry.c.device_id,
                prof.label("profile"),
                telemetry.c.model_name,
                telemetry.c.model_version,
                telemetry.c.p50_ms,
                telemetry.c.count,
                telemetry.c.ts,
            )
            .select_from(
                telemetry.outerjoin(
                    devices,
                    and_(devices.c.fleet == telemetry.c.fleet, devices.c.device_id == telemetry.c.device_id),
                )
            )
            .where((telemetry.c.fleet == fleet) & telemetry.c.p50_ms.is_not(None))
            .order_by(telemetry.c.ts, telemetry.c.id)
        )
        if profile is not None:
            query = query.where(prof == profile)
        if since is not None:
            query = query.where(telemetry.c.ts >= since)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        out: dict[tuple[str | None, str | None, int | None], list[LatencyReading]] = {}
        for row in rows:
            r = row._mapping  # a Row's own `count` is tuple.count: read the columns by name
            version = None if r["model_version"] is None else int(r["model_version"])
            reading = LatencyReading(
                r["device_id"],
                r["profile"],
                r["model_name"],
                version,
                float(r["p50_ms"]),
                int(r["count"] or 0),
                float(r["ts"]),
            )
            out.setdefault((r["profile"], r["model_name"], version), []).append(reading)
        return out

    def prune(self, older_than_days: float | None = None) -> int:
        """Delete telemetry and events older than the retention; returns how many rows went."""
        days = older_than_days if older_than_days is not None else self.retention_days
        if days is None:
            return 0
        cutoff = time.time() - days * 86400.0
        with self._tx(write=True) as conn:
            n = conn.execute(delete(telemetry).where(telemetry.c.ts < cutoff)).rowcount or 0
            n += conn.execute(delete(events).where(events.c.ts < cutoff)).rowcount or 0
        return int(n)


def _weighted(values: Sequence[tuple[float | None, int]]) -> float | None:
    """Count-weighted mean of the values that are present (weight at least 1 per window)."""
    pairs = [(v, max(w, 1)) for v, w in values if v is not None]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total


def _merge_bucket(ts: float, rows: Sequence[Any]) -> SeriesPoint:
    """Fold the telemetry windows of one bucket into one point (eval readings weigh one per window)."""
    return SeriesPoint(
        ts=ts,
        count=sum(int(r.count or 0) for r in rows),
        p50_ms=_weighted([(r.p50_ms, int(r.count or 0)) for r in rows]),
        p95_ms=_weighted([(r.p95_ms, int(r.count or 0)) for r in rows]),
        p99_ms=_weighted([(r.p99_ms, int(r.count or 0)) for r in rows]),
        accuracy=_weighted([(r.accuracy, 1) for r in rows]),
        agreement=_weighted([(r.agreement, 1) for r in rows]),
        fidelity=_weighted([(r.fidelity, 1) for r in rows]),
        live_accuracy=_weighted([(r.live_accuracy, int(r.count or 0)) for r in rows]),
    )
