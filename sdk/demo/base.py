"""The demo's shared state and helpers: option checks, step output, polling with a deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.console import Console

from edgefleet.sdk.demo.options import DemoError, DemoOptions, DemoResult, parse_devices
from edgefleet.sdk.demo.procs import ProcessGroup
from edgefleet.sdk.demo.traffic import Traffic

if TYPE_CHECKING:
    from edgefleet.sdk.fleet.broker import EmbeddedBroker
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.server.runner import ServerThread
    from edgefleet.sdk.store import Store


class DemoBase:
    """The demo's state and output helpers, shared by the step mixins that make up `Demo`."""

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


def known_errors() -> tuple[type[Exception], ...]:
    """edgefleet's own errors (one root on the host), whose messages say what went wrong and what to do."""
    from edgefleet.sdk.errors import EdgefleetError

    return (EdgefleetError,)


def fmt_number(value: Optional[float], digits: int) -> str:
    """`value` with `digits` decimals, or a dash when there is none."""
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_pct(value: Optional[float]) -> str:
    """`value` as a percentage with two decimals, or a dash when there is none."""
    return "—" if value is None else f"{value:.2%}"
