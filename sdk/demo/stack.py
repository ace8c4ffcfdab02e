"""The demo's stack: MQTT broker, control plane (store, ingest, API, dashboard) and emulated agents."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.demo.base import DemoBase
from edgefleet.sdk.demo.options import DEFAULT_PORT, FLEET, DemoError
from edgefleet.sdk.demo.procs import ProcessGroup
from edgefleet.sdk.fleet.broker import free_port, port_open

if TYPE_CHECKING:
    pass


class StackSteps(DemoBase):
    """Start and stop what the demo runs: broker, control plane, emulated agents."""

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
