"""The device agent: config → MQTT session → commands → chunked transfer → installer → model server.

One `Agent` object wires the pieces together; what a deploy does next is decided by the state machine
in `edgefleet.agent.deployment`, which the agent feeds and whose actions it performs. paho's network
thread only queues what arrives; a single worker thread handles commands and chunks in order (so handlers never race each other), an install runs
in its own thread (so status, rollback refusals and telemetry keep flowing while a health check runs),
and a ticker thread sends telemetry, flushes transfer bitmaps and asks the host for missing chunks.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from edgefleet.agent import __version__, handlers
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.core.codes import InstallStep
from edgefleet.agent.core.command_auth import COUNTER_FILE, CommandGuard
from edgefleet.agent.core.errors import AgentError, InstallError, ProtocolError, TransferError, VerifyError
from edgefleet.agent.core.fsutil import atomic_write_json
from edgefleet.agent.core.protocol import (
    Code,
    Command,
    ConfigCommand,
    DeployCommand,
    Error,
    EvalCommand,
    FedRoundCommand,
    FedStepCommand,
    InferCommand,
    Progress,
    Result,
    RollbackCommand,
    RotateRootCommand,
    StatusCommand,
    Telemetry,
    Topics,
    command_id_of,
    parse_command,
)
from edgefleet.agent.deploy_store import DeployFiles
from edgefleet.agent.deployment import (
    Action,
    ClearPending,
    DeployMachine,
    Discard,
    Install,
    PendingDeploy,
    PublishState,
    Report,
    SaveOutcome,
    SavePending,
    Send,
    Subscribe,
    Unsubscribe,
    verify_deploy,
)
from edgefleet.agent.exitcodes import ExitCode
from edgefleet.agent.mqtt_session import MqttSession, SeqCounter
from edgefleet.agent.shadow import ShadowRunner
from edgefleet.agent.startup import StartupError, kill_point, load_profile, open_trust, prepare_state_dir
from edgefleet.agent.support import ErrorLimiter, Inbox, jsonable, result_dict
from edgefleet.agent.transfer import StagingArea

log = logging.getLogger("edgefleet.agent")

SEQ_FILE = "seq"
HTTP_PORT_FILE = "http.port"
# Least payload bytes the inbox holds before paho's thread waits for the worker (4 messages at most).
MIN_INBOX_BYTES = 16 << 20
# Old names, still imported by tests and tools.
_ErrorLimiter = ErrorLimiter


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
        # The deploy state machine; its staging area is set in start() (see the `staging` property).
        self.machine = DeployMachine(
            None,
            self._verify_manifest,
            device_id=config.device_id,
            repair_after_s=config.repair_after_s,
            transfer_timeout_s=config.transfer_timeout_s,
            max_chunk_bytes=config.max_chunk_bytes,
            find_base=self._find_base,
        )
        self.files = DeployFiles(self.state_dir)
        self._staging: Optional[StagingArea] = None
        self.threads = 1
        self._stop = threading.Event()
        # Payload bytes waiting are capped, so a flood of large chunks cannot pile up in memory.
        limit = max(MIN_INBOX_BYTES, 4 * max(config.max_chunk_bytes, config.max_message_bytes))
        self._inbox = Inbox(limit, self._stop)
        # One machine input at a time: the worker (commands, chunks), the ticker and the install thread.
        self._lock = threading.RLock()
        self._install_thread: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        self._limiter = ErrorLimiter()
        self._next_telemetry = 0.0
        self._next_eval = 0.0
        self._next_flush = 0.0
        self._last_eval: Dict[str, Any] = {}
        # Federated rounds and the labelled-feedback buffer (agent/federated/client.py), set in start().
        self.fed: Any = None
        # Shadow evaluation after a switch: the replaced model beside the new one (agent/shadow.py).
        self.shadow = ShadowRunner(config.shadow_share, config.shadow_cpu, config.shadow_s)

    @property
    def staging(self) -> Optional[StagingArea]:
        """The staging area the deploy machine writes chunks into (None before start())."""
        return self._staging

    @staging.setter
    def staging(self, value: Optional[StagingArea]) -> None:
        self._staging = value
        self.machine.staging = value

    @property
    def _pending(self) -> Optional[PendingDeploy]:
        """The deploy downloading or installing (kept under its old name for tests and tools)."""
        return self.machine.pending

    # ------------------------------------------------------------------------------------------------
    # start-up

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
            self._last_eval = {**jsonable(last), "source": "install"}

    def _start_http(self) -> None:
        if not self.config.http_enabled:
            return
        from edgefleet.agent.local_api import Limits, LocalApi

        # Request bounds sized by the device's RAM (a 512 MB Pi Zero gets a quarter of the defaults).
        limits = Limits.for_ram(getattr(self.profile, "ram_mb", None))
        try:
            self.http = LocalApi(self, host="127.0.0.1", port=self.config.http_port, limits=limits)
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
        removed = prepare_state_dir(self.state_dir)
        if removed:
            log.info("removed temp files left by a killed agent: %s", ", ".join(removed))
        self.trust, self.ledger = open_trust(self.config, self.state_dir)
        self.profile, self.threads = load_profile(self.config)
        self._start_serving()
        from edgefleet.agent.federated.client import FederatedClient

        self.fed = FederatedClient(self)
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
            ack_after=True,
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
        self._inbox.close()
        self.shadow.stop()
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
        result = self.server.infer(inputs, request_id=request_id)
        if self.fed is not None and self.fed.buffer is not None:
            self.fed.buffer.remember(result.request_id, inputs)
        return result

    def feedback(self, request_id: str, label: int) -> None:
        """Record the true label of an earlier prediction (feeds live accuracy; kept with keep_feedback)."""
        self.server.feedback(request_id, label)
        if self.fed is not None and self.fed.buffer is not None:
            self.fed.buffer.label(request_id, label)

    def status(self) -> Dict[str, Any]:
        """Install status, pending download and connection, for the local API and `status` commands."""
        status: Dict[str, Any] = dict(self.installer.status()) if self.installer is not None else {}
        downloading = self.machine.status()
        if downloading is not None:
            status["downloading"] = downloading
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
        deploy = self.machine.deploy_id
        if deploy is None:
            deploy = str(detail.get("deploy", ""))
        self._send(Progress, deploy=deploy, step=step, detail=dict(detail))

    def _on_connected(self) -> None:
        # Ask for missing chunks soon after a reconnect: broadcasts sent while offline are gone.
        with self._lock:
            self.machine.reconnected(time.monotonic())

    # ------------------------------------------------------------------------------------------------
    # incoming messages

    def _enqueue(self, topic: str, payload: bytes, ack: Optional[Callable[[], None]] = None) -> None:
        """Called on paho's thread: hand over to the worker (blocking here back-pressures the broker)."""
        self._inbox.put(topic, payload, ack)

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.get()
            if item is None:
                break
            topic, payload, ack = item
            self.handle_message(topic, payload)
            # Acked only now: a deploy's deploy.json is durable by here, so a crash before this line
            # leaves the command unacked and the broker delivers it again after the restart.
            if ack is not None:
                ack()

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
            # Online-key signature, address, expiry and counter first (agent/core/command_auth.py).
            checked = self._command_guard().accept(payload)
            self._on_command(parse_command(payload, max_bytes=self.config.max_message_bytes))
            self._command_guard().commit(checked)
            return
        if topic.endswith("/hashes/v1"):
            # A file's retained hash index (Topics.hashes): the per-chunk digests the command left out.
            sha = topic.split("/")[-3]
            self._drive(self.machine.hashes, sha, payload)
            return
        where = self.topics.parse_chunk_topic(topic)
        if where is None:
            raise ProtocolError(Code.BAD_TOPIC, f"no handler for topic {topic!r}")
        repair = topic.startswith(self.topics.device + "/")
        self._drive(self.machine.chunk, where[0], where[1], payload, repair=repair, now=time.monotonic())

    def _command_guard(self) -> CommandGuard:
        """The command check over the live trust store (its root delegates the online key)."""
        if getattr(self, "_guard", None) is None:
            self._guard = CommandGuard(
                self.config.device_id,
                {},
                self.state_dir / COUNTER_FILE,
                allow_unsigned=not self.config.require_signed_commands,
                root=self.trust,
            )
        return self._guard

    def _on_command(self, cmd: Command) -> None:
        if isinstance(cmd, DeployCommand):
            kill_point("deploy-received")
            self._drive(self.machine.deploy, cmd, time.monotonic())
        elif isinstance(cmd, RollbackCommand):
            self.shadow.stop()
            handlers.rollback(self, cmd)
        elif isinstance(cmd, StatusCommand):
            self._publish_state()
            self._send(Result, ref=cmd.id, command=cmd.TYPE, data=jsonable(self.status()))
        elif isinstance(cmd, ConfigCommand):
            if cmd.telemetry_interval_s is not None:
                self.telemetry_interval_s = cmd.telemetry_interval_s
                self._next_telemetry = time.monotonic() + self.telemetry_interval_s
            self._send(
                Result, ref=cmd.id, command=cmd.TYPE, data={"telemetry_interval_s": self.telemetry_interval_s}
            )
        elif isinstance(cmd, EvalCommand):
            self._send(Result, ref=cmd.id, command=cmd.TYPE, data=jsonable(self._run_eval()))
        elif isinstance(cmd, InferCommand):
            handlers.infer(self, cmd)
        elif isinstance(cmd, RotateRootCommand):
            handlers.rotate_root(self, cmd)
        elif isinstance(cmd, FedRoundCommand) and self.fed is not None:
            self.fed.on_round(cmd)
        elif isinstance(cmd, FedStepCommand) and self.fed is not None:
            self.fed.on_step(cmd)

    # -- deploy: the state machine decides, the wiring performs ---------------------------------------

    def _verify_manifest(self, cmd: DeployCommand) -> Any:
        """Check a deploy's signature, policy and file list with this device's keys and profile."""
        return verify_deploy(
            cmd,
            self.trust,
            profile=str(self.profile.name),
            device_id=self.config.device_id,
            ledger=self.ledger,
        )

    def _find_base(self, sha256: str) -> Optional[Path]:
        from edgefleet.agent.delta import find_base

        return find_base(self.state_dir, sha256)

    def _drive(self, step: Callable[..., List[Action]], *args: Any, **kwargs: Any) -> None:
        """Feed one input to the machine and perform its actions, one input at a time."""
        with self._lock:
            self._perform(step(*args, **kwargs))

    def _perform(self, actions: List[Action]) -> None:
        """Carry out the machine's actions in order (the lock is held: events leave in this order)."""
        for action in actions:
            if isinstance(action, Send):
                self._send(action.cls, **action.fields)
            elif isinstance(action, Subscribe):
                if self.session is not None:
                    # The file's retained hash index first, so it is in before the first chunk.
                    self.session.subscribe(Topics.hashes(self.config.fleet, action.sha256))
                    self.session.subscribe(self.topics.artifact_filter(action.sha256))
            elif isinstance(action, Unsubscribe):
                if self.session is not None:
                    self.session.unsubscribe(self.topics.artifact_filter(action.sha256))
                    self.session.unsubscribe(Topics.hashes(self.config.fleet, action.sha256))
            elif isinstance(action, Report):
                self._error(action.code, action.reason, action.ref)
            elif isinstance(action, SaveOutcome):
                self.files.save_outcome(action.deploy, action.event)
            elif isinstance(action, SavePending):
                self.files.save_pending(action.command)
            elif isinstance(action, ClearPending):
                self.files.clear_pending()
            elif isinstance(action, Discard):
                for sha in action.sha256s:
                    if self._staging is not None:
                        self._staging.discard(sha)
            elif isinstance(action, PublishState):
                self._publish_state()
            elif isinstance(action, Install):
                self._install_thread = threading.Thread(
                    target=self._install, args=(action,), name="edgefleet-install", daemon=True
                )
                self._install_thread.start()

    def _resume_pending(self) -> None:
        """After a restart: resend a stored outcome or reopen the pending deploy's transfers."""
        self.machine.last_outcome = self.files.load_outcome()
        active = self.server.active if self.server is not None else None
        serving = None if active is None else (str(active.name), int(active.version))
        self._drive(self.machine.resume, self.files.load_pending(), serving, time.monotonic())

    def _install(self, job: Install) -> None:
        """The install thread: run the installer, then hand its outcome back to the machine."""
        cmd = job.command
        self.shadow.stop()  # the install writes into the slot the shadow model was loaded from
        try:
            result = self.installer.install(cmd.manifest, cmd.signatures, job.staged)
        except InstallError as exc:
            self._drive(self.machine.install_failed, cmd.id, exc.step, exc.code, exc.reason)
        except AgentError as exc:
            self._drive(self.machine.install_failed, cmd.id, InstallStep.INSTALL, exc.code, exc.reason)
        except Exception as exc:
            log.exception("install of %s failed", cmd.id)
            reason = f"{type(exc).__name__}: {exc}"
            self._drive(self.machine.install_failed, cmd.id, InstallStep.INSTALL, Code.INTERNAL, reason)
        else:
            info = result_dict(result)
            health = jsonable(info.get("health") or {})
            # The install's health check is the first eval of the new model: report it in telemetry.
            self._last_eval = {**health, "at": round(time.time(), 3), "source": "install"}
            name, version = str(info.get("name", job.name)), int(info.get("version", job.version))
            self._drive(self.machine.installed, cmd.id, name, version, health)
            try:
                self.shadow.start(self.installer, self.server)
            except Exception:
                log.exception("shadow evaluation not started")
            self._next_eval = (
                time.monotonic() + self.config.eval_interval_s if self.config.eval_interval_s else 0.0
            )

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
                connected = self.session is not None and self.session.connected.is_set()
                self._drive(self.machine.tick, now, connected=connected)
            except Exception:
                log.exception("periodic work failed")

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
        """One telemetry sample as the typed fields of a `Telemetry` message (agent/telemetry.py)."""
        from edgefleet.agent.telemetry import system_part, telemetry_fields

        server = self.server
        fields = telemetry_fields(
            None if server is None else server.window_stats(reset=True),
            None if server is None else server.active,
            system_part(self.state_dir),
            last_eval=self._last_eval or None,
            uptime_s=round(time.time() - self.started_at, 1),
            emulated=self.config.emulate,
            profile=getattr(self.profile, "name", self.config.profile),
        )
        fields["quality"] = tuple(fields["quality"]) + self.shadow.readings()
        return fields

    def _publish_telemetry(self) -> None:
        if self.session is None:
            return
        self._send(Telemetry, **self.metrics())
