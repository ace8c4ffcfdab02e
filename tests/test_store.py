"""The store: the same tests on SQLite and on PostgreSQL (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.sdk.store import Store, StoreError, TelemetryBatcher

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store on each backend; every test uses its own fleet name, so PostgreSQL rows never collide."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else PG_URL
    s = Store(url)
    yield s
    s.close()


@pytest.fixture
def fleet() -> str:
    return f"f{uuid.uuid4().hex[:10]}"


def _telemetry(dev: str, seq: int, ts: float, p95: float = 10.0, count: int = 10, version: int = 1) -> dict:
    return {
        "device_id": dev,
        "seq": seq,
        "ts": ts,
        "model_name": "digits",
        "model_version": version,
        "profile": "rpi4b",
        "count": count,
        "errors": 0,
        "p50_ms": p95 / 2,
        "p95_ms": p95,
        "p99_ms": p95 * 1.2,
        "mean_ms": p95 / 2,
        "eval_accuracy": 0.98,
        "live_accuracy": None,
        "cpu_percent": 12.5,
    }


def test_devices_upsert_and_read_back(store: Store, fleet: str) -> None:
    # act
    store.upsert_device(
        fleet, "pi-1", online=True, profile="rpi4b", tags=["lab"], active_model="digits", active_version=3
    )
    store.upsert_device(fleet, "pi-1", online=False)
    store.upsert_device(fleet, "pi-0", profile="rpi5")
    # assert
    rows = store.devices(fleet)
    assert [r["device_id"] for r in rows] == ["pi-0", "pi-1"]
    pi1 = store.device(fleet, "pi-1")
    assert (
        pi1 is not None and pi1["online"] is False and pi1["tags"] == ["lab"] and pi1["active_version"] == 3
    )


def test_unknown_device_field_is_refused_and_nothing_changes(store: Store, fleet: str) -> None:
    store.upsert_device(fleet, "pi-1", profile="rpi4b")
    with pytest.raises(StoreError, match="unknown device field.*colour"):
        store.upsert_device(fleet, "pi-1", colour="red")
    assert store.device(fleet, "pi-1")["profile"] == "rpi4b"  # type: ignore[index]


def test_telemetry_batches_and_gap_detection(store: Store, fleet: str) -> None:
    # prepare: seq 1..10 with 4, 5 and 8 lost on the way, plus a redelivered 3
    now = time.time()
    sent = [_telemetry("pi-1", s, now + s) for s in (1, 2, 3, 6, 7, 9, 10)]
    # act
    store.add_telemetry(fleet, sent[:3])
    store.add_telemetry(fleet, [_telemetry("pi-1", 3, now + 3), *sent[3:]])
    # assert
    gaps = store.gaps(fleet, "pi-1")
    assert [(g.first_missing, g.last_missing) for g in gaps] == [(4, 5), (8, 8)]
    assert sum(g.count for g in gaps) == 3
    assert store.telemetry_count(fleet, "pi-1") == 7  # the redelivered 3 is stored once
    assert store.device(fleet, "pi-1")["last_seq"] == 10  # type: ignore[index]


def test_one_batch_from_many_devices_tracks_each_ones_sequence(store: Store, fleet: str) -> None:
    # prepare: pi-0 is known (last seq 4), pi-1..pi-3 are new; pi-2 skips 3, pi-0 skips 5..6
    now = time.time()
    store.add_telemetry(fleet, [_telemetry("pi-0", 4, now)])
    batch = [_telemetry("pi-0", 7, now + 1)]
    batch += [
        _telemetry(f"pi-{d}", s, now + s) for d in (1, 2, 3) for s in (1, 2, 4) if not (d != 2 and s == 4)
    ]
    batch += [_telemetry("pi-3", 3, now + 3)]
    # act
    written = store.add_telemetry(fleet, batch)
    # assert: every row written, each device's last seq and its own gaps, nothing mixed up between devices
    assert written == len(batch)
    last = {d["device_id"]: d["last_seq"] for d in store.devices(fleet)}
    assert last == {"pi-0": 7, "pi-1": 2, "pi-2": 4, "pi-3": 3}
    gaps = {(g.device_id, g.first_missing, g.last_missing) for g in store.gaps(fleet)}
    assert gaps == {("pi-0", 5, 6), ("pi-2", 3, 3)}


def test_one_ingest_batch_of_telemetry_events_and_states_in_one_transaction(store: Store, fleet: str) -> None:
    # prepare: a device's messages of one batch, interleaved by kind: telemetry 1, 2, event 3,
    # state 4, telemetry 6 (5 lost), event 7; then the same batch redelivered
    now = time.time()
    tel = [_telemetry("pi-1", s, now + s) for s in (1, 2, 6)]
    evts = [
        {"device_id": "pi-1", "kind": "deploy", "payload": {"step": "verify"}, "seq": 3, "ts": now + 3},
        {"device_id": "pi-1", "kind": "deploy", "payload": {"step": "done"}, "seq": 7, "ts": now + 7},
    ]
    # act
    first = store.add_messages(fleet, tel, evts, [("pi-1", 4)])
    again = store.add_messages(fleet, tel, evts, [("pi-1", 4)])
    # assert: everything once, one gap across the kinds (5), the last sequence number is the event's
    assert first == (3, 2)
    assert again == (0, 0)
    assert [(g.first_missing, g.last_missing) for g in store.gaps(fleet, "pi-1")] == [(5, 5)]
    assert store.device(fleet, "pi-1")["last_seq"] == 7  # type: ignore[index]
    assert sorted(e["payload"]["step"] for e in store.events(fleet, "pi-1")) == ["done", "verify"]
    assert store.add_messages(fleet, [], [], []) == (0, 0)


def test_values_json_cannot_hold_are_stored_as_text(store: Store, fleet: str) -> None:
    # prepare: a numpy number and a path in the metrics, as a user's own code might send them
    row = {**_telemetry("pi-1", 1, time.time()), "temperature_c": np.float32(51.5), "model_path": Path("/m")}
    # act
    store.add_telemetry(fleet, [row])
    # assert: stored, readable, with the odd values as their text
    payload = store.latest_telemetry(fleet, "pi-1")[0]["payload"]
    assert (payload["temperature_c"], payload["model_path"]) == ("51.5", "/m")


def test_telemetry_without_device_id_is_refused(store: Store, fleet: str) -> None:
    with pytest.raises(StoreError, match="device_id"):
        store.add_telemetry(fleet, [{"seq": 1}])
    assert store.telemetry_count(fleet) == 0


def test_series_weights_percentiles_by_count_and_filters(store: Store, fleet: str) -> None:
    # prepare: two windows in one bucket (p95 10 ms × 30 inferences, 20 ms × 10) and a second version
    base = 1_000_000.0
    store.add_telemetry(
        fleet,
        [
            _telemetry("pi-1", 1, base + 1, p95=10.0, count=30),
            _telemetry("pi-2", 1, base + 2, p95=20.0, count=10),
            _telemetry("pi-1", 2, base + 70, p95=40.0, count=5, version=2),
        ],
    )
    # act
    v1 = store.series(fleet, model_name="digits", model_version=1, bucket_s=60)
    all_points = store.series(fleet, bucket_s=60)
    one_device = store.series(fleet, device_id="pi-2", bucket_s=60)
    # assert
    assert len(v1) == 1 and v1[0].count == 40
    assert v1[0].p95_ms == pytest.approx((10 * 30 + 20 * 10) / 40)
    assert [p.count for p in all_points] == [40, 5]
    assert len(one_device) == 1 and one_device[0].p95_ms == pytest.approx(20.0)
    with pytest.raises(StoreError, match="bucket_s"):
        store.series(fleet, bucket_s=0)


def test_retention_prunes_only_old_rows(store: Store, fleet: str) -> None:
    old = time.time() - 40 * 86400
    store.add_telemetry(fleet, [_telemetry("pi-1", 1, old), _telemetry("pi-1", 2, time.time())])
    store.add_event(fleet, "pi-1", "deploy", {"step": "verify"}, ts=old)
    removed = store.prune(older_than_days=30)
    assert removed >= 2
    assert store.telemetry_count(fleet, "pi-1") == 1


def test_rollouts_and_active_device_lookup(store: Store, fleet: str) -> None:
    bid = store.add_bundle(
        name="digits",
        version=2,
        profile="rpi4b",
        manifest_sha256=uuid.uuid4().hex * 2,
        path="/tmp/b",
        size_bytes=1234,
        manifest={"name": "digits"},
    )
    rid = f"r{uuid.uuid4().hex[:8]}"
    store.create_rollout(
        rid,
        fleet=fleet,
        selector="all",
        strategy="canary:25",
        settings={"soak_s": 5},
        targets=[("pi-1", bid, 0), ("pi-2", bid, 1), ("pi-3", None, 1)],
    )
    store.set_rollout_status(rid, "running")
    store.set_rollout_device(rid, "pi-1", "installed")
    ro = store.rollout(rid)
    assert ro is not None and ro["status"] == "running"
    assert {d["device_id"]: d["status"] for d in ro["devices"]} == {
        "pi-1": "installed",
        "pi-2": "pending",
        "pi-3": "no-bundle",
    }
    assert store.devices_in_active_rollouts(fleet) == {"pi-1": rid, "pi-2": rid, "pi-3": rid}
    store.set_rollout_status(rid, "aborted", "p95 over budget")
    assert store.devices_in_active_rollouts(fleet) == {}
    assert store.rollout("nosuch") is None
    # the same manifest registers once
    sha = store.bundle(bid)["manifest_sha256"]  # type: ignore[index]
    assert (
        store.add_bundle(
            name="digits",
            version=2,
            profile="rpi4b",
            manifest_sha256=sha,
            path="/x",
            size_bytes=1,
            manifest={},
        )
        == bid
    )


def test_batcher_writes_everything_it_was_given(store: Store, fleet: str) -> None:
    # prepare
    batcher = TelemetryBatcher(store, fleet, max_rows=50, max_delay_s=0.05)
    now = time.time()
    # act
    for seq in range(1, 301):
        batcher.add(_telemetry(f"pi-{seq % 3}", seq // 3 + 1, now + seq))
    batcher.flush()
    batcher.close()
    # assert
    assert batcher.written == 300
    assert store.telemetry_count(fleet) == 300


def test_bad_urls_say_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="sqlite:///PATH"):
        Store("nosuchdb://x")
    with pytest.raises(StoreError, match="database server"):
        Store("postgresql://postgres@127.0.0.1:1/test")
