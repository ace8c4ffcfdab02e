"""Delta updates on the device: find the base file a patch applies to, and rebuild + verify the new file.

The host sends a bsdiff4 patch instead of a model file when this device runs an earlier version of the
same model (see the `delta` object of a deploy command's file entry). The base must be a file of one of
the device's own A/B slots with the sha256 the delta names; the rebuilt file must have the size and
sha256 the signed manifest gives for the new file, exactly as a downloaded one must.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from edgefleet.agent.bspatch import apply_patch
from edgefleet.agent.core.errors import ProtocolError, TransferError
from edgefleet.agent.core.fsutil import read_json
from edgefleet.agent.core.manifest import MANIFEST_FILE
from edgefleet.agent.core.protocol import Code, DeltaSpec, FileTransfer
from edgefleet.agent.slots import SLOTS, SLOTS_DIR

FORMATS = ("bsdiff4",)


def patch_transfer(target: FileTransfer, delta: Any) -> FileTransfer:
    """The FileTransfer of the patch a file entry's `delta` (a DeltaSpec, or its JSON object) describes."""
    if isinstance(delta, dict):
        delta = DeltaSpec.from_obj(delta)
    if not isinstance(delta, DeltaSpec) or delta.format not in FORMATS:
        raise ProtocolError(
            Code.BAD_FIELD, f"file {target.file!r}: 'delta.format' must be one of {list(FORMATS)}"
        )
    return delta.transfer(target)


def find_base(state_dir: Path, base_sha256: str) -> Optional[Path]:
    """A file of this device's slots whose signed sha256 is `base_sha256`, or None."""
    for slot in SLOTS:
        root = Path(state_dir) / SLOTS_DIR / slot
        manifest = read_json(root / MANIFEST_FILE, default=None)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            continue
        for name, entry in files.items():
            if isinstance(entry, dict) and entry.get("sha256") == base_sha256:
                path = root / name
                if path.is_file() and path.stat().st_size == entry.get("size"):
                    return path
    return None


def rebuild(base: Path, patch: Path, out: Path, target: FileTransfer) -> Path:
    """Apply `patch` to `base` into `out`; the result must match the target's signed size and sha256."""
    data = apply_patch(base.read_bytes(), patch.read_bytes(), target.size)
    if len(data) != target.size or hashlib.sha256(data).hexdigest() != target.sha256:
        raise TransferError(
            Code.HASH_MISMATCH,
            f"the file rebuilt from the delta for {target.file!r} does not match its signed sha256",
        )
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return out
