"""Sending a root rotation to the devices over MQTT (`edgefleet keys push-rotation`) and reading their answers.

The statement itself is made and signed offline (`edgefleet.sdk.trust.keys`); this is the fleet's side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.manifest import canonical_bytes
from edgefleet.agent.core.trust import TrustStore
from edgefleet.sdk.trust.keys import KeysError, PathLike

ROTATION_OK = ("applied", "already", "queued")


@dataclass
class RotationOutcome:
    """How one device answered a `rotate-root` command.

    `status`: `applied` (it trusts the new root now), `already` (it had it), `queued` (offline: the
    broker holds the command for its persistent session), `refused` (`code` says why), `timeout`.
    """

    device_id: str
    status: str = "timeout"
    code: Optional[str] = None
    reason: str = ""
    root_version: Optional[int] = None

    @property
    def ok(self) -> bool:
        """Whether the device trusts (or will trust, once online) the new root."""
        return self.status in ROTATION_OK


def read_statement(source: Union[PathLike, bytes, dict[str, Any]]) -> dict[str, Any]:
    """A rotation statement `{"root": {...}, "signatures": [...]}` from a file, bytes or a dict, checked for shape."""
    import json

    from edgefleet.agent.core.trust import load_rotation

    if isinstance(source, dict):
        data = json.dumps(source).encode("utf-8")
    elif isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise KeysError(
                "statement-missing", f"cannot read the rotation statement {source}: {exc.strerror}"
            ) from None
    try:
        load_rotation(data)
        statement: dict[str, Any] = json.loads(data)
        TrustStore(statement["root"])  # the root's shape, checked the way a device checks it
    except VerifyError as exc:
        raise KeysError(exc.code, f"{exc.reason} (make one with `edgefleet keys rotate`)") from None
    return statement


def rotation_command(statement: dict[str, Any], command_id: Optional[str] = None) -> Any:
    """The `rotate-root` command carrying a statement (the root as its exact canonical, signed bytes)."""
    import uuid

    from edgefleet.agent.core.protocol import RotateRootCommand

    return RotateRootCommand(
        id=command_id or f"rot-{uuid.uuid4().hex[:12]}",
        root=canonical_bytes(statement["root"]),
        signatures=tuple({"keyid": s["keyid"], "sig": s["sig"]} for s in statement["signatures"]),
    )


def fleet_states(
    options: Any, fleet: str, *, quiet_s: float = 0.3, max_wait_s: float = 3.0
) -> list[dict[str, Any]]:
    """Every device's retained `state` in a fleet as selector rows (device_id, online, profile, tags, root_version)."""
    import threading
    import time

    from edgefleet.agent.core.errors import ProtocolError
    from edgefleet.agent.core.protocol import State, Topics, parse_device_message
    from edgefleet.sdk.fleet.mqtt_url import connect

    rows: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_message(topic: str, payload: bytes, retain: bool) -> None:
        try:
            message = parse_device_message(payload)
        except ProtocolError:
            return
        if not isinstance(message, State) or Topics.device_of(topic) != message.device:
            return
        with lock:
            previous = rows.get(message.device, {})
            # An offline state (the Last Will) says nothing else: the last birth's facts stand.
            known = message.online or not previous
            rows[message.device] = {
                "device_id": message.device,
                "online": message.online,
                "profile": message.profile if known else previous.get("profile"),
                "tags": list(message.tags) if known else previous.get("tags", []),
                "root_version": message.root_version if known else previous.get("root_version"),
            }
            last[0] = time.monotonic()

    conn = connect(options, on_message=on_message)
    try:
        start = time.monotonic()
        last[0] = start
        conn.subscribe([(Topics.devices(fleet, "state"), 1)])
        while time.monotonic() - start < max_wait_s:
            time.sleep(0.05)
            with lock:
                if time.monotonic() - last[0] >= quiet_s:
                    break
    finally:
        conn.close()
    with lock:
        return [rows[d] for d in sorted(rows)]


def push_rotation(
    statement: Union[PathLike, bytes, dict[str, Any]],
    to: str = "all",
    *,
    broker: Any = None,
    fleet: str = "default",
    timeout_s: float = 30.0,
) -> dict[str, RotationOutcome]:
    """Send a rotation statement to the devices `to` selects (id, tag:NAME, profile:NAME, all); wait for each answer.

    Online devices answer with a `result` (applied) or an `error` carrying the trust code (e.g.
    `rotation-threshold-not-met`); a `busy` device (installing) gets the command again with backoff.
    Offline devices are `queued`: the broker keeps the command in their persistent session.
    """
    import queue
    import time

    from edgefleet.agent.core.errors import ProtocolError
    from edgefleet.agent.core.protocol import Error, Result, Topics, parse_device_message
    from edgefleet.sdk.fleet.errors import SelectorError
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect, default_broker_url
    from edgefleet.sdk.fleet.selectors import resolve

    body = read_statement(statement)
    options = broker if isinstance(broker, MqttOptions) else MqttOptions(broker or default_broker_url())
    rows = fleet_states(options, fleet)
    try:
        targets = resolve(to, rows)
    except SelectorError as exc:  # it names the fix
        raise KeysError("no-targets", str(exc)) from None
    online = {r["device_id"] for r in rows if r["online"]}
    outcomes = {d: RotationOutcome(d) for d in targets}
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    conn = connect(options, on_message=lambda t, p, r: inbox.put((t, p)))
    try:
        topics = {d: Topics(fleet, d) for d in targets}
        by_evt = {t.evt: d for d, t in topics.items()}
        conn.subscribe([(t.evt, 1) for d, t in topics.items() if d in online])
        waiting: dict[str, tuple[str, float, float]] = {}  # device → (command id, next resend, backoff)
        for device in targets:
            cmd = rotation_command(body)
            conn.publish(topics[device].cmd, cmd.to_wire(), qos=1).wait_for_publish(10)
            if device in online:
                waiting[device] = (cmd.id, float("inf"), 0.5)
            else:
                outcomes[device].status = "queued"
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            now = time.monotonic()
            for device, (ref, resend_at, backoff) in list(waiting.items()):
                if now >= resend_at:
                    # The device was busy installing: ask again, backing off.
                    cmd = rotation_command(body, ref)
                    conn.publish(topics[device].cmd, cmd.to_wire(), qos=1)
                    waiting[device] = (ref, float("inf"), min(backoff * 2, 8.0))
            try:
                topic, payload = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            answering = by_evt.get(topic)
            if answering is None or answering not in waiting:
                continue
            try:
                message = parse_device_message(payload)
            except ProtocolError:
                continue
            ref, _, backoff = waiting[answering]
            outcome = outcomes[answering]
            if isinstance(message, Result) and message.ref == ref:
                applied, outcome.root_version = message.rotation()
                outcome.status = "applied" if applied else "already"
                del waiting[answering]
            elif isinstance(message, Error) and message.ref == ref:
                if message.code == "busy":
                    waiting[answering] = (ref, time.monotonic() + backoff, backoff)
                    continue
                outcome.status, outcome.code, outcome.reason = "refused", message.code, message.reason
                del waiting[answering]
    finally:
        conn.close()
    return outcomes
