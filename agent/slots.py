"""A/B model slots on disk and the agent's persisted install state (which slot serves, what was rejected).

Layout under the state folder:
    slots/a/, slots/b/   manifest.json + signature.json + the bundle's files, written complete or not at all
    install.json         {"active": "a", "previous": "b", "rejected": [...], "last_health": {...}}
A slot is written into a temporary sibling folder and renamed into place; install.json is replaced
atomically after the switch, so kill -9 at any moment leaves either the old or the new state.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from edgefleet.agent.core.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from edgefleet.agent.core.verify import copy_bounded

PathLike = Union[str, "os.PathLike[str]"]
SLOTS = ("a", "b")
STATE_FILE = "install.json"
SLOTS_DIR = "slots"
# Rejected versions remembered in install.json (newest last).
MAX_REJECTED = 32


@dataclass
class InstallState:
    """Which slot serves, which served before it, rejected versions and the last health report."""

    active: Optional[str] = None
    previous: Optional[str] = None
    rejected: List[Dict[str, Any]] = field(default_factory=list)
    last_health: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, obj: Any) -> InstallState:
        """Parse install.json leniently: unknown slot names are dropped, not trusted."""
        if not isinstance(obj, dict):
            return cls()
        active = obj.get("active") if obj.get("active") in SLOTS else None
        previous = obj.get("previous") if obj.get("previous") in SLOTS else None
        rejected = [r for r in obj.get("rejected") or [] if isinstance(r, dict)][-MAX_REJECTED:]
        health = obj.get("last_health") if isinstance(obj.get("last_health"), dict) else None
        return cls(active, previous if previous != active else None, rejected, health)

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return asdict(self)


class SlotStore:
    """The two model slots and install.json inside one state folder."""

    def __init__(self, state_dir: PathLike) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / SLOTS_DIR
        self.state_path = self.state_dir / STATE_FILE

    def path(self, slot: str) -> Path:
        """The folder of slot `a` or `b`."""
        if slot not in SLOTS:
            raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
        return self.root / slot

    @staticmethod
    def other(slot: Optional[str]) -> str:
        """The slot that is not `slot` (slot `a` when none serves)."""
        return "b" if slot == "a" else "a"

    def read_state(self) -> InstallState:
        """install.json, or an empty state when it is missing or unreadable."""
        try:
            return InstallState.from_dict(read_json(self.state_path, default={}))
        except ValueError:
            # Atomic writes make this unlikely; a damaged file must not keep the agent from starting.
            return InstallState()

    def write_state(self, state: InstallState) -> None:
        """Replace install.json atomically."""
        atomic_write_json(self.state_path, state.to_dict())

    def read_slot(self, slot: str) -> Optional[Tuple[bytes, bytes]]:
        """(manifest bytes, signature bytes) of a complete slot, or None when it is empty."""
        folder = self.path(slot)
        try:
            return (folder / MANIFEST_FILE).read_bytes(), (folder / SIGNATURE_FILE).read_bytes()
        except OSError:
            return None

    def clean(self) -> None:
        """Remove half-written slot folders left by a kill during a write."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)

    def write_slot(
        self,
        slot: str,
        manifest: Manifest,
        manifest_bytes: bytes,
        signature_bytes: bytes,
        staged: Mapping[str, Path],
        max_bytes: int,
    ) -> Path:
        """Copy the staged files into `slot` (bounded by their signed sizes, hashes checked), then rename it in."""
        missing = sorted(set(manifest.files) - set(staged))
        extra = sorted(set(staged) - set(manifest.files))
        if missing or extra:
            raise VerifyError(
                "files-mismatch",
                f"staged files do not match the manifest: missing {missing or 'none'}, unlisted {extra or 'none'}",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{slot}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for relpath, entry in sorted(manifest.files.items()):
                dest = tmp / relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(staged[relpath], "rb") as src:
                    digest = copy_bounded(src, dest, entry.size, max_bytes)
                if digest != entry.sha256:
                    raise VerifyError(
                        "file-hash-mismatch",
                        f"{relpath} does not match its signed sha256 (got {digest[:16]}…, expected "
                        f"{entry.sha256[:16]}…); the download was corrupted or tampered with",
                    )
            # The manifest goes in last: a slot folder with a manifest has all its files.
            atomic_write_bytes(tmp / SIGNATURE_FILE, signature_bytes)
            atomic_write_bytes(tmp / MANIFEST_FILE, manifest_bytes)
            fsync_dir(tmp)
            target = self.path(slot)
            if target.exists():
                old = self.root / f".{slot}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path(slot)

    def clear(self, slot: str) -> None:
        """Empty a slot (its model failed to verify at start-up)."""
        folder = self.path(slot)
        if folder.exists():
            old = self.root / f".{slot}.bad-{os.getpid()}"
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
