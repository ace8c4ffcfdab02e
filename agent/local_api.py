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

Memory is bounded by the device's RAM (`Limits.for_ram`): bodies, the decoded size of every array (an
.npy header or a .npz member is checked before its data is read, so a zip bomb costs nothing), the rows of
a request (large batches run in slices), nesting depth, idle connections (read timeout) and connections.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Protocol, Tuple

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
    "busy": 503,
    "model-switched": 503,
    "internal": 500,
}


@dataclass(frozen=True)
class Limits:
    """What one request may cost: bytes read, bytes decoded, rows, rows per run, time idle, connections."""

    max_body_bytes: int = MAX_BODY_BYTES
    # JSON numbers cost ~8-32 bytes each once parsed (2-4 bytes on the wire): a smaller body cap.
    max_json_bytes: int = MAX_BODY_BYTES // 4
    # Sum of the decoded arrays' sizes (.npy headers and .npz members are checked before reading).
    max_input_bytes: int = 64 << 20
    max_rows: int = 65536
    # Bytes (and rows) of one run: a large batch runs in slices so the runtime's buffers stay small.
    slice_bytes: int = 1 << 20
    max_slice_rows: int = 1024
    max_npz_members: int = 64
    # An idle or trickling connection is closed after this long without a byte.
    read_timeout_s: float = 10.0
    max_connections: int = 32

    @classmethod
    def for_ram(cls, ram_mb: Optional[int]) -> Limits:
        """Limits for a device with `ram_mb` of RAM (None or 2 GB and up: the defaults)."""
        if not ram_mb or ram_mb >= 2048:
            return cls()
        ram = int(ram_mb) << 20
        body = max(1 << 20, min(MAX_BODY_BYTES, ram // 32))
        return cls(
            max_body_bytes=body,
            max_json_bytes=max(256 << 10, body // 4),
            max_input_bytes=max(4 << 20, ram // 32),
            max_rows=max(1024, int(ram_mb) * 32),
            slice_bytes=max(256 << 10, ram // 512),
            # Each connection's thread reserves an 8 MiB stack: 8 of them on a 512 MB device.
            max_connections=max(4, min(32, int(ram_mb) // 64)),
        )


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


def _load_npy(data: bytes, limits: Limits, what: str) -> Any:
    """One .npy array; its header's shape and dtype are checked against the data and the limits first."""
    import numpy as np
    from numpy.lib import format as npformat

    handle = io.BytesIO(data)
    try:
        version = npformat.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = npformat.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ApiError("bad-input", f"{what} is not a .npy array (numpy.save, no objects): {exc}") from None
    if dtype.hasobject:
        raise ApiError("bad-input", f"{what} holds Python objects; send numeric arrays")
    count = 1
    for dim in shape:
        count *= int(dim)
    nbytes = count * dtype.itemsize
    if shape and int(shape[0]) > limits.max_rows:
        raise ApiError(
            "too-large",
            f"{what} has {shape[0]} rows; this device takes at most {limits.max_rows} per request",
        )
    if nbytes > limits.max_input_bytes:
        raise ApiError(
            "too-large",
            f"{what} is a {list(shape)} {dtype} array of {nbytes} bytes; this device takes at most "
            f"{limits.max_input_bytes} bytes per request: send fewer rows per request",
        )
    if nbytes > len(data) - handle.tell():
        # The header promises more than the body holds: refused before numpy allocates the array.
        raise ApiError("bad-input", f"{what} is truncated: its header declares {nbytes} bytes of data")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ApiError("bad-input", f"{what} is not a .npy array (numpy.save, no objects): {exc}") from None


def _load_npz(body: bytes, limits: Limits) -> Dict[str, Any]:
    """The arrays of a .npz archive; members' declared sizes are checked before any is decompressed."""
    import zipfile
    import zlib

    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ApiError("bad-input", f"the body is not a .npz archive (numpy.savez): {exc}") from None
    if len(members) > limits.max_npz_members:
        raise ApiError(
            "too-large", f"the archive has {len(members)} members; at most {limits.max_npz_members}"
        )
    declared = sum(m.file_size for m in members)
    if declared > limits.max_input_bytes:
        raise ApiError(
            "too-large",
            f"the archive unpacks to {declared} bytes; this device takes at most {limits.max_input_bytes} "
            "bytes per request",
        )
    arrays: Dict[str, Any] = {}
    for member in members:
        name = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
        try:
            with archive.open(member) as handle:
                # zipfile stops at the declared size (and checks the CRC), so this read is bounded.
                data = handle.read(member.file_size + 1)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, NotImplementedError) as exc:
            raise ApiError("bad-input", f"member {name!r} of the archive cannot be read: {exc}") from None
        arrays[name] = _load_npy(data, limits, f"member {name!r}")
    return arrays


def _parse_json(body: bytes) -> Any:
    """Parse a JSON body; too deep a nesting is a bad input (400), not a crash."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError("bad-input", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError("bad-input", "the JSON body is nested too deeply") from None


def _decode_inputs(content_type: str, body: bytes, limits: Optional[Limits] = None) -> Any:
    import numpy as np

    limits = limits or Limits()
    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    if kind in ("application/x-npy", "application/octet-stream"):
        return _load_npy(body, limits, "the body")
    if kind == "application/x-npz":
        return _load_npz(body, limits)
    json_kind = kind in ("application/json", "")
    if len(body) > limits.max_json_bytes and json_kind:
        raise ApiError(
            "too-large",
            f"the JSON body has {len(body)} bytes; the limit is {limits.max_json_bytes} (send "
            "application/x-npy or application/x-npz for large inputs)",
        )
    try:
        doc = _parse_json(body) if len(body) <= limits.max_json_bytes else None
    except ApiError:
        if json_kind:
            raise
        doc = None
    # Any other content type is read as JSON when it parses as JSON: `curl -d '{...}'` sends
    # application/x-www-form-urlencoded unless told otherwise.
    if json_kind or doc is not None:
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise ApiError("bad-input", 'send {"inputs": {"<input name>": [[...]]}}')
        raw = doc["inputs"]
        try:
            if isinstance(raw, dict):
                return {str(k): np.asarray(v) for k, v in raw.items()}
            return np.asarray(raw)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ApiError("bad-input", f"inputs are not rectangular numeric arrays: {exc}") from None
    raise ApiError(
        "unsupported-media-type",
        f"content type {kind!r} is not accepted; use application/json, application/x-npy or application/x-npz",
    )


class _Batched:
    """The answer to a batch run in slices: the slices' outputs joined, as one InferResult reads."""

    def __init__(self, parts: List[Any]) -> None:
        import numpy as np

        first = parts[0]
        self.request_id = first.request_id
        self.model_name = first.model_name
        self.model_version = first.model_version
        self.latency_ms = float(sum(p.latency_ms for p in parts))
        self.outputs = {name: np.concatenate([p.outputs[name] for p in parts]) for name in first.outputs}


def _rows(inputs: Any) -> Optional[Tuple[int, int]]:
    """(rows, bytes per row) of a batch whose arrays share their first dimension; None otherwise."""
    arrays = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    rows: Optional[int] = None
    total = 0
    for value in arrays:
        shape = getattr(value, "shape", None)
        if not shape:
            return None
        if rows is None:
            rows = int(shape[0])
        elif int(shape[0]) != rows:
            return None
        total += int(value.nbytes)
    if not rows:
        return None
    return rows, max(1, total // rows)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server_version = "edgefleet-agent"
    backend: Backend
    max_body: int
    limits: Limits

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

    def _run(self, inputs: Any, request_id: Optional[str]) -> Any:
        """Infer; a batch over the slice size runs in slices, all on one model version."""
        limits = self.limits
        shape = _rows(inputs)
        if shape is None:
            return self.backend.infer(inputs, request_id=request_id)
        rows, row_bytes = shape
        if rows > limits.max_rows:
            raise ApiError(
                "too-large", f"the request has {rows} rows; this device takes at most {limits.max_rows}"
            )
        step = max(1, min(limits.max_slice_rows, limits.slice_bytes // row_bytes))
        if rows <= step:
            return self.backend.infer(inputs, request_id=request_id)
        for _ in range(2):  # a model switch during the batch: run it again once, on the new model
            parts: List[Any] = []
            for start in range(0, rows, step):
                part = (
                    {k: v[start : start + step] for k, v in inputs.items()}
                    if isinstance(inputs, dict)
                    else inputs[start : start + step]
                )
                parts.append(self.backend.infer(part, request_id=None if parts else request_id))
            if len({(p.model_name, p.model_version) for p in parts}) == 1:
                return _Batched(parts)
        raise ApiError("model-switched", "the model changed twice during this batch; send it again")

    def _infer(self) -> None:
        body = self._body()
        inputs = _decode_inputs(self.headers.get("Content-Type", "application/json"), body, self.limits)
        request_id = self.headers.get("X-Request-Id") or None
        result = self._run(inputs, request_id)
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
        doc = _parse_json(body)
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


_BUSY = json.dumps({"error": {"code": "busy", "reason": "too many connections; retry"}}).encode()


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: one more is answered 503 and closed."""

    daemon_threads = True
    # The listen backlog: connections over the cap are accepted and refused, not left to time out.
    request_queue_size = 64

    def __init__(self, address: Tuple[str, int], handler: Any, max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or refuse it at once when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:
            # No thread could start (each reserves a stack; a small device's address space runs out).
            self._slots.release()
            self._refuse(request)
        except BaseException:
            self._slots.release()
            raise

    def _refuse(self, request: Any) -> None:
        """Answer 503 busy and close, without a thread."""
        try:
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(_BUSY)}\r\nConnection: close\r\n\r\n".encode()
                + _BUSY
            )
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class LocalApi:
    """The HTTP endpoint in a background thread; `port=0` picks a free port (read `.port` after start)."""

    def __init__(
        self,
        backend: Backend,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: Optional[int] = None,
        limits: Optional[Limits] = None,
    ) -> None:
        if host not in LOOPBACK:
            # Applications on the device only: exposing inference to the network needs auth this has not.
            raise ApiError(
                "bad-request", f"the local API binds to loopback only, not {host!r}; use 127.0.0.1"
            )
        limits = limits or Limits()
        if max_body_bytes is not None:
            limits = replace(limits, max_body_bytes=int(max_body_bytes))
        self.limits = limits
        attrs = {"backend": backend, "max_body": limits.max_body_bytes, "limits": limits}
        # `timeout` is the socket read timeout: an idle keep-alive connection frees its thread.
        attrs["timeout"] = limits.read_timeout_s
        handler = type("Handler", (_Handler,), attrs)
        self._httpd = _Server((host, int(port)), handler, limits.max_connections)
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
