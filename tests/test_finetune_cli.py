"""`edgefleet finetune`: a two-input TorchScript model trained from a labelled .npz, saved, reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgefleet.sdk.cli import app  # noqa: E402


class TwoInputs(nn.Module):
    """forward(input_ids int64, attention_mask int64): embedding, masked mean, two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.relu(self.hidden(pooled)))


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(TwoInputs().eval()), str(model_path))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=240)
    ids = rng.integers(3, 12, size=(240, 6))
    ids[:, 0] = labels  # the first token is the class: learnable by the head alone
    mask = np.ones((240, 6), np.int64)
    data = tmp_path / "labelled.npz"
    np.savez(data, input_ids=ids.astype(np.int64), attention_mask=mask, y=labels.astype(np.int64))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, tokens=ids, y=labels)
    return {"model": model_path, "data": data, "wrong": wrong, "out": tmp_path / "tuned.pt"}


def test_finetune_trains_last_layers_and_saves_torchscript(files: dict[str, Path]) -> None:
    # prepare
    runner = CliRunner()
    args = ["finetune", str(files["model"]), "--data", str(files["data"]), "--train", "last:2"]
    # act
    result = runner.invoke(
        app, [*args, "--epochs", "15", "--lr", "0.02", "--out", str(files["out"]), "--json"]
    )
    # assert
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["trained_layers"] == ["hidden", "head"] and summary["metric"] == "accuracy"
    assert summary["value"] > summary["before"] and summary["value"] > 0.6
    tuned = torch.jit.load(str(files["out"]))
    x = np.load(files["data"])
    with torch.no_grad():
        logits = tuned(torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"]))
    assert float((logits.argmax(1).numpy() == x["y"]).mean()) == pytest.approx(summary["value"], abs=1e-6)


def test_finetune_prints_one_line_per_epoch_in_a_pipe(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(files["model"]),
            "--data",
            str(files["data"]),
            "--epochs",
            "2",
            "-o",
            str(files["out"]),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("epoch 1/2  train loss") and "val accuracy" in lines[0]
    assert any(line.startswith("trained 1 layers") for line in lines)


def test_finetune_user_errors_are_one_line(files: dict[str, Path]) -> None:
    runner = CliRunner()
    base = ["finetune", str(files["model"]), "-o", str(files["out"])]
    wrong = runner.invoke(app, [*base, "--data", str(files["wrong"])])
    bad_train = runner.invoke(app, [*base, "--data", str(files["data"]), "--train", "some"])
    bad_task = runner.invoke(app, [*base, "--data", str(files["data"]), "--task", "segmentation"])
    assert wrong.exit_code == 1 and "do not match the model's inputs" in wrong.output
    assert bad_train.exit_code == 1 and "last:N" in bad_train.output
    assert bad_task.exit_code == 1 and "unknown task" in bad_task.output
    assert not files["out"].exists()


def test_finetune_a_torch_export_program_and_save_pt2(files: dict[str, Path], tmp_path: Path) -> None:
    # prepare: a .pt2 with a dynamic batch
    ids = torch.zeros((4, 6), dtype=torch.int64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(TwoInputs().eval(), (ids, ids), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    out = tmp_path / "tuned.pt2"
    # act
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(tmp_path / "model.pt2"),
            "--data",
            str(files["data"]),
            "--train",
            "full",
            "--epochs",
            "3",
            "--lr",
            "0.02",
            "-o",
            str(out),
        ],
    )
    # assert
    assert result.exit_code == 0, result.output
    tuned = torch.export.load(str(out)).module()
    assert tuned(torch.zeros((5, 6), dtype=torch.int64), torch.ones((5, 6), dtype=torch.int64)).shape == (
        5,
        3,
    )
