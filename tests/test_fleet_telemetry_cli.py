"""`edgefleet telemetry DEVICE` against a real agent process, Mosquitto and ingest: it shows the agent's real
CPU share and resident memory (it used to print `cpu -%, rss - MB` after reading keys the agent never sent)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.trust.keys import init_keys
from tests.fleet_support import agents, wait_for

pytestmark = pytest.mark.broker

SYSTEM_LINE = re.compile(r"cpu\s+(?P<cpu>[\d.]+)%,\s+rss\s+(?P<rss>[\d.]+)\s+MB")


def test_telemetry_command_shows_the_agents_cpu_and_rss(tmp_path: Path, mosquitto, fleet_name: str) -> None:  # type: ignore[no-untyped-def]
    # prepare: one agent process reporting every 0.5 s, and the host ingesting into a store
    keys = init_keys(tmp_path / "keys")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    fleet = Fleet(mosquitto.url, store=db, fleet=fleet_name, trusted_keys=[])
    fleet.start_ingest()
    try:
        with agents(tmp_path, mosquitto.url, fleet_name, keys.public_path, ["cam-1"]) as procs:

            def measured() -> bool:
                report = fleet.latest_report("cam-1")
                return report is not None and report.system.process_cpu_percent is not None

            wait_for(measured, 30, "a telemetry window with the agent's CPU share in the store")
            pid = procs["cam-1"].proc.pid  # type: ignore[union-attr]
            agent_rss_mb = psutil.Process(pid).memory_info().rss / 2**20
        # the agent is stopped: let ingest write its last windows, so the latest row stays put
        time.sleep(1.0)
    finally:
        fleet.close()
    reader = Fleet(None, store=db, fleet=fleet_name, trusted_keys=[])
    try:
        latest = reader.latest_report("cam-1")
    finally:
        reader.close()
    assert latest is not None and latest.system.rss_bytes is not None
    # act
    out = CliRunner().invoke(
        app, ["telemetry", "cam-1", "--db", db, "--fleet", fleet_name], env={"COLUMNS": "200"}
    )
    # assert: the numbers the agent measured, not dashes; RSS close to what the OS said of the process
    assert out.exit_code == 0, out.output
    found = SYSTEM_LINE.search(out.output)
    assert found is not None, out.output
    cpu, rss = float(found["cpu"]), float(found["rss"])
    assert cpu == pytest.approx(latest.system.process_cpu_percent, abs=0.05)
    assert 0.0 <= cpu <= 100.0 * (os.cpu_count() or 1)
    assert rss == pytest.approx(latest.system.rss_bytes / 2**20, abs=0.05)
    assert 5.0 < rss < 2048.0 and abs(rss - agent_rss_mb) < 0.5 * agent_rss_mb, (rss, agent_rss_mb)
