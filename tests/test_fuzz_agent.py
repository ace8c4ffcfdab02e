"""Fuzzing (hypothesis) of everything the agent decodes from the network: manifests, commands, device
messages, chunk topics and chunks, arrays, key rotations, delta patches, and the daemon's handlers.

The property is the same everywhere: hostile input ends in the documented error type of that decoder
(ProtocolError, VerifyError or TransferError) carrying a known code, never another exception, and the
daemon answers every message with events whose codes are documented, never `internal-error` (which
would mean an exception escaped a handler). tests/test_agent_net_protocol.py,
tests/test_agent_net_handlers.py and tests/test_bundle_manifest.py hold the first, narrower properties;
this file extends them to structure-aware inputs and to the decoders they did not reach.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.bspatch import apply_patch
from edgefleet.agent.config import load_config
from edgefleet.agent.core.command_auth import CODES as COMMAND_AUTH_CODES
from edgefleet.agent.core.errors import ProtocolError, TransferError, VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import Manifest, canonical_bytes
from edgefleet.agent.core.protocol import (
    COMMANDS,
    DEVICE_MESSAGES,
    Code,
    FileTransfer,
    RotateRootCommand,
    Topics,
    decode_array,
    parse_command,
    parse_device_message,
)
from edgefleet.agent.core.trust import TrustStore, load_rotation, make_root, parse_signatures
from edgefleet.agent.core.verify import ERROR_CODES, verify_manifest
from edgefleet.agent.daemon import Agent, _ErrorLimiter
from edgefleet.agent.transfer import StagingArea, Transfer
from tests.command_support import signed
from tests.test_agent_net_handlers import NoModelInstaller, Recorder

pytestmark = pytest.mark.chaos

PROTOCOL_CODES = {v for k, v in vars(Code).items() if k.isupper()}
MANIFEST_CODES = {"manifest-invalid", "schema-unsupported", "manifest-too-large"}
SHA = hashlib.sha256(b"fuzz").hexdigest()
# `EDGEFLEET_FUZZ_EXAMPLES=5000` fuzzes deeper locally; CI runs the default.
EXAMPLES = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES") or 120)
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def good_manifest() -> dict[str, Any]:
    """A valid manifest document (the same shape `edgefleet build` writes)."""
    return {
        "schema": "edgefleet.manifest/1",
        "name": "digits",
        "version": 3,
        "created": "2026-01-01T00:00:00Z",
        "expires": "2036-01-01T00:00:00Z",
        "target": {"profile": "x86-64", "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime", "file": "model.onnx"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 4]}],
        "eval": {"kind": "labels", "metric": "accuracy", "file": "eval.npz"},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 50, "warmup_runs": 3, "timeout_s": 30},
        "files": {
            "model.onnx": {"size": 10, "sha256": SHA},
            "eval.npz": {"size": 10, "sha256": SHA},
        },
    }


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


MANIFEST_PATHS = _paths(good_manifest())


def _mutate(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) != isinstance(path[-1], str):
        raise TypeError("an earlier mutation changed this container's kind")  # keep the document JSON
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def test_the_base_manifest_is_valid() -> None:
    assert Manifest.from_dict(good_manifest()).version == 3


# ---------------------------------------------------------------------------------------------------
# manifest decoder


@FAST
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(MANIFEST_PATHS), json_values, st.booleans()), min_size=1, max_size=3
    )
)
def test_manifest_with_fields_replaced_or_removed_raises_only_manifest_codes(
    mutations: list[tuple[tuple[Any, ...], Any, bool]],
) -> None:
    doc: Any = good_manifest()
    for path, value, delete in mutations:
        try:
            doc = _mutate(doc, path, value, delete)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    for decode in (lambda: Manifest.from_dict(doc), lambda: Manifest.from_bytes(canonical_bytes(doc))):
        try:
            manifest = decode()
        except VerifyError as exc:
            assert exc.code in MANIFEST_CODES and exc.reason, exc
        else:
            # What decodes, re-encodes to a manifest that decodes the same (no silent coercion).
            assert Manifest.from_bytes(manifest.canonical()) == manifest


@FAST
@given(doc=json_values)
def test_arbitrary_json_is_never_a_manifest_and_never_crashes(doc: Any) -> None:
    with pytest.raises(VerifyError) as info:
        Manifest.from_bytes(json.dumps(doc).encode())
    assert info.value.code in MANIFEST_CODES


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,  # nesting deeper than any parser stack
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"\xff\xfe\x00",  # not UTF-8
        b" " * (1024 * 1024 + 1),  # over the size limit
        # an integer past Python's 4300-digit limit (a CPU exhaustion attempt on the parser)
        b'{"version": ' + b"9" * 5000 + b"}",
        json.dumps({**good_manifest(), "files": {f"f{i}": {} for i in range(5000)}}).encode(),
    ],
    ids=["deep-array", "deep-object", "not-utf8", "oversized", "huge-int", "many-files"],
)
def test_pathological_manifest_bytes_are_refused_with_a_code(data: bytes) -> None:
    with pytest.raises(VerifyError) as info:
        Manifest.from_bytes(data)
    assert info.value.code in MANIFEST_CODES, info.value


# ---------------------------------------------------------------------------------------------------
# protocol decoders (from_wire)


@FAST
@given(obj=json_values)
def test_file_transfer_from_arbitrary_json_raises_only_protocol_errors(obj: Any) -> None:
    try:
        FileTransfer.from_obj(obj)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES


@FAST
@given(
    base=st.fixed_dictionaries(
        {
            "file": st.just("m.onnx"),
            "sha256": st.just(SHA),
            "size": st.just(100),
            "chunk_size": st.just(10),
            "chunks": st.just(10),
        }
    ),
    key=st.sampled_from(["file", "sha256", "size", "chunk_size", "chunks", "chunk_sha256", "delta"]),
    value=json_values | st.just("../../etc/passwd") | st.just([SHA] * 10) | st.integers(-5, 2**63),
)
def test_file_transfer_with_one_bad_field(base: dict[str, Any], key: str, value: Any) -> None:
    try:
        spec = FileTransfer.from_obj({**base, key: value})
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES
    else:
        # Accepted specs are self-consistent: chunk count covers the size, names stay relative.
        assert spec.chunks == -(-spec.size // spec.chunk_size)
        assert ".." not in spec.file.split("/") and not spec.file.startswith("/")


@FAST
@given(payload=st.binary(max_size=400))
def test_random_bytes_as_device_messages_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        parse_device_message(payload)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES


@FAST
@given(
    kind=st.sampled_from(sorted(DEVICE_MESSAGES)),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "device",
                "seq",
                "ts",
                "code",
                "reason",
                "ref",
                "deploy",
                "step",
                "sha256",
                "ranges",
                "name",
                "version",
                "health",
                "command",
                "data",
                "online",
                "metrics",
                "detail",
            ]
        ),
        json_values,
        max_size=8,
    ),
)
def test_every_device_message_type_with_random_fields(kind: str, fields: dict[str, Any]) -> None:
    payload = json.dumps({"v": 1, "type": kind, **fields}).encode()
    try:
        message = parse_device_message(payload)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES
    else:
        assert parse_device_message(message.to_wire()) == message


@FAST
@given(
    kind=st.sampled_from(sorted(COMMANDS)),
    fields=st.dictionaries(
        st.sampled_from(
            ["id", "manifest", "signatures", "files", "device", "telemetry_interval_s", "inputs", "root"]
        ),
        json_values,
        max_size=6,
    ),
)
def test_every_command_type_with_its_own_field_names_fuzzed(kind: str, fields: dict[str, Any]) -> None:
    payload = json.dumps({"v": 1, "type": kind, **fields}).encode()
    try:
        command = parse_command(payload)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES
    else:
        assert parse_command(command.to_wire()) == command


@FAST
@given(
    cmd_id=st.text(min_size=1, max_size=40),
    root=st.binary(min_size=1, max_size=300),
    sigs=st.lists(
        st.fixed_dictionaries({"keyid": st.text(max_size=64), "sig": st.text(max_size=88)}), max_size=5
    ),
)
def test_rotate_root_command_round_trip(cmd_id: str, root: bytes, sigs: list[dict[str, str]]) -> None:
    cmd = RotateRootCommand(id=cmd_id, root=root, signatures=tuple(sigs))
    assert parse_command(cmd.to_wire()) == cmd


@FAST
@given(
    spec=st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(
                ["float32", "int8", "uint64", "bool", "O", "U4", "V8", "(2)i4", "f4,f4", "<M8[s]", "c16", "x"]
            )
            | json_values,
            "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
            "data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | json_values,
        },
    )
)
def test_decode_array_raises_only_protocol_errors(spec: dict[str, Any]) -> None:
    try:
        array = decode_array(spec)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_CODES
    else:
        assert array.dtype.kind in "biuf" and array.nbytes == len(base64.b64decode(spec["data"]))


@FAST
@given(
    topic=st.text(max_size=120)
    | st.builds(lambda s, i: f"edgefleet/v1/f/artifact/{s}/{i}", st.text(max_size=70), st.text(max_size=12))
)
def test_chunk_topic_parser(topic: str) -> None:
    topics = Topics("f", "d")
    try:
        parsed = topics.parse_chunk_topic(topic)
    except ProtocolError as exc:
        assert exc.code == Code.BAD_TOPIC
    else:
        assert parsed is None or (len(parsed[0]) == 64 and 0 <= parsed[1] < 10**9)


# ---------------------------------------------------------------------------------------------------
# chunk decoder: a transfer fed arbitrary (index, bytes) pairs


@FAST
@given(
    size=st.integers(0, 300),
    chunk=st.integers(1, 64),
    writes=st.lists(st.tuples(st.integers(-2, 12), st.binary(max_size=80)), max_size=30),
    hashes=st.booleans(),
)
def test_transfer_takes_any_chunk_sequence_without_growing_past_its_size(
    tmp_path_factory: pytest.TempPathFactory,
    size: int,
    chunk: int,
    writes: list[tuple[int, bytes]],
    hashes: bool,
) -> None:
    content = os.urandom(size)
    chunks = -(-size // chunk)
    digests = tuple(hashlib.sha256(content[i * chunk : (i + 1) * chunk]).hexdigest() for i in range(chunks))
    spec = FileTransfer(
        "m", hashlib.sha256(content).hexdigest(), size, chunk, chunks, digests if hashes else ()
    )
    transfer = Transfer(tmp_path_factory.mktemp("t"), spec, max_chunk_bytes=64)
    try:
        for index, data in writes:
            try:
                transfer.write_chunk(index, data)
            except TransferError as exc:
                assert exc.code in PROTOCOL_CODES
            assert transfer.received <= chunks
            assert transfer.part_path.stat().st_size == size
        if transfer.complete:
            try:
                assert transfer.finish().read_bytes() == content
            except TransferError as exc:
                # only possible without per-chunk hashes: wrong bytes of the right length got in
                assert exc.code == Code.HASH_MISMATCH and not hashes
                assert transfer.received == 0
    finally:
        transfer.close()


# ---------------------------------------------------------------------------------------------------
# trust: signatures, rotations, manifest verification


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp_path_factory.mktemp("fuzz-keys"))
    return TrustStore.from_public_keys([keys.public_path])


@FAST
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_signature_documents_and_rotation_statements_raise_only_verify_errors(data: bytes) -> None:
    for decode in (parse_signatures, load_rotation):
        try:
            decode(data)
        except VerifyError as exc:
            assert exc.code in ERROR_CODES


@FAST
@given(
    doc=json_values
    | st.builds(
        lambda v, k: {**make_root([bytes(32)], version=2), k: v},
        json_values,
        st.sampled_from(["version", "threshold", "bundle_threshold", "keys", "expires", "schema"]),
    ),
    sigs=json_values,
)
def test_apply_root_refuses_garbage_and_changes_nothing(trust: TrustStore, doc: Any, sigs: Any) -> None:
    before = copy.deepcopy(trust.root)
    try:
        trust.apply_root(canonical_bytes(doc), sigs if isinstance(sigs, dict) else {"signatures": sigs})
    except VerifyError as exc:
        assert exc.code in ERROR_CODES
    else:  # pragma: no cover - nothing here is signed by the trusted key
        pytest.fail("an unsigned rotation was applied")
    assert trust.root == before


@FAST
@given(
    manifest=st.binary(max_size=200) | st.sampled_from([canonical_bytes(good_manifest())]),
    sigs=json_values,
)
def test_verify_manifest_with_forged_signatures_raises_only_verify_errors(
    trust: TrustStore, tmp_path_factory: pytest.TempPathFactory, manifest: bytes, sigs: Any
) -> None:
    try:
        verify_manifest(
            manifest,
            sigs if isinstance(sigs, dict) else {"signatures": sigs},
            trust,
            profile="x86-64",
            device_id="d",
            ledger=VersionLedger(tmp_path_factory.getbasetemp()),
        )
    except VerifyError as exc:
        assert exc.code in ERROR_CODES
    else:  # pragma: no cover
        pytest.fail("a manifest without a valid signature verified")


@FAST
@given(
    patch=st.binary(max_size=200),
    header=st.booleans(),
    sizes=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 3),
)
def test_bspatch_on_arbitrary_patches_raises_only_transfer_errors(
    patch: bytes, header: bool, sizes: tuple[int, int, int]
) -> None:
    if header:

        def offt(v: int) -> bytes:
            return (abs(v) | (1 << 63 if v < 0 else 0)).to_bytes(8, "little")

        patch = b"BSDIFF40" + b"".join(offt(v) for v in sizes) + patch
    try:
        out = apply_patch(b"old file bytes" * 4, patch, 4096)
    except TransferError as exc:
        assert exc.code == "delta-corrupt"
    else:
        assert len(out) <= 4096


# ---------------------------------------------------------------------------------------------------
# the daemon's handlers: every topic, structure-aware payloads, answers carry documented codes only

DOCUMENTED = (
    PROTOCOL_CODES
    | set(ERROR_CODES)
    | set(COMMAND_AUTH_CODES)  # docs/agent.md, require_signed_commands
    | {"files-mismatch", "no-previous", "superseded", "delta-corrupt"}
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Agent:
    from edgefleet.sdk.trust.keys import init_keys

    root = tmp_path_factory.mktemp("fuzz-agent")
    keys = init_keys(root / "keys")
    cfg = load_config(
        None,
        {
            "device_id": "dev-1",
            "profile": "x86-64",
            "trusted_keys": [str(keys.public_path)],
            "state_dir": str(root / "state"),
            "max_message_bytes": 8192,
            "max_chunk_bytes": 1024,
            "mqtt_infer": True,
        },
    )
    agent = Agent(cfg)
    agent.state_dir.mkdir(parents=True)
    agent.session = Recorder()  # type: ignore[assignment]
    agent.staging = StagingArea(agent.state_dir / "staging", max_chunk_bytes=1024)
    agent.trust = TrustStore.open(agent.state_dir, [str(keys.public_path)])
    agent.ledger = VersionLedger(agent.state_dir)
    agent.profile = SimpleNamespace(name="x86-64", cores=2, threads=2)
    agent.installer = NoModelInstaller()
    # No model is loaded: an infer that gets past decoding must end in the server's own error.
    agent.server = SimpleNamespace(infer=_no_model, active=None)
    agent._limiter = _ErrorLimiter(rate=1e9, burst=1e9)
    return agent


def _no_model(inputs: Any, request_id: Any = None) -> Any:
    from edgefleet.agent.core.errors import AgentError

    raise AgentError(Code.NO_MODEL, "no model is installed yet")


def _answers(agent: Agent, topic: str, payload: bytes) -> list[tuple[Any, dict[str, Any]]]:
    recorder = agent.session
    assert isinstance(recorder, Recorder)
    before = len(recorder.sent)
    agent.handle_message(topic, _signed(agent, topic, payload))
    return recorder.sent[before:]


def _signed(agent: Agent, topic: str, payload: bytes) -> bytes:
    """A command as the host signs it (the fixture's keys hold the online key); other topics as they are."""
    if topic != agent.topics.cmd:
        return payload
    return signed(Path(agent.config.trusted_keys[0]).parent, payload, agent.config.device_id)


def _check(sent: list[tuple[Any, dict[str, Any]]]) -> None:
    for cls, fields in sent:
        if cls.TYPE in ("error", "rejected"):
            assert fields["code"] in DOCUMENTED and fields["code"] != Code.INTERNAL, fields
            assert fields["reason"], fields


def _deploy_payload(manifest: bytes, sigs: Any, files: list[dict[str, Any]], device: Any) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "type": "deploy",
            "id": "fz",
            "manifest": base64.b64encode(manifest).decode(),
            "signatures": sigs,
            "files": files,
            **({} if device is None else {"device": device}),
        }
    ).encode()


