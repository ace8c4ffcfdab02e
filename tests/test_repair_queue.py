"""The host's repair queue: requests gathered, shared chunks re-broadcast once, nothing re-sent while in flight."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.topics import Topics
from edgefleet.sdk.fleet.transfer import REPAIR_HOLDOFF_S, REPAIR_WINDOW_S, Blob, RepairQueue, TransferStats

FLEET = "f1"
CHUNK = 1024


class Recorder:
    """A connection that keeps what was published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, **_: Any) -> None:
        self.published.append((topic, payload))

    def topics(self) -> list[str]:
        return [t for t, _ in self.published]


@pytest.fixture
def blob(tmp_path: Path) -> Blob:
    data = bytes(range(256)) * 40  # 10 chunks of 1 KiB
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return Blob(path, hashlib.sha256(data).hexdigest(), CHUNK)


def _flush(
    queue: RepairQueue, blob: Blob, conn: Recorder, stats: TransferStats, now: float, receivers: int
) -> int:
    return queue.flush(conn, FLEET, {blob.sha256: blob}, stats, lambda sha: receivers, now)


def test_a_chunk_many_devices_miss_is_broadcast_once_and_the_rest_go_to_each_device(blob: Blob) -> None:
    # prepare: three devices miss chunk 2, one of them also chunks 5-6
    queue, conn, stats = RepairQueue(), Recorder(), TransferStats()
    queue.add("a", blob, [(2, 2), (5, 6)], now=100.0)
    queue.add("b", blob, [(2, 2)], now=100.1)
    queue.add("c", blob, [(1, 2)], now=100.2)
    # act
    early = queue.due(100.0 + REPAIR_WINDOW_S / 2)
    due = queue.due(100.0 + REPAIR_WINDOW_S)
    sent = _flush(queue, blob, conn, stats, 100.0 + REPAIR_WINDOW_S, receivers=5)
    # assert: chunk 2 once on the broadcast topic, the others to their one device each
    assert (early, due) == (False, True)
    assert sorted(conn.topics()) == sorted(
        [
            Topics.broadcast(FLEET, blob.sha256, 2),
            Topics(FLEET, "c").repair(blob.sha256, 1),
            Topics(FLEET, "a").repair(blob.sha256, 5),
            Topics(FLEET, "a").repair(blob.sha256, 6),
        ]
    )
    assert dict(conn.published)[Topics.broadcast(FLEET, blob.sha256, 2)] == blob.chunk(2)
    assert sent == 4 and stats.repair_chunks == 4 and stats.repair_broadcasts == 1
    assert stats.repair_bytes == 4 * CHUNK
    assert not queue.due(200.0)  # everything was served


def test_a_chunk_still_in_flight_is_not_sent_again_until_the_holdoff_ends(blob: Blob) -> None:
    # prepare: chunk 3 sent to device a; the whole blob broadcast just now
    queue, conn, stats = RepairQueue(), Recorder(), TransferStats()
    queue.add("a", blob, [(3, 3)], now=0.0)
    _flush(queue, blob, conn, stats, 1.0, receivers=2)
    queue.note_broadcast(blob, 1.0)
    # act: a asks for chunk 3 again, b for chunk 4 (both in flight), then both again after the hold-off
    queue.add("a", blob, [(3, 3)], now=2.0)
    queue.add("b", blob, [(4, 4)], now=2.0)
    _flush(queue, blob, conn, stats, 3.0, receivers=2)
    soon = list(conn.topics())
    later = 1.0 + REPAIR_HOLDOFF_S
    queue.add("a", blob, [(3, 3)], now=later)
    queue.add("b", blob, [(4, 4)], now=later)
    _flush(queue, blob, conn, stats, later + 1.0, receivers=2)
    # assert
    assert soon == [Topics(FLEET, "a").repair(blob.sha256, 3)]
    assert conn.topics()[1:] == [
        Topics(FLEET, "a").repair(blob.sha256, 3),
        Topics(FLEET, "b").repair(blob.sha256, 4),
    ]


def test_the_broadcast_threshold_grows_with_the_receivers(blob: Blob) -> None:
    # prepare: 100 devices download the blob; 5 miss chunk 0, 10 miss chunk 1
    queue, conn, stats = RepairQueue(), Recorder(), TransferStats()
    for i in range(5):
        queue.add(f"d{i}", blob, [(0, 0)], now=0.0)
    for i in range(10):
        queue.add(f"e{i}", blob, [(1, 1), (99, 120)], now=0.0)  # chunks past the end are ignored
    # act
    _flush(queue, blob, conn, stats, 1.0, receivers=100)
    # assert: 5 < 10 % of 100 go one by one; 10 share one broadcast
    assert sorted(conn.topics()) == sorted(
        [Topics(FLEET, f"d{i}").repair(blob.sha256, 0) for i in range(5)]
        + [Topics.broadcast(FLEET, blob.sha256, 1)]
    )
    assert stats.repair_chunks == 6 and stats.repair_broadcasts == 1
