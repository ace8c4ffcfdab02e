"""A live fleet for the server tests: real agents with their local HTTP API, and inference traffic to them.

Agents report latency only for inferences they serve, so a small load generator calls each agent's
`/v1/infer` the way an application on the device would.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from conftest import free_port

from tests.agent_net_support import IN_FEATURES, AgentProcess, agent_args


@contextmanager
def http_agents(
    tmp_path: Path, url: str, fleet: str, key: Path, ids: list[str], *extra: str
) -> Iterator[dict[str, int]]:
    """Start real agent processes with the local HTTP API on; yields device id → HTTP port."""
    procs: list[AgentProcess] = []
    ports: dict[str, int] = {}
    try:
        for device in ids:
            port = free_port()
            args = [a for a in agent_args(tmp_path / device, url, fleet, device, key) if a != "--no-http"]
            args += ["--http-port", str(port), "--log-level", "info", *extra]
            (tmp_path / device).mkdir(parents=True, exist_ok=True)
            proc = AgentProcess(args, tmp_path / f"{device}.log")
            proc.start()
            procs.append(proc)
            ports[device] = port
        yield ports
    finally:
        for proc in procs:
            proc.stop()


class Traffic:
    """Calls every agent's /v1/infer in a loop on a thread; refusals (no model yet) are counted, not raised."""

    def __init__(self, ports: dict[str, int], interval_s: float = 0.05) -> None:
        self.ports = ports
        self.interval_s = interval_s
        self.ok = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._rng = np.random.default_rng(0)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for port in self.ports.values():
                body = json.dumps({"inputs": self._rng.standard_normal((1, IN_FEATURES)).tolist()}).encode()
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/infer",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=2) as resp:
                        resp.read()
                    self.ok += 1
                except (urllib.error.URLError, OSError):
                    self.refused += 1
