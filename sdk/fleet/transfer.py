"""Moving bundle files to devices: chunks broadcast once per wave, repairs on request (`RepairQueue`).

The chunk size stays under the broker's packet limit (MQTT 5 CONNACK `Maximum Packet Size`), and the
publisher waits for the broker's acknowledgements every window of chunks, so a 20 MB file never sits
whole in memory and a broker restart mid-broadcast resumes (paho re-sends what was not acknowledged;
devices ask for whatever they still miss).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.core.commands import (
    MIN_CHUNK_BYTES,
    DeltaSpec,
    DeployCommand,
    FileTransfer,
    hashes_payload,
)
from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.manifest import Manifest
from edgefleet.agent.core.topics import Topics
from edgefleet.agent.transfer import chunk_digests
from edgefleet.sdk.fleet.delta import DELTA_FORMAT
from edgefleet.sdk.fleet.errors import BundleRefused

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
# Topic, fixed header and MQTT 5 properties of a chunk PUBLISH stay well under this.
PACKET_OVERHEAD = 512
PUBLISH_WINDOW = 32
log = logging.getLogger(__name__)

# Repair requests are gathered this long, so that devices missing the same chunk share one re-send.
REPAIR_WINDOW_S = 0.5
# A chunk sent to a device (or broadcast) is not sent again for this long: behind a slow link or a busy
# broker it is still in flight, and a second copy only lengthens the queue it waits in. Short enough that
# a chunk really lost (or refused for its hash) comes on the agent's next request after its 2 s + 4 s
# back-off; the agent's pace-scaled wait (agent/deployment.py) keeps slower links from asking early.
REPAIR_HOLDOFF_S = 5.0
# A chunk asked for by at least max(REPAIR_BROADCAST_MIN, REPAIR_BROADCAST_SHARE × its receivers) devices
# is re-broadcast once instead of unicast to each: the broker then delivers it to every device still
# subscribed, at most 1/share as many deliveries as were asked for, in exchange for one publish.
REPAIR_BROADCAST_MIN = 3
REPAIR_BROADCAST_SHARE = 0.1
# sha256 of no bytes: the digest of an empty file, which has no chunk and so no prefix digest.
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def choose_chunk_size(max_packet_size: int | None, requested: int | None = None) -> int:
    """The chunk size: the requested one (default 256 KiB) capped under the broker's packet limit.

    A requested size may be small (down to the agents' MIN_CHUNK_BYTES: tests cut a tiny model into many
    chunks); the broker's cap must leave at least MIN_CHUNK_SIZE, or a big model would travel in tens of
    thousands of messages.
    """
    if requested is not None and requested < MIN_CHUNK_BYTES:
        raise BundleRefused(
            f"chunk size {requested} is below the {MIN_CHUNK_BYTES} bytes agents accept; use --chunk-size "
            f"{MIN_CHUNK_BYTES} or more (default {DEFAULT_CHUNK_SIZE})"
        )
    size = requested or DEFAULT_CHUNK_SIZE
    if max_packet_size:
        cap = max_packet_size - PACKET_OVERHEAD
        if cap < MIN_CHUNK_SIZE:
            raise BundleRefused(
                f"the broker accepts packets of at most {max_packet_size} bytes, too small for chunks of "
                f"{MIN_CHUNK_SIZE} bytes; raise the broker's max_packet_size"
            )
        size = min(size, cap)
    return size


@dataclass(frozen=True)
class _File:
    spec: FileTransfer
    path: Path


@dataclass
class TransferStats:
    """What the host published: payload bytes and messages, by purpose."""

    broadcast_bytes: int = 0
    broadcast_chunks: int = 0
    repair_bytes: int = 0
    repair_chunks: int = 0
    # Of the repair chunks, those re-broadcast once for several devices (the rest went to one device each).
    repair_broadcasts: int = 0
    command_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total_bytes(self) -> int:
        """Everything the host published for the rollout."""
        return self.broadcast_bytes + self.repair_bytes + self.command_bytes

    def to_dict(self) -> dict[str, int]:
        """Plain JSON."""
        return {
            "broadcast_bytes": self.broadcast_bytes,
            "broadcast_chunks": self.broadcast_chunks,
            "repair_bytes": self.repair_bytes,
            "repair_chunks": self.repair_chunks,
            "repair_broadcasts": self.repair_broadcasts,
            "command_bytes": self.command_bytes,
            "total_bytes": self.total_bytes,
        }


class Blob:
    """Any file the host sends in chunks under its sha256: a bundle file or a delta patch."""

    def __init__(self, path: str | Path, sha256: str, chunk_size: int) -> None:
        self.path = Path(path)
        self.sha256 = sha256
        self.size = self.path.stat().st_size
        self.chunk_size = chunk_size
        self.chunks = -(-self.size // chunk_size)
        self._handle: Any = None
        self._lock = threading.Lock()
        self._digests: tuple[list[str], list[str]] | None = None

    def digests(self) -> tuple[list[str], list[str]]:
        """Every chunk's sha256 and every prefix's (unsigned hints that let a device refuse a bad chunk at once).

        Computed once per blob: the deploy payload of every device carries them.
        """
        if self._digests is None:
            with open(self.path, "rb") as handle:
                self._digests = chunk_digests(handle.read(self.chunk_size) for _ in range(self.chunks))
        return self._digests

    def hashes_payload(self) -> bytes:
        """The file's hash index (chunk and prefix digests), published once per file instead of per command."""
        return hashes_payload(*self.digests())

    def chunk(self, index: int) -> bytes | None:
        """Bytes of one chunk, or None when the index is out of range."""
        if not 0 <= index < self.chunks:
            return None
        with self._lock:
            if self._handle is None:
                self._handle = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self._handle.seek(index * self.chunk_size)
            return bytes(self._handle.read(self.chunk_size))

    def broadcast(
        self, conn: Any, fleet: str, stats: TransferStats, should_stop: Callable[[], bool] | None = None
    ) -> None:
        """Publish every chunk once on `artifact/{sha256}/{index}`, waiting for acks every window."""
        info = None
        with open(self.path, "rb") as handle:
            for index in range(self.chunks):
                if should_stop is not None and should_stop():
                    return
                data = handle.read(self.chunk_size)
                info = conn.publish(Topics.broadcast(fleet, self.sha256, index), data, qos=1)
                with stats.lock:
                    stats.broadcast_bytes += len(data)
                    stats.broadcast_chunks += 1
                if (index + 1) % PUBLISH_WINDOW == 0:
                    wait_published(conn, info)
        if info is not None:
            wait_published(conn, info)

    def repair(
        self, conn: Any, fleet: str, device: str, ranges: Iterable[tuple[int, int]], stats: TransferStats
    ) -> int:
        """Re-send the chunks one device asked for on its own repair topic; returns how many went."""
        topics = Topics(fleet, device)
        count = 0
        for start, end in ranges:
            for index in range(max(0, start), min(end, self.chunks - 1) + 1):
                data = self.chunk(index)
                if data is None:
                    continue
                conn.publish(topics.repair(self.sha256, index), data, qos=1)
                count += 1
                with stats.lock:
                    stats.repair_bytes += len(data)
                    stats.repair_chunks += 1
        return count

    def close(self) -> None:
        """Close the file handle kept for repairs."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class RepairQueue:
    """Repair requests gathered for REPAIR_WINDOW_S, then served: shared chunks broadcast once, the rest unicast.

    Not thread-safe: the rollout engine adds and flushes from its own loop.
    """

    def __init__(
        self,
        *,
        window_s: float = REPAIR_WINDOW_S,
        holdoff_s: float = REPAIR_HOLDOFF_S,
        broadcast_min: int = REPAIR_BROADCAST_MIN,
        broadcast_share: float = REPAIR_BROADCAST_SHARE,
    ) -> None:
        self.window_s = window_s
        self.holdoff_s = holdoff_s
        self.broadcast_min = broadcast_min
        self.broadcast_share = broadcast_share
        self._asks: dict[str, dict[int, set[str]]] = {}  # sha256 → chunk → devices asking
        self._first_at: float | None = None
        self._sent: dict[tuple[str, str], dict[int, float]] = {}  # (device, sha256) → chunk → sent at
        self._broadcast: dict[str, dict[int, float]] = {}  # sha256 → chunk → broadcast at

    def add(self, device: str, blob: Blob, ranges: Iterable[tuple[int, int]], now: float) -> None:
        """Note one device's request for the chunks in `ranges` (inclusive) of `blob`."""
        by_index = self._asks.setdefault(blob.sha256, {})
        for start, end in ranges:
            for index in range(max(0, start), min(end, blob.chunks - 1) + 1):
                by_index.setdefault(index, set()).add(device)
        if by_index and self._first_at is None:
            self._first_at = now

    def note_broadcast(self, blob: Blob, now: float) -> None:
        """The whole blob was just broadcast: its chunks are in flight to every subscribed device."""
        self._broadcast[blob.sha256] = dict.fromkeys(range(blob.chunks), now)

    def due(self, now: float) -> bool:
        """Whether requests wait and the oldest has waited the window."""
        return self._first_at is not None and now - self._first_at >= self.window_s

    def flush(
        self,
        conn: Any,
        fleet: str,
        blobs: Mapping[str, Blob],
        stats: TransferStats,
        receivers: Callable[[str], int],
        now: float,
    ) -> int:
        """Serve every gathered request; `receivers(sha256)` counts the devices downloading that blob. Returns chunks sent."""
        asks, self._asks, self._first_at = self._asks, {}, None
        sent = 0
        for sha, by_index in asks.items():
            blob = blobs.get(sha)
            if blob is None:
                continue
            threshold = max(self.broadcast_min, math.ceil(self.broadcast_share * receivers(sha)))
            cast = self._broadcast.setdefault(sha, {})
            for index, devices in sorted(by_index.items()):
                if now - cast.get(index, -math.inf) < self.holdoff_s:
                    continue
                wanting = sorted(
                    d
                    for d in devices
                    if now - self._sent.get((d, sha), {}).get(index, -math.inf) >= self.holdoff_s
                )
                data = blob.chunk(index) if wanting else None
                if data is None:
                    continue
                shared = len(wanting) >= threshold
                if shared:
                    conn.publish(Topics.broadcast(fleet, sha, index), data, qos=1)
                    cast[index] = now
                    copies = 1
                else:
                    for device in wanting:
                        conn.publish(Topics(fleet, device).repair(sha, index), data, qos=1)
                        self._sent.setdefault((device, sha), {})[index] = now
                    copies = len(wanting)
                sent += copies
                with stats.lock:
                    stats.repair_bytes += copies * len(data)
                    stats.repair_chunks += copies
                    stats.repair_broadcasts += int(shared)
        log.debug("repairs: %d chunks sent for %d blobs", sent, len(asks))
        return sent


