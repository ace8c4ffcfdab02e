"""Every message recorded from the code of 2026-12-03 (tests/data/wire/*.json) parses with today's code.

The set was produced by tests/data/wire/record_wire.py against a real agent and Mosquitto before the
typed contract landed (commit 16f99f5): commands as the host sent them, events, states (birth, offline,
Last Will) and schema-v1 telemetry as the agent built them. Devices and hosts of that age stay in the
field, so this must keep passing: add new recordings, never edit or delete one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.commands import Command, DeployCommand, parse_command
from edgefleet.agent.core.events import (
    DEVICE_ENVELOPE,
    DeviceMessage,
    Result,
    State,
    Telemetry,
    parse_device_message,
)
from edgefleet.agent.core.topics import TopicKind, Topics

HERE = Path(__file__).parent / "data" / "wire"
RECORDED = sorted(p for p in HERE.glob("*.json") if p.name != "fields.json")


def _load(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    assert isinstance(record, dict)
    return record


def _parse(record: dict[str, Any]) -> Command | DeviceMessage:
    payload = record["payload"].encode("utf-8")
    if record["kind"].startswith("cmd"):
        return parse_command(payload)
    return parse_device_message(payload)


def test_the_recorded_set_covers_every_kind() -> None:
    kinds = {_load(p)["kind"] for p in RECORDED}
    expected = {"cmd-deploy", "cmd-deploy-delta", "cmd-rollback", "cmd-eval", "cmd-status", "cmd-config"}
    expected |= {"cmd-infer", "cmd-rotate-root", "state-online", "state-offline", "state-will"}
    expected |= {"telemetry-idle", "telemetry-model", "telemetry-eval", "evt-progress", "evt-missing"}
    expected |= {"evt-deployed", "evt-rejected", "evt-error", "evt-result-status", "evt-result-infer"}
    assert expected <= kinds


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_recorded_message_parses_on_its_topic(path: Path) -> None:
    # prepare
    record = _load(path)
    # act
    message = _parse(record)
    topic = Topics.parse(record["topic"])
    # assert: the topic is one of the contract's and names the kind the message is
    assert topic is not None and topic.device == "dev-1"
    expected_kind = {"cmd": TopicKind.CMD, "evt": TopicKind.EVT, "state": TopicKind.STATE}
    assert topic.kind == expected_kind.get(record["kind"].split("-")[0], TopicKind.TELEMETRY)
    assert json.loads(record["payload"])["type"] == message.TYPE


@pytest.mark.parametrize(
    "path", [p for p in RECORDED if not p.stem.startswith(("telemetry", "state-will"))], ids=lambda p: p.stem
)
def test_recorded_message_round_trips_unchanged(path: Path) -> None:
    # prepare
    record = _load(path)
    original = json.loads(record["payload"])
    # act: parse with today's code and write it again
    again = json.loads(_parse(record).to_wire())
    # assert: the same JSON (commands and events kept their layout: schema v1)
    assert again == original


def test_recorded_deploy_with_delta_is_typed() -> None:
    deploy = _parse(_load(HERE / "cmd-deploy-delta.json"))
    assert isinstance(deploy, DeployCommand)
    with_delta = [f for f in deploy.files if f.delta is not None]
    assert len(with_delta) == 1
    delta = with_delta[0].delta
    assert delta is not None and delta.format == "bsdiff4" and len(delta.base_sha256) == 64
    patch = delta.transfer(with_delta[0])
    assert patch.file == with_delta[0].file + ".bsdiff4" and patch.sha256 == delta.sha256


def test_recorded_states_are_typed() -> None:
    online = _parse(_load(HERE / "state-online.json"))
    offline = _parse(_load(HERE / "state-offline.json"))
    will = _parse(_load(HERE / "state-will.json"))
    assert isinstance(online, State) and online.online and online.profile == "x86-64"
    assert online.tags == ("lab", "cam") and "onnxruntime" in online.runtimes
    assert online.delta_formats == ("bsdiff4",) and online.keepalive_s == 30
    assert isinstance(offline, State) and not offline.online and offline.active is not None
    assert offline.active.name == "tiny"
    assert isinstance(will, State) and not will.online and will.seq == -1
    assert set(online.info) == set(State.KEYS) - {"online"}


def test_recorded_v1_telemetry_reads_into_typed_parts() -> None:
    # act
    model = _parse(_load(HERE / "telemetry-model.json"))
    evaluated = _parse(_load(HERE / "telemetry-eval.json"))
    idle = _parse(_load(HERE / "telemetry-idle.json"))
    # assert: every part the agent sent is there, typed (the CLI's cpu/rss bug lived here)
    assert isinstance(model, Telemetry) and model.model is not None
    assert (model.model.name, model.model.version) == ("tiny", 1)
    assert model.requests.count == 1 and model.requests.feedback == 1
    assert model.latency.p95_ms is not None and model.latency.count == 1
    assert model.system.process_cpu_percent is not None and model.system.rss_bytes
    assert model.system.rss_mb is not None and model.system.rss_mb > 1
    install = model.quality_of("accuracy", "eval")
    live = model.quality_of("accuracy", "feedback")
    assert install is not None and install.value == 1.0 and install.samples == 64
    assert live is not None and live.value == 1.0 and live.samples == 1
    assert isinstance(evaluated, Telemetry) and evaluated.quality_of("accuracy") is not None
    assert isinstance(idle, Telemetry) and idle.model is None and idle.quality == ()
    # the eval report's other details are kept, not dropped
    assert "eval" in model.extra


@pytest.mark.parametrize(
    "path", [p for p in RECORDED if p.stem.startswith("telemetry")], ids=lambda p: p.stem
)
def test_recorded_v1_telemetry_survives_an_upgrade_and_back(path: Path) -> None:
    # prepare
    first = _parse(_load(path))
    assert isinstance(first, Telemetry)
    # act: written as v2, read again; and its flat form read as v1
    again = parse_device_message(first.to_wire())
    flat = Telemetry.from_metrics(first.device, first.seq, first.ts, first.flat_metrics())
    # assert
    assert again == first
    assert json.loads(first.to_wire())["v"] == Telemetry.VERSION
    assert flat.system == first.system and flat.latency == first.latency and flat.requests == first.requests
    assert flat.quality == first.quality and flat.model == first.model


def test_recorded_results_keep_their_data() -> None:
    status = _parse(_load(HERE / "evt-result-status.json"))
    assert isinstance(status, Result) and status.command == "status" and status.data
    assert not set(status.to_obj()) - DEVICE_ENVELOPE - set(Result.KEYS)
