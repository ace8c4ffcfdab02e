"""A rollout's progress as the store keeps it: settings, each device's status, the heartbeat, batched writes.

The engine (sdk/fleet/rollout.py) decides; this record remembers. Everything a restarted host needs
to carry on lives here: the current wave and soak deadline (in `settings`), when each device was told,
what each ran before (so an abort restores it), and each device's status in `rollout_devices`.
Writes are collected and flushed a few times per tick instead of one transaction per event.
`RolloutBundle` is a rolled-out bundle's stored row with its manifest's gates read once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.core.codes import RESTORE_DESIRED, DeviceStatus, InstallStep, RolloutStatus
from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.manifest import Manifest
from edgefleet.sdk.store import Store

# The steps after the download: a device reporting one of them is installing.
INSTALL_STEPS = frozenset(
    {
        InstallStep.DOWNLOADED,
        InstallStep.VERIFY,
        InstallStep.WRITE,
        InstallStep.LOAD,
        InstallStep.HEALTH,
        InstallStep.SWITCH,
    }
)


HEARTBEAT_S = 1.0
# An engine that has not written its heartbeat for this long is gone; another process may take over.
STALE_AFTER_S = 6.0


def engine_alive(rollout: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether some process drives this rollout right now (its heartbeat is fresh)."""
    beat = (rollout.get("settings") or {}).get("heartbeat")
    return isinstance(beat, (int, float)) and (now or time.time()) - float(beat) < STALE_AFTER_S


@dataclass
class DeviceProgress:
    """One target device inside a rollout: its status, and the engine's working state for it."""

    device_id: str
    bundle_id: int | None
    wave: int
    status: DeviceStatus
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

    status: RolloutStatus
    reason: str | None
    wave: int
    waves: int
    soak_left_s: float
    devices: dict[str, DeviceStatus]
    stats: dict[str, int] = field(default_factory=dict)


class RolloutRecord:
    """The stored state of one rollout, changed in memory and written to the store on `flush`."""

    def __init__(self, store: Store, row: Mapping[str, Any], on_change: Callable[[], None]) -> None:
        self.store = store
        self.rollout_id = str(row["id"])
        self.fleet = str(row["fleet"])
        self.settings: dict[str, Any] = dict(row["settings"] or {})
        self.status = RolloutStatus(str(row["status"]))
        self.reason: str | None = row.get("reason")
        self._on_change = on_change
        sent_at = self.settings.get("sent_at") or {}
        self.devices: dict[str, DeviceProgress] = {
            str(d["device_id"]): DeviceProgress(
                str(d["device_id"]),
                d.get("bundle_id"),
                int(d.get("wave") or 0),
                DeviceStatus(str(d["status"])),
                d.get("reason"),
                float(sent_at.get(str(d["device_id"]), d.get("updated_at") or time.time())),
            )
            for d in row["devices"]
        }
        self.waves = 1 + max((d.wave for d in self.devices.values()), default=0)
        self._dirty_devices: dict[str, tuple[str, str | None]] = {}
        self._dirty_desired: dict[str, dict[str, Any]] = {}
        self._dirty_settings: dict[str, Any] = {}
        self._last_beat = 0.0

    @property
    def wave(self) -> int:
        """The current wave (-1 before the first)."""
        return int(self.settings.get("wave", -1))

    def view(self, stats: dict[str, int]) -> EngineView:
        """The current progress."""
        soak_until = float(self.settings.get("soak_until") or 0.0)
        return EngineView(
            status=self.status,
            reason=self.reason,
            wave=self.wave,
            waves=self.waves,
            soak_left_s=max(0.0, soak_until - time.time()) if soak_until else 0.0,
            devices={d.device_id: d.status for d in self.devices.values()},
            stats=stats,
        )

    def save(self, **changes: Any) -> None:
        """Change settings (engine progress); written with the next flush."""
        self.settings.update(changes)
        self._dirty_settings.update(changes)

    def set_device(self, dev: DeviceProgress, status: DeviceStatus, reason: str | None = None) -> None:
        """Change one device's status; a device the rollout gives up on gets its old desired model back."""
        if dev.status == status and dev.reason == reason:
            return
        dev.status = status
        dev.reason = reason
        self._dirty_devices[dev.device_id] = (str(status), reason)
        if status in RESTORE_DESIRED:
            # The rollout no longer wants its model there: desired goes back to what ran before.
            model, version = (self.settings.get("previous") or {}).get(dev.device_id) or [None, None]
            self._dirty_desired[dev.device_id] = {"desired_model": model, "desired_version": version}
        self._on_change()

    def want(self, device_id: str, model: str, version: int) -> None:
        """Record that the rollout wants `model` v`version` on a device (its desired model)."""
        self._dirty_desired[device_id] = {"desired_model": model, "desired_version": version}

    def flush(self) -> None:
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

    def set_status(self, status: RolloutStatus, reason: str | None = None) -> None:
        """Change the rollout's status now (not batched) and log it as an event."""
        self.flush()
        self.status = status
        self.reason = reason
        self.store.set_rollout_status(self.rollout_id, str(status), reason)
        self.store.add_event(
            self.fleet, "-", "rollout", {"rollout": self.rollout_id, "status": str(status), "reason": reason}
        )
        self._on_change()

    def beat(
        self, stats: dict[str, int], timeline: dict[str, float], force: bool = False, final: bool = False
    ) -> None:
        """Write the heartbeat (None once the engine stops) with the transfer numbers, at most once a second."""
        now = time.time()
        if force or now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.save(heartbeat=None if final else now, stats=stats, timeline=timeline)
            self.flush()

    def abort_requested(self) -> str | None:
        """The reason when another process (CLI, API) asked for an abort through the store, else None."""
        if self.status != RolloutStatus.RUNNING:
            return None
        row = self.store.rollout(self.rollout_id, devices=False)  # polled every 0.5 s: one row
        if row is not None and row["status"] == RolloutStatus.ABORTING:
            return str(row.get("reason") or "aborted by request")
        return None


class RolloutBundle:
    """A stored bundle row of the rollout, with what the engine reads from its manifest parsed once."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.name = str(row["name"])
        self.version = int(row["version"])
        try:
            manifest: Manifest | None = Manifest.from_dict(row.get("manifest") or {})
        except VerifyError:
            # A row stored by an older host with a manifest this one no longer reads: no manifest gates.
            manifest = None
        self.health = manifest.health if manifest is not None else None
        self.eval_metric = manifest.eval.metric if manifest is not None else None
