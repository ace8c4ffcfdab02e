"""Issue 15 points 1 and 5, in process: chunk bounds, request bounds of the local API, stale temp files.

The same inputs as tests/test_hardening_memory.py (which fires them at a real agent under the 512 MB
profile's memory), here without a broker, so each bound has a quick test of its own.
"""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.commands import MAX_CHUNKS_PER_FILE, MIN_CHUNK_BYTES, parse_command
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.local_api import Limits, LocalApi
from edgefleet.agent.server import ModelServer
from edgefleet.agent.startup import prepare_state_dir
from tests.agent_core_support import IN_FEATURES, tiny_onnx


def _deploy(size: int, chunk_size: int, chunks: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "type": "deploy",
            "id": "d-1",
            "manifest": "e30=",
            "signatures": {"signatures": []},
            "files": [
                {
                    "file": "model.onnx",
                    "sha256": "a" * 64,
                    "size": size,
                    "chunk_size": chunk_size,
                    "chunks": chunks,
                }
            ],
        }
    ).encode()


@pytest.mark.parametrize(
    ("size", "chunk_size", "chunks"),
    [
        (1 << 20, 1, 1 << 20),
        (1 << 20, MIN_CHUNK_BYTES - 1, -(-(1 << 20) // (MIN_CHUNK_BYTES - 1))),
        (MIN_CHUNK_BYTES + 1, 1, MIN_CHUNK_BYTES + 1),
    ],
)
def test_a_chunk_size_under_the_minimum_is_refused(size: int, chunk_size: int, chunks: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command(_deploy(size, chunk_size, chunks))
    assert info.value.code == "bad-field" and "minimum" in info.value.reason


def test_more_chunks_than_the_limit_are_refused() -> None:
    size = (MAX_CHUNKS_PER_FILE + 1) * MIN_CHUNK_BYTES
    with pytest.raises(ProtocolError) as info:
        parse_command(_deploy(size, MIN_CHUNK_BYTES, MAX_CHUNKS_PER_FILE + 1))
    assert info.value.code == "bad-field" and "limit" in info.value.reason


def test_small_files_and_sane_chunking_still_parse() -> None:
    assert parse_command(_deploy(10, 10, 1)).files[0].chunks == 1  # type: ignore[attr-defined]
    # a file no larger than the minimum may be cut any way (at most MIN_CHUNK_BYTES chunks)
    assert parse_command(_deploy(MIN_CHUNK_BYTES, 1, MIN_CHUNK_BYTES)).files[0].chunks == MIN_CHUNK_BYTES  # type: ignore[attr-defined]
    assert parse_command(_deploy(1 << 20, 4096, 256)).files[0].chunk_size == 4096  # type: ignore[attr-defined]


def test_start_up_removes_the_temp_files_a_kill_left(tmp_path: Path) -> None:
    # prepare: what a kill inside atomic_write_bytes leaves, next to files that must stay
    left = [".deploy.json.k3j_x9a2.tmp", ".install.json.abcd1234.tmp"]
    kept = ["deploy.json", "notes.tmp", ".hidden"]
    for name in left + kept:
        (tmp_path / name).write_text("{}")
    # act
    removed = prepare_state_dir(tmp_path)
    # assert
    assert removed == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[int, ModelServer]]:
    server = ModelServer(threads=1)
    server.activate(server.load(tiny_onnx(tmp_path / "m.onnx"), name="t", version=1, slot="a"))
    limits = Limits(
        max_input_bytes=1 << 20,
        max_rows=4096,
        slice_bytes=4096,
        max_slice_rows=64,
        read_timeout_s=1.0,
        max_connections=4,
    )
    local = LocalApi(server, limits=limits)
    local.start()
    yield local.port, server
    local.stop()


def _post(port: int, body: bytes, content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/infer", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_from_its_declared_size(api: tuple[int, ModelServer]) -> None:
    # prepare: 64 MiB of zeros in a ~64 KiB archive
    port, _ = api
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", _npy(np.zeros(((64 << 20) // (IN_FEATURES * 4), IN_FEATURES), np.float32)))
    # act
    status, answer = _post(port, out.getvalue(), "application/x-npz")
    # assert
    assert status == 413, answer
    assert "unpacks to" in answer["error"]["reason"]


def test_a_npy_header_that_promises_more_than_the_body_holds_is_refused(api: tuple[int, ModelServer]) -> None:
    port, _ = api
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1000, IN_FEATURES)}
    )
    status, answer = _post(port, header.getvalue() + bytes(64), "application/x-npy")
    assert status == 400 and "truncated" in answer["error"]["reason"], answer


def test_too_many_rows_are_refused(api: tuple[int, ModelServer]) -> None:
    port, _ = api
    status, answer = _post(port, _npy(np.zeros((4097, IN_FEATURES), np.int8)), "application/x-npy")
    assert status == 413 and "rows" in answer["error"]["reason"], answer


def test_deep_json_is_a_bad_input_not_a_crash(api: tuple[int, ModelServer]) -> None:
    port, _ = api
    deep = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = _post(port, deep, "application/json")
    assert status == 400 and answer["error"]["code"] == "bad-input", answer
    status, _ = _post(port, deep, "text/plain")
    assert status in (400, 415)


def test_a_large_batch_runs_in_slices_with_the_same_answer(api: tuple[int, ModelServer]) -> None:
    # prepare: 1000 rows; the limits run 64 rows at a time
    port, server = api
    x = np.random.default_rng(3).standard_normal((1000, IN_FEATURES)).astype(np.float32)
    before = server.window_stats(reset=False)["total_count"]
    # act
    status, answer = _post(port, _npy(x), "application/x-npy")
    # assert: one answer, equal to the whole batch run at once, made of 16 runs
    assert status == 200, answer
    whole = server.infer(x).outputs["logits"]
    assert np.allclose(np.asarray(answer["outputs"]["logits"], np.float32), whole, atol=1e-6)
    assert server.window_stats(reset=False)["total_count"] - before == 16 + 1


def test_idle_connections_are_closed_and_capped(api: tuple[int, ModelServer]) -> None:
    # prepare / act: more idle connections than the cap
    port, _ = api
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    started = time.monotonic()
    answers = []
    try:
        for sock in sockets:
            data = b""
            while True:
                block = sock.recv(4096)
                if not block:
                    break
                data += block
            answers.append(data)
    finally:
        for sock in sockets:
            sock.close()
    # assert: 2 over the cap were refused at once, the rest closed by the 1 s read timeout; still serving
    assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) == 2, answers
    assert time.monotonic() - started < 5
    status, _ = _post(port, _npy(np.zeros((2, IN_FEATURES), np.float32)), "application/x-npy")
    assert status == 200
