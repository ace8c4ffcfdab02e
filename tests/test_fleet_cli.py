"""The fleet commands on a store with known content: JSON output, tables, and refusals without tracebacks."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.store import Store

runner = CliRunner()


def _store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = Store(url)
    store.upsert_device(
        "f", "cam-1", online=True, profile="rpi4b", tags=["lab"], active_model="m", active_version=1
    )
    store.upsert_device("f", "cam-1", desired_model="m", desired_version=2)
    now = time.time()
    store.add_telemetry(
        "f",
        [
            {
                "device_id": "cam-1",
                "ts": now - 5,
                "seq": 1,
                "model_name": "m",
                "model_version": 1,
                "count": 10,
                "p95_ms": 2.0,
            },
            {
                "device_id": "cam-1",
                "ts": now,
                "seq": 3,
                "model_name": "m",
                "model_version": 2,
                "count": 30,
                "p95_ms": 1.0,
            },
        ],
    )
    store.create_rollout(
        "r-1",
        fleet="f",
        selector="all",
        strategy="canary:10",
        settings={"wave": 0, "waves": 2},
        targets=[("cam-1", None, 0)],
    )
    store.set_rollout_status("r-1", "aborted", "p95 too high")
    store.close()
    return url


def test_devices_rollouts_and_telemetry_as_json(tmp_path: Path) -> None:
    db = _store(tmp_path)
    out = runner.invoke(app, ["devices", "--db", db, "--fleet", "f", "--no-refresh", "--json"])
    assert out.exit_code == 0, out.output
    [dev] = json.loads(out.output)
    assert (dev["device_id"], dev["differs"], dev["last_telemetry"]["p95_ms"]) == ("cam-1", True, 1.0)
    out = runner.invoke(app, ["rollouts", "--db", db, "--fleet", "f", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)[0]["reason"] == "p95 too high"
    out = runner.invoke(app, ["telemetry", "cam-1", "--db", db, "--fleet", "f", "--json", "--bucket", "3600"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert sorted(data["series"]) == ["m v1", "m v2"]
    assert [(g["first_missing"], g["last_missing"]) for g in data["gaps"]] == [(2, 2)]


def test_tables_render(tmp_path: Path) -> None:
    db = _store(tmp_path)
    for args in (["devices", "--no-refresh"], ["rollouts"], ["telemetry", "cam-1"], ["rollout", "r-1"]):
        out = runner.invoke(app, [*args, "--db", db, "--fleet", "f"])
        assert out.exit_code == 0, out.output
        assert "cam-1" in out.output or "r-1" in out.output


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    db = _store(tmp_path)
    out = runner.invoke(app, ["telemetry", "cam-9", "--db", db, "--fleet", "f"])
    assert out.exit_code == 2 and "unknown device 'cam-9'" in out.output and "cam-1" in out.output
    out = runner.invoke(app, ["rollout", "r-9", "--db", db, "--fleet", "f"])
    assert out.exit_code == 2 and "no rollout 'r-9'" in out.output
    out = runner.invoke(app, ["rollout", "r-1", "--abort", "--db", db, "--fleet", "f"])
    assert out.exit_code == 2 and "already ended (aborted)" in out.output
    out = runner.invoke(app, ["deploy", str(tmp_path), "--to", "all", "--strategy", "fast", "--db", db])
    assert out.exit_code == 2 and "unknown strategy 'fast'" in out.output and "nothing was sent" in out.output
    out = runner.invoke(app, ["devices", "--db", db, "--broker", "http://x"])
    assert out.exit_code == 2 and "mqtt://HOST:PORT" in out.output
    assert not any(r.exception and not isinstance(r.exception, SystemExit) for r in [out])
