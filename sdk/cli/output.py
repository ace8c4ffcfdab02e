"""Output that reads well anywhere: tables for terminals and pipes, library noise kept in a log.

Rich sizes a table to the terminal, and without one to 80 columns, wrapping long cells into several
lines inside box-drawing characters: unreadable in `| cat`, a log or `grep`. When the console is not a
terminal, `print_table` writes one line per row instead: columns padded with spaces, never wrapped,
markup stripped, a multi-line cell joined with ", ".

A build imports torch, TensorFlow (through litert-torch) and torchao, which write warnings and C++ log
lines (oneDNN, absl) to stderr; `library_output_to` sends them to a log file for the build's duration.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

GAP = "  "


def _plain(renderable: Any) -> str:
    """The text of one cell, header, title or caption, without markup, on one line."""
    from rich.console import Console
    from rich.errors import MarkupError
    from rich.text import Text

    if renderable is None:
        return ""
    if isinstance(renderable, str):
        try:
            text = Text.from_markup(renderable).plain  # as rich reads a str cell
        except MarkupError:  # a stray closing tag: show the text as it is
            text = renderable
    elif isinstance(renderable, Text):
        text = renderable.plain
    else:  # any other renderable: render it wide, without colour, and keep its text
        buffer = io.StringIO()
        Console(file=buffer, width=10_000, color_system=None, highlight=False).print(renderable)
        text = buffer.getvalue()
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


def plain_table(table: Table) -> str:
    """`table` as plain text: title, header, one line per row (columns aligned), caption."""
    from rich.cells import cell_len

    columns = list(table.columns)
    rows = [[_plain(cell) for cell in column.cells] for column in columns]
    heads = [_plain(column.header) if table.show_header else "" for column in columns]
    count = max((len(cells) for cells in rows), default=0)
    widths = [max([cell_len(heads[i])] + [cell_len(c) for c in rows[i]]) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        parts = []
        for i, value in enumerate(values):
            pad = " " * (widths[i] - cell_len(value))
            parts.append(pad + value if columns[i].justify == "right" else value + pad)
        return GAP.join(parts).rstrip()

    out = []
    if table.title:
        out.append(_plain(table.title))
    if table.show_header:
        out.append(line(heads))
    out.extend(
        line([rows[i][r] if r < len(rows[i]) else "" for i in range(len(columns))]) for r in range(count)
    )
    if table.caption:
        out.append(_plain(table.caption))
    return "\n".join(out) + "\n"


def print_table(table: Table, console: Console | None = None) -> None:
    """Print `table` on `console` (default: stdout): rich on a terminal, `plain_table` anywhere else."""
    from rich.console import Console

    console = console or Console()
    if console.is_terminal:
        console.print(table)
        return
    console.file.write(plain_table(table))
    console.file.flush()


def build_log_path(out: Optional[Path]) -> Path:
    """Where a build's library messages go: beside the bundle folder (`OUT.build.log`), else a temp file.

    Not inside the folder: a bundle holds only the files its signed manifest lists.
    """
    if out is not None:
        return out.parent / f"{out.name}.build.log"
    fd, name = tempfile.mkstemp(prefix="edgefleet-build-", suffix=".log")
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def library_output_to(log_path: Path) -> Iterator[Path]:
    """Send everything written to stderr meanwhile into `log_path`.

    Both file descriptor 2 (C++ logs of TensorFlow, absl, oneDNN; child processes) and Python's
    `sys.stderr` (warnings, logging) are redirected.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "w", encoding="utf-8", errors="replace", buffering=1) as log:
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stderr(log):
                yield log_path
        finally:
            log.flush()
            os.dup2(saved, 2)
            os.close(saved)


def report_build_log(console: Console, log_path: Path) -> None:
    """Name the log when libraries wrote to it (one dim line); remove it when they did not."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").count("\n")
    except OSError:
        return
    if lines == 0:
        log_path.unlink(missing_ok=True)
        return
    console.print(
        f"[dim]library messages (torch, TensorFlow, ...): {lines} lines in {log_path}[/]", highlight=False
    )
