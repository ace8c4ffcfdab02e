"""Bundles: registered once per manifest hash (INSERT ... ON CONFLICT DO NOTHING)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from edgefleet.sdk.store.base import StoreBase
from edgefleet.sdk.store.schema import StoreError, bundles, dialect_insert


class BundlesMixin(StoreBase):
    """Signed bundles the fleet knows, by id and by manifest hash."""

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
        """Register a bundle (idempotent on its manifest hash, also across processes); returns its id."""
        with self._tx(write=True) as conn:
            conn.execute(
                dialect_insert(conn, bundles)
                .values(
                    name=name,
                    version=version,
                    profile=profile,
                    manifest_sha256=manifest_sha256,
                    path=path,
                    size_bytes=size_bytes,
                    manifest=dict(manifest),
                    created_at=time.time(),
                )
                .on_conflict_do_nothing(index_elements=[bundles.c.manifest_sha256])
            )
            row = conn.execute(
                select(bundles.c.id).where(bundles.c.manifest_sha256 == manifest_sha256)
            ).first()
        if row is None:  # pragma: no cover - the row was inserted or existed in this transaction
            raise StoreError(f"bundle {manifest_sha256} vanished while it was registered; try again")
        return int(row[0])

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
