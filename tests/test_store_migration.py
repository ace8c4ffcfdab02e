"""A schema-1 store (before the quality vocabulary) opens as schema 2: columns renamed, duplicates gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefleet.sdk.store import SCHEMA_VERSION, Store, StoreError

SCHEMA_1_TELEMETRY = """
CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fleet VARCHAR(128) NOT NULL, device_id VARCHAR(128) NOT NULL,
    ts FLOAT NOT NULL, seq BIGINT, profile VARCHAR(64), model_name VARCHAR(128), model_version BIGINT,
    count INTEGER NOT NULL, errors INTEGER NOT NULL, p50_ms FLOAT, p95_ms FLOAT, p99_ms FLOAT, mean_ms FLOAT,
    eval_accuracy FLOAT, live_accuracy FLOAT, agreement FLOAT, payload JSON NOT NULL
)
"""


def _schema_1(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE edgefleet_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO edgefleet_meta VALUES ('schema', '1')")
    db.execute(SCHEMA_1_TELEMETRY)
    rows = [("f", "cam-1", 10.0, 1, 0.9), ("f", "cam-1", 10.0, 1, 0.9), ("f", "cam-1", 11.0, 2, 0.8)]
    rows += [("f", "cam-1", 12.0, None, 0.7), ("f", "cam-1", 12.0, None, 0.7)]  # no seq: never a duplicate
    db.executemany(
        "INSERT INTO telemetry (fleet, device_id, ts, seq, count, errors, eval_accuracy, payload) "
        "VALUES (?, ?, ?, ?, 0, 0, ?, '{}')",
        rows,
    )
    db.commit()
    db.close()


def test_a_schema_1_store_is_migrated_when_opened(tmp_path: Path) -> None:
    # prepare
    path = tmp_path / "fleet.db"
    _schema_1(path)
    # act
    store = Store(f"sqlite:///{path}")
    # assert: eval_accuracy is now accuracy, fidelity exists, the redelivered copy is gone
    rows = sorted(store.latest_telemetry("f", "cam-1", limit=10), key=lambda r: (r["ts"], r["id"]))
    assert [(r["seq"], r["accuracy"], r["fidelity"]) for r in rows] == [
        (1, 0.9, None),
        (2, 0.8, None),
        (None, 0.7, None),
        (None, 0.7, None),
    ]
    assert "eval_accuracy" not in rows[0]
    assert store.add_telemetry("f", [{"device_id": "cam-1", "seq": 2, "ts": 11.0}]) == 0  # now unique
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM edgefleet_meta WHERE key = 'schema'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()


def test_a_store_from_a_newer_edgefleet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    Store(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    db.execute("UPDATE edgefleet_meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99, newer than this edgefleet"):
        Store(f"sqlite:///{path}")
