"""Receivers for the rollout bench: N MQTT clients in one process, plain subscribers or agents' transfer side.

`plain`: subscribe to one topic and count bytes (what Mosquitto's fan-out costs). `plain-staged`: the
same subscription, and every chunk goes through the agent's own `Transfer.write_chunk` (its size and
hash checks — in order, the running whole-file sha256 against `prefix_sha256` —, `pwrite` into the part
file, bitmap), then
`finish()`: the per-byte work of a real device, without the protocol. `agent`: speak the agent's transfer
protocol (retained birth state; deploy command; the manifest's signature verified with the agent's
`verify_manifest`; files opened in the agent's `StagingArea`; subscribe to the artifact topic;
`download` progress; every chunk into `Transfer.write_chunk` as above; `missing` ranges when chunks
stop; `finish()` compares the whole file's signed sha256; `deployed`), without installing: the bench
measures the transfer. Staging lives under STAGING (the bench uses /dev/shm when there is one: 50
devices writing 20 MB each to one shared disk would measure that disk, not the transfer).
Prints one JSON line when every receiver is done.

    python bench/fleet_receivers.py plain PORT FLEET FIRST COUNT TOPIC EXPECTED_BYTES
    python bench/fleet_receivers.py plain-staged PORT FLEET FIRST COUNT TOPIC SPECS_JSON STAGING
    python bench/fleet_receivers.py agent PORT FLEET FIRST COUNT TRUSTED_KEY STAGING
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.protocol import (
    DeployCommand,
    Deployed,
    FileTransfer,
    Missing,
    Progress,
    Rejected,
    State,
    Topics,
    build_message,
    parse_command,
)
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.core.verify import verify_manifest
from edgefleet.agent.transfer import StagingArea, Transfer

# Process CPU seconds when the first chunk reached any client of this process (set once).
FIRST_CHUNK_CPU: list[float] = []


def _first_chunk() -> None:
    if not FIRST_CHUNK_CPU:
        FIRST_CHUNK_CPU.append(time.process_time())


class Plain:
    """Counts the bytes of one topic filter; with `specs`, stores every chunk as an agent does."""

    def __init__(
        self,
        port: int,
        name: str,
        topic: str,
        expected: int,
        done: threading.Event,
        specs: list[FileTransfer] | None = None,
        staging: Path | None = None,
    ) -> None:
        self.got = 0
        self.expected = expected
        self.done = done
        self.done_at = 0.0  # when the last byte was in (and, staged, verified): the bench's end time
        self.lock = threading.Lock()
        # With specs: the agent's Transfer per file, so the per-byte work is exactly a device's.
        self.transfers: dict[str, Transfer] = {}
        if specs is not None and staging is not None:
            area = StagingArea(staging / name)
            self.transfers = {spec.sha256: area.open(spec) for spec in specs}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def on_message(self, c: Any, u: Any, m: Any) -> None:
        """Count one message's bytes (and store the chunk, in staged mode)."""
        with self.lock:
            if self.done.is_set():
                return
            self.got += len(m.payload)
            _first_chunk()
            if self.transfers:
                ref = Topics.parse(m.topic)
                transfer = None if ref is None or ref.sha256 is None else self.transfers.get(ref.sha256)
                if transfer is not None and ref is not None and ref.index is not None:
                    transfer.write_chunk(ref.index, m.payload)
                if all(t.complete for t in self.transfers.values()):
                    for t in self.transfers.values():
                        t.finish()
                        t.close()
                    self.done_at = time.time()
                    self.done.set()
            elif self.got >= self.expected:
                self.done_at = time.time()
                self.done.set()


