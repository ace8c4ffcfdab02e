"""The store's tables, schema version and migrations, engine set-up and the dialect's INSERT ... ON CONFLICT."""

from __future__ import annotations

import json
import logging
import os
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
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError

from edgefleet.agent.core.paths import edgefleet_home
from edgefleet.agent.core.quality import METRIC_NAMES
from edgefleet.sdk.errors import EdgefleetError

log = logging.getLogger(__name__)

# 2: telemetry's `eval_accuracy` became `accuracy`, `fidelity` was added (the quality vocabulary,
# docs/quality.md) and (fleet, device_id, seq, ts) became unique, so redeliveries insert nothing.
# 3: a rollout has an owner and a lease (several `serve` workers, one drives it), events are unique
# per device message (a redelivery to another worker inserts nothing), and the `leases` table.
SCHEMA_VERSION = 3
# Serializes create_all and migrations of processes that open the same PostgreSQL store at once.
_PG_SCHEMA_LOCK = 0x6564_6765  # "edge"


class StoreError(EdgefleetError):
    """The store cannot be opened or a request to it is invalid; the message says what to fix."""


def default_db_url() -> str:
    """The store URL: `EDGEFLEET_DB`, else a SQLite file under `EDGEFLEET_HOME` (default ~/.edgefleet)."""
    env = os.environ.get("EDGEFLEET_DB")
    if env:
        return env
    return f"sqlite:///{edgefleet_home() / 'fleet.db'}"


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
    # The worker that drives the rollout and until when its lease runs; renewed by that worker, taken
    # over by another one (an UPDATE conditional on the lease having expired) once it ran out.
    Column("owner", String(128)),
    Column("lease_expires", Float),
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
    # A device's event is (device, kind, seq, ts): a QoS 1 redelivery, to this or another ingest
    # worker, conflicts here and is dropped. Host-written events (seq NULL) never conflict.
    Index("ux_events_message", "fleet", "device_id", "kind", "seq", "ts", unique=True),
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
    # One column per quality metric (agent/core/quality.py): the eval set's reading on the device.
    Column("accuracy", Float),
    Column("agreement", Float),
    Column("fidelity", Float),
    # Accuracy on users' feedback labels (quality source `feedback`), per serving window.
    Column("live_accuracy", Float),
    Column("payload", JSON, nullable=False),
    Index("ix_telemetry_device_ts", "fleet", "device_id", "ts"),
    Index("ix_telemetry_model", "fleet", "model_name", "model_version", "ts"),
    # A device's message is (device, seq, ts): a QoS 1 redelivery, to this or another ingest process,
    # conflicts here and is dropped by INSERT ... ON CONFLICT DO NOTHING.
    Index("ux_telemetry_message", "fleet", "device_id", "seq", "ts", unique=True),
)

