"""The download/install state machine of one device: no threads, no MQTT, driven by messages and a clock.

`DeployMachine` takes what arrives (a deploy command, a chunk, the clock's `tick`, a reconnect, the
outcome of an install) and answers with a list of actions for its wiring to perform in order: publish
an event, subscribe to or leave a file's broadcast, persist or clear the pending deploy, install the
staged files, re-publish the birth state. It writes chunks into its staging area itself (the transfers'
own bitmaps make that durable) and never waits, sleeps or looks at the wall clock, so the daemon, the
tests and the load bench all drive the very same code.

States (`InstallState`): idle → downloading (`pending` set, missing ranges asked for when chunks stop)
→ installing (an `Install` action is out; `installed()` / `install_failed()` ends it) → deployed or
rejected. Every end goes through `_finish`, whose first action saves the outcome (SaveOutcome) and only
then clears the pending deploy (ClearPending), so a kill at any moment restarts into "resend the
outcome" (see `resume`), never into silence. The actions live in `edgefleet.agent.deploy_actions`.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple, Type

from edgefleet.agent.core.codes import InstallState, InstallStep
from edgefleet.agent.core.errors import AgentError, ProtocolError, TransferError, VerifyError
from edgefleet.agent.core.protocol import (
    Code,
    DeployCommand,
    Deployed,
    DeviceMessage,
    FileTransfer,
    Missing,
    Progress,
    Rejected,
    build_message,
    parse_command,
)
from edgefleet.agent.deploy_actions import (
    Action,
    ClearPending,
    Discard,
    Install,
    PublishState,
    Report,
    SaveOutcome,
    SavePending,
    Send,
    Subscribe,
    Unsubscribe,
)

log = logging.getLogger("edgefleet.agent")

# A Missing event lists at most this many ranges; the rest are asked for once those arrive.
MAX_RANGES_PER_REQUEST = 256
# Whole-file hash failures tolerated before a deploy is rejected (each one re-downloads the file).
MAX_HASH_FAILURES = 3
MAX_REPAIR_INTERVAL_S = 30.0
# The first request for missing chunks waits max(repair_after_s, REPAIR_GAP_FACTOR × the usual gap between
# arriving chunks): behind a 1 Mbit/s link a 256 KiB chunk takes 2 s, so a fixed 2 s silence is no sign that
# chunks stopped, and asking for every missing chunk then makes the host send the in-flight rest again.
# Four usual gaps: were gaps random (exponential) around their mean, one that long happens ~2 % of the
# time (e^-4), so a silence of four gaps means the stream stopped, not that one chunk was slow.
REPAIR_GAP_FACTOR = 4.0
# Weight of the newest gap in the running (exponentially weighted) mean: follows a link that changes
# within a few chunks without letting one slow chunk set the pace.
GAP_EWMA_WEIGHT = 0.25


class StagedTransfer(Protocol):
    """One file being received (`edgefleet.agent.transfer.Transfer` on a device)."""

    spec: FileTransfer

    @property
    def received(self) -> int:
        """Distinct chunks received."""

    @property
    def complete(self) -> bool:
        """Whether every chunk arrived."""

    def write_chunk(self, index: int, data: bytes) -> bool:
        """Store one chunk; False for a duplicate; TransferError when refused."""

    def missing_ranges(self, limit: Optional[int] = None) -> List[List[int]]:
        """Missing chunks as inclusive [start, end] ranges."""

    def finish(self) -> Path:
        """The received file, checked against its signed sha256 (TransferError, and a restart, if not)."""


class Staging(Protocol):
    """Where transfers live (`edgefleet.agent.transfer.StagingArea` on a device)."""

    def open(self, spec: FileTransfer) -> StagedTransfer:
        """Open, or resume, the transfer of one file."""

    def discard(self, sha256: str) -> None:
        """Close and forget one transfer."""

    def prune(self, keep: Iterable[str] = ()) -> None:
        """Forget every transfer except those of `keep`."""


@dataclass
class PendingDeploy:
    """A deploy being downloaded: the signed command and its open transfers."""

    command: DeployCommand
    name: str
    version: int
    transfers: Dict[str, StagedTransfer]
    started: float
    last_progress: float
    next_repair: float = 0.0
    repair_interval: float = 0.0
    received_at_request: int = -1
    hash_failures: int = 0
    # The mean gap between chunks (EWMA; 0 before two chunks came in one stream) and when the last chunk
    # of the current stream came (0 after a reconnect: a gap across it measures the outage, not the link).
    chunk_gap: float = 0.0
    stream_at: float = 0.0
    asked_at: float = 0.0
    # patch sha256 → (the full file's transfer spec, the base file the patch applies to)
    rebuilds: Dict[str, Tuple[FileTransfer, Path]] = field(default_factory=dict)

    @property
    def received(self) -> int:
        """Distinct chunks received over every file."""
        return sum(t.received for t in self.transfers.values())

    @property
    def chunks(self) -> int:
        """Chunks over every file."""
        return sum(t.spec.chunks for t in self.transfers.values())

    @property
    def complete(self) -> bool:
        """Whether every chunk of every file arrived."""
        return all(t.complete for t in self.transfers.values())


# Checks a deploy's signed manifest (and policy) before a single chunk is accepted; returns the Manifest.
Verifier = Callable[[DeployCommand], Any]
# The file of this device's slots with the given sha256 (the base of a delta), or None.
BaseFinder = Callable[[str], Optional[Path]]


def verify_deploy(cmd: DeployCommand, trust: Any, *, profile: str, device_id: str, ledger: Any) -> Any:
    """Check a deploy's signature and policy, then that its file list is the signed one; returns the Manifest."""
    from edgefleet.agent.core.verify import verify_manifest

    manifest = verify_manifest(
        cmd.manifest, cmd.signatures, trust, profile=profile, device_id=device_id, ledger=ledger
    )
    declared = {f.file: f for f in cmd.files}
    signed = dict(manifest.files)
    if set(declared) != set(signed):
        raise ProtocolError(
            "files-mismatch",
            f"deploy lists files {sorted(declared)} but the signed manifest names {sorted(signed)}",
        )
    for name, entry in signed.items():
        if declared[name].sha256 != entry.sha256 or declared[name].size != entry.size:
            raise ProtocolError(
                "files-mismatch", f"file {name!r}: size or sha256 differ from the signed manifest"
            )
    return manifest


