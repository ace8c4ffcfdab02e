"""Ingest: subscribe to the fleet's state, events and telemetry and write them to the store in batches.

Several ingest processes (`edgefleet serve --worker NAME`) can share the load through an MQTT shared
subscription (`$share/GROUP/...`: the broker hands each message to one member of the group) or, on a
broker without them, a partition of the devices by a stable hash of their id. A named worker
acknowledges each message only once it is stored and adopts the session of a peer that died
(`ingest_sessions`), so killing one loses nothing; redeliveries are dropped by the store's unique
keys. One writer thread per process keeps each device's messages in arrival order, so the store's
sequence tracking sees them as the device sent them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.protocol import State, Telemetry, Topics, parse_device_message
from edgefleet.sdk.fleet.ingest_sessions import (
    DEFAULT_LEASE_S,
    SessionLeases,
    connect_manual_ack,
    partition_of,
)
from edgefleet.sdk.fleet.mqtt_url import AckToken, Connection, MqttOptions, connect
from edgefleet.sdk.fleet.mqtt_url import ack_message as ack
from edgefleet.sdk.fleet.registry import apply_state, device_from_topic
from edgefleet.sdk.store import Store, StoreError

log = logging.getLogger(__name__)

_KINDS = ("state", "evt", "telemetry")
# How often the writer thread looks for devices that went silent: a scan of every device, so not
# on every message, yet often enough to stay well inside 1.5x keepalive.
LIVENESS_CHECK_S = 0.5
# Devices silent this long are forgotten by the liveness check (their Last Will has long come).
FORGET_AFTER_S = 600.0
# How long the broker keeps an absent ingest's session and queues the fleet's messages for it: a
# `serve` restarted (or a broker outage) within this loses nothing.
INGEST_SESSION_EXPIRY_S = 3600
# A batch also ends when no message came for this long: a worker that acknowledges after writing has
# only the broker's in-flight window (Mosquitto: 20 by default) outstanding, so waiting out
# `max_delay_s` for a full batch would cap it at one window per delay.
IDLE_FLUSH_S = 0.005


def liveness_limit(info: Mapping[str, Any]) -> float | None:
    """Seconds of silence after which the host presumes a device gone, from what its `state` advertised.

    A broker publishes the Last Will once a client was silent for 1.5 × its keepalive, but only when its
    keepalive sweep comes round: Mosquitto 2.0 sweeps every 5-6 s, so a device cut off at keepalive 5 s
    was marked offline 7.1-11 s after the cut. A device that reports every `telemetry_interval_s` and
    has said nothing for its whole keepalive (and two reports) is gone without waiting for that sweep.
    None when the device does not advertise both (older agents): the Last Will alone decides.
    """
    keepalive = _num(info.get("keepalive_s"))
    interval = _num(info.get("telemetry_interval_s"))
    if keepalive is None or interval is None or keepalive <= 0 or interval <= 0:
        return None
    return max(keepalive, 2.0 * interval)


def partition_group(count: int) -> str:
    """The group name of the workers that split a fleet's devices `count` ways (client ids, leases)."""
    return f"part{count}"


def default_client_id(fleet: str, share_group: str | None = None, worker: str | None = None) -> str | None:
    """The fixed MQTT client id of a fleet's ingest worker, so a restarted one resumes its broker session.

    One ingest per fleet (what `edgefleet serve` runs): `edgefleet-ingest-FLEET`. Members of a shared
    subscription each need their own id, so they get one only when given a `worker` name; without it
    they keep a random id and a clean session (two unnamed members would otherwise take over each
    other's session).
    """
    if share_group is None:
        return f"edgefleet-ingest-{fleet}"
    if worker is None:
        return None
    return f"edgefleet-ingest-{fleet}-{share_group}-{worker}"


