"""Property tests: malformed payloads on every topic the agent handles end in an event, never a crash."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.config import load_config
from edgefleet.agent.core.command_auth import MISADDRESSED
from edgefleet.agent.core.errors import InstallError
from edgefleet.agent.core.protocol import (
    COMMANDS,
    Code,
    DeployCommand,
    FileTransfer,
    Rejected,
    Result,
)
from edgefleet.agent.daemon import Agent, _ErrorLimiter
from edgefleet.agent.transfer import StagingArea
from tests.command_support import signed

SHA = hashlib.sha256(b"x").hexdigest()


class Recorder:
    """Stands in for the MQTT session: records what the agent would publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []
        self.subs: set[str] = set()
        self.connected = threading.Event()
        self.connected.set()

    def send(self, cls: Any, **fields: Any) -> None:
        self.sent.append((cls, fields))

    def subscribe(self, topic_filter: str) -> None:
        self.subs.add(topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self.subs.discard(topic_filter)


class NoModelInstaller:
    """An installer with nothing installed: rollback has nowhere to go."""

    def status(self) -> dict[str, Any]:
        return {"slots": {}, "active": None}

    def rollback(self) -> Any:
        raise InstallError("rollback", "no-previous", "no previous model to roll back to")

    def install(self, manifest_bytes: bytes, signatures: Any, staged: Any) -> Any:
        self.staged = {name: path.read_bytes() for name, path in staged.items()}
        raise InstallError("load", "runtime-failed", "this stand-in installs nothing")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Agent:
    from edgefleet.agent.core.ledger import VersionLedger
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.sdk.trust.keys import init_keys

    root = tmp_path_factory.mktemp("agent")
    keys = init_keys(root / "keys")
    # A signed bundle whose "model" is plain bytes: the stand-in installer never loads it.
    (root / "model.onnx").write_bytes(bytes(range(256)) * 9)
    (root / "eval.npz").write_bytes(b"eval" * 100)
    from tests.agent_net_support import make_bundle

    make_bundle(root / "bundle", root / "keys", root / "model.onnx", root / "eval.npz", version=1)
    cfg = load_config(
        None,
        {
            "device_id": "dev-1",
            "profile": "x86-64",
            "trusted_keys": [str(keys.public_path)],
            "state_dir": str(root / "state"),
            "max_message_bytes": 4096,
            "max_chunk_bytes": 1024,
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
    # The flood limiter is tested on its own below; here every answer must be visible.
    agent._limiter = _ErrorLimiter(rate=1e9, burst=1e9)
    return agent


def _answers(agent: Agent, topic: str, payload: bytes) -> list[tuple[Any, dict[str, Any]]]:
    recorder = agent.session
    assert isinstance(recorder, Recorder)
    before = len(recorder.sent)
    if topic == agent.topics.cmd:  # signed as the host signs (the fixture's keys hold the online key)
        payload = signed(Path(agent.config.trusted_keys[0]).parent, payload, agent.config.device_id)
    agent.handle_message(topic, payload)
    return recorder.sent[before:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(payload=st.binary(max_size=600))
def test_random_bytes_on_cmd_answer_an_error(agent: Agent, payload: bytes) -> None:
    sent = _answers(agent, agent.topics.cmd, payload)
    assert sent, "every bad command gets an answer"
    kinds = {cls.TYPE for cls, _ in sent}
    assert kinds & {"error", "rejected", "result", "state", "progress"}


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    kind=st.sampled_from(sorted(COMMANDS)),
    fields=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
)
def test_structured_garbage_on_every_command_type(agent: Agent, kind: str, fields: dict) -> None:
    payload = json.dumps({**fields, "v": 1, "type": kind}, default=str).encode()
    sent = _answers(agent, agent.topics.cmd, payload)
    assert sent
    for cls, f in sent:
        if cls.TYPE == "error":
            assert f["code"] and f["reason"]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    where=st.sampled_from(["repair", "artifact"]),
    sha=st.sampled_from([SHA, "zz", "0" * 63]),
    index=st.sampled_from(["0", "-1", "99999999999", "x", "1/2"]),
    payload=st.binary(max_size=2048),
)
def test_chunks_for_unknown_transfers_and_bad_topics(
    agent: Agent, where: str, sha: str, index: str, payload: bytes
) -> None:
    base = f"{agent.topics.device}/chunk" if where == "repair" else f"{agent.topics.prefix}/artifact"
    sent = _answers(agent, f"{base}/{sha}/{index}", payload)
    # Broadcast chunks of files this device is not downloading are someone else's: silently ignored.
    if where == "repair" or sha != SHA or not index.isdigit() or len(index) > 9 or len(payload) > 1024:
        assert [cls.TYPE for cls, _ in sent] == ["error"]
    else:
        assert sent == []


def test_specific_codes_for_each_kind_of_bad_input(agent: Agent) -> None:
    def code(topic: str, payload: bytes) -> str:
        sent = _answers(agent, topic, payload)
        assert [cls.TYPE for cls, _ in sent] == ["error"], sent
        return str(sent[0][1]["code"])

    cmd = agent.topics.cmd
    assert code(cmd, b"{oops") == Code.BAD_JSON
    assert code(cmd, b'{"v":1,"type":"selfdestruct","id":"a"}') == Code.UNKNOWN_TYPE
    assert code(cmd, b'{"v":1,"type":"deploy","id":"a"}') == Code.MISSING_FIELD
    assert code(cmd, b" " * 5000) == Code.PAYLOAD_TOO_LARGE
    other = DeployCommand(
        id="d-other", manifest=b"{}", signatures={}, files=(FileTransfer("m", SHA, 1, 1, 1),), device="dev-2"
    )
    assert code(cmd, other.to_wire()) == MISADDRESSED  # signed for dev-2: refused before the parser
    assert code(f"{agent.topics.device}/chunk/{SHA}/0", b"x") == Code.UNKNOWN_TRANSFER
    assert code(f"{agent.topics.device}/chunk/{SHA}/0", b"x" * 2000) == Code.CHUNK_OVERSIZE
    assert code(cmd, b'{"v":1,"type":"infer","id":"q","inputs":{}}') == Code.INFER_DISABLED


def test_unsigned_deploy_is_rejected_before_any_download(agent: Agent) -> None:
    manifest = json.dumps({"schema": "edgefleet.manifest/1", "name": "m"}).encode()
    cmd = DeployCommand(
        id="d-unsigned",
        manifest=manifest,
        signatures={"signatures": []},
        files=(FileTransfer("model.onnx", SHA, 10, 5, 2),),
    )
    sent = _answers(agent, agent.topics.cmd, cmd.to_wire())
    rejected = [f for cls, f in sent if cls is Rejected]
    assert rejected and rejected[0]["step"] == "verify-manifest"
    assert agent._pending is None and not any("artifact" in s for s in agent.session.subs)  # type: ignore[union-attr]


def test_status_and_rollback_without_a_model_answer(agent: Agent) -> None:
    sent = _answers(agent, agent.topics.cmd, b'{"v":1,"type":"status","id":"s1"}')
    assert any(cls is Result and f["ref"] == "s1" for cls, f in sent)
    sent = _answers(agent, agent.topics.cmd, b'{"v":1,"type":"rollback","id":"r1"}')
    assert [(cls.TYPE, f["code"], f["ref"]) for cls, f in sent] == [("error", "no-previous", "r1")]


def test_a_flood_of_bad_input_is_rate_limited_not_echoed(agent: Agent) -> None:
    agent._limiter = _ErrorLimiter(rate=1.0, burst=5)
    try:
        sent = []
        for _ in range(200):
            sent += _answers(agent, agent.topics.cmd, b"{")
        assert 5 <= len(sent) <= 10
        agent._limiter.tokens = 1
        last = _answers(agent, agent.topics.cmd, b"{")
        assert "suppressed" in last[0][1]["reason"]
    finally:
        agent._limiter = _ErrorLimiter(rate=1e9, burst=1e9)


def test_deploy_flow_refuses_bad_chunks_then_installs_what_arrived(agent: Agent) -> None:
    from edgefleet.sdk.fleet.transfer import BundleTransfer

    # prepare: a signed deploy command for this device, as the fleet's sender builds it
    bundle = agent.state_dir.parent / "bundle"
    transfer = BundleTransfer(bundle, chunk_size=512)
    cmd = transfer.deploy_command("d-flow", "dev-1")
    model = next(f for f in cmd.files if f.file == "model.onnx")
    # act: the command is verified and the download starts
    sent = _answers(agent, agent.topics.cmd, cmd.to_wire())
    assert [f["step"] for c, f in sent if c.TYPE == "progress"] == ["verify-manifest", "download"]
    assert agent.topics.artifact_filter(model.sha256) in agent.session.subs  # type: ignore[union-attr]
    # bad chunks for the open transfer: each answered with its code, nothing stored
    repair = f"{agent.topics.device}/chunk/{model.sha256}"
    bad = {
        f"{repair}/{model.chunks}": (b"x" * 10, Code.CHUNK_INDEX),
        f"{repair}/0": (b"x" * 513, Code.CHUNK_OVERSIZE),
        f"{repair}/1": (b"x" * 100, Code.CHUNK_SIZE),
        f"{repair}/2": (b"\0" * 512, Code.CHUNK_HASH),
    }
    for topic, (payload, code) in bad.items():
        answer = _answers(agent, topic, payload)
        assert [(c.TYPE, f["code"]) for c, f in answer] == [("error", code)], topic
    assert agent._pending is not None and agent._pending.transfers[model.sha256].received == 0
    # every chunk, some twice, over broadcast and repair topics
    for spec in cmd.files:
        for i in range(spec.chunks):
            for topic in (agent.topics.artifact(spec.sha256, i), agent.topics.repair(spec.sha256, i)):
                assert (
                    _answers(agent, topic, transfer.blobs[spec.sha256].chunk(i)) == [] or i == spec.chunks - 1
                )
    assert agent._install_thread is not None
    agent._install_thread.join(10)
    # assert: the installer got the exact files, and its refusal became a Rejected event with its step
    installer = agent.installer
    assert installer.staged["model.onnx"] == (bundle / "model.onnx").read_bytes()  # type: ignore[union-attr]
    outcome = [f for c, f in agent.session.sent if c.TYPE == "rejected" and f["deploy"] == "d-flow"]  # type: ignore[union-attr]
    assert outcome == [
        {
            "deploy": "d-flow",
            "step": "load",
            "code": "runtime-failed",
            "reason": "this stand-in installs nothing",
        }
    ]
    assert agent._pending is None and not (agent.state_dir / "deploy.json").exists()
    # the same command again (a QoS 1 redelivery) gets the stored outcome, not a second download
    again = _answers(agent, agent.topics.cmd, cmd.to_wire())
    assert [(c.TYPE, f["code"]) for c, f in again] == [("rejected", "runtime-failed")]
