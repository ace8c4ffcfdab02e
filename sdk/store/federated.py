"""Federated tasks and their rounds in the fleet's store (for the dashboard, REST and Prometheus).

Two tables of their own, created on first use on the store's engine, so the store's schema and its
migrations stay untouched: `fed_tasks` (one row per `edgefleet federate` run) and `fed_rounds` (one row per
round: participants, dropouts, refusals, bytes, accuracy and ε spent so far).
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, select, update

fed_metadata = MetaData()

fed_tasks = Table(
    "fed_tasks",
    fed_metadata,
    Column("task_id", String(128), primary_key=True),
    Column("fleet", String(128), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("rounds", Integer, nullable=False),
    Column("started", Float, nullable=False),
    Column("ended", Float),
    Column("epsilon", Float),
    Column("delta", Float),
    Column("result_version", Integer),
    Column("settings", Text),
    Column("error", Text),
)

fed_rounds = Table(
    "fed_rounds",
    fed_metadata,
    Column("task_id", String(128), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("participants", Integer, nullable=False),
    Column("selected", Integer, nullable=False),
    Column("dropouts", Integer, nullable=False),
    Column("refused", Integer, nullable=False),
    Column("bytes_up", Integer, nullable=False),
    Column("bytes_down", Integer, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("accuracy", Float),
    Column("epsilon", Float),
    Column("detail", Text),
)

_READY: set[int] = set()


def _ensure(store: Any) -> None:
    key = id(store.engine)
    if key not in _READY:
        fed_metadata.create_all(store.engine, checkfirst=True)
        _READY.add(key)


def start_task(
    store: Any, task_id: str, fleet: str, model: str, version: int, rounds: int, settings: dict[str, Any]
) -> None:
    """Record a task that starts now."""
    _ensure(store)
    with store._tx(write=True) as conn:
        conn.execute(
            fed_tasks.insert().values(
                task_id=task_id,
                fleet=fleet,
                model=model,
                version=version,
                status="running",
                rounds=rounds,
                started=time.time(),
                settings=json.dumps(settings, default=str),
            )
        )


def record_round(store: Any, task_id: str, report: dict[str, Any]) -> None:
    """Record one round's report (RoundReport.to_dict())."""
    _ensure(store)
    with store._tx(write=True) as conn:
        conn.execute(
            fed_rounds.insert().values(
                task_id=task_id,
                round=int(report["round"]),
                participants=len(report["participants"]),
                selected=len(report["selected"]),
                dropouts=len(report["dropouts"]),
                refused=len(report["refused"]),
                bytes_up=int(report["bytes_up"]),
                bytes_down=int(report["bytes_down"]),
                seconds=float(report["seconds"]),
                accuracy=report.get("accuracy"),
                epsilon=report.get("epsilon"),
                detail=json.dumps(report, default=str),
            )
        )


def end_task(
    store: Any,
    task_id: str,
    status: str,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    result_version: int | None = None,
    error: str | None = None,
) -> None:
    """Record how a task ended (succeeded with a bundle, or failed with an error)."""
    _ensure(store)
    with store._tx(write=True) as conn:
        conn.execute(
            update(fed_tasks)
            .where(fed_tasks.c.task_id == task_id)
            .values(
                status=status,
                ended=time.time(),
                epsilon=epsilon,
                delta=delta,
                result_version=result_version,
                error=error,
            )
        )


def tasks(store: Any, fleet: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent tasks, newest first."""
    _ensure(store)
    query = select(fed_tasks).order_by(fed_tasks.c.started.desc()).limit(limit)
    if fleet is not None:
        query = query.where(fed_tasks.c.fleet == fleet)
    with store._tx() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["settings"] = json.loads(row["settings"]) if row.get("settings") else {}
    return rows


def rounds(store: Any, task_id: str) -> list[dict[str, Any]]:
    """Every round of a task, in order."""
    _ensure(store)
    query = select(fed_rounds).where(fed_rounds.c.task_id == task_id).order_by(fed_rounds.c.round)
    with store._tx() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
    return rows


__all__ = ["end_task", "fed_rounds", "fed_tasks", "record_round", "rounds", "start_task", "tasks"]
