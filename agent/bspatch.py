"""Apply a bsdiff4 patch (BSDIFF40 format) with the standard library and numpy, for delta updates.

The device rebuilds a model file from the one it runs and a small patch, then checks the result
against the signed sha256 of the full file; a wrong or hostile patch can only produce a file that
fails that check. Sizes are bounded before anything is allocated or decompressed.
"""

from __future__ import annotations

import bz2
from typing import List, Tuple

from edgefleet.agent.core.errors import TransferError

MAGIC = b"BSDIFF40"
HEADER = 32


def _offtin(buf: bytes) -> int:
    """bsdiff's signed 64-bit integer: little-endian magnitude, sign in the top bit of the last byte."""
    value = int.from_bytes(buf[:7] + bytes([buf[7] & 0x7F]), "little")
    return -value if buf[7] & 0x80 else value


def _bunzip(data: bytes, limit: int, what: str) -> bytes:
    decompressor = bz2.BZ2Decompressor()
    try:
        out = decompressor.decompress(data, max_length=limit + 1)
    except (OSError, ValueError, EOFError) as exc:
        raise TransferError("delta-corrupt", f"the delta's {what} block does not decompress: {exc}") from None
    if len(out) > limit:
        raise TransferError("delta-corrupt", f"the delta's {what} block is larger than the file it builds")
    return out


def patch_header(patch: bytes) -> Tuple[int, int, int]:
    """(control length, diff length, new file size) from a patch header; raises on a malformed one."""
    if len(patch) < HEADER or patch[:8] != MAGIC:
        raise TransferError("delta-corrupt", "the delta is not a BSDIFF40 patch")
    sizes = (_offtin(patch[8:16]), _offtin(patch[16:24]), _offtin(patch[24:32]))
    if min(sizes) < 0 or sizes[0] + sizes[1] > len(patch) - HEADER:
        raise TransferError("delta-corrupt", "the delta's header declares impossible block sizes")
    return sizes


def apply_patch(old: bytes, patch: bytes, max_size: int) -> bytes:
    """Rebuild the new file from `old` and a BSDIFF40 `patch`; refuses output larger than `max_size`."""
    import numpy as np

    len_control, len_diff, new_size = patch_header(patch)
    if new_size > max_size:
        raise TransferError(
            "delta-corrupt",
            f"the delta builds {new_size} bytes, more than the {max_size} the manifest allows",
        )
    control_raw = _bunzip(patch[HEADER : HEADER + len_control], 24 * (new_size + 1), "control")
    diff = _bunzip(patch[HEADER + len_control : HEADER + len_control + len_diff], new_size, "diff")
    extra = _bunzip(patch[HEADER + len_control + len_diff :], new_size, "extra")
    if len(control_raw) % 24:
        raise TransferError("delta-corrupt", "the delta's control block is not a list of triples")
    triples: List[Tuple[int, int, int]] = [
        (
            _offtin(control_raw[i : i + 8]),
            _offtin(control_raw[i + 8 : i + 16]),
            _offtin(control_raw[i + 16 : i + 24]),
        )
        for i in range(0, len(control_raw), 24)
    ]
    old_arr = np.frombuffer(old, dtype=np.uint8)
    diff_arr = np.frombuffer(diff, dtype=np.uint8)
    out = np.zeros(new_size, dtype=np.uint8)
    new_pos = old_pos = diff_pos = extra_pos = 0
    for add, copy, seek in triples:
        if add < 0 or copy < 0 or new_pos + add > new_size or diff_pos + add > len(diff_arr):
            raise TransferError("delta-corrupt", "the delta's control data runs past the file it builds")
        out[new_pos : new_pos + add] = diff_arr[diff_pos : diff_pos + add]
        # Bytes are added to the old file's where the window overlaps it (bsdiff's definition).
        lo, hi = max(old_pos, 0), min(old_pos + add, len(old_arr))
        if lo < hi:
            seg = out[new_pos + lo - old_pos : new_pos + hi - old_pos]
            seg += old_arr[lo:hi]
        new_pos += add
        diff_pos += add
        old_pos += add
        if new_pos + copy > new_size or extra_pos + copy > len(extra):
            raise TransferError("delta-corrupt", "the delta's extra data runs past the file it builds")
        out[new_pos : new_pos + copy] = np.frombuffer(extra, dtype=np.uint8, count=copy, offset=extra_pos)
        new_pos += copy
        extra_pos += copy
        old_pos += seek
    if new_pos != new_size:
        raise TransferError("delta-corrupt", f"the delta built {new_pos} of the {new_size} bytes it declares")
    return out.tobytes()
