"""Shared fixtures: free ports, a fleet name per test, and real Mosquitto brokers started on demand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SYSTEM_BROKER = ("127.0.0.1", 1883)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class Mosquitto:
    """A Mosquitto process a test owns: its port, config and data folder; restartable and killable."""

    port: int
    workdir: Path
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The broker's URL as edgefleet commands take it."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        """Where the generated mosquitto.conf lies."""
        return self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        """Write a config: a loopback listener on the port, persistence in the work folder."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = (
            f"listener {self.port} 127.0.0.1\n"
            # Run as root, mosquitto drops to a user that cannot write pytest's 0700 tmp folders.
            "user root\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            "max_queued_messages 0\n"
        )
        if self.extra_config:
            text = self.extra_config.replace("{port}", str(self.port)).replace("{workdir}", str(self.workdir))
        self.config_path.write_text(text)

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        self.write_config()
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (it saves its persistence file) or SIGKILL when `kill`."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the persistence file."""
        self.stop()
        self.start()


@pytest.fixture(scope="session", autouse=True)
def isolated_edgefleet_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$EDGEFLEET_HOME in pytest's temp folder for the whole run (agents and CLIs started by tests inherit it),
    so nothing a test does lands in the real ~/.edgefleet (e.g. a rollout's deltas). A test may still set
    its own; HOME itself stays, as tools find their caches (models, browsers) through it."""
    home = tmp_path_factory.mktemp("edgefleet-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(home))
        yield home


@pytest.fixture
def fleet_name() -> str:
    """A fleet name (topic prefix) of this test alone, so retained messages of earlier runs never leak in."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def system_broker_url() -> str:
    """The Mosquitto this machine runs on 127.0.0.1:1883 (skip only if it is not up)."""
    try:
        wait_for_port(*SYSTEM_BROKER, timeout=2.0)
    except TimeoutError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Mosquitto on 127.0.0.1:1883")
    return f"mqtt://{SYSTEM_BROKER[0]}:{SYSTEM_BROKER[1]}"


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[type[Mosquitto] | object]:
    """Start Mosquitto brokers of the test's own (call with optional `extra_config`); all stop at the end."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not on PATH: install the Debian package 'mosquitto'")
    started: list[Mosquitto] = []

    def make(extra_config: str = "", start: bool = True) -> Mosquitto:
        broker = Mosquitto(
            port=free_port(), workdir=tmp_path / f"broker{len(started)}", extra_config=extra_config
        )
        if start:
            broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop(kill=True)


@pytest.fixture
def mosquitto(mosquitto_factory) -> Mosquitto:  # type: ignore[no-untyped-def]
    """One Mosquitto of the test's own, with persistence on and no queue limit."""
    return mosquitto_factory()  # type: ignore[operator,no-any-return]
