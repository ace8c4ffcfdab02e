"""The fleet's store: devices, bundles, rollouts, events and telemetry, through one SQLAlchemy code path.

SQLite (a file under ~/.edgefleet/ by default) and PostgreSQL (by URL) run the same statements; only
the engine options differ. Telemetry is written in batches, old rows are pruned by a retention setting,
and per-device sequence numbers reveal messages the broker dropped on the way.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The store cannot be opened or a request to it is invalid; the message says what to fix."""


def default_db_url() -> str:
    """The store URL: `EDGEFLEET_DB`, else a SQLite file under `EDGEFLEET_HOME` (default ~/.edgefleet)."""
    env = os.environ.get("EDGEFLEET_DB")
    if env:
        return env
    home = Path(os.environ.get("EDGEFLEET_HOME", Path.home() / ".edgefleet"))
    return f"sqlite:///{home / 'fleet.db'}"


metadata = MetaData()

meta_table = Table(
    "edgefleet_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("fleet", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("profile", String(64)),
    Column("tags", JSON, nullable=False, default=list),
    Column("agent_version", String(32)),
    Column("runtimes", JSON, nullable=False, default=list),
    Column("emulated", Boolean, nullable=False, default=False),
    Column("active_model", String(128)),
    Column("active_version", BigInteger),
    Column("desired_model", String(128)),
    Column("desired_version", BigInteger),
    Column("state", JSON, nullable=False, default=dict),
    Column("last_seen", Float),
    Column("last_seq", BigInteger),
)

