"""Transfer learning and fine-tuning: train a model's head, its last N layers or all of it on labelled data.

Public API:
    finetune_model(model, x, y, *, task="classification", train="head", num_classes=None,
                   x_val=None, y_val=None, epochs=30, lr=1e-3, batch_size=64, patience=5, seed=0,
                   on_epoch=None, on_batch=None) -> TransferResult
        a trained copy; `train` is "head", "last:N" or "full"; with `num_classes` (classification)
        the head is replaced by a new nn.Linear with that many outputs.
    transfer_learn(model, x, y, *, num_classes, head=None, ...) -> TransferResult
        the classic recipe: frozen backbone, new classification head.
    trainable_layers(model, batch) -> list[str]: layers with parameters in execution order.
    TransferStep(num_classes=N, head=None, epochs=30, patience=5, task=..., train="head")
        .apply(model: nn.Module, ctx) -> nn.Module   (registered as "transfer", stage "torch")

`x` is one array, a list of arrays in argument order, or a dict name → array (token ids stay int64).
The "layers" of `last:N` are the modules that own parameters directly (Linear, Conv, LayerNorm,
Embedding, …) and that the outputs depend on, ordered by when they first run in a forward pass; the head is the last of them, or
the last nn.Linear with `num_classes`. Frozen parts run in eval mode (BatchNorm statistics and
dropout as trained); with `train="full"` the whole model trains in train mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.distill import context_data, context_task
from edgefleet.sdk.compress.tasks import (
    Batch,
    ModelInputs,
    Targets,
    as_batch,
    check_task,
    clone_model,
    forward,
    metric_name,
    reported,
    run_batched,
    set_mode,
    supervised_loss,
    take_targets,
    target_tensors,
    validation_score,
)
from edgefleet.sdk.compress.training import BatchCallback, fit

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class TransferResult:
    """The adapted model, its validation metric, and how many parameters were trained vs frozen."""

    model: nn.Module
    value: float
    trainable_params: int
    frozen_params: int
    epochs_run: int
    metric: str = "accuracy"
    trained_layers: list[str] = field(default_factory=list)
    initial_value: Optional[float] = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """The validation metric (accuracy for classification with labels)."""
        return self.value

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for reports."""
        return {
            "metric": self.metric,
            "value": self.value,
            self.metric: self.value,  # e.g. "accuracy": the key reports of the first version read
            "before": self.initial_value,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "trained_layers": list(self.trained_layers),
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


def trainable_layers(model: nn.Module, batch: Batch) -> list[str]:
    """Modules owning parameters directly, in the order they first run on `batch` (see module doc)."""
    import torch

    owners = {
        name: module
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    order: list[str] = []
    handles: list[Any] = []
    try:
        for name, module in owners.items():
            handles.append(module.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name)))
    except RuntimeError:
        # TorchScript modules take no hooks: their definition order is the best order known.
        for handle in handles:
            handle.remove()
        handles = []
    try:
        with torch.enable_grad():
            outs = forward(set_mode(model), batch.take(slice(0, 1)))
    finally:
        for handle in handles:
            handle.remove()
    seen: list[str] = []
    for name in order:
        if name not in seen:
            seen.append(name)
    # Modules whose parameters are used without calling them (tied weights) never fire a hook.
    seen.extend(name for name in owners if name not in seen and name)
    # Only layers the outputs depend on can learn (BERT's pooler runs last but feeds no output here).
    params = {name: [p for p in owners[name].parameters(recurse=False) if p.requires_grad] for name in seen}
    flat = [p for name in seen for p in params[name]]
    total = sum(o.float().sum() for o in outs if o.requires_grad)
    if not flat or not isinstance(total, torch.Tensor):
        return seen
    grads = iter(torch.autograd.grad(total, flat, allow_unused=True))
    used = {name: [next(grads) is not None for _ in params[name]] for name in seen}
    return [name for name in seen if any(used[name]) or not params[name]]


