"""Installs verified bundles into the free A/B slot, health-checks them beside the serving model, switches.

Steps, each reported through `on_progress` and named in an InstallError on failure:
verify (signature, target, version) → write (copy into the free slot, hashes checked) → load (a second
runtime session beside the serving one) → health (warm-up, quality, p95 latency, timeout) → switch
(atomic in memory, then install.json, then the version ledger). A failure at any step leaves the old
model serving and records the version as rejected.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from edgefleet.agent.core.errors import AgentError, InstallError, RuntimeLoadError, VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import Manifest, canonical_bytes
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.core.verify import verify_file, verify_manifest
from edgefleet.agent.health import HealthError, HealthReport, check_health, load_eval, quality_of, run_outputs
from edgefleet.agent.server import LoadedModel, ModelServer
from edgefleet.agent.slots import MAX_REJECTED, InstallState, SlotStore

log = logging.getLogger("edgefleet.agent.installer")

ProgressFn = Callable[[str, Dict[str, Any]], None]
# Used when a profile does not state its limit: large enough for any edge model, still a bound.
DEFAULT_MAX_MODEL_BYTES = 4 * 1024**3


@dataclass
class InstallResult:
    """A finished install or rollback: what serves now, from which slot, and its health report."""

    name: str
    version: int
    slot: str
    previous: Optional[Dict[str, Any]] = None
    health: Dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    # False after a rollback with no previous model: the rolled-back model was dropped, nothing serves.
    serving: bool = True

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "version": self.version,
            "slot": self.slot,
            "previous": self.previous,
            "health": self.health,
            "duration_s": round(self.duration_s, 3),
            "serving": self.serving,
        }


class Installer:
    """Owns the A/B slots and decides what the ModelServer serves."""

    def __init__(
        self,
        state_dir: Path,
        profile: Any,
        server: ModelServer,
        trust: TrustStore,
        device_id: str,
        on_progress: Optional[ProgressFn] = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.profile = profile
        self.server = server
        self.trust = trust
        self.device_id = device_id
        self.on_progress = on_progress
        self.slots = SlotStore(self.state_dir)
        self.ledger = VersionLedger(self.state_dir)
        self._lock = threading.Lock()
        self._manifests: Dict[str, Manifest] = {}

    # -- helpers ---------------------------------------------------------------------------------------

    @property
    def max_model_bytes(self) -> int:
        """The profile's model size limit in bytes."""
        mb = getattr(self.profile, "max_model_mb", None)
        return int(float(mb) * 1024 * 1024) if mb else DEFAULT_MAX_MODEL_BYTES

    def _progress(self, event: str, **detail: Any) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(event, detail)
            except Exception:  # a failing reporter must not fail the install
                log.exception("progress callback failed at %s", event)

    def _check_runtime(self, manifest: Manifest) -> None:
        names = getattr(self.profile, "runtime_names", None)
        allowed = list(names()) if callable(names) else []
        if allowed and manifest.model.runtime not in allowed:
            raise VerifyError(
                "runtime-unsupported",
                f"{manifest.name} v{manifest.version} needs runtime {manifest.model.runtime!r}; profile "
                f"{getattr(self.profile, 'name', '?')} offers {allowed}; build for this profile",
            )

    def _reject(self, manifest: Optional[Manifest], step: str, code: str, reason: str) -> InstallError:
        state = self.slots.read_state()
        state.rejected.append(
            {
                "name": None if manifest is None else manifest.name,
                "version": None if manifest is None else manifest.version,
                "step": step,
                "code": code,
                "reason": reason,
                "at": round(time.time(), 3),
            }
        )
        state.rejected = state.rejected[-MAX_REJECTED:]
        try:
            self.slots.write_state(state)
        except OSError as exc:
            log.error("could not record the rejection: %s", exc)
        self._progress("rejected", step=step, code=code, reason=reason)
        return InstallError(step, code, reason)

    def _load(self, slot: str, manifest: Manifest, threads: Optional[int] = None) -> LoadedModel:
        extra = {} if threads is None else {"threads": threads}
        return self.server.load(
            self.slots.path(slot) / manifest.model.file,
            name=manifest.name,
            version=manifest.version,
            slot=slot,
            runtime=manifest.model.runtime,
            **extra,
        )

    def _health(self, model: LoadedModel, slot: str, manifest: Manifest) -> HealthReport:
        return check_health(
            lambda feeds: self.server.run_on(model, feeds),
            [t.name for t in model.info.inputs],
            [t.name for t in model.info.outputs],
            self.slots.path(slot) / manifest.eval.file,
            manifest.eval,
            manifest.health,
            batch_size=manifest.model.batch_size,
        )

    def _verify_slot(self, slot: str) -> Manifest:
        """Re-check a slot at start-up: trusted signature, parseable manifest, every file's size and hash."""
        pair = self.slots.read_slot(slot)
        if pair is None:
            raise VerifyError("slot-empty", f"slot {slot} holds no model")
        manifest_bytes, signature_bytes = pair
        self.trust.verify_signatures(manifest_bytes, signature_bytes)
        manifest = Manifest.from_bytes(manifest_bytes)
        for relpath, entry in manifest.files.items():
            verify_file(self.slots.path(slot) / relpath, entry, self.max_model_bytes)
        return manifest

    # -- public API ------------------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: load the active slot if it still verifies, else the other verified slot, else serve nothing."""
        with self._lock:
            self.slots.clean()
            state = self.slots.read_state()
            order = [s for s in (state.active, state.previous) if s is not None]
            for slot in order:
                try:
                    manifest = self._verify_slot(slot)
                    model = self._load(slot, manifest)
                except (AgentError, OSError) as exc:
                    reason = exc.reason if isinstance(exc, AgentError) else str(exc)
                    log.error("slot %s does not verify or load (%s); trying the other one", slot, reason)
                    self._progress("recover-failed", slot=slot, reason=reason)
                    continue
                self.server.activate(model)
                self._manifests[slot] = manifest
                if slot != state.active:
                    state.active, state.previous = slot, None
                    self.slots.write_state(state)
                try:
                    # A kill between the switch (install.json) and the ledger write leaves the ledger
                    # behind the serving model; catch it up (it only moves forward).
                    self.ledger.record(manifest.name, manifest.version)
                except (VerifyError, OSError) as exc:
                    log.error("version ledger not updated: %s", exc)
                log.info("serving %s v%s from slot %s", manifest.name, manifest.version, slot)
                return
            if order:
                state.active = state.previous = None
                self.slots.write_state(state)
            log.info("no verified model on this device; waiting for a deploy")

    def install(
        self,
        manifest_bytes: bytes,
        signatures: Union[Mapping[str, Any], bytes],
        staged_files: Mapping[str, Path],
    ) -> InstallResult:
        """Verify, write, load, health-check and switch to a new bundle; raises InstallError(step, code, reason)."""
        with self._lock:
            return self._install(manifest_bytes, signatures, staged_files)

    def _install(
        self,
        manifest_bytes: bytes,
        signatures: Union[Mapping[str, Any], bytes],
        staged_files: Mapping[str, Path],
    ) -> InstallResult:
        started = time.monotonic()
        manifest: Optional[Manifest] = None
        step = "verify"
        self._progress(step)
        try:
            manifest = verify_manifest(
                manifest_bytes,
                signatures,
                self.trust,
                profile=str(getattr(self.profile, "name", "")),
                device_id=self.device_id,
                ledger=self.ledger,
            )
            self._check_runtime(manifest)
        except (VerifyError, ValueError) as exc:
            code = getattr(exc, "code", "verify-failed")
            raise self._reject(manifest, step, code, getattr(exc, "reason", str(exc))) from None

        state = self.slots.read_state()
        slot = self.slots.other(state.active)
        step = "write"
        self._progress(step, slot=slot, name=manifest.name, version=manifest.version)
        try:
            if state.previous == slot:
                # The free slot is about to be overwritten: it can no longer be rolled back to.
                state.previous = None
                self.slots.write_state(state)
            self._manifests.pop(slot, None)
            sig_bytes = signatures if isinstance(signatures, bytes) else canonical_bytes(dict(signatures))
            self.slots.write_slot(
                slot, manifest, manifest_bytes, sig_bytes, staged_files, self.max_model_bytes
            )
        except VerifyError as exc:
            raise self._reject(manifest, step, exc.code, exc.reason) from None
        except OSError as exc:
            raise self._reject(
                manifest, step, "write-failed", f"could not write slot {slot}: {exc}"
            ) from None

        step = "load"
        self._progress(step, slot=slot, runtime=manifest.model.runtime)
        try:
            model = self._load(slot, manifest)
        except RuntimeLoadError as exc:
            raise self._reject(manifest, step, exc.code, exc.reason) from None

        step = "health"
        self._progress(step, slot=slot)
        try:
            report = self._health(model, slot, manifest)
        except HealthError as exc:
            self.server.discard(model)
            if exc.report is not None:
                state = self.slots.read_state()
                state.last_health = {
                    "name": manifest.name,
                    "version": manifest.version,
                    **exc.report.to_dict(),
                }
                self.slots.write_state(state)
            raise self._reject(manifest, step, exc.code, exc.reason) from None

        step = "switch"
        self._progress(step, slot=slot, health=report.to_dict())
        try:
            state = self.slots.read_state()
            previous = self.server.activate(model)
            self._manifests[slot] = manifest
            state.previous = state.active if state.active != slot else None
            state.active = slot
            state.last_health = {"name": manifest.name, "version": manifest.version, **report.to_dict()}
            self.slots.write_state(state)
            self.ledger.record(manifest.name, manifest.version)
        except (OSError, VerifyError, ValueError) as exc:
            # The new model passed its checks; if the state cannot be stored, serve what disk says.
            self.server.unload()
            self.recover_unlocked()
            reason = getattr(exc, "reason", str(exc))
            raise self._reject(
                manifest, step, "switch-failed", f"could not persist the switch: {reason}"
            ) from None
        self._progress("switched", slot=slot, name=manifest.name, version=manifest.version)
        return InstallResult(
            name=manifest.name,
            version=manifest.version,
            slot=slot,
            previous=None if previous is None else {"name": previous.name, "version": previous.version},
            health=report.to_dict(),
            duration_s=time.monotonic() - started,
        )

    def recover_unlocked(self) -> None:
        """`recover` for callers that already hold the install lock."""
        self._lock.release()
        try:
            self.recover()
        finally:
            self._lock.acquire()

    def rollback(self, abandon: Optional[Tuple[str, int]] = None) -> InstallResult:
        """Serve the previous slot again; raises InstallError('rollback', ...) when there is none that verifies.

        `abandon` (name, version): the model being rolled back; with no previous model and that model
        serving, stop serving it (the result says `serving: False`) instead of refusing.
        """
        with self._lock:
            started = time.monotonic()
            state = self.slots.read_state()
            slot = state.previous
            serving = self.server.active
            if (
                slot is None
                and abandon is not None
                and serving is not None
                and (serving.name, int(serving.version)) == (abandon[0], int(abandon[1]))
            ):
                # A first-ever install that is rolled back: nothing to go back to, so stop serving the
                # model being rolled back rather than keep it (requests then answer 503 `no-model`).
                dropped = self.server.unload()
                state.active = None
                self.slots.write_state(state)
                gone = None if dropped is None else {"name": dropped.name, "version": dropped.version}
                self._progress("rolled-back", slot=None, dropped=gone)
                return InstallResult(
                    name="",
                    version=0,
                    slot="",
                    previous=gone,
                    duration_s=time.monotonic() - started,
                    serving=False,
                )
            if slot is None:
                raise InstallError(
                    "rollback", "no-previous", "there is no previous model on this device to roll back to"
                )
            try:
                manifest = self._verify_slot(slot)
                model = self._load(slot, manifest)
            except AgentError as exc:
                raise InstallError(
                    "rollback", exc.code, f"the previous slot {slot} is unusable: {exc.reason}"
                ) from None
            previous = self.server.activate(model)
            self._manifests[slot] = manifest
            state.active, state.previous = slot, state.active
            self.slots.write_state(state)
            self._progress("rolled-back", slot=slot, name=manifest.name, version=manifest.version)
            return InstallResult(
                name=manifest.name,
                version=manifest.version,
                slot=slot,
                previous=None if previous is None else {"name": previous.name, "version": previous.version},
                duration_s=time.monotonic() - started,
            )

    def load_previous(self) -> Optional[Tuple[LoadedModel, Manifest]]:
        """The previous slot's model loaded beside the serving one (for shadow evaluation), or None.

        The caller owns the returned model and closes it; nothing changes for requests.
        """
        with self._lock:
            slot = self.slots.read_state().previous
            if slot is None:
                return None
            try:
                manifest = self._verify_slot(slot)
                # One inference thread: the shadow worker's CPU share is then its duty cycle of one core.
                return self._load(slot, manifest, threads=1), manifest
            except (AgentError, OSError) as exc:
                log.warning("previous slot %s cannot be loaded for shadowing: %s", slot, exc)
                return None

    def evaluate(self) -> Dict[str, Any]:
        """Score the serving model on its bundle's eval set (accuracy or fidelity, agreement with reference)."""
        active = self.server.active
        if active is None:
            raise InstallError("eval", "no-model", "no model is installed yet; deploy a bundle first")
        manifest = self._manifests.get(active.slot)
        if manifest is None:
            raise InstallError("eval", "no-manifest", f"slot {active.slot} has no verified manifest loaded")
        with self.server.hold() as model:
            names = [t.name for t in model.info.inputs]
            out_names = [t.name for t in model.info.outputs]
            data = load_eval(
                self.slots.path(active.slot) / manifest.eval.file, names, manifest.eval.kind, out_names
            )
            batch = manifest.model.batch_size or 64
            outputs = run_outputs(
                lambda feeds: self.server.run_on(model, feeds),
                data,
                out_names,
                batch,
                time.monotonic() + float(manifest.health.timeout_s),
            )
        reading = quality_of(outputs, data, manifest.health.metric or manifest.eval.metric)
        return {"name": active.name, "version": active.version, **reading.to_dict()}

    def status(self) -> Dict[str, Any]:
        """Slots (name, version), active and previous, rejected versions, last health report."""
        state = self.slots.read_state()
        slots: Dict[str, Any] = {}
        for slot in ("a", "b"):
            pair = self.slots.read_slot(slot)
            info: Optional[Dict[str, Any]] = None
            if pair is not None:
                try:
                    obj = json.loads(pair[0].decode("utf-8"))
                    info = {"name": obj.get("name"), "version": obj.get("version")}
                except ValueError:
                    info = {"name": None, "version": None, "unreadable": True}
            slots[slot] = info
        active = self.server.active
        return {
            "slots": slots,
            "active_slot": state.active,
            "previous_slot": state.previous,
            "active": None if active is None else active.to_dict(),
            "previous": slots.get(state.previous) if state.previous else None,
            "rejected": state.rejected,
            "last_health": state.last_health,
            "state": InstallState.to_dict(state),
        }
