"""Issue 15 point 4 (device-side check): commands signed by the online key, bound to device, counter, expiry.

A replayed rollback, a signed deploy re-addressed to another device, an expired command and an unsigned
one are each refused with their own code; the counter survives a restart of the agent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from edgefleet.agent.core import command_auth as ca
from edgefleet.agent.core.commands import RollbackCommand, parse_command
from edgefleet.agent.core.trust import key_id

NOW = 1_800_000_000.0


@pytest.fixture
def online() -> SigningKey:
    return SigningKey(b"\x07" * 32)


def _guard(tmp_path: Path, online: SigningKey, device: str = "cam-1", **kw: bool) -> ca.CommandGuard:
    keys = {key_id(bytes(online.verify_key)): bytes(online.verify_key)}
    return ca.CommandGuard(device, keys, tmp_path / f"{device}-counter.json", **kw)


def _rollback(command_id: str = "rb-1") -> bytes:
    return RollbackCommand(id=command_id).to_wire()


def _deploy_like(device: str) -> bytes:
    # The fields that matter here; a real DeployCommand carries the manifest and files too.
    return json.dumps({"v": 1, "type": "deploy", "id": "d-1", "device": device}).encode()


def _code(guard: ca.CommandGuard, payload: bytes, now: float | None = NOW) -> str:
    with pytest.raises(ca.CommandAuthError) as caught:
        guard.check(payload, now=now)
    return caught.value.code


def test_a_signed_rollback_runs_once_and_its_replay_is_refused(tmp_path: Path, online: SigningKey) -> None:
    # prepare
    guard = _guard(tmp_path, online)
    signed = ca.sign_command(_rollback(), bytes(online), "cam-1", 5, now=NOW)
    # act
    accepted = guard.check(signed, now=NOW)
    replay = _code(guard, signed)
    # assert
    assert accepted["type"] == "rollback"
    assert parse_command(signed).id == "rb-1"  # the agent's parser still reads a signed command
    assert replay == ca.REPLAYED


def test_a_replay_is_refused_after_the_agent_restarts(tmp_path: Path, online: SigningKey) -> None:
    # prepare
    signed = ca.sign_command(_rollback(), bytes(online), "cam-1", 9, now=NOW)
    _guard(tmp_path, online).check(signed, now=NOW)
    # act: a new guard over the same state file (the agent restarted)
    code = _code(_guard(tmp_path, online), signed)
    # assert
    assert code == ca.REPLAYED


def test_a_deploy_re_addressed_to_another_device_is_refused(tmp_path: Path, online: SigningKey) -> None:
    # prepare: a deploy signed for cam-1
    signed = json.loads(ca.sign_command(_deploy_like("cam-1"), bytes(online), "cam-1", 1, now=NOW))
    # act: delivered to cam-2 as is, and with its `device` field edited to cam-2
    as_is = _code(_guard(tmp_path, online, "cam-2"), json.dumps(signed).encode())
    signed["device"] = "cam-2"
    edited = _code(_guard(tmp_path, online, "cam-2"), json.dumps(signed).encode())
    signed["auth"]["device"] = "cam-2"
    both = _code(_guard(tmp_path, online, "cam-2"), json.dumps(signed).encode())
    # assert
    assert as_is == ca.MISADDRESSED
    assert edited == ca.BAD_SIGNATURE or edited == ca.MISADDRESSED
    assert both == ca.BAD_SIGNATURE  # the signature covers the address


def test_an_expired_command_is_refused(tmp_path: Path, online: SigningKey) -> None:
    signed = ca.sign_command(_rollback(), bytes(online), "cam-1", 1, expires=NOW - 3600, now=NOW - 7200)
    assert _code(_guard(tmp_path, online), signed) == ca.EXPIRED


def test_an_unsigned_command_is_refused_unless_the_compatibility_switch_allows_it(
    tmp_path: Path, online: SigningKey
) -> None:
    assert _code(_guard(tmp_path, online), _rollback()) == ca.UNSIGNED
    assert _guard(tmp_path, online, allow_unsigned=True).check(_rollback(), now=NOW)["type"] == "rollback"


def test_a_command_signed_by_the_offline_bundle_key_or_edited_is_refused(
    tmp_path: Path, online: SigningKey
) -> None:
    # prepare
    bundle_key = SigningKey(b"\x09" * 32)  # the offline key: trusted for bundles, never for commands
    by_bundle_key = ca.sign_command(_rollback(), bytes(bundle_key), "cam-1", 1, now=NOW)
    edited = json.loads(ca.sign_command(_rollback(), bytes(online), "cam-1", 2, now=NOW))
    edited["auth"]["counter"] = 99
    # act / assert
    assert _code(_guard(tmp_path, online), by_bundle_key) == ca.BAD_SIGNATURE
    assert _code(_guard(tmp_path, online), json.dumps(edited).encode()) == ca.BAD_SIGNATURE


def test_commands_out_of_signing_order_run_once_within_the_reorder_window(
    tmp_path: Path, online: SigningKey
) -> None:
    # prepare: two host processes signed 40 s apart; the later one arrives first
    guard = _guard(tmp_path, online)
    early, late = 1_000_000, 1_040_000
    old = 1_040_000 - ca.REORDER_WINDOW - 1
    # act
    guard.check(ca.sign_command(_rollback("late"), bytes(online), "cam-1", late, now=NOW), now=NOW)
    first = guard.check(ca.sign_command(_rollback("early"), bytes(online), "cam-1", early, now=NOW), now=NOW)
    again = _code(
        _guard(tmp_path, online), ca.sign_command(_rollback("x"), bytes(online), "cam-1", early, now=NOW)
    )
    too_old = _code(guard, ca.sign_command(_rollback("old"), bytes(online), "cam-1", old, now=NOW))
    # assert: the early one ran once, even after a restart it stays a replay; older than the window never
    assert first["id"] == "early"
    assert again == ca.REPLAYED and too_old == ca.REPLAYED


def test_a_counter_file_of_the_previous_format_still_refuses_its_counter(
    tmp_path: Path, online: SigningKey
) -> None:
    (tmp_path / "cam-1-counter.json").write_text(json.dumps({"counter": 500}))
    guard = _guard(tmp_path, online)
    assert _code(guard, ca.sign_command(_rollback(), bytes(online), "cam-1", 499, now=NOW)) == ca.REPLAYED
    assert guard.check(ca.sign_command(_rollback(), bytes(online), "cam-1", 501, now=NOW), now=NOW)


def test_agents_refuse_unsigned_commands_unless_configured_not_to(tmp_path: Path) -> None:
    from edgefleet.agent.config import load_config

    key = tmp_path / "fleet.pub"
    key.write_text("x")
    base = {
        "device_id": "cam-1",
        "profile": "generic-cpu",
        "trusted_keys": [str(key)],
        "state_dir": str(tmp_path),
    }
    assert load_config(None, base).require_signed_commands is True
    assert load_config(None, {**base, "require_signed_commands": False}).require_signed_commands is False


def test_the_host_signs_a_fleets_commands_with_the_online_key_beside_its_trusted_key(tmp_path: Path) -> None:
    from edgefleet.agent.core.topics import Topics
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.sdk.trust.command_signing import command_key_dir, sign_for_topic, use_command_keys
    from edgefleet.sdk.trust.keys import init_keys, load_host_root

    # prepare: the fleet key and its online key in a folder of their own, not the default one
    keys = init_keys(tmp_path / "k")
    fleet = "f-" + tmp_path.name[-8:]
    # act
    found = use_command_keys(fleet, [keys.public_path])
    wire = sign_for_topic(Topics(fleet, "cam-1").cmd, _rollback("r"))
    # assert: signed for cam-1, with a delegation the fleet's root accepts
    assert found == [tmp_path / "k"] and command_key_dir(fleet) == tmp_path / "k"
    guard = ca.CommandGuard("cam-1", {}, tmp_path / "g.json", root=TrustStore(load_host_root(tmp_path / "k")))
    assert guard.check(wire)["id"] == "r"
    assert sign_for_topic(Topics(fleet, "cam-1").evt, b"{}") == b"{}"  # only commands are signed


def test_keys_init_delegates_an_online_key_and_a_rotation_delegates_it_again(tmp_path: Path) -> None:
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.sdk.trust.command_signing import CommandSigner, redelegate
    from edgefleet.sdk.trust.keys import init_keys, load_host_root, load_private_key, make_rotation

    # prepare: a fleet key (with its online key) and a rotation to a new key only
    old, new = init_keys(tmp_path / "k"), init_keys(tmp_path / "n")
    keys = [load_private_key(old.private_path), load_private_key(new.private_path)]
    first_root = TrustStore(load_host_root(tmp_path / "k"))
    rotated = TrustStore(make_rotation(load_host_root(tmp_path / "k"), [str(new.public_path)], keys)["root"])
    signer = CommandSigner.load(tmp_path / "k")
    assert signer is not None
    # act / assert: delegated by the first root; after the rotation only once delegated again
    assert _guard_on(tmp_path, first_root).check(signer.sign(_rollback("a"), "cam-1"))["id"] == "a"
    stale = signer.sign(_rollback("b"), "cam-1")
    assert _code(_guard_on(tmp_path, rotated, "r1"), stale, now=None) == ca.BAD_SIGNATURE
    assert redelegate(tmp_path / "k", [keys[1]])
    again = CommandSigner.load(tmp_path / "k")
    assert again is not None and again.seed == signer.seed  # the same online key, delegated anew
    assert _guard_on(tmp_path, rotated, "r2").check(again.sign(_rollback("c"), "cam-1"))["id"] == "c"


def _guard_on(tmp_path: Path, root: object, name: str = "g") -> ca.CommandGuard:
    return ca.CommandGuard("cam-1", {}, tmp_path / f"{name}.json", root=root)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# End to end: a real agent that requires signed commands, a real broker, the real Fleet (it signs).


class _Errors:
    """Every `error` event the devices of a fleet send, as (device, code, ref)."""

    def __init__(self, url: str, fleet: str) -> None:
        import threading
        import uuid

        import paho.mqtt.client as mqtt

        from edgefleet.agent.core.events import Error, parse_device_message
        from edgefleet.agent.core.topics import Topics

        self.seen: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()

        def on_message(c: Any, u: Any, m: Any) -> None:
            try:
                message = parse_device_message(bytes(m.payload))
            except Exception:
                return
            if isinstance(message, Error):
                with self._lock:
                    self.seen.append((message.device, str(message.code), str(message.ref)))

        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"err-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(Topics.devices(fleet, "evt"), qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.on_message = on_message
        host, port = url.split("://")[1].split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10)

    def codes(self, device: str, ref: str) -> list[str]:
        with self._lock:
            return [code for d, code, r in self.seen if d == device and r == ref]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
@pytest.mark.broker
def test_a_real_agent_refuses_replayed_readdressed_expired_and_unsigned_commands(
    tmp_path: Path, mosquitto: Any, fleet_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import paho.mqtt.client as mqtt

    from edgefleet.agent.core.topics import Topics
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.store import Store
    from edgefleet.sdk.trust.command_signing import CommandSigner
    from tests.fleet_support import agents, build_artifacts, wait_for, wait_online

    # prepare: the fleet key and its online key in the host's default key folder; agents that refuse
    # unsigned commands
    art = build_artifacts(tmp_path / "art")
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "art"))
    signer = CommandSigner.load(tmp_path / "art" / "keys")
    assert signer is not None
    config = tmp_path / "agent.toml"
    config.write_text("require_signed_commands = true\n")
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[art["key"]])
    errors = _Errors(mosquitto.url, fleet_name)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.port)
    raw.loop_start()

    def send(device: str, payload: bytes) -> None:
        raw.publish(Topics(fleet_name, device).cmd, payload, qos=1).wait_for_publish(10)

    def active(device: str) -> Any:
        state = json.loads((tmp_path / device / "install.json").read_text())
        manifest = tmp_path / device / "slots" / str(state.get("active")) / "manifest.json"
        return json.loads(manifest.read_text())["version"]

    try:
        with agents(tmp_path, mosquitto.url, fleet_name, art["key"], ["c1", "c2"], "--config", str(config)):
            wait_online(store, fleet_name, fleet.options, ["c1", "c2"])
            # act 1: the host's own (signed) deploys go through
            assert fleet.deploy(art["v1"], "all", timeout_s=60).status == "succeeded"
            assert fleet.deploy(art["v2"], "all", timeout_s=60).status == "succeeded"
            # act 2: a signed rollback for c1 runs; the same bytes again are a replay
            rollback = signer.sign(RollbackCommand(id="rb-1").to_wire(), "c1")
            send("c1", rollback)
            wait_for(lambda: active("c1") == 1, 30, "c1 to roll back to v1")
            send("c1", rollback)
            wait_for(lambda: ca.REPLAYED in errors.codes("c1", "rb-1"), 30, "the replay refused")
            # act 3: c1's signed rollback delivered to c2; an expired one; an unsigned one
            send("c2", signer.sign(RollbackCommand(id="rb-2").to_wire(), "c1"))
            late = ca.sign_command(
                RollbackCommand(id="rb-3").to_wire(),
                signer.seed,
                "c2",
                signer.counter(),
                expires=time.time() - 3600,
                delegation=signer.delegation,
            )
            send("c2", late)
            send("c2", RollbackCommand(id="rb-4").to_wire())
            for ref, code in (("rb-2", ca.MISADDRESSED), ("rb-3", ca.EXPIRED), ("rb-4", ca.UNSIGNED)):
                wait_for(lambda r=ref, k=code: k in errors.codes("c2", r), 30, f"{ref} refused with {code}")
            # assert: c1 stayed on v1 after the replay, c2 never left v2
            assert active("c1") == 1
            assert active("c2") == 2
    finally:
        raw.loop_stop()
        errors.close()
        fleet.close()
        store.close()


def test_a_host_given_no_trusted_key_finds_the_online_key_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.sdk.trust.command_signing import COMMAND_KEYS_ENV, command_key_dir

    # prepare: a fleet nothing registered (e.g. `edgefleet rollout --resume` in a new process)
    fleet = "unregistered-" + tmp_path.name[-8:]
    # act
    monkeypatch.setenv(COMMAND_KEYS_ENV, str(tmp_path / "k"))
    chosen = command_key_dir(fleet)
    # assert
    assert chosen == tmp_path / "k"


def test_a_repeated_deploy_reaches_its_idempotent_handler_but_a_repeated_rollback_is_refused(
    tmp_path: Path, online: SigningKey
) -> None:
    # prepare: a broker redelivers both after they ran (a NATS node failover does)
    guard = _guard(tmp_path, online)
    deploy = ca.sign_command(_deploy_like("cam-1"), bytes(online), "cam-1", 10, now=NOW)
    rollback = ca.sign_command(_rollback(), bytes(online), "cam-1", 11, now=NOW)
    guard.check(deploy, now=NOW)
    guard.check(rollback, now=NOW)
    # act
    again = guard.check(deploy, now=NOW)
    # assert: the deploy handler answers it by id (no second install); a rollback would switch again
    assert again["id"] == "d-1"
    assert _code(guard, rollback) == ca.REPLAYED
