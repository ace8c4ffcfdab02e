"""Helpers of the fleet tests: signed tiny bundles, real agent subprocesses, polling the store, and deploys
through the fleet's own sender (`Host`) with a broadcast a test may damage."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.protocol import (
    Deployed,
    DeviceMessage,
    Error,
    Progress,
    Rejected,
    Topics,
    parse_device_message,
)
from edgefleet.sdk.fleet.mqtt_url import Connection
from edgefleet.sdk.store import Store
from tests.agent_net_support import AgentProcess, agent_args, eval_set, export_tiny_onnx, make_bundle


def build_artifacts(d: Path) -> dict[str, Path]:
    """Keys and signed bundles: v1 and v2 (good), v3 (does not load), and v2 built for another profile."""
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(d / "keys")
    m1 = export_tiny_onnx(d / "m1.onnx", seed=0)
    m2 = export_tiny_onnx(d / "m2.onnx", seed=1)
    e1, e2 = eval_set(m1, d / "e1.npz"), eval_set(m2, d / "e2.npz")
    garbage = d / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model " * 40)
    k = d / "keys"
    return {
        "key": keys.public_path,
        "v1": make_bundle(d / "v1", k, m1, e1, version=1),
        "v2": make_bundle(d / "v2", k, m2, e2, version=2),
        "broken": make_bundle(d / "broken", k, garbage, e1, version=3),
        "v2-arm64": make_bundle(d / "v2-arm64", k, m2, e2, version=2, profile="arm64"),
        "v1-arm64": make_bundle(d / "v1-arm64", k, m1, e1, version=1, profile="arm64"),
    }


def tiny_bundle(d: Path) -> Path:
    """One signed bundle (version 1 of the tiny model) with its keys under `d`."""
    from edgefleet.sdk.trust.keys import init_keys

    init_keys(d / "keys")
    model = export_tiny_onnx(d / "m.onnx")
    return make_bundle(d / "bundle", d / "keys", model, eval_set(model, d / "e.npz"), version=1)


@contextmanager
def agents(
    tmp_path: Path, url: str, fleet: str, key: Path, ids: list[str], *extra: str, profile: str | None = None
) -> Iterator[dict[str, AgentProcess]]:
    """Start real agent processes (`edgefleet-agent`) and stop them at the end."""
    procs: dict[str, AgentProcess] = {}
    try:
        for device in ids:
            args = agent_args(tmp_path / device, url, fleet, device, key, *extra)
            if profile is not None:
                args[args.index("--profile") + 1] = profile
            (tmp_path / device).mkdir(parents=True, exist_ok=True)
            proc = AgentProcess(args, tmp_path / f"{device}.log")
            proc.start()
            procs[device] = proc
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def wait_online(store: Store, fleet: str, options: Any, ids: list[str], timeout: float = 30.0) -> None:
    """Wait until every device's retained state says online (read through the registry)."""
    from edgefleet.sdk.fleet import registry

    def ready() -> bool:
        registry.refresh(store, options, fleet, quiet_s=0.2, max_wait_s=1.0)
        rows = {d["device_id"]: d for d in store.devices(fleet)}
        return all(rows.get(i, {}).get("online") for i in ids)

    wait_for(ready, timeout, f"devices {ids} online")


def stored_seqs(store: Store, fleet: str, device: str) -> list[int]:
    """The `seq` of every telemetry row a device has in the store, repeats kept (sent == stored checks)."""
    from sqlalchemy import select

    from edgefleet.sdk.store import telemetry

    query = select(telemetry.c.seq).where((telemetry.c.fleet == fleet) & (telemetry.c.device_id == device))
    with store.engine.connect() as conn:
        return [int(s) for (s,) in conn.execute(query) if s is not None]


def device_statuses(store: Store, rollout_id: str) -> dict[str, str]:
    """Device id → status within a rollout."""
    row = store.rollout(rollout_id)
    assert row is not None
    return {d["device_id"]: d["status"] for d in row["devices"]}


# ---------------------------------------------------------------------------------------------------
# Deploys through the fleet's own sender (Fleet.deploy → RolloutEngine → BundleTransfer), as production
# runs it; what a test needs to see or disturb is observed on the broker or injected at the host's
# network boundary (Connection.publish), never through a second sender.

ChunkFilter = Callable[[str, int, bytes], "bytes | None"]


@dataclass
class Outcome:
    """One device's end of a deploy sent by the fleet, and every event the device sent for it."""

    rollout_id: str
    rollout_status: str
    status: str
    reason: str | None
    repairs: int
    events: list[DeviceMessage] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        """The progress steps the device reported, in order."""
        return [m.step for m in self.events if isinstance(m, Progress)]

    @property
    def errors(self) -> list[Error]:
        """The error events that answered this deploy (a bad chunk, a busy device)."""
        return [m for m in self.events if isinstance(m, Error)]

    @property
    def rejected(self) -> Rejected | None:
        """The device's refusal, when it refused."""
        return next((m for m in self.events if isinstance(m, Rejected)), None)


class _Dropped:
    """What publish returns for a chunk a filter dropped: already 'published', nothing to wait for."""

    def is_published(self) -> bool:
        return True

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None


