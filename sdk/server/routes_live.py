"""Live endpoints: the SSE change stream the dashboard listens to, and Prometheus `/metrics`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from edgefleet.sdk.server import metrics
from edgefleet.sdk.server.context import ServerContext, get_ctx

router = APIRouter(tags=["live"])


@router.get(
    "/api/events",
    summary="Server-sent events: `hello`, then devices/telemetry/events/rollouts change notices",
    response_class=StreamingResponse,
)
async def events_stream(request: Request, ctx: ServerContext = Depends(get_ctx)) -> StreamingResponse:
    """A `text/event-stream`; each notice names what changed so the client refetches only that."""
    hello = {"fleet": ctx.fleet, "actions": ctx.actions is not None, "poll_s": ctx.feed.poll_s}
    return StreamingResponse(
        ctx.feed.stream(hello, request.is_disconnected),
        media_type="text/event-stream",
        # Proxies (nginx) buffer responses unless told not to, which would stall live updates.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/metrics", summary="Prometheus metrics of the fleet", response_class=PlainTextResponse)
async def prometheus_metrics(ctx: ServerContext = Depends(get_ctx)) -> PlainTextResponse:
    """Text exposition format 0.0.4, read from the store at each scrape."""
    text = await asyncio.to_thread(metrics.collect, ctx.store, ctx.fleet, ctx.actions is not None)
    return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)
