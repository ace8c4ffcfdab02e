"""Knowledge distillation: teach a student from a teacher's outputs, for any task and any number of inputs.

Public API:
    distill(teacher, student, x, y=None, *, task="classification", x_val=None, y_val=None,
            temperature=4.0, alpha=0.7, epochs=30, lr=3e-3, batch_size=64, patience=5, seed=0,
            on_epoch=None, on_batch=None) -> DistillResult
    distill_student(teacher, student, data, task, **options) -> DistillResult
        `data` is a dict input name → array (labels under "y", CTC lengths "y_lengths", detection
        targets "y_0", "y_1", …) or a (inputs, targets) pair; the build's `--student` candidate.
    kd_loss(student_logits, teacher_logits, labels, temperature, alpha)   (classification)
    DistillStep(student=<nn.Module>, task=..., temperature=4.0, alpha=0.7, epochs=30, patience=5)
        .apply(teacher: nn.Module, ctx) -> nn.Module   (registered as "distill", stage "torch")

`x` is one array, a list of arrays in argument order, or a dict name → array (ids stay int64). The
loss is α·distillation + (1−α)·supervised when targets are given, else distillation alone; the
per-task terms are in `tasks.py` (Hinton's T²-scaled KL for classification, per-frame KL for CTC,
variance-normalised MSE on raw head outputs for detection, cosine for embeddings). The best student
on the validation data is kept; training stops after `patience` epochs without improvement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.tasks import (
    Batch,
    ModelInputs,
    Targets,
    as_batch,
    check_task,
    clone_model,
    combined_loss,
    forward,
    metric_name,
    reported,
    run_batched,
    set_mode,
    take_targets,
    target_tensors,
    validation_score,
)
from edgefleet.sdk.compress.training import BatchCallback, EpochCallback, fit

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class DistillResult:
    """The trained student, how it compares with the teacher, and the per-epoch history."""

    student: nn.Module
    teacher_metric: Optional[float]
    student_metric: Optional[float]
    metric: str  # accuracy / cosine (higher is better), loss / kd_loss (lower is better)
    epochs_run: int
    stopped_early: bool
    task: str = "classification"
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for reports."""
        return {
            "task": self.task,
            "metric": self.metric,
            "teacher": self.teacher_metric,
            "student": self.student_metric,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
        }


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton's distillation loss; the T² factor keeps soft-target gradients on the hard-label scale."""
    return combined_loss(
        "classification",
        [student_logits],
        [teacher_logits],
        [labels] if labels is not None else None,
        temperature=temperature,
        alpha=alpha,
    )


def _same_outputs(student: list[torch.Tensor], teacher: list[torch.Tensor], task: str) -> None:
    if len(student) < len(teacher) and task == "detection":
        raise CompressionError(f"the student has {len(student)} outputs, the teacher {len(teacher)}")
    s, t = student[0], teacher[0]
    if task == "embedding":
        if s.shape[-1] != t.shape[-1]:
            raise CompressionError(
                f"student embeddings have {s.shape[-1]} dimensions, the teacher's {t.shape[-1]}: "
                "give the student the teacher's embedding size"
            )
        return
    for i, (so, to) in enumerate(zip(student, teacher)):
        if so.shape[1:] != to.shape[1:] and not (task == "ctc" and so.shape[-1] == to.shape[-1]):
            what = "number of classes" if task == "classification" else "output layout"
            raise CompressionError(
                f"student output {i} is {tuple(so.shape[1:])} but the teacher's is {tuple(to.shape[1:])}: "
                f"give the student the teacher's {what}"
            )


def distill(
    teacher: nn.Module,
    student: nn.Module,
    x: ModelInputs,
    y: Targets = None,
    *,
    task: str = "classification",
    x_val: Optional[ModelInputs] = None,
    y_val: Targets = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    on_epoch: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
) -> DistillResult:
    """Train `student` (in place) to imitate `teacher` on x (and fit y when given); see module doc."""
    check_task(task)
    if temperature <= 0:
        raise CompressionError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise CompressionError(f"alpha must be within 0..1, got {alpha}")
    train = as_batch(x)
    targets = target_tensors(task, y, len(train))
    if x_val is None:
        val, val_targets = train, targets
    else:
        val = as_batch(x_val)
        val_targets = target_tensors(task, y_val, len(val))
    teacher_train = run_batched(set_mode(teacher), train)
    teacher_val = run_batched(teacher, val)
    try:
        set_mode(student)
        probe = run_batched(student, val.take(slice(0, 2)))
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"the student cannot run on these inputs: {exc}") from exc
    _same_outputs(probe, teacher_val, task)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        part = train.take(idx)
        return combined_loss(
            task,
            forward(student, part),
            [t[idx] for t in teacher_train],
            take_targets(targets, idx),
            temperature=temperature,
            alpha=alpha,
            mask=part.mask,
        )

    def validate() -> float:
        outs = run_batched(student, val)
        return validation_score(task, outs, val_targets, teacher_val, temperature=temperature, mask=val.mask)

    has_targets = val_targets is not None
    teacher_score = (
        validation_score(task, teacher_val, val_targets, teacher_val, temperature=temperature, mask=val.mask)
        if has_targets or task == "embedding"
        else 0.0
    )
    result = fit(
        student,
        list(student.parameters()),
        len(train),
        batch_loss,
        validate,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
        on_epoch=on_epoch,
        on_batch=on_batch,
    )
    return DistillResult(
        student=student,
        teacher_metric=reported(task, has_targets, teacher_score),
        student_metric=reported(task, has_targets, result.best_score),
        metric=metric_name(task, has_targets),
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
        task=task,
        history=result.history,
    )