@contextmanager
def filtered_broadcast(fleet: str, chunk_filter: ChunkFilter | None) -> Iterator[None]:
    """Pass every broadcast chunk the host publishes through `chunk_filter` (alter it, or drop it: None).

    Repairs go through untouched, so a test can damage the broadcast and watch the sender repair it.
    """
    if chunk_filter is None:
        yield
        return
    original = Connection.publish
    # Any device id parses the fleet-wide artifact topics.
    topics = Topics(fleet, "host")

    def publish(self: Connection, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            chunk = topics.parse_chunk_topic(topic)
        except ProtocolError:
            chunk = None
        if chunk is not None and topic == topics.artifact(*chunk):
            altered = chunk_filter(chunk[0], chunk[1], payload)
            if altered is None:
                return _Dropped()
            payload = altered
        return original(self, topic, payload, *args, **kwargs)

    with mock.patch.object(Connection, "publish", publish):
        yield


class EventLog:
    """Every evt message of one device with a given deploy id, with a callback per message (paho's thread)."""

    def __init__(self, url: str, fleet: str, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.deploy_id = ""
        self.on_event: Callable[[DeviceMessage], None] | None = None
        self.events: list[DeviceMessage] = []
        self._lock = threading.Lock()
        self._topics = Topics(fleet, device)
        topic = self._topics.evt
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"evt-{uuid.uuid4().hex[:12]}", protocol=mqtt.MQTTv5
        )
        # A persistent session: events sent while the broker restarts are not lost to the log.
        self.client.reconnect_delay_set(0.05, 0.5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.on_message = lambda c, u, m: self._on_message(bytes(m.payload))
        host, port = url.removeprefix("mqtt://").split(":")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect(host, int(port), clean_start=False, properties=props)
        self.client.loop_start()
        assert subscribed.wait(10), "the event log could not subscribe"

    def _on_message(self, payload: bytes) -> None:
        try:
            message = parse_device_message(payload)
        except ProtocolError:
            return
        ref = getattr(message, "deploy", None) or getattr(message, "ref", None)
        # An error about a chunk names the chunk's topic, not the deploy: it belongs to the open deploy.
        if ref != self.deploy_id and not (isinstance(message, Error) and self._is_chunk_topic(ref)):
            return
        with self._lock:
            self.events.append(message)
        if self.on_event is not None:
            self.on_event(message)

    def _is_chunk_topic(self, ref: Any) -> bool:
        try:
            return isinstance(ref, str) and self._topics.parse_chunk_topic(ref) is not None
        except ProtocolError:
            return False

    def take(self) -> list[DeviceMessage]:
        """The events logged so far (and start a new log)."""
        with self._lock:
            out, self.events = self.events, []
        return out

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class Host:
    """The fleet's control plane as a test drives it: one Fleet on a broker, its store and home in `home`."""

    def __init__(self, url: str, fleet: str, home: Path, trusted_key: Path | None) -> None:
        from edgefleet.sdk.fleet.client import Fleet

        home.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.fleet_name = fleet
        self.home = home
        self.fleet = Fleet(
            url,
            store=f"sqlite:///{home / 'host.db'}",
            fleet=fleet,
            trusted_keys=[trusted_key] if trusted_key else [],
        )
        self._logs: dict[str, EventLog] = {}

    def deploy(
        self,
        bundle: Path,
        device: str,
        *,
        timeout_s: float = 60.0,
        chunk_size: int | None = None,
        chunk_filter: ChunkFilter | None = None,
        on_event: Callable[[DeviceMessage], None] | None = None,
        rollout_id: str | None = None,
        delta: bool = True,
    ) -> Outcome:
        """Roll `bundle` out to one device with `Fleet.deploy` and wait for the end; the device's outcome."""
        from edgefleet.sdk.fleet.strategy import AbortRules

        rollout_id = rollout_id or f"t-{uuid.uuid4().hex[:12]}"
        log = self._logs.get(device)
        if log is None:
            log = self._logs[device] = EventLog(self.url, self.fleet_name, device)
        log.take()
        log.deploy_id, log.on_event = rollout_id, on_event
        with mock.patch.dict(os.environ, {"EDGEFLEET_HOME": str(self.home)}):
            with filtered_broadcast(self.fleet_name, chunk_filter):
                handle = self.fleet.deploy(
                    bundle,
                    device,
                    timeout_s=timeout_s,
                    rules=AbortRules(telemetry=False),
                    chunk_size=chunk_size,
                    ready_timeout_s=5.0,
                    delta=delta,
                    rollout_id=rollout_id,
                )
        row = self.fleet.rollout(handle.id)
        [dev] = [d for d in row["devices"] if d["device_id"] == device]
        if dev["status"] in ("deployed", "rejected"):
            # The device's last event reaches the log's own connection a moment after the engine's.
            want = Deployed if dev["status"] == "deployed" else Rejected
            wait_for(lambda: any(isinstance(m, want) for m in log.events), 10, f"the {dev['status']} event")
        log.on_event = None
        return Outcome(
            rollout_id=handle.id,
            rollout_status=str(row["status"]),
            status=str(dev["status"]),
            reason=dev.get("reason"),
            repairs=int(handle.engine.stats.repair_chunks),
            events=log.take(),
        )

    def close(self) -> None:
        """Close the event logs and the store."""
        for log in self._logs.values():
            log.close()
        self.fleet.close()
