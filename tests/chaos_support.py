"""Fault injection for the chaos tests: a TCP proxy the test controls, with an MQTT tap on what clients send.

`ChaosProxy` sits between agents and the broker. `cut()` makes the link silent in both directions (bytes
are dropped, no FIN or RST reaches either side: a pulled cable, not a closed socket), `refuse()` makes
new connections fail at once (accepted and closed, so each attempt is seen and timed), `heal()` closes
the silent links and lets new connections through again. Every MQTT PUBLISH a client sends is parsed
(MQTT 3.1.1 and 5) and recorded with its topic and payload, so a test knows what an agent sent,
independently of what the broker and the host did with it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_PUBLISH = 3
_CONNECT = 1


@dataclass(frozen=True)
class Published:
    """One PUBLISH a client put on the wire (a re-send after a reconnect appears again, with `dup`)."""

    at: float
    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """An MQTT variable byte integer at `pos`: (value, next position), or None when incomplete."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("malformed MQTT remaining length (more than 4 bytes)")


class MqttTap:
    """Parses the client → broker byte stream of one connection into packets; records PUBLISHes."""

    def __init__(self, sink: list[Published], lock: threading.Lock) -> None:
        self._buf = bytearray()
        self._sink = sink
        self._lock = lock
        self.version = 4
        self.broken = False

    def feed(self, data: bytes) -> None:
        """Take the next bytes the client sent; complete packets are parsed, the rest waits."""
        if self.broken:
            return
        self._buf += data
        while True:
            try:
                header = _varint(self._buf, 1) if len(self._buf) >= 2 else None
            except ValueError:
                self.broken = True
                return
            if header is None:
                return
            length, start = header
            end = start + length
            if len(self._buf) < end:
                return
            first = self._buf[0]
            body = bytes(self._buf[start:end])
            del self._buf[:end]
            kind = first >> 4
            if kind == _CONNECT and len(body) >= 7:
                name_len = int.from_bytes(body[0:2], "big")
                self.version = body[2 + name_len]
            elif kind == _PUBLISH:
                self._publish(first, body)

    def _publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        topic_len = int.from_bytes(body[0:2], "big")
        pos = 2 + topic_len
        topic = body[2:pos].decode("utf-8", "replace")
        if qos:
            pos += 2  # packet identifier
        if self.version == 5:
            props = _varint(body, pos)
            if props is None:
                return
            pos = props[1] + props[0]
        message = Published(
            at=time.monotonic(),
            topic=topic,
            payload=body[pos:],
            qos=qos,
            dup=bool(first & 0x08),
            retain=bool(first & 0x01),
        )
        with self._lock:
            self._sink.append(message)


