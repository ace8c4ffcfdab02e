"""kill -9 of a real agent process at ≥ 30 random points of a deploy (download, verify, install, switch).

Each round deploys version k+1 over k and SIGKILLs the agent once at a seeded random point. Triggers
rotate so the kills spread over every phase: a random delay after the deploy command is sent, after the
agent reports a step (download, health), or after its state folder shows a phase began (deploy.json
written, every chunk on disk, a half-written slot folder, the new slot complete, install.json switched).
Then, with the agent dead, the state folder must hold a verified model: every slot install.json points
at has a manifest signed by the device's root and files matching it, and it is version k or k+1 with
that version's exact model bytes (never a mix). The agent restarts, must report its state and answer an
inference over its local HTTP API with k or k+1, and the rollout must still end with k+1 serving and
the version ledger at k+1 (the agent resumes from its persisted deploy, or the host's re-sent command
starts it again). External kills only here (the agent's one test hook, $EDGEFLEET_TEST_KILL_AT, is
used by tests/test_hardening_deploy_ack.py).

Seed: `EDGEFLEET_CHAOS_SEED` (default: random, printed); kills: `EDGEFLEET_CHAOS_KILLS` (default 32).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.core.fsutil import read_json
from edgefleet.agent.core.protocol import Topics, parse_device_message
from edgefleet.sdk.fleet.transfer import BundleTransfer
from edgefleet.sdk.trust.keys import init_keys, load_private_key
from tests.agent_net_support import Observer
from tests.chaos_agent_support import (
    Models,
    SlotCheck,
    agent_process,
    check_slots,
    infer_over_http,
    sha256_file,
    signed_bundle,
    wait_until,
)
from tests.fleet_support import Host

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.slow]

# A wide model (850 KB) and 800 warm-up runs stretch write, load and health to milliseconds or tens
# of them, and a throttled broadcast stretches the download, so timed kills can land inside each step.
HIDDEN = 16384
WARMUP_RUNS = 800
CHUNK = 32 * 1024
CHUNK_DELAY_S = 0.004
DEVICE = "dev-k"
# How often the state folder is looked at while a file-system trigger is armed.
POLL_S = 0.0005


# ---------------------------------------------------------------------------------------------------
# What the state folder shows: used both to trigger kills and, after a kill, to say where it landed.


def _manifest_version(path: Path) -> int | None:
    try:
        value = json.loads(path.read_bytes()).get("version")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def _slot_with(state_dir: Path, version: int) -> bool:
    """Whether a complete slot (its manifest is written last) holds `version`."""
    return any(_manifest_version(state_dir / "slots" / s / "manifest.json") == version for s in "ab")


def _active_version(state_dir: Path) -> int | None:
    state = read_json(state_dir / "install.json", default={}) or {}
    slot = state.get("active")
    return _manifest_version(state_dir / "slots" / slot / "manifest.json") if slot in ("a", "b") else None


def _writing(state_dir: Path) -> bool:
    """A slot folder is being written (or swapped in): `.a.tmp-…` / `.b.old-…` exist."""
    try:
        return any(re.match(r"^\.[ab]\.(tmp|old)-", n) for n in os.listdir(state_dir / "slots"))
    except FileNotFoundError:
        return False


def _all_staged(state_dir: Path) -> bool:
    """Every file of the pending deploy is on disk: the bitmaps are full (flushed just before hashing)."""
    try:
        folders = [f for f in (state_dir / "staging").iterdir() if f.is_dir()]
    except FileNotFoundError:
        return False
    if not folders:
        return False
    for folder in folders:
        spec = read_json(folder / "spec.json", default=None)
        try:
            bits = (folder / "bitmap").read_bytes()
        except FileNotFoundError:
            return False
        if not isinstance(spec, dict) or sum(bin(b).count("1") for b in bits) != spec.get("chunks"):
            return False
    return True


def disk_state(state_dir: Path, new: int, deploy_id: str) -> str:
    """Where a deploy of `new` stood when the agent died, read from its state folder (ground truth)."""
    pending = (state_dir / "deploy.json").exists()
    outcome = read_json(state_dir / "last_outcome.json", default={}) or {}
    if outcome.get("deploy") == deploy_id:
        return "finishing" if pending else "finished"
    if _active_version(state_dir) == new:
        return "switched"  # install.json names the new slot; the outcome is not stored yet
    if _writing(state_dir):
        return "writing"
    if _slot_with(state_dir, new):
        return "installed"  # the new slot is complete: being loaded, health-checked or switched to
    if pending:
        return "downloaded" if _all_staged(state_dir) else "downloading"
    return "not-started"  # the command was being received or its manifest verified: nothing persisted


# The task's four phases, from the state a kill left behind.
PHASE = {
    "not-started": "verify",
    "downloading": "download",
    "downloaded": "verify",
    "writing": "install",
    "installed": "install",
    "switched": "switch",
    "finishing": "switch",
    "finished": "after",
}


@dataclass(frozen=True)
class Trigger:
    """When to kill: `kind` cmd (after the command is sent), event (after the agent reports `name`)
    or fs (after the state folder shows `name`), plus a random delay of up to `window_s`."""

    kind: str
    name: str
    window_s: float


def fs_condition(name: str, new: int) -> Callable[[Path], bool]:
    """The state-folder test of a file-system trigger."""
    tests: dict[str, Callable[[Path], bool]] = {
        "deploy.json written": lambda d: (d / "deploy.json").exists(),
        "all chunks on disk": _all_staged,
        "slot being written": _writing,
        "new slot complete": lambda d: _slot_with(d, new),
        "install.json switched": lambda d: _active_version(d) == new,
    }
    return tests[name]


@dataclass
class Kill:
    """One kill point and what was found after it."""

    round: int
    old: int
    new: int
    trigger: str
    delay_ms: float
    last_step: str | None = None
    disk: str = ""
    on_disk: int = 0
    ledger: int = 0
    served_after_restart: int | None = None
    error: str | None = None


class Killer:
    """Fires one SIGKILL per round (after an event, a folder change or a command), then restarts the agent."""

    def __init__(
        self, url: str, fleet: str, proc: Any, state_dir: Path, on_killed: Callable[[str | None], None]
    ):
        self.proc = proc
        self.state_dir = state_dir
        self.on_killed = on_killed
        self.lock = threading.Lock()
        self.deploy_id = ""
        self.steps: list[str] = []
        self.stamps: list[tuple[str, float]] = []  # (step, the agent's own timestamp)
        self.armed: tuple[str, float] | None = None  # event trigger: (step, delay)
        self.fired = threading.Event()
        self.done = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"killer-{random.getrandbits(32)}"
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(Topics(fleet, DEVICE).evt, qos=1)
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("the killer could not subscribe to the agent's events")

    def watch(self, deploy_id: str) -> None:
        """Follow `deploy_id`'s events, nothing armed (a calibration deploy)."""
        with self.lock:
            self.deploy_id, self.steps, self.stamps, self.armed = deploy_id, [], [], None
            self.fired.clear()
            self.done.clear()

    def arm_event(self, step: str, delay: float) -> None:
        """Kill `delay` s after the agent reports `step`."""
        with self.lock:
            self.armed = (step, delay)

    def arm_fs(self, condition: Callable[[Path], bool], delay: float) -> None:
        """Kill `delay` s after `condition(state_dir)` holds (polled every POLL_S)."""

        def poll() -> None:
            while not self.fired.is_set():
                with self.lock:
                    if self.armed is None:
                        return
                if condition(self.state_dir):
                    self.fire(delay, inline=True)  # kill from this thread: no thread start-up delay
                    return
                time.sleep(POLL_S)

        with self.lock:
            self.armed = ("", delay)  # no event matches "", it just marks the round armed
        threading.Thread(target=poll, daemon=True).start()

    def fire(self, delay: float, inline: bool = False) -> None:
        """Kill (once) after `delay` s: in this thread when `inline`, else in a thread of its own."""
        with self.lock:
            if self.fired.is_set() or self.armed is None:
                return
            self.fired.set()
        if inline:
            self._kill(delay)
        else:
            threading.Thread(target=self._kill, args=(delay,), daemon=True).start()

    def disarm(self) -> bool:
        """Cancel a kill that did not fire (its moment never came); True when one fired (then wait `done`)."""
        with self.lock:
            self.armed = None
            return self.fired.is_set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            event = parse_device_message(bytes(message.payload))
        except Exception:
            return
        if getattr(event, "deploy", None) != self.deploy_id:
            return
        step = getattr(event, "step", None) or event.TYPE
        with self.lock:
            self.steps.append(step)
            self.stamps.append((step, event.ts))
            armed = self.armed
        if armed is not None and step == armed[0]:
            self.fire(armed[1])

    def _kill(self, delay: float) -> None:
        time.sleep(delay)
        self.proc.kill9()
        with self.lock:
            last = self.steps[-1] if self.steps else None
        try:
            self.on_killed(last)
        finally:
            self.done.set()

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def step_durations(stamps: list[tuple[str, float]]) -> dict[str, float]:
    """How long each step lasted (until the next was reported), from the agent's own timestamps, in s."""
    return {step: after - ts for (step, ts), (_, after) in zip(stamps, stamps[1:])}


