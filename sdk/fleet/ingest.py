"""Ingest: subscribe to the fleet's state, events and telemetry and write them to the store in batches.

Several ingest processes can share the load through an MQTT shared subscription (`$share/GROUP/...`):
the broker hands each message to one member of the group. One writer thread per process keeps each
device's messages in arrival order, so the store's sequence tracking sees them as the device sent them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from edgefleet.agent.errors import ProtocolError
from edgefleet.agent.protocol import TOPIC_ROOT, State, Telemetry, parse_device_message
from edgefleet.sdk.mqtt_url import Connection, MqttOptions, connect
from edgefleet.sdk.store import Store, StoreError

from .registry import apply_state, device_from_topic

log = logging.getLogger(__name__)

_KINDS = ("state", "evt", "telemetry")


def flatten_telemetry(message: Telemetry) -> dict[str, Any]:
    """A telemetry message as a store row: the agent's metrics with the columns the store indexes."""
    m = message.metrics
    evaluation = m.get("eval") if isinstance(m.get("eval"), Mapping) else {}
    assert isinstance(evaluation, Mapping)
    row: dict[str, Any] = dict(m)
    row.update(
        device_id=message.device,
        seq=message.seq,
        ts=message.ts,
        profile=m.get("profile"),
        model_name=m.get("model"),
        model_version=m.get("model_version"),
        count=int(m.get("count") or 0),
        errors=int(m.get("errors") or 0),
        eval_accuracy=_num(evaluation.get("accuracy")),
        agreement=_num(evaluation.get("fidelity", evaluation.get("agreement"))),
        live_accuracy=_num(m.get("live_accuracy")),
    )
    for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
        row[key] = _num(m.get(key))
    return row


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class Ingest:
    """Subscribes to a fleet and writes what devices send into the store (batched telemetry)."""

    def __init__(
        self,
        store: Store,
        options: MqttOptions,
        fleet: str,
        *,
        share_group: str | None = None,
        max_rows: int = 500,
        max_delay_s: float = 0.2,
        client_id: str | None = None,
    ) -> None:
        self.store = store
        self.options = options
        self.fleet = fleet
        self.share_group = share_group
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.client_id = client_id
        self.received = 0
        self.stored_telemetry = 0
        self.stored_events = 0
        self.dropped = 0
        self.failures = 0
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._processed = 0

    def filters(self) -> list[str]:
        """The topic filters this ingest subscribes to (shared when a group is set)."""
        base = [f"{TOPIC_ROOT}/{self.fleet}/dev/+/{kind}" for kind in _KINDS]
        if self.share_group:
            return [f"$share/{self.share_group}/{f}" for f in base]
        return base

    def start(self) -> None:
        """Connect, subscribe and start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-ingest", daemon=True)
        self._thread.start()
        # A persistent session when a client id is given: messages sent while this process restarts
        # wait in the broker instead of being lost.
        self._conn = connect(
            self.options,
            on_message=self._on_message,
            client_id=self.client_id,
            persistent=self.client_id is not None,
            max_inflight=1000,
        )
        self._conn.subscribe([(f, 1) for f in self.filters()])

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        self.received += 1
        self._queue.put((topic, payload))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_delay_s
            stop = False
            while len(batch) < self.max_rows:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write(batch)
            self._processed += len(batch)
            if stop:
                return

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        """Write a batch in arrival order: telemetry runs go in one statement, events one by one."""
        pending: list[dict[str, Any]] = []
        for topic, payload in batch:
            kind = topic.rsplit("/", 1)[-1]
            device = device_from_topic(topic)
            if not payload or device is None:
                continue
            try:
                message = parse_device_message(payload)
            except ProtocolError as exc:
                self.dropped += 1
                log.debug("dropping malformed message on %s: %s", topic, exc.reason)
                continue
            if message.device != device:
                self.dropped += 1
                continue
            if kind == "telemetry" and isinstance(message, Telemetry):
                pending.append(flatten_telemetry(message))
                continue
            self._flush(pending)
            pending = []
            self._retry(lambda m=message, k=kind: self._write_other(k, m))
        self._flush(pending)

    def _write_other(self, kind: str, message: Any) -> None:
        if isinstance(message, State):
            apply_state(self.store, self.fleet, message)
            if message.seq >= 0:
                self.store.note_sequence(self.fleet, message.device, message.seq)
            return
        obj = message.to_obj()
        self.store.add_event(self.fleet, message.device, message.TYPE, obj, seq=message.seq, ts=message.ts)
        self.store.note_sequence(self.fleet, message.device, message.seq)
        self.stored_events += 1

    def _flush(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._retry(lambda: self._add_rows(rows))

    def _add_rows(self, rows: list[dict[str, Any]]) -> None:
        self.stored_telemetry += self.store.add_telemetry(self.fleet, rows)

    def _retry(self, action: Any, attempts: int = 8) -> None:
        """Run a store write, backing off on failure (a locked SQLite file, a restarting PostgreSQL)."""
        delay = 0.05
        for attempt in range(attempts):
            try:
                action()
                return
            except StoreError as exc:
                self.failures += 1
                if attempt == attempts - 1:
                    log.error("store write failed %d times, giving up on this batch: %s", attempts, exc)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything received so far is written; False on timeout."""
        target = self.received
        deadline = time.monotonic() + timeout_s
        while self._processed < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        """Stop receiving, write what is queued, stop the writer."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None
