"""Device events (deploy progress, outcomes, errors): appended, newest read first."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import dialect_insert, events


class EventsMixin(StoreBase):
    """The events table."""

    def add_event(
        self,
        fleet: str,
        device_id: str,
        kind: str,
        payload: Mapping[str, Any],
        seq: int | None = None,
        ts: float | None = None,
    ) -> None:
        """Append one device event (deploy progress, outcome, error); a redelivered one is dropped."""
        with self._tx(write=True) as conn:
            conn.execute(
                dialect_insert(conn, events)
                .on_conflict_do_nothing()
                .values(
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
