"""Request limits every endpoint shares: finite numbers only, bounded lists and bodies, the dashboard's CSP.

Python's `json` turns `1e309` into `inf` and accepts `NaN`/`Infinity`; `float("inf")` parses from a query.
Such a number passed a `gt=0` check, then killed the rollout engine on SQLite (and was a 500 on
PostgreSQL), so it is refused here once for every route instead of per field. Lists and bodies are capped
for the same reason: 2 million bundle ids ran past 120 s before the API answered.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from edgefleet.sdk.server.errors import ApiError

# JSON request bodies (rollout requests, abort reasons) are small; the bundle upload streams its own way.
MAX_JSON_BODY_BYTES = 64 * 1024
# No list in a request needs more: `bundles` holds one id per target profile.
MAX_LIST_ITEMS = 256
UPLOAD_ROUTES = frozenset({("POST", "/api/bundles")})

# The dashboard loads only its own script, style sheet and API; the charts set inline `style` attributes
# (bar widths, legend colours), which style-src-attr allows without allowing inline <style> or <script>.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


class BodyCap:
    """ASGI middleware: refuse (413) a request body past MAX_JSON_BODY_BYTES before anything parses it."""

    def __init__(self, app: Any, limit: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on with its body replayed, or answer 413."""
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) in UPLOAD_ROUTES:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        detail = (
            f"the request body is too large (over {self.limit} bytes): JSON requests carry ids and "
            "settings only; upload bundles with POST /api/bundles"
        )
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: every response carries the CSP and no-sniff headers (the dashboard and its files)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on; add the headers to its response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        await self.app(scope, receive, with_headers)


def _is_float_param(annotation: Any) -> bool:
    """Whether a declared parameter type is float or Optional[float]."""
    if annotation is float:
        return True
    return float in typing.get_args(annotation)


def _route_float_params(request: Request) -> Iterator[str]:
    """Names of the float query parameters the matched route declares (and its dependencies)."""
    route = request.scope.get("route")
    stack = [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        if dependant is None:
            continue
        for param in dependant.query_params:
            if _is_float_param(param.field_info.annotation):
                yield str(param.alias)
        stack.extend(dependant.dependencies)


def _not_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False  # not a number at all: the route's own validation answers that


def check_value(value: Any, path: tuple[str, ...] = ()) -> None:
    """Raise ApiError(422) for a non-finite number or an over-long list anywhere inside a JSON body."""
    where = f"body field '{'.'.join(path)}'" if path else "request body"
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(
            422,
            f"{where}: numbers must be finite (got {value!r}; JSON numbers past ±1.8e308, NaN and "
            "Infinity are refused). See /docs for every endpoint's parameters",
        )
    if isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise ApiError(
                422,
                f"{where}: at most {MAX_LIST_ITEMS} items (got {len(value)}). See /docs for every "
                "endpoint's parameters",
            )
        for i, item in enumerate(value):
            check_value(item, (*path, str(i)))
    elif isinstance(value, dict):
        for key, item in value.items():
            check_value(item, (*path, str(key)))


async def refuse_unbounded(request: Request) -> None:
    """Dependency on every API route: finite float query parameters and a bounded, finite JSON body."""
    for name in _route_float_params(request):
        for text in request.query_params.getlist(name):
            if _not_finite(text):
                raise ApiError(
                    422,
                    f"query parameter '{name}': numbers must be finite (got {text!r}). See /docs for "
                    "every endpoint's parameters",
                )
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return
    if (request.method, request.url.path) in UPLOAD_ROUTES:
        return
    body = await request.body()
    if not body:
        return
    try:
        data = json.loads(body)
    except ValueError:
        return  # FastAPI's own parser reports the JSON error in its words
    check_value(data)
