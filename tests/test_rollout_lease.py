"""A rollout's lease in the store (one driver among several workers) and ingest workers' session leases."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.sdk.fleet.ingest_sessions import SessionLeases, parse_partition, partition_of
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.fleet.rollout import RolloutEngine
from edgefleet.sdk.store import Store
from tests.pg_support import fresh_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
        yield s
        s.close()
        return
    with fresh_database() as url:
        s = Store(url)
        yield s
        s.close()


def _rollout(store: Store, rid: str = "r1", owner: str | None = "a", lease_s: float = 30.0) -> None:
    store.create_rollout(
        rid, fleet="f", selector="all", strategy="all", settings={}, targets=[], owner=owner, lease_s=lease_s
    )


def test_a_live_lease_keeps_other_workers_out(store: Store) -> None:
    # prepare
    _rollout(store, owner="a")
    # act
    taken = store.claim_rollout("r1", "b", 10.0)
    renewed = store.renew_rollout_lease("r1", "a", 10.0)
    # assert
    assert not taken
    assert renewed
    assert store.orphaned_rollouts("f") == []
    assert store.rollout("r1")["owner"] == "a"


def test_an_expired_lease_is_taken_over_and_the_old_owner_cannot_renew(store: Store) -> None:
    # prepare: a's lease ran out
    _rollout(store, owner="a", lease_s=0.2)
    time.sleep(0.3)
    assert [r["id"] for r in store.orphaned_rollouts("f")] == ["r1"]
    # act
    taken = store.claim_rollout("r1", "b", 10.0)
    # assert
    assert taken
    assert not store.renew_rollout_lease("r1", "a", 10.0)
    row = store.rollout("r1")
    assert row is not None and row["owner"] == "b" and row["lease_expires"] > time.time() + 5
    assert store.orphaned_rollouts("f") == []


def test_an_ended_rollout_is_never_claimed(store: Store) -> None:
    _rollout(store, owner=None)
    store.set_rollout_status("r1", "succeeded")
    assert not store.claim_rollout("r1", "b", 10.0)
    assert store.orphaned_rollouts("f") == []


def test_released_lease_is_free_at_once(store: Store) -> None:
    _rollout(store, owner="a")
    store.release_rollout("r1", "a")
    assert store.claim_rollout("r1", "b", 10.0)


def test_of_many_workers_racing_for_an_expired_lease_exactly_one_wins(store: Store) -> None:
    # prepare
    _rollout(store, owner="dead", lease_s=0.1)
    time.sleep(0.2)
    start = threading.Barrier(8)
    wins: list[str] = []

    def race(name: str) -> None:
        start.wait(10)
        if store.claim_rollout("r1", name, 10.0):
            wins.append(name)

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(8)]
    # act
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # assert
    assert len(wins) == 1
    assert store.rollout("r1")["owner"] == wins[0]


def test_an_engine_that_lost_its_lease_stops_driving(store: Store) -> None:
    # prepare: engine of worker a; its lease expires while it stalls and b takes the rollout over
    _rollout(store, owner="a", lease_s=0.2)
    engine = RolloutEngine(store, MqttOptions("mqtt://127.0.0.1:1"), "r1", owner="a", lease_s=0.2)
    assert engine._hold_lease()  # renewed less than a second ago: no store round trip
    time.sleep(0.3)
    assert store.claim_rollout("r1", "b", 10.0)
    # act
    holds = engine._hold_lease()
    # assert
    assert not holds
    assert engine.lost_lease
    assert store.rollout("r1")["owner"] == "b"


class _FakeSession:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_dead_peers_ingest_session_is_adopted_and_given_back(store: Store) -> None:
    # prepare: workers a and b of one group; a stops renewing
    opened: dict[str, _FakeSession] = {}

    def open_session(name: str) -> Any:
        opened[name] = _FakeSession()
        return opened[name]

    prefix = "ingest/f/ingest/"
    a = SessionLeases(store, prefix, prefix + "a", "a", open_session, lease_s=0.3)
    b = SessionLeases(store, prefix, prefix + "b", "b", open_session, lease_s=30.0)
    assert a.take_own() == 0.0 and b.take_own() == 0.0
    b.tick()
    assert opened == {}  # a's lease still runs
    time.sleep(0.4)
    # act: b notices
    b.tick()
    # assert: b serves a's session; a coming back takes it and b lets go
    assert list(opened) == [prefix + "a"] and b.adoptions == 1
    assert a.take_own() > 0  # b still held it: a waits before connecting
    b.tick()
    assert opened[prefix + "a"].closed and b.adopted == {}
    owners = {r["name"]: r["owner"] for r in store.leases(prefix)}
    assert owners == {prefix + "a": "a", prefix + "b": "b"}


def test_partitions_are_stable_and_cover_every_device() -> None:
    ids = [f"cam-{i}" for i in range(200)]
    parts = [partition_of(d, 3) for d in ids]
    assert parts == [partition_of(d, 3) for d in ids]
    assert set(parts) == {0, 1, 2}
    assert parse_partition("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="partition"):
            parse_partition(bad)


def test_a_schema_2_store_gets_leases_and_unique_events(tmp_path: Path) -> None:
    # prepare: a schema-2 store (no owner columns, no unique events) with a redelivered event
    import sqlite3

    path = tmp_path / "fleet.db"
    Store(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX ux_events_message")
    db.execute("ALTER TABLE rollouts DROP COLUMN owner")
    db.execute("ALTER TABLE rollouts DROP COLUMN lease_expires")
    db.execute("UPDATE edgefleet_meta SET value = '2' WHERE key = 'schema'")
    for _ in range(2):
        db.execute(
            "INSERT INTO events (fleet, device_id, ts, seq, kind, payload) VALUES ('f', 'd1', 5.0, 7, 'deployed', '{}')"
        )
    db.commit()
    db.close()
    # act
    store = Store(f"sqlite:///{path}")
    # assert: one copy left, a further redelivery is dropped, rollouts take an owner
    store.add_event("f", "d1", "deployed", {}, seq=7, ts=5.0)
    assert len(store.events("f")) == 1
    _rollout(store, owner="a")
    assert store.rollout("r1")["owner"] == "a"
    store.close()


def test_resume_waits_out_a_dead_owners_lease_but_not_a_live_one(store: Store) -> None:
    # prepare: r1's owner died (no heartbeat) with 1 s of lease left; r2's owner beats
    from edgefleet.sdk.fleet.client import Fleet

    _rollout(store, "r1", owner="dead", lease_s=1.0)
    _rollout(store, "r2", owner="alive", lease_s=30.0)
    store.update_rollout_settings("r2", {"heartbeat": time.time()})
    fleet = Fleet(broker="mqtt://127.0.0.1:1", store=store, fleet="f", worker="b", lease_s=3.0)
    # act
    took_dead = fleet._claim_when_free("r1")
    took_live = fleet._claim_when_free("r2")
    # assert
    assert took_dead and store.rollout("r1")["owner"] == "b"
    assert not took_live and store.rollout("r2")["owner"] == "alive"
