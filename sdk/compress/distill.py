"""Knowledge distillation: teach a student classifier from a teacher's temperature-softened outputs.

Public API:
    distill(teacher, student, x, y=None, *, x_val=None, y_val=None, temperature=4.0, alpha=0.7,
            epochs=30, lr=3e-3, batch_size=64, patience=5, seed=0, on_epoch=None) -> DistillResult
    DistillStep(student=<nn.Module>, temperature=4.0, alpha=0.7, epochs=30, patience=5)
        .apply(teacher: nn.Module, ctx) -> nn.Module   (registered as "distill", stage "torch")

The loss is α·T²·KL(softmax(s/T) ‖ softmax(t/T)) + (1−α)·CE(s, y) (Hinton et al.); without labels it is
the distillation term alone. The best student on the validation data (accuracy with labels, else the
distillation loss) is kept and training stops after `patience` epochs without improvement.
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
    import torch
    from torch import nn

EpochCallback = Callable[[int, float, float], None]


@dataclass
class DistillResult:
    """The trained student, how it compares with the teacher, and the per-epoch history."""

    student: nn.Module
    teacher_metric: Optional[float]
    student_metric: Optional[float]
    metric: str  # "accuracy" with validation labels, "kd_loss" without
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for reports."""
        return {
            "metric": self.metric,
            "teacher": self.teacher_metric,
            "student": self.student_metric,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
        }


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Model outputs on x in eval mode, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton's distillation loss; the T² factor keeps soft-target gradients on the hard-label scale."""
    import torch.nn.functional as F

    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def _check_data(x: np.ndarray, y: Optional[np.ndarray], what: str) -> None:
    if not isinstance(x, np.ndarray) or x.ndim < 2 or len(x) == 0:
        raise CompressionError(f"{what} inputs must be a non-empty array of samples [N, ...]")
    if y is not None and len(y) != len(x):
        raise CompressionError(f"{what}: {len(y)} labels for {len(x)} samples; give one per sample")


def distill(
    teacher: nn.Module,
    student: nn.Module,
    x: np.ndarray,
    y: Optional[np.ndarray] = None,
    *,
    x_val: Optional[np.ndarray] = None,
    y_val: Optional[np.ndarray] = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    on_epoch: Optional[EpochCallback] = None,
) -> DistillResult:
    """Train `student` (in place) to imitate `teacher` on x (and fit y when given); see module doc."""
    import torch

    if temperature <= 0:
        raise CompressionError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise CompressionError(f"alpha must be within 0..1, got {alpha}")
    if epochs < 1 or patience < 1:
        raise CompressionError("epochs and patience must be at least 1")
    _check_data(x, y, "training")
    if x_val is None:
        x_val, y_val = x, y
    _check_data(x_val, y_val, "validation")

    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64)) if y_val is not None else None
    teacher_train = _logits(teacher, xt)
    teacher_val = _logits(teacher, xv)
    try:
        student_out = _logits(student, xv[:1])
    except Exception as exc:
        raise CompressionError(f"the student cannot run on these inputs: {exc}") from exc
    if student_out.shape[1:] != teacher_val.shape[1:]:
        raise CompressionError(
            f"student outputs {tuple(student_out.shape[1:])} but the teacher outputs "
            f"{tuple(teacher_val.shape[1:])}: give the student the teacher's number of classes"
        )

    def validate() -> float:
        logits = _logits(student, xv)
        if yv is not None:
            return float((logits.argmax(1) == yv).float().mean())
        return -float(kd_loss(logits, teacher_val, None, temperature, alpha))

    metric = "accuracy" if yv is not None else "kd_loss"
    teacher_metric = float((teacher_val.argmax(1) == yv).float().mean()) if yv is not None else 0.0
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_score = validate()
    best_state = copy.deepcopy(student.state_dict())
    history: list[dict[str, float]] = []
    stale = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        student.train()
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = kd_loss(
                student(xt[idx]),
                teacher_train[idx],
                yt[idx] if yt is not None else None,
                temperature,
                alpha,
            )
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        score = validate()
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val": score})
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt), score)
        if score > best_score:
            best_score, best_state, stale = score, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    student.load_state_dict(best_state)
    student.eval()
    student_metric = best_score if metric == "accuracy" else -best_score
    return DistillResult(
        student=student,
        teacher_metric=teacher_metric if metric == "accuracy" else 0.0,
        student_metric=student_metric,
        metric=metric,
        epochs_run=epoch,
        stopped_early=epoch < epochs,
        history=history,
    )


@COMPRESSORS.register("distill")
class DistillStep(CompressionStep):
    """Distil the incoming (teacher) model into the `student` given as a parameter.

    Trains on ctx.calib's first array (+ ctx.calib_labels) and validates on ctx.eval_inputs
    (+ ctx.eval_labels) when present.
    """

    name = "distill"
    requires = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[DistillResult] = None

    def describe(self) -> dict[str, Any]:
        """Parameters (without the student object) and the accuracies reached."""
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
        if not ctx.calib:
            raise CompressionError("distillation needs training inputs in ctx.calib")
        x = next(iter(ctx.calib.values()))
        x_val = next(iter(ctx.eval_inputs.values())) if ctx.eval_inputs else None
        y_val = ctx.eval_labels if x_val is not None else None
        epochs = int(self.params.get("epochs", 30))
        self.result = distill(
            model,
            student,
            x,
            ctx.calib_labels,
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
