"""The load bench at CI size: `bench/load.py --quick` end to end (simulated agents → Mosquitto → serve)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.broker
def test_load_quick_stores_every_message_and_completes_the_rollout(tmp_path: Path) -> None:
    """50 devices × 2 msg/s, a rollout to all 50 under telemetry, 100 devices × 0.1 msg/s: nothing lost."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not on PATH: install the Debian package 'mosquitto'")
    out = tmp_path / "load.json"
    # Its own process group: on a timeout the bench, serve, the agents and the broker all go.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"bench/load.py --quick ran past 240 s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    finally:
        if proc.poll() is None:  # interrupted: leave nothing of the bench behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    result = json.loads(out.read_text())
    assert result["ok"] and result["failures"] == []

    telemetry = result["telemetry"]
    # 50 devices × 2 msg/s × 10 s, every one acknowledged by the broker and stored once.
    assert telemetry["phase_sent"] == 50 * 2 * 10
    assert telemetry["sent"] == telemetry["stored"] == telemetry["rows"]
    assert telemetry["sent_equals_stored"] and telemetry["duplicates"] == 0 and telemetry["gaps"] == 0
    assert telemetry["lag"]["count"] == telemetry["phase_sent"]
    assert telemetry["lag"]["p99_ms"] is not None and telemetry["lag"]["p99_ms"] >= telemetry["lag"]["p50_ms"]

    rollout = result["rollout"]
    assert rollout["status"] == "succeeded"
    assert rollout["deployed_in_store"] == rollout["verified_by_devices"] == 50
    # Every byte of the bundle was broadcast (the devices checked the sha256 of what they assembled).
    assert rollout["transfer_stats"]["broadcast_bytes"] >= rollout["bundle_bytes"]
    assert rollout["phase_sent"] > 0 and rollout["sent_equals_stored"]

    scale = result["scale"]
    assert scale["devices"] == 100
    assert scale["phase_sent"] == 100  # 0.1 msg/s for 10 s: one message per device
    assert scale["sent_equals_stored"] and scale["duplicates"] == 0 and scale["gaps"] == 0
