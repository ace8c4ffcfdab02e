"""Local inference endpoint for applications on the device: standard-library HTTP on 127.0.0.1 only.

    POST /v1/infer     JSON {"inputs": {name: nested lists}} (or {"inputs": nested list} for one input),
                       or a raw body `application/x-npy` (one input) / `application/x-npz` (one array per
                       input name); `Accept: application/x-npy` returns the first output as .npy bytes.
    POST /v1/feedback  JSON {"request_id": "...", "label": 3}
    GET  /v1/health    {"ok": true, "model": bool}
    GET  /v1/model     the serving model (name, version, runtime, providers, tensor specs)
    GET  /v1/status    install status (slots, rejected versions, last health report)
Errors are JSON {"error": {"code", "reason"}} with a matching HTTP status. Arrays are read with
`allow_pickle=False`: nothing received is ever executed.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Protocol, Tuple

from edgefleet.agent.core.errors import AgentError

log = logging.getLogger("edgefleet.agent.http")

# Large enough for a batch of images; a bigger body is refused before it is read.
MAX_BODY_BYTES = 16 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "::1", "localhost")
_STATUS = {
    "no-model": 503,
    "bad-input": 400,
    "bad-request": 400,
    "bad-feedback": 400,
    "unknown-request": 404,
    "not-found": 404,
    "method-not-allowed": 405,
    "length-required": 411,
    "too-large": 413,
    "unsupported-media-type": 415,
    "infer-failed": 500,
    "internal": 500,
}


class Backend(Protocol):
    """What the endpoint serves: the Agent, or a bare ModelServer in benchmarks."""

    def infer(self, inputs: Any, request_id: Optional[str] = None) -> Any:
        """Run one inference."""

    def feedback(self, request_id: str, label: int) -> None:
        """Record a true label."""

    def status(self) -> Dict[str, Any]:
        """Install status with an `active` entry."""


class ApiError(AgentError):
    """A request the endpoint refuses; the code maps to an HTTP status."""

    default_code = "bad-request"


def _decode_inputs(content_type: str, body: bytes) -> Any:
    import numpy as np

    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    if kind in ("application/x-npy", "application/octet-stream"):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ApiError(
                "bad-input", f"the body is not a .npy array (numpy.save, no objects): {exc}"
            ) from None
    if kind == "application/x-npz":
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError) as exc:
            raise ApiError("bad-input", f"the body is not a .npz archive (numpy.savez): {exc}") from None
    if kind in ("application/json", ""):
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError("bad-input", f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise ApiError("bad-input", 'send {"inputs": {"<input name>": [[...]]}}')
        raw = doc["inputs"]
        try:
            if isinstance(raw, dict):
                return {str(k): np.asarray(v) for k, v in raw.items()}
            return np.asarray(raw)
        except (ValueError, TypeError) as exc:
            raise ApiError("bad-input", f"inputs are not rectangular numeric arrays: {exc}") from None
    raise ApiError(
        "unsupported-media-type",
        f"content type {kind!r} is not accepted; use application/json, application/x-npy or application/x-npz",
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server_version = "edgefleet-agent"
    backend: Backend
    max_body: int

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- responses -------------------------------------------------------------------------------------

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _error(self, code: str, reason: str) -> None:
        self._json(_STATUS.get(code, 400), {"error": {"code": code, "reason": reason}})

    def _body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise ApiError(
                "length-required", "send a Content-Length header (chunked bodies are not accepted)"
            )
        try:
            length = int(length_text)
        except ValueError:
            raise ApiError("bad-request", f"Content-Length {length_text!r} is not a number") from None
        if length < 0 or length > self.max_body:
            # The body is not read, so the connection cannot be reused.
            self.close_connection = True
            raise ApiError("too-large", f"the body has {length} bytes; the limit is {self.max_body}")
        return self.rfile.read(length)

    # -- routes ----------------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            routes = {
                ("POST", "/v1/infer"): self._infer,
                ("POST", "/v1/feedback"): self._feedback,
                ("GET", "/v1/health"): self._health,
                ("GET", "/v1/model"): self._model,
                ("GET", "/v1/status"): self._status,
            }
            route = routes.get((method, path))
            if route is None:
                if any(p == path for _, p in routes):
                    if method == "POST":
                        self._drain()
                    raise ApiError("method-not-allowed", f"{method} is not allowed on {path}")
                if method == "POST":
                    self._drain()
                raise ApiError(
                    "not-found", f"no endpoint {path}; see /v1/infer, /v1/feedback, /v1/health, /v1/model"
                )
            route()
        except AgentError as exc:
            self._error(exc.code, exc.reason)
        except Exception as exc:  # a bug must answer 500, not drop the connection
            log.exception("local API failed on %s %s", method, path)
            self._error("internal", f"{type(exc).__name__}: {exc}")

    def _drain(self) -> None:
        try:
            self._body()
        except ApiError:
            self.close_connection = True

    def do_GET(self) -> None:
        """GET routes."""
        self._handle("GET")

    def do_POST(self) -> None:
        """POST routes."""
        self._handle("POST")

    def do_PUT(self) -> None:
        """Refused."""
        self._handle("PUT")

    def do_DELETE(self) -> None:
        """Refused."""
        self._handle("DELETE")

    def _infer(self) -> None:
        body = self._body()
        inputs = _decode_inputs(self.headers.get("Content-Type", "application/json"), body)
        request_id = self.headers.get("X-Request-Id") or None
        result = self.backend.infer(inputs, request_id=request_id)
        headers = {
            "X-Request-Id": result.request_id,
            "X-Model": result.model_name,
            "X-Model-Version": str(result.model_version),
            "X-Latency-Ms": f"{result.latency_ms:.3f}",
        }
        if "application/x-npy" in (self.headers.get("Accept") or ""):
            import numpy as np

            name, first = next(iter(result.outputs.items()))
            buffer = io.BytesIO()
            np.save(buffer, first, allow_pickle=False)
            headers["X-Output-Name"] = name
            self._send(200, buffer.getvalue(), "application/x-npy", headers)
            return
        doc = {
            "request_id": result.request_id,
            "model": result.model_name,
            "version": result.model_version,
            "latency_ms": round(result.latency_ms, 3),
            "outputs": {k: v.tolist() for k, v in result.outputs.items()},
        }
        self._send(200, json.dumps(doc, separators=(",", ":")).encode(), "application/json", headers)

    def _feedback(self) -> None:
        body = self._body()
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError("bad-input", f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("request_id"), str) or "label" not in doc:
            raise ApiError("bad-input", 'send {"request_id": "<id from /v1/infer>", "label": <class index>}')
        self.backend.feedback(doc["request_id"], doc["label"])
        self._json(200, {"ok": True})

    def _health(self) -> None:
        active = self.backend.status().get("active")
        self._json(200, {"ok": True, "model": active is not None})

    def _model(self) -> None:
        active = self.backend.status().get("active")
        if active is None:
            raise ApiError("no-model", "no model is installed yet; deploy a bundle to this device")
        self._json(200, active)

    def _status(self) -> None:
        self._json(200, self.backend.status())


class LocalApi:
    """The HTTP endpoint in a background thread; `port=0` picks a free port (read `.port` after start)."""

    def __init__(
        self, backend: Backend, host: str = "127.0.0.1", port: int = 0, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        if host not in LOOPBACK:
            # Applications on the device only: exposing inference to the network needs auth this has not.
            raise ApiError(
                "bad-request", f"the local API binds to loopback only, not {host!r}; use 127.0.0.1"
            )
        handler = type("Handler", (_Handler,), {"backend": backend, "max_body": int(max_body_bytes)})
        self._httpd = ThreadingHTTPServer((host, int(port)), handler)
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edgefleet-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
