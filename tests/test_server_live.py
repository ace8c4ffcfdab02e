"""Live updates over SSE from a real uvicorn server: a store change reaches a connected client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from server_data import fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.server.feed import ChangeFeed
from edgefleet.sdk.server.runner import ServerThread
from edgefleet.sdk.store import Store

TOKEN = "live-test-token-0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path, fleet_name: str) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fill_store(s, fleet_name)
    yield s
    s.close()


@pytest.fixture
def server(store: Store, fleet_name: str) -> Iterator[ServerThread]:
    app = create_app(store, token=TOKEN, fleet_name=fleet_name, poll_s=0.1)
    with ServerThread(app, port=free_port(), token=TOKEN) as srv:
        yield srv


def read_events(lines: Iterator[str], want: set[str], timeout: float) -> list[tuple[str, dict[str, Any]]]:
    """Read SSE lines until every kind in `want` arrived; fail after `timeout` seconds."""
    got: list[tuple[str, dict[str, Any]]] = []
    kind = None
    deadline = time.monotonic() + timeout
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind:
            got.append((kind, json.loads(line[len("data: ") :])))
            if want <= {k for k, _ in got}:
                return got
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"wanted {want}, got {[k for k, _ in got]}")


def test_store_changes_reach_the_stream(server: ServerThread, store: Store, fleet_name: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        with http.stream("GET", "/api/events", params={"access_token": TOKEN}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.iter_lines()
            hello = read_events(lines, {"hello"}, timeout=10)
            assert hello[0][1]["fleet"] == fleet_name
            assert hello[0][1]["actions"] is False
            # let the feed take its first marks before changing anything
            time.sleep(0.5)
            # act: telemetry from a device, then a rollout moving on
            store.add_telemetry(
                fleet_name,
                [
                    {
                        "device_id": "rpi4b-01",
                        "ts": time.time(),
                        "seq": 500,
                        "model_name": "digits",
                        "model_version": 2,
                        "count": 10,
                        "p95_ms": 3.3,
                    }
                ],
            )
            store.set_rollout_device(f"{fleet_name}-r2", "rpi5-01", "deployed")
            store.upsert_device(fleet_name, "orin-01", online=True)
            # assert
            events = read_events(lines, {"telemetry", "rollouts", "devices"}, timeout=15)
            assert all("ts" in data for _, data in events)


def test_stream_refuses_without_token(server: ServerThread) -> None:
    r = httpx.get(f"{server.url}/api/events", timeout=10.0)
    assert r.status_code == 401


def test_feed_reports_only_what_changed() -> None:
    marks = {"devices": [1], "telemetry": [1, 1], "events": 1, "rollouts": [0, 0, 0, 0]}
    feed = ChangeFeed(lambda: marks)
    assert feed.publish_diff(dict(marks)) == []  # first look: nothing to compare with
    assert feed.publish_diff({**marks, "telemetry": [2, 2]}) == ["telemetry"]
    assert feed.publish_diff({**marks, "telemetry": [2, 2], "events": 2, "devices": [2]}) == [
        "devices",
        "events",
    ]
    with pytest.raises(ValueError, match="poll_s"):
        ChangeFeed(lambda: marks, poll_s=0)


async def _connected() -> bool:
    return False


def test_feed_reads_the_store_only_while_someone_listens() -> None:
    import asyncio

    state = {"reads": 0, "telemetry": 1}

    def marks() -> dict[str, Any]:
        state["reads"] += 1
        return {"telemetry": state["telemetry"]}

    async def run() -> tuple[int, int, str]:
        feed = ChangeFeed(marks, poll_s=0.01)
        await feed.start()
        await asyncio.sleep(0.3)  # ~30 poll periods with nobody listening
        idle_reads = state["reads"]
        state["telemetry"] = 2  # a change while nobody listened
        stream = feed.stream({}, _connected)
        await stream.__anext__()  # hello
        notice = await asyncio.wait_for(stream.__anext__(), timeout=10)
        await feed.stop()
        await stream.aclose()
        return idle_reads, state["reads"], notice

    idle_reads, reads, notice = asyncio.run(run())
    assert idle_reads == 1  # the first poll only: the baseline
    assert reads > idle_reads
    assert notice.startswith("event: telemetry")  # the change made while idle still reaches the client


def test_feed_survives_a_store_outage() -> None:
    import asyncio

    calls = {"n": 0}

    def marks() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("database is locked")
        return {"telemetry": calls["n"]}

    async def run() -> ChangeFeed:
        feed = ChangeFeed(marks, poll_s=0.01)
        stream = feed.stream({}, _connected)
        await stream.__anext__()  # a subscriber: the feed polls only while someone listens
        await feed.start()
        deadline = time.monotonic() + 10
        while feed.polls < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await feed.stop()
        await stream.aclose()
        return feed

    feed = asyncio.run(run())
    assert feed.failures == 2
    assert feed.polls >= 3
