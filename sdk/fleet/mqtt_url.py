"""Host-side MQTT connections: broker URL, TLS and auth options, and a connected paho client.

Every host component (registry refresh, ingest, rollout engine, benches) connects through `connect`, so
TLS, username/password and client certificates behave the same everywhere. A broker URL may list several
brokers, comma-separated: `connect` takes the first that accepts, and after a lost link paho reconnects
to the first again, then to each next one in turn while they fail.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from edgefleet.agent.core.paths import DEFAULT_BROKER
from edgefleet.sdk.fleet.errors import BrokerUnavailable

CONNECT_TIMEOUT_S = 10.0

MessageHandler = Callable[[str, bytes, bool], None]
# (paho client, message id, QoS): what `ack_message` needs to acknowledge one message after storing it.
AckToken = tuple[Any, int, int]
# A handler that acknowledges its messages itself: it gets an AckToken (None for QoS 0).
AckedMessageHandler = Callable[[str, bytes, bool, "AckToken | None"], None]
log = logging.getLogger(__name__)


def default_broker_url() -> str:
    """`EDGEFLEET_BROKER`, else mqtt://127.0.0.1:1883."""
    return os.environ.get("EDGEFLEET_BROKER") or DEFAULT_BROKER


def split_urls(url: str) -> tuple[str, ...]:
    """The URLs of a comma-separated broker list, blanks dropped."""
    return tuple(u.strip() for u in url.split(",") if u.strip())


