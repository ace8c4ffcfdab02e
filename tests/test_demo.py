"""`edgefleet demo`: the whole loop end to end as a user runs it, its building blocks, and ProcessGroup."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.sdk.demo import (
    MARKER,
    BadOutcome,
    DemoError,
    DemoOptions,
    mislabeled_copy,
    parse_devices,
    prepare_state_dir,
    restamp,
    run_demo,
)
from edgefleet.sdk.demo.procs import ProcessGroup
from tests.fleet_support import wait_for

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


# ---- building blocks (fast) -----------------------------------------------------------------------


def test_parse_devices_names_each_device_after_its_profile() -> None:
    assert parse_devices("rpi4b:2,rpi5:1,jetson-orin-nano:1") == [
        ("rpi4b-1", "rpi4b"),
        ("rpi4b-2", "rpi4b"),
        ("rpi5-1", "rpi5"),
        ("jetson-orin-nano-1", "jetson-orin-nano"),
    ]
    # a profile named twice continues its numbering; a missing count means one
    assert parse_devices("rpi5, rpi5:2") == [("rpi5-1", "rpi5"), ("rpi5-2", "rpi5"), ("rpi5-3", "rpi5")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rpi9:1", "unknown profile 'rpi9'"),
        ("host:1", "unknown profile 'host'"),
        ("rpi4b:two", "must be a whole number"),
        ("rpi4b:0", "between 1 and 16"),
        ("rpi4b:9,rpi5:9", "at most 16"),
        (" , ", "names no device"),
    ],
)
def test_parse_devices_refuses_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DemoError) as err:
        parse_devices(spec)
    assert message in err.value.reason
    assert err.value.code == "bad-devices"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DemoOptions(min_accuracy=1.5), "--min-accuracy"),
        (DemoOptions(epochs=0), "--epochs"),
        (DemoOptions(backend="hivemq"), "--backend"),
        (DemoOptions(port=70000), "--port"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(
    options: DemoOptions, message: str, tmp_path: Path
) -> None:
    with pytest.raises(DemoError) as err:
        run_demo(DemoOptions(**{**options.__dict__, "state_dir": tmp_path / "never"}))
    assert message in err.value.reason
    assert not (tmp_path / "never").exists()


def test_cli_refuses_unknown_device_profile_with_exit_2() -> None:
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app

    result = CliRunner().invoke(app, ["demo", "--devices", "rpi9:1"])
    assert result.exit_code == 2
    assert "unknown profile 'rpi9'" in result.output


def test_state_dir_must_be_new_empty_or_an_earlier_demos(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError) as err:
        prepare_state_dir(foreign)
    assert "not empty" in err.value.reason
    assert (foreign / "thesis.tex").read_text() == "precious"
    earlier = tmp_path / "earlier"
    (earlier / "logs").mkdir(parents=True)
    (earlier / MARKER).write_text("x")
    (earlier / "fleet.db").write_text("old")
    path, temp = prepare_state_dir(earlier)
    assert path == earlier.resolve() and not temp
    assert list(earlier.iterdir()) == []
    path, temp = prepare_state_dir(None)
    try:
        assert temp and path.is_dir()
    finally:
        shutil.rmtree(path)


def test_mislabeled_copy_rotates_exactly_the_chosen_classes() -> None:
    import torch

    from edgefleet.sdk.zoo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    bad = mislabeled_copy(model, classes=(3, 5, 8))
    x = torch.from_numpy(np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    with torch.no_grad():
        good_out, bad_out = model(x), bad(x)
    order = list(range(10))
    order[3], order[5], order[8] = 5, 8, 3
    assert torch.allclose(bad_out, good_out[:, order])
    # the original is untouched
    with torch.no_grad():
        assert torch.equal(model(x), good_out)


def test_restamp_gives_one_version_and_a_valid_signature(tmp_path: Path) -> None:
    from edgefleet.sdk.trust.bundle import inspect_bundle
    from edgefleet.sdk.trust.keys import init_keys, load_private_key
    from tests.agent_net_support import eval_set, export_tiny_onnx, make_bundle

    keys = init_keys(tmp_path / "keys")
    model = export_tiny_onnx(tmp_path / "m.onnx")
    bundle = make_bundle(
        tmp_path / "b", tmp_path / "keys", model, eval_set(model, tmp_path / "e.npz"), version=7
    )
    before = json.loads((bundle / "manifest.json").read_text())
    restamp(bundle, 20261128120000, load_private_key(keys.private_path))
    info = inspect_bundle(bundle, [keys.public_path])
    assert info["verified"] is True, info
    after = json.loads((bundle / "manifest.json").read_text())
    assert after["version"] == 20261128120000
    assert {k: v for k, v in after.items() if k != "version"} == {
        k: v for k, v in before.items() if k != "version"
    }


# ---- ProcessGroup ---------------------------------------------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)",
]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_process_group_stops_every_child_and_keeps_their_logs(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    with group:
        a = group.start("a", SLEEPER)
        b = group.start("b", SLEEPER)
        wait_for(lambda: "up" in a.tail() and "up" in b.tail(), 30, "both children up")
        group.check()
        pids = group.pids()
        assert sorted(pids) == sorted([a.proc.pid, b.proc.pid])
        # each child leads its own session, so a terminal's Ctrl-C reaches only the owner
        assert all(os.getsid(pid) == pid for pid in pids)
    assert all(_gone(pid) for pid in pids)
    assert group.children == []
    assert (tmp_path / "logs" / "a.log").read_text().strip() == "up"


def test_process_group_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    child = group.start("stubborn", STUBBORN)
    wait_for(lambda: "up" in child.tail(), 30, "child up")
    started = time.monotonic()
    group.stop_all(timeout=1.0)
    assert child.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 30
    assert _gone(child.proc.pid)


def test_process_group_check_names_the_child_that_died_with_its_log(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    try:
        group.start("ok", SLEEPER)
        dead = group.start("dead", [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"])
        dead.proc.wait(30)
        with pytest.raises(RuntimeError) as err:
            group.check()
        assert "dead exited with code 3" in str(err.value)
        assert "boom: bad config" in str(err.value)
    finally:
        group.stop_all()


def test_process_group_start_failure_names_the_command(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    with pytest.raises(RuntimeError) as err:
        group.start("ghost", [str(tmp_path / "no-such-binary")])
    assert "cannot start ghost" in str(err.value)
    assert group.children == []


# ---- the demo, end to end (a subprocess, as a user runs it) --------------------------------------


def _children_of(pid: int) -> set[int]:
    """Every live descendant of `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name in parentheses may hold spaces; the fields after it are fixed
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier and p not in out}
        out |= frontier
    return out


@pytest.fixture
def demo_proc() -> Iterator[list[subprocess.Popen[str]]]:
    """Demo processes started by a test; whatever is left is killed with its descendants at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kids = _children_of(proc.pid)
            proc.kill()
            proc.wait(30)
            for kid in kids:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _run_demo(
    args: list[str], demo_proc: list[Any], env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [EDGEFLEET, "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    demo_proc.append(proc)
    out, err = proc.communicate(timeout=280)
    return proc.returncode, out, err


def _no_process_mentions(text: str) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return False
            except OSError:
                continue
    return True


@pytest.mark.slow
@pytest.mark.broker
def test_demo_with_bad_model_deploys_then_aborts_and_rolls_back(tmp_path: Path, demo_proc: list[Any]) -> None:
    from edgefleet.sdk.store import Store

    state = tmp_path / "state"
    rc, out, err = _run_demo(["--bad-model", "--state-dir", str(state), "--port", "0", "--json"], demo_proc)
    assert rc == 0, err[-4000:]
    result = json.loads(out)
    assert result["ok"] is True and result["problems"] == []
    # the output shows the steps, the rollout, the table and the dashboard URL
    for text in (
        "train the digits CNN",
        "build for rpi4b",
        "succeeded on 4 devices",
        "what each device measured",
    ):
        assert text in err
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", err)
    assert "aborted" in err and "rolled-back" in err and "not-notified" in err
    # the store holds what the output claimed
    version = result["version"]
    store = Store(f"sqlite:///{state / 'fleet.db'}")
    try:
        devices = {d["device_id"]: d for d in store.devices("demo")}
        assert set(devices) == {"rpi4b-1", "rpi4b-2", "rpi5-1", "jetson-orin-nano-1"}
        assert {d["active_version"] for d in devices.values()} == {version}
        rollouts = {r["id"]: r for r in store.rollouts("demo")}
        good = store.rollout(result["rollout_id"])
        assert good is not None and good["status"] == "succeeded"
        assert {d["status"] for d in good["devices"]} == {"deployed"}
        bad = BadOutcome(**result["bad"])
        assert set(rollouts) == {result["rollout_id"], bad.rollout_id}
        bad_row = store.rollout(bad.rollout_id)
        assert bad_row is not None and bad_row["status"] == "aborted"
        assert "accuracy" in (bad_row["reason"] or "")
        statuses = {d["device_id"]: d["status"] for d in bad_row["devices"]}
        assert len(bad.canary) == 1
        assert statuses == {d: ("rolled-back" if d in bad.canary else "not-notified") for d in devices}
        # every number in the table came from telemetry the devices sent
        for row in result["devices"]:
            assert row["version"] == version
            assert row["requests"] > 0 and row["p95_ms"] is not None
            assert row["live_accuracy"] is not None and row["eval_accuracy"] is not None
            assert store.telemetry_count("demo", row["device_id"]) >= row["windows"] > 0
        # the canary really served the bad model before it was rolled back, and measured it below the floor
        assert bad.canary_requests > 0
        assert bad.canary_live_accuracy is not None and bad.canary_live_accuracy < 0.9
        assert bad.running_after == {d: version for d in devices}
    finally:
        store.close()
    assert _no_process_mentions(str(state))


@pytest.mark.slow
@pytest.mark.broker
def test_demo_keep_serves_the_dashboard_until_ctrl_c_then_stops_every_child(
    tmp_path: Path, demo_proc: list[Any]
) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [EDGEFLEET, "demo", "--keep", "--state-dir", str(state), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    demo_proc.append(proc)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    url = None
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"dashboard \((http://127\.0\.0\.1:\d+/)\)", line)
        if "press Ctrl-C" in line and match:
            url = match.group(1)
            break
        assert time.monotonic() < deadline, "".join(lines[-40:])
    assert url is not None, "".join(lines[-40:])
    with urllib.request.urlopen(f"{url}api/devices", timeout=10) as resp:
        devices = json.loads(resp.read())
    assert len(devices) == 4 and all(d["online"] for d in devices)
    assert len({d["active_version"] for d in devices}) == 1
    with urllib.request.urlopen(f"{url}api/rollouts", timeout=10) as resp:
        assert json.loads(resp.read())[0]["status"] == "succeeded"
    children = _children_of(proc.pid)
    # mosquitto and four agents at least
    assert len(children) >= 5, children
    # Ctrl-C in a terminal: SIGINT to the foreground process group (the demo's own)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest[-3000:]
    assert "stopping everything" in rest
    wait_for(lambda: all(_gone(pid) for pid in children), 30, "every child of the demo gone")
    assert _no_process_mentions(str(state))


@pytest.mark.slow
def test_demo_runs_on_amqtt_when_mosquitto_is_not_installed(tmp_path: Path, demo_proc: list[Any]) -> None:
    pytest.importorskip("amqtt")
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "mosquitto").exists()
    )
    assert shutil.which("mosquitto", path=path) is None
    state = tmp_path / "state"
    rc, out, err = _run_demo(
        ["--state-dir", str(state), "--port", "0", "--devices", "rpi4b:1,rpi5:1", "--json"],
        demo_proc,
        env={**os.environ, "PATH": path},
    )
    assert rc == 0, err[-4000:]
    result = json.loads(out)
    assert result["broker_backend"] == "amqtt"
    assert "amqtt on mqtt://" in err and "pure-Python fallback" in err
    assert result["rollout_status"] == "succeeded"
    assert [r["device_id"] for r in result["devices"]] == ["rpi4b-1", "rpi5-1"]
    assert all(r["version"] == result["version"] and r["requests"] > 0 for r in result["devices"])
    assert _no_process_mentions(str(state))


def test_mqtt_options_take_3_1_1_for_brokers_without_mqtt_5() -> None:
    from edgefleet.sdk.fleet.errors import BrokerUnavailable
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions

    assert MqttOptions("mqtt://127.0.0.1:1883", mqtt_version="3.1.1").mqtt_version == "3.1.1"
    with pytest.raises(BrokerUnavailable, match="use 5 or 3.1.1"):
        MqttOptions("mqtt://127.0.0.1:1883", mqtt_version="4")


@pytest.mark.slow
@pytest.mark.broker
def test_demo_sigterm_mid_run_stops_every_child(tmp_path: Path, demo_proc: list[Any]) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [EDGEFLEET, "demo", "--state-dir", str(state), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    demo_proc.append(proc)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "emulated devices" in line:
            break

    def five_children() -> set[int] | None:
        # the broker and four agents, up while the model trains
        kids = _children_of(proc.pid)
        return kids if len(kids) >= 5 else None

    children: set[int] = wait_for(five_children, 60, "the broker and four agents running")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: stopping everything" in rest
    wait_for(lambda: all(_gone(pid) for pid in children), 30, "every child of the demo gone")
    assert _no_process_mentions(str(state))
