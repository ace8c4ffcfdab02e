"""Agent MQTT session on real brokers: MQTT 5 → 3.1.1 fallback (aedes, amqtt), the protocol exit code, the
connect timeout while a broker stays silent, and failover between several brokers with failback."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import load_config
from edgefleet.agent.core.errors import ConfigError
from edgefleet.agent.core.protocol import State, Topics, parse_device_message
from edgefleet.agent.exitcodes import ExitCode
from edgefleet.agent.mqtt_session import CONNACK_TIMEOUT_S, MqttSession, SeqCounter
from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect
from tests import interop_support
from tests.conftest import free_port

# The brokers' fixtures, shared with the interop suite.
aedes = interop_support.aedes
amqtt_broker = interop_support.amqtt_broker

pytestmark = pytest.mark.broker


def _session(tmp_path: Path, broker: str, fleet: str, **extra: Any) -> tuple[MqttSession, queue.Queue]:
    key = tmp_path / "k.pub"
    key.write_text("k")
    cfg = load_config(
        None,
        {
            "device_id": "dev-1",
            "profile": "x86-64",
            "trusted_keys": [str(key)],
            "broker": broker,
            "fleet": fleet,
            "state_dir": str(tmp_path / "state"),
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **extra,
        },
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    received: queue.Queue = queue.Queue()
    session = MqttSession(
        cfg,
        Topics(fleet, "dev-1"),
        SeqCounter(tmp_path / "state" / "seq"),
        on_message=lambda t, p: received.put((t, p)),
        birth=lambda: {"agent_version": "test"},
    )
    return session, received


def _wait_stopped(session: MqttSession, timeout: float) -> float:
    """Seconds until the session ended by itself (fails after `timeout`)."""
    started = time.monotonic()
    while not session.stopped:
        assert time.monotonic() - started < timeout, "the session did not end"
        time.sleep(0.02)
    return time.monotonic() - started


def _birth_and_command(session: MqttSession, received: queue.Queue, url: str) -> None:
    """The retained birth reaches a subscriber, and a command reaches the session.

    The subscriber is a host connection (MQTT 5, or 3.1.1 where the broker refuses 5).
    """
    topics = session.topics
    states: queue.Queue = queue.Queue()
    conn = connect(MqttOptions(url), on_message=lambda t, p, r: states.put(p))
    try:
        conn.subscribe([(topics.state, 1)])
        state = parse_device_message(states.get(timeout=10))
        assert isinstance(state, State) and state.online is True
        conn.publish(topics.cmd, b"hello").wait_for_publish(5)
        assert received.get(timeout=10) == (topics.cmd, b"hello")
    finally:
        conn.close()


def test_default_settings_connect_to_aedes_with_mqtt311(tmp_path: Path, aedes: Any, fleet_name: str) -> None:
    # prepare: default mqtt_version (auto); aedes refuses MQTT 5 with reason 0x84
    session, received = _session(tmp_path, aedes.url, fleet_name)
    assert session.config.mqtt_version == "auto"
    # act
    session.start()
    try:
        assert session.wait_connected(10), "no connection to aedes"
        # assert
        assert session.mqtt_version == "3.1.1" and session.fatal is None
        _birth_and_command(session, received, aedes.url)
    finally:
        session.stop()


def test_default_settings_connect_to_amqtt_with_a_will(
    tmp_path: Path, amqtt_broker: Any, fleet_name: str
) -> None:
    # prepare: amqtt never answers an MQTT 5 CONNECT that carries a Will (the agent always sets one)
    session, received = _session(tmp_path, amqtt_broker.url, fleet_name)
    started = time.monotonic()
    # act
    session.start()
    try:
        assert session.wait_connected(CONNACK_TIMEOUT_S + 10), "no connection to amqtt"
        # assert: one silent MQTT 5 attempt, then 3.1.1, well before paho's keepalive would give up
        assert time.monotonic() - started < CONNACK_TIMEOUT_S + 5
        assert session.mqtt_version == "3.1.1"
        _birth_and_command(session, received, amqtt_broker.url)
    finally:
        session.stop()


def test_mqtt5_only_on_a_broker_without_it_exits_with_the_protocol_code(
    tmp_path: Path, aedes: Any, fleet_name: str
) -> None:
    # prepare
    session, _ = _session(tmp_path, aedes.url, fleet_name, mqtt_version="5")
    # act
    session.start()
    took = _wait_stopped(session, 10)
    # assert: not "bad credentials" (6), and not retried forever
    assert session.fatal == ExitCode.BROKER_PROTOCOL
    assert "protocol version" in session.fatal_reason and aedes.url in session.fatal_reason
    assert took < 5
    session.stop()


def test_connect_timeout_fires_while_the_broker_stays_silent(
    tmp_path: Path, amqtt_broker: Any, fleet_name: str
) -> None:
    # prepare: MQTT 5 forced, so amqtt accepts the TCP connection and never answers the CONNECT
    session, _ = _session(tmp_path, amqtt_broker.url, fleet_name, mqtt_version="5", connect_timeout_s=1.0)
    # act
    session.start()
    took = _wait_stopped(session, 10)
    # assert: the timeout holds during the handshake (it used to fire after ~30 s)
    assert session.fatal == ExitCode.BROKER_UNREACHABLE
    assert took < 2.5, f"connect timeout 1 s fired after {took:.1f} s"
    session.stop()


def test_brokers_are_tried_in_turn_and_the_first_is_taken_back(
    tmp_path: Path, mosquitto_factory: Any, fleet_name: str
) -> None:
    # prepare: the first broker is down (its port reserved), the second runs
    first = mosquitto_factory(start=False)
    second = mosquitto_factory()
    session, received = _session(
        tmp_path, f"{first.url}, {second.url}", fleet_name, failback_s=0.3, connect_timeout_s=10
    )
    # act: the session fails over to the second
    session.start()
    try:
        assert session.wait_connected(10)
        assert session.broker_url == second.url and session.mqtt_version == "5"
        _birth_and_command(session, received, second.url)
        # act: the first comes up; the session moves back to it by itself
        first.start()
        deadline = time.monotonic() + 15
        while not (session.broker_url == first.url and session.connected.is_set()):
            assert time.monotonic() < deadline, "the session did not move back to the first broker"
            time.sleep(0.05)
        # assert
        _birth_and_command(session, received, first.url)
        # act: the first dies; the session fails over again
        first.stop(kill=True)
        deadline = time.monotonic() + 15
        while not (session.broker_url == second.url and session.connected.is_set()):
            assert time.monotonic() < deadline, "the session did not fail over again"
            time.sleep(0.05)
        assert session.connects >= 3
    finally:
        session.stop()


def test_every_broker_down_with_a_timeout_names_them_all(tmp_path: Path, fleet_name: str) -> None:
    # prepare
    urls = [f"mqtt://127.0.0.1:{free_port()}", f"mqtt://127.0.0.1:{free_port()}"]
    session, _ = _session(tmp_path, ",".join(urls), fleet_name, connect_timeout_s=0.5)
    # act
    session.start()
    took = _wait_stopped(session, 10)
    # assert
    assert session.fatal == ExitCode.BROKER_UNREACHABLE and took < 2
    assert all(u in session.fatal_reason for u in urls)


def test_broker_lists_from_flags_and_toml(tmp_path: Path) -> None:
    # prepare
    key = tmp_path / "k.pub"
    key.write_text("k")
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "d"\nprofile = "x86-64"\ntrusted_keys = ["{key}"]\n'
        'broker = ["mqtt://a:1883", "mqtt://b:1884"]\n'
    )
    from edgefleet.agent.cli import _overrides, build_parser

    args = build_parser().parse_args(
        [
            *("--device-id", "d", "--profile", "x86-64", "--trusted-key", str(key)),
            *("--broker", "mqtt://a:1883,mqtt://b:1884", "--broker", "mqtt://c"),
        ]
    )
    # act
    from_flags = load_config(None, _overrides(args))
    from_file = load_config(str(toml))
    # assert
    assert from_flags.brokers == ("mqtt://a:1883", "mqtt://b:1884", "mqtt://c")
    assert from_file.brokers == ("mqtt://a:1883", "mqtt://b:1884")
    assert from_file.mqtt_version == "auto" and from_file.broker_port == 1883
    with pytest.raises(ConfigError, match="mix mqtt:// and mqtts://"):
        load_config(None, {**_overrides(args), "broker": "mqtt://a,mqtts://b"})
    with pytest.raises(ConfigError, match="'broker' 'http://b'"):
        load_config(None, {**_overrides(args), "broker": "mqtt://a,http://b"})


def test_protocol_exit_code_is_documented_in_help() -> None:
    # act
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    # assert
    assert "9  broker_protocol" in out and "auto" in out


def test_the_agent_process_exits_9_when_its_fixed_version_is_refused(tmp_path: Path, aedes: Any) -> None:
    # prepare
    from edgefleet.sdk.trust.keys import init_keys

    pub = str(init_keys(tmp_path / "keys").public_path)
    args = [sys.executable, "-m", "edgefleet.agent.cli", "--device-id", "pi-1", "--profile", "x86-64"]
    args += ["--trusted-key", pub, "--state-dir", str(tmp_path / "s"), "--no-http", "--broker", aedes.url]
    # act
    done = subprocess.run(
        [*args, "--mqtt-version", "5"], capture_output=True, text=True, timeout=60, check=False
    )
    # assert: its own code and a message that says what to change, not "bad credentials" (6)
    assert done.returncode == ExitCode.BROKER_PROTOCOL, done.stderr[-2000:]
    assert "refused the MQTT protocol version (tried 5)" in done.stderr
