"""Child processes a host command starts (broker, serve, simulated agents), stopped together on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Optional


@dataclass
class Child:
    """One started process with its name and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, for error messages."""
        self.log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Processes started together and stopped together: SIGTERM, a grace period, then SIGKILL.

    Each child runs in its own session so a Ctrl-C in the terminal reaches only this process, which
    then stops the children in order instead of all of them dying at once mid-write.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Child:
        """Start `argv` with its output in `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            proc = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        except OSError as exc:
            log.close()
            raise RuntimeError(
                f"cannot start {name} ({argv[0] if argv else 'no command'}): {exc.strerror or exc}"
            ) from exc
        child = Child(name, proc, log_path, log)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise RuntimeError naming any child that has exited, with the end of its log."""
        for child in self.children:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}; its log ({child.log_path}) ends:\n"
                    + child.tail()
                )

    def pids(self) -> list[int]:
        """Process ids of the children still running."""
        return [c.proc.pid for c in self.children if c.alive()]

    def stop(self, child: Child, timeout: float = 10.0, kill: bool = False) -> None:
        """Stop one child (SIGKILL at once when `kill`); SIGKILL after `timeout` if SIGTERM is ignored."""
        if child.alive():
            try:
                os.killpg(child.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited between the timeout and the kill
                child.proc.wait(timeout=timeout)
        child.log.close()

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first (agents before the broker they talk to)."""
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.alive():
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for child in reversed(self.children):
            self.stop(child, timeout=max(0.5, deadline - time.monotonic()))
        self.children.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
