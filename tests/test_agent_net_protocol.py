"""Wire protocol: round trips of every message type and malformed payloads answered with ProtocolError."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.core.commands import MIN_CHUNK_BYTES
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.events import DEVICE_ENVELOPE
from edgefleet.agent.core.protocol import (
    COMMANDS,
    Code,
    ConfigCommand,
    DeployCommand,
    Deployed,
    Error,
    FileTransfer,
    InferCommand,
    Missing,
    ModelRef,
    Progress,
    Rejected,
    Requests,
    Result,
    RollbackCommand,
    State,
    Telemetry,
    Topics,
    decode_array,
    encode_array,
    parse_command,
    parse_device_message,
    ranges_of,
    will_payload,
)

SHA = hashlib.sha256(b"model").hexdigest()
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
ids = st.text(min_size=1, max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def file_transfers(draw: st.DrawFn) -> FileTransfer:
    size = draw(st.integers(0, 10_000))
    # Files over MIN_CHUNK_BYTES must be cut into chunks of at least that size (agent/core/commands.py).
    chunk = draw(st.integers(MIN_CHUNK_BYTES if size > MIN_CHUNK_BYTES else 1, 4096))
    chunks = -(-size // chunk)
    digests = (
        tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(chunks))
        if draw(st.booleans())
        else ()
    )
    return FileTransfer(draw(names), SHA, size, chunk, chunks, digests)


@given(
    cmd_id=ids,
    manifest=st.binary(max_size=200),
    sigs=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    files=st.lists(file_transfers(), min_size=1, max_size=3, unique_by=lambda f: f.file),
    device=st.none() | names,
)
def test_deploy_round_trip(cmd_id: str, manifest: bytes, sigs: dict, files: list, device: str | None) -> None:
    cmd = DeployCommand(id=cmd_id, manifest=manifest, signatures=sigs, files=tuple(files), device=device)
    assert parse_command(cmd.to_wire()) == cmd


@given(cmd_id=ids, interval=st.none() | st.floats(0.1, 86400))
def test_simple_commands_round_trip(cmd_id: str, interval: float | None) -> None:
    for cmd in (RollbackCommand(id=cmd_id), ConfigCommand(id=cmd_id, telemetry_interval_s=interval)):
        assert parse_command(cmd.to_wire()) == cmd


def test_infer_command_round_trip_and_array_codec() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    cmd = InferCommand(id="q1", inputs={"x": encode_array(x)})
    back = parse_command(cmd.to_wire())
    assert isinstance(back, InferCommand)
    np.testing.assert_array_equal(decode_array(back.inputs["x"]), x)
    bad = dict(encode_array(x), shape=[5, 4])
    with pytest.raises(ProtocolError) as err:
        decode_array(bad)
    assert err.value.code == Code.BAD_FIELD


@given(
    device=names,
    seq=st.integers(0, 2**40),
    ts=st.floats(0, 2e9),
    text=st.text(max_size=50),
    detail=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ranges=st.lists(
        st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(lambda t: (min(t), max(t))), max_size=5
    ),
    version=st.integers(0, 2**31),
    online=st.booleans(),
)
@settings(max_examples=60)
def test_device_messages_round_trip(device, seq, ts, text, detail, ranges, version, online) -> None:  # type: ignore[no-untyped-def]
    base = {"device": device, "seq": seq, "ts": ts}
    messages = [
        Error(**base, code="bad-json", reason=text, ref=None),
        Error(**base, code="x", reason=text, ref=text),
        Progress(**base, deploy=text, step="download", detail=detail),
        Missing(**base, deploy=text, sha256=SHA, ranges=tuple(ranges)),
        Deployed(**base, deploy=text, name=text, version=version, health=detail),
        Rejected(**base, deploy=text, step="health", code="too-slow", reason=text),
        Result(**base, ref=text, command="rollback", data=detail),
        State(
            **base,
            online=online,
            profile=text,
            tags=(text,),
            active=ModelRef(text, version),
            extra={k: v for k, v in detail.items() if k not in State.KEYS | DEVICE_ENVELOPE},
        ),
        Telemetry(
            **base,
            model=ModelRef(text, version),
            requests=Requests(count=version, errors_by_code={text: 1}),
            extra={k: v for k, v in detail.items() if k not in Telemetry.KEYS | DEVICE_ENVELOPE},
        ),
    ]
    for message in messages:
        assert parse_device_message(message.to_wire()) == message


def test_will_payload_parses_as_offline_state() -> None:
    message = parse_device_message(will_payload("pi-1"))
    assert isinstance(message, State) and message.online is False and message.seq == -1


def _code(payload: bytes, max_bytes: int = 1 << 20) -> str:
    with pytest.raises(ProtocolError) as err:
        parse_command(payload, max_bytes=max_bytes)
    return err.value.code


def test_malformed_commands_get_specific_codes() -> None:
    ok = json.loads(RollbackCommand(id="r1").to_wire())
    assert _code(b"{not json") == Code.BAD_JSON
    assert _code(b"\xff\xfe") == Code.BAD_JSON
    assert _code(b"[1, 2]") == Code.BAD_MESSAGE
    assert _code(json.dumps({**ok, "type": "reboot"}).encode()) == Code.UNKNOWN_TYPE
    assert _code(json.dumps({**ok, "v": 99}).encode()) == Code.UNSUPPORTED_VERSION
    assert _code(json.dumps({k: v for k, v in ok.items() if k != "id"}).encode()) == Code.MISSING_FIELD
    assert _code(json.dumps({**ok, "id": 5}).encode()) == Code.BAD_FIELD
    assert _code(b" " * 2048, max_bytes=1024) == Code.PAYLOAD_TOO_LARGE


def test_deploy_with_inconsistent_chunk_count_is_refused() -> None:
    f = FileTransfer("model.onnx", SHA, 100, 10, 10)
    obj = json.loads(DeployCommand(id="d", manifest=b"{}", files=(f,)).to_wire())
    obj["files"][0]["chunks"] = 11
    assert _code(json.dumps(obj).encode()) == Code.BAD_FIELD
    obj["files"][0].update(chunks=10, file="../etc/passwd")
    assert _code(json.dumps(obj).encode()) == Code.BAD_FIELD
    obj["files"][0]["file"] = "model.onnx"
    obj["manifest"] = "***"
    assert _code(json.dumps(obj).encode()) == Code.BAD_FIELD


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(payload: bytes) -> None:
    try:
        parse_command(payload)
    except ProtocolError as exc:
        assert exc.code and exc.reason


@given(st.sampled_from(sorted(COMMANDS)), st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_random_fields_on_every_command_type_never_crash(kind: str, fields: dict) -> None:
    payload = json.dumps({**fields, "v": 1, "type": kind}).encode()
    try:
        parse_command(payload)
    except ProtocolError as exc:
        assert exc.code in vars(Code).values()


def test_topics_and_chunk_topic_parsing() -> None:
    t = Topics("fleet1", "pi-7")
    assert t.state == "edgefleet/v1/fleet1/dev/pi-7/state"
    assert t.parse_chunk_topic(t.artifact(SHA, 12)) == (SHA, 12)
    assert t.parse_chunk_topic(t.repair(SHA, 3)) == (SHA, 3)
    assert t.parse_chunk_topic(t.cmd) is None
    for bad in (
        f"{t.prefix}/artifact/{SHA}/x",
        f"{t.prefix}/artifact/abc/1",
        f"{t.prefix}/artifact/{SHA}/1/2",
    ):
        with pytest.raises(ProtocolError):
            t.parse_chunk_topic(bad)
    with pytest.raises(ProtocolError):
        Topics("fleet/1", "pi")


@given(st.sets(st.integers(0, 200)))
def test_ranges_cover_exactly_the_indexes(indexes: set) -> None:
    ranges = ranges_of(sorted(indexes))
    covered = [i for a, b in ranges for i in range(a, b + 1)]
    assert covered == sorted(indexes)
    assert all(r2[0] > r1[1] + 1 for r1, r2 in zip(ranges, ranges[1:]))


def test_b64_manifest_is_exact_bytes() -> None:
    raw = bytes(range(256))
    cmd = DeployCommand(id="d", manifest=raw, files=(FileTransfer("m", SHA, 1, 1, 1),))
    assert json.loads(cmd.to_wire())["manifest"] == base64.b64encode(raw).decode()
