"""A Mosquitto with the TLS + ACL config `edgefleet credentials` generates: who can say and hear what.

Each test starts its own broker (a TLS listener for devices, one for the host identity, nothing in
plaintext) on free ports. Mosquitto 2.0
grants every SUBSCRIBE and filters at delivery, and answers a denied PUBLISH with PUBACK 0x87 (MQTT 5)
and then closes the connection (eclipse-mosquitto/mosquitto#2579); with MQTT 3.1.1 a denial is silent.
So each denial is proven twice: by the reason code where there is one, and by a host-identity observer
that sees a later control message but never the denied one (one subscriber's queue is first-in,
first-out, so anything routed before the control message would have arrived before it).
"""

from __future__ import annotations

import queue
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edgefleet.agent.core.topics import Topics
from edgefleet.sdk.cli import app
from edgefleet.sdk.trust.credentials import Credentials, Identity
from tests.conftest import Mosquitto, free_port, wait_for_port

pytestmark = [pytest.mark.chaos, pytest.mark.broker]

SHA = "ab" * 32
TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------------------
# Broker and clients.


def start_broker(factory: Callable[..., Mosquitto], creds: Credentials) -> Mosquitto:
    """Mosquitto with the generated config, verbatim, plus what a test run needs (root user, a log)."""
    broker = factory(start=False)
    broker.extra_config = creds.mosquitto_conf(port=broker.port, bind="127.0.0.1", host_port=free_port()) + (
        # Run as root, Mosquitto would drop to a user that cannot read pytest's 0700 folders.
        "user root\nlog_dest file {workdir}/mosquitto.log\nlog_type all\n"
    )
    broker.start()
    wait_for_port("127.0.0.1", host_port(broker))
    return broker


def host_port(broker: Mosquitto) -> int:
    """The port of the generated config's host listener (its second `listener` line)."""
    listeners = [line.split() for line in broker.extra_config.splitlines() if line.startswith("listener ")]
    assert len(listeners) == 2, f"want a device and a host listener, got {listeners}"
    return int(listeners[1][1])


def broker_log(broker: Mosquitto) -> str:
    """What the broker logged so far (log_type all: denials included)."""
    path = broker.workdir / "mosquitto.log"
    return path.read_text(errors="replace") if path.exists() else ""


class Client:
    """A paho client that records what happens to it; `connect` reports refusals instead of raising."""

    def __init__(
        self,
        port: int,
        ident: Identity | None,
        *,
        v5: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: bool = True,
        ca: Path | None = None,
    ) -> None:
        self.port = port
        self.inbox: queue.Queue[str] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.puback_event = threading.Event()
        self.connack: Any = None
        self.done = threading.Event()  # set on CONNACK or on disconnect, whichever comes first
        self.dropped = threading.Event()
        self.suback = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"acl-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if tls:
            self.client.tls_set(
                ca_certs=str(ca or (ident.ca if ident else None)),
                certfile=str(ident.cert) if ident and ident.cert else None,
                keyfile=str(ident.key) if ident and ident.key else None,
            )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.inbox.put(m.topic)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.suback.set()

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        self.done.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.dropped.set()
        self.done.set()

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        self.pubacks[mid] = int(reason.value)
        self.puback_event.set()

    def connect(self) -> str:
        """'ok', or why the broker (or the TLS handshake) refused us."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:  # TLS 1.2 fails the handshake right here
            return f"handshake failed: {exc}"
        self.client.loop_start()
        if not self.done.wait(TIMEOUT):
            self.close()
            return "no answer"
        if self.connack is not None and not self.connack.is_failure and not self.dropped.is_set():
            return "ok"
        self.close()
        return f"refused: {self.connack or 'connection closed during the handshake'}"

    def subscribe(self, *filters: str) -> None:
        """Subscribe and wait for the SUBACK."""
        self.suback.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.suback.wait(TIMEOUT), "no SUBACK"

    def publish_and_wait(self, topic: str, payload: bytes = b"x") -> int | None:
        """Publish QoS 1; the PUBACK reason code (MQTT 5), or None when the broker dropped us first."""
        self.puback_event.clear()
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and info.mid not in self.pubacks and not self.dropped.is_set():
            self.puback_event.wait(0.1)
        if info.mid in self.pubacks:
            return self.pubacks[info.mid]
        assert self.dropped.is_set(), f"no PUBACK and no disconnect for {topic} within {TIMEOUT:g} s"
        return None

    def wait_for(self, topic: str) -> list[str]:
        """Everything received up to and including `topic`."""
        seen: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            seen.append(got)
            if got == topic:
                return seen

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@contextmanager
def connected(port: int, ident: Identity | None, **kwargs: Any) -> Iterator[Client]:
    """A client that must be accepted; closed at the end."""
    client = Client(port, ident, **kwargs)
    outcome = client.connect()
    assert outcome == "ok", f"{ident.name if ident else 'client'} was refused: {outcome}"
    try:
        yield client
    finally:
        client.close()


def refused(port: int, ident: Identity | None, **kwargs: Any) -> str:
    """Connect once and return why it failed; fails the test when the broker let the client in."""
    client = Client(port, ident, **kwargs)
    outcome = client.connect()
    if outcome == "ok":
        client.close()
    assert outcome != "ok", "the broker accepted a client it must refuse"
    return outcome


def wait_until_refused(port: int, ident: Identity, **kwargs: Any) -> str:
    """After a SIGHUP the broker re-reads the CRL / password file; poll until it refuses `ident`."""
    deadline = time.monotonic() + TIMEOUT
    delay = 0.05
    while time.monotonic() < deadline:
        client = Client(port, ident, **kwargs)
        outcome = client.connect()
        if outcome != "ok":
            return outcome
        client.close()
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    raise AssertionError(f"{ident.name} was still accepted {TIMEOUT:g} s after the broker reload")


@pytest.fixture
def creds(tmp_path: Path, fleet_name: str) -> Credentials:
    """Certificate-mode credentials for this test's fleet with devices dev-a and dev-b."""
    made = Credentials.init(tmp_path / "creds", fleet_name)
    made.add_devices(["dev-a", "dev-b"])
    return made


