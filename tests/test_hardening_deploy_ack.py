"""Issue 15 point 1: a deploy survives a kill -9 while the agent records it (the command is acked only once durable).

A real Mosquitto and a real agent process. The agent SIGKILLs itself at a test kill point
(`EDGEFLEET_TEST_KILL_AT`): "deploy-received" (the worker took the command, nothing recorded yet) and
"deploy-recording" (deploy.json's temp file written, not yet synced or renamed). The host sends the deploy
once and never again; the agent is restarted without the hook. The deploy must still complete, because
the broker redelivers the unacked command, and the temp file the kill left must be gone after the restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.protocol import Topics
from edgefleet.agent.startup import KILL_POINT_ENV
from edgefleet.sdk.trust.keys import init_keys, load_private_key
from tests.agent_net_support import Observer, agent_args
from tests.chaos_agent_support import Models, check_slots, signed_bundle, wait_until
from tests.fleet_support import Host

pytestmark = [pytest.mark.chaos, pytest.mark.broker]

DEVICE = "dev-ack"
RESULTS = Path(os.environ.get("EDGEFLEET_HARDENING_OUT", "/tmp")) / "edgefleet-hardening-kill.json"


def _start(args: list[str], log: Path, kill_at: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != KILL_POINT_ENV}
    if kill_at:
        env[KILL_POINT_ENV] = kill_at
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def _temp_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.glob(".*.tmp"))


@pytest.mark.parametrize("point", ["deploy-received", "deploy-recording"])
def test_deploy_survives_a_kill_while_it_is_recorded(
    tmp_path: Path, mosquitto: Any, fleet_name: str, point: str
) -> None:
    # prepare: an agent on v0 that will kill itself at `point` when the deploy of v1 arrives
    keys = init_keys(tmp_path / "keys")
    models = Models.make(tmp_path / "models")
    bundle = signed_bundle(tmp_path / "v1", load_private_key(keys.private_path), *models.pick(1), 1)
    state_dir = tmp_path / "agent" / "state"
    state_dir.mkdir(parents=True)
    log = tmp_path / "agent.log"
    args = agent_args(state_dir, mosquitto.url, fleet_name, DEVICE, keys.public_path)
    states = Observer(mosquitto.url, Topics(fleet_name, DEVICE).state)
    host = Host(mosquitto.url, fleet_name, tmp_path / "host", keys.public_path)
    proc = _start(args, log, point)
    outcome: dict[str, Any] = {}
    try:
        states.next(lambda t, p: b'"online":true' in p, timeout=60)
        # act: one rollout (its command is sent once); the agent dies while recording it
        runner = threading.Thread(
            target=lambda: outcome.update(
                result=host.deploy(bundle, DEVICE, timeout_s=45, chunk_size=4096, delta=False)
            ),
            daemon=True,
        )
        runner.start()
        assert proc.wait(30) == -9, log.read_text()[-3000:]
        left = _temp_files(state_dir)
        recorded = (state_dir / "deploy.json").exists()
        proc = _start(args, log, None)  # restart, no hook: as systemd would
        runner.join(60)
        # assert: the rollout completed on the redelivered command; v1 serves, verified; no temp file left
        result = outcome.get("result")
        assert result is not None and result.status == "deployed", (result, log.read_text()[-3000:])
        assert check_slots(state_dir).version == 1
        wait_until(lambda: not _temp_files(state_dir), 10, "temp files to be removed")
        if point == "deploy-recording":
            assert left, "the kill point should leave deploy.json's temp file behind"
        figures = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        figures[point] = {
            "deploy_json_before_kill": recorded,
            "temp_files_left_by_kill": len(left),
            "temp_files_after_restart": len(_temp_files(state_dir)),
            "outcome": result.status,
            "repairs": result.repairs,
        }
        RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True))
        print("kill point", point, json.dumps(figures[point]))
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        host.close()
        states.close()
