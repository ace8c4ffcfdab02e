"""The agent's MQTT session: persistent QoS 1 session, retained birth + Last Will, TLS/auth, backoff.

paho-mqtt 2.x drives the socket; this module owns the connect loop so reconnects back off exponentially
with jitter (paho's own loop has no jitter, and a fleet that lost its broker must not reconnect in
lock-step). Every message the device sends gets a per-device `seq` that increases across restarts.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Type

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.core.fsutil import PathLike, atomic_write_bytes
from edgefleet.agent.core.protocol import DeviceMessage, State, Telemetry, Topics, build_message, will_payload
from edgefleet.agent.exitcodes import ExitCode

log = logging.getLogger("edgefleet.agent.mqtt")

# How long the broker keeps this device's session (subscriptions + queued QoS 1 messages) while offline.
SESSION_EXPIRY_S = 7 * 24 * 3600
# MQTT 5 CONNACK reason codes (and the 3.1.1 ones paho maps onto them) that retrying cannot fix.
_AUTH_FAILURES = {0x84, 0x85, 0x86, 0x87, 0x8C}


# Room for the fixed header, topic and properties around the largest payload the agent accepts.
PACKET_OVERHEAD_BYTES = 4096


def max_packet_bytes(config: AgentConfig) -> int:
    """The MQTT 5 Maximum Packet Size this device announces: its largest accepted payload plus headers."""
    return max(config.max_message_bytes, config.max_chunk_bytes) + PACKET_OVERHEAD_BYTES


class SeqCounter:
    """Per-device sequence numbers, monotonic across restarts; persisted in reserved blocks.

    Writing the counter on every message would fsync per message (SD-card wear on a Pi); instead a block
    of numbers is reserved on disk before use, so after a crash numbers jump forward, never back.
    """

    def __init__(self, path: PathLike, block: int = 256) -> None:
        self._path = path
        self._block = block
        self._lock = threading.Lock()
        try:
            with open(path, "rb") as handle:
                stored = int(handle.read().decode().strip() or 0)
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            stored = 0
        self._next = stored
        self._reserved = stored
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + self._block
        atomic_write_bytes(self._path, f"{self._reserved}\n".encode())

    def next(self) -> int:
        """The next sequence number."""
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            value = self._next
            self._next += 1
            return value

    @property
    def peek(self) -> int:
        """The number `next()` will return."""
        return self._next


class Backoff:
    """Exponential backoff with equal jitter: the delay doubles per failure up to `maximum`."""

    def __init__(self, minimum: float, maximum: float, rng: Optional[random.Random] = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Delay before the next attempt; half fixed, half random so a fleet spreads out."""
        cap = min(self.maximum, self.minimum * (2 ** min(self.failures, 30)))
        self.failures += 1
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def reset(self) -> None:
        """Forget failures after a successful connection."""
        self.failures = 0