leases = Table(
    "leases",
    metadata,
    # What is leased, e.g. `ingest/FLEET/GROUP/WORKER`: an ingest worker's broker session.
    Column("name", String(256), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires", Float, nullable=False),
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

QUALITY_COLUMNS = METRIC_NAMES
# Telemetry fields that get their own column; the whole message also stays in `payload`.
TELEMETRY_COLUMNS = (
    "profile",
    "model_name",
    "model_version",
    "count",
    "errors",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    *QUALITY_COLUMNS,
    "live_accuracy",
)
# Older names of telemetry columns that callers may still pass (`eval_accuracy` is schema 1's).
LEGACY_TELEMETRY_KEYS = {"eval_accuracy": "accuracy"}


def json_dumps(obj: Any) -> str:
    """How JSON columns are written: anything JSON cannot hold (a numpy number, a Path) as its str()."""
    return json.dumps(obj, default=str)


def dialect_insert(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT (SQLite or PostgreSQL), which has on_conflict_do_update / do_nothing."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise StoreError(f"the store supports SQLite and PostgreSQL, not {conn.dialect.name}")


def engine_for(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and write transactions that lock at BEGIN."""
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}, json_serializer=json_dumps
            )

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                # The driver's own BEGIN is deferred; the "begin" hook below issues it instead.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn: Connection) -> None:
                # A deferred transaction that reads and then writes fails at once ("database is
                # locked") when another process wrote meanwhile; IMMEDIATE takes the write lock first
                # (waiting up to the busy timeout), so read-then-write upserts are safe across processes.
                immediate = conn.get_execution_options().get("edgefleet_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

            return engine
        if url.startswith("postgresql://"):
            # psycopg 3 is the driver the `host` extra installs.
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": 10}, json_serializer=json_dumps
        )
    except (ArgumentError, ImportError) as exc:
        raise StoreError(
            f"cannot use store URL {url!r}: {exc}. Use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        ) from exc


def prepare_schema(conn: Connection, safe_url: str) -> None:
    """Create missing tables, migrate an older schema, refuse a newer one (one process at a time)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
    fresh = not inspect(conn).has_table("telemetry")
    if not fresh:
        _migrate_telemetry(conn)
        _migrate_rollouts_events(conn)
    metadata.create_all(conn)
    row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema")).first()
    if row is None:
        conn.execute(insert(meta_table).values(key="schema", value=str(SCHEMA_VERSION)))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"the store at {safe_url} has schema {row[0]}, newer than this edgefleet "
            f"({SCHEMA_VERSION}); upgrade edgefleet or use another --db"
        )
    elif int(row[0]) < SCHEMA_VERSION:
        conn.execute(update(meta_table).where(meta_table.c.key == "schema").values(value=str(SCHEMA_VERSION)))


def _migrate_telemetry(conn: Connection) -> None:
    """Schema 1 → 2: rename eval_accuracy to accuracy, add fidelity, drop duplicates, add the unique index."""
    names = {c["name"] for c in inspect(conn).get_columns("telemetry")}
    if "eval_accuracy" in names and "accuracy" not in names:
        log.info("store migration: telemetry.eval_accuracy -> accuracy")
        conn.execute(text("ALTER TABLE telemetry RENAME COLUMN eval_accuracy TO accuracy"))
    for column in QUALITY_COLUMNS:
        if column not in names and not (column == "accuracy" and "eval_accuracy" in names):
            conn.execute(text(f"ALTER TABLE telemetry ADD COLUMN {column} FLOAT"))
    indexes = {ix["name"] for ix in inspect(conn).get_indexes("telemetry")}
    if "ux_telemetry_message" not in indexes:
        # Schema 1 could store a redelivered message twice; keep the first copy of each.
        conn.execute(
            text(
                "DELETE FROM telemetry WHERE seq IS NOT NULL AND id NOT IN (SELECT MIN(id) FROM telemetry "
                "WHERE seq IS NOT NULL GROUP BY fleet, device_id, seq, ts)"
            )
        )
        unique = next(ix for ix in telemetry.indexes if ix.name == "ux_telemetry_message")
        unique.create(conn)


def _migrate_rollouts_events(conn: Connection) -> None:
    """Schema 2 → 3: rollouts get owner and lease_expires; duplicate device events go, events become unique."""
    if inspect(conn).has_table("rollouts"):
        names = {c["name"] for c in inspect(conn).get_columns("rollouts")}
        if "owner" not in names:
            conn.execute(text("ALTER TABLE rollouts ADD COLUMN owner VARCHAR(128)"))
        if "lease_expires" not in names:
            conn.execute(text("ALTER TABLE rollouts ADD COLUMN lease_expires FLOAT"))
    if not inspect(conn).has_table("events"):
        return  # create_all makes it with the index
    indexes = {ix["name"] for ix in inspect(conn).get_indexes("events")}
    if "ux_events_message" not in indexes:
        conn.execute(
            text(
                "DELETE FROM events WHERE seq IS NOT NULL AND id NOT IN (SELECT MIN(id) FROM events "
                "WHERE seq IS NOT NULL GROUP BY fleet, device_id, kind, seq, ts)"
            )
        )
        unique = next(ix for ix in events.indexes if ix.name == "ux_events_message")
        unique.create(conn)