def split_data(data: Any) -> tuple[ModelInputs, Targets]:
    """(inputs, targets) from a dict with label keys ("y", "y_*"), a Dataset, or an (x, y) pair."""
    if isinstance(data, tuple) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "inputs") and hasattr(data, "labels"):  # the build's Dataset
        return data.inputs, data.labels
    if isinstance(data, Mapping):
        inputs = {k: v for k, v in data.items() if k != "y" and not str(k).startswith("y_")}
        labels = {k: v for k, v in data.items() if k == "y" or str(k).startswith("y_")}
        if not labels:
            return inputs, None
        if set(labels) == {"y"}:
            return inputs, labels["y"]
        if "y_lengths" in labels:
            return inputs, labels
        return inputs, [labels[k] for k in sorted(labels, key=_target_order)]
    if isinstance(data, np.ndarray):
        return data, None
    raise CompressionError(
        f"training data of type {type(data).__name__} is not supported; give a dict name → array "
        "(labels as 'y') or an (inputs, labels) pair"
    )


def _target_order(key: str) -> tuple[int, str]:
    suffix = key[2:] if key.startswith("y_") else ""
    return (int(suffix), key) if suffix.isdigit() else (-1 if key == "y" else 10**6, key)


def distill_student(
    teacher: nn.Module,
    student: nn.Module,
    data: Any,
    task: str = "classification",
    *,
    val_data: Any = None,
    **options: Any,
) -> DistillResult:
    """Distil `teacher` into `student` on `data` (see module doc); options go to `distill`."""
    x, y = split_data(data)
    x_val, y_val = split_data(val_data) if val_data is not None else (None, None)
    return distill(teacher, student, x, y, task=task, x_val=x_val, y_val=y_val, **options)


def context_data(ctx: CompressionContext) -> tuple[dict[str, np.ndarray], Any, Any, Any]:
    """(train inputs, train targets, eval inputs or None, eval targets) from a compression context.

    Structured targets (CTC lengths, detection outputs) travel in ctx.options["calib_targets"] /
    ["eval_targets"]; plain class ids in ctx.calib_labels / ctx.eval_labels.
    """
    if not ctx.calib:
        raise CompressionError("this step needs training inputs in ctx.calib (the build's --calib data)")
    y = ctx.options.get("calib_targets", ctx.calib_labels)
    x_val = ctx.eval_inputs or None
    y_val = ctx.options.get("eval_targets", ctx.eval_labels) if x_val is not None else None
    return ctx.calib, y, x_val, y_val


def context_task(params: dict[str, Any], ctx: CompressionContext) -> str:
    """The step's task: its own parameter, else the build's (ctx.options["task"]), else classification."""
    return check_task(str(params.get("task") or ctx.options.get("task") or "classification"))


@COMPRESSORS.register("distill")
class DistillStep(CompressionStep):
    """Distil the incoming (teacher) model into the `student` given as a parameter.

    Trains on every input of ctx.calib (+ targets) and validates on ctx.eval_inputs when present.
    """

    name = "distill"
    requires = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[DistillResult] = None

    def describe(self) -> dict[str, Any]:
        """Parameters (without the student object) and the metrics reached."""
        params = {k: v for k, v in self.params.items() if k != "student"}
        out: dict[str, Any] = {"step": self.name, "params": params}
        if self.result is not None:
            out["result"] = self.result.summary()
        return out

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """Return the student trained from `model`; raises CompressionError without a student/data."""
        from torch import nn

        student = self.params.get("student")
        if not isinstance(student, nn.Module):
            raise CompressionError("the distill step needs student=<nn.Module> to train")
        task = context_task(self.params, ctx)
        x, y, x_val, y_val = context_data(ctx)
        epochs = int(self.params.get("epochs", 30))
        self.result = distill(
            model,
            clone_model(student),
            x,
            y,
            task=task,
            x_val=x_val,
            y_val=y_val,
            temperature=float(self.params.get("temperature", 4.0)),
            alpha=float(self.params.get("alpha", 0.7)),
            epochs=epochs,
            lr=float(self.params.get("lr", 3e-3)),
            patience=int(self.params.get("patience", 5)),
            on_epoch=lambda e, loss, val: ctx.report(
                f"distill epoch {e} loss {loss:.4f} val {val:.4f}", e / epochs
            ),
        )
        return self.result.student


__all__ = ["Batch", "DistillResult", "DistillStep", "distill", "distill_student", "kd_loss"]