@dataclass
class _Link:
    """One proxied connection: the client's socket, the broker's socket, whether it is cut."""

    client: socket.socket
    upstream: socket.socket
    tap: MqttTap
    cut: bool = False
    closed: bool = False
    last_client_bytes: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class ChaosProxy:
    """A threaded TCP proxy to `upstream_port` on 127.0.0.1 that a test can cut, refuse and heal."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.attempts: list[float] = []
        self.published: list[Published] = []
        self.last_forwarded_from_client = 0.0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._refusing = False
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=64)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"chaos-proxy-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        """The proxy's address as an agent's --broker takes it."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> ChaosProxy:
        """Start accepting connections."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and close every link."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    # ---- faults ---------------------------------------------------------------------------------

    def cut(self) -> float:
        """Silence every open link (bytes dropped both ways, no close seen) and refuse new ones; returns when."""
        with self._lock:
            self._refusing = True
            for link in self._links:
                link.cut = True
            return time.monotonic()

    def refuse(self) -> None:
        """Accept new connections only to close them at once (each attempt is recorded)."""
        with self._lock:
            self._refusing = True

    def heal(self) -> None:
        """Close the silenced links (as a NAT would forget them) and let new connections through."""
        with self._lock:
            self._refusing = False
            dead = [link for link in self._links if link.cut]
            self._links = [link for link in self._links if not link.cut]
        for link in dead:
            link.close()

    def drop_all(self) -> None:
        """Close every open link at once (both sides see the connection end)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    # ---- what was seen --------------------------------------------------------------------------

    def attempts_since(self, since: float) -> list[float]:
        """Monotonic times of the connection attempts from `since` on."""
        with self._lock:
            return [t for t in self.attempts if t >= since]

    def open_links(self) -> int:
        """How many links are connected and not cut."""
        with self._lock:
            return sum(1 for link in self._links if not link.cut and not link.closed)

    def messages(self, topic_suffix: str | None = None) -> list[Published]:
        """Every PUBLISH the clients sent (optionally only topics ending in `topic_suffix`)."""
        with self._lock:
            items = list(self.published)
        if topic_suffix is None:
            return items
        return [m for m in items if m.topic.endswith(topic_suffix)]

    def sent_seqs(self, topic_suffix: str, device: str | None = None) -> list[int]:
        """The `seq` of every JSON message the clients sent on topics ending in `topic_suffix` (repeats kept)."""
        out = []
        for message in self.messages(topic_suffix):
            try:
                obj = json.loads(message.payload)
            except ValueError:
                continue
            mine = isinstance(obj, dict) and (device is None or obj.get("device") == device)
            if mine and isinstance(obj.get("seq"), int):
                out.append(int(obj["seq"]))
        return out

    # ---- plumbing -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.attempts.append(time.monotonic())
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # the broker is down: the client sees its connection end
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream, MqttTap(self.published, self._lock))
            with self._lock:
                self._links.append(link)
            for src, dst, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst, from_client), daemon=True, name="chaos-pump"
                ).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                # A cut link does not pass the end on: the other side must find out by itself.
                if not link.cut:
                    link.close()
                return
            if link.cut:
                continue
            if from_client:
                link.tap.feed(data)
            try:
                dst.sendall(data)
            except OSError:
                if not link.cut:
                    link.close()
                return
            if from_client:
                now = time.monotonic()
                link.last_client_bytes = now
                self.last_forwarded_from_client = now


class TopicWatcher:
    """Records when the broker delivers each message on a topic filter; resubscribes after broker restarts."""

    def __init__(self, url: str, *topic_filters: str) -> None:
        import paho.mqtt.client as mqtt

        self._seen: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{free_port()}", protocol=mqtt.MQTTv5
        )
        self._client.reconnect_delay_set(0.05, 0.5)
        subscribed = threading.Event()
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_connect = lambda c, *args: c.subscribe([(f, 1) for f in topic_filters])
        host, port = url.removeprefix("mqtt://").split(":")
        self._client.connect(host, int(port))
        self._client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise TimeoutError(f"could not subscribe to {topic_filters} on {url} within 10 s")

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        if getattr(message, "retain", False):
            return  # what the broker kept from before: not something that happened while watching
        with self._lock:
            self._seen.append(
                (
                    time.monotonic(),
                    str(getattr(message, "topic", "")),
                    bytes(getattr(message, "payload", b"")),
                )
            )

    def seen(self) -> list[tuple[float, str, bytes]]:
        """(monotonic time, topic, payload) of every live message so far."""
        with self._lock:
            return list(self._seen)

    def offline_since(self, since: float) -> float | None:
        """When the first `state` message saying offline (a Last Will, a goodbye) arrived after `since`."""
        for at, _, payload in self.seen():
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if at >= since and isinstance(obj, dict) and obj.get("type") == "state" and not obj.get("online"):
                return at
        return None

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


def export_wide_onnx(path: Path, hidden: int = 512, seed: int = 2) -> Path:
    """A ~1 MB classifier with the tiny model's interface (`x` [N, 8] → `logits` [N, 4]): many chunks."""
    import warnings

    import torch

    from tests.agent_net_support import CLASSES, IN_FEATURES

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, CLASSES),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, IN_FEATURES),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    return path


def ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted distinct integers as inclusive runs: [1, 2, 3, 7] → [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out
