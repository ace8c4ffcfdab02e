"""A private 3-node `nats-server` cluster with JetStream and MQTT 3.1.1 listeners on free loopback ports.

Shared by the cluster test (tests/nats_support.py) and the load bench (bench/load.py --broker-kind
nats-cluster). Standard library and paho only. NATS speaks MQTT 3.1.1 (QoS 0/1, retained, Last Will, no
QoS 2, no shared subscriptions, no session expiry); its MQTT sessions, QoS 1 messages and retained
messages live in JetStream streams, replicated to `stream_replicas` nodes, so a client that loses its
node finds its session on another one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NODES = 3


def nats_server_path() -> str | None:
    """The nats-server binary: on PATH, else Debian's /usr/sbin (not on a normal user's PATH)."""
    found = shutil.which("nats-server")
    if found is None and os.access("/usr/sbin/nats-server", os.X_OK):
        found = "/usr/sbin/nats-server"
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsNode:
    """One nats-server process: its ports, folder and config."""

    index: int
    client_port: int
    route_port: int
    mqtt_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """server_name of the node (n0, n1, ...)."""
        return f"n{self.index}"

    @property
    def url(self) -> str:
        """The node's MQTT listener as edgefleet takes a broker URL."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log_path(self) -> Path:
        """The node's log file."""
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """Three nats-server nodes routed to each other; MQTT on each, JetStream replicated over all three.

    NATS backs every QoS 1 MQTT subscription with a JetStream consumer. With `consumer_replicas=1` that
    consumer lives on one node, which need not be the node the client is connected to: when that node
    dies, a client still connected elsewhere silently stops getting messages on that subscription (seen
    here: a rollout engine on node 0 stopped hearing the devices when node 1 was killed). So the default
    is 3; the load bench, where no node dies, takes 1 to keep thousands of consumers light.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        nodes: int = NODES,
        stream_replicas: int = 3,
        consumer_replicas: int = 3,
        consumer_memory: bool = True,
        max_ack_pending: int = 1024,
        max_payload: int = 8 * 1024 * 1024,
        max_connections: int = 64 * 1024,
    ) -> None:
        binary = nats_server_path()
        if binary is None:
            raise RuntimeError("nats-server is not on PATH: install the Debian package 'nats-server'")
        self.binary = binary
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefleet-nats-"))
        self.cluster_name = f"ef{uuid.uuid4().hex[:6]}"
        self.settings = {
            "stream_replicas": stream_replicas,
            "consumer_replicas": consumer_replicas,
            "consumer_memory": consumer_memory,
            "max_ack_pending": max_ack_pending,
            "max_payload": max_payload,
            "max_connections": max_connections,
        }
        self.nodes = [
            NatsNode(i, free_port(), free_port(), free_port(), self.workdir / f"n{i}") for i in range(nodes)
        ]

    # ---- config and processes -----------------------------------------------------------------

    def config(self, node: NatsNode) -> str:
        """nats-server config of one node."""
        s = self.settings
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes if n is not node)
        return (
            f"server_name: {node.name}\n"
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"max_payload: {s['max_payload']}\n"
            # NATS caps a connection's pending bytes; a 1 MB broadcast to thousands needs room.
            "max_pending: 256MB\n"
            f"max_connections: {s['max_connections']}\n"
            f"jetstream {{ store_dir: {str(node.workdir / 'js')!r}, max_memory_store: 1GB, max_file_store: 4GB }}\n"
            f"cluster {{ name: {self.cluster_name}, listen: 127.0.0.1:{node.route_port}, routes: [{routes}] }}\n"
            "mqtt {\n"
            f"  listen: 127.0.0.1:{node.mqtt_port}\n"
            f"  stream_replicas: {s['stream_replicas']}\n"
            f"  consumer_replicas: {s['consumer_replicas']}\n"
            f"  consumer_memory_storage: {str(bool(s['consumer_memory'])).lower()}\n"
            f"  max_ack_pending: {s['max_ack_pending']}\n"
            "}\n"
        )

    def start_node(self, i: int) -> None:
        """Start node `i` (again after a kill: same ports, same JetStream folder)."""
        node = self.nodes[i]
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(self.config(node))
        log = node.log_path.open("ab")
        try:
            node.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start(self, timeout_s: float = 60.0) -> NatsCluster:
        """Start every node and wait until each one's MQTT listener takes a QoS 1 message to the others."""
        try:
            for i in range(len(self.nodes)):
                self.start_node(i)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 60.0, nodes: list[int] | None = None) -> float:
        """Wait until the nodes accept MQTT and a QoS 1 message published on one reaches every other.

        JetStream must have elected its meta leader and created the MQTT streams first; until then NATS
        refuses MQTT connections. Returns the seconds it took.
        """
        start = time.monotonic()
        live = [self.nodes[i] for i in (nodes if nodes is not None else range(len(self.nodes)))]
        deadline = start + timeout_s
        last = "no attempt"
        while time.monotonic() < deadline:
            for node in live:
                if not node.alive:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{self.log_tail(node.index)}")
            try:
                if _roundtrip(live, timeout_s=min(5.0, max(0.5, deadline - time.monotonic()))):
                    return time.monotonic() - start
                last = "a QoS 1 message did not reach every node"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise RuntimeError(
            f"the NATS cluster was not ready within {timeout_s:g} s ({last}):\n"
            + "\n".join(self.log_tail(n.index, 8) for n in live)
        )

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (no goodbye to its clients or routes)."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after 10 s) and remove a folder of its own."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- what callers read ---------------------------------------------------------------------

    def urls(self, *order: int) -> str:
        """A comma-separated broker list of the nodes in `order` (every node when none is given)."""
        picked = order or tuple(range(len(self.nodes)))
        return ",".join(self.nodes[i].url for i in picked)

    def pids(self) -> list[int]:
        """Process ids of the running nodes."""
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def log_tail(self, i: int, lines: int = 20) -> str:
        """The end of node `i`'s log."""
        try:
            text = self.nodes[i].log_path.read_text(errors="replace")
        except OSError:
            return f"({self.nodes[i].name}: no log)"
        return f"--- {self.nodes[i].name}\n" + "\n".join(text.splitlines()[-lines:])


