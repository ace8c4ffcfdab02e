"""What a demo run changes in this process, restored after: signals, logging, EDGEFLEET_HOME, its folder."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Optional

from rich.console import Console

from edgefleet.sdk.demo.options import MARKER, DemoError, DemoInterrupted

if TYPE_CHECKING:
    pass


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
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
def log_to(console: Console) -> Iterator[None]:
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
def edgefleet_home(path: Path) -> Iterator[None]:
    """Point EDGEFLEET_HOME at the demo's folder (unpacked bundles, delta cache), restoring it after."""
    from edgefleet.agent.core.paths import HOME_ENV

    old = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = old


def prepare_state_dir(path: Optional[Path]) -> tuple[Path, bool]:
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
