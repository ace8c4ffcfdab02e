"""`edgefleet serve` as a user runs it: a real process on a port, read-only without a broker, clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import paho.mqtt.publish as publish
import pytest
from conftest import free_port, wait_for_port
from server_data import fill_store

from edgefleet.agent.core.protocol import State, Topics
from edgefleet.sdk.store import Store
from tests.fleet_support import wait_for

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_HOME"] = str(tmp_path / "home")
    return env


def test_serve_answers_on_its_port(tmp_path: Path, fleet_name: str) -> None:
    # prepare
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = Store(db)
    fill_store(store, fleet_name)
    store.close()
    port = free_port()
    proc = subprocess.Popen(
        [
            EDGEFLEET,
            "serve",
            "--port",
            str(port),
            "--db",
            db,
            "--fleet",
            fleet_name,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )
    try:
        # act
        wait_for_port("127.0.0.1", port, timeout=60)
        health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10).json()
        devices = httpx.get(f"http://127.0.0.1:{port}/api/devices", timeout=10).json()
        # assert
        assert health["fleet"] == fleet_name
        assert health["actions"] is False
        assert len(devices) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    text = out.decode()
    assert f"http://127.0.0.1:{port}/" in text
    assert "read-only" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--log-level", "loud"], "unknown --log-level"),
        (["--trusted-key", "/nonexistent/fleet.pub"], "no such key file"),
        (["--trusted-key", __file__], "not a PEM public key"),
        (["--db", "mysql+nothing://x"], "store"),
        (["--host", "::", "--token", "tiny"], "at least 16"),
    ],
)
def test_serve_refuses_bad_options_plainly(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [EDGEFLEET, "serve", "--port", str(free_port()), *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=_env(tmp_path),
    )
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.broker
def test_serve_with_broker_ingests_and_enables_actions(
    tmp_path: Path, mosquitto: object, fleet_name: str
) -> None:
    port = free_port()
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    url = mosquitto.url  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        [EDGEFLEET, "serve", "--port", str(port), "--db", db, "--fleet", fleet_name, "--broker", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10).json()["actions"] is True
        # a device's retained birth message reaches the store through serve's ingest
        birth = State(device="pi-9", seq=1, ts=1.0, online=True, profile="rpi5").to_wire()
        host, mqtt_port = url.removeprefix("mqtt://").split(":")
        publish.single(
            Topics(fleet_name, "pi-9").state,
            birth,
            qos=1,
            retain=True,
            hostname=host,
            port=int(mqtt_port),
        )
        devices = wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/devices", timeout=10).json(),
            30,
            "pi-9 in the store",
        )
        assert devices[0]["device_id"] == "pi-9"
        assert devices[0]["online"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"ingesting from {url}" in out.decode()


def test_serve_with_unreachable_broker_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [EDGEFLEET, "serve", "--port", str(free_port()), "--broker", f"mqtt://127.0.0.1:{free_port()}"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=_env(tmp_path),
    )
    assert proc.returncode == 1
    assert "cannot use the broker" in proc.stderr
    assert "Traceback" not in proc.stderr
