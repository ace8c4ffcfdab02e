"""MQTT session against a real Mosquitto: birth/will, persistent QoS 1, reconnect with backoff, seq, auth."""

from __future__ import annotations

import json
import queue
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.config import load_config
from edgefleet.agent.core.protocol import Error, Topics, parse_device_message
from edgefleet.agent.exitcodes import ExitCode
from edgefleet.agent.mqtt_session import Backoff, MqttSession, SeqCounter
from tests.agent_net_support import PERSISTENT_BROKER, Observer

pytestmark = pytest.mark.broker


def _observer(url: str, topic_filter: str) -> tuple[mqtt.Client, queue.Queue]:
    obs = Observer(url, topic_filter)
    return obs.client, obs.inbox


@pytest.fixture
def broker(mosquitto_factory):  # type: ignore[no-untyped-def]
    return mosquitto_factory(PERSISTENT_BROKER)


def _next(inbox: queue.Queue, want: Any, timeout: float = 10.0) -> tuple[str, Any, bool]:
    deadline = time.monotonic() + timeout
    while True:
        topic, payload, retain = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if want(topic, payload):
            return topic, parse_device_message(payload), retain


def _assert_retained_offline(url: str, topic: str) -> None:
    """A subscriber that comes later gets the offline state as a retained message."""
    late = Observer(url, topic)
    try:
        _, state, retained = late.next(lambda t, p: True, timeout=5)
        assert retained and state.online is False  # type: ignore[attr-defined]
    finally:
        late.close()


