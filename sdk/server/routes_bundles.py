"""Bundles: list what the store holds, upload a signed `.tar` (verified before anything is stored)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam

from edgefleet.sdk.server import queries
from edgefleet.sdk.server.context import ServerContext, get_ctx
from edgefleet.sdk.server.errors import NotFound, Unavailable
from edgefleet.sdk.server.uploads import spool, verify_and_store

router = APIRouter(prefix="/api", tags=["bundles"])

_SUMMARY_FIELDS = ("id", "name", "version", "profile", "manifest_sha256", "path", "size_bytes", "created_at")


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    """A bundle row without its full manifest, plus the headline facts from it."""
    out = {k: row.get(k) for k in _SUMMARY_FIELDS}
    manifest = row.get("manifest") or {}
    model = manifest.get("model") or {}
    out["format"] = model.get("format")
    out["runtime"] = model.get("runtime")
    out["expires"] = manifest.get("expires")
    out["health"] = manifest.get("health")
    out["metrics"] = manifest.get("metrics")
    return queries.jsonable(out)


@router.get("/bundles", summary="Stored bundles, newest version first")
def list_bundles(
    name: Optional[str] = Query(None, description="Only bundles of this model name."),
    ctx: ServerContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    """Every bundle the store knows (summaries; GET /api/bundles/{id} has the manifest)."""
    return [_summary(b) for b in ctx.store.bundles(name)]


@router.get("/bundles/{bundle_id}", summary="One bundle with its full manifest")
def get_bundle(
    bundle_id: int = PathParam(
        ..., ge=0, le=queries.MAX_BUNDLE_ID, description="Bundle id (GET /api/bundles)."
    ),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """One bundle; 404 when the id is unknown."""
    row = ctx.store.bundle(bundle_id)
    if row is None:
        raise NotFound(f"no bundle with id {bundle_id}; GET /api/bundles lists the stored bundles")
    out = _summary(row)
    out["manifest"] = queries.jsonable(row["manifest"])
    return out


@router.post(
    "/bundles",
    status_code=201,
    summary="Upload a signed bundle .tar (request body); it is verified before it is stored",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_bundle(
    request: Request, response: Response, ctx: ServerContext = Depends(get_ctx)
) -> dict[str, Any]:
    """Store a bundle: 201 when new, 200 when the same signed manifest is already stored, 422 when it fails."""
    if ctx.bundle_dir is None:
        raise Unavailable("this server has no bundle folder; start serve with --bundle-dir DIR")
    with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as tmp:
        tar_path = Path(tmp) / "upload.tar"
        await spool(request.stream(), tar_path, ctx.max_upload_bytes)
        row, created = await asyncio.to_thread(
            verify_and_store,
            ctx.store,
            tar_path,
            bundle_dir=ctx.bundle_dir,
            trusted_keys=ctx.trusted_keys,
            max_unpacked_bytes=ctx.max_upload_bytes,
        )
    if not created:
        response.status_code = 200
    out = _summary(row)
    out["created"] = created
    return out