class Receiver:
    """The agent's side of a transfer, with the agent's own verification and staging code, without the install."""

    def __init__(
        self, port: int, fleet: str, device: str, done: threading.Event, trust: TrustStore, staging: Path
    ) -> None:
        self.topics = Topics(fleet, device)
        self.device = device
        self.done = done
        self.trust = trust
        self.staging = StagingArea(staging / device)
        self.seq = 0
        self.lock = threading.Lock()
        self.cmd: DeployCommand | None = None
        self.transfers: dict[str, Transfer] = {}
        self.finished = False
        self.done_at = 0.0  # when `deployed` went out: the last one is the rollout's real end on devices
        self.error: str | None = None
        self.last = time.monotonic()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{fleet}-{device}")
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(self.topics.cmd, 1), (self.topics.repair_filter, 1)])
        self.client.loop_start()
        self.send(State, online=True, info={"profile": "x86-64", "agent_version": "bench", "active": None})

    def send(self, cls: Any, **fields: Any) -> None:
        """Publish a device message with the next sequence number (state retained)."""
        self.seq += 1
        retain = cls is State
        msg = build_message(cls, self.device, self.seq, time.time(), **fields)
        topic = self.topics.state if retain else self.topics.evt
        self.client.publish(topic, msg.to_wire(), qos=1, retain=retain)

    def on_message(self, c: Any, u: Any, m: Any) -> None:
        """Route a command or a chunk."""
        with self.lock:
            if m.topic == self.topics.cmd:
                cmd = parse_command(m.payload)
                if isinstance(cmd, DeployCommand) and self.cmd is None:
                    self.start(cmd)
                return
            where = self.topics.parse_chunk_topic(m.topic)
            if where is not None and self.cmd is not None:
                _first_chunk()
                self.chunk(where[0], where[1], m.payload)

    def start(self, cmd: DeployCommand) -> None:
        """Verify the signed manifest, open each file's staging, subscribe to its chunks, then say so."""
        try:
            verify_manifest(
                cmd.manifest, cmd.signatures, self.trust, profile="x86-64", device_id=self.device, ledger=None
            )
        except AgentError as exc:
            self.send(Rejected, deploy=cmd.id, step="verify-manifest", code=exc.code, reason=exc.reason)
            self.fail(f"{exc.code}: {exc.reason}")
            return
        self.cmd = cmd
        self.last = time.monotonic()
        for f in cmd.files:
            self.transfers[f.sha256] = self.staging.open(f)
            self.client.subscribe(self.topics.artifact_filter(f.sha256), qos=1)
        self.send(
            Progress,
            deploy=cmd.id,
            step="download",
            detail={"chunks": sum(f.chunks for f in cmd.files), "have": 0},
        )

    def chunk(self, sha: str, index: int, data: bytes) -> None:
        """One chunk into the agent's Transfer (checks, write, running hash); `deployed` once all verify."""
        transfer = self.transfers.get(sha)
        if transfer is None or self.finished:
            return
        if not transfer.write_chunk(index, data):
            return  # a duplicate
        self.last = time.monotonic()
        if all(t.complete for t in self.transfers.values()):
            assert self.cmd is not None
            self.finished = True
            try:
                for t in self.transfers.values():
                    t.finish()
            except AgentError as exc:
                self.fail(f"{exc.code}: {exc.reason}")
                return
            self.send(Deployed, deploy=self.cmd.id, name="bench", version=1, health={})
            self.done_at = time.time()
            self.staging.close()
            self.done.set()

    def fail(self, reason: str) -> None:
        """Give up on this device: the bench reports it instead of waiting for it."""
        self.error = f"{self.device}: {reason}"
        self.finished = True
        self.done_at = time.time()
        self.done.set()

    def ask_missing(self) -> None:
        """When chunks stopped for a second, ask for the missing ranges."""
        with self.lock:
            if self.cmd is None or self.finished or time.monotonic() - self.last < 1.0:
                return
            for sha, transfer in self.transfers.items():
                ranges = tuple((a, b) for a, b in transfer.missing_ranges(32))
                if ranges:
                    self.send(Missing, deploy=self.cmd.id, sha256=sha, ranges=ranges)
            self.last = time.monotonic()


def main() -> None:
    mode, port, fleet, first, count = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    events = [threading.Event() for _ in range(count)]
    if mode == "plain":
        topic, expected = sys.argv[6], int(sys.argv[7])
        clients: list[Any] = [
            Plain(port, f"plain-{fleet}-{first + i}", topic, expected, events[i]) for i in range(count)
        ]
    elif mode == "plain-staged":
        topic, specs_path, staging = sys.argv[6], Path(sys.argv[7]), Path(sys.argv[8])
        specs = [FileTransfer.from_obj(o) for o in json.loads(specs_path.read_text())]
        total = sum(spec.size for spec in specs)
        clients = [
            Plain(port, f"staged-{fleet}-{first + i}", topic, total, events[i], specs, staging)
            for i in range(count)
        ]
    elif mode == "agent":
        trust = TrustStore.from_public_keys([sys.argv[6]])
        staging = Path(sys.argv[7])
        clients = [
            Receiver(port, fleet, f"dev-{first + i:03d}", events[i], trust, staging) for i in range(count)
        ]
    else:
        raise SystemExit(f"unknown mode {mode!r}: use plain, plain-staged or agent")
    print(json.dumps({"ready": True}), flush=True)
    cpu_ready = time.process_time()
    deadline = time.monotonic() + 600
    while not all(e.is_set() for e in events) and time.monotonic() < deadline:
        time.sleep(0.2)
        if mode == "agent":
            for c in clients:
                c.ask_missing()
    # Each client stamped its own completion, so the 0.2 s polling above adds nothing to the time.
    errors = [c.error for c in clients if getattr(c, "error", None)]
    done = all(e.is_set() for e in events) and not errors
    if errors:
        print("\n".join(errors[:5]), file=sys.stderr)
    print(
        json.dumps(
            {
                "done": done,
                "at": max(c.done_at for c in clients) if done else time.time(),
                "cpu_s": time.process_time() - cpu_ready,  # this process's CPU while receiving
                # of which before the first chunk (commands, signature check, staging set-up)
                "cpu_before_chunks_s": (FIRST_CHUNK_CPU or [cpu_ready])[0] - cpu_ready,
                "duplicates": sum(
                    t.duplicates for c in clients for t in getattr(c, "transfers", {}).values()
                ),
            }
        ),
        flush=True,
    )
    time.sleep(0.5)
    for c in clients:
        c.client.disconnect()
        c.client.loop_stop()


if __name__ == "__main__":
    main()
