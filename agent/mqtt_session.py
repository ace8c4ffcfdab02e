"""The agent's MQTT session: persistent QoS 1 session, retained birth + Last Will, TLS/auth, backoff,
broker failover and MQTT 5 → 3.1.1 fallback.

paho-mqtt 2.x drives the socket; this module owns the connect loop so reconnects back off exponentially
with jitter (paho's own loop has no jitter, and a fleet that lost its broker must not reconnect in
lock-step). Every message the device sends gets a per-device `seq` that increases across restarts.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Type

from edgefleet.agent.config import AgentConfig, url_host, url_port
from edgefleet.agent.core.fsutil import PathLike, atomic_write_bytes
from edgefleet.agent.core.protocol import DeviceMessage, State, Telemetry, Topics, build_message, will_payload
from edgefleet.agent.exitcodes import ExitCode

log = logging.getLogger("edgefleet.agent.mqtt")

# How long the broker keeps this device's session (subscriptions + queued QoS 1 messages) while offline.
SESSION_EXPIRY_S = 7 * 24 * 3600
# MQTT 5 CONNACK reason codes (and the 3.1.1 ones paho maps onto them) that retrying cannot fix.
_AUTH_FAILURES = {0x85, 0x86, 0x87, 0x8C}
# Unsupported Protocol Version (3.1.1's return code 1): the broker does not speak the version asked for.
_PROTOCOL_FAILURE = 0x84
# How long one attempt waits for the CONNACK. Brokers answer in milliseconds; amqtt never answers an
# MQTT 5 CONNECT with a Will, and this silence is what makes "auto" move on to 3.1.1.
CONNACK_TIMEOUT_S = 5.0
# The longest wait between checks that the first broker is back, however often moving back failed.
FAILBACK_MAX_S = 3600.0


class _Outcome:
    """How one connection attempt ended (plain strings, for logs)."""

    CONNECTED = "connected"
    DROPPED = "dropped"  # was connected, then the link dropped
    FAILBACK = "failback"  # was connected to a later broker and left it for the first
    UNREACHABLE = "unreachable"
    SILENT = "no CONNACK"
    CLOSED = "closed before CONNACK"
    PROTOCOL = "protocol refused"
    AUTH = "credentials refused"
    REFUSED = "refused"
    TIMEOUT = "connect timeout"
    STOPPED = "stopped"


# Answers to an MQTT 5 CONNECT that mean: try 3.1.1.
_NOT_MQTT5 = (_Outcome.PROTOCOL, _Outcome.SILENT, _Outcome.CLOSED)


def _first_version(setting: str) -> str:
    """The MQTT version of a first attempt: 5 for "auto"."""
    return "5" if setting == "auto" else setting


def _port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections on host:port (the cheap check before failing back)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
    """One device's connection: subscriptions survive reconnects, publishes queue while offline.

    `config.brokers` are tried in order (failover); while on a later one, the first is probed every
    `failback_s` (doubling while it keeps failing) and the session moves back once it answers. With
    `mqtt_version = "auto"` each broker is tried with MQTT 5, then 3.1.1 when it refuses 5 or never answers.
    """

    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        seq: SeqCounter,
        on_message: Callable[..., None],
        birth: Callable[[], Dict[str, Any]],
        on_connect: Optional[Callable[[], None]] = None,
        ack_after: bool = False,
    ) -> None:
        self.config = config
        # ack_after: on_message gets a third argument, the message's PUBACK, to call once it is handled
        # (a QoS 1 command acked on arrival is lost if the process dies before it is recorded).
        self._ack_after = ack_after
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
        self._answered = threading.Event()
        self._refusal: Optional[Any] = None
        self.fatal: Optional[ExitCode] = None
        self.fatal_reason = ""
        self.connects = 0
        # The broker of the current (or last) attempt and the MQTT version that broker accepted.
        self.broker_url = config.brokers[0]
        self.mqtt_version = _first_version(config.mqtt_version)
        self._versions: Dict[str, str] = {}
        self._failback_interval = config.failback_s
        self._thread: Optional[threading.Thread] = None
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)
        # Made now, so messages sent before start() (e.g. a resumed download's progress) queue up.
        self._client: Any = self._make_client()

    # -- set-up ---------------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        v5 = self.mqtt_version == "5"
        client_id = f"edgefleet-{self.topics.fleet}-{self.topics.device_id}"[:128]
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 5 sets clean_start on connect(); 3.1.1 sets the persistent session here.
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
            manual_ack=self._ack_after,
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

    def _use_version(self, version: str) -> None:
        """Switch the (disconnected) client to MQTT `version` for the next attempt."""
        import paho.mqtt.client as mqtt

        want = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
        if self._client._protocol != want:  # paho 2.0.0's `protocol` property recurses forever
            # paho fixes the protocol in its constructor, and a new client would lose the messages
            # queued while offline; both fields are plain attributes read at the next CONNECT.
            self._client._protocol = want
            if want == mqtt.MQTTv311:
                self._client._clean_session = False
        self.mqtt_version = version

    # -- paho callbacks (network thread) ---------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # A 3.1.1-only broker may answer an MQTT 5 CONNECT with the old return code 1, which paho
        # names "Unsupported protocol version" without flagging it as a failure.
        if reason.is_failure or "protocol version" in str(reason).lower():
            log.warning("the broker at %s refused the connection: %s", self.broker_url, reason)
            self._refusal = reason
            self._answered.set()
            return
        self._backoff.reset()
        self.connects += 1
        self._versions[self.broker_url] = self.mqtt_version
        with self._subs_lock:
            subs = sorted(self._subs)
        # Resubscribe even on a resumed session: a broker that lost its state must not strand the device.
        if subs:
            client.subscribe([(s, 1) for s in subs])
        self.send(State, online=True, info=self._birth())
        self.connected.set()
        self._answered.set()
        log.info(
            "connected to %s with MQTT %s (session present: %s)",
            self.broker_url,
            self.mqtt_version,
            flags.session_present,
        )
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._dropped.set()
        self._answered.set()  # closed before any CONNACK ends the wait for one too
        if not self._stop.is_set() and was_connected:
            log.warning("disconnected from the broker %s: %s", self.broker_url, reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        ack = self._acker(message) if self._ack_after else None
        try:
            if ack is not None:
                self._on_message_cb(message.topic, bytes(message.payload), ack)
            else:
                self._on_message_cb(message.topic, bytes(message.payload))
        except Exception:  # the network thread must survive any handler bug
            log.exception("message handler failed on %s", message.topic)
            if ack is not None:
                ack()

    def _acker(self, message: Any) -> Callable[[], None]:
        """A PUBACK for `message`, sent only on the connection it came on (after a drop the broker resends it)."""
        mid, qos, connection = message.mid, message.qos, self.connects

        def ack() -> None:
            if qos and self.connects == connection and self.connected.is_set():
                try:
                    self._client.ack(mid, qos)
                except Exception as exc:  # a dropped link: the broker redelivers the message
                    log.debug("ack of message %s not sent: %s", mid, exc)

        return ack

    # -- the connect loop ------------------------------------------------------------------------------

    def _connect_once(self, url: str, version: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            # The broker must not send this device anything larger than it would accept: paho reads a
            # whole packet into memory (and copies it) before the agent can refuse it by size.
            props.MaximumPacketSize = max_packet_bytes(self.config)
            self._client.connect(
                url_host(url),
                url_port(url),
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self._client.connect(url_host(url), url_port(url), keepalive=self.config.keepalive_s)

    def _attempt(self, url: str, version: str, deadline: Optional[float], primary: Optional[str]) -> str:
        """One connection to `url`: its outcome (see _Outcome), after the link dropped when it connected."""
        self._dropped.clear()
        self._answered.clear()
        self._refusal = None
        self.broker_url = url
        self._use_version(version)
        now = time.monotonic()
        try:
            # paho's TCP connect timeout; the CONNACK wait below has its own.
            self._client.connect_timeout = max(0.05, min(CONNACK_TIMEOUT_S, (deadline or now + 60) - now))
        except RuntimeError:  # still closing the last socket: connect() closes it
            pass
        try:
            self._connect_once(url, version)
        except (OSError, ValueError) as exc:
            log.info("broker %s unreachable: %s", url, exc)
            return _Outcome.UNREACHABLE
        # paho's own thread moves the bytes (publishes from other threads are safe with it);
        # reconnect_on_failure=False makes it end when the link drops, so the backoff stays ours.
        self._client.loop_start()
        try:
            outcome = self._await_connack(deadline)
            if outcome != _Outcome.CONNECTED:
                return outcome
            return self._run_connected(primary)
        finally:
            if not self.connected.is_set():
                self._close_socket()
            self._client.loop_stop()

    def _await_connack(self, deadline: Optional[float]) -> str:
        """Wait for the broker's answer, at most CONNACK_TIMEOUT_S and never past `deadline`."""
        answer_by = time.monotonic() + CONNACK_TIMEOUT_S
        while not self._answered.is_set():
            if self._stop.is_set():
                return _Outcome.STOPPED
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return _Outcome.TIMEOUT
            if now >= answer_by:
                log.info("the broker at %s sent no CONNACK within %g s", self.broker_url, CONNACK_TIMEOUT_S)
                return _Outcome.SILENT
            self._answered.wait(min(0.05, max(0.0, answer_by - now)))
        if self._refusal is not None:
            value = int(self._refusal.value)
            if value == _PROTOCOL_FAILURE or "protocol version" in str(self._refusal).lower():
                return _Outcome.PROTOCOL
            return _Outcome.AUTH if value in _AUTH_FAILURES else _Outcome.REFUSED
        return _Outcome.CONNECTED if self.connected.is_set() else _Outcome.CLOSED

    def _run_connected(self, primary: Optional[str]) -> str:
        """Stay connected until the link drops or `stop()`; move back to `primary` once it answers."""
        check_at = time.monotonic() + self._failback_interval
        while not self._stop.is_set() and not self._dropped.wait(0.2):
            if primary is None or time.monotonic() < check_at:
                continue
            if _port_open(url_host(primary), url_port(primary)):
                log.info("the first broker %s answers again: moving back to it", primary)
                # It doubles each time the move does not end on the first broker (see _run).
                self._failback_interval = min(self._failback_interval * 2, FAILBACK_MAX_S)
                self._client.disconnect()
                self._dropped.wait(2.0)
                return _Outcome.FAILBACK
            check_at = time.monotonic() + self._failback_interval
        return _Outcome.DROPPED

    def _close_socket(self) -> None:
        """End an attempt that did not connect, so the next one starts on a fresh socket."""
        try:
            self._client.disconnect()
        except Exception:  # nothing to close
            return
        self._dropped.wait(1.0)

    def _connect_to(self, url: str, deadline: Optional[float], primary: Optional[str]) -> str:
        """Attempt `url` with its MQTT version; in auto mode, MQTT 3.1.1 next when it refuses 5."""
        auto = self.config.mqtt_version == "auto"
        known = self._versions.get(url)
        version = known or _first_version(self.config.mqtt_version)
        outcome = self._attempt(url, version, deadline, primary)
        # A broker that has taken MQTT 5 before and now closes or stays silent is a bad link, not a
        # 3.1.1-only broker: retry on the usual backoff instead of a second attempt at once.
        if auto and version == "5" and known is None and outcome in _NOT_MQTT5:
            # amqtt never answers an MQTT 5 CONNECT that carries a Will; aedes refuses it (0x84).
            log.info("the broker at %s does not take MQTT 5 (%s): trying MQTT 3.1.1", url, outcome)
            outcome = self._attempt(url, "3.1.1", deadline, primary)
        return outcome

    def _run(self) -> None:
        """Supervise paho's network thread: try each broker in turn, stay until the link drops, repeat."""
        urls = self.config.brokers
        timeout = self.config.connect_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        refused: Dict[str, str] = {}  # url -> the fatal refusal it gave last
        index = 0
        while not self._stop.is_set():
            url = urls[index]
            primary = urls[0] if index > 0 and self.config.failback_s > 0 else None
            outcome = self._connect_to(url, deadline, primary)
            if self._stop.is_set():
                break
            if outcome in (_Outcome.DROPPED, _Outcome.FAILBACK):
                # Connected once: the timeout no longer applies; the next round starts at the first.
                deadline = None
                refused.clear()
                if index == 0:
                    self._failback_interval = self.config.failback_s
                index = 0
                if outcome == _Outcome.FAILBACK:
                    continue
            else:
                if outcome in (_Outcome.AUTH, _Outcome.PROTOCOL):
                    refused[url] = outcome
                else:
                    refused.pop(url, None)
                if len(refused) == len(urls):
                    self._give_up(refused)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.fatal = ExitCode.BROKER_UNREACHABLE
                    self.fatal_reason = f"no connection to {', '.join(urls)} within {timeout:g} s"
                    self._stop.set()
                    break
                index = (index + 1) % len(urls)
                if index != 0:
                    log.info("trying the next broker: %s", urls[index])
                    continue
            delay = self._backoff.next_delay()
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            log.info("reconnecting in %.2f s", delay)
            self._stop.wait(delay)

    def _give_up(self, refused: Dict[str, str]) -> None:
        """Every broker refused for a reason retrying cannot fix: end the session with that exit code."""
        protocol = all(r == _Outcome.PROTOCOL for r in refused.values())
        self.fatal = ExitCode.BROKER_PROTOCOL if protocol else ExitCode.BROKER_AUTH
        what = (
            f"the MQTT protocol version (tried {self._tried_versions()})"
            if protocol
            else "the credentials or client certificate"
        )
        reason = f" ({self._refusal})" if self._refusal is not None else ""
        self.fatal_reason = f"the broker {', '.join(refused)} refused {what}{reason}"
        self._stop.set()

    def _tried_versions(self) -> str:
        return "5 and 3.1.1" if self.config.mqtt_version == "auto" else self.config.mqtt_version

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
