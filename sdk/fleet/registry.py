"""The device registry: retained `state` birth messages and Last Wills → device rows in the store.

Reported state (online, profile, tags, agent version, runtimes, active model) comes from the devices;
the desired model is what the latest rollout asked for. `differences` says which devices do not run
what they should.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from edgefleet.agent.core.commands import StatusCommand
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.events import State, parse_device_message
from edgefleet.agent.core.topics import Topics
from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect
from edgefleet.sdk.store import Store


def state_topic_filter(fleet: str) -> str:
    """Subscription for every device's retained state in a fleet."""
    return Topics.devices(fleet, "state")


def device_from_topic(topic: str) -> str | None:
    """The device id in `edgefleet/v1/{fleet}/dev/{id}/...`, or None."""
    return Topics.device_of(topic)


def apply_state(store: Store, fleet: str, message: State) -> None:
    """Write one state message (birth or Last Will) into the device's row."""
    if not message.online and not message.profile:
        # The Last Will carries nothing but "offline": keep what the device said before.
        store.upsert_device(fleet, message.device, online=False, last_seen=time.time())
        return
    # A birth, or the full offline state a cleanly stopped agent leaves retained: a fresh store learns
    # the profile, tags and model of a device that is not running now (a deploy can then wait for it).
    active = message.active
    fields: dict[str, Any] = {
        "online": bool(message.online),
        "profile": message.profile,
        "tags": list(message.tags),
        "agent_version": message.agent_version,
        "runtimes": list(message.runtimes),
        "emulated": bool(message.emulated),
        "active_model": active.name if active else None,
        "active_version": active.version if active else None,
        # Kept whole for display and for the delta planner (which formats the device applies).
        "state": message.info,
        "last_seen": message.ts or time.time(),
    }
    store.upsert_device(fleet, message.device, **fields)


def handle_state_payload(store: Store, fleet: str, topic: str, payload: bytes) -> bool:
    """Parse and apply a payload from a state topic; an empty (cleared) or malformed one is ignored."""
    if not payload:
        return False
    try:
        message = parse_device_message(payload)
    except ProtocolError:
        return False
    if not isinstance(message, State) or device_from_topic(topic) != message.device:
        return False
    apply_state(store, fleet, message)
    return True


def sync_topic(fleet: str, nonce: str) -> str:
    """A host-only topic the registry publishes to itself to learn that the retained burst is over."""
    return Topics.host_sync(fleet, nonce)


def refresh(
    store: Store,
    options: MqttOptions,
    fleet: str,
    *,
    quiet_s: float = 0.2,
    after_sync_s: float = 0.02,
    max_wait_s: float = 3.0,
    reannounce_s: float = 1.0,
) -> int:
    """Read every retained state of the fleet from the broker into the store; returns how many devices.

    Retained messages arrive right after the subscription. To know when they are all in without
    waiting out a long silence, the host then publishes a message to a topic of its own: Mosquitto
    queues it behind the retained burst, so once it is back (and `after_sync_s` stayed quiet, for
    brokers that send retained messages asynchronously) every state is in. Where the sync message never
    comes back (an ACL without `{prefix}/host/#`), the wait ends after `quiet_s` without a message.

    The registry does not rely on retained messages alone: every device the store believes online whose
    state did not come back is sent a `status` command, which makes the agent publish its state again
    (brokers that lose or do not keep retained messages); the call waits up to `reannounce_s` for them.
    """
    nonce = uuid.uuid4().hex
    sync = sync_topic(fleet, nonce)
    last = [time.monotonic()]
    seen: set[str] = set()
    synced = threading.Event()
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes, retain: bool) -> None:
        if topic == sync:
            synced.set()
            return
        with lock:
            if handle_state_payload(store, fleet, topic, payload):
                seen.add(device_from_topic(topic) or "")
            last[0] = time.monotonic()

    conn = connect(options, on_message=on_message)
    try:
        start = time.monotonic()
        # Two SUBSCRIBEs: amqtt sends the retained states once per filter of a packet. The sync topic
        # first: a SUBACK sent after the states' would queue behind their whole burst, which paho's
        # thread works through with a store write each (past the SUBACK timeout at 5,000 devices).
        conn.subscribe([(sync, 1)])
        conn.subscribe([(state_topic_filter(fleet), 1)])
        with lock:
            last[0] = time.monotonic()  # the burst starts after the SUBACK, however slow the link
        conn.publish(sync, b"", qos=1)
        while time.monotonic() - start < max_wait_s:
            time.sleep(0.01 if synced.is_set() else 0.02)
            with lock:
                quiet = time.monotonic() - last[0]
            if quiet >= quiet_s or (synced.is_set() and quiet >= after_sync_s):
                break
        if reannounce_s > 0:
            _reannounce(store, conn, fleet, seen, lock, reannounce_s)
    finally:
        conn.close()
    return len(seen)


def _reannounce(
    store: Store, conn: Any, fleet: str, seen: set[str], lock: threading.Lock, wait_s: float
) -> None:
    """Ask the devices believed online that the retained burst missed to publish their state again."""
    with lock:
        missing = {d["device_id"] for d in store.devices(fleet) if d.get("online")} - seen
    if not missing:
        return
    for device in sorted(missing):
        command = StatusCommand(id=f"announce-{uuid.uuid4().hex[:12]}").to_wire()
        # Short expiry: a device that is really gone must not find a pile of these when it returns.
        conn.publish(Topics(fleet, device).cmd, command, qos=1, expiry_s=max(1.0, wait_s))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with lock:
            if missing <= seen:
                return
        time.sleep(0.02)


def differences(store: Store, fleet: str) -> list[dict[str, Any]]:
    """Devices whose reported model differs from the desired one: id, desired, reported, online."""
    out = []
    for d in store.devices(fleet):
        if d.get("desired_model") is None:
            continue
        desired = (d["desired_model"], d["desired_version"])
        reported = (d.get("active_model"), d.get("active_version"))
        if desired != reported:
            out.append(
                {
                    "device_id": d["device_id"],
                    "desired": f"{desired[0]} v{desired[1]}",
                    "reported": f"{reported[0]} v{reported[1]}" if reported[0] else None,
                    "online": bool(d.get("online")),
                }
            )
    return out
