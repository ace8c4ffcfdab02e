"""Run the app with uvicorn in a background thread (tests, `edgefleet demo`), refusing unsafe binds."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any, Optional

from edgefleet.sdk.server.auth import check_bind
from edgefleet.sdk.server.errors import ServerError


class ServerThread:
    """A uvicorn server on its own thread; `start()` returns once it accepts connections."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 8080, token: Optional[str] = None
    ) -> None:
        check_bind(host, token)
        import uvicorn

        self.host = host
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            # Open SSE streams would otherwise hold shutdown forever.
            timeout_graceful_shutdown=2,
            lifespan="on",
        )
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self.server.run, name="edgefleet-serve", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on (the real one when started with port 0)."""
        servers = getattr(self.server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ServerThread:
        """Start serving; raise ServerError if it is not up within `timeout` seconds."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise ServerError(
                    f"the server on {self.host}:{self.config.port} stopped while starting; is the port in use?"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"the server on {self.host}:{self.config.port} did not start in {timeout:.0f} s"
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()
