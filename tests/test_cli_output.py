"""Output that reads well anywhere: plain aligned tables in a pipe, rich ones on a terminal, library noise in
the build log instead of the user's screen."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from edgefleet.sdk.cli.output import plain_table, print_table

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# Variables that make rich draw for a terminal even in a pipe.
TERMINAL_HINTS = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")


def _box_chars(text: str) -> set[str]:
    """Box-drawing characters (U+2500-U+257F), as rich's table borders use."""
    return {c for c in text if 0x2500 <= ord(c) <= 0x257F}


def _piped(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `edgefleet ARGS` with stdout and stderr piped, as `edgefleet ARGS | cat` does."""
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_HINTS}
    env["COLUMNS"] = "80"  # what rich falls back to without a terminal: long rows must still not wrap
    return subprocess.run(
        [EDGEFLEET, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )


def _long_table() -> Table:
    table = Table(title="[bold]title[/]", caption="a caption")
    table.add_column("name")
    table.add_column("size", justify="right")
    table.add_column("reason")
    table.add_row("a", "1", "short")
    table.add_row("[green]bbbbbbbbbb[/]", "12345", "a reason far longer than eighty columns " * 4)
    table.add_row("c", "7", "first line\nsecond line")
    return table


def test_plain_table_aligns_columns_on_one_line_per_row() -> None:
    # act
    text = plain_table(_long_table())

    # assert
    lines = text.splitlines()
    assert lines[0] == "title" and lines[-1] == "a caption"
    head, rows = lines[1], lines[2:-1]
    assert len(rows) == 3 and not _box_chars(text) and "[green]" not in text
    end = head.index("size") + len("size")  # a right-justified column: right edges line up
    assert rows[0][end - 1] == "1" and rows[1][end - 5 : end] == "12345" and rows[1].startswith("bbbbbbbbbb")
    assert rows[0].index("short") == rows[1].index("a reason") == head.index("reason")
    assert rows[1].endswith("columns")  # one line, however long
    assert rows[2].endswith("first line, second line")


def test_print_table_draws_boxes_on_a_terminal_only() -> None:
    # prepare
    terminal, pipe = io.StringIO(), io.StringIO()

    # act
    print_table(_long_table(), Console(file=terminal, force_terminal=True, width=80))
    print_table(_long_table(), Console(file=pipe, force_terminal=False, width=80))

    # assert
    assert _box_chars(terminal.getvalue())
    assert not _box_chars(pipe.getvalue())
    assert pipe.getvalue() == plain_table(_long_table())


def test_profiles_list_and_show_piped_are_plain_text() -> None:
    # act
    listed = _piped("profiles", "list")
    shown = _piped("profiles", "show", "jetson-nano")

    # assert
    assert listed.returncode == 0 and shown.returncode == 0, listed.stderr + shown.stderr
    assert not _box_chars(listed.stdout) and not _box_chars(shown.stdout)
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[2:]}
    assert {"rpi4b", "jetson-nano", "jetson-agx-orin", "x86-64"} <= set(rows)
    # every row holds its whole CPU model and its runtimes: nothing wrapped onto a next line
    assert "4x Arm Cortex-A57 (Tegra X1) + 128-core NVIDIA Maxwell" in rows["jetson-nano"]
    assert (
        rows["jetson-nano"].split()[-2:] == ["300", "50"]
        and "tflite-xnnpack, onnxruntime-cpu" in rows["jetson-nano"]
    )
    fields = {line.split()[0]: line for line in shown.stdout.splitlines()[2:] if line.strip()}
    assert fields["python"].split()[1] == "3.8" and "Ubuntu 18.04" in fields["python"]


def test_fleet_tables_piped_are_plain_text(tmp_path: Path) -> None:
    # prepare: a store with one device, its telemetry and an aborted rollout
    from edgefleet.sdk.store import Store

    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = Store(url)
    store.upsert_device(
        "f", "cam-1", online=True, profile="rpi4b", tags=["lab", "door"], active_model="m", active_version=1
    )
    store.add_telemetry(
        "f",
        [
            {
                "device_id": "cam-1",
                "ts": time.time(),
                "seq": 1,
                "model_name": "m",
                "model_version": 1,
                "count": 3,
                "p95_ms": 2.5,
            }
        ],
    )
    long_reason = "p95 latency 12.5 ms above the rollout's ceiling of 10 ms on 3 of 4 devices in wave 1"
    store.create_rollout(
        "r-1", fleet="f", selector="tag:lab", strategy="canary:10", settings={}, targets=[("cam-1", None, 0)]
    )
    store.set_rollout_status("r-1", "aborted", long_reason)
    store.close()

    # act
    outs = {
        name: _piped(*args, "--db", url, "--fleet", "f")
        for name, args in {
            "devices": ["devices", "--no-refresh"],
            "rollouts": ["rollouts"],
            "rollout": ["rollout", "r-1"],
            "telemetry": ["telemetry", "cam-1"],
        }.items()
    }

    # assert
    for name, out in outs.items():
        assert out.returncode == 0, (name, out.stderr)
        assert not _box_chars(out.stdout), (name, out.stdout)
    [device_row] = [line for line in outs["devices"].stdout.splitlines() if line.startswith("cam-1")]
    assert device_row.split()[:4] == ["cam-1", "yes", "rpi4b", "lab,door"]
    [rollout_row] = [line for line in outs["rollouts"].stdout.splitlines() if line.startswith("r-1")]
    assert rollout_row.split()[:4] == ["r-1", "aborted", "canary:10", "tag:lab"]
    assert rollout_row.endswith(long_reason)  # the whole reason on the row's one line
    assert f"reason: {long_reason}" in outs["rollout"].stdout


@pytest.mark.slow
def test_build_piped_prints_plain_results_and_keeps_library_noise_in_the_log(tmp_path: Path) -> None:
    # prepare: an ExportedProgram and an eval set; the TFLite candidate imports litert-torch (TensorFlow)
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgefleet.sdk.trust.keys import init_keys

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.zeros(2, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).random((32, 16), dtype=np.float32))
    key = init_keys(tmp_path / "keys").private_path

    # act
    out = _piped(
        "build", "net.pt2", "--profile", "rpi4b", "--eval", "eval.npz", "-o", "bundle", "--key", str(key),
        "--only", "tflite-fp32", cwd=tmp_path, timeout=600,
    )  # fmt: skip

    # assert
    log = tmp_path / "bundle.build.log"
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == "", out.stderr  # no torch / TensorFlow / absl / oneDNN lines on the screen
    assert not _box_chars(out.stdout)
    lines = out.stdout.splitlines()
    assert any(line.startswith("onnx-fp32") and line.rstrip().endswith("ok") for line in lines), out.stdout
    # `--only tflite-fp32` picks among the listed ids; fp32 ONNX is the baseline it is measured against
    assert any(line.startswith("chosen: tflite-fp32 — ") and "≤" in line for line in lines), out.stdout
    assert log.is_file() and f"lines in {log.name}" in out.stdout
    assert not (tmp_path / "bundle" / log.name).exists()  # a bundle holds only its signed files
    text = log.read_text()
    assert any(word in text for word in ("oneDNN", "absl", "Warning")), text[:2000]
