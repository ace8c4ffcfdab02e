"""Receivers for the rollout bench: N MQTT clients in one process, either plain subscribers or agents' transfer side.

`plain`: subscribe to one topic and count bytes (what Mosquitto's fan-out costs); `plain-sha256`: the
same, hashing every byte as a verifying device must. `agent`: speak the
agent's transfer protocol (retained birth state, deploy command, subscribe to the artifact topic,
`download` progress, chunks in order into a running sha256, `missing` ranges when chunks stop, the
whole file's signed hash checked, `deployed`), without installing: the bench measures the transfer.
Prints one JSON line when every receiver is done.

    python bench/fleet_receivers.py MODE PORT FLEET FIRST COUNT [TOPIC EXPECTED_BYTES]
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.agent.protocol import (
    DeployCommand,
    Deployed,
    Missing,
    Progress,
    State,
    Topics,
    parse_command,
    ranges_of,
)


class Plain:
    """Counts the bytes of one topic filter."""

    def __init__(
        self, port: int, name: str, topic: str, expected: int, done: threading.Event, digest: bool = False
    ) -> None:
        self.got = 0
        # With `digest`, every byte also goes through sha256, the CPU work a verifying device does.
        self.hash = hashlib.sha256() if digest else None
        self.expected = expected
        self.done = done
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def on_message(self, c: Any, u: Any, m: Any) -> None:
        """Count one message's bytes."""
        self.got += len(m.payload)
        if self.hash is not None:
            self.hash.update(m.payload)
        if self.got >= self.expected:
            self.done.set()


class Receiver:
    """The agent's side of a transfer, without the install."""

    def __init__(self, port: int, fleet: str, device: str, done: threading.Event) -> None:
        self.topics = Topics(fleet, device)
        self.device = device
        self.done = done
        self.seq = 0
        self.lock = threading.Lock()
        self.cmd: DeployCommand | None = None
        self.state: dict[str, Any] = {}
        self.finished = False
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
        msg = cls(device=self.device, seq=self.seq, ts=time.time(), **fields)
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
                self.chunk(where[0], where[1], bytes(m.payload))

    def start(self, cmd: DeployCommand) -> None:
        """Begin a download: subscribe to each file's chunks, then say so."""
        self.cmd = cmd
        self.last = time.monotonic()
        for f in cmd.files:
            self.state[f.sha256] = {"spec": f, "next": 0, "hash": hashlib.sha256(), "held": {}, "have": set()}
            self.client.subscribe(self.topics.artifact_filter(f.sha256), qos=1)
        self.send(
            Progress,
            deploy=cmd.id,
            step="download",
            detail={"chunks": sum(f.chunks for f in cmd.files), "have": 0},
        )

    def chunk(self, sha: str, index: int, data: bytes) -> None:
        """Take one chunk (duplicates dropped), hash in order, report `deployed` when all verify."""
        st = self.state.get(sha)
        if st is None or index in st["have"]:
            return
        self.last = time.monotonic()
        st["have"].add(index)
        st["held"][index] = data
        while st["next"] in st["held"]:
            st["hash"].update(st["held"].pop(st["next"]))
            st["next"] += 1
        if all(s["next"] == s["spec"].chunks for s in self.state.values()) and not self.finished:
            assert self.cmd is not None
            bad = [s["spec"].file for s in self.state.values() if s["hash"].hexdigest() != s["spec"].sha256]
            self.finished = True
            if bad:
                raise SystemExit(f"{self.device}: hash mismatch on {bad}")
            self.send(Deployed, deploy=self.cmd.id, name="bench", version=1, health={})
            self.done.set()

    def ask_missing(self) -> None:
        """When chunks stopped for a second, ask for the missing ranges."""
        with self.lock:
            if self.cmd is None or self.finished or time.monotonic() - self.last < 1.0:
                return
            for sha, st in self.state.items():
                missing = [i for i in range(st["spec"].chunks) if i not in st["have"]]
                if missing:
                    ranges = tuple((a, b) for a, b in ranges_of(missing)[:32])
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
    if mode in ("plain", "plain-sha256"):
        topic, expected = sys.argv[6], int(sys.argv[7])
        clients: list[Any] = [
            Plain(port, f"plain-{fleet}-{first + i}", topic, expected, events[i], digest=mode != "plain")
            for i in range(count)
        ]
    elif mode != "agent":
        raise SystemExit(f"unknown mode {mode!r}: use plain, plain-sha256 or agent")
    else:
        clients = [Receiver(port, fleet, f"dev-{first + i:03d}", events[i]) for i in range(count)]
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + 600
    while not all(e.is_set() for e in events) and time.monotonic() < deadline:
        time.sleep(0.2)
        if mode == "agent":
            for c in clients:
                c.ask_missing()
    print(json.dumps({"done": all(e.is_set() for e in events), "at": time.time()}), flush=True)
    time.sleep(0.5)
    for c in clients:
        c.client.disconnect()
        c.client.loop_stop()


if __name__ == "__main__":
    main()