# ---------------------------------------------------------------------------------------------------
# The tests.


def test_plaintext_unknown_ca_and_missing_certificates_are_refused(
    tmp_path: Path, mosquitto_factory: Any, creds: Credentials, fleet_name: str
) -> None:
    broker = start_broker(mosquitto_factory, creds)
    hport = host_port(broker)
    listeners = [line for line in broker.extra_config.splitlines() if line.startswith("listener")]
    assert listeners == [f"listener {broker.port} 127.0.0.1", f"listener {hport} 127.0.0.1"]
    for port in (broker.port, hport):
        # A plaintext MQTT CONNECT (3.1.1, client id "p") gets no CONNACK on either port: the socket closes.
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 1]) + b"p")
            try:
                reply = sock.recv(16)
            except ConnectionResetError:
                reply = b""
        assert not reply.startswith(b"\x20"), f"TLS port {port} answered plaintext MQTT with {reply!r}"
        refused(port, None, tls=False)  # paho in plaintext: closed before any CONNACK
    # TLS without a client certificate, and a certificate for dev-b from another CA, are refused too.
    refused(broker.port, None, ca=creds.layout.ca_cert)
    stranger = Credentials.init(tmp_path / "stranger", fleet_name)
    stranger.add_devices(["dev-b"])
    forged = stranger.device("dev-b")
    refused(
        broker.port, Identity("dev-b", forged.folder, creds.layout.ca_cert, forged.cert, forged.key, None)
    )
    # Each listener takes its own identities only: no device certificate on the host port, and the
    # host certificate (from the host CA) not on the device port.
    refused(hport, creds.device("dev-a"))
    refused(broker.port, creds.host())
    with connected(hport, creds.host()), connected(broker.port, creds.device("dev-a")):
        pass
    assert "certificate verify failed" in broker_log(
        broker
    ) or "peer did not return a certificate" in broker_log(broker)


def test_a_device_cannot_publish_as_another_or_send_commands(
    mosquitto_factory: Any, creds: Credentials, fleet_name: str
) -> None:
    broker = start_broker(mosquitto_factory, creds)
    p = Topics.fleet_prefix(fleet_name)
    a, b = Topics(fleet_name, "dev-a"), Topics(fleet_name, "dev-b")
    forbidden = [
        b.state,
        b.evt,
        b.telemetry,
        b.cmd,
        a.cmd,  # not even to itself: commands come from the host only
        b.repair(SHA, 0),
        a.repair(SHA, 0),
        a.artifact(SHA, 0),
        Topics(f"other-{fleet_name}", "dev-a").state,
    ]
    with connected(host_port(broker), creds.host()) as host:
        host.subscribe(f"{p}/#")
        for topic in forbidden:
            # A fresh connection each time: Mosquitto closes a client after a denied PUBLISH.
            device = Client(broker.port, creds.device("dev-a"))
            assert device.connect() == "ok"
            code = device.publish_and_wait(topic)
            device.close()
            assert code in (0x87, None), f"{topic}: PUBACK {code}, want 0x87 Not authorized"
        # MQTT 3.1.1 has no reason code: the denial is silent, only the observer can tell.
        device = Client(broker.port, creds.device("dev-a"), v5=False)
        assert device.connect() == "ok"
        device.publish_and_wait(f"{p}/dev/dev-b/state")
        device.close()
        # Control: dev-a's own event goes through, and it is the first and only thing the host sees.
        with connected(broker.port, creds.device("dev-a")) as device:
            assert device.publish_and_wait(f"{p}/dev/dev-a/evt") == 0
        assert host.wait_for(f"{p}/dev/dev-a/evt") == [f"{p}/dev/dev-a/evt"]
    assert broker_log(broker).count("Denied PUBLISH") == len(forbidden) + 1


