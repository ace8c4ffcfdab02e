"""One training loop for distillation, fine-tuning and recovery after pruning: minibatches, early stopping.

`fit` trains the given parameters with Adam on a loss over sample indices, validates after every
epoch (higher is better), keeps the best weights and stops after `patience` epochs without progress.
Progress goes to `on_epoch(epoch, train_loss, score)` and `on_batch(done, total)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from edgefleet.sdk.compress.base import CompressionError
from edgefleet.sdk.compress.tasks import set_mode

if TYPE_CHECKING:
    import torch
    from torch import nn

EpochCallback = Callable[[int, float, float], None]
BatchCallback = Callable[[int, int], None]


@dataclass
class FitResult:
    """Best validation score (higher is better), epochs run and the per-epoch history."""

    best_score: float
    initial_score: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def check_schedule(epochs: int, patience: int, lr: float, batch_size: int) -> None:
    """Raise a CompressionError for settings that cannot train."""
    if epochs < 1 or patience < 1:
        raise CompressionError("epochs and patience must be at least 1")
    if lr <= 0:
        raise CompressionError(f"the learning rate must be positive, got {lr}")
    if batch_size < 1:
        raise CompressionError(f"batch_size must be at least 1, got {batch_size}")


def fit(
    model: nn.Module,
    params: list[torch.nn.Parameter],
    count: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    validate: Callable[[], float],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    patience: int,
    seed: int = 0,
    train_mode: bool = True,
    on_epoch: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
) -> FitResult:
    """Train `params` of `model` in place (see module doc); the best state is loaded at the end.

    `train_mode` False keeps the model in eval mode while training (frozen BatchNorm statistics and no
    dropout), which is what training only a head or the last layers needs.
    """
    import torch

    check_schedule(epochs, patience, lr, batch_size)
    if not params:
        raise CompressionError("no trainable parameters: choose more layers to train")
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    set_mode(model)
    best = initial = validate()
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    stale = epoch = 0
    batches = (count + batch_size - 1) // batch_size
    for epoch in range(1, epochs + 1):
        set_mode(model, train_mode)
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for number, start in enumerate(range(0, count, batch_size), start=1):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = batch_loss(idx)
            if not torch.isfinite(loss):
                raise CompressionError(
                    f"the training loss became {float(loss)} in epoch {epoch}: lower the learning rate"
                )
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            if on_batch is not None:
                on_batch((epoch - 1) * batches + number, epochs * batches)
        set_mode(model)
        score = validate()
        history.append({"epoch": epoch, "train_loss": total / count, "val": score})
        if on_epoch is not None:
            on_epoch(epoch, total / count, score)
        if score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    set_mode(model)
    return FitResult(best, initial, epoch, epoch < epochs, history)
