"""The store methods the fleet engine added, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.sdk.store import Store, StoreError

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'f.db'}" if request.param == "sqlite" else PG_URL)
    yield s
    s.close()


def test_batched_rollout_writes_and_settings_merge(store: Store) -> None:
    fleet, rid = f"f{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex[:8]}"
    for d in ("a", "b"):
        store.upsert_device(fleet, d, online=True)
    store.create_rollout(
        rid,
        fleet=fleet,
        selector="all",
        strategy="all",
        settings={"wave": -1},
        targets=[("a", 1, 0), ("b", 1, 0)],
    )
    store.set_rollout_devices(rid, [("a", "deployed", None), ("b", "rejected", "health: too slow")])
    store.update_devices(fleet, {"a": {"desired_model": "m", "desired_version": 2}})
    merged = store.update_rollout_settings(rid, {"wave": 0, "sent_at": {"a": 1.5}})
    assert merged == {"wave": 0, "sent_at": {"a": 1.5}}
    row = store.rollout(rid)
    assert row is not None and row["settings"] == merged
    assert {d["device_id"]: (d["status"], d["reason"]) for d in row["devices"]} == {
        "a": ("deployed", None),
        "b": ("rejected", "health: too slow"),
    }
    assert (store.device(fleet, "a") or {})["desired_version"] == 2
    store.set_rollout_status(rid, "aborting", "asked")
    assert store.devices_in_active_rollouts(fleet) == {"a": rid, "b": rid}
    with pytest.raises(StoreError, match="no rollout"):
        store.update_rollout_settings("r-missing", {})
    with pytest.raises(StoreError, match="unknown device field"):
        store.update_devices(fleet, {"a": {"colour": "red"}})


def test_late_messages_fill_the_gaps_they_left(store: Store) -> None:
    fleet = f"f{uuid.uuid4().hex[:8]}"
    rows = [{"device_id": "a", "ts": 1.0 + s, "seq": s} for s in (1, 2, 6, 9)]
    store.add_telemetry(fleet, rows)
    assert [(g.first_missing, g.last_missing) for g in store.gaps(fleet)] == [(3, 5), (7, 8)]
    # Another ingest process wrote these later: the holes shrink, split or vanish.
    store.add_telemetry(
        fleet, [{"device_id": "a", "ts": 20.0, "seq": 4}, {"device_id": "a", "ts": 21.0, "seq": 7}]
    )
    store.note_sequence(fleet, "a", 8)
    assert sorted((g.first_missing, g.last_missing) for g in store.gaps(fleet)) == [(3, 3), (5, 5)]
    store.add_telemetry(
        fleet, [{"device_id": "a", "ts": 22.0, "seq": 2}]
    )  # a plain duplicate changes nothing
    assert len(store.gaps(fleet)) == 2
