"""The rollout engine: waves, soak, abort rules and rollback, with every decision kept in the store.

One engine drives one rollout. Its progress (current wave, soak deadline, when each device was told)
lives in the rollout's `settings` in the store and each device's status in `rollout_devices`, so a
host process killed mid-rollout is replaced by `Fleet.resume(id)`, which carries on: it re-sends the
deploy command (same id) to every device still in flight; an agent that already finished answers with
its stored outcome, one still downloading asks again for the chunks it misses. The engine's MQTT
session is persistent (a client id per rollout), so events sent while no host ran wait in the broker.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.protocol import (
    TOPIC_ROOT,
    Code,
    Deployed,
    DeviceMessage,
    Error,
    Missing,
    Progress,
    Rejected,
    Result,
    RollbackCommand,
    Telemetry,
    Topics,
    parse_device_message,
)
from edgefleet.sdk.fleet.delta import plan_patch
from edgefleet.sdk.fleet.errors import RolloutNotFound
from edgefleet.sdk.fleet.ingest import flatten_telemetry
from edgefleet.sdk.fleet.mqtt_url import Connection, MqttOptions, connect
from edgefleet.sdk.fleet.registry import device_from_topic
from edgefleet.sdk.fleet.strategy import AbortRules
from edgefleet.sdk.fleet.transfer import Blob, BundleTransfer, TransferStats, choose_chunk_size
from edgefleet.sdk.store import Store

log = logging.getLogger(__name__)

IN_FLIGHT = frozenset({"sent", "downloading", "installing"})
FINISHED_DEVICE = frozenset(
    {
        "deployed",
        "rejected",
        "timed-out",
        "rolled-back",
        "rollback-failed",
        "not-notified",
        "no-bundle",
        "aborted",
    }
)
RESTORE_DESIRED = frozenset({"rejected", "timed-out", "rolled-back", "aborted"})
ACTIVE_ROLLOUT = ("pending", "running", "aborting")
ENDED_ROLLOUT = ("succeeded", "completed", "aborted")
HEARTBEAT_S = 1.0
# An engine that has not written its heartbeat for this long is gone; another process may take over.
STALE_AFTER_S = 6.0
BUSY_RETRY_S = 2.0
INSTALL_STEPS = frozenset({"downloaded", "verify", "write", "load", "health", "switch"})


def engine_alive(rollout: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether some process drives this rollout right now (its heartbeat is fresh)."""
    beat = (rollout.get("settings") or {}).get("heartbeat")
    return isinstance(beat, (int, float)) and (now or time.time()) - float(beat) < STALE_AFTER_S


@dataclass
class _Device:
    device_id: str
    bundle_id: int | None
    wave: int
    status: str
    reason: str | None = None
    sent_at: float = 0.0
    ready: bool = False
    offline: bool = False
    have_all: bool = False
    deployed_at: float = 0.0
    busy_retry_at: float = 0.0
    needs: set[str] = field(default_factory=set)
    rollback_id: str | None = None
    rollback_sent_at: float = 0.0


@dataclass
class EngineView:
    """A snapshot for progress displays: rollout status, per-device status and transfer numbers."""

    status: str
    reason: str | None
    wave: int
    waves: int
    soak_left_s: float
    devices: dict[str, str]
    stats: dict[str, int] = field(default_factory=dict)