@FAST
@given(
    manifest=st.binary(max_size=120) | st.just(canonical_bytes(good_manifest())),
    sigs=json_values,
    files=st.lists(
        st.fixed_dictionaries(
            {
                "file": st.sampled_from(["model.onnx", "eval.npz", "x"]),
                "sha256": st.just(SHA),
                "size": st.integers(0, 50),
                "chunk_size": st.integers(1, 20),
                "chunks": st.integers(0, 60),
            }
        ),
        max_size=3,
    ),
    device=st.none() | st.sampled_from(["dev-1", "dev-2", ""]),
)
def test_structured_deploy_commands_end_in_documented_codes(
    agent: Agent, manifest: bytes, sigs: Any, files: list[dict[str, Any]], device: Any
) -> None:
    sent = _answers(agent, agent.topics.cmd, _deploy_payload(manifest, sigs, files, device))
    assert sent
    _check(sent)
    assert agent._pending is None  # nothing unsigned ever starts a download


@FAST
@given(
    kind=st.sampled_from(["rotate-root", "infer", "config", "rollback", "status", "eval"]),
    body=st.dictionaries(
        st.sampled_from(["id", "root", "signatures", "inputs", "telemetry_interval_s"]),
        json_values,
        max_size=4,
    ),
    root=st.none() | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    inputs=st.none()
    | st.dictionaries(
        st.text(max_size=4),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["float32", "O", "int64", "zz"]),
                "shape": st.lists(st.integers(0, 5), max_size=3),
                "data": st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
            }
        ),
        max_size=2,
    ),
)
def test_every_other_command_with_structured_garbage_ends_in_documented_codes(
    agent: Agent, kind: str, body: dict[str, Any], root: Any, inputs: Any
) -> None:
    payload: dict[str, Any] = {"v": 1, "type": kind, "id": "c1", **body}
    if root is not None:
        payload["root"] = root
    if inputs is not None:
        payload["inputs"] = inputs
    before = copy.deepcopy(agent.trust.root)
    sent = _answers(agent, agent.topics.cmd, json.dumps(payload).encode())
    assert sent
    _check(sent)
    assert agent.trust.root == before  # no rotation without the fleet key's signature


