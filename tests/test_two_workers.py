"""Two `edgefleet serve` workers on one PostgreSQL database and one Mosquitto share a fleet's ingest and
its rollouts: one of them is killed with SIGKILL mid-run and the other carries on.

Devices are simulated by bench/load_agents.py (paho clients speaking the agent's wire format, deploys
through the agent's own state machine); what they report as acknowledged by the broker is what was
sent, and the store must hold exactly that: nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.sdk.store import Store
from tests.conftest import Mosquitto, free_port, wait_for_port
from tests.fleet_support import wait_for
from tests.pg_support import fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
LEASE_S = 4.0


class Worker:
    """One `edgefleet serve --worker NAME` process with its API port and log."""

    def __init__(
        self, name: str, db: str, broker: str, fleet: str, tmp: Path, key: Path | None, split: int = 0
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp / f"serve-{name}.log"
        args = [
            EDGEFLEET,
            "serve",
            "--port",
            str(self.port),
            "--db",
            db,
            "--broker",
            broker,
            "--fleet",
            fleet,
            "--worker",
            name,
            *(("--partition", f"{name}/{split}") if split else ("--share-group", "ingest")),
            "--lease-s",
            str(LEASE_S),
            "--log-level",
            "warning",
            "--bundle-dir",
            str(tmp / "bundles"),
        ]
        if key is not None:
            args += ["--trusted-key", str(key)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env["EDGEFLEET_HOME"] = str(tmp / f"home-{name}")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for_port("127.0.0.1", self.port, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no clean disconnect, no lease released, nothing flushed."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text(errors="replace")


class Devices:
    """Simulated devices (bench/load_agents.py), driven over stdin/stdout one JSON line at a time."""

    def __init__(self, broker: str, fleet: str, count: int, key: Path, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.stderr = open(tmp / "devices.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "bench" / "load_agents.py"), "--broker", broker),
                *("--fleet", fleet, "--count", str(count), "--trusted-key", str(key)),
                *("--connect-timeout", "60"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        ready = self._read(90)
        assert ready.get("ready"), ready

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the simulated devices did not answer within {timeout:g} s"
        line = self.proc.stdout.readline()
        assert line, "the simulated devices exited"
        return dict(json.loads(line))

    def ask(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask({"cmd": "quit", "clear": True}, timeout=30)
        except (AssertionError, OSError):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.stderr.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        Store(url).close()  # the schema exists before two workers start at once
        yield url


def _stored_telemetry(store: Store, fleet: str) -> list[tuple[str, int]]:
    from sqlalchemy import select

    from edgefleet.sdk.store import telemetry

    with store.engine.connect() as conn:
        rows = conn.execute(
            select(telemetry.c.device_id, telemetry.c.seq).where(telemetry.c.fleet == fleet)
        ).all()
    return [(str(d), int(s)) for d, s in rows]


@pytest.mark.parametrize("mode", ["shared", "partition"])
def test_killing_one_worker_mid_run_loses_and_duplicates_nothing(
    pg_url: str, mosquitto: Mosquitto, fleet_name: str, tmp_path: Path, mode: str
) -> None:
    # prepare: two workers on one database (a shared subscription, or a partition of the devices as
    # on a broker without shared subscriptions), ten devices reporting 10 times a second each
    from edgefleet.sdk.trust.keys import init_keys

    key = init_keys(tmp_path / "keys").public_path
    names, split, group = (("a", "b"), 0, "ingest") if mode == "shared" else (("0", "1"), 2, "part2")
    workers = [Worker(n, pg_url, mosquitto.url, fleet_name, tmp_path, None, split) for n in names]
    devices = Devices(mosquitto.url, fleet_name, 10, key, tmp_path)
    store = Store(pg_url)
    try:
        devices.ask({"cmd": "telemetry", "rate": 10, "start": time.time() + 0.5, "seconds": 8})
        # act: kill worker a once both store telemetry
        wait_for(lambda: len(_stored_telemetry(store, fleet_name)) > 150, 30, "the first telemetry stored")
        workers[0].kill()
        report = devices.ask({"cmd": "report", "wait_s": 60}, timeout=90)
        sent = {(dev, seq) for dev, seqs in report["telemetry"].items() for seq in seqs}
        prefix = f"ingest/{fleet_name}/{group}/"
        # b adopts a's session (a's lease runs out) and drains what the broker kept for it
        wait_for(
            lambda: {r["name"]: r["owner"] for r in store.leases(prefix)}.get(prefix + names[0]) == names[1],
            LEASE_S * 10,
            "worker b to adopt worker a's session",
        )
        wait_for(lambda: len(_stored_telemetry(store, fleet_name)) >= len(sent), 60, "everything stored")
        time.sleep(1.0)  # a late duplicate would land now
        stored = _stored_telemetry(store, fleet_name)
        print(f"\nmeasured ({mode}, one of two workers killed): sent {len(sent)}, stored {len(stored)}")
        # assert
        assert report["unacked"] == 0 and len(sent) >= 700, report["published"]
        assert len(stored) == len(set(stored)), "a message was stored twice"
        assert set(stored) == sent, f"lost {len(sent - set(stored))}, extra {len(set(stored) - sent)}"
        assert store.gaps(fleet_name) == []  # every gap an out-of-order arrival opened got filled
    finally:
        store.close()
        devices.close()
        logs = [w.stop() for w in workers]
    assert "Traceback" not in logs[1], logs[1][-3000:]


def test_a_dead_workers_rollout_is_taken_over_and_completed(
    pg_url: str, mosquitto: Mosquitto, fleet_name: str, tmp_path: Path
) -> None:
    # prepare: a signed bundle, four devices, two workers; the rollout starts on worker a
    from edgefleet.sdk.trust.bundle import pack
    from tests.fleet_support import tiny_bundle

    bundle = tiny_bundle(tmp_path / "b")
    key = tmp_path / "b" / "keys" / "fleet.pub"
    tar = pack(bundle, tmp_path / "bundle.tar")
    devices = Devices(mosquitto.url, fleet_name, 4, key, tmp_path)
    workers = [Worker(n, pg_url, mosquitto.url, fleet_name, tmp_path, key) for n in ("a", "b")]
    store = Store(pg_url)
    try:
        wait_for(lambda: len(store.devices(fleet_name)) == 4, 30, "four devices registered")
        up = httpx.post(f"{workers[0].url}/api/bundles", content=tar.read_bytes(), timeout=60)
        assert up.status_code in (200, 201), up.text
        body = {"bundles": [up.json()["id"]], "to": "all", "strategy": "waves:50,100", "soak_s": 8}
        started = httpx.post(f"{workers[0].url}/api/rollouts", json=body, timeout=60)
        assert started.status_code == 202, started.text
        rid = started.json()["id"]
        assert store.rollout(rid)["owner"] == "a"

        def first_wave_soaking() -> bool:
            row = store.rollout(rid) or {}
            deployed = [d for d in row.get("devices", []) if d["status"] == "deployed"]
            return len(deployed) == 2 and (row.get("settings") or {}).get("soak_until") is not None

        wait_for(first_wave_soaking, 60, "the first wave deployed and soaking")
        # act: worker a dies while the rollout soaks
        workers[0].kill()

        def ended() -> dict[str, Any] | None:
            row = store.rollout(rid)
            return row if row and row["status"] in ("succeeded", "completed", "aborted") else None

        final = wait_for(ended, 90, "the rollout to end on worker b")
        # assert: b took it over and finished it from the stored per-device state
        assert final["status"] == "succeeded", (final["status"], final["reason"])
        assert final["owner"] == "b"
        assert {d["device_id"]: d["status"] for d in final["devices"]} == {
            f"sim-{i:05d}": "deployed" for i in range(4)
        }
        report = devices.ask({"cmd": "report", "wait_s": 5})
        assert all(v == "deployed" for v in report["outcomes"].values()), report["outcomes"]
    finally:
        store.close()
        devices.close()
        logs = [w.stop() for w in workers]
    assert "Traceback" not in logs[1], logs[1][-3000:]
