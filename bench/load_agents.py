"""Simulated devices for the load bench: many MQTT clients in one process, speaking the agent's protocol.

Each device is one paho client set up as `edgefleet.agent.mqtt_session` sets up the real agent's: MQTT 5
(3.1.1 with `--mqtt-version 3.1.1`, for NATS), a persistent session, a retained `state` birth and a Last Will, QoS 1, and one `seq` counter across
every message it sends. Its messages are the protocol's own dataclasses (`State`, `Telemetry`,
`Progress`, `Missing`, `Deployed`, `Rejected`, `Error`) encoded by `to_wire()`; telemetry metrics are
built like `Daemon.metrics()`: an idle `ModelServer`'s window statistics plus `system_metrics()`.
All clients of a process share one selector loop (paho's external-loop hooks over epoll), so a process
holds hundreds of devices without a thread, or a `select()` limit, per device.

A deploy goes through the agent's own state machine (`edgefleet.agent.deployment.DeployMachine`): the
same signature and file-list checks, chunk checks, repair requests with back-off, transfer timeout,
hash-failure retries and events. What a simulated device does NOT do: it runs no model (its telemetry
windows report 0 requests and no latency), its staging area lives in memory (`MemoryStaging`: chunks
are hashed as they arrive and then dropped, nothing is written to disk), and its "install" reports
`deployed` as soon as the download verifies, with no health check.

Driven by bench/load.py over stdin/stdout, one JSON object per line (one reply per command):

    python bench/load_agents.py --broker mqtt://127.0.0.1:1883 --fleet F --first 0 --count 250 \
        --total 1000 --trusted-key fleet.pub

Commands: {"cmd": "telemetry", "rate": R, "start": EPOCH, "seconds": S or null}, {"cmd": "stop"},
{"cmd": "report", "wait_s": N}, {"cmd": "quit", "clear": true}.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import resource
import selectors
import sys
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent import __version__
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.core.errors import AgentError, TransferError
from edgefleet.agent.core.protocol import (
    Code,
    DeployCommand,
    DeviceMessage,
    Error,
    FileTransfer,
    State,
    Telemetry,
    Topics,
    build_message,
    command_id_of,
    parse_command,
    ranges_of,
    will_payload,
)
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.deployment import (
    Action,
    DeployMachine,
    Discard,
    Install,
    PublishState,
    Report,
    Send,
    Subscribe,
    Unsubscribe,
    verify_deploy,
)
from edgefleet.agent.server import ModelServer
from edgefleet.agent.telemetry import system_metrics

# The agent's own settings, so the simulated devices time repairs and keepalives as real ones do.
_DEFAULTS = AgentConfig.__dataclass_fields__
REPAIR_AFTER_S = float(_DEFAULTS["repair_after_s"].default)  # type: ignore[arg-type]
TRANSFER_TIMEOUT_S = float(_DEFAULTS["transfer_timeout_s"].default)  # type: ignore[arg-type]
MAX_CHUNK_BYTES = int(_DEFAULTS["max_chunk_bytes"].default)  # type: ignore[arg-type]
KEEPALIVE_S = int(_DEFAULTS["keepalive_s"].default)  # type: ignore[arg-type]
SESSION_EXPIRY_S = 7 * 24 * 3600  # as edgefleet.agent.mqtt_session
PROFILE = "x86-64"


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (3 descriptors per client); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class SharedSystemMetrics:
    """`system_metrics()` read at most once a second: every device of this process shares the process."""

    def __init__(self) -> None:
        self.at = 0.0
        self.value: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        """The latest reading (re-read when older than a second)."""
        now = time.monotonic()
        if now - self.at >= 1.0:
            self.value = system_metrics(".")
            self.at = now
        return self.value


class MemoryTransfer:
    """One file received into memory: the checks of `edgefleet.agent.transfer.Transfer`, no disk.

    Chunks are checked against the host's per-chunk hashes as they arrive, folded into a running
    whole-file hash once in order, and dropped; `finish()` compares that hash with the signed one.
    """

    def __init__(self, spec: FileTransfer) -> None:
        self.spec = spec
        self.have: set[int] = set()
        self.held: dict[int, bytes] = {}
        self.next = 0
        self.hash = hashlib.sha256()

    @property
    def received(self) -> int:
        """Distinct chunks received."""
        return len(self.have)

    @property
    def complete(self) -> bool:
        """Every chunk arrived."""
        return len(self.have) == self.spec.chunks

    def write_chunk(self, index: int, data: bytes) -> bool:
        """Take one chunk; False for a duplicate; TransferError for a bad index, size or hash."""
        spec = self.spec
        if not 0 <= index < spec.chunks:
            raise TransferError(
                Code.CHUNK_INDEX, f"chunk {index} of {spec.sha256[:12]}… is past its {spec.chunks} chunks"
            )
        expected = (
            spec.chunk_size if index < spec.chunks - 1 else spec.size - spec.chunk_size * (spec.chunks - 1)
        )
        if len(data) != expected:
            code = Code.CHUNK_OVERSIZE if len(data) > expected else Code.CHUNK_SIZE
            raise TransferError(
                code, f"chunk {index} of {spec.sha256[:12]}… has {len(data)} bytes, not {expected}"
            )
        if spec.chunk_sha256 and hashlib.sha256(data).hexdigest() != spec.chunk_sha256[index]:
            raise TransferError(
                Code.CHUNK_HASH, f"chunk {index} of {spec.file!r} does not match its hash: refused"
            )
        if index in self.have:
            return False
        self.have.add(index)
        self.held[index] = data
        while self.next in self.held:
            self.hash.update(self.held.pop(self.next))
            self.next += 1
        return True

    def missing_ranges(self, limit: int | None = None) -> list[list[int]]:
        """Missing chunks as inclusive `[start, end]` ranges (at most `limit`)."""
        ranges = ranges_of([i for i in range(self.spec.chunks) if i not in self.have])
        return ranges if limit is None else ranges[:limit]

    def finish(self) -> Path:
        """Check the whole file against its signed sha256; on mismatch start over and raise."""
        if self.hash.hexdigest() != self.spec.sha256:
            self.have, self.held, self.next, self.hash = set(), {}, 0, hashlib.sha256()
            raise TransferError(
                Code.HASH_MISMATCH,
                f"{self.spec.file!r} does not match its signed sha256 {self.spec.sha256[:12]}…",
            )
        return Path("<memory>") / self.spec.sha256  # nothing to install from: see the module docstring


class MemoryStaging:
    """The staging area of a simulated device: its open transfers, in memory."""

    def __init__(self) -> None:
        self.open_transfers: dict[str, MemoryTransfer] = {}

    def open(self, spec: FileTransfer) -> MemoryTransfer:
        """Open (or keep) the transfer of one file."""
        current = self.open_transfers.get(spec.sha256)
        if current is None or current.spec != spec:
            current = self.open_transfers[spec.sha256] = MemoryTransfer(spec)
        return current

    def discard(self, sha256: str) -> None:
        """Drop one transfer."""
        self.open_transfers.pop(sha256, None)

    def prune(self, keep: Iterable[str] = ()) -> None:
        """Drop every transfer but those of `keep`."""
        kept = set(keep)
        self.open_transfers = {k: v for k, v in self.open_transfers.items() if k in kept}


class SimDevice:
    """One simulated device: its MQTT client, sequence counter, telemetry and deploy handling."""

    def __init__(self, pool: Pool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.device_id = f"sim-{number:05d}"
        self.topics = Topics(pool.fleet, self.device_id)
        self.seq = 0
        self.started = time.time()
        self.server = ModelServer(threads=1)
        self.active: dict[str, Any] | None = None
        self.machine = DeployMachine(
            MemoryStaging(),
            self._verify,
            device_id=self.device_id,
            repair_after_s=REPAIR_AFTER_S,
            transfer_timeout_s=TRANSFER_TIMEOUT_S,
            max_chunk_bytes=MAX_CHUNK_BYTES,
        )
        self.connected = False
        self.subscribed = False
        self.birth_mid: int | None = None
        self.birth_acked = False
        self.disconnects = 0
        self.inflight: dict[int, int | None] = {}  # mid → telemetry seq (None for other messages)
        self.telemetry_acked: list[int] = []
        self.published = 0
        self.acked = 0
        self.deploy_seconds: float | None = None
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-{self.topics.fleet}-{self.device_id}"[:128],
            protocol=mqtt.MQTTv5 if self.pool.v5 else mqtt.MQTTv311,
            # 3.1.1 (NATS): the session persists by clean_session False, with no expiry to set.
            clean_session=None if self.pool.v5 else False,
            reconnect_on_failure=False,
        )
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(20)
        client.will_set(self.topics.state, will_payload(self.device_id), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.pool.loop.attach(client)
        return client

    def connect(self) -> None:
        """Open the connection (the CONNACK arrives through the loop)."""
        if not self.pool.v5:
            self.client.connect(self.pool.host, self.pool.port, keepalive=KEEPALIVE_S)
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect(
            self.pool.host, self.pool.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props
        )

    # ---- outgoing -------------------------------------------------------------------------------

    def state_info(self) -> dict[str, Any]:
        """Body of the retained birth message, with the agent's keys."""
        return {
            "agent_version": __version__,
            "profile": PROFILE,
            "emulated": False,
            "threads": 1,
            "runtimes": ["onnxruntime"],
            # No "bsdiff4": a simulated device never gets a delta patch, always the full files.
            "delta": [],
            "active": self.active,
            "slots": None,
            "root_version": int(self.pool.trust.version),
            "tags": ["load-sim"],
            "http_port": None,
            "mqtt_infer": False,
            "started": round(self.started, 3),
            # Not an agent key: says plainly that this device runs no model (bench/load_agents.py).
            "simulated": True,
        }

    def send(self, cls: type[DeviceMessage], **fields: Any) -> None:
        """Build a message with the next seq and publish it on its topic, as MqttSession.send does."""
        if cls is State and fields.get("online") and isinstance(fields.get("info"), dict):
            # As MqttSession.send: the host's liveness check reads these from the birth.
            fields["info"] = {
                **fields["info"],
                "keepalive_s": KEEPALIVE_S,
                "telemetry_interval_s": self.pool.telemetry_interval_s,
            }
        seq = self.seq
        self.seq += 1
        message = build_message(cls, self.device_id, seq, round(time.time(), 3), **fields)
        if isinstance(message, State):
            topic, retain = self.topics.state, True
        elif isinstance(message, Telemetry):
            topic, retain = self.topics.telemetry, False
        else:
            topic, retain = self.topics.evt, False
        info = self.client.publish(topic, message.to_wire(), qos=1, retain=retain)
        self.published += 1
        self.inflight[info.mid] = seq if isinstance(message, Telemetry) else None
        if isinstance(message, State) and self.birth_mid is None:
            self.birth_mid = info.mid

    def metrics(self) -> dict[str, Any]:
        """One telemetry sample built like Daemon.metrics() (no model runs, so no requests)."""
        out: dict[str, Any] = dict(self.server.window_stats(reset=True))
        out["model"] = self.active["name"] if self.active else None
        out["model_version"] = self.active["version"] if self.active else None
        out.update(self.pool.system.get())
        out["uptime_s"] = round(time.time() - self.started, 1)
        out["emulated"] = False
        out["profile"] = PROFILE
        return out

    def send_telemetry(self) -> None:
        """Publish one telemetry message."""
        self.send(Telemetry, metrics=self.metrics())

    # ---- paho callbacks (all on the loop's thread) --------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.pool.fail(f"{self.device_id}: the broker refused the connection: {reason}")
            return
        self.connected = True
        self.machine.reconnected(time.monotonic())
        client.subscribe([(self.topics.cmd, 1), (self.topics.repair_filter, 1)])
        self.send(State, online=True, info=self.state_info())

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected and not self.pool.quitting:
            self.disconnects += 1
            self.pool.log(f"{self.device_id}: disconnected: {reason}")
        self.connected = False

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        self.subscribed = True
        # A broker may refuse a subscription in its SUBACK (NATS does when it cannot create the
        # JetStream consumer behind a QoS 1 subscription in time): count it, the report says so.
        refused = [c for c in codes if getattr(c, "is_failure", False)]
        if refused:
            self.pool.suback_failures += len(refused)
            self.pool.log(f"{self.device_id}: subscription refused by the broker: {refused[0]}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if mid not in self.inflight:
            return
        seq = self.inflight.pop(mid)
        self.acked += 1
        if seq is not None:
            self.telemetry_acked.append(seq)
        if mid == self.birth_mid:
            self.birth_acked = True

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        try:
            if message.topic == self.topics.cmd:
                cmd = parse_command(payload)
                if isinstance(cmd, DeployCommand):
                    self.perform(self.machine.deploy(cmd, time.monotonic()))
                else:
                    self.send(
                        Error,
                        code=Code.BAD_MESSAGE,
                        reason=f"a simulated device answers deploy commands only, not {cmd.TYPE!r}",
                        ref=cmd.id,
                    )
                return
            where = self.topics.parse_chunk_topic(message.topic)
            if where is not None:
                repair = message.topic.startswith(self.topics.device + "/")
                self.perform(
                    self.machine.chunk(where[0], where[1], payload, repair=repair, now=time.monotonic())
                )
        except AgentError as exc:
            ref = command_id_of(payload) if message.topic == self.topics.cmd else message.topic
            self.send(Error, code=exc.code, reason=exc.reason, ref=ref)

    # ---- deploy: the agent's state machine decides, this device performs ------------------------

    def _verify(self, cmd: DeployCommand) -> Any:
        return verify_deploy(cmd, self.pool.trust, profile=PROFILE, device_id=self.device_id, ledger=None)

    def perform(self, actions: list[Action]) -> None:
        """Carry out the machine's actions as the agent's wiring does (persistence is skipped: no disk)."""
        for action in actions:
            if isinstance(action, Send):
                self.send(action.cls, **action.fields)
            elif isinstance(action, Report):
                self.send(Error, code=action.code, reason=action.reason, ref=action.ref)
            elif isinstance(action, Subscribe):
                self.client.subscribe(self.topics.artifact_filter(action.sha256), qos=1)
            elif isinstance(action, Unsubscribe):
                self.client.unsubscribe(self.topics.artifact_filter(action.sha256))
            elif isinstance(action, Discard):
                for sha in action.sha256s:
                    self.machine.staging.discard(sha)
            elif isinstance(action, PublishState):
                self.send(State, online=True, info=self.state_info())
            elif isinstance(action, Install):
                # Nothing is installed or health-checked here (see the module docstring): the new model
                # is reported active at once.
                self.active = {"name": action.name, "version": action.version}
                self.deploy_seconds = time.monotonic() - action.started
                self.perform(self.machine.installed(action.command.id, action.name, action.version, {}))
            # SavePending, SaveOutcome, ClearPending: a simulated device keeps its state in memory.

    @property
    def outcome(self) -> str | None:
        """The type of the last deploy's outcome event ("deployed", "rejected"), if one ended."""
        last = self.machine.last_outcome
        return None if last is None else str(last["event"]["type"])


class Loop:
    """One epoll selector for every client of the process, through paho's external-loop callbacks."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()

    def attach(self, client: mqtt.Client) -> None:
        """Hook a client's socket events into the selector."""
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_write

    def _open(self, client: Any, userdata: Any, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _close(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _done_write(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass


class Pool:
    """The devices of this process, their telemetry schedule and the stdin/stdout control channel."""

    def __init__(
        self,
        broker: str,
        fleet: str,
        first: int,
        count: int,
        total: int,
        key: str,
        interval: float,
        mqtt_version: str = "5",
    ) -> None:
        url = urlparse(broker)
        if url.scheme != "mqtt" or not url.hostname:
            raise SystemExit(f"--broker {broker!r}: use mqtt://HOST:PORT (TLS is not simulated)")
        self.host, self.port = url.hostname, url.port or 1883
        self.fleet = fleet
        self.total = total
        self.telemetry_interval_s = interval
        # MQTT 5 as the agent speaks it first; 3.1.1 for brokers without 5 (NATS), as the agent falls back.
        self.v5 = mqtt_version == "5"
        self.trust = TrustStore.from_public_keys([key])
        self.loop = Loop()
        self.system = SharedSystemMetrics()
        self.quitting = False
        self.suback_failures = 0
        self.errors: list[str] = []
        self.devices = [SimDevice(self, first + i) for i in range(count)]
        self.schedule: list[tuple[float, int, int]] = []  # (due, device index, message number)
        self.rate = 0.0
        self.start_at = 0.0
        self.end_at: float | None = None
        self.lateness: list[float] = []
        self._stdin = b""
        self._next_misc = 0.0
        self._next_check = 0.0

    def log(self, text: str) -> None:
        """A line on stderr (bench/load.py keeps it in a log file)."""
        print(text, file=sys.stderr, flush=True)

    def fail(self, text: str) -> None:
        """Remember an error for the next report."""
        self.errors.append(text)
        self.log(text)

    # ---- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        """One pass: socket events, due telemetry, repairs, keepalives."""
        now = time.time()
        if self.schedule:
            timeout = max(0.0, min(timeout, self.schedule[0][0] - now))
        for key, mask in self.loop.sel.select(timeout):
            if key.data is None:
                self._read_stdin()
                continue
            client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()
        now = time.time()
        while self.schedule and self.schedule[0][0] <= now:
            due, i, n = heapq.heappop(self.schedule)
            self.lateness.append(now - due)
            self.devices[i].send_telemetry()
            nxt = self.start_at + self._offset(i) + (n + 1) / self.rate
            if self.end_at is None or nxt < self.end_at:
                heapq.heappush(self.schedule, (nxt, i, n + 1))
        mono = time.monotonic()
        if mono >= self._next_check:
            self._next_check = mono + 0.1
            for dev in self.devices:
                if dev.machine.pending is not None:
                    dev.perform(dev.machine.tick(mono, connected=dev.connected))
        if mono >= self._next_misc:
            self._next_misc = mono + 1.0
            for dev in self.devices:
                dev.client.loop_misc()

    def _offset(self, i: int) -> float:
        """Spread the fleet's sends evenly over one period: device k of `total` goes at k/total of it."""
        return (self.devices[i].number % self.total) / self.total / self.rate

    def connect_all(self, timeout_s: float, rate: float = 0.0) -> float:
        """Connect every device (at most `rate` a second; 0: at once); wait until each has its CONNACK,
        SUBACK and birth PUBACK, `timeout_s` at most after the last one started. Returns seconds."""
        start = time.monotonic()
        for index, dev in enumerate(self.devices):
            if rate > 0:
                # A fleet that boots over a minute, not in one burst: keep the loop turning meanwhile.
                while (due := start + index / rate - time.monotonic()) > 0:
                    self.step(min(due, 0.05))
            for attempt in range(5):
                try:
                    dev.connect()
                    break
                except OSError as exc:
                    # A listen backlog overflow under a connect storm: back off and try again.
                    if attempt == 4:
                        raise SystemExit(
                            f"{dev.device_id}: cannot connect to {self.host}:{self.port}: {exc}"
                        ) from exc
                    time.sleep(0.1 * 2**attempt)
            self.step(0)
        deadline = time.monotonic() + timeout_s
        while not all(d.connected and d.subscribed and d.birth_acked for d in self.devices):
            if time.monotonic() > deadline:
                ready = sum(d.connected and d.subscribed and d.birth_acked for d in self.devices)
                raise SystemExit(
                    f"only {ready}/{len(self.devices)} devices connected within {timeout_s:.0f} s"
                )
            if self.errors:
                raise SystemExit(self.errors[0])
            self.step(0.05)
        return time.monotonic() - start

    # ---- control channel ----------------------------------------------------------------------

    def watch_stdin(self) -> None:
        """Read commands from stdin inside the same selector."""
        os.set_blocking(0, False)
        self.loop.sel.register(0, selectors.EVENT_READ, None)

    def _read_stdin(self) -> None:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return
        if not chunk:  # the bench went away: leave as if told to quit
            self.quit(clear=False)
            raise SystemExit(0)
        self._stdin += chunk
        while b"\n" in self._stdin:
            line, self._stdin = self._stdin.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))

    def reply(self, obj: dict[str, Any]) -> None:
        """One JSON line on stdout."""
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def handle(self, cmd: dict[str, Any]) -> None:
        """Run one command from the bench and answer it."""
        kind = cmd.get("cmd")
        if kind == "telemetry":
            self.rate = float(cmd["rate"])
            if self.rate <= 0:
                raise SystemExit("telemetry rate must be > 0 messages per second")
            self.start_at = float(cmd["start"])
            self.end_at = None if cmd.get("seconds") is None else self.start_at + float(cmd["seconds"])
            self.schedule = [(self.start_at + self._offset(i), i, 0) for i in range(len(self.devices))]
            self.schedule = [s for s in self.schedule if self.end_at is None or s[0] < self.end_at]
            heapq.heapify(self.schedule)
            self.lateness = []
            self.reply({"ok": True})
        elif kind == "stop":
            self.schedule = []
            self.reply({"ok": True})
        elif kind == "report":
            self.reply(self.report(float(cmd.get("wait_s", 30.0))))
        elif kind == "quit":
            self.quit(clear=bool(cmd.get("clear", True)))
            self.reply({"bye": True})
            raise SystemExit(0)
        else:
            self.reply({"error": f"unknown command {kind!r}: use telemetry, stop, report or quit"})

    def report(self, wait_s: float) -> dict[str, Any]:
        """Wait for the schedule to end and every publish to be acknowledged; then counts per device."""
        deadline = time.monotonic() + wait_s
        while (self.end_at is not None and self.schedule) or any(d.inflight for d in self.devices):
            if time.monotonic() > deadline:
                break
            self.step(0.05)
        lat = sorted(self.lateness)

        def q(p: float) -> float | None:
            return round(1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 3) if lat else None

        times = os.times()
        return {
            "telemetry": {d.device_id: sorted(d.telemetry_acked) for d in self.devices},
            "published": sum(d.published for d in self.devices),
            "acked": sum(d.acked for d in self.devices),
            "unacked": sum(len(d.inflight) for d in self.devices),
            "scheduled_left": len(self.schedule) if self.end_at is not None else 0,
            "send_lateness_ms": {"p50": q(50), "p99": q(99), "max": q(100)},
            "outcomes": {d.device_id: d.outcome for d in self.devices},
            "active": {d.device_id: d.active for d in self.devices},
            "deploy_seconds": [
                round(d.deploy_seconds, 4) for d in self.devices if d.deploy_seconds is not None
            ],
            "disconnects": sum(d.disconnects for d in self.devices),
            "suback_failures": self.suback_failures,
            "errors": self.errors[:20],
            "cpu_s": round(times.user + times.system, 3),
        }

    def quit(self, clear: bool) -> None:
        """Say offline like a stopping agent; with `clear`, also remove the retained state and session."""
        self.quitting = True
        for dev in self.devices:
            if dev.connected:
                dev.send(State, online=False, info=dev.state_info())
                if clear:
                    info = dev.client.publish(dev.topics.state, b"", qos=1, retain=True)
                    dev.inflight[info.mid] = None
        deadline = time.monotonic() + 10
        while any(d.inflight for d in self.devices if d.connected) and time.monotonic() < deadline:
            self.step(0.05)
        for dev in self.devices:
            if dev.connected:
                props = Properties(PacketTypes.DISCONNECT)
                # Expire the persistent session now, so a shared broker keeps nothing of the bench.
                props.SessionExpiryInterval = 0
                dev.client.disconnect(properties=props if clear and self.v5 else None)
        deadline = time.monotonic() + 5
        while any(d.connected for d in self.devices) and time.monotonic() < deadline:
            self.step(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--first", type=int, default=0, help="number of this process's first device")
    parser.add_argument("--count", type=int, required=True, help="devices in this process")
    parser.add_argument("--total", type=int, default=0, help="devices in all processes (spreads sends)")
    parser.add_argument("--trusted-key", required=True, help="the fleet's .pub file deploys must verify with")
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=float(_DEFAULTS["telemetry_interval_s"].default),  # type: ignore[arg-type]
        help="seconds between reports that the birth message advertises (the bench sets 1/rate)",
    )
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument(
        "--connect-rate", type=float, default=0.0, help="connections a second from this process (0: at once)"
    )
    parser.add_argument(
        "--mqtt-version",
        choices=("5", "3.1.1"),
        default="5",
        help="3.1.1 for a broker without MQTT 5 (NATS); sessions then persist by clean_session False",
    )
    args = parser.parse_args()
    if args.count < 1:
        raise SystemExit("--count must be at least 1")
    raise_nofile()
    pool = Pool(
        args.broker,
        args.fleet,
        args.first,
        args.count,
        max(args.total, args.first + args.count),
        args.trusted_key,
        args.telemetry_interval,
        args.mqtt_version,
    )
    seconds = pool.connect_all(args.connect_timeout, args.connect_rate)
    pool.watch_stdin()
    pool.reply({"ready": True, "devices": len(pool.devices), "connect_s": round(seconds, 3)})
    try:
        while True:
            pool.step(0.2)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    except OSError as exc:
        raise SystemExit(f"network error: {exc}") from exc


if __name__ == "__main__":
    main()
