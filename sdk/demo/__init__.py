"""`edgefleet demo`: the whole loop on this machine with nothing installed beyond edgefleet.

It starts an embedded MQTT broker (Mosquitto when on PATH, else amqtt in-process), the control plane
(SQLite store, ingest, REST API and dashboard, all in this process), and a fleet of emulated agent
processes; trains the digits CNN, builds it per device profile, rolls it out with a canary while local
traffic (held-out digits, with their true labels as feedback) runs through each device's `/v1/infer`,
and prints what the devices measured. `--bad-model` then ships a release with a class-mapping bug and
shows the canary's telemetry abort the rollout and roll the canary back.

Only one Python process per emulated device runs beside this one: the broker, server, ingest, rollout
engine and traffic generator share this process, because the machine this was made on has two cores.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.sdk.demo.procs import ProcessGroup
from edgefleet.sdk.fleet.broker import free_port, port_open

if TYPE_CHECKING:
    from torch import nn

    from edgefleet.sdk.build.zoo import DigitsSplit
    from edgefleet.sdk.fleet.broker import EmbeddedBroker
    from edgefleet.sdk.fleet.client import Fleet, RolloutHandle
    from edgefleet.sdk.server.runner import ServerThread
    from edgefleet.sdk.store import Store

FLEET = "demo"
MODEL_NAME = "digits-cnn"
DEFAULT_DEVICES = "rpi4b:2,rpi5:1,jetson-orin-nano:1"
DEFAULT_PORT = 8080
MARKER = ".edgefleet-demo"
# Digits whose output rows the bad release swaps (a label-map bug): 3 of 10 classes always come out wrong.
BAD_CLASSES = (3, 5, 8)
# Telemetry windows the abort rules wait for, and the good release's soak after each wave (seconds).
MIN_WINDOWS = 5
ENDED_DEVICE = {
    "deployed",
    "rejected",
    "timed-out",
    "rolled-back",
    "rollback-failed",
    "not-notified",
    "aborted",
    "no-bundle",
}


class DemoError(Exception):
    """The demo cannot start or go on; `code` is stable, the message names the problem and the fix."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


class DemoInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived: stop everything the demo started."""


@dataclass(frozen=True)
class DemoOptions:
    """What `edgefleet demo` does; every field has a command-line option of the same name."""

    state_dir: Optional[Path] = None
    port: Optional[int] = None  # None: 8080, or a free port when 8080 is taken; 0: any free port
    keep: bool = False
    bad_model: bool = False
    devices: str = DEFAULT_DEVICES
    epochs: int = 30
    backend: str = "auto"
    min_accuracy: float = 0.90
    telemetry_interval_s: float = 1.0
    traffic_interval_s: float = 0.05
    canary_pct: int = 25
    timeout_s: float = 150.0


@dataclass
class DeviceRow:
    """One line of the final table: what a device runs and what it measured there."""

    device_id: str
    profile: str
    online: bool
    model: Optional[str]
    version: Optional[int]
    windows: int = 0
    requests: int = 0
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    live_accuracy: Optional[float] = None
    eval_accuracy: Optional[float] = None


@dataclass
class BadOutcome:
    """How the bad release ended: rollout status and reason, each device's status, what the canary measured."""

    rollout_id: str
    version: int
    status: str
    reason: Optional[str]
    devices: dict[str, str]
    reasons: dict[str, Optional[str]]
    canary: list[str]
    host_accuracy: float
    min_accuracy_manifest: Optional[float]
    canary_live_accuracy: Optional[float] = None
    canary_eval_accuracy: Optional[float] = None
    canary_requests: int = 0
    running_after: dict[str, Optional[int]] = field(default_factory=dict)


@dataclass
class DemoResult:
    """Everything the demo showed, for `--json` and for tests; `ok` says whether it showed what it should."""

    ok: bool = False
    state_dir: str = ""
    dashboard_url: str = ""
    broker_url: str = ""
    broker_backend: str = ""
    host_accuracy: Optional[float] = None
    version: Optional[int] = None
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollout_id: Optional[str] = None
    rollout_status: Optional[str] = None
    rollout_reason: Optional[str] = None
    devices: list[DeviceRow] = field(default_factory=list)
    bad: Optional[BadOutcome] = None
    problems: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)


