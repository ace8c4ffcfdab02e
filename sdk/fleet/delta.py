"""Delta updates: when a device runs an earlier version of the same model, send a bsdiff4 patch.

The patch rebuilds the model file from the one the device already has; the device checks the result
against the new manifest's signed sha256, so the patch needs no signature of its own. A delta is used
only when the device says it can apply one (its `state` lists `"bsdiff4"` under `delta`), the host
still has the device's current bundle, and the patch is clearly smaller than the file; otherwise the
full file goes, as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DELTA_FORMAT = "bsdiff4"
# A patch above this share of the full file is not worth the device's CPU time: send the file.
MAX_PATCH_RATIO = 0.5


@dataclass(frozen=True)
class Patch:
    """A bsdiff4 patch from one file (base) to another (target), stored on disk."""

    base_sha256: str
    target_sha256: str
    path: Path
    sha256: str
    size: int
    target_size: int

    @property
    def ratio(self) -> float:
        """Patch bytes over full-file bytes."""
        return self.size / max(1, self.target_size)


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_patch(base: Path, target: Path, cache_dir: Path) -> Patch:
    """The bsdiff4 patch from `base` to `target`, computed once and cached by the two hashes."""
    import bsdiff4

    base_sha, target_sha = _sha(base), _sha(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{base_sha[:16]}-{target_sha[:16]}.bsdiff4"
    if not path.is_file():
        data = bsdiff4.diff(base.read_bytes(), target.read_bytes())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return Patch(base_sha, target_sha, path, _sha(path), path.stat().st_size, target.stat().st_size)


def supports_delta(device: Mapping[str, Any]) -> bool:
    """Whether the device's last state (a registry row's `state`) says it rebuilds files from bsdiff4 patches."""
    from edgefleet.agent.core.errors import ProtocolError
    from edgefleet.agent.core.events import State

    info = device.get("state")
    if not isinstance(info, Mapping):
        return False
    try:
        state = State.from_info(str(device.get("device_id") or "-"), 0, 0.0, True, info)
    except ProtocolError:
        return False
    return DELTA_FORMAT in state.delta_formats


def base_bundle(
    device: Mapping[str, Any], new: Mapping[str, Any], bundles: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The stored bundle the device runs now, when it is an earlier version of the same model and profile."""
    name, version = device.get("active_model"), device.get("active_version")
    if name != new["name"] or version is None or int(version) >= int(new["version"]):
        return None
    for row in bundles:
        if row["name"] == name and int(row["version"]) == int(version) and row["profile"] == new["profile"]:
            return row
    return None


def plan_patch(
    device: Mapping[str, Any],
    new: Mapping[str, Any],
    bundles: list[dict[str, Any]],
    cache_dir: Path,
    max_ratio: float = MAX_PATCH_RATIO,
) -> tuple[str, Patch] | None:
    """(model file name, patch) to send this device instead of the full model file, or None for the full file."""
    if not supports_delta(device):
        return None
    base = base_bundle(device, new, bundles)
    if base is None:
        return None
    model_file = str((new.get("manifest") or {}).get("model", {}).get("file") or "")
    base_file = str((base.get("manifest") or {}).get("model", {}).get("file") or "")
    old_path, new_path = Path(base["path"]) / base_file, Path(new["path"]) / model_file
    if not model_file or not old_path.is_file() or not new_path.is_file():
        return None
    patch = make_patch(old_path, new_path, cache_dir)
    entry = (new.get("manifest") or {}).get("files", {}).get(model_file, {})
    if patch.target_sha256 != entry.get("sha256") or patch.ratio > max_ratio:
        return None
    return model_file, patch