class MqttSession:
    """One device's connection: subscriptions survive reconnects, publishes queue while offline."""

    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        seq: SeqCounter,
        on_message: Callable[[str, bytes], None],
        birth: Callable[[], Dict[str, Any]],
        on_connect: Optional[Callable[[], None]] = None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.seq = seq
        self._on_message_cb = on_message
        self._birth = birth
        self._on_connect_cb = on_connect
        self._subs: Set[str] = {topics.cmd, topics.repair_filter}
        self._subs_lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._dropped = threading.Event()
        self.fatal: Optional[ExitCode] = None
        self.fatal_reason = ""
        self.connects = 0
        self._thread: Optional[threading.Thread] = None
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)
        # Made now, so messages sent before start() (e.g. a resumed download's progress) queue up.
        self._client: Any = self._make_client()

    # -- set-up ---------------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        v5 = self.config.mqtt_version == "5"
        client_id = f"edgefleet-{self.topics.fleet}-{self.topics.device_id}"[:128]
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 5 sets clean_start on connect(); 3.1.1 sets the persistent session here.
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
        )
        # 0 = no cap: events and telemetry sent while offline wait for the next connection.
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(20)
        client.will_set(self.topics.state, will_payload(self.topics.device_id), qos=1, retain=True)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.resolved_password())
        if self.config.use_tls:
            client.tls_set(
                ca_certs=self.config.tls_ca,
                certfile=self.config.tls_cert,
                keyfile=self.config.tls_key,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(self.config.tls_insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network thread) ---------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            value = int(reason.value)
            log.warning("broker refused the connection: %s", reason)
            if value in _AUTH_FAILURES:
                self.fatal = ExitCode.BROKER_AUTH
                self.fatal_reason = f"the broker refused the connection: {reason}"
                self._stop.set()
            return
        self._backoff.reset()
        self.connects += 1
        with self._subs_lock:
            subs = sorted(self._subs)
        # Resubscribe even on a resumed session: a broker that lost its state must not strand the device.
        if subs:
            client.subscribe([(s, 1) for s in subs])
        self.send(State, online=True, info=self._birth())
        self.connected.set()
        log.info("connected to %s (session present: %s)", self.config.broker, flags.session_present)
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self._dropped.set()
        if not self._stop.is_set():
            log.warning("disconnected from the broker: %s", reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._on_message_cb(message.topic, bytes(message.payload))
        except Exception:  # the network thread must survive any handler bug
            log.exception("message handler failed on %s", message.topic)

    # -- the connect loop ------------------------------------------------------------------------------

    def _connect_once(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if self.config.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            # The broker must not send this device anything larger than it would accept: paho reads a
            # whole packet into memory (and copies it) before the agent can refuse it by size.
            props.MaximumPacketSize = max_packet_bytes(self.config)
            self._client.connect(
                self.config.broker_host,
                self.config.broker_port,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self._client.connect(
                self.config.broker_host, self.config.broker_port, keepalive=self.config.keepalive_s
            )

    def _run(self) -> None:
        """Supervise paho's network thread: (re)connect, run it until the link drops, back off, repeat."""
        started = time.monotonic()
        while not self._stop.is_set():
            self._dropped.clear()
            try:
                self._connect_once()
            except (OSError, ValueError) as exc:
                log.info("broker %s unreachable: %s", self.config.broker, exc)
            else:
                # paho's own thread moves the bytes (publishes from other threads are safe with it);
                # reconnect_on_failure=False makes it end when the link drops, so the backoff stays ours.
                self._client.loop_start()
                while not self._stop.is_set() and not self._dropped.wait(0.2):
                    pass
                self._client.loop_stop()
            if self._stop.is_set():
                break
            timeout = self.config.connect_timeout_s
            if timeout and self.connects == 0 and time.monotonic() - started > timeout:
                self.fatal = ExitCode.BROKER_UNREACHABLE
                self.fatal_reason = f"no connection to {self.config.broker} within {timeout:g} s"
                self._stop.set()
                break
            delay = self._backoff.next_delay()
            log.info("reconnecting in %.2f s", delay)
            self._stop.wait(delay)

    # -- public API ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread; it connects, and reconnects with backoff until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` seconds pass (False)."""
        return self.connected.wait(timeout)

    @property
    def stopped(self) -> bool:
        """Whether the session ended (stop() or a fatal broker refusal)."""
        return self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained offline state, disconnect and end the network thread."""
        if self._client is not None and self.connected.is_set():
            try:
                info = self.send(State, online=False, info=self._birth())
                info.wait_for_publish(timeout=min(timeout, 2.0))
            except Exception as exc:  # a broken socket must not block shutdown
                log.debug("offline state not sent: %s", exc)
        self._stop.set()
        if self._client is not None:
            try:
                self._client.disconnect()
            except Exception:
                pass
            self._dropped.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe now (when connected) and again after every reconnect."""
        with self._subs_lock:
            if topic_filter in self._subs:
                return
            self._subs.add(topic_filter)
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription."""
        with self._subs_lock:
            if topic_filter not in self._subs:
                return
            self._subs.discard(topic_filter)
        if self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    def subscriptions(self) -> List[str]:
        """The current subscription filters."""
        with self._subs_lock:
            return sorted(self._subs)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any:
        """Publish with QoS 1; while offline paho queues it and sends it after the reconnect."""
        return self._client.publish(topic, payload, qos=1, retain=retain)

    def send(self, cls: Type[DeviceMessage], **fields: Any) -> Any:
        """Build a device message with the next seq and publish it on its topic; returns paho's info."""
        if cls is State and fields.get("online") and isinstance(fields.get("info"), dict):
            # The host presumes a device gone after it stayed silent this long (sdk/fleet/ingest.py),
            # without waiting for the broker's keepalive sweep to publish the Last Will.
            fields["info"] = {
                **fields["info"],
                "keepalive_s": self.config.keepalive_s,
                "telemetry_interval_s": self.config.telemetry_interval_s,
            }
        message = build_message(cls, self.topics.device_id, self.seq.next(), round(time.time(), 3), **fields)
        if isinstance(message, State):
            return self.publish(self.topics.state, message.to_wire(), retain=True)
        if isinstance(message, Telemetry):
            return self.publish(self.topics.telemetry, message.to_wire())
        return self.publish(self.topics.evt, message.to_wire())
