"""Read-only API: the fleet's devices, their events, telemetry series and model-version comparisons."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, Query

from edgefleet.agent import __version__
from edgefleet.sdk.server import queries
from edgefleet.sdk.server.context import ServerContext, get_ctx
from edgefleet.sdk.server.errors import NotFound, Unprocessable

router = APIRouter(prefix="/api", tags=["fleet"])

GroupBy = Literal["none", "device", "version", "profile"]


@router.get("/health", summary="Server status: fleet name, whether actions are enabled, version")
def health(ctx: ServerContext = Depends(get_ctx)) -> dict[str, Any]:
    """Whether the server runs, which fleet it shows, and whether it can deploy/abort."""
    return {
        "ok": True,
        "fleet": ctx.fleet,
        "actions": ctx.actions is not None,
        "uploads": bool(ctx.trusted_keys) and ctx.bundle_dir is not None,
        "auth": ctx.token is not None,
        "version": __version__,
        "time": time.time(),
    }


def _device_view(dev: dict[str, Any], latest: Optional[dict[str, Any]], missing: int) -> dict[str, Any]:
    """A device row as the API shows it: desired vs reported, latest telemetry summary, gaps."""
    out = dict(dev)
    desired = (dev.get("desired_model"), dev.get("desired_version"))
    out["differs"] = desired != (None, None) and desired != (
        dev.get("active_model"),
        dev.get("active_version"),
    )
    out["missing_messages"] = missing
    out["latest"] = (
        None
        if latest is None
        else {
            k: latest.get(k)
            for k in (
                "ts",
                "model_name",
                "model_version",
                "count",
                "errors",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "accuracy",
                "agreement",
                "fidelity",
                "live_accuracy",
            )
        }
    )
    return queries.jsonable(out)


def _require_device(ctx: ServerContext, device_id: str) -> dict[str, Any]:
    dev = ctx.store.device(ctx.fleet, device_id)
    if dev is None:
        known = [d["device_id"] for d in ctx.store.devices(ctx.fleet)][:20]
        raise NotFound(
            f"no device {device_id!r} in fleet {ctx.fleet!r}; known devices: {known or 'none yet'} "
            "(GET /api/devices lists them)"
        )
    return dev


@router.get("/devices", summary="Fleet table: every device with its state, model and latest telemetry")
def list_devices(ctx: ServerContext = Depends(get_ctx)) -> list[dict[str, Any]]:
    """Every device of the fleet, sorted by id."""
    latest = queries.latest_per_device(ctx.store, ctx.fleet)
    missing = queries.gap_totals(ctx.store, ctx.fleet)
    return [
        _device_view(d, latest.get(d["device_id"]), missing.get(d["device_id"], 0))
        for d in ctx.store.devices(ctx.fleet)
    ]


@router.get("/devices/{device_id}", summary="One device with its latest telemetry and recent events")
def get_device(
    device_id: str,
    events: int = Query(20, ge=0, le=1000, description="How many recent events to include."),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """One device; 404 names the known devices when the id is unknown."""
    dev = _require_device(ctx, device_id)
    latest = ctx.store.latest_telemetry(ctx.fleet, device_id)
    out = _device_view(
        dev, latest[0] if latest else None, queries.gap_totals(ctx.store, ctx.fleet).get(device_id, 0)
    )
    out["events"] = queries.jsonable(ctx.store.events(ctx.fleet, device_id, limit=events)) if events else []
    return out


@router.get("/devices/{device_id}/events", summary="A device's events (deploy progress, outcomes, errors)")
def device_events(
    device_id: str,
    limit: int = Query(100, ge=1, le=10000, description="How many events, newest first."),
    ctx: ServerContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    """The newest events of one device."""
    _require_device(ctx, device_id)
    return queries.jsonable(ctx.store.events(ctx.fleet, device_id, limit=limit))


@router.get("/events/recent", summary="The fleet's newest events, all devices")
def recent_events(
    limit: int = Query(50, ge=1, le=10000, description="How many events, newest first."),
    ctx: ServerContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    """The newest events of the fleet."""
    return queries.jsonable(ctx.store.events(ctx.fleet, limit=limit))


def _series(
    ctx: ServerContext,
    *,
    device: Optional[str],
    model: Optional[str],
    version: Optional[int],
    profile: Optional[str],
    since: Optional[float],
    bucket_s: float,
) -> list[dict[str, Any]]:
    points = ctx.store.series(
        ctx.fleet,
        device_id=device,
        model_name=model,
        model_version=version,
        profile=profile,
        since=since,
        bucket_s=bucket_s,
    )
    return [queries.point_dict(p) for p in points]


@router.get(
    "/telemetry",
    summary="Latency percentiles and accuracy over time, optionally one series per device/version/profile",
)
def telemetry_series(
    device: Optional[str] = Query(None, description="Only this device."),
    model: Optional[str] = Query(None, description="Only this model name."),
    version: Optional[int] = Query(
        None, ge=0, le=queries.MAX_VERSION, description="Only this model version."
    ),
    profile: Optional[str] = Query(None, description="Only devices of this profile."),
    since: Optional[float] = Query(None, description="Unix time of the oldest window to include."),
    window_s: Optional[float] = Query(
        None, gt=0, description="Shortcut for since = now - window_s (seconds back from now)."
    ),
    bucket_s: float = Query(60.0, gt=0, le=86400 * 7, description="Bucket width in seconds."),
    group_by: GroupBy = Query("none", description="One series per device, model version or profile."),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """Time series from the store; each point weights its windows by inference count."""
    if since is not None and window_s is not None:
        raise Unprocessable("give either 'since' (Unix time) or 'window_s' (seconds back), not both")
    if window_s is not None:
        since = time.time() - window_s
    if device is not None:
        _require_device(ctx, device)
    common: dict[str, Any] = {"since": since, "bucket_s": bucket_s}
    filters: dict[str, Any] = {"device": device, "model": model, "version": version, "profile": profile}
    series: list[dict[str, Any]] = []
    if group_by == "none":
        series.append({"key": "all", "label": "all", "points": _series(ctx, **filters, **common)})
    elif group_by == "device":
        ids = [device] if device else [d["device_id"] for d in ctx.store.devices(ctx.fleet)]
        for dev_id in ids:
            points = _series(ctx, **{**filters, "device": dev_id}, **common)
            if points:
                series.append({"key": dev_id, "label": dev_id, "points": points})
    elif group_by == "version":
        for mv in queries.model_versions(ctx.store, ctx.fleet, model):
            if version is not None and mv["model_version"] != version:
                continue
            points = _series(
                ctx, **{**filters, "model": mv["model_name"], "version": mv["model_version"]}, **common
            )
            if points:
                label = f"{mv['model_name']} v{mv['model_version']}"
                series.append({"key": label, "label": label, "points": points})
    else:
        profiles = sorted({d["profile"] for d in ctx.store.devices(ctx.fleet) if d["profile"]})
        for prof in [profile] if profile else profiles:
            points = _series(ctx, **{**filters, "profile": prof}, **common)
            if points:
                series.append({"key": prof, "label": prof, "points": points})
    return {"fleet": ctx.fleet, "group_by": group_by, "bucket_s": bucket_s, "since": since, "series": series}


@router.get("/devices/{device_id}/telemetry", summary="One device's latency and accuracy over time")
def device_telemetry(
    device_id: str,
    since: Optional[float] = Query(None, description="Unix time of the oldest window to include."),
    bucket_s: float = Query(60.0, gt=0, le=86400 * 7, description="Bucket width in seconds."),
    latest: int = Query(1, ge=0, le=1000, description="How many raw newest windows to include."),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """Series of one device, per model version, plus its newest raw telemetry windows."""
    _require_device(ctx, device_id)
    per_version = []
    for row in queries.latest_per_device_version(ctx.store, ctx.fleet):
        if row["device_id"] != device_id:
            continue
        points = ctx.store.series(
            ctx.fleet,
            device_id=device_id,
            model_name=row["model_name"],
            model_version=row["model_version"],
            since=since,
            bucket_s=bucket_s,
        )
        per_version.append(
            {
                "model_name": row["model_name"],
                "model_version": row["model_version"],
                "points": [queries.point_dict(p) for p in points],
            }
        )
    raw = ctx.store.latest_telemetry(ctx.fleet, device_id, limit=latest) if latest else []
    return {"device_id": device_id, "series": per_version, "latest": queries.jsonable(raw)}


@router.get("/models", summary="Every model version seen in telemetry, with fleet-wide latency and accuracy")
def models(
    model: Optional[str] = Query(None, description="Only this model name."),
    ctx: ServerContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    """Model versions, newest first per model."""
    return queries.model_versions(ctx.store, ctx.fleet, model)


@router.get("/compare", summary="Two model versions side by side: summaries and series")
def compare(
    model: Optional[str] = Query(
        None, description="Model name (default: the one with the newest telemetry)."
    ),
    a: Optional[int] = Query(None, ge=0, description="First version (default: the second newest)."),
    b: Optional[int] = Query(None, ge=0, description="Second version (default: the newest)."),
    since: Optional[float] = Query(None, description="Unix time of the oldest window to include."),
    bucket_s: float = Query(60.0, gt=0, le=86400 * 7, description="Bucket width in seconds."),
    ctx: ServerContext = Depends(get_ctx),
) -> dict[str, Any]:
    """Compare two versions of one model on the same fleet: latency, accuracy, devices, counts."""
    versions = queries.model_versions(ctx.store, ctx.fleet, model)
    if not versions:
        known = sorted({v["model_name"] for v in queries.model_versions(ctx.store, ctx.fleet)})
        what = f"model {model!r}" if model else "any model"
        raise NotFound(
            f"no telemetry for {what} in fleet {ctx.fleet!r}; models with telemetry: {known or 'none yet'}"
        )
    if model is None:
        model = max(versions, key=lambda v: v["last_ts"] or 0)["model_name"]
        versions = [v for v in versions if v["model_name"] == model]
    by_version = {v["model_version"]: v for v in versions}
    ordered = sorted(by_version)
    if b is None:
        b = ordered[-1]
    if a is None:
        older = [v for v in ordered if v != b]
        a = older[-1] if older else b
    for label, ver in (("a", a), ("b", b)):
        if ver not in by_version:
            raise NotFound(
                f"no telemetry for {model!r} version {ver} (parameter '{label}'); versions with telemetry: "
                f"{ordered}"
            )
    sides = []
    for ver in (a, b):
        points = ctx.store.series(
            ctx.fleet, model_name=model, model_version=ver, since=since, bucket_s=bucket_s
        )
        sides.append({"summary": by_version[ver], "points": [queries.point_dict(p) for p in points]})
    return {"model": model, "a": sides[0], "b": sides[1], "versions": ordered}
