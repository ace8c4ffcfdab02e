"""MODEL.py:NAME: the user's own script as the build's model, so `--student auto` works from the CLI.

The script is written by the test: a small transformer encoder (4 layers in an nn.ModuleList) with a
classification head, given as a factory function, a class and an instance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from edgefleet.sdk.build.errors import ModelLoadError  # noqa: E402
from edgefleet.sdk.build.model_io import load_model, source_kind  # noqa: E402

SCRIPT = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ff(x))


class Encoder(nn.Module):
    def __init__(self, features=6, width=16, layers=4, classes=3):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layers = nn.ModuleList([Block(width) for _ in range(layers)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def make():
    torch.manual_seed(0)
    return Encoder()


instance = make()
not_a_model = 42
"""


@pytest.fixture()
def script(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("name", ["make", "Encoder", "instance"])
def test_script_gives_a_python_module(script: Path, name: str) -> None:
    loaded = load_model(f"{script}:{name}")
    assert loaded.kind == "module" and loaded.stage == "torch"
    assert type(loaded.model).__name__ == "Encoder" and not loaded.model.training
    assert source_kind(Path(f"{script}:{name}")) == "module"


def test_script_mistakes_name_the_problem(script: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(ModelLoadError, match="defines no 'nope'; it defines .*make"):
        load_model(f"{script}:nope")
    with pytest.raises(ModelLoadError, match="is a int"):
        load_model(f"{script}:not_a_model")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('weights file missing')\n")
    with pytest.raises(
        ModelLoadError, match="running .*broken.py failed: RuntimeError: weights file missing"
    ):
        load_model(f"{broken}:make")


@pytest.mark.slow  # distils a student for a few epochs and measures two candidates
def test_cli_student_auto_from_a_script(script: Path, tmp_path: Path) -> None:
    # prepare: labelled sequences, a signing key
    from edgefleet.sdk.cli import app
    from edgefleet.sdk.trust.keys import init_keys

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5, 6)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    key = init_keys(tmp_path / "keys").private_path
    out = tmp_path / "bundle"
    # act: the CLI, through a pipe
    result = CliRunner().invoke(
        app,
        [
            "build", f"{script}:make", "--profile", "rpi4b", "--calib", str(tmp_path / "data.npz"),
            "--eval", str(tmp_path / "data.npz"), "--student", "auto", "--student-epochs", "3",
            "--only", "student-onnx-fp32", "--no-prune", "--key", str(key), "--out", str(out),
            "--max-accuracy-drop", "0.9",
        ],
    )  # fmt: skip
    # assert: the student was made from the script's layers (every other one of 4), distilled and measured
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    student = next(c for c in report["candidates"] if c["id"] == "student-onnx-fp32")
    assert student["status"] != "failed", student.get("reason")
    step = next(s for s in student["steps"] if s.get("step") == "student")
    assert 0 < step["params_after"] < step["params_before"]
    assert step["result"]["epochs_run"] >= 1
    assert not any("student" in str(u) for u in report.get("unavailable", []))
    # the script's model is a Python module, so the sensitivity table covers its layers
    assert any(row["layer"].startswith("layers.") for row in report["sensitivity"]["layers"])
