"""Host-side sender of one bundle to devices: the signed deploy command, broadcast chunks, repairs.

The minimal piece of the fleet control plane that talks the agent's transfer protocol: it publishes
the deploy command on each device's `cmd` topic, waits until each device has verified the manifest and
subscribed (its `download` progress event), broadcasts every chunk once on `artifact/{sha256}/{index}`,
then answers each device's `missing` ranges on its own repair topic until every device reports
`deployed` or `rejected` (or the timeout passes).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.protocol import (
    DeployCommand,
    Deployed,
    DeviceMessage,
    FileTransfer,
    Missing,
    Progress,
    Rejected,
    Topics,
    parse_device_message,
)
from edgefleet.agent.transfer import chunk_digests

DEFAULT_CHUNK_SIZE = 64 * 1024
# Wait for the broker's PUBACK every so many chunks, so a big file never sits whole in paho's queue.
_PUBLISH_WINDOW = 64

ChunkFilter = Callable[[str, int, bytes], "bytes | None"]


class PushError(Exception):
    """The bundle cannot be pushed (unreadable, inconsistent, broker unreachable); the message says why."""


@dataclass
class DeviceOutcome:
    """How one device's deploy ended: `deployed`, `rejected` or `timeout`, with what it reported."""

    device_id: str
    status: str = "pending"
    event: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    repairs: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the new model serves on the device."""
        return self.status == "deployed"


@dataclass(frozen=True)
class _File:
    spec: FileTransfer
    path: Path


class BundlePusher:
    """Push one bundle folder to devices over MQTT; reusable for several `push` calls."""

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        broker_url: str = "mqtt://127.0.0.1:1883",
        fleet: str = "default",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_hashes: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise PushError(f"chunk size {chunk_size} must be at least 1 byte")
        self.bundle_dir = Path(bundle_dir)
        self.broker_url = broker_url
        self.fleet = fleet
        self.chunk_size = chunk_size
        self._auth = (username, password)
        self._tls = (tls_ca, tls_cert, tls_key)
        self.manifest_bytes, self.signatures = self._read_signed()
        self.files = self._describe_files(chunk_hashes)

    # -- bundle ------------------------------------------------------------------------------------------

    def _read_signed(self) -> tuple[bytes, dict[str, Any]]:
        manifest_path = self.bundle_dir / "manifest.json"
        signature_path = self.bundle_dir / "signature.json"
        for path in (manifest_path, signature_path):
            if not path.is_file():
                raise PushError(
                    f"{path} is missing: is {self.bundle_dir} a bundle made by `edgefleet build`?"
                )
        signatures = json.loads(signature_path.read_bytes())
        if not isinstance(signatures, dict):
            raise PushError(f"{signature_path} must hold a JSON object")
        return manifest_path.read_bytes(), signatures

    def _describe_files(self, chunk_hashes: bool) -> list[_File]:
        try:
            manifest = json.loads(self.manifest_bytes)
            entries = manifest["files"]
        except (ValueError, KeyError, TypeError):
            raise PushError(f"{self.bundle_dir / 'manifest.json'} has no `files` table") from None
        out = []
        for name, entry in sorted(entries.items()):
            path = self.bundle_dir / name
            if not path.is_file():
                raise PushError(f"bundle file {path} named in the manifest is missing")
            data = path.read_bytes()
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise PushError(f"bundle file {path} does not match its manifest entry: rebuild the bundle")
            chunks = -(-len(data) // self.chunk_size)
            digests: tuple[list[str], list[str]] = ([], [])
            if chunk_hashes:
                digests = chunk_digests(
                    data[i * self.chunk_size : (i + 1) * self.chunk_size] for i in range(chunks)
                )
            spec = FileTransfer(
                name,
                entry["sha256"],
                len(data),
                self.chunk_size,
                chunks,
                tuple(digests[0]),
                tuple(digests[1]),
            )
            out.append(_File(spec, path))
        return out

    def deploy_command(self, deploy_id: str, device: str | None = None) -> DeployCommand:
        """The deploy command for one device (or any device when `device` is None)."""
        return DeployCommand(
            id=deploy_id,
            manifest=self.manifest_bytes,
            signatures=self.signatures,
            files=tuple(f.spec for f in self.files),
            device=device,
        )

    def chunk(self, sha256: str, index: int) -> bytes:
        """Bytes of one chunk, read from the bundle file."""
        for f in self.files:
            if f.spec.sha256 == sha256:
                if not 0 <= index < f.spec.chunks:
                    raise PushError(f"chunk {index} of {f.spec.file} is out of range")
                with open(f.path, "rb") as handle:
                    handle.seek(index * self.chunk_size)
                    return handle.read(self.chunk_size)
        raise PushError(f"no file with sha256 {sha256[:12]}… in this bundle")

    # -- MQTT --------------------------------------------------------------------------------------------

    def _connect(self, inbox: queue.Queue[tuple[str, bytes]]) -> Any:
        import paho.mqtt.client as mqtt

        parts = urlsplit(self.broker_url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise PushError(f"broker URL {self.broker_url!r}: use mqtt://host:port or mqtts://host:port")
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-push-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        # paho reconnects by itself after a broker restart; the persistent session keeps the evt
        # subscriptions and queued repairs across it.
        client.reconnect_delay_set(1, 4)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(_PUBLISH_WINDOW)
        if self._auth[0]:
            client.username_pw_set(*self._auth)
        if parts.scheme == "mqtts" or any(self._tls):
            client.tls_set(ca_certs=self._tls[0], certfile=self._tls[1], keyfile=self._tls[2])
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
        client.on_message = lambda c, u, m: inbox.put((m.topic, bytes(m.payload)))
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        try:
            client.connect(
                parts.hostname,
                parts.port or (8883 if parts.scheme == "mqtts" else 1883),
                keepalive=30,
                clean_start=False,
                properties=props,
            )
        except OSError as exc:
            raise PushError(f"cannot reach the broker at {self.broker_url}: {exc}") from None
        client.loop_start()
        if not connected.wait(10):
            client.loop_stop()
            raise PushError(f"the broker at {self.broker_url} did not accept the connection within 10 s")
        return client

    def push(
        self,
        device_ids: Iterable[str],
        *,
        deploy_id: str | None = None,
        timeout_s: float = 120.0,
        ready_timeout_s: float = 15.0,
        chunk_filter: ChunkFilter | None = None,
        on_event: Callable[[DeviceMessage], None] | None = None,
    ) -> dict[str, DeviceOutcome]:
        """Deploy to `device_ids` and wait for each outcome; `chunk_filter` may drop (None) or alter broadcast chunks."""
        devices = list(dict.fromkeys(device_ids))
        if not devices:
            raise PushError("no target devices given")
        deploy_id = deploy_id or f"d-{uuid.uuid4().hex[:12]}"
        topics = {d: Topics(self.fleet, d) for d in devices}
        outcomes = {d: DeviceOutcome(d) for d in devices}
        inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        by_topic = {t.evt: d for d, t in topics.items()}
        client = self._connect(inbox)
        try:
            subscribed = threading.Event()
            client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
            client.subscribe([(t.evt, 1) for t in topics.values()])
            # The SUBACK must be in before the command goes out, or an instant answer would be missed.
            if not subscribed.wait(10):
                raise PushError(
                    f"the broker at {self.broker_url} did not confirm the subscription within 10 s"
                )
            for d in devices:
                client.publish(
                    topics[d].cmd, self.deploy_command(deploy_id, d).to_wire(), qos=1
                ).wait_for_publish(10)
            deadline = time.monotonic() + timeout_s
            ready_deadline = time.monotonic() + min(ready_timeout_s, timeout_s)
            ready: set[str] = set()

            def pump(until: float, stop_when: Callable[[], bool]) -> None:
                while not stop_when() and time.monotonic() < until:
                    try:
                        topic, payload = inbox.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    device = by_topic.get(topic)
                    if device is not None:
                        self._on_event(
                            client, topics[device], outcomes[device], deploy_id, payload, ready, on_event
                        )

            pump(ready_deadline, lambda: all(d in ready or outcomes[d].status != "pending" for d in devices))
            if any(o.status == "pending" for o in outcomes.values()):
                self._broadcast(client, topics[devices[0]], chunk_filter)
            pump(deadline, lambda: all(o.status != "pending" for o in outcomes.values()))
        finally:
            client.disconnect()
            client.loop_stop()
        for outcome in outcomes.values():
            if outcome.status == "pending":
                outcome.status = "timeout"
        return outcomes

    def _broadcast(self, client: Any, topics: Topics, chunk_filter: ChunkFilter | None) -> None:
        sent = 0
        for f in self.files:
            with open(f.path, "rb") as handle:
                for index in range(f.spec.chunks):
                    data: bytes | None = handle.read(self.chunk_size)
                    if chunk_filter is not None:
                        data = chunk_filter(f.spec.sha256, index, data or b"")
                    if data is None:
                        continue
                    info = client.publish(topics.artifact(f.spec.sha256, index), data, qos=1)
                    sent += 1
                    if sent % _PUBLISH_WINDOW == 0:
                        self._wait_published(client, info)

    @staticmethod
    def _wait_published(client: Any, info: Any, timeout_s: float = 30.0) -> None:
        """Wait for a PUBACK; while the broker is away paho keeps the message and resends it on reconnect."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not info.is_published():
            if client.is_connected():
                try:
                    info.wait_for_publish(min(1.0, max(0.01, deadline - time.monotonic())))
                except (RuntimeError, ValueError):
                    time.sleep(0.05)
            else:
                time.sleep(0.05)

    def _on_event(
        self,
        client: Any,
        topics: Topics,
        outcome: DeviceOutcome,
        deploy_id: str,
        payload: bytes,
        ready: set[str],
        on_event: Callable[[DeviceMessage], None] | None,
    ) -> None:
        try:
            message = parse_device_message(payload)
        except ProtocolError:
            return
        if on_event is not None:
            on_event(message)
        if isinstance(message, Progress) and message.deploy == deploy_id:
            outcome.steps.append(message.step)
            if message.step == "download":
                ready.add(outcome.device_id)
        elif isinstance(message, Missing) and message.deploy == deploy_id:
            for start, end in message.ranges:
                for index in range(start, end + 1):
                    try:
                        data = self.chunk(message.sha256, index)
                    except PushError:
                        continue
                    client.publish(topics.repair(message.sha256, index), data, qos=1)
                    outcome.repairs += 1
        elif isinstance(message, (Deployed, Rejected)) and message.deploy == deploy_id:
            outcome.status = message.TYPE
            outcome.event = message.to_obj()
        elif message.TYPE == "error":
            outcome.errors.append(message.to_obj())


def push_bundle(
    bundle_dir: str | Path,
    device_ids: Iterable[str],
    *,
    broker_url: str = "mqtt://127.0.0.1:1883",
    fleet: str = "default",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout_s: float = 120.0,
) -> dict[str, DeviceOutcome]:
    """Push a bundle to devices and return each one's outcome (see BundlePusher for the options)."""
    pusher = BundlePusher(bundle_dir, broker_url=broker_url, fleet=fleet, chunk_size=chunk_size)
    return pusher.push(device_ids, timeout_s=timeout_s)
