"""The fleet's store: devices, bundles, rollouts, events and telemetry, through one SQLAlchemy code path.

SQLite (a file under ~/.edgefleet/ by default) and PostgreSQL (by URL) run the same statements; only
the engine options differ. Writes upsert with the dialect's INSERT ... ON CONFLICT, so several threads
and processes (two ingest processes on a shared subscription) can write the same devices. Telemetry is
written in batches, old rows are pruned by a retention setting, and per-device sequence numbers reveal
messages the broker dropped on the way. The quality columns are `accuracy`, `agreement` and `fidelity`
(docs/quality.md).

Modules: schema (tables, migrations, engine), base (transactions), devices, bundles, rollouts (with
their owner's lease), events, telemetry (rows, gaps, series), leases (ingest workers' sessions),
batcher (background writer).
"""

from __future__ import annotations

from edgefleet.sdk.store.batcher import TelemetryBatcher
from edgefleet.sdk.store.bundles import BundlesMixin
from edgefleet.sdk.store.devices import DevicesMixin
from edgefleet.sdk.store.events import EventsMixin
from edgefleet.sdk.store.leases import LeasesMixin
from edgefleet.sdk.store.rollouts import RolloutsMixin
from edgefleet.sdk.store.schema import (
    QUALITY_COLUMNS,
    SCHEMA_VERSION,
    TELEMETRY_COLUMNS,
    StoreError,
    bundles,
    default_db_url,
    devices,
    events,
    gaps,
    leases,
    meta_table,
    metadata,
    rollout_devices,
    rollouts,
    telemetry,
)
from edgefleet.sdk.store.telemetry import Gap, SeriesPoint, TelemetryMixin


class Store(DevicesMixin, BundlesMixin, RolloutsMixin, EventsMixin, TelemetryMixin, LeasesMixin):
    """The fleet's persistent state; safe to share between threads and between processes."""


__all__ = [
    "QUALITY_COLUMNS",
    "SCHEMA_VERSION",
    "TELEMETRY_COLUMNS",
    "Gap",
    "SeriesPoint",
    "Store",
    "StoreError",
    "TelemetryBatcher",
    "bundles",
    "default_db_url",
    "devices",
    "events",
    "gaps",
    "leases",
    "meta_table",
    "metadata",
    "rollout_devices",
    "rollouts",
    "telemetry",
]
