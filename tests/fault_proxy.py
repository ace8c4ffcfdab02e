"""A fault-injecting TCP proxy: added latency, a bandwidth cap per connection, connection resets at random.

The kernel here has no `netem`, so tests bring their own bad network: every byte each way waits
`latency_s`, leaves at most `rate_bps` bits per second per connection and direction, and each
connection is reset (RST, as a NAT or a flaky modem does) at a random moment `reset_every_s` after it
opened. What clients send toward the broker is tapped, so a test knows what the devices really sent.
"""

from __future__ import annotations

import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Callable

from tests.chaos_support import MqttTap, Published, free_port


class _Pipe:
    """One direction of one link: a reader thread queues bytes, a writer releases them late and slowly."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        latency_s: float,
        rate_bps: float,
        on_bytes: Callable[[bytes], None] | None,
        on_end: Callable[[], None],
    ) -> None:
        self.src, self.dst = src, dst
        self.latency_s = latency_s
        self.bytes_per_s = rate_bps / 8.0
        self.on_bytes = on_bytes
        self.on_end = on_end
        self._queue: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(16384)
                if not data:
                    break
                if self.on_bytes is not None:
                    self.on_bytes(data)
                self._queue.put((time.monotonic() + self.latency_s, data))
        except OSError:
            pass
        self._queue.put(None)

    def _write(self) -> None:
        # Pieces of ~10 ms of line time, so the rate holds on a fine grain, as a slow link's does.
        piece = max(256, int(self.bytes_per_s / 100))
        free_at = time.monotonic()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                due, data = item
                for start in range(0, len(data), piece):
                    part = data[start : start + piece]
                    free_at = max(free_at, due) + len(part) / self.bytes_per_s
                    wait = free_at - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self.dst.sendall(part)
        except OSError:
            pass
        self.on_end()


class FaultProxy:
    """A threaded TCP proxy to a broker on 127.0.0.1 with latency, a rate cap and random resets."""

    def __init__(
        self,
        upstream_port: int,
        *,
        latency_s: float = 0.3,
        rate_bps: float = 1_000_000,
        reset_every_s: tuple[float, float] | None = (20.0, 60.0),
        seed: int = 15,
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.latency_s = latency_s
        self.rate_bps = rate_bps
        self.reset_every_s = reset_every_s
        self.port = free_port()
        self.published: list[Published] = []
        self.resets = 0
        self.connections = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=64)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's address as an agent's --broker takes it."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Start accepting connections."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and close every link."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _close(sock)

    def messages(self, topic_suffix: str) -> list[Published]:
        """Every PUBLISH the clients sent on topics ending in `topic_suffix` (retransmissions kept)."""
        with self._lock:
            return [m for m in self.published if m.topic.endswith(topic_suffix)]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            self._link(client, upstream)

    def _link(self, client: socket.socket, upstream: socket.socket) -> None:
        tap = MqttTap(self.published, self._lock)
        ended = threading.Event()

        def end() -> None:
            if not ended.is_set():
                ended.set()
                _close(client)
                _close(upstream)

        with self._lock:
            self.connections += 1
            self._socks += [client, upstream]
        _Pipe(client, upstream, self.latency_s, self.rate_bps, tap.feed, end)
        _Pipe(upstream, client, self.latency_s, self.rate_bps, None, end)
        if self.reset_every_s is not None:
            low, high = self.reset_every_s
            after = self._random.uniform(low, high)

            def reset() -> None:
                if not ended.wait(after) and not self._stop.is_set():
                    with self._lock:
                        self.resets += 1
                    for sock in (client, upstream):
                        _reset(sock)
                    end()

            threading.Thread(target=reset, daemon=True).start()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes our reader without a FIN to the peer
        sock.close()
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
