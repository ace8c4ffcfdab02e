"""Issue 15 point 3: a device's valid certificate must not take over another device's client id.

Mosquitto started from the config `edgefleet credentials mosquitto-conf` generates. Device client ids
are predictable (`edgefleet-{fleet}-{device}`): before the fix (one TLS listener, client ids as the
clients chose them), dev-b's certificate with dev-a's client id kicked dev-a off at will and, with a
clean start, erased the commands queued for it. The device listener now replaces every client id with
the certificate's CN (the login name in password mode); the host identity, whose processes connect
side by side under one identity, has a listener of its own that only the host CA's certificates
(the host's password) pass.
"""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.core.topics import Topics
from edgefleet.sdk.trust.credentials import Credentials, Identity
from tests.test_chaos_acl import host_port, start_broker

pytestmark = [pytest.mark.chaos, pytest.mark.broker]

TIMEOUT = 10.0


class Session:
    """A paho MQTT 5 client with a chosen client id and a persistent session."""

    def __init__(
        self,
        port: int,
        ident: Identity,
        client_id: str,
        *,
        clean_start: bool = False,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.inbox: queue.Queue[str] = queue.Queue()
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.refused: Any = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set(
            ca_certs=str(ident.ca),
            certfile=str(ident.cert) if ident.cert else None,
            keyfile=str(ident.key) if ident.key else None,
        )
        if login is not None:
            self.client.username_pw_set(*login)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, r, p: self.dropped.set()
        self.client.on_message = lambda c, u, m: self.inbox.put(m.topic)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
        self.client.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refused = reason
            self.dropped.set()
        else:
            self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _login(creds: Credentials, name: str) -> tuple[str, str] | None:
    """Username and password of `name` in password mode; None in certificate mode."""
    ident = creds.host() if name == creds.host_name else creds.device(name)
    if ident.password_file is None:
        return None
    return name, ident.password_file.read_text().strip()


@pytest.fixture(params=["cert", "password"])
def creds(request: Any, tmp_path: Path, fleet_name: str) -> Credentials:
    made = Credentials.init(tmp_path / "creds", fleet_name, auth=request.param)
    made.add_devices(["dev-a", "dev-b"])
    return made


def test_another_devices_certificate_cannot_take_over_a_client_id(
    mosquitto_factory: Any, creds: Credentials, fleet_name: str
) -> None:
    # prepare: dev-a has a persistent session subscribed to its commands, then goes offline; the
    # host queues a command for it
    broker = start_broker(mosquitto_factory, creds)
    a_id = f"edgefleet-{fleet_name}-dev-a"
    a_login, b_login = _login(creds, "dev-a"), _login(creds, "dev-b")
    cmd = Topics(fleet_name, "dev-a").cmd
    dev_a = Session(broker.port, creds.device("dev-a"), a_id, clean_start=True, login=a_login)
    assert dev_a.connected.wait(TIMEOUT)
    dev_a.client.subscribe(cmd, qos=1)
    dev_a.close()
    host_login = _login(creds, creds.host_name)
    host = Session(
        host_port(broker), creds.host(), f"edgefleet-host-{uuid.uuid4().hex[:8]}", login=host_login
    )
    assert host.connected.wait(TIMEOUT)
    host.client.publish(cmd, b"queued", qos=1).wait_for_publish(TIMEOUT)
    # act 1: dev-b's credentials with dev-a's client id and a clean start
    intruder = Session(broker.port, creds.device("dev-b"), a_id, clean_start=True, login=b_login)
    intruder.connected.wait(TIMEOUT) or intruder.dropped.wait(TIMEOUT)
    intruder.close()
    # assert 1: dev-a comes back and still gets the command queued for it
    dev_a = Session(broker.port, creds.device("dev-a"), a_id, login=a_login)
    assert dev_a.connected.wait(TIMEOUT)
    assert dev_a.inbox.get(timeout=TIMEOUT) == cmd
    # act 2: while dev-a is online, dev-b's credentials connect with dev-a's client id, and with the
    # client id the broker gives dev-a (its device id)
    intruders = [
        Session(broker.port, creds.device("dev-b"), cid, clean_start=clean, login=b_login)
        for cid in (a_id, "dev-a")
        for clean in (False, True)
    ]
    for intruder in intruders:
        intruder.connected.wait(TIMEOUT) or intruder.dropped.wait(TIMEOUT)
    # assert 2: dev-a was not kicked off, and still gets its commands
    assert not dev_a.dropped.wait(2.0), "dev-a was disconnected by another device's credentials"
    host.client.publish(cmd, b"live", qos=1).wait_for_publish(TIMEOUT)
    assert dev_a.inbox.get(timeout=TIMEOUT) == cmd
    for intruder in intruders:
        intruder.close()
    dev_a.close()
    host.close()


def test_host_connections_under_one_identity_do_not_take_each_other_over(
    mosquitto_factory: Any, creds: Credentials
) -> None:
    # prepare: the host's processes (ingest, rollout engine, registry, CLI) share one identity
    broker = start_broker(mosquitto_factory, creds)
    login = _login(creds, creds.host_name)
    # act: four of them connect side by side, each with its own client id
    sessions = [
        Session(host_port(broker), creds.host(), f"edgefleet-host-{uuid.uuid4().hex[:8]}", login=login)
        for _ in range(4)
    ]
    # assert: all four are in, and none was dropped by the others
    assert all(s.connected.wait(TIMEOUT) for s in sessions)
    assert not any(s.dropped.wait(0.5) for s in sessions), "a host connection was dropped by another"
    for s in sessions:
        s.close()