class DeployMachine:
    """One device's deploys: verify, download (with repairs and timeouts), install, report, resume."""

    def __init__(
        self,
        staging: Optional[Staging],
        verify: Verifier,
        *,
        device_id: str,
        repair_after_s: float = 2.0,
        transfer_timeout_s: float = 600.0,
        max_chunk_bytes: int = 4 << 20,
        find_base: Optional[BaseFinder] = None,
    ) -> None:
        # Where chunks go: a StagingArea on a device, memory in the load bench; set before the first input.
        self.staging = staging
        self.verify = verify
        self.device_id = device_id
        self.repair_after_s = repair_after_s
        self.transfer_timeout_s = transfer_timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        self.find_base = find_base
        self.pending: Optional[PendingDeploy] = None
        self.installing = False
        # {"deploy": id, "event": {...}} of the last deploy that ended (seed it from disk on start-up).
        self.last_outcome: Optional[Dict[str, Any]] = None
        self.reconnected_at = 0.0

    @property
    def state(self) -> InstallState:
        """Where the machine is: downloading, installing, or idle after a deploy that ended (or none)."""
        if self.pending is not None:
            return InstallState.INSTALLING if self.installing else InstallState.DOWNLOADING
        event = (self.last_outcome or {}).get("event") or {}
        if event.get("type") == Deployed.TYPE:
            return InstallState.DEPLOYED
        return InstallState.REJECTED if event.get("type") == Rejected.TYPE else InstallState.IDLE

    def _area(self) -> Staging:
        if self.staging is None:
            raise RuntimeError("this DeployMachine has no staging area yet: set .staging before feeding it")
        return self.staging

    @property
    def deploy_id(self) -> Optional[str]:
        """The id of the deploy downloading or installing, if any."""
        return None if self.pending is None else self.pending.command.id

    def status(self) -> Optional[Dict[str, Any]]:
        """The download in progress, for `status` answers (None when idle)."""
        pending = self.pending
        if pending is None:
            return None
        return {
            "deploy": pending.command.id,
            "name": pending.name,
            "version": pending.version,
            "received": pending.received,
            "chunks": pending.chunks,
        }

    # -- inputs ----------------------------------------------------------------------------------------

    def deploy(self, cmd: DeployCommand, now: float) -> List[Action]:
        """A deploy command arrived: verify it and start its download (or answer a repeat of it)."""
        if cmd.device is not None and cmd.device != self.device_id:
            raise ProtocolError(
                Code.WRONG_DEVICE, f"deploy {cmd.id!r} is addressed to {cmd.device!r}, not {self.device_id!r}"
            )
        if self.installing:
            raise ProtocolError(Code.BUSY, f"an install is running; resend deploy {cmd.id!r} after it ends")
        pending = self.pending
        if pending is not None and pending.command.id == cmd.id:
            # A redelivered or repeated command: just ask again for what is missing.
            pending.next_repair = now
            return []
        last = self.last_outcome
        if last is not None and last.get("deploy") == cmd.id and isinstance(last.get("event"), dict):
            return self._resend(last["event"])
        actions: List[Action] = [
            Send(Progress, {"deploy": cmd.id, "step": InstallStep.VERIFY_MANIFEST, "detail": {}})
        ]
        try:
            manifest = self.verify(cmd)
        except (VerifyError, ProtocolError) as exc:
            return actions + self._finish(
                cmd.id, Rejected, step=InstallStep.VERIFY_MANIFEST, code=exc.code, reason=exc.reason
            )
        specs, rebuilds = self._specs(cmd)
        if pending is not None:
            # Files the new deploy also needs keep what already arrived.
            keep = {f.sha256 for f in cmd.files} | {s.sha256 for s in specs}
            actions += self._finish(
                pending.command.id,
                Rejected,
                keep=keep,
                step=InstallStep.DOWNLOAD,
                code="superseded",
                reason=f"deploy {cmd.id!r} replaced it before its download ended",
            )
        return actions + self._begin(
            cmd, str(manifest.name), int(manifest.version), specs, rebuilds, now, save=True
        )

    def chunk(self, sha256: str, index: int, payload: bytes, *, repair: bool, now: float) -> List[Action]:
        """A chunk arrived (broadcast or, with `repair`, for this device alone); raises TransferError when refused."""
        if len(payload) > self.max_chunk_bytes:
            raise TransferError(
                Code.CHUNK_OVERSIZE,
                f"chunk {index} of {sha256[:12]}… has {len(payload)} bytes; the limit is {self.max_chunk_bytes}",
            )
        pending = self.pending
        transfer = pending.transfers.get(sha256) if pending is not None else None
        if pending is None or transfer is None:
            if repair:
                raise TransferError(
                    Code.UNKNOWN_TRANSFER, f"chunk {index} of {sha256[:12]}… belongs to no deploy in progress"
                )
            return []  # broadcast for other devices or already finished: not ours to complain about
        try:
            fresh = transfer.write_chunk(index, payload)
        except TransferError as exc:
            if exc.code == Code.UNKNOWN_TRANSFER and not repair:
                return []  # a late broadcast for a transfer that just ended
            raise TransferError(exc.code, f"deploy {pending.command.id!r}: {exc.reason}") from None
        # Any chunk, a copy included, shows the link's pace and that it still delivers: missing chunks
        # queued behind copies (a repair that crossed the broadcast) are still on their way.
        wait = self._repair_wait(pending)
        if pending.stream_at:
            # A gap that spanned a request says "at least as long as the wait", so it counts as that
            # long: left out, a link slower than repair_after_s is never learned (each of its gaps spans
            # a request); counted whole, it would teach the stall, not the link.
            gap = now - pending.stream_at
            if pending.asked_at > pending.stream_at:
                gap = min(gap, wait)
            old = pending.chunk_gap
            pending.chunk_gap = gap if not old else old + GAP_EWMA_WEIGHT * (gap - old)
            wait = self._repair_wait(pending)
        elif not pending.chunk_gap:
            # No pace yet: the first chunk took this long to come since the download began, which bounds
            # one chunk's time (a slow link's first chunk must not make the second one look missing).
            since = max(pending.started, self.reconnected_at)
            wait = max(wait, min(MAX_REPAIR_INTERVAL_S, now - since))
        pending.stream_at = now
        if not fresh:
            # Copies defer the request, but only so far past the last fresh chunk: endless copies (other
            # devices' re-broadcasts) must not keep this device from asking.
            cap = pending.last_progress + MAX_REPAIR_INTERVAL_S
            pending.next_repair = max(pending.next_repair, min(now + wait, cap))
            return []
        pending.last_progress = now
        # While chunks flow there is nothing to ask for; ask once they stop for longer than the link's pace.
        pending.next_repair = now + wait
        actions: List[Action] = [Unsubscribe(sha256)] if transfer.complete else []
        return actions + self._maybe_complete(pending, now)

    def hashes(self, sha256: str, payload: bytes) -> List[Action]:
        """The retained hash index of a file being received: its per-chunk digests from now on.

        The deploy command names the index by its sha256 (`FileTransfer.hashes_sha256`) instead of
        carrying the lists; one that does not match, or that arrives for no transfer, is ignored (the
        signed whole-file sha256 still decides), so a stale retained index harms nothing.
        """
        pending = self.pending
        transfer = pending.transfers.get(sha256) if pending is not None else None
        if (
            transfer is None
            or not payload
            or transfer.spec.hashes_sha256 is None
            or transfer.spec.chunk_sha256
        ):
            return []
        try:
            transfer.spec = transfer.spec.with_hashes(payload)
        except ProtocolError as exc:
            log.info("ignoring the hash index of %s…: %s", sha256[:12], exc.reason)
        return []

    def tick(self, now: float, *, connected: bool = True) -> List[Action]:
        """The clock moved: end a download that stalled too long, or ask for the chunks still missing."""
        pending = self.pending
        if pending is None or not connected or self.installing or pending.complete:
            return []
        # Time offline does not count: the broker outage is not the sender's silence.
        if now - max(pending.last_progress, self.reconnected_at) > self.transfer_timeout_s:
            return self._finish(
                pending.command.id,
                Rejected,
                step=InstallStep.DOWNLOAD,
                code=Code.TRANSFER_TIMEOUT,
                reason=f"no chunk arrived for {self.transfer_timeout_s:g} s",
            )
        if now < pending.next_repair:
            return []
        received = pending.received
        if received != pending.received_at_request or not pending.repair_interval:
            pending.repair_interval = self._repair_wait(pending)
        else:
            # Nothing came since the last request: back off so a host that is gone is not flooded.
            pending.repair_interval = min(MAX_REPAIR_INTERVAL_S, pending.repair_interval * 2)
        pending.received_at_request = received
        pending.next_repair = now + pending.repair_interval
        pending.asked_at = now
        actions: List[Action] = []
        for sha, transfer in pending.transfers.items():
            if not transfer.complete:
                ranges = transfer.missing_ranges(limit=MAX_RANGES_PER_REQUEST)
                fields = {
                    "deploy": pending.command.id,
                    "sha256": sha,
                    "ranges": tuple((a, b) for a, b in ranges),
                }
                actions.append(Send(Missing, fields))
        return actions

    def reconnected(self, now: float, session_present: bool = False) -> None:
        """The broker connection is back: ask for chunks soon, unless the broker kept the session.

        Without its session the broker dropped what it queued for this device (broadcasts, repairs). With
        it (`session_present` from the CONNACK) that queue is delivered now, so asking at once would only
        fetch a second copy of chunks already on their way: the usual paced wait applies.
        """
        self.reconnected_at = now
        pending = self.pending
        if pending is not None:
            pending.stream_at = 0.0
            if session_present:
                pending.next_repair = now + self._repair_wait(pending)
            else:
                pending.next_repair = now + min(0.2, self.repair_after_s)
                pending.repair_interval = 0.0

    def _repair_wait(self, pending: PendingDeploy) -> float:
        """How long a silence must last before missing chunks are asked for: the link's pace, at least repair_after_s."""
        # The pace may stretch the wait up to the back-off's cap, never below the configured delay.
        return max(self.repair_after_s, min(MAX_REPAIR_INTERVAL_S, REPAIR_GAP_FACTOR * pending.chunk_gap))

    def installed(self, deploy_id: str, name: str, version: int, health: Mapping[str, Any]) -> List[Action]:
        """The install asked for by `Install` switched to the new model."""
        self.installing = False
        return self._finish(deploy_id, Deployed, name=name, version=int(version), health=dict(health))

    def install_failed(self, deploy_id: str, step: str, code: str, reason: str) -> List[Action]:
        """The install asked for by `Install` was refused at `step`; the old model keeps serving."""
        self.installing = False
        return self._finish(deploy_id, Rejected, step=step, code=code, reason=reason)

    def resume(self, stored: Any, active: Optional[Tuple[str, int]], now: float) -> List[Action]:
        """After a restart: `stored` is the persisted pending deploy (or None), `active` the serving model."""
        if not isinstance(stored, dict) or not isinstance(stored.get("command"), str):
            self._area().prune()
            return []
        try:
            cmd = parse_command(base64.b64decode(stored["command"]))
            if not isinstance(cmd, DeployCommand):
                raise ValueError(f"a {cmd.TYPE!r} command, not a deploy")
            from edgefleet.agent.core.manifest import Manifest

            manifest = Manifest.from_bytes(cmd.manifest)
        except (AgentError, ValueError) as exc:
            log.warning("dropping unreadable pending deploy: %s", exc)
            self._area().prune()
            return [ClearPending()]
        last = self.last_outcome
        if last is not None and last.get("deploy") == cmd.id and isinstance(last.get("event"), dict):
            self._area().prune()
            return [ClearPending(), *self._resend(last["event"])]
        name, version = str(manifest.name), int(manifest.version)
        if active is not None and (active[0], int(active[1])) == (name, version):
            # Killed after the switch but before clean-up: the install is done.
            actions = self._finish(cmd.id, Deployed, name=name, version=version, health={})
            self._area().prune()  # no transfer was reopened, so _finish left the staged files
            return [*actions[:1], ClearPending(), *actions[1:]]
        self._area().prune(keep={f.sha256 for f in cmd.files})
        log.info("resuming deploy %s of %s v%s", cmd.id, name, version)
        specs, rebuilds = self._specs(cmd)
        return self._begin(cmd, name, version, specs, rebuilds, now, save=False)

    # -- steps -----------------------------------------------------------------------------------------

    def _specs(self, cmd: DeployCommand) -> Tuple[List[FileTransfer], Dict[str, Tuple[FileTransfer, Path]]]:
        """What to download for each file: its patch when a delta applies to a file this device has, else it."""
        specs: List[FileTransfer] = []
        rebuilds: Dict[str, Tuple[FileTransfer, Path]] = {}
        for f in cmd.files:
            spec = f
            if f.delta is not None and self.find_base is not None:
                from edgefleet.agent.delta import patch_transfer

                base = self.find_base(f.delta.base_sha256)
                if base is not None:
                    try:
                        spec = patch_transfer(f, f.delta)
                        rebuilds[spec.sha256] = (f, base)
                    except ProtocolError as exc:
                        log.info("ignoring the delta for %s, fetching the full file: %s", f.file, exc.reason)
            specs.append(spec)
        return specs, rebuilds

    def _begin(
        self,
        cmd: DeployCommand,
        name: str,
        version: int,
        specs: List[FileTransfer],
        rebuilds: Dict[str, Tuple[FileTransfer, Path]],
        now: float,
        *,
        save: bool,
    ) -> List[Action]:
        transfers: Dict[str, StagedTransfer] = {}
        try:
            for spec in specs:
                transfers[spec.sha256] = self._area().open(spec)
        except TransferError as exc:
            # A file this device cannot receive (chunks above its limit): nothing starts.
            for sha in transfers:
                self._area().discard(sha)
            return [Report(exc.code, exc.reason, cmd.id)]
        pending = PendingDeploy(
            cmd, name, version, transfers, started=now, last_progress=now, rebuilds=rebuilds
        )
        pending.next_repair = now + self.repair_after_s
        self.pending = pending
        actions: List[Action] = [SavePending(cmd)] if save else []
        actions += [Subscribe(sha) for sha, t in transfers.items() if not t.complete]
        # Subscriptions go out before this event on the same connection, so when the host sees it the
        # broadcast reaches this device.
        detail = {"name": name, "version": version, "chunks": pending.chunks, "have": pending.received}
        actions.append(Send(Progress, {"deploy": cmd.id, "step": InstallStep.DOWNLOAD, "detail": detail}))
        return actions + self._maybe_complete(pending, now)

    def _maybe_complete(self, pending: PendingDeploy, now: float) -> List[Action]:
        if self.installing or not pending.complete:
            return []
        staged: Dict[str, Path] = {}
        actions: List[Action] = []
        for sha, transfer in list(pending.transfers.items()):
            try:
                staged[transfer.spec.file] = transfer.finish()
                if sha in pending.rebuilds:
                    patch = staged.pop(transfer.spec.file)
                    target = pending.rebuilds[sha][0]
                    staged[target.file] = self._rebuild(pending, sha, patch, actions)
            except TransferError as exc:
                pending.hash_failures += 1
                if pending.hash_failures >= MAX_HASH_FAILURES:
                    return actions + self._finish(
                        pending.command.id,
                        Rejected,
                        step=InstallStep.DOWNLOAD,
                        code=exc.code,
                        reason=exc.reason,
                    )
                actions.append(Report(exc.code, exc.reason, pending.command.id))
                if sha in pending.transfers:
                    actions.append(Subscribe(sha))
                pending.next_repair = now
                pending.repair_interval = 0.0
                return actions
        self.installing = True
        cmd = pending.command
        return [
            Send(
                Progress, {"deploy": cmd.id, "step": InstallStep.DOWNLOADED, "detail": {"files": len(staged)}}
            ),
            Install(cmd, pending.name, pending.version, staged, pending.started),
        ]

    def _rebuild(self, pending: PendingDeploy, sha: str, patch: Path, actions: List[Action]) -> Path:
        """Rebuild a file from its finished patch; on failure switch that file to a full download."""
        from edgefleet.agent.delta import rebuild

        target, base = pending.rebuilds[sha]
        out = patch.with_name(f"{target.sha256}.rebuilt")
        try:
            return rebuild(base, patch, out, target)
        except (TransferError, OSError, ValueError) as exc:
            log.warning("delta for %s failed (%s); fetching the full file", target.file, exc)
            del pending.rebuilds[sha]
            del pending.transfers[sha]
            self._area().discard(sha)
            pending.transfers[target.sha256] = self._area().open(target)
            actions.append(Subscribe(target.sha256))
            raise TransferError(
                Code.HASH_MISMATCH, f"delta for {target.file!r} failed; fetching it in full"
            ) from None

    def _finish(
        self, deploy_id: str, cls: Type[DeviceMessage], keep: Iterable[str] = (), **fields: Any
    ) -> List[Action]:
        """End a deploy: remember its outcome (first, durably), forget it, publish the outcome and state."""
        event = {"type": cls.TYPE, "deploy": deploy_id, **fields}
        self.last_outcome = {"deploy": deploy_id, "event": event}
        actions: List[Action] = [SaveOutcome(deploy_id, event)]
        pending = self.pending
        if pending is not None and pending.command.id == deploy_id:
            self.pending = None
            self.installing = False
            kept = set(keep)
            actions += [Unsubscribe(sha) for sha in pending.transfers]
            dropped = tuple(sha for sha in pending.transfers if sha not in kept)
            if dropped:
                actions.append(Discard(dropped))
            actions.append(ClearPending())
        actions.append(Send(cls, {"deploy": deploy_id, **fields}))
        actions.append(PublishState())
        return actions

    def _resend(self, event: Mapping[str, Any]) -> List[Action]:
        """The stored outcome of a deploy, sent again for a repeated command."""
        fields = {k: v for k, v in event.items() if k != "type"}
        cls: Type[DeviceMessage] = Deployed if event.get("type") == Deployed.TYPE else Rejected
        try:
            build_message(cls, self.device_id, 0, 0.0, **fields)
        except (TypeError, ValueError, AgentError):
            log.warning("stored outcome unreadable: %s", event)
            return []
        return [Send(cls, fields)]


__all__ = [
    "Action",
    "ClearPending",
    "DeployMachine",
    "Discard",
    "Install",
    "PendingDeploy",
    "PublishState",
    "Report",
    "SaveOutcome",
    "SavePending",
    "Send",
    "StagedTransfer",
    "Staging",
    "Subscribe",
    "Unsubscribe",
    "verify_deploy",
]
