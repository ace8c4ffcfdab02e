"""Ingest workers' broker sessions: acknowledge a message only once it is stored, and adopt a dead peer's session.

Several `edgefleet serve --worker NAME` processes share a fleet's ingest in one of two ways:

* a shared subscription (`$share/GROUP/...`, MQTT 5 brokers such as Mosquitto): the broker hands each
  message to one member of the group;
* a partition (`--partition K/N`, for brokers without shared subscriptions, such as NATS's MQTT 3.1.1):
  every worker receives every message and stores those of the devices whose stable hash falls in its
  share (`partition_of`), acknowledging the others unread.

Each worker has its own persistent session (a fixed client id) and acknowledges a QoS 1 message only
after its batch is written, so a worker killed mid-batch loses nothing: the broker keeps its unacked
and later messages in the session. Mosquitto 2.0 goes on queueing a shared subscription's share for a
member whose persistent session is offline (measured: a killed member's half of the messages waits
for it), so that share would wait until the worker comes back. A lease per session in the store
(`ingest/FLEET/GROUP/WORKER`, renewed every `lease_s / 3`) lets a live worker notice a dead peer:
it takes the expired lease with one conditional UPDATE and connects with the peer's client id, which
resumes the peer's session (queued and unacknowledged messages included) and serves it until the peer
returns and takes its lease back. A redelivered message that had been stored already conflicts on the
store's unique keys and is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable

from edgefleet.sdk.fleet.errors import BrokerUnavailable
from edgefleet.sdk.fleet.mqtt_url import AckToken, Connection, MqttOptions, connect
from edgefleet.sdk.store import Store, StoreError

log = logging.getLogger(__name__)

# Seconds a worker's lease on its session lasts without renewal: a killed worker's share is adopted
# by a peer this long (plus one renewal period) after its last renewal.
DEFAULT_LEASE_S = 6.0

# topic, payload, retained, ack token or None (already acknowledged).
RawHandler = Callable[[str, bytes, bool, "AckToken | None"], None]


def partition_of(device_id: str, count: int) -> int:
    """The partition (0 .. count-1) a device's messages belong to: a stable hash of its id (CRC-32)."""
    return zlib.crc32(device_id.encode("utf-8")) % count


def parse_partition(text: str) -> tuple[int, int]:
    """`K/N` (this worker's share K of N, 0-based) as (K, N); ValueError with the fix otherwise."""
    try:
        k_text, n_text = text.split("/", 1)
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"partition {text!r}: write K/N, e.g. 0/2 for the first of two workers") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"partition {text!r}: K must be 0 .. N-1 and N at least 1")
    return k, n


def connect_manual_ack(
    options: MqttOptions,
    handler: RawHandler,
    *,
    client_id: str,
    session_expiry_s: int,
    max_inflight: int = 1000,
) -> Connection:
    """A persistent session whose QoS 1 messages are acknowledged by the caller (`ack(token)`), not by paho."""
    return connect(
        options,
        on_message_ack=handler,
        client_id=client_id,
        persistent=True,
        session_expiry_s=session_expiry_s,
        max_inflight=max_inflight,
    )


class SessionLeases:
    """Renews this worker's lease on its session, adopts the sessions of peers whose lease ran out."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        own: str,
        owner: str,
        open_session: Callable[[str], Connection],
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.store = store
        self.prefix = prefix  # `ingest/FLEET/GROUP/`: the leases of this worker's peers
        self.own = own  # this worker's own lease name (prefix + worker)
        self.owner = owner
        self.open_session = open_session  # lease name → a connected session for it
        self.lease_s = lease_s
        self.adopted: dict[str, Connection] = {}
        self.adoptions = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take_own(self) -> float:
        """Take this worker's own lease (also from a peer that adopted it); seconds to wait before connecting.

        A peer serving our session notices within one renewal period that the lease is no longer its
        and lets the session go; connecting before that would make the two take the session from
        each other until it does.
        """
        held = {r["name"]: r for r in self.store.leases(self.prefix)}.get(self.own)
        self.store.claim_lease(self.own, self.owner, self.lease_s, force=True)
        if held is not None and held["owner"] != self.owner and float(held["expires"]) > time.time():
            return self.lease_s / 3 + 0.5
        return 0.0

    def start(self) -> None:
        """Start renewing and watching peers in the background."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-ingest-leases", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.tick()
            except StoreError as exc:
                log.warning("ingest lease check failed (the store is unreachable?): %s", exc)
            except Exception:  # the next round tries again; a dead thread would stop renewing for good
                log.exception("ingest lease check failed")

    def tick(self) -> None:
        """Renew our leases, let go of sessions taken back, adopt expired ones."""
        if not self.store.renew_lease(self.own, self.owner, self.lease_s):
            # We were silent too long and a peer adopted our session: we are alive, take it back.
            self.store.claim_lease(self.own, self.owner, self.lease_s, force=True)
        for name in list(self.adopted):
            if not self.store.renew_lease(name, self.owner, self.lease_s):
                log.info("session %s taken back by its worker; letting it go", name)
                self._drop(name)
        now = time.time()
        for row in self.store.leases(self.prefix):
            name = str(row["name"])
            if name == self.own or name in self.adopted or float(row["expires"]) >= now:
                continue
            if self._stop.is_set() or not self.store.claim_lease(name, self.owner, self.lease_s):
                continue  # another worker won the race for it
            try:
                self.adopted[name] = self.open_session(name)
            except (BrokerUnavailable, OSError) as exc:
                log.warning("cannot adopt the session of %s: %s", name, exc)
                self.store.release_lease(name, self.owner)
                continue
            self.adoptions += 1
            log.warning(
                "worker %s silent for %.1f s: serving its session", row["owner"], now - row["expires"]
            )

    def _drop(self, name: str) -> None:
        conn = self.adopted.pop(name, None)
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def close(self, release: bool = True) -> None:
        """Stop watching, close adopted sessions; with `release`, a peer adopts our session at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for name in list(self.adopted):
            self._drop(name)
            self._release(name)
        if release:
            self._release(self.own)

    def _release(self, name: str) -> None:
        try:
            self.store.release_lease(name, self.owner)
        except StoreError:
            pass