def _session(
    tmp_path: Path, url: str, fleet: str, version: str = "5", **extra: Any
) -> tuple[MqttSession, queue.Queue]:
    key = tmp_path / "k.pub"
    key.write_text("k")
    cfg = load_config(
        None,
        {
            "device_id": "dev-1",
            "profile": "x86-64",
            "trusted_keys": [str(key)],
            "broker": url,
            "fleet": fleet,
            "state_dir": str(tmp_path / "state"),
            "mqtt_version": version,
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


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_birth_commands_and_persistent_session_across_broker_restart(
    tmp_path, broker, fleet_name, version
) -> None:  # type: ignore[no-untyped-def]
    # prepare
    session, received = _session(tmp_path, broker.url, fleet_name, version)
    topics = session.topics
    obs, inbox = _observer(broker.url, Topics.fleet_filter(fleet_name))
    # act: connect; the retained birth says online
    session.start()
    assert session.wait_connected(10)
    _, birth, _ = _next(inbox, lambda t, p: t == topics.state)
    assert birth.online is True and birth.info["agent_version"] == "test"
    obs.publish(topics.cmd, b"hello", qos=1).wait_for_publish(5)
    assert received.get(timeout=5) == (topics.cmd, b"hello")
    # restart the broker: the session comes back by itself and resubscribes
    broker.restart()
    deadline = time.monotonic() + 15
    while (session.connects < 2 or not obs.is_connected()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.connects >= 2
    obs.publish(topics.cmd, b"again", qos=1).wait_for_publish(5)
    assert received.get(timeout=5) == (topics.cmd, b"again")
    # seq numbers are strictly increasing across everything sent
    session.send(Error, code="x", reason="y")
    _, err, _ = _next(inbox, lambda t, p: t == topics.evt)
    assert err.seq > birth.seq
    session.stop()
    _, bye, _ = _next(inbox, lambda t, p: t == topics.state and b'"online":false' in p)
    assert bye.online is False
    _assert_retained_offline(broker.url, topics.state)
    obs.loop_stop()
    obs.disconnect()


def test_messages_sent_while_offline_arrive_after_reconnect(tmp_path, broker, fleet_name) -> None:  # type: ignore[no-untyped-def]
    session, _ = _session(tmp_path, broker.url, fleet_name)
    obs, inbox = _observer(broker.url, session.topics.evt)
    session.start()
    assert session.wait_connected(10)
    broker.stop()
    deadline = time.monotonic() + 10
    while session.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    session.send(Error, code="queued", reason="sent while offline")
    broker.start()
    _, err, _ = _next(inbox, lambda t, p: b"queued" in p, timeout=15)
    assert err.code == "queued"
    session.stop()
    obs.loop_stop()


def test_last_will_marks_offline_when_the_link_dies(tmp_path, broker, fleet_name) -> None:  # type: ignore[no-untyped-def]
    session, _ = _session(tmp_path, broker.url, fleet_name, keepalive_s=5)
    _, inbox = _observer(broker.url, session.topics.state)
    session.start()
    assert session.wait_connected(10)
    _next(inbox, lambda t, p: b'"online":true' in p)
    # act: cut the socket without DISCONNECT, like a device losing power
    session._stop.set()
    session._client.socket().close()
    _, will, _ = _next(inbox, lambda t, p: b'"online":false' in p, timeout=15)
    assert will.online is False and will.seq == -1
    _assert_retained_offline(broker.url, session.topics.state)


def test_refused_credentials_are_fatal(tmp_path, mosquitto_factory, fleet_name) -> None:  # type: ignore[no-untyped-def]
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev", "right"], check=True, capture_output=True)
    broker = mosquitto_factory(
        # `user root` keeps a root-run broker from dropping to a user that cannot read tmp_path.
        f"listener {{port}} 127.0.0.1\nuser root\nallow_anonymous false\npassword_file {pw}\n"
    )
    session, _ = _session(tmp_path, broker.url, fleet_name, username="dev", password="wrong")
    session.start()
    deadline = time.monotonic() + 10
    while not session.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.fatal == ExitCode.BROKER_AUTH
    session.stop()
    ok, _ = _session(tmp_path, broker.url, fleet_name, username="dev", password="right")
    ok.start()
    assert ok.wait_connected(10)
    ok.stop()


def test_unreachable_broker_with_connect_timeout_is_fatal(tmp_path, fleet_name) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port

    session, _ = _session(tmp_path, f"mqtt://127.0.0.1:{free_port()}", fleet_name, connect_timeout_s=0.5)
    session.start()
    deadline = time.monotonic() + 10
    while not session.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.fatal == ExitCode.BROKER_UNREACHABLE
    session.stop()


def test_seq_counter_is_monotonic_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    first = SeqCounter(path, block=4)
    values = [first.next() for _ in range(10)]
    second = SeqCounter(path, block=4)  # as after kill -9: the unsaved tail is skipped, never reused
    later = [second.next() for _ in range(3)]
    assert values == sorted(set(values)) and min(later) > max(values)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(0.1, 2.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert delays[3] > delays[0] and max(delays) <= 2.0 and delays[-1] >= 1.0
    backoff.reset()
    assert backoff.next_delay() <= 0.1
    assert json.dumps(delays)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("client", [])):
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", *extra, cwd=d
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            cwd=d,
        )


def test_mutual_tls_with_client_certificate(tmp_path, mosquitto_factory, fleet_name) -> None:  # type: ignore[no-untyped-def]
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    broker = mosquitto_factory(
        "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\n"
        f"cafile {pki}/ca.pem\ncertfile {pki}/server.pem\nkeyfile {pki}/server.key\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    url = broker.url.replace("mqtt://", "mqtts://")
    session, _ = _session(
        tmp_path,
        url,
        fleet_name,
        tls_ca=str(pki / "ca.pem"),
        tls_cert=str(pki / "client.pem"),
        tls_key=str(pki / "client.key"),
    )
    session.start()
    try:
        assert session.wait_connected(10)
    finally:
        session.stop()
    # without a client certificate the handshake fails and the session keeps backing off, never connecting
    anonymous, _ = _session(tmp_path, url, fleet_name, tls_ca=str(pki / "ca.pem"))
    anonymous.start()
    try:
        assert not anonymous.wait_connected(1.5)
    finally:
        anonymous.stop()
