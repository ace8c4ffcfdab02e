"""Devices: one row per (fleet, device id), written by INSERT ... ON CONFLICT DO UPDATE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, select, update

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import StoreError, devices, dialect_insert

# What a device row holds before anything about it is known.
DEVICE_DEFAULTS: Mapping[str, Any] = {
    "tags": [],
    "runtimes": [],
    "state": {},
    "online": False,
    "emulated": False,
}


def _check_fields(names: Any) -> None:
    unknown = set(names) - set(devices.c.keys())
    if unknown:
        raise StoreError(f"unknown device field(s) {sorted(unknown)}; known: {sorted(devices.c.keys())}")


class DevicesMixin(StoreBase):
    """Device rows of every fleet."""

    def upsert_device(self, fleet: str, device_id: str, **fields: Any) -> None:
        """Create or update a device row with the given columns (unknown names are refused)."""
        _check_fields(fields)
        with self._tx(write=True) as conn:
            row = {**DEVICE_DEFAULTS, **fields, "fleet": fleet, "device_id": device_id}
            stmt = dialect_insert(conn, devices).values(**row)
            key = [devices.c.fleet, devices.c.device_id]
            if fields:
                stmt = stmt.on_conflict_do_update(index_elements=key, set_=dict(fields))
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=key)
            conn.execute(stmt)

    def update_devices(self, fleet: str, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Update columns of several existing devices in one transaction (device id → {column: value})."""
        _check_fields({k for fields in changes.values() for k in fields})
        if not changes:
            return
        # One executemany per set of columns changed (usually one: the rollout's desired model), rows in
        # one order in every writer, so two transactions never wait on each other crosswise.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for device_id in sorted(changes):
            cols = tuple(sorted(changes[device_id]))
            row = {f"new_{c}": changes[device_id][c] for c in cols}
            groups.setdefault(cols, []).append({"b_fleet": fleet, "b_device": device_id, **row})
        with self._tx(write=True) as conn:
            for cols, params in groups.items():
                if not cols:
                    continue
                query = (
                    update(devices)
                    .where(
                        (devices.c.fleet == bindparam("b_fleet"))
                        & (devices.c.device_id == bindparam("b_device"))
                    )
                    .values({c: bindparam(f"new_{c}") for c in cols})
                )
                conn.execute(query, params)

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
