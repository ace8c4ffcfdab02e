"""An embedded MQTT broker for trying edgefleet out: Mosquitto when it is installed, else amqtt.

Mosquitto moved model chunks ~10× faster than amqtt here, so it is preferred; it gets a generated
config with persistence in a temp folder and no per-client queue limit (Mosquitto silently drops QoS 1
messages past `max_queued_messages`, 1000 by default). amqtt is the pure-Python fallback for machines
without Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Optional

from edgefleet.sdk.errors import EdgefleetError

Backend = Literal["auto", "mosquitto", "amqtt"]


class BrokerError(EdgefleetError):
    """The embedded broker could not start; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_listening(
    host: str, port: int, timeout: float, proc: Optional[subprocess.Popen[bytes]] = None
) -> None:
    """Wait with backoff until host:port accepts connections, or raise BrokerError."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(
                f"the broker exited with code {proc.returncode} before listening on {host}:{port}"
            )
        if port_open(host, port):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.3)
    raise BrokerError(f"the broker did not listen on {host}:{port} within {timeout:.0f} s")


def mosquitto_config(host: str, port: int, workdir: Path) -> str:
    """The Mosquitto config edgefleet generates: one listener, persistence in `workdir`, no queue cap."""
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {workdir}/\n"
        "autosave_interval 5\n"
        # 0 = unlimited: a slow subscriber must not lose QoS 1 chunks or telemetry in silence.
        "max_queued_messages 0\n"
        "max_inflight_messages 100\n"
        f"log_dest file {workdir}/mosquitto.log\n"
    )


class EmbeddedBroker:
    """A broker this process owns; `start()` picks the backend, `stop()` ends it; usable as a context."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: Backend = "auto",
        workdir: Optional[Path] = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.backend = backend
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        self.workdir = workdir
        self.chosen: Optional[str] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._amqtt_broker: Any = None
        self._amqtt_error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        """The broker URL as edgefleet commands take it."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        if port_open(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is already in use; pick another --port")
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgefleet-broker-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        mosquitto = shutil.which("mosquitto")
        if self.backend == "mosquitto" and mosquitto is None:
            raise BrokerError(
                "mosquitto is not on PATH: install it (apt install mosquitto) or use --backend amqtt"
            )
        if self.backend in ("auto", "mosquitto") and mosquitto is not None:
            self._start_mosquitto(mosquitto, self.workdir, timeout)
        else:
            self._start_amqtt(timeout)
        return self

    def _start_mosquitto(self, binary: str, workdir: Path, timeout: float) -> None:
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.host, self.port, workdir))
        # Its own session: a Ctrl-C in the terminal reaches only the owner, which stops the broker
        # last, after the clients it serves (`edgefleet demo`'s agents) have said goodbye.
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_listening(self.host, self.port, timeout, self._proc)
        self.chosen = "mosquitto"

    def _start_amqtt(self, timeout: float) -> None:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise BrokerError(
                "neither mosquitto nor amqtt is installed: apt install mosquitto, or pip install amqtt"
            ) from exc
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_amqtt, args=(ready,), name="amqtt", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._amqtt_error is not None:
            raise BrokerError(f"amqtt did not start: {self._amqtt_error or 'timed out'}")
        _wait_listening(self.host, self.port, timeout)
        self.chosen = "amqtt"

    def _run_amqtt(self, ready: threading.Event) -> None:
        """Run amqtt's broker on an event loop of this thread (it must be built inside a running loop)."""
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._amqtt_broker = Broker(config)
            await self._amqtt_broker.start()

        try:
            loop.run_until_complete(boot())
        except Exception as exc:  # surfaced to start() as BrokerError
            self._amqtt_error = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker and remove its temp folder."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
            self._proc = None
        if self._loop is not None and self._amqtt_broker is not None:
            future = asyncio.run_coroutine_threadsafe(self._amqtt_broker.shutdown(), self._loop)
            try:
                future.result(timeout)
            except Exception:  # a broker that fails to shut down cleanly is stopped with its loop
                logging.getLogger(__name__).debug("amqtt shutdown failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
            self._loop = None
            self._amqtt_broker = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
