"""Federated tasks over REST (`/api/federated`, `/api/federated/{task}`) and their Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from edgefleet.sdk.server import queries
from edgefleet.sdk.server.context import ServerContext, get_ctx
from edgefleet.sdk.server.errors import NotFound

router = APIRouter(prefix="/api", tags=["federated"])


@router.get("/federated", summary="Federated tasks of the fleet, newest first")
def list_tasks(ctx: ServerContext = Depends(get_ctx)) -> list[dict[str, Any]]:
    """Every recent `edgefleet federate` run: model, status, rounds, ε/δ spent, the version it produced."""
    from edgefleet.sdk.store import federated as fed_store

    out = []
    for task in fed_store.tasks(ctx.store, ctx.fleet):
        rows = fed_store.rounds(ctx.store, task["task_id"])
        last = rows[-1] if rows else {}
        out.append(
            {
                **task,
                "rounds_done": len(rows),
                "accuracy": last.get("accuracy"),
                "participants": last.get("participants"),
            }
        )
    return [queries.jsonable(t) for t in out]


@router.get("/federated/{task_id}", summary="One federated task with every round")
def get_task(
    task_id: str = PathParam(..., max_length=128, description="Task id (GET /api/federated)."),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """The task and its rounds (participants, dropouts, refusals, bytes, accuracy, ε so far); 404 when unknown."""
    from edgefleet.sdk.store import federated as fed_store

    task = next(
        (t for t in fed_store.tasks(ctx.store, ctx.fleet, limit=1000) if t["task_id"] == task_id), None
    )
    if task is None:
        raise NotFound(f"no federated task {task_id!r}; GET /api/federated lists them")
    return queries.jsonable({**task, "rounds": fed_store.rounds(ctx.store, task_id)})


def add_metrics(out: Any, store: Any, fleet: str) -> None:
    """Federated families for /metrics: rounds done, last round's accuracy, participants, dropouts, ε spent."""
    from edgefleet.sdk.store import federated as fed_store

    for task in fed_store.tasks(store, fleet, limit=10):
        labels = {"fleet": fleet, "task": task["task_id"], "model": task["model"]}
        rows = fed_store.rounds(store, task["task_id"])
        last = rows[-1] if rows else {}
        out.add("edgefleet_federated_rounds", "gauge", "Rounds a federated task has run.", labels, len(rows))
        out.add(
            "edgefleet_federated_accuracy",
            "gauge",
            "Host-side eval accuracy after the latest round.",
            labels,
            last.get("accuracy"),
        )
        out.add(
            "edgefleet_federated_participants",
            "gauge",
            "Devices whose update counted in the latest round.",
            labels,
            last.get("participants"),
        )
        out.add(
            "edgefleet_federated_dropouts",
            "gauge",
            "Devices that did not answer the latest round in time.",
            labels,
            last.get("dropouts"),
        )
        out.add(
            "edgefleet_federated_epsilon",
            "gauge",
            "Differential privacy ε spent (at the task's δ).",
            labels,
            task.get("epsilon"),
        )
        out.add(
            "edgefleet_federated_bytes_up",
            "gauge",
            "Update bytes received in the latest round.",
            labels,
            last.get("bytes_up"),
        )