@dataclass(frozen=True)
class MqttOptions:
    """Where the broker is and how to authenticate: URL(s), username/password, CA, client certificate."""

    url: str = DEFAULT_BROKER
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    # "3.1.1" for brokers without MQTT 5 (amqtt, the embedded fallback): sessions then persist by
    # clean_session=False, without an expiry, and CONNACK carries no packet size limit.
    mqtt_version: str = "5"

    def __post_init__(self) -> None:
        if self.mqtt_version not in ("5", "3.1.1"):
            raise BrokerUnavailable(f"MQTT version {self.mqtt_version!r}: use 5 or 3.1.1")
        if not self.urls:
            raise BrokerUnavailable("the broker URL is empty: write mqtt://HOST:PORT or mqtts://HOST:PORT")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
                raise BrokerUnavailable(
                    f"broker URL {url!r} is not usable: write mqtt://HOST:PORT or mqtts://HOST:PORT"
                )
            try:
                parts.port  # noqa: B018 - raises ValueError on a port that is not a number
            except ValueError:
                raise BrokerUnavailable(f"broker URL {url!r} has an invalid port") from None
        if len({urlsplit(u).scheme for u in self.urls}) > 1:
            # One paho client reconnects to every URL of the list with the same TLS settings.
            raise BrokerUnavailable(
                f"the broker URLs {self.url!r} mix mqtt:// and mqtts://: use one scheme for all"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise BrokerUnavailable("--tls-cert and --tls-key go together: give both or neither")
        for label, path in (
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if path and not os.path.isfile(path):
                raise BrokerUnavailable(f"{label} {path}: no such file")
        if self.password and not self.username:
            raise BrokerUnavailable("a broker password needs a username: pass --username too")

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker URLs in the order they are tried."""
        return split_urls(self.url)

    @property
    def host(self) -> str:
        """Host part of the (first) URL."""
        return _host_port(self.urls[0])[0]

    @property
    def port(self) -> int:
        """Port of the (first) URL (1883 for mqtt://, 8883 for mqtts:// when none is given)."""
        return _host_port(self.urls[0])[1]

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return urlsplit(self.urls[0]).scheme == "mqtts" or bool(self.tls_ca or self.tls_cert)


def _host_port(url: str) -> tuple[str, int]:
    """Host and port of one broker URL (1883 for mqtt://, 8883 for mqtts:// when none is given)."""
    parts = urlsplit(url)
    return str(parts.hostname), int(parts.port or (8883 if parts.scheme == "mqtts" else 1883))


@dataclass
class Connection:
    """A connected paho client plus what the broker told us in CONNACK (its packet size limit)."""

    client: Any
    client_id: str
    max_packet_size: int | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    # Every filter subscribed so far, subscribed again after a reconnect that finds no session.
    filters: list[tuple[str, int]] = field(default_factory=list)

    def subscribe(self, filters: list[tuple[str, int]], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Subscribe and wait for the SUBACK, so nothing published right after is missed."""
        if not filters:
            return
        done = threading.Event()
        ud = self.client._userdata
        self.filters.extend(f for f in filters if f not in self.filters)
        result, mid = self.client.subscribe(filters)
        if result != 0:
            raise BrokerUnavailable(f"subscribe failed with paho code {result}: is the client connected?")
        # The SUBACK may beat us here: on_subscribe then leaves the mid in `acked`.
        with ud["lock"]:
            if mid in ud["acked"]:
                ud["acked"].discard(mid)
                return
            ud["suback"][mid] = done
        if not done.wait(timeout_s):
            raise BrokerUnavailable(f"the broker did not confirm the subscription within {timeout_s:g} s")

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> Any:
        """Publish; returns paho's MQTTMessageInfo. `expiry_s`: MQTT 5 Message Expiry (ignored on 3.1.1)."""
        import paho.mqtt.client as mqtt

        from edgefleet.sdk.trust.command_signing import sign_for_topic

        payload = sign_for_topic(topic, payload)  # commands carry the online key's signature

        if expiry_s is None or self.client.protocol != mqtt.MQTTv5:
            return self.client.publish(topic, payload, qos=qos, retain=retain)
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = max(1, int(expiry_s))
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connect(
    options: MqttOptions,
    *,
    on_message: MessageHandler | None = None,
    client_id: str | None = None,
    persistent: bool = False,
    session_expiry_s: int = 3600,
    on_connect: Callable[[], None] | None = None,
    max_inflight: int = 64,
    on_message_ack: AckedMessageHandler | None = None,
) -> Connection:
    """Connect to the first broker of the URL list that accepts, each with MQTT 5, or 3.1.1 when it refuses 5.

    A lost link is taken up by paho's reconnect loop: back to the first URL, then each next one in turn.
    With `on_message_ack` (instead of `on_message`) paho acknowledges nothing: the handler acknowledges
    each QoS 1 message with `ack_message(token)` once it is stored, so a killed process loses nothing.
    """
    kwargs: dict[str, Any] = dict(
        on_message=on_message,
        on_message_ack=on_message_ack,
        client_id=client_id,
        persistent=persistent,
        session_expiry_s=session_expiry_s,
        on_connect=on_connect,
        max_inflight=max_inflight,
        urls=options.urls,
    )
    failures: list[str] = []
    for url in options.urls:
        try:
            return _connect_either(replace(options, url=url), kwargs)
        except BrokerUnavailable as exc:
            if len(options.urls) == 1:
                raise
            log.info("broker %s: %s; trying the next", url, exc)
            failures.append(str(exc))
    raise BrokerUnavailable(f"no broker of {options.url} accepted the connection: " + " | ".join(failures))


def _connect_either(options: MqttOptions, kwargs: dict[str, Any]) -> Connection:
    """Connect to one broker with MQTT 5, or 3.1.1 when the broker refuses 5 (amqtt, aedes, older ones)."""
    try:
        return _connect_once(options, **kwargs)
    except BrokerUnavailable as exc:
        # amqtt answers an MQTT 5 CONNECT with "unsupported protocol version", or (with MQTT 5
        # properties) not at all: either way one try with 3.1.1 tells a 3.1.1-only broker apart.
        text = str(exc).lower()
        if options.mqtt_version != "5" or not ("protocol version" in text or "(no answer)" in text):
            raise
    log.info("the broker at %s does not speak MQTT 5; connecting with MQTT 3.1.1", options.url)
    return _connect_once(replace(options, mqtt_version="3.1.1"), **kwargs)


def _aim(client: Any, url: str) -> None:
    """Point paho's next reconnect at `url` (only while no connection is open)."""
    # paho's `host`/`port` setters refuse while its state is "connected" or "connecting", which it still is
    # inside on_disconnect and on_connect_fail; its reconnect() reads these two fields.
    client._host, client._port = _host_port(url)
    log.info("reconnecting to the broker at %s", url)


def _connect_once(
    options: MqttOptions,
    *,
    on_message: MessageHandler | None = None,
    client_id: str | None = None,
    persistent: bool = False,
    session_expiry_s: int = 3600,
    on_connect: Callable[[], None] | None = None,
    max_inflight: int = 64,
    urls: tuple[str, ...] = (),
    on_message_ack: AckedMessageHandler | None = None,
) -> Connection:
    """Connect with the options' MQTT version (QoS 1, reconnect with backoff); `persistent` keeps the session.

    A persistent session (clean_start False with a session expiry) lets the broker queue QoS 1 messages
    for us while this process is away, so a restarted host process picks up what it missed.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cid = client_id or f"edgefleet-host-{uuid.uuid4().hex[:12]}"
    userdata: dict[str, Any] = {"suback": {}, "acked": set(), "lock": threading.Lock()}
    v5 = options.mqtt_version == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=cid,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        userdata=userdata,
        clean_session=None if v5 else not persistent,
    )
    conn = Connection(client, cid)
    client.reconnect_delay_set(1, 30)
    # 0 = unbounded outgoing queue: a rollout publishes bursts of chunks and must not drop any.
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(max_inflight)
    if options.username:
        client.username_pw_set(options.username, options.password)
    if options.tls:
        import ssl

        client.tls_set(
            ca_certs=options.tls_ca,
            certfile=options.tls_cert,
            keyfile=options.tls_key,
            cert_reqs=ssl.CERT_NONE if options.tls_insecure else ssl.CERT_REQUIRED,
        )
        if options.tls_insecure:
            client.tls_insecure_set(True)
    refused: queue.Queue[str] = queue.Queue()
    answered = threading.Event()  # set on the first CONNACK, accepted or refused

    def _on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        # A 3.1.1-only broker answers an MQTT 5 CONNECT with the old return code 1, which paho names
        # "Unsupported protocol version" without flagging it as a failure.
        if rc.is_failure or "protocol version" in str(rc).lower():
            refused.put(str(rc))
            answered.set()
            return
        size = getattr(props, "MaximumPacketSize", None) if props is not None else None
        conn.max_packet_size = int(size) if size else None
        if conn.filters and not getattr(flags, "session_present", False):
            # The broker has no session for us (a clean start, or it restarted without having saved
            # it): without this, a reconnected ingest or rollout engine would hear nothing again.
            c.subscribe(list(conn.filters))
        conn.connected.set()
        answered.set()
        if on_connect is not None:
            on_connect()

    def _on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if not answered.is_set():
            # Closed before any CONNACK: say so now instead of waiting out the timeout.
            refused.put(f"closed before answering: {rc}; an MQTT 3.1.1-only broker? (protocol version)")
            answered.set()
        if conn.connected.is_set() and len(urls) > 1:
            # paho reconnects by itself: to the first broker of the list first, as the agent does.
            _aim(c, urls[0])
        conn.connected.clear()

    def _on_connect_fail(c: Any, u: Any) -> None:
        # paho's reconnect to the current broker failed: the next try goes to the next of the list.
        if len(urls) > 1 and answered.is_set():
            here = (c._host, c._port)
            index = next((i for i, x in enumerate(urls) if _host_port(x) == here), -1)
            _aim(c, urls[(index + 1) % len(urls)])

    def _on_subscribe(c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        with userdata["lock"]:
            event = userdata["suback"].pop(mid, None)
            if event is None:
                userdata["acked"].add(mid)
        if event is not None:
            event.set()

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    client.on_connect_fail = _on_connect_fail
    client.on_subscribe = _on_subscribe
    if on_message_ack is not None:
        # Set before CONNECT, so not even a resumed session's first message is acknowledged unstored.
        client.manual_ack_set(True)
        acked = on_message_ack
        client.on_message = lambda c, u, m: acked(
            m.topic, bytes(m.payload), bool(m.retain), (c, m.mid, m.qos) if m.qos > 0 else None
        )
    elif on_message is not None:
        handler = on_message
        client.on_message = lambda c, u, m: handler(m.topic, bytes(m.payload), bool(m.retain))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s if persistent else 0
    try:
        if v5:
            client.connect(
                options.host,
                options.port,
                keepalive=30,
                clean_start=not persistent,
                # Without a session to keep, send no properties: MQTT 3.1.1-only brokers (amqtt) then
                # answer "unsupported protocol version" at once instead of not at all.
                properties=props if persistent else None,
            )
        else:
            client.connect(options.host, options.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise BrokerUnavailable(
            f"cannot reach the broker at {options.url}: {exc}; check that it runs (edgefleet broker) "
            "and the URL, or pass --broker"
        ) from None
    client.loop_start()
    answered.wait(CONNECT_TIMEOUT_S)
    if not conn.connected.is_set():
        client.loop_stop()
        try:
            client.disconnect()
        except OSError:  # the socket is already gone
            pass
        reason = refused.get_nowait() if not refused.empty() else "no answer"
        raise BrokerUnavailable(
            f"the broker at {options.url} did not accept the connection within {CONNECT_TIMEOUT_S:g} s "
            f"({reason}); check the username/password or certificates"
        )
    return conn


def ack_message(token: AckToken | None) -> None:
    """Acknowledge one message of an `on_message_ack` session; a lost connection is fine (redelivery)."""
    if token is None:
        return
    client, mid, qos = token
    try:
        client.ack(mid, qos)
    except (OSError, ValueError) as exc:
        log.debug("ack of message %d not sent (%s); the broker will redeliver it", mid, exc)