def parse_devices(spec: str) -> list[tuple[str, str]]:
    """`rpi4b:2,rpi5,jetson-orin-nano:1` → [(device id, profile)], ids `PROFILE-N`; bad specs raise DemoError."""
    from edgefleet.device_profiles import builtin_names

    # `host` is measured on this machine, not a device to emulate.
    known = set(builtin_names()) - {"host"}
    out: list[tuple[str, str]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, count_text = part.partition(":")
        name = name.strip()
        if name not in known:
            raise DemoError(
                "bad-devices",
                f"--devices: unknown profile {name!r}; use built-in names: {', '.join(sorted(known))}",
            )
        try:
            count = int(count_text) if count_text.strip() else 1
        except ValueError:
            raise DemoError(
                "bad-devices", f"--devices: {part!r}: the count after ':' must be a whole number"
            ) from None
        if not 1 <= count <= 16:
            raise DemoError("bad-devices", f"--devices: {part!r}: the count must be between 1 and 16")
        start = sum(1 for _, p in out if p == name)
        out += [(f"{name}-{start + i + 1}", name) for i in range(count)]
    if not out:
        raise DemoError("bad-devices", f"--devices {spec!r} names no device; e.g. {DEFAULT_DEVICES}")
    if len(out) > 16:
        raise DemoError("bad-devices", f"--devices asks for {len(out)} devices; the demo runs at most 16")
    return out


def mislabeled_copy(model: nn.Module, classes: Sequence[int] = BAD_CLASSES) -> nn.Module:
    """A copy of a classifier whose last layer's rows for `classes` are rotated: a label-map bug.

    Every input of those classes is then predicted as another class of the set, so accuracy drops by
    about their share of the data, while everything else about the model stays the same.
    """
    import torch
    from torch import nn

    bad = copy.deepcopy(model)
    last = [m for m in bad.modules() if isinstance(m, nn.Linear)][-1]
    order = list(range(last.out_features))
    rotated = [*classes[1:], classes[0]]
    for target, source in zip(classes, rotated):
        order[target] = source
    with torch.no_grad():
        last.weight.copy_(last.weight[order].clone())
        if last.bias is not None:
            last.bias.copy_(last.bias[order].clone())
    return bad.eval()


def restamp(bundle_dir: Path, version: int, private_key: Any) -> None:
    """Re-sign a built bundle with `version`, so all profiles of one release carry the same version."""
    from edgefleet.agent.core.manifest import MANIFEST_FILE, REPORT_FILE
    from edgefleet.sdk.trust.bundle import create_bundle

    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    fields = {k: v for k, v in manifest.items() if k not in ("files", "schema")}
    fields["version"] = int(version)
    report_path = bundle_dir / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    with tempfile.TemporaryDirectory(prefix="edgefleet-restamp-") as tmp:
        model = Path(tmp) / manifest["model"]["file"]
        evalf = Path(tmp) / manifest["eval"]["file"]
        shutil.copyfile(bundle_dir / manifest["model"]["file"], model)
        shutil.copyfile(bundle_dir / manifest["eval"]["file"], evalf)
        create_bundle(
            bundle_dir,
            model_path=model,
            eval_npz_path=evalf,
            manifest_fields=fields,
            private_key=private_key,
            report=report,
        )


class Traffic:
    """Sends held-out digits to every device's /v1/infer and their true labels to /v1/feedback, on a thread.

    Refusals (no model installed yet, an agent restarting) are counted, never raised: the devices'
    own telemetry is what the demo reports, this only drives it.
    """

    def __init__(self, ports: dict[str, int], x: np.ndarray, y: np.ndarray, interval_s: float = 0.05) -> None:
        self.ports = ports
        self.x, self.y = x, y
        self.interval_s = interval_s
        self.ok = 0
        self.refused = 0
        self.served: dict[str, tuple[str, int]] = {}
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> Traffic:
        """Begin sending."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and close the connections."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for conn in self._conns.values():
            conn.close()

    def _post(self, device: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = self._conns.get(device)
        if conn is None:
            # Keep-alive: one connection per device keeps the client's cost small on a shared CPU.
            conn = http.client.HTTPConnection("127.0.0.1", self.ports[device], timeout=5)
            self._conns[device] = conn
        data = json.dumps(body).encode()
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._conns.pop(device, None)
            raise
        if resp.status != 200:
            raise OSError(f"{path} answered {resp.status}")
        doc: dict[str, Any] = json.loads(payload)
        return doc

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self.interval_s):
            for offset, device in enumerate(self.ports):
                i = (index + 97 * offset) % len(self.x)
                try:
                    answer = self._post(device, "/v1/infer", {"inputs": self.x[i : i + 1].tolist()})
                    self._post(
                        device,
                        "/v1/feedback",
                        {"request_id": answer["request_id"], "label": int(self.y[i])},
                    )
                    self.served[device] = (str(answer.get("model")), int(answer.get("version") or 0))
                    self.ok += 1
                except (OSError, ValueError, KeyError, http.client.HTTPException):
                    self.refused += 1
            index += 1


@contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into DemoInterrupted in the main thread, restoring the handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Optional[FrameType]) -> None:
        raise DemoInterrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _log_to(console: Console) -> Iterator[None]:
    """Show edgefleet's warnings (a rollout aborting, a failed write) through the demo's console."""
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("edgefleet")
    logger.addHandler(handler)

    def not_a_probe(record: logging.LogRecord) -> bool:
        # amqtt warns about every TCP connection that closes before CONNECT: the readiness probe.
        return "No data to decode MQTT packet fixed header" not in record.getMessage()

    amqtt_log = logging.getLogger("amqtt.broker")
    amqtt_log.addFilter(not_a_probe)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        amqtt_log.removeFilter(not_a_probe)


@contextmanager
def _edgefleet_home(path: Path) -> Iterator[None]:
    """Point EDGEFLEET_HOME at the demo's folder (unpacked bundles, delta cache), restoring it after."""
    old = os.environ.get("EDGEFLEET_HOME")
    os.environ["EDGEFLEET_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGEFLEET_HOME", None)
        else:
            os.environ["EDGEFLEET_HOME"] = old


def _prepare_state_dir(path: Optional[Path]) -> tuple[Path, bool]:
    """The demo's folder and whether it is a temp folder of ours; a non-empty foreign folder is refused."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="edgefleet-demo-")), True
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DemoError("state-dir", f"--state-dir {path} is a file; give a folder (new or empty)")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise DemoError(
                "state-dir",
                f"--state-dir {path} is not empty and not from an earlier demo; give a new or empty folder",
            )
        # An earlier demo's folder: start afresh (its store and agents' slots would change the story).
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path, False


class Demo:
    """One run of the demo; `run()` returns a DemoResult and leaves nothing running (unless `keep` waits)."""

    def __init__(self, options: DemoOptions, console: Optional[Console] = None) -> None:
        if not 0.0 < options.min_accuracy < 1.0:
            raise DemoError("bad-option", f"--min-accuracy {options.min_accuracy} must be between 0 and 1")
        if options.epochs < 1:
            raise DemoError("bad-option", f"--epochs {options.epochs} must be at least 1")
        if not 1 <= options.canary_pct < 100:
            raise DemoError("bad-option", f"canary share {options.canary_pct} % must be in [1, 100)")
        if options.backend not in ("auto", "mosquitto", "amqtt"):
            raise DemoError("bad-option", f"--backend {options.backend!r}: use auto, mosquitto or amqtt")
        if options.port is not None and not 0 <= options.port < 65536:
            raise DemoError("bad-option", f"--port {options.port} is not a TCP port (0-65535)")
        self.opts = options
        self.devices = parse_devices(options.devices)
        self.console = console or Console()
        self.result = DemoResult()
        self.t0 = time.monotonic()
        self.state: Path = Path()
        self.temp_state = False
        self.procs: Optional[ProcessGroup] = None
        self.broker: Optional[EmbeddedBroker] = None
        self.store: Optional[Store] = None
        self.fleet: Optional[Fleet] = None
        self.server: Optional[ServerThread] = None
        self.traffic: Optional[Traffic] = None
        self.ports: dict[str, int] = {}
        self.key_private: Path = Path()
        self.key_public: Path = Path()

    # ---- output helpers -------------------------------------------------------------------------

    @contextmanager
    def step(self, title: str) -> Iterator[dict[str, str]]:
        """Show a step with a spinner; print it with its duration and the detail the body filled in."""
        info: dict[str, str] = {}
        start = time.monotonic()
        with self.console.status(f"{title} …"):
            yield info
        took = time.monotonic() - start
        self.result.timings_s[title] = round(took, 2)
        detail = f" — {info['detail']}" if info.get("detail") else ""
        self.console.print(
            f"[green]✓[/] {title}{detail} [dim]({took:.1f} s)[/]", highlight=False, soft_wrap=True
        )

    def _check_children(self) -> None:
        if self.procs is not None:
            try:
                self.procs.check()
            except RuntimeError as exc:
                raise DemoError("child-exited", str(exc)) from None

    def _wait(self, check: Any, timeout: float, what: str) -> Any:
        """Poll `check` (with backoff) until truthy; a dead child or the timeout raises DemoError."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            value = check()
            if value:
                return value
            self._check_children()
            if time.monotonic() > deadline:
                raise DemoError(
                    "timeout",
                    f"{what} did not happen within {timeout:.0f} s; logs are in {self.state / 'logs'}",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> DemoResult:
        """Run every step; stop what was started (after Ctrl-C when `keep`); return what was shown."""
        self.state, self.temp_state = _prepare_state_dir(self.opts.state_dir)
        (self.state / MARKER).write_text("edgefleet demo state folder; `edgefleet demo` may wipe it\n")
        self.result.state_dir = str(self.state)
        try:
            with _signals_as_interrupt(), _edgefleet_home(self.state / "home"), _log_to(self.console):
                try:
                    self._run_steps()
                    if self.opts.keep and not self.result.problems:
                        self._keep_running()
                except DemoInterrupted:
                    self.result.interrupted = True
                    self.console.print("\n[yellow]interrupted[/]: stopping everything the demo started")
                except DemoError as exc:
                    self.result.problems.append(exc.reason)
                    self.console.print(f"[red]demo failed:[/] {exc.reason}", highlight=False)
                except _known_errors() as exc:
                    # edgefleet's own errors name the problem; a traceback would hide it.
                    reason = f"{type(exc).__name__}: {exc}"
                    self.result.problems.append(reason)
                    self.console.print(f"[red]demo failed:[/] {reason}", highlight=False)
                finally:
                    self._shutdown()
        finally:
            self.result.timings_s["total"] = round(time.monotonic() - self.t0, 2)
            if self.result.problems:
                # A temp folder too: its logs are what tells why.
                self.console.print(f"logs and store kept in {self.state}", highlight=False)
            elif self.temp_state:
                shutil.rmtree(self.state, ignore_errors=True)
        self.result.ok = not self.result.problems and not (self.result.interrupted and not self.opts.keep)
        return self.result

    def _run_steps(self) -> None:
        from edgefleet.sdk.trust.keys import init_keys

        self.console.rule("[bold]edgefleet demo")
        counts: dict[str, int] = {}
        for _, profile in self.devices:
            counts[profile] = counts.get(profile, 0) + 1
        self.console.print(
            f"fleet: {', '.join(f'{n}× {p}' for p, n in counts.items())} (emulated on this machine); "
            f"state in {self.state}",
            highlight=False,
        )
        with self.step("fleet signing key") as info:
            pair = init_keys(self.state / "keys")
            self.key_private, self.key_public = pair.private_path, pair.public_path
            info["detail"] = f"Ed25519 {pair.keyid[:12]}…"
        self._start_broker()
        self._start_control_plane()
        self._start_agents()
        model, split = self._train()
        self._wait_online()
        version, bundles = self._build(model, split)
        self.traffic = Traffic(
            self.ports, split.x_test, split.y_test, interval_s=self.opts.traffic_interval_s
        ).start()
        self._deploy_good(bundles, version)
        self._report_devices(version)
        if self.opts.bad_model:
            self._bad_release(model, split, version)
        self._summary()

    def _start_broker(self) -> None:
        from edgefleet.sdk.fleet.broker import BrokerError, EmbeddedBroker

        with self.step("MQTT broker") as info:
            broker = EmbeddedBroker(backend=self.opts.backend, workdir=self.state / "broker")  # type: ignore[arg-type]
            try:
                broker.start()
            except BrokerError as exc:
                raise DemoError("broker", str(exc)) from None
            self.broker = broker
            self.result.broker_url, self.result.broker_backend = broker.url, str(broker.chosen)
            why = (
                " (no mosquitto on PATH: pure-Python fallback)"
                if broker.chosen == "amqtt" and self.opts.backend == "auto"
                else ""
            )
            info["detail"] = f"{broker.chosen} on {broker.url}{why}"

    def _dashboard_port(self) -> int:
        if self.opts.port is not None:
            if self.opts.port and port_open("127.0.0.1", self.opts.port):
                raise DemoError(
                    "port-in-use", f"--port {self.opts.port} is in use; pick another, or 0 for any free port"
                )
            return self.opts.port or free_port()
        return DEFAULT_PORT if not port_open("127.0.0.1", DEFAULT_PORT) else free_port()

    def _mqtt_version(self) -> str:
        # amqtt speaks MQTT 3.1.1 only; Mosquitto gets MQTT 5 like any production broker.
        return "3.1.1" if self.result.broker_backend == "amqtt" else "5"

    def _start_control_plane(self) -> None:
        from edgefleet.sdk.fleet.client import Fleet
        from edgefleet.sdk.fleet.mqtt_url import MqttOptions
        from edgefleet.sdk.server.app import create_app
        from edgefleet.sdk.server.runner import ServerThread
        from edgefleet.sdk.store import Store

        with self.step("control plane") as info:
            self.store = Store(f"sqlite:///{self.state / 'fleet.db'}")
            self.fleet = Fleet(
                broker=MqttOptions(self.result.broker_url, mqtt_version=self._mqtt_version()),
                store=self.store,
                fleet=FLEET,
                trusted_keys=[self.key_public],
            )
            self.fleet.start_ingest()
            app = create_app(
                self.store,
                self.fleet,
                fleet_name=FLEET,
                bundle_dir=self.state / "home" / "bundles",
                trusted_keys=[self.key_public],
                poll_s=0.5,
            )
            self.server = ServerThread(app, "127.0.0.1", self._dashboard_port()).start()
            self.result.dashboard_url = f"{self.server.url}/"
            info["detail"] = (
                f"store {self.state / 'fleet.db'}, ingest on, dashboard [bold]{self.result.dashboard_url}[/]"
            )

    def _emulation_profile(self, profile: str) -> Path:
        """A copy of a built-in profile with one inference thread, for an agent that shares this machine.

        Each emulated device would otherwise run the profile's 4-6 intra-op threads on cores that every
        other emulated device shares too; measured here (4 processes, this digits model, 2 cores), that
        oversubscription made p95 latency 4.7 ms instead of 0.39 ms with one thread each.
        """
        from edgefleet.device_profiles import load_profile_file
        from edgefleet.device_profiles.loader import BUILTIN_DIR

        source = BUILTIN_DIR / f"{profile}.toml"
        text, n = re.subn(r"(?m)^threads\s*=\s*\d+.*$", "threads = 1", source.read_text())
        if n != 1:
            raise DemoError("profile", f"{source} has no single `threads` budget to cap for emulation")
        target = self.state / "profiles" / f"{profile}.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            f"# {profile} for `edgefleet demo`: the built-in profile with threads = 1, because every emulated\n"
            "# device shares this machine's cores. Written by edgefleet.sdk.demo.\n" + text
        )
        loaded = load_profile_file(target)
        if loaded.name != profile:
            raise DemoError("profile", f"{target} names profile {loaded.name!r}, expected {profile!r}")
        return target

    def _start_agents(self) -> None:
        n = len(self.devices)
        with self.step(f"start {n} emulated device{'s' if n != 1 else ''}") as info:
            self.procs = ProcessGroup(self.state / "logs")
            profiles = {p: self._emulation_profile(p) for p in dict.fromkeys(p for _, p in self.devices)}
            for device_id, profile in self.devices:
                port = free_port()
                self.ports[device_id] = port
                argv = [
                    sys.executable,
                    "-m",
                    "edgefleet.agent.cli",
                    "--device-id",
                    device_id,
                    "--emulate",
                    str(profiles[profile]),
                    "--broker",
                    self.result.broker_url,
                    "--fleet",
                    FLEET,
                    "--state-dir",
                    str(self.state / "devices" / device_id),
                    "--trusted-key",
                    str(self.key_public),
                    "--http-port",
                    str(port),
                    "--telemetry-interval",
                    str(self.opts.telemetry_interval_s),
                    "--eval-interval",
                    str(max(2.0, 2 * self.opts.telemetry_interval_s)),
                    "--connect-timeout",
                    "60",
                    "--mqtt-version",
                    self._mqtt_version(),
                    "--tag",
                    "demo",
                ]
                self.procs.start(device_id, argv)
            info["detail"] = ", ".join(f"{d} ({p})" for d, p in self.devices) + " — booting"

    def _train(self) -> tuple[nn.Module, DigitsSplit]:
        from edgefleet.sdk.build.zoo import accuracy, digits_cnn, digits_split, train_classifier

        title = "train the digits CNN"
        start = time.monotonic()
        import torch

        torch.manual_seed(0)
        split = digits_split(seed=0)
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            console=self.console,
            transient=True,
            # A pipe or file gets the summary line only, not an empty line where the bar was.
            disable=not self.console.is_terminal,
        ) as bar:
            task = bar.add_task("epochs", total=self.opts.epochs, loss=float("nan"))

            def on_epoch(epoch: int, loss: float) -> None:
                bar.update(task, completed=epoch + 1, loss=loss)

            model = train_classifier(
                digits_cnn(), split.x_train, split.y_train, epochs=self.opts.epochs, seed=0, on_epoch=on_epoch
            )
        acc = accuracy(model, split.x_test, split.y_test)
        self.result.host_accuracy = round(acc, 4)
        took = time.monotonic() - start
        self.result.timings_s[title] = round(took, 2)
        params = sum(p.numel() for p in model.parameters())
        self.console.print(
            f"[green]✓[/] {title} — {params:,} parameters, {self.opts.epochs} epochs on {len(split.x_train)} "
            f"digits, {acc:.2%} on {len(split.x_test)} held-out digits [dim]({took:.1f} s)[/]",
            highlight=False,
        )
        return model, split

    def _wait_online(self) -> None:
        assert self.store is not None
        ids = [d for d, _ in self.devices]
        with self.step("devices online") as info:

            def online() -> bool:
                assert self.store is not None
                rows = {r["device_id"]: r for r in self.store.devices(FLEET)}
                return all(rows.get(d, {}).get("online") for d in ids)

            self._wait(online, 90, "every device coming online")
            rows = {r["device_id"]: r for r in self.store.devices(FLEET)}
            runtimes = sorted({rt for r in rows.values() for rt in (r.get("runtimes") or [])})
            info["detail"] = (
                f"{len(ids)} agents connected (retained birth messages), runtimes {', '.join(runtimes)}"
            )

    def _build(self, model: nn.Module, split: DigitsSplit) -> tuple[int, dict[str, Path]]:
        from edgefleet.sdk.build.builder import build
        from edgefleet.sdk.build.plan import PlanOptions
        from edgefleet.sdk.trust.keys import load_private_key

        key = load_private_key(self.key_private)
        version = int(time.strftime("%Y%m%d%H%M%S"))
        # A short plan: fp32 baseline, graph-optimised fp32, fp16 where the profile has it, and static
        # INT8 with one calibration. The full search (pruning, TFLite) takes minutes; see docs/build.md.
        plan = PlanOptions(
            prune_levels=(),
            mixed_precision=False,
            tflite=False,
            static_calibrations=("minmax",),
            only=("onnx-fp32-opt", "onnx-fp16", "onnx-int8-static-minmax"),
        )
        bundles: dict[str, Path] = {}
        for profile in dict.fromkeys(p for _, p in self.devices):
            with self.step(f"build for {profile}") as info:
                result = build(
                    model,
                    profile,
                    calib=(split.x_train, split.y_train),
                    eval=(split.x_test, split.y_test),
                    max_accuracy_drop=0.01,
                    out=self.state / "bundles" / f"{MODEL_NAME}-{profile}",
                    plan=plan,
                    private_key=key,
                    name=MODEL_NAME,
                    overwrite=True,
                )
                assert result.bundle_dir is not None
                restamp(result.bundle_dir, version, key)
                bundles[profile] = result.bundle_dir
                chosen = result.chosen
                tried = ", ".join(f"{c.id} {c.status}" for c in result.candidates)
                acc = chosen.quality.value if chosen.quality else float("nan")
                p50 = chosen.latency.p50_ms if chosen.latency else float("nan")
                self.result.builds[profile] = {
                    "chosen": chosen.id,
                    "size_bytes": chosen.size_bytes,
                    "accuracy": acc,
                    "host_p50_ms": p50,
                    "candidates": {c.id: c.status for c in result.candidates},
                }
                info["detail"] = (
                    f"chose [bold]{chosen.id}[/] ({(chosen.size_bytes or 0) / 1024:.0f} KB, accuracy {acc:.2%}, "
                    f"host p50 {p50:.3f} ms); tried {tried}"
                )
        self.result.version = version
        self.console.print(
            f"  release [bold]{MODEL_NAME} v{version}[/]: {len(bundles)} signed bundles in {self.state / 'bundles'}",
            highlight=False,
        )
        return version, bundles

    def _watch(self, handle: RolloutHandle, title: str) -> str:
        """Show a rollout's progress bar and each device's status changes until it ends; returns its status."""
        from edgefleet.sdk.fleet.rollout import ENDED_ROLLOUT

        assert self.fleet is not None
        total = len(self.devices)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + self.opts.timeout_s + 60
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[phase]}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as bar:
            task = bar.add_task(title, total=total, phase="")
            while True:
                view = handle.engine.view()
                for device, status in sorted(view.devices.items()):
                    if seen.get(device) != status:
                        seen[device] = status
                        colour = {
                            "deployed": "green",
                            "rolled-back": "yellow",
                            "rejected": "red",
                            "not-notified": "dim",
                        }.get(status, "cyan")
                        bar.console.print(f"    {device:<22} [{colour}]{status}[/]", highlight=False)
                done = sum(1 for s in view.devices.values() if s in ENDED_DEVICE)
                phase = f"wave {max(view.wave, 0) + 1}/{view.waves} · {view.status}"
                if view.soak_left_s > 0 and view.status == "running":
                    phase += f" · soak {view.soak_left_s:.0f} s"
                bar.update(task, completed=done, phase=phase)
                if view.status in ENDED_ROLLOUT or handle.engine.status in ENDED_ROLLOUT:
                    break
                if handle.thread is not None and not handle.thread.is_alive():
                    break
                self._check_children()
                if time.monotonic() > deadline:
                    handle.abort("the demo timed out waiting for the rollout")
                    raise DemoError("timeout", f"rollout {handle.id} did not end in time")
                time.sleep(0.2)
        status = handle.wait(30)
        return status

    def _rules(self) -> Any:
        from edgefleet.sdk.fleet.strategy import AbortRules

        # The fleet's own accuracy floor, on top of each manifest's health policy. The rule averages
        # windows unweighted, and the first window after a switch may hold only a few requests: with
        # five windows first, one wrong answer in a tiny window cannot abort a good release.
        return AbortRules(min_accuracy=self.opts.min_accuracy, min_samples=MIN_WINDOWS)

    def _deploy_good(self, bundles: dict[str, Path], version: int) -> None:
        assert self.fleet is not None
        strategy = f"canary:{self.opts.canary_pct}"
        self.console.rule(f"[bold]deploy {MODEL_NAME} v{version} — {strategy}")
        self.console.print(
            f"  abort rules: any failed device; telemetry p95 above the profile budget; eval-set or live "
            f"accuracy below {self.opts.min_accuracy:.0%} (the fleet's floor). Local traffic: held-out digits "
            "to each device's /v1/infer, true labels to /v1/feedback.",
            highlight=False,
        )
        start = time.monotonic()
        handle = self.fleet.deploy(
            list(bundles.values()),
            "all",
            strategy=strategy,
            # The canary serves for a few telemetry windows before the rest are told.
            soak_s=max(3.0, (MIN_WINDOWS + 1) * self.opts.telemetry_interval_s),
            timeout_s=self.opts.timeout_s,
            rules=self._rules(),
            wait=False,
        )
        self.result.rollout_id = handle.id
        status = self._watch(handle, f"rollout {handle.id}")
        row = self.fleet.rollout(handle.id)
        self.result.rollout_status, self.result.rollout_reason = status, row.get("reason")
        took = time.monotonic() - start
        self.result.timings_s["rollout"] = round(took, 2)
        if status != "succeeded":
            raise DemoError(
                "rollout-failed",
                f"the rollout of the good model ended {status}: {row.get('reason')}; device logs are in "
                f"{self.state / 'logs'}",
            )
        sent = handle.engine.stats.total_bytes
        self.console.print(
            f"[green]✓[/] rollout {handle.id} succeeded on {len(self.devices)} devices: the host published "
            f"{sent / 1024:.0f} KiB in all (each model broadcast once per wave) [dim]({took:.1f} s)[/]",
            highlight=False,
        )

    def _device_rows(self, version: int, since: float) -> list[DeviceRow]:
        assert self.store is not None
        rows = {r["device_id"]: r for r in self.store.devices(FLEET)}
        out = []
        for device_id, profile in self.devices:
            reg = rows.get(device_id, {})
            telemetry = [
                t
                for t in self.store.latest_telemetry(FLEET, device_id, limit=500)
                if t["model_name"] == MODEL_NAME and t["model_version"] == version and t["ts"] >= since
            ]
            points = self.store.series(
                FLEET,
                device_id=device_id,
                model_name=MODEL_NAME,
                model_version=version,
                since=since,
                bucket_s=1e12,
            )
            point = points[0] if points else None
            out.append(
                DeviceRow(
                    device_id=device_id,
                    profile=profile,
                    online=bool(reg.get("online")),
                    model=reg.get("active_model"),
                    version=reg.get("active_version"),
                    windows=sum(1 for t in telemetry if (t["count"] or 0) > 0),
                    requests=point.count if point else 0,
                    p50_ms=point.p50_ms if point else None,
                    p95_ms=point.p95_ms if point else None,
                    live_accuracy=point.live_accuracy if point else None,
                    eval_accuracy=point.eval_accuracy if point else None,
                )
            )
        return out

    def _report_devices(self, version: int) -> None:
        since = time.time()
        needed = 3
        with self.step("telemetry from every device") as info:

            def filled() -> list[DeviceRow] | None:
                rows = self._device_rows(version, since)
                ready = all(
                    r.version == version
                    and r.windows >= needed
                    and r.p95_ms is not None
                    and r.live_accuracy is not None
                    and r.eval_accuracy is not None
                    for r in rows
                )
                return rows if ready else None

            rows = self._wait(filled, 60, f"{needed} telemetry windows with traffic from every device")
            info["detail"] = (
                f"{sum(r.requests for r in rows)} inferences in {sum(r.windows for r in rows)} windows"
            )
        self.result.devices = rows
        table = Table(
            title=f"what each device measured on {MODEL_NAME} v{version} (request-weighted over the windows)"
        )
        for col, justify in (
            ("device", "left"),
            ("profile", "left"),
            ("model", "left"),
            ("requests", "right"),
            ("p50 ms", "right"),
            ("p95 ms", "right"),
            ("live acc.", "right"),
            ("eval-set acc.", "right"),
            ("state", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in rows:
            table.add_row(
                r.device_id,
                r.profile,
                f"{r.model} v{r.version}",
                str(r.requests),
                _fmt(r.p50_ms, 3),
                _fmt(r.p95_ms, 3),
                _pct(r.live_accuracy),
                _pct(r.eval_accuracy),
                "[green]online[/]" if r.online else "[red]offline[/]",
            )
        self.console.print(table)
        self.console.print(
            "  live acc. = agreement with the true labels sent as feedback; eval-set acc. = the bundle's "
            "eval.npz re-scored on the device; latency is the agent's own inference timing.",
            highlight=False,
        )

    def _bad_release(self, model: nn.Module, split: DigitsSplit, good_version: int) -> None:
        from edgefleet.sdk.build.builder import build
        from edgefleet.sdk.build.plan import PlanOptions
        from edgefleet.sdk.build.zoo import accuracy
        from edgefleet.sdk.trust.keys import load_private_key

        assert self.fleet is not None and self.store is not None
        self.console.rule("[bold]--bad-model: a release with a label-map bug")
        key = load_private_key(self.key_private)
        bad = mislabeled_copy(model)
        host_acc = accuracy(bad, split.x_test, split.y_test)
        version = max(int(time.strftime("%Y%m%d%H%M%S")), good_version + 1)
        bundles: dict[str, Path] = {}
        min_manifest: Optional[float] = None
        with self.step("build the bad release") as info:
            for profile in dict.fromkeys(p for _, p in self.devices):
                result = build(
                    bad,
                    profile,
                    calib=(split.x_train, split.y_train),
                    eval=(split.x_test, split.y_test),
                    out=self.state / "bundles" / f"{MODEL_NAME}-bad-{profile}",
                    plan=PlanOptions(
                        prune_levels=(), mixed_precision=False, tflite=False, only=("onnx-fp32",)
                    ),
                    private_key=key,
                    name=MODEL_NAME,
                    overwrite=True,
                )
                assert result.bundle_dir is not None
                restamp(result.bundle_dir, version, key)
                bundles[profile] = result.bundle_dir
                manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
                min_manifest = manifest.get("health", {}).get("min_accuracy")
            info["detail"] = (
                f"v{version}: output rows of digits {', '.join(map(str, BAD_CLASSES))} rotated; "
                f"{host_acc:.2%} on the held-out digits; its signed health policy asks for ≥ "
                f"{_pct(min_manifest)}, so devices accept it"
            )
        strategy = f"canary:{self.opts.canary_pct}"
        self.console.print(
            f"  deploying v{version} with {strategy}; the fleet's floor is {self.opts.min_accuracy:.0%}: the "
            "canary's telemetry must catch it",
            highlight=False,
        )
        start = time.monotonic()
        handle = self.fleet.deploy(
            list(bundles.values()),
            "all",
            strategy=strategy,
            # Long enough for several telemetry windows of the canary before the next wave would start.
            soak_s=max(20.0, 10 * self.opts.telemetry_interval_s),
            timeout_s=self.opts.timeout_s,
            rules=self._rules(),
            wait=False,
        )
        status = self._watch(handle, f"rollout {handle.id}")
        row = self.fleet.rollout(handle.id)
        devices = {d["device_id"]: d["status"] for d in row["devices"]}
        reasons = {d["device_id"]: d.get("reason") for d in row["devices"]}
        canary = sorted(d["device_id"] for d in row["devices"] if int(d.get("wave") or 0) == 0)
        outcome = BadOutcome(
            rollout_id=handle.id,
            version=version,
            status=status,
            reason=row.get("reason"),
            devices=devices,
            reasons=reasons,
            canary=canary,
            host_accuracy=round(host_acc, 4),
            min_accuracy_manifest=min_manifest,
        )
        self.result.bad = outcome
        self.result.timings_s["bad rollout"] = round(time.monotonic() - start, 2)
        # What the canary measured while it served the bad version (a one-device canary: its row).
        for r in self._device_rows(version, 0.0):
            if r.device_id in canary:
                outcome.canary_live_accuracy = r.live_accuracy
                outcome.canary_eval_accuracy = r.eval_accuracy
                outcome.canary_requests = r.requests
        if status != "aborted":
            self.result.problems.append(
                f"the bad release was not stopped: rollout {handle.id} ended {status} ({row.get('reason')})"
            )
            return
        self.console.print(
            f"[green]✓[/] rollout {handle.id} [bold red]aborted[/]: {row.get('reason')}", highlight=False
        )

        def back_on_good() -> dict[str, Optional[int]] | None:
            assert self.store is not None
            rows = {r["device_id"]: r.get("active_version") for r in self.store.devices(FLEET)}
            want = {d for d, _ in self.devices}
            return rows if all(rows.get(d) == good_version for d in want) else None

        try:
            running = self._wait(back_on_good, 30, f"every device back on v{good_version}")
        except DemoError as exc:
            self.result.problems.append(exc.reason)
            running = {r["device_id"]: r.get("active_version") for r in self.store.devices(FLEET)}
        outcome.running_after = {d: running.get(d) for d, _ in self.devices}
        table = Table(title=f"bad release v{version}: what happened on each device")
        for col in ("device", "wave", "rollout status", "why", "runs now"):
            table.add_column(col)
        for device_id, _ in self.devices:
            st = devices.get(device_id, "?")
            colour = {"rolled-back": "yellow", "not-notified": "dim", "deployed": "red"}.get(st, "white")
            now_v = outcome.running_after.get(device_id)
            why = (
                "canary: installed (its health check passed) and served, rolled back by the abort"
                if st == "rolled-back"
                else "never sent anything (later wave)"
                if st == "not-notified"
                else str(reasons.get(device_id) or "")
            )
            table.add_row(
                device_id,
                "canary" if device_id in canary else "rest",
                f"[{colour}]{st}[/]",
                why,
                f"v{now_v}" + (" (good)" if now_v == good_version else ""),
            )
        self.console.print(table)
        if outcome.canary_live_accuracy is not None or outcome.canary_eval_accuracy is not None:
            self.console.print(
                f"  the canary measured v{version}: live accuracy {_pct(outcome.canary_live_accuracy)}, eval-set "
                f"{_pct(outcome.canary_eval_accuracy)} over {outcome.canary_requests} requests, below the "
                f"{self.opts.min_accuracy:.0%} floor",
                highlight=False,
            )
        expected = {d: ("rolled-back" if d in canary else "not-notified") for d, _ in self.devices}
        wrong = {d: s for d, s in devices.items() if expected.get(d) != s}
        if wrong:
            self.result.problems.append(f"unexpected device statuses after the abort: {wrong}")

    def _summary(self) -> None:
        r = self.result
        self.console.rule()
        ok = not r.problems
        verdict = (
            "[green]the demo showed the whole loop[/]" if ok else "[red]the demo did not go as it should[/]"
        )
        self.console.print(f"{verdict} in {time.monotonic() - self.t0:.0f} s", highlight=False)
        for problem in r.problems:
            self.console.print(f"  [red]✗[/] {problem}", highlight=False)
        later = "" if self.opts.keep else " — it stops with the demo; rerun with --keep to leave it running"
        self.console.print(
            f"dashboard: [bold]{r.dashboard_url}[/]  (API: {r.dashboard_url}docs){later}",
            highlight=False,
            soft_wrap=True,
        )

    def _keep_running(self) -> None:
        self.console.print(
            f"--keep: the fleet, broker ({self.result.broker_url}), traffic and dashboard "
            f"({self.result.dashboard_url}) keep running; press Ctrl-C to stop them all.",
            highlight=False,
            # One line whatever the width, so scripts can find the URL beside "Ctrl-C".
            soft_wrap=True,
        )
        while True:
            self._check_children()
            time.sleep(0.5)

    def _shutdown(self) -> None:
        """Stop everything, newest first: traffic, agents (they say goodbye over MQTT), server, ingest, broker."""
        # A second Ctrl-C must not leave children behind half-way through.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps: list[tuple[str, Any]] = [
            ("traffic", self.traffic.stop if self.traffic else None),
            ("agents", self.procs.stop_all if self.procs else None),
            ("dashboard", self.server.stop if self.server else None),
            ("ingest", self.fleet.close if self.fleet else None),
            ("broker", self.broker.stop if self.broker else None),
            ("store", self.store.close if self.store else None),
        ]
        for name, stop in steps:
            if stop is None:
                continue
            try:
                stop()
            except Exception as exc:  # stopping the rest matters more than this one's error
                self.console.print(f"[yellow]stopping {name} failed:[/] {exc}", highlight=False)
        self.traffic = None
        self.procs = None
        self.server = None
        self.fleet = None
        self.broker = None
        self.store = None


def _known_errors() -> tuple[type[Exception], ...]:
    """edgefleet's error families whose messages say what went wrong and what to do."""
    from edgefleet.sdk.build.errors import BuildError
    from edgefleet.sdk.fleet.errors import FleetError
    from edgefleet.sdk.server.errors import ServerError
    from edgefleet.sdk.store import StoreError
    from edgefleet.sdk.trust.bundle import BundleError
    from edgefleet.sdk.trust.keys import KeysError

    return (BuildError, BundleError, FleetError, KeysError, ServerError, StoreError)


def _fmt(value: Optional[float], digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2%}"


def run_demo(options: DemoOptions, console: Optional[Console] = None) -> DemoResult:
    """Run the demo with `options`; returns what it showed (`ok` when it showed what it should)."""
    return Demo(options, console).run()


__all__ = ["DemoError", "DemoOptions", "DemoResult", "mislabeled_copy", "parse_devices", "run_demo"]