def flatten_telemetry(message: Telemetry) -> dict[str, Any]:
    """A telemetry message as a store row: its flat metrics with the columns the store indexes."""
    row: dict[str, Any] = message.flat_metrics()
    evaluation = next((q for q in message.quality if q.source != "feedback"), None)
    row.update(
        device_id=message.device,
        seq=message.seq,
        ts=message.ts,
        model_name=None if message.model is None else message.model.name,
        # One column per quality metric: the eval set's reading (its other scores ride in `detail`).
        accuracy=None if evaluation is None else evaluation.get("accuracy"),
        agreement=None if evaluation is None else evaluation.get("agreement"),
        fidelity=None if evaluation is None else evaluation.get("fidelity"),
    )
    row["eval_accuracy"] = row["accuracy"]  # the older column name, for readers not yet switched
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
        worker: str | None = None,
        session_expiry_s: int = INGEST_SESSION_EXPIRY_S,
        partition: tuple[int, int] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if partition is not None:
            if share_group is not None:
                raise ValueError("a worker either shares a subscription or takes a partition, not both")
            if worker is not None and worker != str(partition[0]):
                raise ValueError("a partition worker's name is its partition number K of K/N")
            worker = str(partition[0])
            share_group = None
        self.store = store
        self.options = options
        self.fleet = fleet
        self.share_group = share_group
        self.partition = partition
        self.worker = worker
        self.lease_s = lease_s
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        group = partition_group(partition[1]) if partition is not None else share_group
        self.client_id = client_id or default_client_id(fleet, group, worker)
        # A named worker of a group holds a lease on its session and adopts those of dead peers.
        self.lease_group = group if worker is not None and group is not None else None
        # A persistent session whenever the client id is fixed: messages published while this process
        # or the broker restarts wait in the broker instead of being lost (sent == stored).
        self.persistent = self.client_id is not None
        self.session_expiry_s = session_expiry_s
        self.received = 0
        self.stored_telemetry = 0
        self.stored_events = 0
        self.dropped = 0
        self.failures = 0
        self.skipped = 0  # messages of other partitions, acknowledged unread
        self._queue: queue.Queue[tuple[str, bytes, AckToken | None] | None] = queue.Queue()
        self._conn: Connection | None = None
        self._leases: SessionLeases | None = None
        self._thread: threading.Thread | None = None
        self._processed = 0
        # device → monotonic time of its last live (not retained) message; written on paho's thread.
        self._heard: dict[str, float] = {}
        self._presumed_offline: set[str] = set()
        # device → its liveness_limit, from its last birth (looked up in the store once otherwise).
        self._limits: dict[str, float | None] = {}
        self._last_liveness_check = 0.0
        self.presumed_offline = 0

    def filters(self) -> list[str]:
        """The topic filters this ingest subscribes to (shared when a group is set)."""
        base = [Topics.devices(self.fleet, kind) for kind in _KINDS]
        if self.share_group:
            return [f"$share/{self.share_group}/{f}" for f in base]
        return base

    def lease_prefix(self) -> str | None:
        """Where the leases of this worker's group live in the store (None for an unnamed ingest)."""
        return None if self.lease_group is None else f"ingest/{self.fleet}/{self.lease_group}/"

    def start(self) -> None:
        """Connect, subscribe and start the writer thread (and, for a named worker, the lease keeper)."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-ingest", daemon=True)
        self._thread.start()
        prefix = self.lease_prefix()
        if prefix is not None and self.worker is not None and self.client_id is not None:
            self._leases = SessionLeases(
                self.store,
                prefix,
                prefix + self.worker,
                owner=self.worker,
                open_session=self._open_adopted,
                lease_s=self.lease_s,
            )
            time.sleep(self._leases.take_own())
            self._conn = self._open_session(self.client_id, self.partition[0] if self.partition else None)
            self._leases.start()
            return
        if self.persistent and self.client_id is not None:
            self._conn = self._open_session(self.client_id, None)
            return
        self._conn = connect(
            self.options,
            on_message=lambda t, p, r: self._on_message(t, p, r, None, None),
            client_id=self.client_id,
            persistent=False,
            session_expiry_s=self.session_expiry_s,
            max_inflight=1000,
        )
        self._conn.subscribe([(f, 1) for f in self.filters()])

    def _open_session(self, client_id: str, part: int | None) -> Connection:
        """Connect a persistent session that acknowledges after storing; `part`: the partition it keeps."""
        conn = connect_manual_ack(
            self.options,
            lambda t, p, r, token: self._on_message(t, p, r, token, part),
            client_id=client_id,
            session_expiry_s=self.session_expiry_s,
        )
        conn.subscribe([(f, 1) for f in self.filters()])
        return conn

    def _open_adopted(self, lease_name: str) -> Connection:
        """Resume a dead peer's session (its lease `PREFIX/WORKER`) under its client id."""
        peer = lease_name.rsplit("/", 1)[1]
        client_id = default_client_id(self.fleet, self.lease_group, peer)
        assert client_id is not None
        part = int(peer) if self.partition is not None else None
        return self._open_session(client_id, part)

    def _on_message(
        self, topic: str, payload: bytes, retain: bool, token: AckToken | None, part: int | None
    ) -> None:
        self.received += 1
        device = device_from_topic(topic)
        mine = part is None or self.partition is None or device is None
        if not mine and partition_of(str(device), self.partition[1]) != part:  # type: ignore[index]
            self.skipped += 1
            ack(token)  # another worker's device: that worker stores it
            return
        if not retain and device is not None:
            self._heard[device] = time.monotonic()
        self._queue.put((topic, payload, token))

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=LIVENESS_CHECK_S)
            except queue.Empty:
                self._check_liveness()
                continue
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_delay_s
            stop = False
            while len(batch) < self.max_rows:
                wait = min(IDLE_FLUSH_S, deadline - time.monotonic())
                try:
                    nxt = self._queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write([(topic, payload) for topic, payload, _ in batch])
            for _, _, token in batch:
                ack(token)  # stored (or refused for good): the broker may forget it
            self._processed += len(batch)
            if stop:
                return
            if self._queue.empty():
                # Only once caught up: a backlog would make devices look silent that are not.
                self._check_liveness()

    def _check_liveness(self) -> None:
        """Mark online devices offline that have been silent past their `liveness_limit`."""
        now = time.monotonic()
        if now - self._last_liveness_check < LIVENESS_CHECK_S:
            return
        self._last_liveness_check = now
        for device, heard in list(self._heard.items()):
            silent = now - heard
            if silent > FORGET_AFTER_S:
                self._heard.pop(device, None)
                continue
            try:
                if device not in self._limits:
                    known = self.store.device(self.fleet, device) or {}
                    self._limits[device] = liveness_limit(known.get("state") or {})
                limit = self._limits[device]
                if limit is None or silent <= limit:
                    continue
                row = self.store.device(self.fleet, device)
            except StoreError:
                return
            if not row or not row.get("online"):
                if self._heard.get(device) == heard:
                    self._heard.pop(device, None)  # offline already: nothing to watch until it speaks
                continue
            seen = row.get("last_seen")
            if isinstance(seen, (int, float)) and time.time() - seen <= limit:
                continue  # another ingest process (shared subscription) heard it recently
            log.info("no message from %s for %.1f s (limit %.1f s): presumed offline", device, silent, limit)
            self._retry(lambda d=device: self.store.upsert_device(self.fleet, d, online=False))
            self._presumed_offline.add(device)
            self.presumed_offline += 1

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        """Write a batch: states into the device rows in arrival order, then telemetry, events and every
        sequence number in one transaction (Store.add_messages)."""
        rows: list[dict[str, Any]] = []
        event_rows: list[dict[str, Any]] = []
        seqs: list[tuple[str, int]] = []
        for topic, payload in batch:
            kind = str(Topics.kind_of(topic))
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
            if isinstance(message, State):
                self._presumed_offline.discard(device)  # a birth or a Last Will says it for sure
                if message.online:
                    self._limits[device] = liveness_limit(message.info)
                self._retry(lambda m=message: apply_state(self.store, self.fleet, m))
                if message.seq >= 0:
                    seqs.append((device, message.seq))
                continue
            if device in self._presumed_offline:
                # Presumed gone, yet it speaks: it is back (a slow spell, not a lost link).
                self._presumed_offline.discard(device)
                self._retry(lambda d=device: self.store.upsert_device(self.fleet, d, online=True))
            if kind == "telemetry" and isinstance(message, Telemetry):
                rows.append(flatten_telemetry(message))
                continue
            event_rows.append(
                {
                    "device_id": message.device,
                    "kind": message.TYPE,
                    "payload": message.to_obj(),
                    "seq": message.seq,
                    "ts": message.ts,
                }
            )
        if rows or event_rows or seqs:
            self._retry(lambda: self._add(rows, event_rows, seqs))

    def _add(
        self, rows: list[dict[str, Any]], event_rows: list[dict[str, Any]], seqs: list[tuple[str, int]]
    ) -> None:
        written, stored = self.store.add_messages(self.fleet, rows, event_rows, seqs)
        self.stored_telemetry += written
        self.stored_events += stored

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
        while self._processed + self.skipped < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def adoptions(self) -> int:
        """How many dead peers' sessions this worker took over so far."""
        return 0 if self._leases is None else self._leases.adoptions

    def close(self) -> None:
        """Stop receiving, write what is queued, stop the writer; a named worker's peers adopt its session."""
        if self._leases is not None:
            self._leases.close(release=False)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None
        if self._leases is not None:
            # Only now, with every batch written and acknowledged: a peer may resume the session.
            self._leases.close(release=True)
            self._leases = None