def _roundtrip(nodes: list[NatsNode], timeout_s: float) -> bool:
    """One subscriber per node (MQTT 3.1.1, QoS 1); a QoS 1 message from the first must reach them all."""
    import threading

    import paho.mqtt.client as mqtt

    topic = f"edgefleet-ready/{uuid.uuid4().hex[:8]}"
    got: set[int] = set()
    lock = threading.Lock()
    clients: list[mqtt.Client] = []
    try:
        for node in nodes:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            subscribed = threading.Event()
            client.on_subscribe = lambda *a, e=subscribed: e.set()

            def on_message(c: object, u: object, m: object, i: int = node.index) -> None:
                with lock:
                    got.add(i)

            client.on_message = on_message
            client.connect("127.0.0.1", node.mqtt_port, keepalive=10)
            client.loop_start()
            clients.append(client)
            client.subscribe(topic, qos=1)
            if not subscribed.wait(timeout_s):
                return False
        # Interest travels over the routes asynchronously: give it a moment before the publish.
        time.sleep(0.2)
        info = clients[0].publish(topic, b"ready", qos=1)
        info.wait_for_publish(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with lock:
                if got >= {n.index for n in nodes}:
                    return True
            time.sleep(0.05)
        return False
    except (RuntimeError, ValueError):
        return False
    finally:
        for client in clients:
            try:
                client.disconnect()
            except OSError:
                pass
            client.loop_stop()


if __name__ == "__main__":  # a manual check: python bench/nats_cluster.py
    cluster = NatsCluster().start()
    print("ready:", cluster.urls(), "pids", cluster.pids(), flush=True)
    try:
        if os.environ.get("EDGEFLEET_NATS_HOLD"):
            time.sleep(float(os.environ["EDGEFLEET_NATS_HOLD"]))
    finally:
        cluster.stop()
