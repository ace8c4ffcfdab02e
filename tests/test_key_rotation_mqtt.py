"""Key rotation over MQTT: `rotate-root` commands, refused below threshold with the trust code, applied
when valid (also on a device that was offline), after which bundles signed by the new key install."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.agent.core.manifest import canonical_bytes
from edgefleet.agent.core.protocol import Code, Error, RotateRootCommand, State, Topics
from edgefleet.agent.core.trust import ROOT_FILE, load_public_key_pem, make_root
from edgefleet.sdk.cli import app
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.rotation import push_rotation, rotation_command
from edgefleet.sdk.trust.command_signing import use_command_keys
from edgefleet.sdk.trust.keys import (
    init_keys,
    load_host_root,
    load_private_key,
    make_rotation,
    sign,
)
from tests.agent_net_support import IN_FEATURES, Observer
from tests.chaos_agent_support import Models, in_process_agent, signed_bundle, wait_until
from tests.command_support import signed
from tests.fleet_support import Host


def _push(bundle: Path, url: str, fleet: str, device: str) -> dict:
    """Deploy with the fleet's sender; the device's status and, when it refused, its step, code and reason.

    The host trusts no key here (it checks files only), so what a device trusts is what decides.
    """
    host = Host(url, fleet, bundle.parent / f"host-{bundle.name}-{device}", None)
    try:
        outcome = host.deploy(bundle, device, timeout_s=60, chunk_size=1024)
    finally:
        host.close()
    refused = outcome.rejected
    details = {"step": refused.step, "code": refused.code, "reason": refused.reason} if refused else {}
    return {"status": outcome.status, **details}


def _serving_version(agent) -> int:  # type: ignore[no-untyped-def]
    x = np.zeros((1, IN_FEATURES), np.float32)
    return int(agent.infer({"x": x}).model_version)


@pytest.mark.broker
def test_rotation_below_threshold_is_refused_then_a_valid_one_lets_the_new_key_install(
    tmp_path: Path, mosquitto, fleet_name: str
) -> None:  # type: ignore[no-untyped-def]
    # prepare: the fleet's current key, the key that replaces it, two models, two devices
    old, new = init_keys(tmp_path / "old"), init_keys(tmp_path / "new")
    old_key, new_key = load_private_key(old.private_path), load_private_key(new.private_path)
    use_command_keys(fleet_name, [old.public_path])  # the host signs commands with the old key's online key
    models = Models.make(tmp_path / "models")
    url = mosquitto.url
    dev1 = in_process_agent(tmp_path / "dev-1", url, fleet_name, old.public_path, "dev-1")
    # dev-2 has been online once (its persistent session subscribes to cmd) and is offline now
    dev2 = in_process_agent(tmp_path / "dev-2", url, fleet_name, old.public_path, "dev-2")
    dev2.stop()
    obs = Observer(url, Topics.devices(fleet_name, "state"))
    try:
        assert (
            _push(signed_bundle(tmp_path / "v1", old_key, *models.pick(1), 1), url, fleet_name, "dev-1")[
                "status"
            ]
            == "deployed"
        )
        by_new_key = signed_bundle(tmp_path / "v2", new_key, *models.pick(2), 2)
        before = _push(by_new_key, url, fleet_name, "dev-1")
        assert (before["status"], before["code"]) == ("rejected", "untrusted-key")
        root_file = (tmp_path / "dev-1" / ROOT_FILE).read_bytes()

        # act 1: a rotation signed by the new key alone (an attacker's key swap) is below threshold
        doc = make_root(
            [load_public_key_pem(new.public_path)],
            version=2,
            expires=datetime.now(timezone.utc) + timedelta(days=1),
        )
        forged = {"root": doc, "signatures": [sign(canonical_bytes(doc), new_key)]}
        refused = push_rotation(forged, "dev-1", broker=url, fleet=fleet_name, timeout_s=30)["dev-1"]
        # assert: refused with the trust code, nothing changed on the device
        assert (refused.status, refused.code) == ("refused", "rotation-threshold-not-met"), refused
        assert "current root (version 1)" in refused.reason
        assert dev1.trust.version == 1 and (tmp_path / "dev-1" / ROOT_FILE).read_bytes() == root_file
        assert _push(by_new_key, url, fleet_name, "dev-1")["code"] == "untrusted-key"

        # act 2: the real rotation (old and new key sign), pushed with the CLI to every device
        statement = make_rotation(load_host_root(tmp_path / "old"), [new.public_path], [old_key, new_key])
        path = tmp_path / "root-v2.json"
        path.write_text(json.dumps(statement))
        result = CliRunner().invoke(
            app,
            [
                "keys",
                "push-rotation",
                str(path),
                "--to",
                "all",
                "--broker",
                url,
                "--fleet",
                fleet_name,
                "--timeout",
                "30",
                "--json",
            ],
        )
        # assert: the online device applied it, the offline one has it queued
        assert result.exit_code == 0, result.output
        rows = {r["device_id"]: r for r in json.loads(result.stdout)}
        assert (rows["dev-1"]["status"], rows["dev-1"]["root_version"]) == ("applied", 2)
        assert rows["dev-2"]["status"] == "queued"
        assert dev1.trust.version == 2 and dev1.trust.keyids == [new.keyid]
        use_command_keys(fleet_name, [new.public_path])  # commands now need the new root's delegation
        _, state, _ = obs.next(
            lambda t, p: "/dev-1/state" in t and json.loads(p).get("root_version") == 2, timeout=10
        )
        assert isinstance(state, State) and state.online

        # the bundle signed by the new key installs and serves; one signed by the old key is refused
        assert _push(by_new_key, url, fleet_name, "dev-1")["status"] == "deployed"
        assert _serving_version(dev1) == 2
        stale = _push(signed_bundle(tmp_path / "v3", old_key, *models.pick(3), 3), url, fleet_name, "dev-1")
        assert (stale["status"], stale["code"]) == ("rejected", "untrusted-key")
        assert _serving_version(dev1) == 2

        # the same rotation again changes nothing and says so (QoS 1 redelivery, repeated push)
        fleet = Fleet(
            broker=url, store=f"sqlite:///{tmp_path / 'fleet.db'}", fleet=fleet_name, trusted_keys=[]
        )
        try:
            again = fleet.push_rotation(path, "dev-1", timeout_s=30)["dev-1"]
        finally:
            fleet.close()
        assert (again.status, again.root_version) == ("already", 2)

        # the offline device applies the queued rotation as soon as it is back
        dev2 = in_process_agent(tmp_path / "dev-2", url, fleet_name, old.public_path, "dev-2")
        wait_until(lambda: dev2.trust.version == 2, 20, "dev-2 to apply the queued rotation")
        assert dev2.trust.keyids == [new.keyid]
    finally:
        obs.close()
        dev1.stop()
        dev2.stop()


@pytest.mark.broker
def test_malformed_and_out_of_order_rotations_answer_error_events(
    tmp_path: Path, mosquitto, fleet_name: str
) -> None:  # type: ignore[no-untyped-def]
    # prepare
    old, new = init_keys(tmp_path / "old"), init_keys(tmp_path / "new")
    old_key, new_key = load_private_key(old.private_path), load_private_key(new.private_path)
    agent = in_process_agent(tmp_path / "dev-1", mosquitto.url, fleet_name, old.public_path, "dev-1")
    obs = Observer(mosquitto.url, Topics(fleet_name, "dev-1").evt)
    raw_new = load_public_key_pem(new.public_path)

    def answer(cmd_id: str, payload: bytes) -> Error:
        obs.publish(agent.topics.cmd, signed(tmp_path / "old", payload, "dev-1"))
        _, msg, _ = obs.next(lambda t, p: f'"ref":"{cmd_id}"' in p.decode(), timeout=15)
        assert isinstance(msg, Error), msg
        return msg

    def rotation(cmd_id: str, doc: dict, *keys: object, raw: bytes | None = None) -> bytes:
        doc_bytes = raw if raw is not None else canonical_bytes(doc)
        sigs = tuple(sign(canonical_bytes(doc), k) for k in keys)  # type: ignore[arg-type]
        return RotateRootCommand(id=cmd_id, root=doc_bytes, signatures=sigs).to_wire()

    try:
        v3 = make_root([raw_new], version=3)
        v2 = make_root([raw_new], version=2)
        expired = make_root([raw_new], version=2, expires=datetime.now(timezone.utc) - timedelta(seconds=1))
        cases = {
            # act / assert: each refusal carries its own code, the root stays at version 1
            "skip": (rotation("skip", v3, old_key, new_key), "root-version"),
            "expired": (rotation("expired", expired, old_key, new_key), "root-expired"),
            "spaced": (
                rotation("spaced", v2, old_key, new_key, raw=json.dumps(v2, indent=1).encode()),
                "root-invalid",
            ),
            "unsigned": (rotation("unsigned", v2), "rotation-threshold-not-met"),
            "garbage": (
                json.dumps(
                    {"v": 1, "type": "rotate-root", "id": "garbage", "root": "!!", "signatures": []}
                ).encode(),
                Code.BAD_FIELD,
            ),
            "nosigs": (
                json.dumps({"v": 1, "type": "rotate-root", "id": "nosigs", "root": "e30="}).encode(),
                Code.MISSING_FIELD,
            ),
        }
        for cmd_id, (payload, code) in cases.items():
            assert answer(cmd_id, payload).code == code, cmd_id
        assert agent.trust.version == 1 and agent.trust.keyids == [old.keyid]
    finally:
        obs.close()
        agent.stop()


@pytest.mark.broker
def test_a_rotation_sent_during_an_install_is_refused_busy_then_applied(
    tmp_path: Path, mosquitto, fleet_name: str
) -> None:  # type: ignore[no-untyped-def]
    # prepare: an install whose health check runs long (100,000 warm-up runs of the tiny model)
    old, new = init_keys(tmp_path / "old"), init_keys(tmp_path / "new")
    old_key, new_key = load_private_key(old.private_path), load_private_key(new.private_path)
    use_command_keys(fleet_name, [old.public_path])
    models = Models.make(tmp_path / "models")
    agent = in_process_agent(tmp_path / "dev-1", mosquitto.url, fleet_name, old.public_path, "dev-1")
    obs = Observer(mosquitto.url, Topics(fleet_name, "dev-1").evt)
    slow = signed_bundle(
        tmp_path / "slow",
        old_key,
        *models.pick(1),
        1,
        health={"min_accuracy": 0.9, "max_p95_ms": 1000.0, "warmup_runs": 100_000, "timeout_s": 120},
    )
    outcome: dict = {}
    pushing = threading.Thread(target=lambda: outcome.update(_push(slow, mosquitto.url, fleet_name, "dev-1")))
    statement = make_rotation(load_host_root(tmp_path / "old"), [new.public_path], [old_key, new_key])
    command = rotation_command(statement, "rot-during-install")
    try:
        pushing.start()
        obs.next(lambda t, p: b'"step":"health"' in p, timeout=60)
        # act: the rotation arrives while the install verifies with the trust store
        obs.publish(agent.topics.cmd, signed(tmp_path / "old", command.to_wire(), "dev-1"))
        _, answer, _ = obs.next(lambda t, p: b'"ref":"rot-during-install"' in p, timeout=30)
        # assert: refused as busy (so no install ever sees two roots), nothing changed
        assert isinstance(answer, Error) and answer.code == Code.BUSY and "rotation" in answer.reason, answer
        assert agent.trust.version == 1
        # the host's sender retries a busy device with backoff until it applies
        rotated = push_rotation(statement, "dev-1", broker=mosquitto.url, fleet=fleet_name, timeout_s=120)[
            "dev-1"
        ]
        assert (rotated.status, rotated.root_version) == ("applied", 2)
        pushing.join(120)
        assert outcome["status"] == "deployed" and agent.trust.version == 2
    finally:
        obs.close()
        agent.stop()


def test_push_rotation_refuses_a_missing_or_malformed_statement_before_connecting(tmp_path: Path) -> None:
    # prepare: nothing listens on this broker URL, so any attempt to connect would fail differently
    broker = "mqtt://127.0.0.1:9"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"root": {"schema": "something else"}, "signatures": []}))
    runner = CliRunner()
    # act / assert: each names the problem and how to make a good statement
    missing = runner.invoke(app, ["keys", "push-rotation", str(tmp_path / "nope.json"), "--broker", broker])
    assert missing.exit_code == 1 and "statement-missing" in missing.output
    malformed = runner.invoke(app, ["keys", "push-rotation", str(bad), "--broker", broker])
    assert malformed.exit_code == 1 and "root-invalid" in malformed.output
    assert "edgefleet keys rotate" in malformed.output
