"""How every `edgefleet` command reports a user error: one unwrapped line on stderr and an exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console


def err_console() -> Console:
    """A stderr console that never hard-wraps, so scripts can grep a message whatever the terminal width."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 1, prefix: str = "error:") -> typer.Exit:
    """Print `prefix message` to stderr and return the typer.Exit the caller raises."""
    err_console().print(f"[red]{prefix}[/] {message}")
    return typer.Exit(code)
