"""The actions `DeployMachine` answers with: what its wiring must do, in order, after each input.

The machine decides; the wiring (the daemon, the load bench's simulated devices, a test) publishes,
subscribes, persists and installs. Each action is a small frozen dataclass, so a test can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type, Union

from edgefleet.agent.core.protocol import DeployCommand, DeviceMessage


@dataclass(frozen=True)
class Send:
    """Publish one event (Progress, Missing, Deployed, Rejected) with these fields."""

    cls: Type[DeviceMessage]
    fields: Dict[str, Any]


@dataclass(frozen=True)
class Report:
    """Publish an Error event (through the wiring's flood limiter)."""

    code: str
    reason: str
    ref: Optional[str]


@dataclass(frozen=True)
class Subscribe:
    """Subscribe to the broadcast chunks of one file."""

    sha256: str


@dataclass(frozen=True)
class Unsubscribe:
    """Leave the broadcast of one file."""

    sha256: str


@dataclass(frozen=True)
class Install:
    """Install the staged files of a finished download; answer with `installed()` or `install_failed()`."""

    command: DeployCommand
    name: str
    version: int
    staged: Dict[str, Path]
    started: float


@dataclass(frozen=True)
class SavePending:
    """Persist the command of the deploy now downloading (durable before its chunks matter)."""

    command: DeployCommand


@dataclass(frozen=True)
class SaveOutcome:
    """Persist a deploy's outcome event, so a redelivered command or a restart resends it."""

    deploy: str
    event: Dict[str, Any]


@dataclass(frozen=True)
class ClearPending:
    """Forget the persisted pending deploy."""


@dataclass(frozen=True)
class Discard:
    """Delete the staged files of transfers a finished deploy leaves behind."""

    sha256s: Tuple[str, ...]


@dataclass(frozen=True)
class PublishState:
    """Re-publish the retained birth state (the active model may have changed)."""


Action = Union[
    Send,
    Report,
    Subscribe,
    Unsubscribe,
    Install,
    SavePending,
    SaveOutcome,
    ClearPending,
    Discard,
    PublishState,
]
