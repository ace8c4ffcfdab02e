"""A field added to a message on one side only fails here; versions and unknown fields behave as documented.

Every class registered in `MESSAGE_CLASSES` is covered automatically: an instance with every field set
to a non-default value must survive to_wire → from_wire unchanged (a field the encoder or decoder
forgets comes back as its default), and the wire keys it emits must match the class's `KEYS` and the
golden list in tests/data/wire/fields.json (a key added on one side fails until both sides and the list
agree). After a deliberate change, regenerate the list with EDGEFLEET_REGEN_WIRE_FIELDS=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.commands import COMMANDS, Command, DeployCommand, FileTransfer, parse_command
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.events import DEVICE_ENVELOPE, DEVICE_MESSAGES, DeviceMessage, parse_device_message
from edgefleet.agent.core.protocol import Code, Telemetry
from edgefleet.agent.core.wire import ENVELOPE, MESSAGE_CLASSES
from tests.contract_samples import NEWER, defaults_left, sample

GOLDEN = Path(__file__).parent / "data" / "wire" / "fields.json"
CLASSES = sorted(MESSAGE_CLASSES)


def _round_trip(obj: Any) -> Any:
    if isinstance(obj, Command):
        return parse_command(obj.to_wire())
    if isinstance(obj, DeviceMessage):
        return parse_device_message(obj.to_wire())
    return type(obj).from_obj(json.loads(json.dumps(obj.to_obj())))


def _emitted_keys(obj: Any) -> list[str]:
    return sorted(k for k in obj.to_obj() if k not in NEWER)


def _envelope(cls: type) -> frozenset[str]:
    if issubclass(cls, DeviceMessage):
        return DEVICE_ENVELOPE
    if issubclass(cls, Command):
        return ENVELOPE
    return frozenset()


def test_the_registry_holds_every_message_kind() -> None:
    # assert: every command and device message type is registered (so the tests below see it)
    registered = set(MESSAGE_CLASSES.values())
    assert set(COMMANDS.values()) <= registered
    assert set(DEVICE_MESSAGES.values()) <= registered


@pytest.mark.parametrize("name", CLASSES)
def test_every_field_survives_the_wire(name: str) -> None:
    # prepare: every field unlike its default, and a key only a newer writer knows
    original = sample(MESSAGE_CLASSES[name])
    assert defaults_left(original) == [], "the sample left fields at their default"
    # act
    back = _round_trip(original)
    # assert: equal field by field (asdict also compares fields excluded from ==)
    assert type(back) is type(original)
    assert dataclasses.asdict(back) == dataclasses.asdict(original)
    assert back.extra == NEWER


@pytest.mark.parametrize("name", CLASSES)
def test_wire_keys_match_the_class_and_the_golden_list(name: str) -> None:
    # prepare
    cls = MESSAGE_CLASSES[name]
    golden = json.loads(GOLDEN.read_text())
    # act
    emitted = _emitted_keys(sample(cls))
    # assert: what to_wire writes = what the decoder knows (KEYS) = the recorded list
    assert set(emitted) == set(cls.KEYS) | _envelope(cls)
    assert emitted == golden.get(name), f"{name}: wire keys changed; update both sides and {GOLDEN.name}"


def test_golden_list_names_no_class_that_is_gone() -> None:
    assert sorted(json.loads(GOLDEN.read_text())) == CLASSES


@pytest.mark.parametrize("cls", [*COMMANDS.values(), *DEVICE_MESSAGES.values()], ids=lambda c: c.TYPE)
def test_a_newer_major_schema_is_refused_with_a_clear_code(cls: type) -> None:
    # prepare: a message of this kind from a side one major version ahead
    obj = sample(cls).to_obj()
    obj["v"] = cls.VERSION + 1
    payload = json.dumps(obj).encode()
    parse = parse_command if issubclass(cls, Command) else parse_device_message
    # act / assert
    with pytest.raises(ProtocolError) as err:
        parse(payload)
    assert err.value.code == Code.UNSUPPORTED_VERSION
    assert f"v{cls.VERSION + 1}" in err.value.reason and "upgrade" in err.value.reason


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, None, True])
def test_a_malformed_version_is_refused(version: Any) -> None:
    payload = json.dumps({"v": version, "type": "status", "id": "s"}).encode()
    with pytest.raises(ProtocolError) as err:
        parse_command(payload)
    assert err.value.code == Code.UNSUPPORTED_VERSION


def test_unknown_fields_of_a_newer_side_are_kept_in_nested_parts() -> None:
    # prepare: a v2 telemetry whose system part and top level carry keys this side does not know
    obj = sample(Telemetry).to_obj()
    obj["system"]["gpu_percent"] = 42.0
    obj["battery"] = {"percent": 80}
    # act
    message = parse_device_message(json.dumps(obj).encode())
    again = json.loads(message.to_wire())
    # assert: read, kept, and written back
    assert isinstance(message, Telemetry)
    assert message.system.extra["gpu_percent"] == 42.0 and message.extra["battery"] == {"percent": 80}
    assert again["system"]["gpu_percent"] == 42.0 and again["battery"] == {"percent": 80}


def test_a_delta_of_an_unknown_format_costs_only_the_full_download() -> None:
    # prepare: a deploy whose delta uses a format this agent does not apply
    deploy = sample(DeployCommand)
    obj = deploy.to_obj()
    obj["files"][0]["delta"]["format"] = "zstd-patch"
    # act
    parsed = parse_command(json.dumps(obj).encode())
    # assert: the command stands, the file has no usable delta, the unknown one travels on untouched
    assert isinstance(parsed, DeployCommand)
    spec: FileTransfer = parsed.files[0]
    assert spec.delta is None and spec.extra["delta"]["format"] == "zstd-patch"
    assert json.loads(parsed.to_wire())["files"][0]["delta"]["format"] == "zstd-patch"


def test_regenerate_golden_list_when_asked() -> None:
    """With EDGEFLEET_REGEN_WIRE_FIELDS=1, rewrite tests/data/wire/fields.json from the classes."""
    if os.environ.get("EDGEFLEET_REGEN_WIRE_FIELDS") != "1":
        pytest.skip("set EDGEFLEET_REGEN_WIRE_FIELDS=1 to rewrite the golden list")
    golden = {name: _emitted_keys(sample(MESSAGE_CLASSES[name])) for name in CLASSES}
    GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
