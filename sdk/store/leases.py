"""Leases: one owner at a time for a named thing (an ingest worker's broker session), with an expiry.

A lease is taken with one conditional UPDATE (free, expired, or already ours), so two workers that race
for the same expired lease cannot both win; the owner renews it well before it runs out.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import dialect_insert, leases


class LeasesMixin(StoreBase):
    """The leases table: claim, renew, release and list."""

    def claim_lease(self, name: str, owner: str, ttl_s: float, *, force: bool = False) -> bool:
        """Take or renew the lease `name` for `ttl_s` seconds; True when `owner` holds it now.

        Without `force` only a free, expired or own lease is taken; with it the lease is taken from a
        live owner too (a worker taking back its own session from the one that adopted it).
        """
        now = time.time()
        with self._tx(write=True) as conn:
            inserted = conn.execute(
                dialect_insert(conn, leases)
                .on_conflict_do_nothing(index_elements=[leases.c.name])
                .values(name=name, owner=owner, expires=now + ttl_s)
                .returning(leases.c.name)
            )
            if inserted.first() is not None:  # (rowcount is -1 here on PostgreSQL)
                return True
            query = update(leases).where(leases.c.name == name)
            if not force:
                query = query.where((leases.c.owner == owner) | (leases.c.expires < now))
            result = conn.execute(query.values(owner=owner, expires=now + ttl_s))
        return bool(result.rowcount)

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend a lease `owner` holds; False when it is no longer its (another owner took it)."""
        with self._tx(write=True) as conn:
            result = conn.execute(
                update(leases)
                .where((leases.c.name == name) & (leases.c.owner == owner))
                .values(expires=time.time() + ttl_s)
            )
        return bool(result.rowcount)

    def release_lease(self, name: str, owner: str) -> None:
        """Give a lease up now (it expires at once) if `owner` still holds it."""
        with self._tx(write=True) as conn:
            conn.execute(
                update(leases).where((leases.c.name == name) & (leases.c.owner == owner)).values(expires=0.0)
            )

    def leases(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every lease whose name starts with `prefix`: name, owner, expires."""
        query = select(leases).order_by(leases.c.name)
        if prefix:
            query = query.where(leases.c.name.startswith(prefix, autoescape=True))
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]
