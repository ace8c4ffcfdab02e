"""The whole-file sha256 computed while chunks arrive: in order, across gaps, after a restart, after a mismatch;
prefix hints that check in-order chunks without hashing them twice."""

from __future__ import annotations

import builtins
import hashlib
import os
import types
from pathlib import Path
from typing import Any

import pytest

import edgefleet.agent.transfer as transfer_module
from edgefleet.agent.core.errors import ProtocolError, TransferError
from edgefleet.agent.core.protocol import Code, FileTransfer
from edgefleet.agent.transfer import Transfer, chunk_digests


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


class _CountingSha256:
    """hashlib.sha256 stand-in that adds every byte it hashes to a shared counter."""

    def __init__(self, counter: list[int], data: bytes = b"", inner: Any = None) -> None:
        self.counter = counter
        self.inner = inner if inner is not None else hashlib.sha256()
        self.update(data)

    def update(self, data: bytes) -> None:
        self.counter[0] += len(data)
        self.inner.update(data)

    def copy(self) -> _CountingSha256:
        return _CountingSha256(self.counter, inner=self.inner.copy())

    def hexdigest(self) -> str:
        return str(self.inner.hexdigest())


def _hinted(data: bytes, chunk: int, *, chunk_hints: bool = True, prefix_hints: bool = True) -> FileTransfer:
    blocks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    per_chunk, prefixes = chunk_digests(blocks)
    return FileTransfer(
        "m.onnx",
        hashlib.sha256(data).hexdigest(),
        len(data),
        chunk,
        len(blocks),
        tuple(per_chunk) if chunk_hints else (),
        tuple(prefixes) if prefix_hints else (),
    )


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counter = [0]
    shim = types.SimpleNamespace(sha256=lambda data=b"": _CountingSha256(counter, data))
    monkeypatch.setattr(transfer_module, "hashlib", shim)
    return counter


@pytest.mark.parametrize(("prefix_hints", "passes"), [(True, 1), (False, 2)])
def test_in_order_chunks_are_hashed_once_with_prefix_hints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix_hints: bool, passes: int
) -> None:
    # prepare: the broadcast's usual case, every chunk in order, with per-chunk hints (and prefix hints)
    data = os.urandom(1000)
    spec = _hinted(data, 100, prefix_hints=prefix_hints)
    hashed = _count_hashing(monkeypatch)
    transfer = Transfer(tmp_path, spec)
    # act
    for i in range(10):
        transfer.write_chunk(i, data[i * 100 : (i + 1) * 100])
    path = transfer.finish()
    # assert: with prefix hints each byte goes through sha256 once; without, once per chunk and once per file
    monkeypatch.undo()
    assert hashed[0] == passes * len(data)
    assert path.read_bytes() == data
    transfer.close()


def test_forged_in_order_chunk_is_refused_by_its_prefix_and_the_genuine_one_then_accepted(
    tmp_path: Path,
) -> None:
    # prepare: prefix hints only, so the refusal can only come from the running hash's copy
    data = os.urandom(300)
    transfer = Transfer(tmp_path, _hinted(data, 100, chunk_hints=False))
    transfer.write_chunk(0, data[:100])
    # act / assert: a forged chunk 1 is refused, nothing is recorded and the running hash is untouched
    with pytest.raises(TransferError) as err:
        transfer.write_chunk(1, b"\0" * 100)
    assert err.value.code == Code.CHUNK_HASH
    assert transfer.received == 1 and not transfer.has(1)
    assert transfer.write_chunk(1, data[100:200]) is True
    assert transfer.write_chunk(2, data[200:]) is True
    assert transfer.finish().read_bytes() == data
    transfer.close()


def test_forged_chunk_out_of_order_is_refused_by_its_chunk_hash(tmp_path: Path) -> None:
    data = os.urandom(300)
    transfer = Transfer(tmp_path, _hinted(data, 100))
    with pytest.raises(TransferError) as err:
        transfer.write_chunk(2, b"\1" * 100)  # not the next in order: checked against chunk_sha256
    assert err.value.code == Code.CHUNK_HASH
    for i in (2, 0, 1):
        transfer.write_chunk(i, data[i * 100 : (i + 1) * 100])
    assert transfer.finish().read_bytes() == data
    transfer.close()


def test_prefix_hints_must_end_with_the_files_signed_sha256() -> None:
    data = os.urandom(300)
    good = _hinted(data, 100).to_obj()
    assert FileTransfer.from_obj(good).prefix_sha256 == tuple(good["prefix_sha256"])
    wrong_end = {**good, "prefix_sha256": [*good["prefix_sha256"][:-1], "ab" * 32]}
    short = {**good, "prefix_sha256": good["prefix_sha256"][:-1]}
    for bad, needle in ((wrong_end, "last 'prefix_sha256'"), (short, "one sha256 per chunk")):
        with pytest.raises(ProtocolError) as err:
            FileTransfer.from_obj(bad)
        assert err.value.code == Code.BAD_FIELD and needle in err.value.reason
