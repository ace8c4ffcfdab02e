"""The rollout engine: waves, soak, abort rules and rollback, with every decision kept in the store.

One engine drives one rollout. Its progress (current wave, soak deadline, when each device was told)
lives in the rollout's `settings` in the store and each device's status in `rollout_devices`, so a
host process killed mid-rollout is replaced by `Fleet.resume(id)`, which carries on: it re-sends the
deploy command (same id) to every device still in flight; an agent that already finished answers with
its stored outcome, one still downloading asks again for the chunks it misses. The engine's MQTT
session is persistent (a client id per rollout), so events sent while no host ran wait in the broker.

With several host workers (`edgefleet serve --worker NAME`) a rollout is driven by the one that holds
its lease in the store (`rollouts.owner`, `lease_expires`): the engine takes it before it sends
anything and renews it every second; when a renewal finds the lease taken (this process stalled past
it and another worker took over), it stops at once without writing anything more.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.core.codes import (
    ENDED_ROLLOUT,
    IN_FLIGHT,
    Code,
    DeviceStatus,
    InstallStep,
    RolloutStatus,
)
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.protocol import (
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
from edgefleet.sdk.fleet.errors import RolloutConflict, RolloutNotFound
from edgefleet.sdk.fleet.mqtt_url import Connection, MqttOptions, connect
from edgefleet.sdk.fleet.progress import (
    INSTALL_STEPS,
    DeviceProgress,
    EngineView,
    RolloutBundle,
    RolloutRecord,
    engine_alive,
)
from edgefleet.sdk.fleet.strategy import AbortRules, TelemetrySample
from edgefleet.sdk.fleet.transfer import (
    Blob,
    BundleTransfer,
    RepairQueue,
    TransferStats,
    choose_chunk_size,
)
from edgefleet.sdk.store import Store, StoreError

log = logging.getLogger(__name__)

__all__ = ["EngineView", "RolloutEngine", "engine_alive"]

BUSY_RETRY_S = 2.0
# How long a worker's lease on a rollout lasts without renewal (renewed every LEASE_RENEW_S): another
# worker takes a dead owner's rollout over this long after its last renewal.
DEFAULT_LEASE_S = 10.0
LEASE_RENEW_S = 1.0
# Files cut into more chunks than this travel with their hash lists published once per file (retained,
# `Topics.hashes`), not in every device's deploy command: the command's size stays the same whatever
# the bundle's size (82 chunks cost 12.7 KB per device before).
INLINE_HASH_CHUNKS = 8


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
        owner: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        row = store.rollout(rollout_id)
        if row is None:
            raise RolloutNotFound(
                f"no rollout {rollout_id!r} in the store; list them with `edgefleet rollouts`"
            )
        self.store = store
        self.options = options
        self.rollout_id = rollout_id
        self.on_change = on_change
        self.record = RolloutRecord(store, row, self._changed)
        self.fleet = self.record.fleet
        self.devices = self.record.devices
        self.waves = self.record.waves
        settings = self.record.settings
        self.rules = AbortRules.from_dict(settings.get("rules") or {})
        self.soak_s = float(settings.get("soak_s", 0.0))
        self.timeout_s = float(settings.get("timeout_s", 600.0))
        self.ready_timeout_s = float(settings.get("ready_timeout_s", 10.0))
        self.tick_s = tick_s
        self.bundles: dict[int, RolloutBundle] = {}
        for bid in {d.bundle_id for d in self.devices.values() if d.bundle_id is not None}:
            brow = store.bundle(int(bid))
            if brow is None:
                raise RolloutNotFound(f"rollout {rollout_id}: bundle {bid} is no longer in the store")
            self.bundles[int(bid)] = RolloutBundle(brow)
        self.transfers: dict[int, BundleTransfer] = {}
        self.blobs: dict[str, Blob] = {}
        self.chunk_size = int(settings.get("chunk_size") or 0) or 256 * 1024
        self.stats = TransferStats()
        self.telemetry: list[TelemetrySample] = []
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._abort_request: str | None = None
        self._conn: Connection | None = None
        self._broadcast_due: float | None = None
        # Devices' requests for missing chunks, served together every REPAIR_WINDOW_S (see RepairQueue).
        self._repairs = RepairQueue()
        # Set by a message that lets the engine act now (the wave's last `download`, its last outcome):
        # the drain returns at once instead of at the end of its tick.
        self._wake = False
        self._abort_deadline = 0.0
        self._last_poll = 0.0
        self._rows: dict[str, dict[str, Any]] = {}
        # Seconds since the engine started at which each phase happened: where a rollout's time goes.
        self.started_at = time.time()
        self.timeline: dict[str, float] = {}
        self._known_bundles: list[dict[str, Any]] | None = None
        # The lease: who drives the rollout (None: no lease, as before several workers existed).
        self.owner = owner
        self.lease_s = lease_s
        self._renewed_at = 0.0
        self.lost_lease = False

    @property
    def status(self) -> RolloutStatus:
        """The rollout's status now."""
        return self.record.status

    @property
    def reason(self) -> str | None:
        """Why the rollout aborted or completed with failures."""
        return self.record.reason

    # ---- public -------------------------------------------------------------------------------

    def request_abort(self, reason: str) -> None:
        """Ask the engine (from any thread) to abort: roll back the devices reached, notify no more."""
        self._abort_request = reason or "aborted by request"

    def view(self) -> EngineView:
        """The current progress."""
        return self.record.view(self.stats.to_dict())

    def run(self) -> RolloutStatus:
        """Drive the rollout until it ends; returns the final status."""
        if self.status in ENDED_ROLLOUT:
            return self.status
        if self.owner is not None:
            if not self.store.claim_rollout(self.rollout_id, self.owner, self.lease_s):
                row = self.store.rollout(self.rollout_id, devices=False) or {}
                raise RolloutConflict(
                    f"rollout {self.rollout_id} is driven by worker {row.get('owner')!r} (its lease runs "
                    f"{max(0.0, float(row.get('lease_expires') or 0) - time.time()):.0f} s more); watch it "
                    "with `edgefleet rollout ID`"
                )
            self._renewed_at = time.monotonic()
        self._conn = connect(
            self.options,
            on_message=lambda t, p, r: self._inbox.put((t, p)),
            client_id=f"edgefleet-rollout-{self.rollout_id}"[:64],
            persistent=True,
            max_inflight=64,
        )
        try:
            self._conn.subscribe(
                [(Topics.devices(self.fleet, "evt"), 1), (Topics.devices(self.fleet, "telemetry"), 1)]
            )
            chunk_size = choose_chunk_size(self._conn.max_packet_size, self.record.settings.get("chunk_size"))
            for bid, bundle in self.bundles.items():
                self.transfers[bid] = BundleTransfer(bundle.row["path"], chunk_size)
                self.blobs.update(self.transfers[bid].blobs)
            self.chunk_size = chunk_size
            self._publish_hash_indexes(retain=True)
            self._resume()
            while self.status not in ENDED_ROLLOUT:
                self._drain(self.tick_s)
                if not self._hold_lease():
                    break
                self._tick(time.time())
                if not self._hold_lease():
                    break
                self.record.flush()
            return self.status
        finally:
            if not self.lost_lease:
                if self._conn is not None and self.status in ENDED_ROLLOUT:
                    self._publish_hash_indexes(retain=False)
                self._beat(force=True, final=True)
            for blob in self.blobs.values():
                blob.close()
            if self._conn is not None:
                self._conn.close()
            if self.owner is not None and not self.lost_lease:
                self.store.release_rollout(self.rollout_id, self.owner)

    def _hold_lease(self) -> bool:
        """Renew the lease once a second; False (and stop driving) once another worker holds it."""
        if self.owner is None or self.lost_lease:
            return not self.lost_lease
        now = time.monotonic()
        if now - self._renewed_at < min(LEASE_RENEW_S, self.lease_s / 3):
            return True
        # A stall longer than the lease (a paused process) may have let another worker take over: a
        # renewal decides before anything more is written.
        renewed: bool | None
        try:
            renewed = self.store.renew_rollout_lease(self.rollout_id, self.owner, self.lease_s)
        except StoreError as exc:
            # The store is unreachable: go on while the lease surely still runs, then stop.
            log.warning("rollout %s: lease not renewed: %s", self.rollout_id, exc)
            renewed = None if now - self._renewed_at < self.lease_s / 2 else False
        if renewed is None:
            return True
        if renewed:
            self._renewed_at = now
            return True
        log.warning("rollout %s: another worker took it over; this one stops driving it", self.rollout_id)
        self.lost_lease = True
        return False

    # ---- bookkeeping --------------------------------------------------------------------------

    def _set_device(self, dev: DeviceProgress, status: DeviceStatus, reason: str | None = None) -> None:
        self.record.set_device(dev, status, reason)

    def _set_status(self, status: RolloutStatus, reason: str | None = None) -> None:
        self.record.set_status(status, reason)

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.view())
            except Exception:
                log.exception("progress callback failed")

    def _beat(self, force: bool = False, final: bool = False) -> None:
        self.record.beat(self.stats.to_dict(), self.timeline, force=force, final=final)

    def _mark(self, phase: str) -> None:
        self.timeline[phase] = round(time.time() - self.started_at, 4)

    # ---- start / resume -----------------------------------------------------------------------

    def _resume(self) -> None:
        """Pick up where the store says the rollout is: re-send in-flight deploys, finish an abort."""
        self._beat(force=True)
        if self.status == RolloutStatus.PENDING:
            self._set_status(RolloutStatus.RUNNING)
        if self.status == RolloutStatus.ABORTING:
            self._continue_abort()
        in_flight = [d for d in self.devices.values() if d.status in IN_FLIGHT]
        for dev in in_flight:
            self._send_deploy(dev, first=False)
        if in_flight:
            self._broadcast_due = time.time() + self.ready_timeout_s
        if self.record.wave < 0:
            self._start_wave(0)

    def _patches_for(self, dev: DeviceProgress, first: bool) -> dict[str, tuple[str, Blob]]:
        """Delta patches for this device (file → (base sha256, patch blob)); planned once, then kept."""
        settings = self.record.settings
        stored = dict(settings.get("patches") or {})
        if first and settings.get("delta", True) and dev.bundle_id is not None:
            row = self._rows.get(dev.device_id) or {}
            brow = self.bundles[dev.bundle_id].row
            if self._known_bundles is None:
                self._known_bundles = self.store.bundles(str(brow["name"]))
            try:
                planned = plan_patch(row, brow, self._known_bundles, Path(settings.get("delta_dir") or "."))
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
                self.record.save(patches=stored)
        info = stored.get(dev.device_id)
        if not info or not Path(info["path"]).is_file():
            return {}
        blob = self.blobs.get(info["sha256"])
        if blob is None:
            blob = self.blobs[info["sha256"]] = Blob(info["path"], info["sha256"], self.chunk_size)
        return {str(info["file"]): (str(info["base"]), blob)}

    def _send_deploy(self, dev: DeviceProgress, first: bool = True) -> None:
        assert self._conn is not None and dev.bundle_id is not None
        transfer = self.transfers[dev.bundle_id]
        patches = self._patches_for(dev, first)
        payload = transfer.deploy_command(
            self.rollout_id, dev.device_id, patches, inline_max=INLINE_HASH_CHUNKS
        ).to_wire()
        dev.needs = transfer.needs(patches)
        # The broker keeps the command for an offline device only while the rollout still waits for
        # it: a device back after its timeout must not start a download that nobody serves any more.
        waited = 0.0 if first or not dev.sent_at else time.time() - dev.sent_at
        expiry = max(1.0, self.timeout_s - waited)
        self._conn.publish(Topics(self.fleet, dev.device_id).cmd, payload, qos=1, expiry_s=expiry)
        with self.stats.lock:
            self.stats.command_bytes += len(payload)
        if first:
            dev.sent_at = time.time()
            settings = self.record.settings
            sent = dict(settings.get("sent_at") or {})
            sent[dev.device_id] = dev.sent_at
            bundle = self.bundles[dev.bundle_id]
            row = self._rows.get(dev.device_id) or {}
            previous = dict(settings.get("previous") or {})
            previous[dev.device_id] = [row.get("active_model"), row.get("active_version")]
            self.record.want(dev.device_id, bundle.name, bundle.version)
            self.record.save(sent_at=sent, previous=previous)
            self._set_device(dev, DeviceStatus.SENT)

    def _publish_hash_indexes(self, retain: bool) -> None:
        """Publish (retained) each large file's hash index before any command names it, or clear it at the end."""
        assert self._conn is not None
        for transfer in self.transfers.values():
            for sha, payload in transfer.hash_indexes(INLINE_HASH_CHUNKS).items():
                try:
                    self._conn.publish(
                        Topics.hashes(self.fleet, sha), payload if retain else b"", qos=1, retain=True
                    )
                except Exception as exc:  # a lost index only costs the per-chunk hints
                    log.warning("hash index of %s… not published: %s", sha[:12], exc)

    def _start_wave(self, wave: int) -> None:
        self.record.save(wave=wave, soak_until=None)
        self._rows = {d["device_id"]: d for d in self.store.devices(self.fleet)}
        for dev in self.devices.values():
            if dev.wave == wave and dev.status == DeviceStatus.PENDING:
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
        dev = self.devices.get(Topics.device_of(topic) or "")
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

    def _on_event(self, dev: DeviceProgress, message: DeviceMessage) -> None:
        rid = self.rollout_id
        if isinstance(message, Progress) and message.deploy == rid and dev.status in IN_FLIGHT:
            if message.step == InstallStep.DOWNLOAD:
                dev.ready = True
                self._mark(f"wave{dev.wave}_last_ready")
                have, chunks = message.chunk_counts()
                dev.have_all = have is not None and have == chunks
                self._set_device(dev, DeviceStatus.DOWNLOADING)
                if self._broadcast_due is not None and not self._waiting_for_ready():
                    self._wake = True  # every reachable device listens: broadcast now, not next tick
            elif message.step in INSTALL_STEPS:
                self._set_device(dev, DeviceStatus.INSTALLING, message.step)
        elif isinstance(message, Missing) and message.deploy == rid and message.sha256 in self.blobs:
            # A device that asks while the wave's broadcast is still due (it waits for slower devices to
            # subscribe) gets every chunk from that broadcast, which covers each downloading device's needs.
            if self._broadcast_due is None:
                self._repairs.add(dev.device_id, self.blobs[message.sha256], message.ranges, time.time())
        elif isinstance(message, Deployed) and message.deploy == rid:
            if dev.status in IN_FLIGHT:
                dev.deployed_at = time.time()
                self._set_device(dev, DeviceStatus.DEPLOYED)
                self._mark(f"wave{dev.wave}_last_deployed")
                if self.status == RolloutStatus.ABORTING:
                    self._send_rollback(dev)
                self._wake_if_wave_done(dev.wave)
        elif isinstance(message, Rejected) and message.deploy == rid:
            if dev.status in IN_FLIGHT:
                reason = f"{message.step}: {message.code}: {message.reason}"
                self._set_device(dev, DeviceStatus.REJECTED, reason)
                self._wake_if_wave_done(dev.wave)
        elif isinstance(message, Result) and message.command == "rollback" and message.ref == dev.rollback_id:
            data = message.data if isinstance(message.data, dict) else {}
            if data.get("serving") is False:
                # A first install rolled back: the device had no previous model and dropped this one.
                reason = f"no previous model: the device stopped serving it (no-model); {self.reason}"
                self._set_device(dev, DeviceStatus.ROLLED_BACK, reason)
            else:
                self._set_device(dev, DeviceStatus.ROLLED_BACK, self.reason)
        elif isinstance(message, Error):
            if dev.rollback_id is not None and message.ref == dev.rollback_id:
                self._set_device(dev, DeviceStatus.ROLLBACK_FAILED, f"{message.code}: {message.reason}")
            elif message.ref == rid and dev.status in IN_FLIGHT:
                if message.code == Code.BUSY:
                    # The device finishes another install first; ask again shortly.
                    dev.busy_retry_at = time.time() + BUSY_RETRY_S
                else:
                    dev.reason = f"{message.code}: {message.reason}"

    def _on_telemetry(self, dev: DeviceProgress, message: Telemetry) -> None:
        if dev.status != DeviceStatus.DEPLOYED or dev.bundle_id is None:
            return
        bundle = self.bundles[dev.bundle_id]
        if message.model is None or (message.model.name, message.model.version) != (
            bundle.name,
            bundle.version,
        ):
            return
        self.telemetry.append(TelemetrySample.of(message))
        # Judged against this bundle's own budgets, with the windows of the devices running this
        # bundle only: an rpi4b is never held to a Jetson's p95 budget (or the other way round).
        peers = {
            d.device_id
            for d in self.devices.values()
            if d.status == DeviceStatus.DEPLOYED and d.bundle_id == dev.bundle_id
        }
        reason = self.rules.check_telemetry(
            [s for s in self.telemetry if s.device_id in peers], bundle.health, bundle.eval_metric
        )
        if reason is not None and self.status == RolloutStatus.RUNNING:
            self._begin_abort(reason)

    def _waiting_for_ready(self) -> bool:
        """Whether a reachable device of the wave has not subscribed to the broadcast yet."""
        return any(d.status in IN_FLIGHT and not d.ready and not d.offline for d in self.devices.values())

    def _wake_if_wave_done(self, wave: int) -> None:
        """Act on the wave's last outcome at once (the next wave, or the rollout's end)."""
        if not any(d.wave == wave and d.status in IN_FLIGHT for d in self.devices.values()):
            self._wake = True

    def _deployed_ids(self) -> set[str]:
        return {d.device_id for d in self.devices.values() if d.status == DeviceStatus.DEPLOYED}

    # ---- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._beat()
        if now - self._last_poll >= 0.5:
            self._last_poll = now
            self._abort_request = self.record.abort_requested() or self._abort_request
        if self._abort_request is not None and self.status == RolloutStatus.RUNNING:
            requested, self._abort_request = self._abort_request, None
            self._begin_abort(requested)
        for dev in self.devices.values():
            if dev.status in IN_FLIGHT:
                if dev.busy_retry_at and now >= dev.busy_retry_at:
                    dev.busy_retry_at = 0.0
                    self._send_deploy(dev, first=False)
                elif now - dev.sent_at > self.timeout_s:
                    self._set_device(dev, DeviceStatus.TIMED_OUT, f"no outcome within {self.timeout_s:g} s")
        if self._repairs.due(now):
            assert self._conn is not None
            self._repairs.flush(self._conn, self.fleet, self.blobs, self.stats, self._receivers, now)
        if self._broadcast_due is not None:
            self._maybe_broadcast(now)
        if self.status == RolloutStatus.ABORTING:
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
            if d.status == DeviceStatus.DOWNLOADING and d.ready and not d.have_all:
                needed |= d.needs
        assert self._conn is not None
        wave = max(0, self.record.wave)
        self._mark(f"wave{wave}_broadcast_start")
        for sha in sorted(needed):
            self.blobs[sha].broadcast(
                self._conn, self.fleet, self.stats, should_stop=lambda: self._abort_request is not None
            )
            self._repairs.note_broadcast(self.blobs[sha], time.time())
        self._mark(f"wave{wave}_broadcast_end")

    def _receivers(self, sha: str) -> int:
        """Devices downloading blob `sha` now (subscribed to its broadcast)."""
        return sum(
            1 for d in self.devices.values() if d.status == DeviceStatus.DOWNLOADING and sha in d.needs
        )

    def _advance(self, now: float) -> None:
        wave = max(0, self.record.wave)
        members = [d for d in self.devices.values() if d.wave == wave]
        if any(d.status in IN_FLIGHT or d.status == DeviceStatus.PENDING for d in members):
            return
        soak_until = self.record.settings.get("soak_until")
        if soak_until is None:
            soak_until = now + self.soak_s
            self.record.save(soak_until=soak_until)
            self._changed()
        if now < float(soak_until):
            return
        if wave + 1 < self.waves:
            self._start_wave(wave + 1)
            return
        statuses = [str(d.status) for d in self.devices.values()]
        if all(s == DeviceStatus.DEPLOYED for s in statuses):
            self._set_status(RolloutStatus.SUCCEEDED)
        else:
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            self._set_status(RolloutStatus.COMPLETED, ", ".join(f"{n} {s}" for s, n in counts.items()))

    # ---- abort --------------------------------------------------------------------------------

    def _begin_abort(self, reason: str) -> None:
        log.warning("rollout %s aborts: %s", self.rollout_id, reason)
        self._set_status(RolloutStatus.ABORTING, reason)
        self._continue_abort()

    def _continue_abort(self) -> None:
        """Stop notifying, roll back every device the rollout reached (again, after a restart)."""
        self._abort_deadline = time.time() + min(self.timeout_s, 60.0)
        for dev in self.devices.values():
            if dev.status == DeviceStatus.PENDING:
                self._set_device(
                    dev, DeviceStatus.NOT_NOTIFIED, "the rollout aborted before this device's wave"
                )
            elif dev.status in (DeviceStatus.DEPLOYED, DeviceStatus.ROLLING_BACK):
                self._send_rollback(dev)

    def _send_rollback(self, dev: DeviceProgress) -> None:
        assert self._conn is not None
        dev.rollback_id = f"{self.rollout_id}-rb-{dev.device_id}"[:128]
        dev.rollback_sent_at = time.time()
        bundle = self.bundles.get(dev.bundle_id) if dev.bundle_id is not None else None
        # `abandon` names the rollout's model: a device with no previous model stops serving it.
        abandon = None if bundle is None else (bundle.name, bundle.version)
        command = RollbackCommand(id=dev.rollback_id, abandon=abandon)
        self._conn.publish(Topics(self.fleet, dev.device_id).cmd, command.to_wire(), qos=1)
        self._set_device(dev, DeviceStatus.ROLLING_BACK, self.reason)

    def _tick_abort(self, now: float) -> None:
        rolling = (DeviceStatus.ROLLING_BACK,)
        open_ = [d for d in self.devices.values() if d.status in IN_FLIGHT or d.status in rolling]
        for dev in self.devices.values():
            if dev.status == DeviceStatus.DEPLOYED:
                self._send_rollback(dev)
        if open_ and now < self._abort_deadline:
            return
        for dev in open_:
            if dev.status == DeviceStatus.ROLLING_BACK:
                self._set_device(dev, DeviceStatus.ROLLBACK_FAILED, "no answer to the rollback command")
            else:
                self._set_device(dev, DeviceStatus.ABORTED, "still installing when the rollout aborted")
        self._set_status(RolloutStatus.ABORTED, self.reason)