bundles = Table(
    "bundles",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("manifest_sha256", String(64), nullable=False, unique=True),
    Column("path", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("fleet", String(128), nullable=False),
    Column("selector", String(256), nullable=False),
    Column("strategy", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("reason", Text),
    Column("settings", JSON, nullable=False, default=dict),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("bundle_id", Integer),
    Column("wave", Integer, nullable=False, default=0),
    Column("status", String(32), nullable=False),
    Column("reason", Text),
    Column("updated_at", Float, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(128), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("ts", Float, nullable=False),
    Column("seq", BigInteger),
    Column("kind", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Index("ix_events_device_ts", "fleet", "device_id", "ts"),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(128), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("ts", Float, nullable=False),
    Column("seq", BigInteger),
    Column("profile", String(64)),
    Column("model_name", String(128)),
    Column("model_version", BigInteger),
    Column("count", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("p50_ms", Float),
    Column("p95_ms", Float),
    Column("p99_ms", Float),
    Column("mean_ms", Float),
    Column("eval_accuracy", Float),
    Column("live_accuracy", Float),
    Column("agreement", Float),
    Column("payload", JSON, nullable=False),
    Index("ix_telemetry_device_ts", "fleet", "device_id", "ts"),
    Index("ix_telemetry_model", "fleet", "model_name", "model_version", "ts"),
)

gaps = Table(
    "gaps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(128), nullable=False),
    Column("device_id", String(128), nullable=False),
    Column("first_missing", BigInteger, nullable=False),
    Column("last_missing", BigInteger, nullable=False),
    Column("detected_at", Float, nullable=False),
)

# Telemetry fields that get their own column; the whole message also stays in `payload`.
_TELEMETRY_COLUMNS = (
    "profile",
    "model_name",
    "model_version",
    "count",
    "errors",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "eval_accuracy",
    "live_accuracy",
    "agreement",
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
    """One time bucket of a latency/accuracy series, weighted by the inferences behind it."""

    ts: float
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    eval_accuracy: float | None
    live_accuracy: float | None


def _json_dumps(obj: Any) -> str:
    """How JSON columns are written: anything JSON cannot hold (a numpy number, a Path) as its str()."""
    return json.dumps(obj, default=str)


def _engine_for(url: str) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so readers never block the ingest writer."""
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                json_serializer=_json_dumps,
            )

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return engine
        if url.startswith("postgresql://"):
            # psycopg 3 is the driver the `host` extra installs.
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(
            url, pool_pre_ping=True, connect_args=_pg_connect_args(url), json_serializer=_json_dumps
        )
    except (ArgumentError, ImportError) as exc:
        raise StoreError(
            f"cannot use store URL {url!r}: {exc}. Use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        ) from exc


def _pg_connect_args(url: str) -> dict[str, Any]:
    """A connect timeout for network databases, so a dead server fails fast instead of hanging."""
    return {"connect_timeout": 10} if url.startswith("postgresql") else {}


class Store:
    """The fleet's persistent state; safe to share between threads (one engine, short transactions)."""

    def __init__(self, url: str | None = None, retention_days: float | None = 30.0) -> None:
        self.url = url or default_db_url()
        self.retention_days = retention_days
        self.engine = _engine_for(self.url)
        self._lock = threading.Lock()
        try:
            metadata.create_all(self.engine)
            self._check_schema()
        except OperationalError as exc:
            raise StoreError(
                f"cannot open the store at {self._safe_url()}: {exc.orig}. Check that the database server "
                "runs and the URL (user, host, port, database) is right, or pass --db sqlite:///PATH"
            ) from exc

    def _safe_url(self) -> str:
        """The URL without its password, for messages."""
        return str(self.engine.url.render_as_string(hide_password=True))

    def _check_schema(self) -> None:
        """Record the schema version on first use; refuse a store written by a newer edgefleet."""
        with self.engine.begin() as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema")).first()
            if row is None:
                conn.execute(insert(meta_table).values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the store at {self._safe_url()} has schema {row[0]}, newer than this edgefleet "
                    f"({SCHEMA_VERSION}); upgrade edgefleet or use another --db"
                )

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction; SQLAlchemy errors become StoreError with the cause."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"store operation failed: {exc}") from exc

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # ---- devices -------------------------------------------------------------------------------

    def upsert_device(self, fleet: str, device_id: str, **fields: Any) -> None:
        """Create or update a device row with the given columns (unknown names are refused)."""
        unknown = set(fields) - set(devices.c.keys())
        if unknown:
            raise StoreError(f"unknown device field(s) {sorted(unknown)}; known: {sorted(devices.c.keys())}")
        with self._lock, self._tx() as conn:
            key = (devices.c.fleet == fleet) & (devices.c.device_id == device_id)
            exists = conn.execute(select(devices.c.device_id).where(key)).first()
            if exists:
                if fields:
                    conn.execute(update(devices).where(key).values(**fields))
            else:
                row = {"tags": [], "runtimes": [], "state": {}, "online": False, "emulated": False}
                row.update(fields)
                conn.execute(insert(devices).values(fleet=fleet, device_id=device_id, **row))

    def device(self, fleet: str, device_id: str) -> dict[str, Any] | None:
        """One device as a dict, or None."""
        with self._tx() as conn:
            row = conn.execute(
                select(devices).where((devices.c.fleet == fleet) & (devices.c.device_id == device_id))
            ).first()
        return dict(row._mapping) if row else None

    def devices(self, fleet: str) -> list[dict[str, Any]]:
        """Every device of a fleet, sorted by id."""
        with self._tx() as conn:
            rows = conn.execute(
                select(devices).where(devices.c.fleet == fleet).order_by(devices.c.device_id)
            ).all()
        return [dict(r._mapping) for r in rows]

    # ---- bundles -------------------------------------------------------------------------------

    def add_bundle(
        self,
        *,
        name: str,
        version: int,
        profile: str,
        manifest_sha256: str,
        path: str,
        size_bytes: int,
        manifest: Mapping[str, Any],
    ) -> int:
        """Register a bundle (idempotent on its manifest hash); returns its id."""
        with self._lock, self._tx() as conn:
            row = conn.execute(
                select(bundles.c.id).where(bundles.c.manifest_sha256 == manifest_sha256)
            ).first()
            if row:
                return int(row[0])
            result = conn.execute(
                insert(bundles).values(
                    name=name,
                    version=version,
                    profile=profile,
                    manifest_sha256=manifest_sha256,
                    path=path,
                    size_bytes=size_bytes,
                    manifest=dict(manifest),
                    created_at=time.time(),
                )
            )
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def bundle(self, bundle_id: int) -> dict[str, Any] | None:
        """One bundle row, or None."""
        with self._tx() as conn:
            row = conn.execute(select(bundles).where(bundles.c.id == bundle_id)).first()
        return dict(row._mapping) if row else None

    def bundles(self, name: str | None = None) -> list[dict[str, Any]]:
        """All bundles (of one model name when given), newest version first."""
        query = select(bundles).order_by(bundles.c.name, bundles.c.version.desc(), bundles.c.profile)
        if name is not None:
            query = query.where(bundles.c.name == name)
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    # ---- rollouts ------------------------------------------------------------------------------

    def create_rollout(
        self,
        rollout_id: str,
        *,
        fleet: str,
        selector: str,
        strategy: str,
        settings: Mapping[str, Any],
        targets: Sequence[tuple[str, int | None, int]],
    ) -> None:
        """Create a rollout and its per-device rows (device id, bundle id or None, wave) in one transaction."""
        now = time.time()
        with self._lock, self._tx() as conn:
            conn.execute(
                insert(rollouts).values(
                    id=rollout_id,
                    fleet=fleet,
                    selector=selector,
                    strategy=strategy,
                    status="pending",
                    settings=dict(settings),
                    created_at=now,
                    updated_at=now,
                )
            )
            if targets:
                conn.execute(
                    insert(rollout_devices),
                    [
                        {
                            "rollout_id": rollout_id,
                            "device_id": dev,
                            "bundle_id": bid,
                            "wave": wave,
                            "status": "pending" if bid is not None else "no-bundle",
                            "updated_at": now,
                        }
                        for dev, bid, wave in targets
                    ],
                )

    def set_rollout_status(
        self,
        rollout_id: str,
        status: str,
        reason: str | None = None,
        *,
        only_from: Iterable[str] | None = None,
    ) -> bool:
        """Move a rollout to a new status (with the reason for aborts and failures).

        With `only_from`, only when its status is one of those (compare-and-set, for another process
        racing the engine); returns whether the row changed.
        """
        query = update(rollouts).where(rollouts.c.id == rollout_id)
        if only_from is not None:
            query = query.where(rollouts.c.status.in_(list(only_from)))
        with self._lock, self._tx() as conn:
            result = conn.execute(query.values(status=status, reason=reason, updated_at=time.time()))
        return bool(result.rowcount)

    def set_rollout_device(
        self, rollout_id: str, device_id: str, status: str, reason: str | None = None
    ) -> None:
        """Record one device's progress within a rollout."""
        with self._lock, self._tx() as conn:
            conn.execute(
                update(rollout_devices)
                .where(
                    (rollout_devices.c.rollout_id == rollout_id) & (rollout_devices.c.device_id == device_id)
                )
                .values(status=status, reason=reason, updated_at=time.time())
            )

    def update_rollout_settings(self, rollout_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `changes` into a rollout's settings (engine progress, heartbeat); returns the new settings."""
        with self._lock, self._tx() as conn:
            row = conn.execute(select(rollouts.c.settings).where(rollouts.c.id == rollout_id)).first()
            if row is None:
                raise StoreError(f"no rollout {rollout_id!r}; list them with `edgefleet rollouts`")
            merged = dict(row[0] or {})
            merged.update(json.loads(json.dumps(dict(changes), default=str)))
            conn.execute(
                update(rollouts)
                .where(rollouts.c.id == rollout_id)
                .values(settings=merged, updated_at=time.time())
            )
        return merged

    def set_rollout_devices(self, rollout_id: str, updates: Sequence[tuple[str, str, str | None]]) -> None:
        """Record several devices' progress within a rollout in one transaction: (device id, status, reason)."""
        if not updates:
            return
        now = time.time()
        with self._lock, self._tx() as conn:
            for device_id, status, reason in updates:
                conn.execute(
                    update(rollout_devices)
                    .where(
                        (rollout_devices.c.rollout_id == rollout_id)
                        & (rollout_devices.c.device_id == device_id)
                    )
                    .values(status=status, reason=reason, updated_at=now)
                )

    def update_devices(self, fleet: str, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Update columns of several existing devices in one transaction (device id → {column: value})."""
        unknown = {k for fields in changes.values() for k in fields} - set(devices.c.keys())
        if unknown:
            raise StoreError(f"unknown device field(s) {sorted(unknown)}; known: {sorted(devices.c.keys())}")
        if not changes:
            return
        with self._lock, self._tx() as conn:
            for device_id, fields in changes.items():
                conn.execute(
                    update(devices)
                    .where((devices.c.fleet == fleet) & (devices.c.device_id == device_id))
                    .values(**fields)
                )

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """A rollout with its devices under the key `devices`, or None."""
        with self._tx() as conn:
            row = conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()
            if row is None:
                return None
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id == rollout_id)
                .order_by(rollout_devices.c.wave, rollout_devices.c.device_id)
            ).all()
        out = dict(row._mapping)
        out["devices"] = [dict(d._mapping) for d in devs]
        return out

    def rollouts(self, fleet: str | None = None, status: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts, newest first, optionally of one fleet and in the given statuses."""
        query = select(rollouts).order_by(rollouts.c.created_at.desc())
        if fleet is not None:
            query = query.where(rollouts.c.fleet == fleet)
        if status is not None:
            query = query.where(rollouts.c.status.in_(list(status)))
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def devices_in_active_rollouts(self, fleet: str) -> dict[str, str]:
        """Device id → rollout id for every device in a rollout that has not ended."""
        active = ("pending", "running", "paused", "aborting")
        query = (
            select(rollout_devices.c.device_id, rollouts.c.id)
            .join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id)
            .where((rollouts.c.fleet == fleet) & rollouts.c.status.in_(active))
        )
        with self._tx() as conn:
            return {str(dev): str(rid) for dev, rid in conn.execute(query).all()}

    # ---- events --------------------------------------------------------------------------------

    def add_event(
        self,
        fleet: str,
        device_id: str,
        kind: str,
        payload: Mapping[str, Any],
        seq: int | None = None,
        ts: float | None = None,
    ) -> None:
        """Append one device event (deploy progress, outcome, error)."""
        with self._lock, self._tx() as conn:
            conn.execute(
                insert(events).values(
                    fleet=fleet,
                    device_id=device_id,
                    kind=kind,
                    payload=dict(payload),
                    seq=seq,
                    ts=ts if ts is not None else time.time(),
                )
            )

    def events(self, fleet: str, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest events of a fleet (or one device), newest first."""
        query = select(events).where(events.c.fleet == fleet).order_by(events.c.ts.desc()).limit(limit)
        if device_id is not None:
            query = query.where(events.c.device_id == device_id)
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    # ---- telemetry -----------------------------------------------------------------------------

    def add_telemetry(self, fleet: str, messages: Sequence[Mapping[str, Any]]) -> int:
        """Insert a batch of telemetry messages (each with `device_id`, `ts`, optional `seq`) in one statement.

        Sequence numbers are checked against each device's last one first: a jump records a gap.
        Returns the number of rows written.
        """
        if not messages:
            return 0
        rows = []
        for msg in messages:
            if "device_id" not in msg:
                raise StoreError("a telemetry message has no 'device_id'; every message must name its device")
            row: dict[str, Any] = {
                "fleet": fleet,
                "device_id": str(msg["device_id"]),
                "ts": float(msg.get("ts") or time.time()),
                "seq": msg.get("seq"),
                "payload": dict(msg),  # the engine's JSON serializer turns odd values into strings
            }
            for col in _TELEMETRY_COLUMNS:
                row[col] = msg.get(col)
            row["count"] = int(row["count"] or 0)
            row["errors"] = int(row["errors"] or 0)
            rows.append(row)
        with self._lock, self._tx() as conn:
            rows = self._without_duplicates(conn, fleet, rows)
            if not rows:
                return 0
            self._track_sequences(conn, fleet, [(r["device_id"], r["seq"]) for r in rows])
            conn.execute(insert(telemetry), rows)
        return len(rows)

    def _without_duplicates(
        self, conn: Connection, fleet: str, rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Drop QoS 1 redeliveries: a (device, seq, ts) already stored, or twice in this batch.

        Only rows at or below a device's last sequence number can be repeats, so the lookup (on the
        device/ts index) runs only for those; a device whose counter restarted keeps its new rows.
        """
        seen: set[tuple[str, int, float]] = set()
        unique = []
        for row in rows:
            seq = row["seq"]
            if isinstance(seq, int) and not isinstance(seq, bool):
                ident = (row["device_id"], seq, row["ts"])
                if ident in seen:
                    continue
                seen.add(ident)
            unique.append(row)
        ids = sorted({r["device_id"] for r in unique})
        last = dict(
            conn.execute(
                select(devices.c.device_id, devices.c.last_seq).where(
                    (devices.c.fleet == fleet) & devices.c.device_id.in_(ids)
                )
            ).all()
        )
        maybe = [
            r
            for r in unique
            if isinstance(r["seq"], int)
            and last.get(r["device_id"]) is not None
            and r["seq"] <= last[r["device_id"]]
        ]
        if not maybe:
            return unique
        stored = {
            (str(d), int(q), float(t))
            for d, q, t in conn.execute(
                select(telemetry.c.device_id, telemetry.c.seq, telemetry.c.ts).where(
                    (telemetry.c.fleet == fleet)
                    & telemetry.c.device_id.in_({r["device_id"] for r in maybe})
                    & telemetry.c.ts.in_({r["ts"] for r in maybe})
                )
            )
            if q is not None
        }
        return [r for r in unique if (r["device_id"], r["seq"], r["ts"]) not in stored]

    def note_sequence(self, fleet: str, device_id: str, seq: int | None) -> None:
        """Check one sequence number of a non-telemetry message (state, evt) for gaps."""
        with self._lock, self._tx() as conn:
            self._track_sequences(conn, fleet, [(device_id, seq)])

    def _track_sequences(self, conn: Connection, fleet: str, seqs: Sequence[tuple[str, Any]]) -> None:
        """Advance each device's last sequence number, recording any jump as a gap.

        A sequence at or below the last one is a redelivery (QoS 1 duplicates, retained state) and is
        ignored; only forward jumps mean the broker dropped something.
        """
        by_device: dict[str, list[int]] = {}
        for dev, seq in seqs:
            if isinstance(seq, int) and not isinstance(seq, bool):
                by_device.setdefault(dev, []).append(seq)
        if not by_device:
            return
        now = time.time()
        # One read and one executemany per batch, not a read and a write per device: a batch of 1000
        # messages from 50 devices was 100 statements.
        existing = dict(
            conn.execute(
                select(devices.c.device_id, devices.c.last_seq).where(
                    (devices.c.fleet == fleet) & devices.c.device_id.in_(sorted(by_device))
                )
            ).all()
        )
        new_gaps: list[dict[str, Any]] = []
        late: list[tuple[str, int]] = []
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for dev, numbers in by_device.items():
            last = existing.get(dev)
            for seq in sorted(set(numbers)):
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
                if last is None or seq > last:
                    last = seq
            if dev in existing:
                # Host time of the last message: the ingest's liveness check reads it across processes.
                updates.append({"b_device": dev, "b_last_seq": last, "b_last_seen": now})
            else:
                inserts.append(
                    {
                        "fleet": fleet,
                        "device_id": dev,
                        "last_seq": last,
                        "last_seen": now,
                        "tags": [],
                        "runtimes": [],
                        "state": {},
                        "online": False,
                        "emulated": False,
                    }
                )
        if new_gaps:
            conn.execute(insert(gaps), new_gaps)
        for dev, seq in late:
            self._fill_gap(conn, fleet, dev, seq)
        if inserts:
            conn.execute(insert(devices), inserts)
        if updates:
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
        """Latency percentiles and accuracy over time, in buckets of `bucket_s` seconds.

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

    def prune(self, older_than_days: float | None = None) -> int:
        """Delete telemetry and events older than the retention; returns how many rows went."""
        days = older_than_days if older_than_days is not None else self.retention_days
        if days is None:
            return 0
        cutoff = time.time() - days * 86400.0
        with self._lock, self._tx() as conn:
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
    """Fold the telemetry windows of one bucket into one point."""
    return SeriesPoint(
        ts=ts,
        count=sum(int(r.count or 0) for r in rows),
        p50_ms=_weighted([(r.p50_ms, int(r.count or 0)) for r in rows]),
        p95_ms=_weighted([(r.p95_ms, int(r.count or 0)) for r in rows]),
        p99_ms=_weighted([(r.p99_ms, int(r.count or 0)) for r in rows]),
        eval_accuracy=_weighted([(r.eval_accuracy, 1) for r in rows]),
        live_accuracy=_weighted([(r.live_accuracy, int(r.count or 0)) for r in rows]),
    )


class TelemetryBatcher:
    """Collects telemetry messages and writes them in batches (by size or age) on a background thread."""

    def __init__(self, store: Store, fleet: str, max_rows: int = 500, max_delay_s: float = 0.5) -> None:
        self.store = store
        self.fleet = fleet
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._pending: list[Mapping[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = False
        self.queued = 0
        self.written = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="telemetry-batcher", daemon=True)
        self._thread.start()

    def add(self, message: Mapping[str, Any]) -> None:
        """Queue one message; it is written within `max_delay_s` or when the batch is full."""
        with self._cond:
            self._pending.append(message)
            self.queued += 1
            if len(self._pending) >= self.max_rows:
                self._cond.notify()

    def _take(self) -> list[Mapping[str, Any]]:
        with self._cond:
            if not self._pending and not self._stop:
                self._cond.wait(self.max_delay_s)
            batch, self._pending = self._pending, []
            return batch

    def _run(self) -> None:
        delay = 0.1
        while True:
            batch = self._take()
            while batch:
                try:
                    self.written += self.store.add_telemetry(self.fleet, batch)
                    batch = []
                    delay = 0.1
                except StoreError:
                    # Keep the batch and retry with backoff: a locked SQLite file or a restarting
                    # PostgreSQL must not lose telemetry.
                    self.failures += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    if self._stop and self.failures > 20:
                        return
            with self._cond:
                if self._stop and not self._pending:
                    return

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is written, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self.queued
            self._cond.notify()
        while self.written < target and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is left and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
