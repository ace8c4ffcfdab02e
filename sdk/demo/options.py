"""The demo's options, results and errors, and the `--devices` parser."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from edgefleet.sdk.errors import EdgefleetError

if TYPE_CHECKING:
    pass


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


class DemoError(EdgefleetError):
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
