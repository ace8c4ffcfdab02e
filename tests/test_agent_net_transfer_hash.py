"""The whole-file sha256 computed while chunks arrive: in order, across gaps, after a restart, after a mismatch."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.errors import TransferError
from edgefleet.agent.protocol import Code, FileTransfer
from edgefleet.agent.transfer import Transfer


def _spec(data: bytes, chunk: int) -> FileTransfer:
    chunks = -(-len(data) // chunk)
    return FileTransfer("m.onnx", hashlib.sha256(data).hexdigest(), len(data), chunk, chunks, ())


def _no_reread(monkeypatch: pytest.MonkeyPatch, part: Path) -> None:
    """Fail the test if anything opens the part file for a second pass."""
    real_open = builtins.open

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(file)) == part:
            raise AssertionError("finish() read the whole file again")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def test_gaps_filled_late_are_hashed_without_a_second_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: chunks arrive 0, 3, 4, 1, 2 (1 and 2 fill the gap and release 3 and 4 from disk)
    data = os.urandom(450)
    transfer = Transfer(tmp_path, _spec(data, 100))
    # act
    for i in (0, 3, 4, 1, 2):
        transfer.write_chunk(i, data[i * 100 : (i + 1) * 100])
    _no_reread(monkeypatch, transfer.part_path)
    path = transfer.finish()
    # assert
    monkeypatch.undo()
    assert path.read_bytes() == data
    transfer.close()


def test_transfer_resumed_complete_is_verified_from_disk(tmp_path: Path) -> None:
    data = os.urandom(300)
    first = Transfer(tmp_path, _spec(data, 100))
    for i in range(3):
        first.write_chunk(i, data[i * 100 : (i + 1) * 100])
    first.close()
    # a restarted agent finds every chunk in the bitmap and nothing left to receive
    second = Transfer(tmp_path, _spec(data, 100))
    assert second.complete
    assert second.finish().read_bytes() == data
    second.close()


def test_mismatch_resets_the_running_hash_and_a_clean_retry_verifies(tmp_path: Path) -> None:
    data = os.urandom(300)
    transfer = Transfer(tmp_path, _spec(data, 100))
    transfer.write_chunk(0, b"\0" * 100)  # forged, and no per-chunk hashes to catch it
    transfer.write_chunk(1, data[100:200])
    transfer.write_chunk(2, data[200:])
    with pytest.raises(TransferError) as err:
        transfer.finish()
    assert err.value.code == Code.HASH_MISMATCH
    for i in (2, 1, 0):
        transfer.write_chunk(i, data[i * 100 : (i + 1) * 100])
    assert transfer.finish().read_bytes() == data
    transfer.close()