def parse_train(spec: str) -> tuple[str, int]:
    """("head", 1) / ("last", N) / ("full", 0) from "head", "last:N", "full"."""
    text = spec.strip().lower()
    if text in ("head", "full"):
        return text, 1 if text == "head" else 0
    match = re.fullmatch(r"last:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return "last", int(match.group(1))
    raise CompressionError(f"--train {spec!r} is not understood; use head, last:N (N ≥ 1) or full")


def finetune_model(
    model: nn.Module,
    x: ModelInputs,
    y: Targets,
    *,
    task: str = "classification",
    train: str = "head",
    num_classes: Optional[int] = None,
    head: Optional[str] = None,
    x_val: Optional[ModelInputs] = None,
    y_val: Targets = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float, float], None]] = None,
    on_batch: Optional[BatchCallback] = None,
) -> TransferResult:
    """A copy of `model` with the chosen layers trained on (x, y) for `task` (see module doc)."""
    import torch
    from torch import nn

    check_task(task)
    mode, count = parse_train(train)
    batch = as_batch(x)
    if y is None:
        raise CompressionError("fine-tuning needs labelled samples: save the labels as 'y' in the .npz")
    targets = target_tensors(task, y, len(batch))
    assert targets is not None
    if x_val is None or y_val is None:
        val, val_targets = batch, targets
    else:
        val = as_batch(x_val)
        val_targets = target_tensors(task, y_val, len(val)) or targets
    adapted = set_mode(clone_model(model))
    torch.manual_seed(seed)
    replaced: Optional[str] = None
    if num_classes is not None:
        if task != "classification":
            raise CompressionError("num_classes replaces a classification head; it does not apply to " + task)
        if num_classes < 2:
            raise CompressionError(f"num_classes must be at least 2, got {num_classes}")
        labels = targets[0]
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise CompressionError(
                f"labels span {int(labels.min())}..{int(labels.max())} but num_classes is {num_classes}"
            )
        if isinstance(adapted, torch.jit.ScriptModule):
            raise CompressionError(
                "a TorchScript model's head cannot be replaced (num_classes): fine-tune the Python "
                "nn.Module, or train its existing head with --train head"
            )
        replaced = find_head(adapted, head)
        old = adapted.get_submodule(replaced)
        assert isinstance(old, nn.Linear)  # find_head checked it
        replace_module(adapted, replaced, nn.Linear(old.in_features, num_classes))
    try:
        layers = trainable_layers(adapted, batch)
    except Exception as exc:
        raise CompressionError(f"the model cannot run on these inputs: {exc}") from exc
    if mode == "full":
        chosen = layers
    elif mode == "head" and (replaced is not None or head is not None):
        chosen = [replaced or find_head(adapted, head)]
    else:
        if count > len(layers):
            raise CompressionError(
                f"--train last:{count} but the model has {len(layers)} layers with parameters"
            )
        chosen = layers[-count:]
    for p in adapted.parameters():
        p.requires_grad_(False)
    params = []
    modules = dict(adapted.named_modules())  # ScriptModules have no get_submodule
    for name in chosen:
        for p in modules[name].parameters(recurse=False):
            p.requires_grad_(True)
            params.append(p)
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in adapted.parameters()) - trainable

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        part = batch.take(idx)
        return supervised_loss(task, forward(adapted, part), take_targets(targets, idx) or [], part.mask)

    def validate() -> float:
        return validation_score(task, run_batched(adapted, val), val_targets, None, mask=val.mask)

    result = fit(
        adapted,
        params,
        len(batch),
        batch_loss,
        validate,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
        train_mode=mode == "full",
        on_epoch=on_epoch,
        on_batch=on_batch,
    )
    for p in adapted.parameters():
        p.requires_grad_(True)
    return TransferResult(
        set_mode(adapted),
        reported(task, True, result.best_score),
        trainable,
        frozen,
        result.epochs_run,
        metric=metric_name(task, True),
        trained_layers=chosen,
        initial_value=reported(task, True, result.initial_score),
        history=result.history,
    )


def transfer_learn(
    model: nn.Module,
    x: ModelInputs,
    y: Any,
    *,
    num_classes: int,
    head: Optional[str] = None,
    x_val: Optional[ModelInputs] = None,
    y_val: Any = None,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float, float], None]] = None,
) -> TransferResult:
    """A copy of `model` with a frozen backbone and a new `num_classes` head trained on (x, y)."""
    return finetune_model(
        model,
        x,
        y,
        task="classification",
        train="head",
        num_classes=num_classes,
        head=head,
        x_val=x_val,
        y_val=y_val,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
        on_epoch=on_epoch,
    )


@COMPRESSORS.register("transfer")
class TransferStep(CompressionStep):
    """Train a new head (num_classes) or the chosen layers (`train`) on the context's labelled data."""

    name = "transfer"
    requires = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[TransferResult] = None

    def describe(self) -> dict[str, Any]:
        """Parameters and the metric the trained layers reached."""
        out: dict[str, Any] = {"step": self.name, "params": dict(self.params)}
        if self.result is not None:
            out["result"] = self.result.summary()
        return out

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """Return the adapted copy of `model`; raises CompressionError without labelled data."""
        task = context_task(self.params, ctx)
        if task == "classification" and "num_classes" not in self.params and "train" not in self.params:
            raise CompressionError("the transfer step needs num_classes=<number of new classes> or train=")
        x, y, x_val, y_val = context_data(ctx)
        if y is None:
            raise CompressionError("transfer learning needs labelled training data (ctx.calib + labels)")
        epochs = int(self.params.get("epochs", 30))
        num_classes = self.params.get("num_classes")
        self.result = finetune_model(
            model,
            x,
            y,
            task=task,
            train=str(self.params.get("train", "head")),
            num_classes=int(num_classes) if num_classes is not None else None,
            head=self.params.get("head"),
            x_val=x_val,
            y_val=y_val,
            epochs=epochs,
            lr=float(self.params.get("lr", 3e-3)),
            patience=int(self.params.get("patience", 5)),
            on_epoch=lambda e, loss, val: ctx.report(
                f"transfer epoch {e} loss {loss:.4f} val {val:.4f}", e / epochs
            ),
        )
        return self.result.model
