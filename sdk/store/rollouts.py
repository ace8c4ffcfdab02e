"""Rollouts, their per-device rows and the lease of the worker that drives each."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from edgefleet.agent.core.codes import ACTIVE_ROLLOUT
from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import StoreError, rollout_devices, rollouts

# Statuses in which a rollout still needs a driver.
_ACTIVE = sorted(str(s) for s in ACTIVE_ROLLOUT)


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
        owner: str | None = None,
        lease_s: float = 0.0,
    ) -> None:
        """Create a rollout and its per-device rows (device id, bundle id or None, wave) in one transaction.

        With `owner`, the rollout is born leased to it for `lease_s` seconds: no other worker takes it
        before its engine starts.
        """
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
                    owner=owner,
                    lease_expires=None if owner is None else now + lease_s,
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
        # One statement for the whole batch (executemany): 50 devices' statuses cost one round trip's
        # worth, not 50 compiled UPDATEs, at the end of a rollout's wave where the caller waits.
        query = (
            update(rollout_devices)
            .where(
                (rollout_devices.c.rollout_id == bindparam("rid"))
                & (rollout_devices.c.device_id == bindparam("dev"))
            )
            .values(status=bindparam("new_status"), reason=bindparam("new_reason"), updated_at=now)
        )
        params = [
            {"rid": rollout_id, "dev": d, "new_status": status, "new_reason": reason}
            for d, status, reason in sorted(updates)
        ]
        with self._tx(write=True) as conn:
            conn.execute(query, params)

    def rollout(self, rollout_id: str, devices: bool = True) -> dict[str, Any] | None:
        """A rollout with its devices under the key `devices` (unless `devices=False`), or None.

        `devices=False` reads one row: what a status poll needs (abort requested? lease holder?),
        where the per-device rows of a 5,000-device rollout cost a read and a decode each time.
        """
        with self._tx() as conn:
            row = conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()
            if row is None:
                return None
            if not devices:
                return dict(row._mapping)
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id == rollout_id)
                .order_by(rollout_devices.c.wave, rollout_devices.c.device_id)
            ).all()
        out = dict(row._mapping)
        out["devices"] = [dict(d._mapping) for d in devs]
        return out

    def rollout_status_counts(self, rollout_id: str) -> dict[str, int]:
        """How many of a rollout's devices are in each status (one GROUP BY, no device rows)."""
        query = (
            select(rollout_devices.c.status, func.count())
            .where(rollout_devices.c.rollout_id == rollout_id)
            .group_by(rollout_devices.c.status)
        )
        with self._tx() as conn:
            return {str(status or "unknown"): int(n) for status, n in conn.execute(query).all()}

    def rollouts(self, fleet: str | None = None, status: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts, newest first, optionally of one fleet and in the given statuses."""
        query = select(rollouts).order_by(rollouts.c.created_at.desc())
        if fleet is not None:
            query = query.where(rollouts.c.fleet == fleet)
        if status is not None:
            query = query.where(rollouts.c.status.in_(list(status)))
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def claim_rollout(self, rollout_id: str, owner: str, lease_s: float) -> bool:
        """Become the rollout's driver for `lease_s` seconds; True when `owner` holds the lease now.

        One conditional UPDATE: it succeeds only while the rollout has not ended and the lease is free,
        expired or already `owner`'s, so two workers racing for a dead owner's rollout never both win.
        """
        now = time.time()
        with self._tx(write=True) as conn:
            result = conn.execute(
                update(rollouts)
                .where(
                    (rollouts.c.id == rollout_id)
                    & rollouts.c.status.in_(_ACTIVE)
                    & (
                        rollouts.c.owner.is_(None)
                        | (rollouts.c.owner == owner)
                        | rollouts.c.lease_expires.is_(None)
                        | (rollouts.c.lease_expires < now)
                    )
                )
                .values(owner=owner, lease_expires=now + lease_s)
            )
        return bool(result.rowcount)

    def renew_rollout_lease(self, rollout_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease on a rollout; False when another worker took the rollout over."""
        with self._tx(write=True) as conn:
            result = conn.execute(
                update(rollouts)
                .where((rollouts.c.id == rollout_id) & (rollouts.c.owner == owner))
                .values(lease_expires=time.time() + lease_s)
            )
        return bool(result.rowcount)

    def release_rollout(self, rollout_id: str, owner: str) -> None:
        """Let the lease run out now (the engine stopped), keeping `owner` as who drove it last."""
        with self._tx(write=True) as conn:
            conn.execute(
                update(rollouts)
                .where((rollouts.c.id == rollout_id) & (rollouts.c.owner == owner))
                .values(lease_expires=0.0)
            )

    def orphaned_rollouts(self, fleet: str, now: float | None = None) -> list[dict[str, Any]]:
        """Rollouts of a fleet that have not ended and whose lease is free or expired: ones to take over."""
        now = time.time() if now is None else now
        query = (
            select(rollouts)
            .where(
                (rollouts.c.fleet == fleet)
                & rollouts.c.status.in_(_ACTIVE)
                & (rollouts.c.lease_expires.is_(None) | (rollouts.c.lease_expires < now))
            )
            .order_by(rollouts.c.created_at)
        )
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
