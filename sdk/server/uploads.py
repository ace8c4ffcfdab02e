"""Bundle upload: stream the `.tar` to disk with a size cap, unpack safely, verify, then file it in the store.

Nothing reaches the bundle folder or the store before verification passes, so a tampered upload leaves
what is stored untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edgefleet.sdk.server.errors import ApiError, Unavailable, Unprocessable
from edgefleet.sdk.store import Store


class PayloadTooLarge(ApiError):
    """The upload is larger than the server accepts (HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


async def spool(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> int:
    """Write a request body to `dest`, refusing it as soon as it passes `max_bytes`; returns its size."""
    size = 0
    with dest.open("wb") as fh:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"the upload is over {max_bytes} bytes; raise the limit with "
                    "`edgefleet serve --max-upload-mb N` or upload a smaller bundle"
                )
            fh.write(chunk)
    if size == 0:
        raise Unprocessable(
            "the request body is empty: send the bundle .tar as the body, e.g. "
            "curl --data-binary @bundle.tar -H 'Content-Type: application/x-tar' .../api/bundles"
        )
    return size


def _verify_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'this bundle is bad' rather than 'the server is broken'."""
    from edgefleet.agent.core.errors import AgentError

    types: list[type[BaseException]] = [AgentError]
    try:
        from edgefleet.sdk.trust.bundle import BundleError

        types.append(BundleError)
    except ImportError:
        pass
    return tuple(types)


def verify_and_store(
    store: Store,
    tar_path: Path,
    *,
    bundle_dir: Path,
    trusted_keys: list[Path],
    max_unpacked_bytes: int,
) -> tuple[dict[str, Any], bool]:
    """Unpack and verify an uploaded bundle against the trusted keys; store it. Returns (row, created)."""
    if not trusted_keys:
        raise Unavailable(
            "uploads need the fleet's public key to verify bundles: start serve with "
            "--trusted-key PATH/fleet.pub (default ~/.edgefleet/keys/fleet.pub)"
        )
    from edgefleet.sdk.trust.bundle import unpack, verify_bundle

    bad = _verify_error_types()
    bundle_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=bundle_dir))
    try:
        unpacked = staging / "bundle"
        try:
            # A compressed tar can expand far beyond its upload size: cap what it may unpack to.
            unpack(tar_path, unpacked, max_bytes=max_unpacked_bytes)
            manifest_bytes = (unpacked / "manifest.json").read_bytes()
            verified = verify_bundle(unpacked, trusted_keys, max_bytes=max_unpacked_bytes)
        except FileNotFoundError as exc:
            raise Unprocessable(
                f"the upload is not a bundle: {exc.filename or exc} is missing; pack a bundle folder with "
                "`edgefleet bundle pack DIR bundle.tar`"
            ) from exc
        except bad as exc:
            code = getattr(exc, "code", "bad-bundle")
            reason = getattr(exc, "reason", "") or str(exc)
            raise Unprocessable(
                f"the bundle does not verify ({code}): {reason}. Nothing was stored; rebuild or re-sign it "
                "with the fleet key and upload again"
            ) from exc
        sha = hashlib.sha256(manifest_bytes).hexdigest()
        existing = [b for b in store.bundles(verified.name) if b["manifest_sha256"] == sha]
        if existing and Path(str(existing[0]["path"])).is_dir():
            return existing[0], False
        final = bundle_dir / f"{verified.name}-v{verified.version}-{verified.target.profile}-{sha[:12]}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(unpacked, final)
        manifest_obj = json.loads(manifest_bytes)
        bundle_id = store.add_bundle(
            name=verified.name,
            version=int(verified.version),
            profile=verified.target.profile,
            manifest_sha256=sha,
            path=str(final),
            size_bytes=sum(f.stat().st_size for f in final.rglob("*") if f.is_file()),
            manifest=manifest_obj,
        )
        row = store.bundle(bundle_id)
        if row is None:
            raise ApiError(500, f"bundle {bundle_id} vanished from the store right after it was added")
        return row, not existing
    finally:
        shutil.rmtree(staging, ignore_errors=True)