@FAST
@given(
    topic=st.sampled_from(["repair", "artifact", "other", "device-other"]),
    sha=st.sampled_from([SHA, "A" * 64, "0" * 63, ""]),
    index=st.sampled_from(["0", "1", "-1", "999999999", "1000000000", "x", "", "0/1"]),
    payload=st.binary(max_size=1500),
)
def test_chunks_on_any_topic_end_in_documented_codes(
    agent: Agent, topic: str, sha: str, index: str, payload: bytes
) -> None:
    base = {
        "repair": f"{agent.topics.device}/chunk",
        "artifact": f"{agent.topics.prefix}/artifact",
        "other": f"{agent.topics.prefix}/elsewhere",
        "device-other": f"{agent.topics.prefix}/dev/dev-2/chunk",
    }[topic]
    _check(_answers(agent, f"{base}/{sha}/{index}", payload))


def test_handlers_survive_concurrent_garbage(agent: Agent) -> None:
    # The worker is single-threaded by design, but handle_message is public: two threads at once
    # must still end in documented answers only.
    payloads = [
        os.urandom(64),
        b"{}",
        b'{"v":1,"type":"status","id":"s"}',
        b'{"v":1,"type":"rotate-root","id":"r","root":"e30=","signatures":[]}',
    ]
    failures: list[BaseException] = []

    def hammer(seed: int) -> None:
        try:
            for i in range(200):
                payload = _signed(agent, agent.topics.cmd, payloads[(i + seed) % len(payloads)])
                agent.handle_message(agent.topics.cmd, payload)
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    recorder = agent.session
    assert isinstance(recorder, Recorder)
    _check(recorder.sent[-400:])
