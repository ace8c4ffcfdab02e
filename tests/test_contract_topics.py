"""Topics: every topic the contract uses is built and parsed by one class; codes and defaults are one each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgefleet.agent.core.codes import (
    FAILED_DEVICE,
    FINISHED_DEVICE,
    IN_FLIGHT,
    DeviceStatus,
    InstallStep,
    QualityMetric,
    RolloutStatus,
)
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.paths import DEFAULT_BROKER, agent_state_dir, edgefleet_home
from edgefleet.agent.core.quality import METRIC_NAMES
from edgefleet.agent.core.topics import TopicKind, TopicParts, Topics

SHA = hashlib.sha256(b"x").hexdigest()


def test_every_built_topic_parses_back_to_what_built_it() -> None:
    # prepare
    t = Topics("fleet-1", "cam.7")
    built = {
        t.state: TopicParts("fleet-1", TopicKind.STATE, "cam.7"),
        t.evt: TopicParts("fleet-1", TopicKind.EVT, "cam.7"),
        t.telemetry: TopicParts("fleet-1", TopicKind.TELEMETRY, "cam.7"),
        t.cmd: TopicParts("fleet-1", TopicKind.CMD, "cam.7"),
        t.repair(SHA, 12): TopicParts("fleet-1", TopicKind.CHUNK, "cam.7", SHA, 12),
        t.artifact(SHA, 3): TopicParts("fleet-1", TopicKind.ARTIFACT, None, SHA, 3),
        Topics.broadcast("fleet-1", SHA, 3): TopicParts("fleet-1", TopicKind.ARTIFACT, None, SHA, 3),
        Topics.host_sync("fleet-1", "n0nce"): TopicParts("fleet-1", TopicKind.HOST_SYNC, nonce="n0nce"),
    }
    # act / assert
    for topic, expected in built.items():
        assert Topics.parse(topic) == expected, topic
        assert Topics.device_of(topic) == expected.device
        assert Topics.kind_of(topic) == expected.kind


def test_fleet_wide_filters() -> None:
    assert Topics.devices("f", "state") == "edgefleet/v1/f/dev/+/state"
    assert Topics.devices("f") == "edgefleet/v1/f/dev/+/#"
    assert Topics.fleet_filter("f") == "edgefleet/v1/f/#"
    assert Topics.broadcast_filter("f") == "edgefleet/v1/f/artifact/#"
    assert Topics.host_filter("f") == "edgefleet/v1/f/host/#"
    assert Topics("f", "d").all == "edgefleet/v1/f/dev/d/#"
    with pytest.raises(ValueError, match="topic kind 'chunks'"):
        Topics.devices("f", "chunks")
    # any device, for subscriptions (+) and Mosquitto ACL patterns (%u)
    assert Topics.pattern("f", "+").cmd == "edgefleet/v1/f/dev/+/cmd"
    assert Topics.pattern("f", "%u").repair_filter == "edgefleet/v1/f/dev/%u/chunk/#"
    with pytest.raises(ValueError, match=r"must be '\+' or '%u'"):
        Topics.pattern("f", "#")


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v2/f/dev/d/state",  # another protocol version
        "other/v1/f/dev/d/state",
        "edgefleet/v1/f/dev/d/state/extra",
        "edgefleet/v1/f/dev/d/unknown",
        "edgefleet/v1/f/dev/../state",
        f"edgefleet/v1/f/artifact/{SHA}",
        f"edgefleet/v1/f/artifact/{SHA[:40]}/1",
        f"edgefleet/v1/f/dev/d/chunk/{SHA}/x",
        "edgefleet/v1/f/host/sync",
        "edgefleet/v1",
    ],
)
def test_foreign_or_malformed_topics_parse_to_none(topic: str) -> None:
    assert Topics.parse(topic) is None
    assert Topics.device_of(topic) is None


def test_names_unusable_in_a_topic_are_refused_with_the_fix() -> None:
    with pytest.raises(ProtocolError, match="letters, digits"):
        Topics("a/b", "d")
    with pytest.raises(ProtocolError, match="device id"):
        Topics("f", "+")
    with pytest.raises(ProtocolError):
        Topics.fleet_prefix("#")


def test_state_enums_are_their_strings() -> None:
    # a member equals, formats and JSON-encodes as the plain string stored before the enums
    assert DeviceStatus.TIMED_OUT == "timed-out" and f"{DeviceStatus.TIMED_OUT}" == "timed-out"
    assert str(RolloutStatus.SUCCEEDED) == "succeeded"
    assert json.dumps({"s": InstallStep.VERIFY_MANIFEST}) == '{"s": "verify-manifest"}'
    assert DeviceStatus("rolled-back") is DeviceStatus.ROLLED_BACK
    assert set(DeviceStatus) >= IN_FLIGHT and FAILED_DEVICE <= FINISHED_DEVICE
    assert "failed" not in {s.value for s in DeviceStatus}  # a status nothing sets is not defined
    assert tuple(m.value for m in QualityMetric) == METRIC_NAMES


def test_home_and_broker_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Path.home() follows $HOME: the default is checked against a home of the test's own.
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    assert edgefleet_home() == tmp_path / "home"
    monkeypatch.setenv("EDGEFLEET_HOME", "")
    assert edgefleet_home() == Path.home() / ".edgefleet"
    monkeypatch.delenv("EDGEFLEET_HOME")
    assert edgefleet_home() == Path.home() / ".edgefleet"
    assert agent_state_dir("cam-1") == Path.home() / ".edgefleet" / "agent" / "cam-1"
    assert DEFAULT_BROKER == "mqtt://127.0.0.1:1883"
