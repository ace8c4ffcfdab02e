"""Transfer learning: freeze a trained backbone and train a new classification head on the user's data.

Public API:
    transfer_learn(model, x, y, *, num_classes, head=None, x_val=None, y_val=None, epochs=30,
                   lr=3e-3, batch_size=64, patience=5, seed=0, on_epoch=None) -> TransferResult
    TransferStep(num_classes=N, head=None, epochs=30, patience=5)
        .apply(model: nn.Module, ctx) -> nn.Module   (registered as "transfer", stage "torch";
        trains on ctx.calib + ctx.calib_labels, validates on ctx.eval_inputs + ctx.eval_labels)

`head` is the dotted name of the final nn.Linear to replace (default: the last nn.Linear in the
model). The backbone's parameters are frozen and it runs in eval mode, so BatchNorm statistics and
dropout stay as they were trained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)

if TYPE_CHECKING:
    from torch import nn


@dataclass
class TransferResult:
    """The adapted model, its validation accuracy, and how many parameters were trained vs frozen."""

    model: nn.Module
    accuracy: float
    trainable_params: int
    frozen_params: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for reports."""
        return {
            "accuracy": self.accuracy,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "epochs_run": self.epochs_run,
        }


def find_head(model: nn.Module, head: Optional[str] = None) -> str:
    """Dotted name of the classification head: `head` if given (checked), else the last nn.Linear."""
    from torch import nn

    modules = dict(model.named_modules())
    if head is not None:
        if not isinstance(modules.get(head), nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise CompressionError(
                f"{head!r} is not an nn.Linear of the model; linear layers: {', '.join(linears) or 'none'}"
            )
        return head
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linears:
        raise CompressionError("the model has no nn.Linear head to replace: name one with head=")
    return linears[-1]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def transfer_learn(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    head: Optional[str] = None,
    x_val: Optional[np.ndarray] = None,
    y_val: Optional[np.ndarray] = None,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float, float], None]] = None,
) -> TransferResult:
    """A copy of `model` with a frozen backbone and a new `num_classes` head trained on (x, y)."""
    import torch
    from torch import nn

    if num_classes < 2:
        raise CompressionError(f"num_classes must be at least 2, got {num_classes}")
    if y is None or len(y) != len(x) or len(x) == 0:
        raise CompressionError("transfer learning needs labelled samples: one label per input")
    labels = np.asarray(y, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CompressionError(f"labels span {labels.min()}..{labels.max()} but num_classes is {num_classes}")
    if x_val is None or y_val is None:
        x_val, y_val = x, y

    adapted = copy.deepcopy(model).eval()
    head_name = find_head(adapted, head)
    old = adapted.get_submodule(head_name)
    if not isinstance(old, nn.Linear):  # find_head checked it; this narrows the type
        raise CompressionError(f"{head_name!r} is not an nn.Linear")
    torch.manual_seed(seed)
    for p in adapted.parameters():
        p.requires_grad_(False)
    new_head = nn.Linear(old.in_features, num_classes)
    replace_module(adapted, head_name, new_head)
    trainable = sum(p.numel() for p in new_head.parameters())
    frozen = sum(p.numel() for p in adapted.parameters()) - trainable

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(labels)
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    optimizer = torch.optim.Adam(new_head.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    def validate() -> float:
        with torch.no_grad():
            return float((adapted(xv).argmax(1) == yv).float().mean())

    best, best_state, stale, history = validate(), copy.deepcopy(new_head.state_dict()), 0, []
    epoch = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(adapted(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        acc = validate()
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_accuracy": acc})
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt), acc)
        if acc > best:
            best, best_state, stale = acc, copy.deepcopy(new_head.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    new_head.load_state_dict(best_state)
    for p in adapted.parameters():
        p.requires_grad_(True)
    return TransferResult(adapted.eval(), best, trainable, frozen, epoch, history)


@COMPRESSORS.register("transfer")
class TransferStep(CompressionStep):
    """Freeze the backbone and train a new head on ctx.calib / ctx.calib_labels."""

    name = "transfer"
    requires = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[TransferResult] = None

    def describe(self) -> dict[str, Any]:
        """Parameters and the accuracy the new head reached."""
        out: dict[str, Any] = {"step": self.name, "params": dict(self.params)}
        if self.result is not None:
            out["result"] = self.result.summary()
        return out

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """Return the adapted copy of `model`; raises CompressionError without labelled data."""
        if "num_classes" not in self.params:
            raise CompressionError("the transfer step needs num_classes=<number of new classes>")
        if not ctx.calib or ctx.calib_labels is None:
            raise CompressionError("transfer learning needs labelled training data (ctx.calib + labels)")
        epochs = int(self.params.get("epochs", 30))
        x_val = next(iter(ctx.eval_inputs.values())) if ctx.eval_inputs else None
        self.result = transfer_learn(
            model,
            next(iter(ctx.calib.values())),
            ctx.calib_labels,
            num_classes=int(self.params["num_classes"]),
            head=self.params.get("head"),
            x_val=x_val,
            y_val=ctx.eval_labels if x_val is not None else None,
            epochs=epochs,
            patience=int(self.params.get("patience", 5)),
            on_epoch=lambda e, loss, acc: ctx.report(
                f"transfer epoch {e} loss {loss:.4f} acc {acc:.3f}", e / epochs
            ),
        )
        return self.result.model
