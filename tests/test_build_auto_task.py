"""`--task auto` reaches the training steps: the task the scorer infers from the torch model's outputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from edgefleet.sdk.build.model_io import Dataset
from edgefleet.sdk.build.produce import Producer


class Ctc(torch.nn.Module):
    """[N, 20, 8] features → [N, 20, 5] per-frame logits (blank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 5)
        self.norm = torch.nn.BatchNorm1d(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class Classifier(torch.nn.Module):
    """[N, 8] → [N, 3] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _producer(model: torch.nn.Module, ds: Dataset, tmp_path: Path) -> Producer:
    return Producer(SimpleNamespace(model=model), ds, ds, tmp_path, 1, None)  # type: ignore[arg-type]


def test_auto_gives_the_training_steps_the_ctc_task_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    # prepare: token labels (N, L>1) and a 3-D output, a model in training mode with batch norm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 20, 8)).astype(np.float32)
    y = rng.integers(1, 5, size=(16, 4)).astype(np.int64)
    model = Ctc().train()
    before = model.norm.running_mean.clone()
    # act
    producer = _producer(model, Dataset({"x": x}, y), tmp_path)
    # assert
    assert producer.ctx.options["task"] == "ctc"
    assert model.training and torch.equal(model.norm.running_mean, before)


def test_auto_leaves_a_classifier_to_the_steps_default(tmp_path: Path) -> None:
    # prepare
    rng = np.random.default_rng(1)
    ds = Dataset({"x": rng.normal(size=(16, 8)).astype(np.float32)}, rng.integers(0, 3, 16).astype(np.int64))
    # act
    producer = _producer(Classifier(), ds, tmp_path)
    # assert
    assert "task" not in producer.ctx.options