def test_kill9_at_random_points_always_restarts_on_a_verified_model(
    tmp_path: Path, mosquitto, fleet_name: str
) -> None:  # type: ignore[no-untyped-def]
    # prepare: one broker, one agent process, a signed bundle per version (alternating two models)
    seed = int(os.environ.get("EDGEFLEET_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    wanted = int(os.environ.get("EDGEFLEET_CHAOS_KILLS") or 32)
    print(f"\nchaos seed {seed} (rerun with EDGEFLEET_CHAOS_SEED={seed}), {wanted} kills")
    rng = random.Random(seed)
    keys = init_keys(tmp_path / "keys")
    private = load_private_key(keys.private_path)
    models = Models.make(tmp_path / "models", hidden=HIDDEN)
    model_sha = {v: sha256_file(models.pick(v)[0]) for v in (0, 1)}
    health = {"min_accuracy": 0.9, "max_p95_ms": 1000.0, "warmup_runs": WARMUP_RUNS, "timeout_s": 60}

    def bundle(version: int) -> Path:
        # Made when needed and deleted after use: 850 KB × dozens of versions add up.
        return signed_bundle(tmp_path / f"v{version}", private, *models.pick(version), version, health=health)

    def throttle(sha: str, index: int, data: bytes) -> bytes:
        time.sleep(CHUNK_DELAY_S)
        return data

    url = mosquitto.url
    proc = agent_process(tmp_path / "agent", url, fleet_name, DEVICE, keys.public_path)
    state_dir = tmp_path / "agent" / "state"
    cmd_topic = Topics(fleet_name, DEVICE).cmd
    states = Observer(url, Topics(fleet_name, DEVICE).state)
    kills: list[Kill] = []
    current: dict[str, Any] = {}

    def on_killed(last_step: str | None) -> None:
        """Runs right after the SIGKILL: forensics on the dead agent's folder, restart, serve check."""
        kill: Kill = current["kill"]
        kill.last_step = last_step
        try:
            found: SlotCheck = check_slots(state_dir)  # raises if a referenced slot does not verify
            assert found.version in (kill.old, kill.new), (
                f"v{found.version} on disk, not {kill.old}/{kill.new}"
            )
            assert found.model_sha256 == model_sha[found.version % 2], "manifest and model bytes disagree"
            kill.disk = disk_state(state_dir, kill.new, current["deploy_id"])
            kill.on_disk = found.version
            kill.ledger = int(read_json(state_dir / "versions.json")["tiny"])
            killed_at = time.time()
            proc.start()
            _, state, _ = states.next(
                lambda t, p: b'"online":true' in p and json.loads(p).get("started", 0) > killed_at, timeout=60
            )
            served = state.info["active"]["version"]  # type: ignore[attr-defined]
            answer = infer_over_http(int(state.info["http_port"]))  # type: ignore[attr-defined]
            assert len(answer["outputs"]["logits"]) == 3
            kill.served_after_restart = int(answer["version"])
            assert served in (kill.old, kill.new) and kill.served_after_restart in (kill.old, kill.new)
            # The command may have died with the process: send it again, as a host does.
            states.publish(cmd_topic, current["command"])
        except Exception as exc:  # recorded here, asserted by the test thread
            kill.error = f"{type(exc).__name__}: {exc}"

    proc.start()
    killer = Killer(url, fleet_name, proc, state_dir, on_killed)
    # The fleet's own sender; whole files (no delta), so the command the killer's restart re-sends is
    # byte for byte the one the rollout sent.
    host = Host(url, fleet_name, tmp_path / "host", keys.public_path)
    started = time.monotonic()
    durations: dict[str, float] = {}
    try:
        states.next(lambda t, p: b'"online":true' in p, timeout=60)
        # calibration: two deploys without kills measure how long the long steps last on this machine
        for version in (1, 2):
            killer.watch(f"calibrate-{version}")
            done = host.deploy(
                bundle(version),
                DEVICE,
                rollout_id=f"calibrate-{version}",
                chunk_size=CHUNK,
                chunk_filter=throttle,
                delta=False,
            )
            assert done.status == "deployed", (done, proc.log()[-3000:])
            wait_until(
                lambda: any(s == "deployed" for s, _ in killer.stamps), 10, "the killer's copy of the events"
            )
            for step, seconds in step_durations(killer.stamps).items():
                durations[step] = max(durations.get(step, 0.0), seconds)
        print("step durations (ms)", {k: round(v * 1000, 1) for k, v in durations.items()})
        triggers = [
            # The command's manifest check and the final whole-file hash take a few ms: short windows.
            Trigger("cmd", "deploy command sent", 0.004),
            Trigger("fs", "deploy.json written", 0.004),
            Trigger("event", "download", max(0.01, durations.get("download", 0.0))),
            Trigger("fs", "all chunks on disk", 0.002),
            Trigger("fs", "slot being written", 0.004),
            Trigger("fs", "new slot complete", max(0.005, durations.get("load", 0.0))),
            Trigger("event", "health", max(0.01, durations.get("health", 0.0))),
            Trigger("fs", "install.json switched", 0.004),
        ]
        rounds = 0
        while len(kills) < wanted and rounds < wanted + 16:
            rounds += 1
            old, new = version, version + 1
            trigger = triggers[rounds % len(triggers)]
            delay = rng.uniform(0, trigger.window_s)
            kill = Kill(rounds, old, new, f"{trigger.kind}: {trigger.name}", round(delay * 1000, 1))
            deploy_id = f"chaos-{rounds}"
            path = bundle(new)
            command = BundleTransfer(path, CHUNK).deploy_command(deploy_id, DEVICE).to_wire()
            current.update(kill=kill, deploy_id=deploy_id, command=command)
            killer.watch(deploy_id)
            # act: deploy; the killer strikes somewhere inside
            if trigger.kind == "event":
                killer.arm_event(trigger.name, delay)
            elif trigger.kind == "fs":
                killer.arm_fs(fs_condition(trigger.name, new), delay)
            else:
                killer.arm_event("", delay)
                states.publish(cmd_topic, current["command"])
                killer.fire(delay, inline=True)
            # (for a cmd trigger this re-sends the command: a repeat the agent must take in its stride)
            # (a device that lost the command with its process gets it again from the kill handler)
            outcome = host.deploy(
                path,
                DEVICE,
                rollout_id=deploy_id,
                timeout_s=120,
                chunk_size=CHUNK,
                chunk_filter=throttle,
                delta=False,
            )
            if killer.disarm():
                assert killer.done.wait(90), "the kill/restart did not finish"
                kills.append(kill)
                assert kill.error is None, (kill, proc.log()[-3000:])
            # assert: the rollout completed; the new version serves, verified, the ledger in step
            assert outcome.status == "deployed", (kill, outcome, proc.log()[-3000:])
            found = check_slots(state_dir)
            assert (found.version, found.model_sha256) == (new, model_sha[new % 2]), kill
            assert read_json(state_dir / "versions.json")["tiny"] == new, kill
            # nothing of the finished download stays behind in staging
            try:
                wait_until(lambda: not any((state_dir / "staging").iterdir()), 10, "staging to be cleaned")
            except TimeoutError:
                pytest.fail(f"staging left behind after {kill}: {os.listdir(state_dir / 'staging')}")
            shutil.rmtree(path)
            version = new
        elapsed = time.monotonic() - started
        # after the last round the agent still serves the newest version over HTTP
        assert infer_over_http(read_json(state_dir / "http.port")["port"])["version"] == version
    finally:
        if killer.disarm():  # a kill in flight would start a new agent after ours is stopped
            killer.done.wait(90)
        killer.close()
        states.close()
        host.close()
        proc.stop()
    summary = {
        "seed": seed,
        "kills": len(kills),
        "rounds": rounds,
        "wall_s": round(elapsed, 1),
        "by_disk_state": dict(Counter(k.disk for k in kills)),
        "by_phase": dict(Counter(PHASE[k.disk] for k in kills)),
        "restarted_on_old": sum(1 for k in kills if k.served_after_restart == k.old),
        "restarted_on_new": sum(1 for k in kills if k.served_after_restart == k.new),
        # killed between the switch and the ledger write: recovery must catch the ledger up
        "ledger_behind_after_kill": sum(1 for k in kills if k.ledger < k.on_disk),
    }
    print("chaos summary", json.dumps(summary, sort_keys=True))
    for k in kills:
        print(
            f"  round {k.round:2d} v{k.old}->v{k.new} {k.trigger:28s} +{k.delay_ms:6.1f} ms  "
            f"last event {k.last_step!s:15s} disk {k.disk:12s} served v{k.served_after_restart}"
        )
    # assert: enough kills, spread over the phases of a deploy
    assert len(kills) >= 30, summary
    assert {"download", "verify", "install", "switch"} <= set(summary["by_phase"]), summary  # type: ignore[call-overload]
