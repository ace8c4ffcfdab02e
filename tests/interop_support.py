"""Third-party MQTT brokers for the interop tests: aedes (Node.js, from npm) and amqtt (Python), each on a
free port, started and stopped by the test that asks for it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
# aedes 1.x: `Aedes.createBroker()`; it speaks MQTT 3.1.1 and refuses MQTT 5 with reason 0x84.
AEDES_SPEC = "aedes@^1.2"
AEDES_SCRIPT = """\
import { createServer } from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2])
const aedes = await Aedes.createBroker()
const server = createServer(aedes.handle)
server.listen(port, '127.0.0.1', () => console.log(`aedes listening on 127.0.0.1:${port}`))
process.on('SIGTERM', () => server.close(() => aedes.close(() => process.exit(0))))
"""


def aedes_home() -> Path:
    """Where aedes is installed: $EDGEFLEET_CACHE_DIR/aedes, else the repo's gitignored .edgefleet-cache."""
    root = os.environ.get("EDGEFLEET_CACHE_DIR")
    return (Path(root) if root else REPO / ".edgefleet-cache") / "aedes"


def install_aedes() -> Path:
    """Install aedes from npm once (kept in the cache folder) and return the broker script's path.

    Skips the test, with the reason, when node or npm is missing; fails when npm cannot install it.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("aedes needs Node.js: node and npm are not on PATH (apt install nodejs npm)")
    home = aedes_home()
    home.mkdir(parents=True, exist_ok=True)
    script = home / "broker.mjs"
    # One installer at a time (pytest-xdist workers, parallel CI jobs sharing the cache).
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "node_modules" / "aedes" / "package.json").is_file():
            if not (home / "package.json").is_file():
                (home / "package.json").write_text('{"name": "edgefleet-interop", "private": true}\n')
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", AEDES_SPEC],
                cwd=home,
                check=False,
                capture_output=True,
                text=True,
                timeout=300,
                # npm's own cache and logs go beside aedes, not into the home folder (~/.npm).
                env={**os.environ, "npm_config_cache": str(home / ".npm-cache")},
            )
            if done.returncode != 0:
                pytest.fail(f"npm install {AEDES_SPEC} failed in {home}:\n{done.stderr[-2000:]}")
        if not script.is_file() or script.read_text() != AEDES_SCRIPT:
            script.write_text(AEDES_SCRIPT)
    return script


@dataclass
class Aedes:
    """An aedes broker process on a free port (no persistence: aedes keeps sessions in memory)."""

    script: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The broker's URL as edgefleet commands take it."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Aedes:
        """Start node on the script and wait until the port accepts connections."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["node", str(self.script), str(self.port)], cwd=self.script.parent, stdout=log, stderr=log
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20)
        except TimeoutError:
            self.stop()
            raise AssertionError(
                f"aedes did not start: {self.log_path.read_text(errors='replace')}"
            ) from None
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def aedes(tmp_path: Path) -> Iterator[Aedes]:
    """aedes (npm) on a free port of this test."""
    broker = Aedes(install_aedes(), tmp_path / "aedes.log").start()
    yield broker
    broker.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[Any]:
    """amqtt (PyPI, the embedded fallback broker) on a free port of this test, in this process."""
    pytest.importorskip("amqtt", reason="amqtt is in the host extra: pip install 'edgefleet[host]'")
    from edgefleet.sdk.fleet.broker import EmbeddedBroker

    broker = EmbeddedBroker(backend="amqtt").start()
    yield broker
    broker.stop()
