"""Staging transfers: chunks in any order, duplicates dropped, bad chunks refused, resume from the bitmap."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.core.errors import TransferError
from edgefleet.agent.core.protocol import Code, FileTransfer
from edgefleet.agent.transfer import StagingArea, Transfer


def _spec(data: bytes, chunk: int, hashes: bool = False) -> FileTransfer:
    chunks = -(-len(data) // chunk)
    digests = (
        tuple(hashlib.sha256(data[i * chunk : (i + 1) * chunk]).hexdigest() for i in range(chunks))
        if hashes
        else ()
    )
    return FileTransfer("model.onnx", hashlib.sha256(data).hexdigest(), len(data), chunk, chunks, digests)


def _chunks(data: bytes, chunk: int) -> list[bytes]:
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


@settings(max_examples=25, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    chunk=st.integers(1, 700),
    seed=st.randoms(use_true_random=False),
)
def test_any_order_with_duplicates_reassembles_the_file(tmp_path_factory, data, chunk, seed) -> None:  # type: ignore[no-untyped-def]
    # prepare
    folder = tmp_path_factory.mktemp("t")
    spec = _spec(data, chunk)
    transfer = Transfer(folder, spec, flush_every=3)
    order = list(range(spec.chunks)) * 2
    seed.shuffle(order)
    pieces = _chunks(data, chunk)
    # act
    fresh = [transfer.write_chunk(i, pieces[i]) for i in order]
    # assert
    assert sum(fresh) == spec.chunks and transfer.duplicates == spec.chunks
    assert transfer.complete and transfer.missing_ranges() == []
    assert transfer.finish().read_bytes() == data
    assert os.path.getsize(transfer.part_path) == len(data)
    transfer.close()


def test_missing_ranges_are_compact(tmp_path: Path) -> None:
    data = os.urandom(1000)
    transfer = Transfer(tmp_path, _spec(data, 100))
    for i in (0, 1, 4, 9):
        transfer.write_chunk(i, data[i * 100 : (i + 1) * 100])
    assert transfer.missing_ranges() == [[2, 3], [5, 8]]
    assert transfer.missing_ranges(limit=1) == [[2, 3]]
    transfer.close()


def test_bad_chunks_are_refused_with_codes(tmp_path: Path) -> None:
    data = os.urandom(250)
    transfer = Transfer(tmp_path, _spec(data, 100, hashes=True))
    cases = [
        (3, b"x" * 100, Code.CHUNK_INDEX),
        (-1, b"x" * 100, Code.CHUNK_INDEX),
        (0, b"x" * 101, Code.CHUNK_OVERSIZE),
        (2, b"x" * 51, Code.CHUNK_OVERSIZE),
        (0, b"x" * 99, Code.CHUNK_SIZE),
        (0, b"y" * 100, Code.CHUNK_HASH),
    ]
    for index, payload, code in cases:
        with pytest.raises(TransferError) as err:
            transfer.write_chunk(index, payload)
        assert err.value.code == code, (index, len(payload))
    assert transfer.received == 0
    transfer.close()


def test_chunk_size_above_the_agent_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransferError) as err:
        Transfer(tmp_path, _spec(b"a" * 100, 100), max_chunk_bytes=64)
    assert err.value.code == Code.CHUNK_OVERSIZE


def test_tampered_file_without_chunk_hashes_fails_whole_hash_and_starts_over(tmp_path: Path) -> None:
    data = os.urandom(300)
    transfer = Transfer(tmp_path, _spec(data, 100))
    transfer.write_chunk(0, data[:100])
    transfer.write_chunk(1, b"\0" * 100)  # forged
    transfer.write_chunk(2, data[200:])
    with pytest.raises(TransferError) as err:
        transfer.finish()
    assert err.value.code == Code.HASH_MISMATCH
    assert transfer.missing_ranges() == [[0, 2]]
    transfer.close()


def test_restart_resumes_from_the_persisted_bitmap(tmp_path: Path) -> None:
    # prepare: receive 5 of 10 chunks and flush, then 2 more without a flush (as if killed)
    data = os.urandom(1000)
    spec = _spec(data, 100)
    first = Transfer(tmp_path, spec, flush_every=1000, flush_s=3600)
    for i in range(5):
        first.write_chunk(i, data[i * 100 : (i + 1) * 100])
    first.flush()
    for i in (7, 8):
        first.write_chunk(i, data[i * 100 : (i + 1) * 100])
    # act: a new process opens the same transfer without closing the first (kill -9)
    second = Transfer(tmp_path, spec)
    # assert: the flushed chunks are kept; the unflushed ones are asked for again
    assert second.missing_ranges() == [[5, 9]]
    for i in range(5, 10):
        assert second.write_chunk(i, data[i * 100 : (i + 1) * 100])
    assert second.finish().read_bytes() == data
    second.close()


def test_changed_spec_discards_old_staging(tmp_path: Path) -> None:
    data = os.urandom(400)
    t1 = Transfer(tmp_path, _spec(data, 100))
    t1.write_chunk(0, data[:100])
    t1.close()
    t2 = Transfer(tmp_path, _spec(data, 200))
    assert t2.received == 0 and t2.missing_ranges() == [[0, 1]]
    t2.close()


def test_staging_area_unknown_transfer_and_prune(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "staging")
    data = os.urandom(10)
    spec = _spec(data, 4)
    with pytest.raises(TransferError) as err:
        area.get(spec.sha256)
    assert err.value.code == Code.UNKNOWN_TRANSFER
    transfer = area.open(spec)
    assert area.get(spec.sha256) is transfer and area.open(spec) is transfer
    (tmp_path / "staging" / "leftover").mkdir()
    area.prune(keep=[spec.sha256])
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == [spec.sha256]
    area.discard(spec.sha256)
    assert not (tmp_path / "staging" / spec.sha256).exists()
    area.close()