class RolloutEngine:
    """Drives one stored rollout to its end: succeeded, completed (some failed under the threshold) or aborted."""

    def __init__(
        self,
        store: Store,
        options: MqttOptions,
        rollout_id: str,
        *,
        on_change: Callable[[EngineView], None] | None = None,
        tick_s: float = 0.1,
    ) -> None:
        row = store.rollout(rollout_id)
        if row is None:
            raise RolloutNotFound(
                f"no rollout {rollout_id!r} in the store; list them with `edgefleet rollouts`"
            )
        self.store = store
        self.options = options
        self.rollout_id = rollout_id
        self.fleet = str(row["fleet"])
        self.settings: dict[str, Any] = dict(row["settings"] or {})
        self.status = str(row["status"])
        self.reason: str | None = row.get("reason")
        self.rules = AbortRules.from_dict(self.settings.get("rules") or {})
        self.soak_s = float(self.settings.get("soak_s", 0.0))
        self.timeout_s = float(self.settings.get("timeout_s", 600.0))
        self.ready_timeout_s = float(self.settings.get("ready_timeout_s", 10.0))
        self.on_change = on_change
        self.tick_s = tick_s
        sent_at = self.settings.get("sent_at") or {}
        self.devices: dict[str, _Device] = {
            str(d["device_id"]): _Device(
                str(d["device_id"]),
                d.get("bundle_id"),
                int(d.get("wave") or 0),
                str(d["status"]),
                d.get("reason"),
                float(sent_at.get(str(d["device_id"]), d.get("updated_at") or time.time())),
            )
            for d in row["devices"]
        }
        self.waves = 1 + max((d.wave for d in self.devices.values()), default=0)
        self.bundle_rows: dict[int, dict[str, Any]] = {}
        for bid in {d.bundle_id for d in self.devices.values() if d.bundle_id is not None}:
            brow = store.bundle(int(bid))
            if brow is None:
                raise RolloutNotFound(f"rollout {rollout_id}: bundle {bid} is no longer in the store")
            self.bundle_rows[int(bid)] = brow
        self.transfers: dict[int, BundleTransfer] = {}
        self.blobs: dict[str, Blob] = {}
        self.chunk_size = int(self.settings.get("chunk_size") or 0) or 256 * 1024
        self.stats = TransferStats()
        self.telemetry: list[dict[str, Any]] = []
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._abort_request: str | None = None
        self._conn: Connection | None = None
        self._broadcast_due: float | None = None
        # Set by a message that lets the engine act now (the wave's last `download`, its last outcome):
        # the drain returns at once instead of at the end of its tick.
        self._wake = False
        self._abort_deadline = 0.0
        self._last_beat = 0.0
        self._last_poll = 0.0
        self._dirty_devices: dict[str, tuple[str, str | None]] = {}
        self._dirty_desired: dict[str, dict[str, Any]] = {}
        self._dirty_settings: dict[str, Any] = {}
        self._rows: dict[str, dict[str, Any]] = {}
        # Seconds since the engine started at which each phase happened: where a rollout's time goes.
        self.started_at = time.time()
        self.timeline: dict[str, float] = {}
        self._known_bundles: list[dict[str, Any]] | None = None

    # ---- public -------------------------------------------------------------------------------

    def request_abort(self, reason: str) -> None:
        """Ask the engine (from any thread) to abort: roll back the devices reached, notify no more."""
        self._abort_request = reason or "aborted by request"

    def view(self) -> EngineView:
        """The current progress."""
        soak_until = float(self.settings.get("soak_until") or 0.0)
        return EngineView(
            status=self.status,
            reason=self.reason,
            wave=int(self.settings.get("wave", -1)),
            waves=self.waves,
            soak_left_s=max(0.0, soak_until - time.time()) if soak_until else 0.0,
            devices={d.device_id: d.status for d in self.devices.values()},
            stats=self.stats.to_dict(),
        )

    def run(self) -> str:
        """Drive the rollout until it ends; returns the final status."""
        if self.status in ENDED_ROLLOUT:
            return self.status
        self._conn = connect(
            self.options,
            on_message=lambda t, p, r: self._inbox.put((t, p)),
            client_id=f"edgefleet-rollout-{self.rollout_id}"[:64],
            persistent=True,
            max_inflight=64,
        )
        try:
            prefix = f"{TOPIC_ROOT}/{self.fleet}/dev/+"
            self._conn.subscribe([(f"{prefix}/evt", 1), (f"{prefix}/telemetry", 1)])
            chunk_size = choose_chunk_size(self._conn.max_packet_size, self.settings.get("chunk_size"))
            for bid, brow in self.bundle_rows.items():
                self.transfers[bid] = BundleTransfer(brow["path"], chunk_size)
                self.blobs.update(self.transfers[bid].blobs)
            self.chunk_size = chunk_size
            self._resume()
            while self.status not in ENDED_ROLLOUT:
                self._drain(self.tick_s)
                self._tick(time.time())
                self._flush()
            return self.status
        finally:
            self._beat(force=True, final=True)
            for blob in self.blobs.values():
                blob.close()
            if self._conn is not None:
                self._conn.close()

    # ---- persistence --------------------------------------------------------------------------

    def _save(self, **changes: Any) -> None:
        """Change settings (engine progress); written with the next flush."""
        self.settings.update(changes)
        self._dirty_settings.update(changes)

    def _set_device(self, dev: _Device, status: str, reason: str | None = None) -> None:
        if dev.status == status and dev.reason == reason:
            return
        dev.status = status
        dev.reason = reason
        self._dirty_devices[dev.device_id] = (status, reason)
        if status in RESTORE_DESIRED:
            # The rollout no longer wants its model there: desired goes back to what ran before.
            model, version = (self.settings.get("previous") or {}).get(dev.device_id) or [None, None]
            self._dirty_desired[dev.device_id] = {"desired_model": model, "desired_version": version}
        self._changed()

    def _flush(self) -> None:
        """Write what changed since the last flush, a few transactions per tick instead of one per event.

        A crash loses at most one tick of progress; the restarted engine re-sends deploy commands
        and the devices answer with their outcome again.
        """
        if self._dirty_devices:
            updates = [(d, s, r) for d, (s, r) in self._dirty_devices.items()]
            self._dirty_devices = {}
            self.store.set_rollout_devices(self.rollout_id, updates)
        if self._dirty_desired:
            desired, self._dirty_desired = self._dirty_desired, {}
            self.store.update_devices(self.fleet, desired)
        if self._dirty_settings:
            changes, self._dirty_settings = self._dirty_settings, {}
            self.store.update_rollout_settings(self.rollout_id, changes)

    def _set_status(self, status: str, reason: str | None = None) -> None:
        self._flush()
        self.status = status
        self.reason = reason
        self.store.set_rollout_status(self.rollout_id, status, reason)
        self.store.add_event(
            self.fleet, "-", "rollout", {"rollout": self.rollout_id, "status": status, "reason": reason}
        )
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.view())
            except Exception:
                log.exception("progress callback failed")

    def _beat(self, force: bool = False, final: bool = False) -> None:
        now = time.time()
        if force or now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self._save(heartbeat=None if final else now, stats=self.stats.to_dict(), timeline=self.timeline)
            self._flush()

    # ---- start / resume -----------------------------------------------------------------------

    def _resume(self) -> None:
        """Pick up where the store says the rollout is: re-send in-flight deploys, finish an abort."""
        self._beat(force=True)
        if self.status == "pending":
            self._set_status("running")
        if self.status == "aborting":
            self._continue_abort()
        in_flight = [d for d in self.devices.values() if d.status in IN_FLIGHT]
        for dev in in_flight:
            self._send_deploy(dev, first=False)
        if in_flight:
            self._broadcast_due = time.time() + self.ready_timeout_s
        if int(self.settings.get("wave", -1)) < 0:
            self._start_wave(0)

    def _patches_for(self, dev: _Device, first: bool) -> dict[str, tuple[str, Blob]]:
        """Delta patches for this device (file → (base sha256, patch blob)); planned once, then kept."""
        stored = dict(self.settings.get("patches") or {})
        if first and self.settings.get("delta", True) and dev.bundle_id is not None:
            row = self._rows.get(dev.device_id) or {}
            brow = self.bundle_rows[dev.bundle_id]
            if self._known_bundles is None:
                self._known_bundles = self.store.bundles(str(brow["name"]))
            try:
                planned = plan_patch(
                    row,
                    brow,
                    self._known_bundles,
                    Path(self.settings.get("delta_dir") or "."),
                )
            except (OSError, ValueError) as exc:
                log.warning("no delta for %s, sending the full file: %s", dev.device_id, exc)
                planned = None
            if planned is not None:
                file, patch = planned
                stored[dev.device_id] = {
                    "file": file,
                    "base": patch.base_sha256,
                    "path": str(patch.path),
                    "sha256": patch.sha256,
                    "size": patch.size,
                    "full_size": patch.target_size,
                }
                self._save(patches=stored)
        info = stored.get(dev.device_id)
        if not info or not Path(info["path"]).is_file():
            return {}
        blob = self.blobs.get(info["sha256"])
        if blob is None:
            blob = self.blobs[info["sha256"]] = Blob(info["path"], info["sha256"], self.chunk_size)
        return {str(info["file"]): (str(info["base"]), blob)}

    def _send_deploy(self, dev: _Device, first: bool = True) -> None:
        assert self._conn is not None and dev.bundle_id is not None
        transfer = self.transfers[dev.bundle_id]
        patches = self._patches_for(dev, first)
        payload = transfer.deploy_payload(self.rollout_id, dev.device_id, patches)
        dev.needs = {f.spec.sha256 for f in transfer.files if f.spec.file not in patches}
        dev.needs |= {blob.sha256 for _, blob in patches.values()}
        # The broker keeps the command for an offline device only while the rollout still waits for
        # it: a device back after its timeout must not start a download that nobody serves any more.
        waited = 0.0 if first or not dev.sent_at else time.time() - dev.sent_at
        expiry = max(1.0, self.timeout_s - waited)
        self._conn.publish(Topics(self.fleet, dev.device_id).cmd, payload, qos=1, expiry_s=expiry)
        with self.stats.lock:
            self.stats.command_bytes += len(payload)
        if first:
            dev.sent_at = time.time()
            sent = dict(self.settings.get("sent_at") or {})
            sent[dev.device_id] = dev.sent_at
            brow = self.bundle_rows[dev.bundle_id]
            row = self._rows.get(dev.device_id) or {}
            previous = dict(self.settings.get("previous") or {})
            previous[dev.device_id] = [row.get("active_model"), row.get("active_version")]
            self._dirty_desired[dev.device_id] = {
                "desired_model": brow["name"],
                "desired_version": int(brow["version"]),
            }
            self._save(sent_at=sent, previous=previous)
            self._set_device(dev, "sent")

    def _start_wave(self, wave: int) -> None:
        self._save(wave=wave, soak_until=None)
        self._rows = {d["device_id"]: d for d in self.store.devices(self.fleet)}
        for dev in self.devices.values():
            if dev.wave == wave and dev.status == "pending":
                # The broker queues the command for an offline device (persistent session); the
                # broadcast does not wait for it, it catches up through repairs when it returns.
                dev.offline = not (self._rows.get(dev.device_id) or {}).get("online", False)
                self._send_deploy(dev)
        self._mark(f"wave{wave}_commands_sent")
        self._broadcast_due = time.time() + self.ready_timeout_s
        self._changed()

    # ---- messages -----------------------------------------------------------------------------

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                topic, payload = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            self._handle(topic, payload)
            if self._wake:
                self._wake = False
                return
            if time.monotonic() >= deadline:
                return

    def _handle(self, topic: str, payload: bytes) -> None:
        device_id = device_from_topic(topic)
        dev = self.devices.get(device_id or "")
        if dev is None or not payload:
            return
        try:
            message = parse_device_message(payload)
        except ProtocolError:
            return
        if message.device != dev.device_id:
            return
        if isinstance(message, Telemetry):
            self._on_telemetry(dev, message)
        else:
            self._on_event(dev, message)

    def _on_event(self, dev: _Device, message: DeviceMessage) -> None:
        rid = self.rollout_id
        if isinstance(message, Progress) and message.deploy == rid and dev.status in IN_FLIGHT:
            if message.step == "download":
                dev.ready = True
                self._mark(f"wave{dev.wave}_last_ready")
                detail = message.detail
                dev.have_all = detail.get("have") is not None and detail.get("have") == detail.get("chunks")
                self._set_device(dev, "downloading")
                if self._broadcast_due is not None and not self._waiting_for_ready():
                    self._wake = True  # every reachable device listens: broadcast now, not next tick
            elif message.step in INSTALL_STEPS:
                self._set_device(dev, "installing", message.step)
        elif isinstance(message, Missing) and message.deploy == rid and message.sha256 in self.blobs:
            assert self._conn is not None
            self.blobs[message.sha256].repair(
                self._conn, self.fleet, dev.device_id, message.ranges, self.stats
            )
        elif isinstance(message, Deployed) and message.deploy == rid:
            if dev.status in IN_FLIGHT:
                dev.deployed_at = time.time()
                self._set_device(dev, "deployed")
                self._mark(f"wave{dev.wave}_last_deployed")
                if self.status == "aborting":
                    self._send_rollback(dev)
                self._wake_if_wave_done(dev.wave)
        elif isinstance(message, Rejected) and message.deploy == rid:
            if dev.status in IN_FLIGHT:
                self._set_device(dev, "rejected", f"{message.step}: {message.code}: {message.reason}")
                self._wake_if_wave_done(dev.wave)
        elif isinstance(message, Result) and message.command == "rollback" and message.ref == dev.rollback_id:
            self._set_device(dev, "rolled-back", self.reason)
        elif isinstance(message, Error):
            if dev.rollback_id is not None and message.ref == dev.rollback_id:
                self._set_device(dev, "rollback-failed", f"{message.code}: {message.reason}")
            elif message.ref == rid and dev.status in IN_FLIGHT:
                if message.code == Code.BUSY:
                    # The device finishes another install first; ask again shortly.
                    dev.busy_retry_at = time.time() + BUSY_RETRY_S
                else:
                    dev.reason = f"{message.code}: {message.reason}"

    def _on_telemetry(self, dev: _Device, message: Telemetry) -> None:
        if dev.status != "deployed" or dev.bundle_id is None:
            return
        brow = self.bundle_rows[dev.bundle_id]
        row = flatten_telemetry(message)
        if row.get("model_name") != brow["name"] or row.get("model_version") != int(brow["version"]):
            return
        self.telemetry.append(row)
        health = (brow.get("manifest") or {}).get("health") or {}
        reason = self.rules.check_telemetry(
            [r for r in self.telemetry if r["device_id"] in self._deployed_ids()], health
        )
        if reason is not None and self.status == "running":
            self._begin_abort(reason)

    def _waiting_for_ready(self) -> bool:
        """Whether a reachable device of the wave has not subscribed to the broadcast yet."""
        return any(d.status in IN_FLIGHT and not d.ready and not d.offline for d in self.devices.values())

    def _wake_if_wave_done(self, wave: int) -> None:
        """Act on the wave's last outcome at once (the next wave, or the rollout's end)."""
        if not any(d.wave == wave and d.status in IN_FLIGHT for d in self.devices.values()):
            self._wake = True

    def _deployed_ids(self) -> set[str]:
        return {d.device_id for d in self.devices.values() if d.status == "deployed"}

    # ---- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._beat()
        if now - self._last_poll >= 0.5:
            self._last_poll = now
            self._poll_external_abort()
        if self._abort_request is not None and self.status == "running":
            requested, self._abort_request = self._abort_request, None
            self._begin_abort(requested)
        for dev in self.devices.values():
            if dev.status in IN_FLIGHT:
                if dev.busy_retry_at and now >= dev.busy_retry_at:
                    dev.busy_retry_at = 0.0
                    self._send_deploy(dev, first=False)
                elif now - dev.sent_at > self.timeout_s:
                    self._set_device(dev, "timed-out", f"no outcome within {self.timeout_s:g} s")
        if self._broadcast_due is not None:
            self._maybe_broadcast(now)
        if self.status == "aborting":
            self._tick_abort(now)
            return
        failed = self.rules.check_outcomes({d.device_id: d.status for d in self.devices.values()})
        if failed is not None:
            self._begin_abort(failed)
            return
        self._advance(now)

    def _maybe_broadcast(self, now: float) -> None:
        """Broadcast each needed bundle once, as soon as the wave's reachable devices have subscribed."""
        if self._waiting_for_ready() and now < (self._broadcast_due or 0.0):
            return
        self._broadcast_due = None
        needed: set[str] = set()
        for d in self.devices.values():
            if d.status == "downloading" and d.ready and not d.have_all:
                needed |= d.needs
        assert self._conn is not None
        wave = int(self.settings.get("wave", 0))
        self._mark(f"wave{wave}_broadcast_start")
        for sha in sorted(needed):
            self.blobs[sha].broadcast(
                self._conn, self.fleet, self.stats, should_stop=lambda: self._abort_request is not None
            )
        self._mark(f"wave{wave}_broadcast_end")

    def _mark(self, phase: str) -> None:
        self.timeline[phase] = round(time.time() - self.started_at, 4)

    def _advance(self, now: float) -> None:
        wave = int(self.settings.get("wave", 0))
        members = [d for d in self.devices.values() if d.wave == wave]
        if any(d.status in IN_FLIGHT or d.status == "pending" for d in members):
            return
        soak_until = self.settings.get("soak_until")
        if soak_until is None:
            soak_until = now + self.soak_s
            self._save(soak_until=soak_until)
            self._changed()
        if now < float(soak_until):
            return
        if wave + 1 < self.waves:
            self._start_wave(wave + 1)
            return
        statuses = [d.status for d in self.devices.values()]
        if all(s == "deployed" for s in statuses):
            self._set_status("succeeded")
        else:
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            self._set_status("completed", ", ".join(f"{n} {s}" for s, n in counts.items()))

    def _poll_external_abort(self) -> None:
        """Another process (CLI, API) may have asked for an abort through the store."""
        if self.status != "running":
            return
        row = self.store.rollout(self.rollout_id)
        if row is not None and row["status"] == "aborting":
            self._abort_request = row.get("reason") or "aborted by request"

    # ---- abort --------------------------------------------------------------------------------

    def _begin_abort(self, reason: str) -> None:
        log.warning("rollout %s aborts: %s", self.rollout_id, reason)
        self._set_status("aborting", reason)
        self._continue_abort()

    def _continue_abort(self) -> None:
        """Stop notifying, roll back every device the rollout reached (again, after a restart)."""
        self._abort_deadline = time.time() + min(self.timeout_s, 60.0)
        for dev in self.devices.values():
            if dev.status == "pending":
                self._set_device(dev, "not-notified", "the rollout aborted before this device's wave")
            elif dev.status in ("deployed", "rolling-back"):
                self._send_rollback(dev)

    def _send_rollback(self, dev: _Device) -> None:
        assert self._conn is not None
        dev.rollback_id = f"{self.rollout_id}-rb-{dev.device_id}"[:128]
        dev.rollback_sent_at = time.time()
        self._conn.publish(
            Topics(self.fleet, dev.device_id).cmd, RollbackCommand(id=dev.rollback_id).to_wire(), qos=1
        )
        self._set_device(dev, "rolling-back", self.reason)

    def _tick_abort(self, now: float) -> None:
        open_ = [d for d in self.devices.values() if d.status in IN_FLIGHT or d.status == "rolling-back"]
        for dev in self.devices.values():
            if dev.status == "deployed":
                self._send_rollback(dev)
        if open_ and now < self._abort_deadline:
            return
        for dev in open_:
            if dev.status == "rolling-back":
                self._set_device(dev, "rollback-failed", "no answer to the rollback command")
            else:
                self._set_device(dev, "aborted", "still installing when the rollout aborted")
        self._set_status("aborted", self.reason)
