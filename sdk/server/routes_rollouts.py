"""Rollouts: list and progress from the store; start and abort through the attached fleet."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field, field_validator

from edgefleet.sdk.server import queries
from edgefleet.sdk.server.context import ServerContext, get_ctx
from edgefleet.sdk.server.errors import Conflict, NotFound, Unavailable, Unprocessable

router = APIRouter(prefix="/api", tags=["rollouts"])

DEFAULT_ABORT_REASON = "aborted from the API"
NO_ACTIONS = (
    "this server shows the store read-only: start `edgefleet serve --broker mqtt://HOST:PORT` to deploy "
    "and abort from the API"
)


class RolloutRequest(BaseModel):
    """Start a rollout of stored bundles to the devices a selector names."""

    bundles: list[Annotated[int, Field(ge=0, le=queries.MAX_BUNDLE_ID)]] = Field(
        ..., min_length=1, description="Ids of uploaded bundles (GET /api/bundles); one per target profile."
    )
    to: str = Field(
        ..., min_length=1, max_length=256, description="Selector: a device id, tag:NAME, profile:NAME or all."
    )
    strategy: str = Field("all", description="all, canary:PCT or waves:P1,P2,...")
    soak_s: Optional[float] = Field(None, ge=0, description="Seconds to watch each wave before the next.")
    timeout_s: Optional[float] = Field(
        None, gt=0, description="Seconds a device may take before it counts as timed out."
    )
    min_accuracy: Optional[float] = Field(
        None,
        ge=0,
        le=1,
        description="Abort below this eval-set or live accuracy (default: the bundle's floor).",
    )
    min_agreement: Optional[float] = Field(
        None, ge=0, le=1, description="Abort below this agreement with the reference model's top-1."
    )
    min_fidelity: Optional[float] = Field(
        None, ge=0, le=1, description="Abort below this fidelity (mean cosine to the reference outputs)."
    )

    def gates(self) -> dict[str, float]:
        """The quality floors the request sets, by gate name."""
        given = {"min_accuracy": self.min_accuracy, "min_agreement": self.min_agreement}
        given["min_fidelity"] = self.min_fidelity
        return {k: v for k, v in given.items() if v is not None}

    @field_validator("strategy")
    @classmethod
    def _strategy_parses(cls, value: str) -> str:
        # The control plane's own parser, so the API accepts exactly what `edgefleet deploy` accepts.
        from edgefleet.sdk.fleet.errors import StrategyError
        from edgefleet.sdk.fleet.strategy import parse_strategy

        try:
            parse_strategy(value)
        except StrategyError as exc:
            raise ValueError(str(exc)) from None
        return value


class AbortRequest(BaseModel):
    """Why a rollout is aborted (kept with the rollout)."""

    reason: str = Field(DEFAULT_ABORT_REASON, min_length=1, max_length=1000)

    @field_validator("reason")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # PostgreSQL cannot store NUL in text; refuse it here rather than fail in the store.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


@router.get("/rollouts", summary="Rollouts, newest first, with progress")
def list_rollouts(
    status: Optional[list[str]] = Query(None, description="Only rollouts in these statuses (repeatable)."),
    limit: int = Query(50, ge=1, le=1000),
    ctx: ServerContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    """Rollouts of the fleet with their devices and progress."""
    return queries.rollouts_with_devices(ctx.store, ctx.fleet, status=status, limit=limit)


def _require_rollout(ctx: ServerContext, rollout_id: str, devices: bool = True) -> dict[str, Any]:
    row = ctx.store.rollout(rollout_id, devices=devices)
    if row is None or row.get("fleet") != ctx.fleet:
        recent = [r["id"] for r in ctx.store.rollouts(ctx.fleet)[:10]]
        raise NotFound(
            f"no rollout {rollout_id!r} in fleet {ctx.fleet!r}; recent rollouts: {recent or 'none yet'} "
            "(GET /api/rollouts lists them)"
        )
    return row


@router.get("/rollouts/{rollout_id}", summary="One rollout: status, reason, per-device progress")
def get_rollout(
    rollout_id: str,
    ctx: ServerContext = Depends(get_ctx),
    devices: bool = Query(
        True, description="false: leave out the per-device rows (progress counts stay), for frequent polls"
    ),
) -> dict[str, Any]:
    """One rollout with its devices and progress (`?devices=false`: without the device rows)."""
    row = _require_rollout(ctx, rollout_id, devices)
    if devices:
        return queries.rollout_view(row)
    return queries.rollout_view(row, counts=ctx.store.rollout_status_counts(rollout_id))


@router.post("/rollouts", status_code=202, summary="Start a rollout (needs the server attached to a broker)")
def start_rollout(body: RolloutRequest, ctx: ServerContext = Depends(get_ctx)) -> dict[str, Any]:
    """Validate the bundles and start the rollout in the background; returns its id at once."""
    if ctx.actions is None:
        raise Unavailable(NO_ACTIONS)
    paths = []
    for bundle_id in body.bundles:
        row = ctx.store.bundle(bundle_id)
        if row is None:
            raise Unprocessable(
                f"no bundle with id {bundle_id}; upload it first (POST /api/bundles) or pick one from "
                "GET /api/bundles"
            )
        paths.append(str(row["path"]))
    options: dict[str, Any] = {"soak_s": body.soak_s, "timeout_s": body.timeout_s}
    if body.gates():
        options["gates"] = body.gates()  # only when set: older FleetActions take no gates
    rollout_id = ctx.actions.start_rollout(paths, body.to, body.strategy, **options)
    row = ctx.store.rollout(rollout_id)
    return queries.rollout_view(row) if row else {"id": rollout_id}


@router.post("/rollouts/{rollout_id}/abort", summary="Abort a rollout: roll back the devices it reached")
def abort_rollout(
    rollout_id: str, body: Optional[AbortRequest] = None, ctx: ServerContext = Depends(get_ctx)
) -> dict[str, Any]:
    """Abort a rollout that has not ended; 409 when it already has."""
    row = _require_rollout(ctx, rollout_id, devices=False)
    if ctx.actions is None:
        raise Unavailable(NO_ACTIONS)
    if str(row["status"]) in queries.FINISHED_ROLLOUT_STATUSES:
        raise Conflict(f"rollout {rollout_id!r} already ended ({row['status']}); there is nothing to abort")
    ctx.actions.abort_rollout(rollout_id, body.reason if body else DEFAULT_ABORT_REASON)
    return queries.rollout_view(_require_rollout(ctx, rollout_id))