def test_a_device_reads_only_its_own_commands_and_chunks(
    mosquitto_factory: Any, creds: Credentials, fleet_name: str
) -> None:
    broker = start_broker(mosquitto_factory, creds)
    p = Topics.fleet_prefix(fleet_name)
    with (
        connected(host_port(broker), creds.host()) as host,
        connected(broker.port, creds.device("dev-a")) as dev_a,
        connected(broker.port, creds.device("dev-b")) as dev_b,
    ):
        host.subscribe(f"{p}/#")
        # dev-a asks for everything; Mosquitto grants the SUBACK and filters what it delivers.
        dev_a.subscribe("#", f"{p}/#", f"{p}/dev/dev-b/cmd", f"{p}/dev/+/cmd", f"{p}/dev/dev-b/chunk/#")
        dev_b.subscribe(f"{p}/dev/dev-b/cmd", f"{p}/dev/dev-b/chunk/#")
        for topic in (f"{p}/dev/dev-b/cmd", f"{p}/dev/dev-b/chunk/{SHA}/0"):
            assert host.publish_and_wait(topic) == 0
        # dev-b got its own: the messages were routed.
        assert dev_b.wait_for(f"{p}/dev/dev-b/chunk/{SHA}/0") == [
            f"{p}/dev/dev-b/cmd",
            f"{p}/dev/dev-b/chunk/{SHA}/0",
        ]
        # dev-b's report reaches the host but not dev-a.
        assert dev_b.publish_and_wait(f"{p}/dev/dev-b/telemetry") == 0
        host.wait_for(f"{p}/dev/dev-b/telemetry")
        # What dev-a may read, sent after all of the above: it must be all dev-a receives.
        mine = [f"{p}/dev/dev-a/cmd", f"{p}/dev/dev-a/chunk/{SHA}/1", f"{p}/artifact/{SHA}/2"]
        for topic in mine:
            assert host.publish_and_wait(topic) == 0
        received = dev_a.wait_for(mine[-1])
        # `#` and `p/#` overlap: Mosquitto may deliver a message once per matching subscription.
        assert set(received) == set(mine), f"dev-a read {received}"


def test_a_revoked_certificate_is_refused_and_a_reissued_one_works(
    mosquitto_factory: Any, creds: Credentials
) -> None:
    broker = start_broker(mosquitto_factory, creds)
    with connected(broker.port, creds.device("dev-b")):
        pass
    old = creds.device("dev-b")
    assert old.cert is not None and old.key is not None
    old_cert, old_key = old.cert.read_bytes(), old.key.read_bytes()
    result = CliRunner().invoke(app, ["credentials", "revoke", "dev-b", "--dir", str(creds.root)])
    assert result.exit_code == 0, result.output
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)  # Mosquitto 2.0 re-reads the CRL on SIGHUP
    why = wait_until_refused(broker.port, old)
    assert "refused" in why or "handshake failed" in why
    with connected(broker.port, creds.device("dev-a")):
        pass
    # Rotation: new credentials under the same id work; the old certificate stays refused.
    Credentials.open(creds.root).add_devices(["dev-b"])
    broker.proc.send_signal(signal.SIGHUP)
    with connected(broker.port, creds.device("dev-b")):
        pass
    stale = old.folder.parent / "dev-b-old"
    stale.mkdir()
    (stale / "client.crt").write_bytes(old_cert)
    (stale / "client.key").write_bytes(old_key)
    refused(broker.port, Identity("dev-b", stale, old.ca, stale / "client.crt", stale / "client.key", None))
    assert "certificate revoked" in broker_log(broker) or "certificate verify failed" in broker_log(broker)


