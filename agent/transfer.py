"""Chunked file transfers into a staging area that survives restarts and broker outages.

Each file being received lives in `staging/<sha256>/`: `<sha256>.part` written at chunk offsets (never
longer than the declared size), `bitmap` (one bit per chunk received) and `spec.json`. The bitmap is
persisted atomically every N chunks or T seconds, always after an fsync of the data, so the bitmap on disk
never claims a chunk that is not on disk; chunks received after the last flush are simply asked for again.

The whole file's sha256 is computed as the data arrives: chunks extending the in-order prefix go into a
running hash straight from memory, and when a gap fills the chunks it releases are read back from the
part file. So `finish()` after the last chunk only compares digests instead of reading and hashing the
whole file again: the device's reply no longer waits for a second pass over 20 MB.

Chunks are checked as they arrive, so a forged or corrupt one is refused at once and asked for again.
With the host's `prefix_sha256` a chunk that extends the in-order prefix (the usual case: the broadcast
is in order) is checked by finishing a copy of the running hash, so its bytes are hashed once, not twice
(once for `chunk_sha256`, once for the file) — half the hashing on a Pi 4, whose cores lack SHA
instructions. Chunks out of order are checked against `chunk_sha256`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from edgefleet.agent.core.errors import TransferError
from edgefleet.agent.core.fsutil import atomic_write_bytes, atomic_write_json, read_json
from edgefleet.agent.core.protocol import Code, FileTransfer, ranges_of, valid_sha256

_HASH_BLOCK = 1 << 20


def chunk_digests(blocks: Iterable[bytes]) -> Tuple[List[str], List[str]]:
    """`chunk_sha256` and `prefix_sha256` of a file given as its chunks, in one pass (the host sends both)."""
    chunk, prefix = [], []
    running = hashlib.sha256()
    for block in blocks:
        chunk.append(hashlib.sha256(block).hexdigest())
        running.update(block)
        prefix.append(running.hexdigest())
    return chunk, prefix


class Transfer:
    """One file being received: write chunks in any order, drop duplicates, report what is missing."""

    def __init__(
        self,
        folder: Path,
        spec: FileTransfer,
        *,
        flush_every: int = 64,
        flush_s: float = 1.0,
        max_chunk_bytes: int = 4 << 20,
    ) -> None:
        if spec.chunk_size > max_chunk_bytes:
            raise TransferError(
                Code.CHUNK_OVERSIZE,
                f"file {spec.file!r} uses chunks of {spec.chunk_size} bytes, above this agent's limit of "
                f"{max_chunk_bytes}: push with a smaller chunk size or raise max_chunk_bytes",
            )
        self.spec = spec
        self.folder = folder
        self.flush_every = flush_every
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._bits = bytearray((spec.chunks + 7) // 8)
        self._received = 0
        self._dirty = 0
        self._last_flush = time.monotonic()
        # sha256 of chunks [0, _hashed): the in-order prefix of the file, hashed as it completes.
        self._digest = hashlib.sha256()
        self._hashed = 0
        self.duplicates = 0
        self.last_chunk_at = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True)
        self._resume()
        self._fd: Optional[int] = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        # Truncating to the declared size caps the disk it can take (the file stays sparse until written).
        os.ftruncate(self._fd, spec.size)

    @property
    def part_path(self) -> Path:
        """The partial data file."""
        return self.folder / f"{self.spec.sha256}.part"

    @property
    def bitmap_path(self) -> Path:
        """The persisted received-chunk bitmap."""
        return self.folder / "bitmap"

    def _resume(self) -> None:
        """Reload the bitmap of an earlier run when it describes the same transfer, else start over."""
        spec_path = self.folder / "spec.json"
        stored = read_json(spec_path)
        wanted = self.spec.to_obj()
        wanted.pop("chunk_sha256", None)
        wanted.pop("prefix_sha256", None)
        if stored == wanted and self.bitmap_path.exists():
            bits = self.bitmap_path.read_bytes()
            if len(bits) == len(self._bits):
                self._bits[:] = bits
                self._received = sum(bin(b).count("1") for b in self._bits)
                return
        for stale in (self.bitmap_path, self.part_path):
            if stale.exists():
                stale.unlink()
        atomic_write_json(spec_path, wanted)
        atomic_write_bytes(self.bitmap_path, bytes(self._bits))

    def has(self, index: int) -> bool:
        """Whether chunk `index` was received."""
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def expected_length(self, index: int) -> int:
        """Byte length chunk `index` must have (the last one may be shorter)."""
        if index == self.spec.chunks - 1:
            return self.spec.size - self.spec.chunk_size * (self.spec.chunks - 1)
        return self.spec.chunk_size

    def write_chunk(self, index: int, data: bytes) -> bool:
        """Store one chunk; False for a duplicate; TransferError for a bad index, size or hash."""
        if not 0 <= index < self.spec.chunks:
            raise TransferError(
                Code.CHUNK_INDEX,
                f"chunk {index} of {self.spec.sha256[:12]}… is out of range: the file has {self.spec.chunks} chunks",
            )
        expected = self.expected_length(index)
        if len(data) > expected:
            raise TransferError(
                Code.CHUNK_OVERSIZE, f"chunk {index} has {len(data)} bytes, more than the {expected} declared"
            )
        if len(data) != expected:
            raise TransferError(Code.CHUNK_SIZE, f"chunk {index} has {len(data)} bytes, expected {expected}")
        with self._lock:
            if self._fd is None:
                raise TransferError(Code.UNKNOWN_TRANSFER, f"transfer {self.spec.sha256[:12]}… is closed")
            if self.has(index):
                self.duplicates += 1
                return False
            extended = None
            if index == self._hashed and self.spec.prefix_sha256:
                extended = self._digest.copy()
                extended.update(data)
                good = extended.hexdigest() == self.spec.prefix_sha256[index]
            elif self.spec.chunk_sha256:
                good = hashlib.sha256(data).hexdigest() == self.spec.chunk_sha256[index]
            else:
                good = True  # no hint: the signed whole-file sha256 in finish() decides
            if not good:
                raise TransferError(
                    Code.CHUNK_HASH, f"chunk {index} of {self.spec.file!r} does not match its hash: refused"
                )
            os.pwrite(self._fd, data, index * self.spec.chunk_size)
            self._bits[index >> 3] |= 1 << (index & 7)
            if extended is not None:
                self._digest = extended
                self._hashed += 1
            self._advance_hash_locked(self._fd, index, data)
            self._received += 1
            self._dirty += 1
            self.last_chunk_at = time.monotonic()
            if self._dirty >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s:
                self._flush_locked()
            return True

    def _advance_hash_locked(self, fd: int, index: int, data: bytes) -> None:
        """Extend the running hash over every chunk now contiguous with the hashed prefix."""
        chunks, size = self.spec.chunks, self.spec.chunk_size
        while self._hashed < chunks and self.has(self._hashed):
            at = self._hashed
            # A chunk received earlier out of order (or before a restart) is read back from the part file.
            block = data if at == index else os.pread(fd, self.expected_length(at), at * size)
            self._digest.update(block)
            self._hashed += 1

    def _flush_locked(self) -> None:
        if self._fd is None or not self._dirty:
            return
        os.fsync(self._fd)
        atomic_write_bytes(self.bitmap_path, bytes(self._bits))
        self._dirty = 0
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Persist the bitmap now (data first), e.g. on a timer or before shutdown."""
        with self._lock:
            self._flush_locked()

    @property
    def received(self) -> int:
        """Number of distinct chunks received."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether every chunk arrived."""
        return self._received == self.spec.chunks

    def missing(self) -> List[int]:
        """Indexes of chunks not received yet."""
        with self._lock:
            return [i for i in range(self.spec.chunks) if not self.has(i)]

    def missing_ranges(self, limit: Optional[int] = None) -> List[List[int]]:
        """Missing chunks as inclusive `[start, end]` ranges (at most `limit` ranges)."""
        ranges = ranges_of(self.missing())
        return ranges if limit is None else ranges[:limit]

    def finish(self) -> Path:
        """Check the whole file against its signed sha256; on mismatch start over and raise."""
        with self._lock:
            if self._received != self.spec.chunks:
                raise TransferError(
                    Code.TRANSFER_TIMEOUT, f"{self.spec.chunks - self._received} chunks are still missing"
                )
            self._flush_locked()
            if self._hashed < self.spec.chunks:
                # A transfer resumed complete from its bitmap got no chunk to hash: one pass over the file.
                self._digest, self._hashed = hashlib.sha256(), 0
                with open(self.part_path, "rb") as handle:
                    for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                        self._digest.update(block)
                self._hashed = self.spec.chunks
            digest = self._digest
            if digest.hexdigest() != self.spec.sha256:
                # Some chunk was corrupt or forged: nothing tells which, so receive the file again.
                self._bits[:] = bytes(len(self._bits))
                self._received = 0
                self._digest, self._hashed = hashlib.sha256(), 0
                atomic_write_bytes(self.bitmap_path, bytes(self._bits))
                raise TransferError(
                    Code.HASH_MISMATCH,
                    f"{self.spec.file!r} does not match its signed sha256 {self.spec.sha256[:12]}…; "
                    "the staged copy was discarded",
                )
            return self.part_path

    def close(self) -> None:
        """Flush and close the data file."""
        with self._lock:
            self._flush_locked()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class StagingArea:
    """The folder of all transfers, keyed by file sha256; resumes what an earlier run left behind."""

    def __init__(
        self, root: Path, *, flush_every: int = 64, flush_s: float = 1.0, max_chunk_bytes: int = 4 << 20
    ) -> None:
        self.root = root
        self.flush_every = flush_every
        self.flush_s = flush_s
        self.max_chunk_bytes = max_chunk_bytes
        self._open: Dict[str, Transfer] = {}
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def open(self, spec: FileTransfer) -> Transfer:
        """Open (or resume) the transfer of one file."""
        with self._lock:
            current = self._open.get(spec.sha256)
            if current is not None and current.spec == spec:
                return current
            if current is not None:
                current.close()
            transfer = Transfer(
                self.root / spec.sha256,
                spec,
                flush_every=self.flush_every,
                flush_s=self.flush_s,
                max_chunk_bytes=self.max_chunk_bytes,
            )
            self._open[spec.sha256] = transfer
            return transfer

    def get(self, sha256: str) -> Transfer:
        """The open transfer of `sha256`, or TransferError('unknown-transfer')."""
        with self._lock:
            transfer = self._open.get(sha256)
        if transfer is None:
            raise TransferError(
                Code.UNKNOWN_TRANSFER,
                f"no transfer of {sha256[:12]}… is open: chunks arrived without a deploy",
            )
        return transfer

    def active(self) -> List[Transfer]:
        """Every open transfer."""
        with self._lock:
            return list(self._open.values())

    def flush_all(self) -> None:
        """Persist every open transfer's bitmap."""
        for transfer in self.active():
            transfer.flush()

    def discard(self, sha256: str) -> None:
        """Close and delete one transfer's staging folder."""
        with self._lock:
            transfer = self._open.pop(sha256, None)
        if transfer is not None:
            transfer.close()
        if valid_sha256(sha256):
            shutil.rmtree(self.root / sha256, ignore_errors=True)

    def prune(self, keep: Iterable[str] = ()) -> None:
        """Close everything and delete staging folders except those of `keep`."""
        keep_set = set(keep)
        for sha in [s for s in list(self._open) if s not in keep_set]:
            self.discard(sha)
        for entry in self.root.iterdir() if self.root.exists() else []:
            if entry.name not in keep_set:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()

    def close(self) -> None:
        """Flush and close all open transfers (their folders stay for a resume)."""
        with self._lock:
            transfers = list(self._open.values())
            self._open.clear()
        for transfer in transfers:
            transfer.close()
