"""The FastAPI app factory: REST API, `/metrics`, SSE and the dashboard over one store (and optionally a fleet)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.agent import __version__
from edgefleet.sdk.server import auth, queries, routes_bundles, routes_fleet, routes_live, routes_rollouts
from edgefleet.sdk.server.actions import actions_for
from edgefleet.sdk.server.context import ServerContext
from edgefleet.sdk.server.errors import ApiError
from edgefleet.sdk.server.feed import ChangeFeed
from edgefleet.sdk.server.limits import BodyCap, SecurityHeaders, refuse_unbounded
from edgefleet.sdk.store import Store

STATIC_DIR = Path(__file__).parent / "static"
# The only endpoint where the token may come in the URL: browsers' EventSource cannot set headers.
TOKEN_QUERY_PATHS = frozenset({"/api/events"})

_bearer = HTTPBearer(auto_error=False, description="The token `edgefleet serve` was started with.")
NUL_MESSAGE = (
    "the request's path or query contains a NUL character (%00); no device, model, bundle or rollout "
    "name contains one: check how the URL was built"
)


class _RefuseNul:
    """Refuse NUL characters in the path or query (422) before they reach the store.

    PostgreSQL cannot hold NUL in text and psycopg raises on it, which would be a 500 for a bad URL.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
        ):
            await JSONResponse({"detail": NUL_MESSAGE}, status_code=422)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _auth_dependency(token: Optional[str]) -> Any:
    """A dependency that accepts the request only with the right bearer token (a no-op without a token)."""

    async def require_token(
        request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)
    ) -> None:
        if token is None:
            return
        presented = credentials.credentials if credentials is not None else None
        if presented is None and request.url.path in TOKEN_QUERY_PATHS:
            presented = request.query_params.get("access_token")
        if not auth.token_matches(token, presented):
            what = "a wrong" if presented else "no"
            raise ApiError(
                401,
                f"{what} bearer token: send the header 'Authorization: Bearer <token>' with the token "
                f"`edgefleet serve` was started with (--token or {auth.TOKEN_ENV})",
            )

    return require_token


def _where(loc: Sequence[Any]) -> str:
    """Name the place of a validation error the way a user writes the request."""
    if not loc:
        return "request"
    kinds = {"query": "query parameter", "path": "path parameter", "body": "body field", "header": "header"}
    head, rest = str(loc[0]), [str(x) for x in loc[1:]]
    if head == "body" and not rest:
        return "request body"
    if head in kinds:
        return f"{kinds[head]} '{'.'.join(rest)}'"
    return "field '" + ".".join(str(x) for x in loc) + "'"


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """One readable sentence per validation error: where, what is wrong, what was sent."""
    parts = []
    for err in errors:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        where = _where(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            cause = (err.get("ctx") or {}).get("error")
            parts.append(
                "the request body is not valid JSON"
                + (f" ({cause})" if cause else "")
                + ": send a JSON object with Content-Type: application/json"
            )
            continue
        if err.get("type") == "missing":
            parts.append(f"{where} is required")
            continue
        given = err.get("input")
        shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
        parts.append(f"{where}: {msg}{shown}")
    return "; ".join(parts) + ". See /docs for every endpoint's parameters"


def create_app(
    store: Store,
    fleet: Any = None,
    token: Optional[str] = None,
    *,
    fleet_name: Optional[str] = None,
    bundle_dir: Optional[Path] = None,
    trusted_keys: Sequence[Path] = (),
    poll_s: float = 1.0,
    max_upload_bytes: int = 512 * 1024 * 1024,
) -> FastAPI:
    """Build the app: read-only views over `store`; deploy/abort too when `fleet` (a control plane) is given.

    `token`, when set, is required as a bearer token on every API and metrics request; the dashboard's
    static files and the OpenAPI docs stay public (they hold no fleet data).
    """
    if token is not None:
        auth.check_token_strength(token)
    actions = actions_for(fleet)
    name = fleet_name or getattr(fleet, "fleet", None) or getattr(fleet, "name", None) or "default"
    if not isinstance(name, str):
        name = "default"
    feed = ChangeFeed(lambda: queries.change_marks(store, name), poll_s=poll_s)
    ctx = ServerContext(
        store=store,
        fleet=name,
        feed=feed,
        actions=actions,
        token=token,
        bundle_dir=bundle_dir,
        trusted_keys=list(trusted_keys),
        max_upload_bytes=max_upload_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await feed.start()
        try:
            yield
        finally:
            await feed.stop()

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        summary="Devices, bundles, rollouts and telemetry of an edgefleet fleet.",
        description=(
            "REST API of `edgefleet serve`. Read-only views work on the store alone; deploying and "
            "aborting need the server started with `--broker`. When the server was started with a "
            "token, send it as `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.add_middleware(_RefuseNul)
    app.add_middleware(BodyCap)
    app.add_middleware(SecurityHeaders)
    # Token first (no hints for strangers), then finite numbers and bounded lists on every route.
    guard = [Depends(_auth_dependency(token)), Depends(refuse_unbounded)]
    for router in (routes_fleet.router, routes_bundles.router, routes_rollouts.router, routes_live.router):
        app.include_router(router, dependencies=guard)
    from edgefleet.sdk.server import routes_federated

    app.include_router(routes_federated.router, dependencies=guard)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(e) for e in exc.errors()]
        message = validation_message(errors)
        for err in errors:
            err.pop("ctx", None)  # may hold exception objects that are not JSON
            err.pop("url", None)
        return JSONResponse({"detail": message, "errors": queries.jsonable(_plain(errors))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; the API is listed at /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs for its methods"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _plain(value: Any) -> Any:
    """Make validation error details JSON-safe (bytes inputs become a length note)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