def test_password_mode_authenticates_applies_the_acl_and_revokes(
    tmp_path: Path, mosquitto_factory: Any, fleet_name: str
) -> None:
    creds = Credentials.init(tmp_path / "pw", fleet_name, auth="password")
    creds.add_devices(["dev-a", "dev-b"])
    broker = start_broker(mosquitto_factory, creds)
    p = Topics.fleet_prefix(fleet_name)

    def login(name: str, ident: Identity) -> dict[str, Any]:
        """Username and password keyword arguments for Client."""
        assert ident.password_file is not None
        return {"username": name, "password": ident.password_file.read_text().strip()}

    host_login = login("edgefleet-host", creds.host())
    a_login = login("dev-a", creds.device("dev-a"))
    why = refused(broker.port, creds.device("dev-a"), username="dev-a", password=a_login["password"] + "x")
    assert "Not authorized" in why or "Bad user name or password" in why
    refused(broker.port, creds.device("dev-a"))  # TLS alone, no login: anonymous is off
    refused(broker.port, creds.host(), **host_login)  # the host's login is valid on its own listener only
    refused(host_port(broker), creds.device("dev-a"), **a_login)  # and a device's on the device one only
    with connected(host_port(broker), creds.host(), **host_login) as host:
        host.subscribe(f"{p}/#")
        device = Client(broker.port, creds.device("dev-a"), **a_login)
        assert device.connect() == "ok"
        assert device.publish_and_wait(f"{p}/dev/dev-b/state") in (0x87, None)
        device.close()
        with connected(broker.port, creds.device("dev-a"), **a_login) as device:
            assert device.publish_and_wait(f"{p}/dev/dev-a/state") == 0
        assert host.wait_for(f"{p}/dev/dev-a/state") == [f"{p}/dev/dev-a/state"]
    with connected(broker.port, creds.device("dev-a"), **a_login) as open_session:
        creds.revoke(["dev-a"])
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # Mosquitto re-reads the password file on SIGHUP ...
        # ... and drops a revoked login that is connected (certificates stay until they reconnect).
        assert open_session.dropped.wait(TIMEOUT), "the revoked device's open session survived the reload"
    wait_until_refused(broker.port, creds.device("dev-a"), **a_login)
    with connected(broker.port, creds.device("dev-b"), **login("dev-b", creds.device("dev-b"))):
        pass


@pytest.mark.slow
def test_a_real_agent_and_host_deploy_through_tls_and_the_acl(
    tmp_path: Path, mosquitto_factory: Any, creds: Credentials, fleet_name: str
) -> None:
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.store import Store
    from edgefleet.sdk.trust.keys import init_keys
    from tests.agent_net_support import AgentProcess, agent_args, eval_set, export_tiny_onnx, make_bundle
    from tests.fleet_support import wait_online

    keys = init_keys(tmp_path / "keys")
    model = export_tiny_onnx(tmp_path / "m.onnx")
    bundle = make_bundle(
        tmp_path / "v1", tmp_path / "keys", model, eval_set(model, tmp_path / "e.npz"), version=1
    )
    broker = start_broker(mosquitto_factory, creds)
    url = f"mqtts://127.0.0.1:{broker.port}"  # the devices' listener; the host has its own
    ids = ["dev-a", "dev-b"]
    procs: list[AgentProcess] = []
    host = creds.host()
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(
        broker=f"mqtts://127.0.0.1:{host_port(broker)}",
        store=store,
        fleet=fleet_name,
        tls_ca=str(host.ca),
        tls_cert=str(host.cert),
        tls_key=str(host.key),
        trusted_keys=[keys.public_path],
    )
    try:
        for device in ids:
            # The generated agent.toml carries the TLS files; flags add the test's broker and state.
            config = creds.device(device).folder / "agent.toml"
            args = agent_args(
                tmp_path / device, url, fleet_name, device, keys.public_path, "--config", str(config)
            )
            (tmp_path / device).mkdir()
            proc = AgentProcess(args, tmp_path / f"{device}.log")
            proc.start()
            procs.append(proc)
        wait_online(store, fleet_name, fleet.options, ids, timeout=60)
        handle = fleet.deploy(bundle, "all", timeout_s=90)
        assert handle.status == "succeeded", [p.log()[-2000:] for p in procs]
        fleet.refresh()
        active = {d["device_id"]: (d["active_model"], d["active_version"]) for d in store.devices(fleet_name)}
        assert active == {d: ("tiny", 1) for d in ids}
    finally:
        for proc in procs:
            proc.stop()
        fleet.close()
        store.close()
    # Not one message of the real flow hit the ACL: it is not too tight.
    log = broker_log(broker)
    assert "Denied" not in log, [line for line in log.splitlines() if "Denied" in line][:5]
    assert "u'dev-a'" in log and "u'edgefleet-host'" in log  # identities came from the certificates