class BundleTransfer:
    """One bundle folder cut into chunks: its deploy commands (full or with delta patches) and its blobs."""

    def __init__(self, bundle_dir: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size < MIN_CHUNK_BYTES:
            raise BundleRefused(
                f"chunk size {chunk_size} is below the {MIN_CHUNK_BYTES} bytes agents accept; cut the bundle "
                f"in chunks of {MIN_CHUNK_BYTES} bytes or more"
            )
        self.bundle_dir = Path(bundle_dir)
        self.chunk_size = chunk_size
        manifest_path = self.bundle_dir / "manifest.json"
        signature_path = self.bundle_dir / "signature.json"
        for path in (manifest_path, signature_path):
            if not path.is_file():
                raise BundleRefused(
                    f"{path} is missing: is {self.bundle_dir} a bundle made by `edgefleet build`?"
                )
        self.manifest_bytes = manifest_path.read_bytes()
        try:
            entries = Manifest.from_bytes(self.manifest_bytes).files
        except VerifyError as exc:
            raise BundleRefused(f"{manifest_path} is not a valid manifest: {exc.reason}") from None
        try:
            self.signatures = json.loads(signature_path.read_bytes())
        except ValueError:
            raise BundleRefused(f"{signature_path} is not valid JSON: re-sign the bundle") from None
        self.files: list[_File] = []
        self.blobs: dict[str, Blob] = {}
        for name, entry in sorted(entries.items()):
            path = self.bundle_dir / name
            if not path.is_file():
                raise BundleRefused(f"bundle file {path} named in the manifest is missing")
            blob = Blob(path, entry.sha256, chunk_size)
            chunk_sha, prefix_sha = blob.digests()
            # The last prefix digest is the whole file's: a file changed since the bundle was signed
            # would only be refused by every device after its download, so it is refused here.
            if blob.size != entry.size or (prefix_sha[-1:] or [_EMPTY_SHA])[-1] != blob.sha256:
                raise BundleRefused(
                    f"bundle file {path} does not match its manifest entry (size or sha256): it changed "
                    "after signing; rebuild the bundle"
                )
            spec = FileTransfer(
                name, blob.sha256, blob.size, chunk_size, blob.chunks, tuple(chunk_sha), tuple(prefix_sha)
            )
            self.files.append(_File(spec, path))
            self.blobs[blob.sha256] = blob
        self.total_bytes = sum(f.spec.size for f in self.files)

    def deploy_command(
        self,
        deploy_id: str,
        device: str,
        patches: Mapping[str, tuple[str, Blob]] | None = None,
        *,
        inline_max: int | None = None,
    ) -> DeployCommand:
        """The signed deploy command for one device; files in `patches` (file → (base sha256, patch blob)) carry a delta.

        The delta tells an agent that can rebuild the file from the base it holds to fetch the patch's
        chunks (under the patch's sha256) instead of the file's; the file's signed sha256 and size stay
        as they are, so the rebuilt file is verified exactly like a downloaded one. With `inline_max`,
        a file of more chunks carries only the sha256 of its hash index (`hash_indexes`, published once
        per file) instead of the lists: the command's size no longer grows with the file.
        """
        files = []
        for f in self.files:
            patch = (patches or {}).get(f.spec.file)
            spec = f.spec
            if inline_max is not None and spec.chunks > inline_max:
                index = self.blobs[spec.sha256].hashes_payload()
                spec = replace(
                    spec, chunk_sha256=(), prefix_sha256=(), hashes_sha256=hashlib.sha256(index).hexdigest()
                )
            files.append(spec if patch is None else replace(spec, delta=delta_spec(*patch)))
        return DeployCommand(
            id=deploy_id,
            manifest=self.manifest_bytes,
            signatures=self.signatures,
            files=tuple(files),
            device=device,
        )

    def hash_indexes(self, inline_max: int) -> dict[str, bytes]:
        """File sha256 → its hash index, for the files `deploy_command(inline_max=...)` leaves the lists out of."""
        return {
            f.spec.sha256: self.blobs[f.spec.sha256].hashes_payload()
            for f in self.files
            if f.spec.chunks > inline_max
        }

    def needs(self, patches: Mapping[str, tuple[str, Blob]] | None = None) -> set[str]:
        """The sha256 of every blob a device must receive: whole files, or the patches that replace them."""
        patches = patches or {}
        out = {f.spec.sha256 for f in self.files if f.spec.file not in patches}
        return out | {blob.sha256 for _, blob in patches.values()}

    def shas(self) -> list[str]:
        """The signed sha256 of every file."""
        return [f.spec.sha256 for f in self.files]

    def close(self) -> None:
        """Close the file handles kept for repairs."""
        for blob in self.blobs.values():
            blob.close()


def delta_spec(base_sha256: str, patch: Blob) -> DeltaSpec:
    """How a device fetches a bsdiff4 patch instead of the whole file: the base it applies to, the patch's chunks."""
    chunk_sha, prefix_sha = patch.digests()
    return DeltaSpec(
        format=DELTA_FORMAT,
        base_sha256=base_sha256,
        sha256=patch.sha256,
        size=patch.size,
        chunk_size=patch.chunk_size,
        chunks=patch.chunks,
        chunk_sha256=tuple(chunk_sha),
        prefix_sha256=tuple(prefix_sha),
    )


def wait_published(conn: Any, info: Any, timeout_s: float = 60.0) -> bool:
    """Wait for a PUBACK; while the broker is away paho keeps the message and re-sends it on reconnect."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if info.is_published():
                return True
        except (RuntimeError, ValueError):
            # Published while the broker was away: paho keeps it and re-sends it after the reconnect,
            # but this info keeps the error code for good (is_published raises), so wait for that.
            if conn.connected.is_set():
                return True
            time.sleep(0.05)
            continue
        if conn.connected.is_set():
            try:
                info.wait_for_publish(min(1.0, max(0.01, deadline - time.monotonic())))
            except (RuntimeError, ValueError):
                time.sleep(0.05)
        else:
            time.sleep(0.05)
    return False
