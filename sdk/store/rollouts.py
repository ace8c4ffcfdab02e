"""Rollouts and their per-device rows."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select, update

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import StoreError, rollout_devices, rollouts


class RolloutsMixin(StoreBase):
    """Rollouts: status (compare-and-set), settings, and each target device's progress."""

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
        with self._tx(write=True) as conn:
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
        with self._tx(write=True) as conn:
            result = conn.execute(query.values(status=status, reason=reason, updated_at=time.time()))
        return bool(result.rowcount)

    def set_rollout_device(
        self, rollout_id: str, device_id: str, status: str, reason: str | None = None
    ) -> None:
        """Record one device's progress within a rollout."""
        with self._tx(write=True) as conn:
            conn.execute(
                update(rollout_devices)
                .where(
                    (rollout_devices.c.rollout_id == rollout_id) & (rollout_devices.c.device_id == device_id)
                )
                .values(status=status, reason=reason, updated_at=time.time())
            )

    def update_rollout_settings(self, rollout_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `changes` into a rollout's settings (engine progress, heartbeat); returns the new settings."""
        with self._tx(write=True) as conn:
            # Locked until commit: the engine's heartbeat and an operator's pause merge, never overwrite.
            row = conn.execute(
                select(rollouts.c.settings).where(rollouts.c.id == rollout_id).with_for_update()
            ).first()
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
        with self._tx(write=True) as conn:
            for device_id, status, reason in updates:
                conn.execute(
                    update(rollout_devices)
                    .where(
                        (rollout_devices.c.rollout_id == rollout_id)
                        & (rollout_devices.c.device_id == device_id)
                    )
                    .values(status=status, reason=reason, updated_at=now)
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
