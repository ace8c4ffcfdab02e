"""The device agent: config → MQTT session → commands → chunked transfer → installer → model server.

One `Agent` object wires the pieces together. paho's network thread only queues what arrives; a single
worker thread handles commands and chunks in order (so handlers never race each other), an install runs
in its own thread (so status, rollback refusals and telemetry keep flowing while a health check runs),
and a ticker thread sends telemetry, flushes transfer bitmaps and asks the host for missing chunks.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edgefleet.agent import __version__
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.core.errors import AgentError, InstallError, ProtocolError, TransferError, VerifyError
from edgefleet.agent.core.fsutil import atomic_write_json, read_json
from edgefleet.agent.core.protocol import (
    Code,
    Command,
    ConfigCommand,
    DeployCommand,
    Deployed,
    Error,
    EvalCommand,
    FileTransfer,
    InferCommand,
    Missing,
    Progress,
    Rejected,
    Result,
    RollbackCommand,
    RotateRootCommand,
    StatusCommand,
    Telemetry,
    Topics,
    command_id_of,
    decode_array,
    encode_array,
    parse_command,
)
from edgefleet.agent.exitcodes import ExitCode
from edgefleet.agent.mqtt_session import MqttSession, SeqCounter
from edgefleet.agent.transfer import StagingArea, Transfer

log = logging.getLogger("edgefleet.agent")

PENDING_FILE = "deploy.json"
OUTCOME_FILE = "last_outcome.json"
SEQ_FILE = "seq"
HTTP_PORT_FILE = "http.port"
# A Missing event lists at most this many ranges; the rest are asked for once those arrive.
MAX_RANGES_PER_REQUEST = 256
# Whole-file hash failures tolerated before a deploy is rejected (each one re-downloads the file).
MAX_HASH_FAILURES = 3
MAX_REPAIR_INTERVAL_S = 30.0
# Least payload bytes the inbox holds before paho's thread waits for the worker (4 messages at most).
MIN_INBOX_BYTES = 16 << 20


class StartupError(AgentError):
    """The agent cannot start; `exit_code` tells the CLI (and systemd) which problem it is."""

    default_code = "startup-failed"

    def __init__(self, exit_code: ExitCode, reason: str) -> None:
        self.exit_code = exit_code
        super().__init__(exit_code.name.lower().replace("_", "-"), reason)


class _ErrorLimiter:
    """Token bucket for Error events, so a flood of bad input cannot turn into a flood of events."""

    def __init__(self, rate: float = 20.0, burst: float = 50.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


@dataclass
class _Pending:
    """A deploy being downloaded: the signed command and its open transfers."""

    command: DeployCommand
    name: str
    version: int
    transfers: Dict[str, Transfer]
    started: float
    last_progress: float
    next_repair: float = 0.0
    repair_interval: float = 0.0
    received_at_request: int = -1
    hash_failures: int = 0
    # patch sha256 → (the full file's transfer spec, the base file the patch applies to)
    rebuilds: Optional[Dict[str, Tuple[FileTransfer, Path]]] = None


class Agent:
    """The on-device agent. `start()` runs it in background threads; `infer`/`feedback` serve apps."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device_id)
        self.state_dir = Path(config.state_dir)
        self.started_at = time.time()
        self.telemetry_interval_s = config.telemetry_interval_s
        self.profile: Any = None
        self.trust: Any = None
        self.ledger: Any = None
        self.server: Any = None
        self.installer: Any = None
        self.http: Any = None
        self.http_port: Optional[int] = None
        self.session: Optional[MqttSession] = None
        self.staging: Optional[StagingArea] = None
        self.threads = 1
        self._inbox: queue.Queue[Optional[Tuple[str, bytes]]] = queue.Queue(maxsize=10000)
        # Payload bytes waiting in the inbox, capped so a flood of large chunks cannot pile up in memory.
        self._inbox_bytes = 0
        self._inbox_limit = max(MIN_INBOX_BYTES, 4 * max(config.max_chunk_bytes, config.max_message_bytes))
        self._inbox_space = threading.Condition()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._pending: Optional[_Pending] = None
        self._install_thread: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        self._limiter = _ErrorLimiter()
        self._reconnected_at = 0.0
        self._next_telemetry = 0.0
        self._next_eval = 0.0
        self._next_flush = 0.0
        self._last_eval: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------
    # start-up

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StartupError(
                ExitCode.STATE_DIR, f"state folder {self.state_dir} is not writable: {exc}; fix --state-dir"
            ) from None

    def _open_trust(self) -> None:
        from edgefleet.agent.core.ledger import VersionLedger
        from edgefleet.agent.core.trust import TrustStore

        try:
            self.trust = TrustStore.open(self.state_dir, list(self.config.trusted_keys))
            self.ledger = VersionLedger(self.state_dir)
        except (VerifyError, OSError, ValueError) as exc:
            raise StartupError(
                ExitCode.TRUST,
                f"no usable trusted key ({', '.join(self.config.trusted_keys)}): {exc}; "
                "pass the fleet's .pub file with --trusted-key",
            ) from None

    def _load_profile(self) -> None:
        name = self.config.emulate or self.config.profile
        try:
            from edgefleet.device_profiles import load_profile

            self.profile = load_profile(name)
        except Exception as exc:  # the loader's own error types name the problem
            raise StartupError(ExitCode.PROFILE, f"device profile {name!r} cannot be loaded: {exc}") from None
        wanted = list(self.profile.runtime_names()) if hasattr(self.profile, "runtime_names") else []
        if wanted and not any(_runtime_installed(r) for r in wanted):
            raise StartupError(
                ExitCode.PROFILE,
                f"profile {self.profile.name!r} runs models on {', '.join(wanted)}, and none is installed: "
                "pip install 'edgefleet[agent]' (onnxruntime) or 'edgefleet[tflite]'",
            )
        threads = int(getattr(self.profile, "threads", 0) or getattr(self.profile, "cores", 1) or 1)
        if self.config.emulate:
            # Emulating a smaller device on this machine: never use more threads than it has cores.
            threads = min(threads, int(self.profile.cores))
        self.threads = max(1, threads)

    def _start_serving(self) -> None:
        from edgefleet.agent.installer import Installer
        from edgefleet.agent.server import ModelServer

        providers = None
        if hasattr(self.profile, "onnx_providers"):
            providers = list(self.profile.onnx_providers())
        self.server = ModelServer(threads=self.threads, providers=providers)
        self.installer = Installer(
            self.state_dir,
            self.profile,
            self.server,
            self.trust,
            self.config.device_id,
            on_progress=self._on_install_progress,
        )
        self.installer.recover()
        try:
            last = self.installer.status().get("last_health")
        except Exception as exc:
            log.debug("no install status: %s", exc)
            last = None
        if isinstance(last, dict):
            self._last_eval = {**_jsonable(last), "source": "install"}

    def _start_http(self) -> None:
        if not self.config.http_enabled:
            return
        from edgefleet.agent.local_api import LocalApi

        try:
            self.http = LocalApi(self, host="127.0.0.1", port=self.config.http_port)
        except OSError as exc:
            raise StartupError(
                ExitCode.CONFIG,
                f"field 'http_port': cannot listen on 127.0.0.1:{self.config.http_port} ({exc}); "
                "pick a free port, 0 for any, or --no-http",
            ) from None
        self.http.start()
        self.http_port = int(self.http.port)
        atomic_write_json(self.state_dir / HTTP_PORT_FILE, {"port": self.http_port})

    def start(self) -> None:
        """Start everything; raises StartupError (with an exit code) when the agent cannot run."""
        self._prepare_state_dir()
        self._open_trust()
        self._load_profile()
        self._start_serving()
        self.staging = StagingArea(
            self.state_dir / "staging",
            flush_every=self.config.bitmap_flush_chunks,
            flush_s=self.config.bitmap_flush_s,
            max_chunk_bytes=self.config.max_chunk_bytes,
        )
        self._start_http()
        self.session = MqttSession(
            self.config,
            self.topics,
            SeqCounter(self.state_dir / SEQ_FILE),
            on_message=self._enqueue,
            birth=self.state_info,
            on_connect=self._on_connected,
        )
        self._resume_pending()
        self.session.start()
        for target, name in ((self._work, "edgefleet-worker"), (self._tick, "edgefleet-ticker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._workers.append(thread)
        log.info(
            "agent %s started: profile %s, %d threads, state %s",
            self.config.device_id,
            self.profile.name,
            self.threads,
            self.state_dir,
        )

    def stop(self) -> None:
        """Stop: publish the offline state, close transfers (their bitmaps stay for a resume)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._inbox.put(None)
        if self.session is not None:
            self.session.stop()
        for thread in self._workers:
            thread.join(5)
        if self._install_thread is not None:
            self._install_thread.join(30)
        if self.staging is not None:
            self.staging.close()
        if self.http is not None:
            self.http.stop()
        log.info("agent %s stopped", self.config.device_id)

    def wait(self, timeout: Optional[float] = None) -> ExitCode:
        """Block until `stop()` or a fatal broker refusal; return the exit code the process should use."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            if self.session is not None and self.session.fatal is not None:
                log.error("%s", self.session.fatal_reason)
                return self.session.fatal
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._stop.wait(0.2)
        return ExitCode.OK

    # ------------------------------------------------------------------------------------------------
    # serving API for applications on the device

    def infer(self, inputs: Any, request_id: Optional[str] = None) -> Any:
        """Run one inference on the active model (see ModelServer.infer); never blocks on an install."""
        return self.server.infer(inputs, request_id=request_id)

    def feedback(self, request_id: str, label: int) -> None:
        """Record the true label of an earlier prediction (feeds live accuracy)."""
        self.server.feedback(request_id, label)

    def status(self) -> Dict[str, Any]:
        """Install status, pending download and connection, for the local API and `status` commands."""
        status: Dict[str, Any] = dict(self.installer.status()) if self.installer is not None else {}
        pending = self._pending
        if pending is not None:
            status["downloading"] = {
                "deploy": pending.command.id,
                "name": pending.name,
                "version": pending.version,
                "received": sum(t.received for t in pending.transfers.values()),
                "chunks": sum(t.spec.chunks for t in pending.transfers.values()),
            }
        status["connected"] = bool(self.session and self.session.connected.is_set())
        return status

    def state_info(self) -> Dict[str, Any]:
        """Body of the retained `state` birth message."""
        active = self.server.active if self.server is not None else None
        runtimes: List[str] = []
        if self.profile is not None and hasattr(self.profile, "runtime_names"):
            runtimes = list(self.profile.runtime_names())
        slots: Any = None
        if self.installer is not None:
            try:
                slots = self.installer.status().get("slots")
            except Exception as exc:
                log.debug("installer status unavailable: %s", exc)
        return {
            "agent_version": __version__,
            "profile": getattr(self.profile, "name", self.config.profile),
            "emulated": self.config.emulate,
            "threads": self.threads,
            "runtimes": runtimes,
            "delta": ["bsdiff4"],
            "active": None if active is None else {"name": active.name, "version": active.version},
            "slots": slots,
            # Which fleet root (key set) this device trusts, so the host can see a rotation land.
            "root_version": None if self.trust is None else int(self.trust.version),
            "tags": list(self.config.tags),
            "http_port": self.http_port,
            "mqtt_infer": self.config.mqtt_infer,
            "started": round(self.started_at, 3),
        }

    # ------------------------------------------------------------------------------------------------
    # outgoing messages

    def _send(self, cls: Any, **fields: Any) -> None:
        if self.session is not None:
            self.session.send(cls, **fields)

    def _error(self, code: str, reason: str, ref: Optional[str] = None) -> None:
        log.warning("error %s: %s (ref %s)", code, reason, ref)
        if self._limiter.allow():
            if self._limiter.suppressed:
                reason = f"{reason} ({self._limiter.suppressed} similar errors suppressed)"
                self._limiter.suppressed = 0
            self._send(Error, code=code, reason=reason, ref=ref)

    def _publish_state(self) -> None:
        if self.session is not None and self.session.connected.is_set():
            from edgefleet.agent.core.protocol import State

            self._send(State, online=True, info=self.state_info())

    def _on_install_progress(self, step: str, detail: Mapping[str, Any]) -> None:
        pending = self._pending
        deploy = pending.command.id if pending is not None else str(detail.get("deploy", ""))
        self._send(Progress, deploy=deploy, step=step, detail=dict(detail))

    def _on_connected(self) -> None:
        # Ask for missing chunks soon after a reconnect: broadcasts sent while offline are gone.
        self._reconnected_at = time.monotonic()
        pending = self._pending
        if pending is not None:
            pending.next_repair = time.monotonic() + min(0.2, self.config.repair_after_s)
            pending.repair_interval = 0.0

    # ------------------------------------------------------------------------------------------------
    # incoming messages

    def _enqueue(self, topic: str, payload: bytes) -> None:
        """Called on paho's thread: hand over to the worker (blocking here back-pressures the broker)."""
        with self._inbox_space:
            # One message always fits, so a payload larger than the limit cannot wedge the queue.
            while self._inbox_bytes and self._inbox_bytes + len(payload) > self._inbox_limit:
                if self._stop.is_set():
                    return
                self._inbox_space.wait(0.5)
            self._inbox_bytes += len(payload)
        self._inbox.put((topic, payload))

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.get()
            if item is None:
                break
            with self._inbox_space:
                self._inbox_bytes -= len(item[1])
                self._inbox_space.notify()
            self.handle_message(*item)

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Handle one incoming message; every failure becomes an Error event, never an exception."""
        try:
            self._dispatch(topic, payload)
        except (ProtocolError, TransferError, VerifyError) as exc:
            self._error(exc.code, exc.reason, command_id_of(payload) if topic == self.topics.cmd else topic)
        except AgentError as exc:
            self._error(exc.code, exc.reason, topic)
        except Exception as exc:  # a handler bug must not kill the agent or stall the queue
            log.exception("handler failed on %s", topic)
            self._error(Code.INTERNAL, f"{type(exc).__name__}: {exc}", topic)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.cmd:
            self._on_command(parse_command(payload, max_bytes=self.config.max_message_bytes))
            return
        where = self.topics.parse_chunk_topic(topic)
        if where is None:
            raise ProtocolError(Code.BAD_TOPIC, f"no handler for topic {topic!r}")
        self._on_chunk(where[0], where[1], payload, repair=topic.startswith(self.topics.device + "/"))

    def _on_command(self, cmd: Command) -> None:
        if isinstance(cmd, DeployCommand):
            self._on_deploy(cmd)
        elif isinstance(cmd, RollbackCommand):
            self._on_rollback(cmd)
        elif isinstance(cmd, StatusCommand):
            self._publish_state()
            self._send(Result, ref=cmd.id, command=cmd.TYPE, data=_jsonable(self.status()))
        elif isinstance(cmd, ConfigCommand):
            if cmd.telemetry_interval_s is not None:
                self.telemetry_interval_s = cmd.telemetry_interval_s
                self._next_telemetry = time.monotonic() + self.telemetry_interval_s
            self._send(
                Result, ref=cmd.id, command=cmd.TYPE, data={"telemetry_interval_s": self.telemetry_interval_s}
            )
        elif isinstance(cmd, EvalCommand):
            self._send(Result, ref=cmd.id, command=cmd.TYPE, data=_jsonable(self._run_eval()))
        elif isinstance(cmd, InferCommand):
            self._on_infer(cmd)
        elif isinstance(cmd, RotateRootCommand):
            self._on_rotate_root(cmd)

    def _on_rotate_root(self, cmd: RotateRootCommand) -> None:
        """Apply a key rotation; a refused one raises VerifyError, which becomes an Error event with its code."""
        if self._install_thread is not None and self._install_thread.is_alive():
            # The install verifies with the trust store; swapping keys under it would mix two roots.
            raise ProtocolError(Code.BUSY, f"an install is running; resend rotation {cmd.id!r} after it ends")
        from edgefleet.agent.core.manifest import canonical_bytes

        applied = cmd.root != canonical_bytes(self.trust.root)
        if applied:
            # Nothing changes on a refusal: apply_root checks everything before it replaces the root.
            self.trust.apply_root(cmd.root, {"signatures": [dict(s) for s in cmd.signatures]})
            log.info("trusting fleet root version %d: keys %s", self.trust.version, self.trust.keyids)
        # else: a QoS 1 redelivery or a re-push of the root already in force: answer, change nothing.
        self._send(
            Result,
            ref=cmd.id,
            command=cmd.TYPE,
            data={
                "applied": applied,
                "root_version": int(self.trust.version),
                "keyids": list(self.trust.keyids),
                "threshold": int(self.trust.threshold),
                "bundle_threshold": int(self.trust.bundle_threshold),
            },
        )
        self._publish_state()

    def _on_infer(self, cmd: InferCommand) -> None:
        if not self.config.mqtt_infer:
            raise ProtocolError(
                Code.INFER_DISABLED,
                "infer over MQTT is off on this device: start the agent with --mqtt-infer",
            )
        inputs = {name: decode_array(spec) for name, spec in cmd.inputs.items()}
        result = self.infer(inputs, request_id=cmd.id)
        self._send(
            Result,
            ref=cmd.id,
            command=cmd.TYPE,
            data={
                "outputs": {k: encode_array(v) for k, v in result.outputs.items()},
                "model": result.model_name,
                "version": result.model_version,
                "latency_ms": result.latency_ms,
            },
        )

    def _on_rollback(self, cmd: RollbackCommand) -> None:
        if self._install_thread is not None and self._install_thread.is_alive():
            raise ProtocolError(Code.BUSY, "an install is running; send the rollback after it ends")
        try:
            result = self.installer.rollback()
        except InstallError as exc:
            self._error(exc.code, f"rollback failed at step {exc.step!r}: {exc.reason}", cmd.id)
            return
        self._send(Result, ref=cmd.id, command=cmd.TYPE, data=_jsonable(_result_dict(result)))
        self._publish_state()

    # -- deploy ----------------------------------------------------------------------------------------

    def _on_deploy(self, cmd: DeployCommand) -> None:
        if cmd.device is not None and cmd.device != self.config.device_id:
            raise ProtocolError(
                Code.WRONG_DEVICE,
                f"deploy {cmd.id!r} is addressed to {cmd.device!r}, not {self.config.device_id!r}",
            )
        if self._install_thread is not None and self._install_thread.is_alive():
            raise ProtocolError(Code.BUSY, f"an install is running; resend deploy {cmd.id!r} after it ends")
        pending = self._pending
        if pending is not None and pending.command.id == cmd.id:
            # A redelivered or repeated command: just ask again for what is missing.
            pending.next_repair = time.monotonic()
            return
        last = read_json(self.state_dir / OUTCOME_FILE, default={}) or {}
        if last.get("deploy") == cmd.id and isinstance(last.get("event"), dict):
            self._resend_outcome(last["event"])
            return
        self._send(Progress, deploy=cmd.id, step="verify-manifest", detail={})
        try:
            manifest = self._verify_manifest(cmd)
        except (VerifyError, ProtocolError) as exc:
            self._finish(cmd.id, Rejected, step="verify-manifest", code=exc.code, reason=exc.reason)
            return
        if pending is not None:
            self._finish(
                pending.command.id,
                Rejected,
                step="download",
                code="superseded",
                reason=f"deploy {cmd.id!r} replaced it before its download ended",
                keep={f.sha256 for f in cmd.files},
            )
        atomic_write_json(
            self.state_dir / PENDING_FILE, {"command": base64.b64encode(cmd.to_wire()).decode("ascii")}
        )
        self._begin_download(cmd, manifest.name, int(manifest.version))

    def _verify_manifest(self, cmd: DeployCommand) -> Any:
        """Check the signature and policy before a single chunk is accepted, then match the file list."""
        from edgefleet.agent.core.verify import verify_manifest

        manifest = verify_manifest(
            cmd.manifest,
            cmd.signatures,
            self.trust,
            profile=str(self.profile.name),
            device_id=self.config.device_id,
            ledger=self.ledger,
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

    def _begin_download(self, cmd: DeployCommand, name: str, version: int) -> None:
        assert self.staging is not None and self.session is not None
        transfers: Dict[str, Transfer] = {}
        rebuilds: Dict[str, Tuple[FileTransfer, Path]] = {}
        for f in cmd.files:
            spec = f
            if f.delta is not None:
                from edgefleet.agent.delta import find_base, patch_transfer

                base = find_base(self.state_dir, str(f.delta.get("base_sha256")))
                if base is not None:
                    try:
                        spec = patch_transfer(f, f.delta)
                        rebuilds[spec.sha256] = (f, base)
                    except ProtocolError as exc:
                        log.info("ignoring the delta for %s, fetching the full file: %s", f.file, exc.reason)
            transfers[spec.sha256] = self.staging.open(spec)
        now = time.monotonic()
        pending = _Pending(cmd, name, version, transfers, started=now, last_progress=now, rebuilds=rebuilds)
        pending.next_repair = now + self.config.repair_after_s
        self._pending = pending
        for sha, transfer in transfers.items():
            if not transfer.complete:
                self.session.subscribe(self.topics.artifact_filter(sha))
        # Subscriptions go out before this event on the same connection, so when the host sees it the
        # broadcast reaches this device.
        self._send(
            Progress,
            deploy=cmd.id,
            step="download",
            detail={
                "name": name,
                "version": version,
                "chunks": sum(t.spec.chunks for t in transfers.values()),
                "have": sum(t.received for t in transfers.values()),
            },
        )
        self._maybe_complete(pending)

    def _resume_pending(self) -> None:
        """After a restart: reopen the pending deploy's transfers from their bitmaps."""
        stored = read_json(self.state_dir / PENDING_FILE)
        if not isinstance(stored, dict) or not isinstance(stored.get("command"), str):
            if self.staging is not None:
                self.staging.prune()
            return
        try:
            cmd = parse_command(base64.b64decode(stored["command"]))
            assert isinstance(cmd, DeployCommand)
            from edgefleet.agent.core.manifest import Manifest

            manifest = Manifest.from_bytes(cmd.manifest)
        except (AgentError, ValueError, AssertionError) as exc:
            log.warning("dropping unreadable pending deploy: %s", exc)
            self._clear_pending_files()
            return
        last = read_json(self.state_dir / OUTCOME_FILE, default={}) or {}
        if last.get("deploy") == cmd.id and isinstance(last.get("event"), dict):
            self._clear_pending_files()
            self._resend_outcome(last["event"])
            return
        active = self.server.active if self.server is not None else None
        if active is not None and (active.name, int(active.version)) == (
            manifest.name,
            int(manifest.version),
        ):
            # Killed after the switch but before clean-up: the install is done.
            self._finish(cmd.id, Deployed, name=manifest.name, version=int(manifest.version), health={})
            if self.staging is not None:
                self.staging.prune()  # no transfer was reopened, so _finish left the staged files
            return
        if self.staging is not None:
            self.staging.prune(keep={f.sha256 for f in cmd.files})
        log.info("resuming deploy %s of %s v%s", cmd.id, manifest.name, manifest.version)
        self._begin_download(cmd, manifest.name, int(manifest.version))

    def _on_chunk(self, sha256: str, index: int, payload: bytes, *, repair: bool) -> None:
        if len(payload) > self.config.max_chunk_bytes:
            raise TransferError(
                Code.CHUNK_OVERSIZE,
                f"chunk {index} of {sha256[:12]}… has {len(payload)} bytes; the limit is {self.config.max_chunk_bytes}",
            )
        pending = self._pending
        transfer = pending.transfers.get(sha256) if pending is not None else None
        if pending is None or transfer is None:
            if repair:
                raise TransferError(
                    Code.UNKNOWN_TRANSFER, f"chunk {index} of {sha256[:12]}… belongs to no deploy in progress"
                )
            return  # broadcast for other devices or already finished: not ours to complain about
        try:
            fresh = transfer.write_chunk(index, payload)
        except TransferError as exc:
            if exc.code == Code.UNKNOWN_TRANSFER and not repair:
                return  # a late broadcast for a transfer that just ended
            raise TransferError(exc.code, f"deploy {pending.command.id!r}: {exc.reason}") from None
        if fresh:
            pending.last_progress = time.monotonic()
            # While chunks flow there is nothing to ask for; ask once they stop.
            pending.next_repair = pending.last_progress + self.config.repair_after_s
            if transfer.complete and self.session is not None:
                self.session.unsubscribe(self.topics.artifact_filter(sha256))
            self._maybe_complete(pending)

    def _maybe_complete(self, pending: _Pending) -> None:
        if not all(t.complete for t in pending.transfers.values()):
            return
        staged: Dict[str, Path] = {}
        for sha, transfer in list(pending.transfers.items()):
            try:
                staged[transfer.spec.file] = transfer.finish()
                if pending.rebuilds and sha in pending.rebuilds:
                    staged.pop(transfer.spec.file)
                    staged[pending.rebuilds[sha][0].file] = self._rebuild(pending, sha, transfer)
            except TransferError as exc:
                pending.hash_failures += 1
                if pending.hash_failures >= MAX_HASH_FAILURES:
                    self._finish(
                        pending.command.id, Rejected, step="download", code=exc.code, reason=exc.reason
                    )
                    return
                self._error(exc.code, exc.reason, pending.command.id)
                if self.session is not None:
                    self.session.subscribe(self.topics.artifact_filter(transfer.spec.sha256))
                pending.next_repair = time.monotonic()
                pending.repair_interval = 0.0
                return
        self._send(Progress, deploy=pending.command.id, step="downloaded", detail={"files": len(staged)})
        self._install_thread = threading.Thread(
            target=self._install, args=(pending, staged), name="edgefleet-install", daemon=True
        )
        self._install_thread.start()

    def _rebuild(self, pending: _Pending, sha: str, transfer: Transfer) -> Path:
        """Rebuild a file from its finished patch; on failure switch that file to a full download."""
        from edgefleet.agent.delta import rebuild

        assert pending.rebuilds is not None and self.staging is not None
        target, base = pending.rebuilds[sha]
        out = transfer.part_path.with_name(f"{target.sha256}.rebuilt")
        try:
            return rebuild(base, transfer.part_path, out, target)
        except (TransferError, OSError, ValueError) as exc:
            log.warning("delta for %s failed (%s); fetching the full file", target.file, exc)
            del pending.rebuilds[sha]
            del pending.transfers[sha]
            self.staging.discard(sha)
            pending.transfers[target.sha256] = self.staging.open(target)
            if self.session is not None:
                self.session.subscribe(self.topics.artifact_filter(target.sha256))
            raise TransferError(
                Code.HASH_MISMATCH, f"delta for {target.file!r} failed; fetching it in full"
            ) from None

    def _install(self, pending: _Pending, staged: Dict[str, Path]) -> None:
        cmd = pending.command
        try:
            result = self.installer.install(cmd.manifest, cmd.signatures, staged)
        except InstallError as exc:
            self._finish(cmd.id, Rejected, step=exc.step, code=exc.code, reason=exc.reason)
        except AgentError as exc:
            self._finish(cmd.id, Rejected, step="install", code=exc.code, reason=exc.reason)
        except Exception as exc:
            log.exception("install of %s failed", cmd.id)
            self._finish(
                cmd.id, Rejected, step="install", code=Code.INTERNAL, reason=f"{type(exc).__name__}: {exc}"
            )
        else:
            info = _result_dict(result)
            # The install's health check is the first eval of the new model: report it in telemetry.
            self._last_eval = {
                **_jsonable(info.get("health") or {}),
                "at": round(time.time(), 3),
                "source": "install",
            }
            self._finish(
                cmd.id,
                Deployed,
                name=str(info.get("name", pending.name)),
                version=int(info.get("version", pending.version)),
                health=_jsonable(info.get("health") or {}),
            )
            self._next_eval = (
                time.monotonic() + self.config.eval_interval_s if self.config.eval_interval_s else 0.0
            )

    def _finish(self, deploy_id: str, cls: Any, keep: Any = (), **fields: Any) -> None:
        """End a deploy: publish its outcome, remember it (for redeliveries), clean up staging."""
        with self._lock:
            # The outcome is on disk before the pending deploy is forgotten, so a kill -9 in between
            # restarts into "resend the outcome", never into silence.
            event = {"type": cls.TYPE, "deploy": deploy_id, **fields}
            atomic_write_json(self.state_dir / OUTCOME_FILE, {"deploy": deploy_id, "event": event})
            pending = self._pending
            if pending is not None and pending.command.id == deploy_id:
                self._pending = None
                for sha in pending.transfers:
                    if self.session is not None:
                        self.session.unsubscribe(self.topics.artifact_filter(sha))
                    if sha not in keep and self.staging is not None:
                        self.staging.discard(sha)
                self._clear_pending_files(keep_staging=True)
        self._send(cls, deploy=deploy_id, **fields)
        self._publish_state()

    def _resend_outcome(self, event: Dict[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "type"}
        cls = Deployed if event.get("type") == Deployed.TYPE else Rejected
        try:
            self._send(cls, **fields)
        except TypeError:
            log.warning("stored outcome unreadable: %s", event)

    def _clear_pending_files(self, keep_staging: bool = False) -> None:
        try:
            os.unlink(self.state_dir / PENDING_FILE)
        except FileNotFoundError:
            pass
        if not keep_staging and self.staging is not None:
            self.staging.prune()

    # ------------------------------------------------------------------------------------------------
    # periodic work

    def _tick(self) -> None:
        self._next_telemetry = time.monotonic() + min(1.0, self.telemetry_interval_s)
        if self.config.eval_interval_s:
            self._next_eval = time.monotonic() + self.config.eval_interval_s
        while not self._stop.wait(0.1):
            now = time.monotonic()
            try:
                if now >= self._next_telemetry:
                    self._next_telemetry = now + self.telemetry_interval_s
                    self._publish_telemetry()
                if self._next_eval and now >= self._next_eval:
                    self._next_eval = now + self.config.eval_interval_s
                    self._run_eval()
                if now >= self._next_flush and self.staging is not None:
                    self._next_flush = now + self.config.bitmap_flush_s
                    self.staging.flush_all()
                self._check_download(now)
            except Exception:
                log.exception("periodic work failed")

    def _check_download(self, now: float) -> None:
        pending = self._pending
        if pending is None or self.session is None or not self.session.connected.is_set():
            return
        if all(t.complete for t in pending.transfers.values()):
            return
        # Time offline does not count: the broker outage is not the sender's silence.
        if now - max(pending.last_progress, self._reconnected_at) > self.config.transfer_timeout_s:
            self._finish(
                pending.command.id,
                Rejected,
                step="download",
                code=Code.TRANSFER_TIMEOUT,
                reason=f"no chunk arrived for {self.config.transfer_timeout_s:g} s",
            )
            return
        if now < pending.next_repair:
            return
        received = sum(t.received for t in pending.transfers.values())
        if received != pending.received_at_request or not pending.repair_interval:
            pending.repair_interval = self.config.repair_after_s
        else:
            # Nothing came since the last request: back off so a host that is gone is not flooded.
            pending.repair_interval = min(MAX_REPAIR_INTERVAL_S, pending.repair_interval * 2)
        pending.received_at_request = received
        pending.next_repair = now + pending.repair_interval
        for sha, transfer in pending.transfers.items():
            if not transfer.complete:
                ranges = transfer.missing_ranges(limit=MAX_RANGES_PER_REQUEST)
                self._send(
                    Missing, deploy=pending.command.id, sha256=sha, ranges=tuple((a, b) for a, b in ranges)
                )

    def _run_eval(self) -> Dict[str, Any]:
        if self.installer is None or not hasattr(self.installer, "evaluate"):
            return {"error": "this installer cannot evaluate"}
        try:
            report = dict(self.installer.evaluate())
        except AgentError as exc:
            report = {"error": exc.reason, "code": exc.code}
        self._last_eval = {**report, "at": round(time.time(), 3)}
        return self._last_eval

    def metrics(self) -> Dict[str, Any]:
        """One telemetry sample: serving window stats, model, eval accuracy and system metrics."""
        metrics: Dict[str, Any] = {}
        if self.server is not None:
            metrics.update(self.server.window_stats(reset=True))
            active = self.server.active
            metrics["model"] = None if active is None else active.name
            metrics["model_version"] = None if active is None else active.version
        try:
            from edgefleet.agent.telemetry import system_metrics

            metrics.update(system_metrics(self.state_dir))
        except ImportError:
            pass
        if self._last_eval:
            metrics["eval"] = self._last_eval
        metrics["uptime_s"] = round(time.time() - self.started_at, 1)
        metrics["emulated"] = self.config.emulate
        metrics["profile"] = getattr(self.profile, "name", self.config.profile)
        return _jsonable(metrics)

    def _publish_telemetry(self) -> None:
        if self.session is None:
            return
        self._send(Telemetry, metrics=self.metrics())


# Python modules that provide each runtime; finding one is enough (nothing is imported here).
_RUNTIME_MODULES = {
    "onnxruntime": ("onnxruntime",),
    "onnx": ("onnxruntime",),
    "tflite": ("ai_edge_litert", "tflite_runtime"),
}


def _runtime_installed(name: str) -> bool:
    """Whether a runtime's Python package is importable (found without importing it)."""
    import importlib.util

    modules = _RUNTIME_MODULES.get(name, (name,))
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _result_dict(result: Any) -> Dict[str, Any]:
    """An InstallResult (dataclass or mapping) as a plain dict."""
    if result is None:
        return {}
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return {"result": str(result)}


def _jsonable(value: Any) -> Any:
    """Make a value JSON-safe (numpy scalars, paths, tuples, NaN → None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
