"""Students for distillation: a shallower copy of a transformer encoder, a narrower copy of anything else.

Public API:
    make_student(model, example_inputs=None, *, width=0.5, keep=None) -> nn.Module
        transformer encoders (a model with attention and a ModuleList of encoder layers): a copy that
        keeps every other layer, counted from the last (6 layers → 1, 3, 5; the last layer feeds the
        head, so keeping it keeps the output scale), as DistilBERT initialises its student; `keep`
        lists the layer indices instead. Any other model: a copy whose conv/linear layers are
        `width` as wide (structured pruning by L1 magnitude, output layers intact; needs
        `example_inputs` to trace). The teacher is never modified.
    encoder_layers(model) -> (dotted name, nn.ModuleList) | None
    StudentStep(width=0.5, keep=None, epochs=30, ...), registered as "student" (stage "torch"):
        make_student + distill_student from the incoming model on ctx's data (the build's `--student`
        candidate when the user gives no student of their own).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional, Sequence

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.distill import DistillResult, context_data, context_task, distill
from edgefleet.sdk.compress.prune import channel_prune, count_params, has_attention
from edgefleet.sdk.compress.tasks import ModelInputs, clone_model

if TYPE_CHECKING:
    from torch import nn


def encoder_layers(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """The longest ModuleList whose items are alike and contain attention (the encoder's layers)."""
    from torch import nn

    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(item) for item in module}
        if len(kinds) != 1 or not all(has_attention(item) for item in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def _every_other(count: int) -> list[int]:
    return sorted(range(count - 1, -1, -2))


def shallow_copy(model: nn.Module, keep: Optional[Sequence[int]] = None) -> nn.Module:
    """A copy of a transformer encoder with only the `keep` layers (default: every other one)."""
    from torch import nn

    found = encoder_layers(model)
    if found is None:
        raise CompressionError(
            "no list of encoder layers with attention found: a shallower copy needs a transformer encoder"
        )
    name, layers = found
    indices = list(keep) if keep is not None else _every_other(len(layers))
    if not indices or any(not 0 <= i < len(layers) for i in indices):
        raise CompressionError(f"keep must list layer indices within 0..{len(layers) - 1}, got {indices}")
    student = copy.deepcopy(model)
    kept = nn.ModuleList([copy.deepcopy(layers[i]) for i in indices])
    parent_name, _, child = name.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    setattr(parent, child, kept)
    if hasattr(parent, "num_layers"):  # nn.TransformerEncoder iterates self.layers but keeps a count
        setattr(parent, "num_layers", len(kept))  # noqa: B010 (a plain int attribute, not a module)
    for module in student.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(kept)  # Hugging Face models size caches/masks from it
    return student.eval()


def make_student(
    model: nn.Module,
    example_inputs: Optional[ModelInputs] = None,
    *,
    width: float = 0.5,
    keep: Optional[Sequence[int]] = None,
) -> nn.Module:
    """A smaller copy of `model` to distil into (see module doc)."""
    if encoder_layers(model) is not None:
        return shallow_copy(model, keep)
    if not 0.0 < width < 1.0:
        raise CompressionError(f"width must be within 0..1 (exclusive), got {width}")
    if example_inputs is None:
        raise CompressionError("a narrower student needs example inputs to trace the model")
    student = copy.deepcopy(model).eval()
    channel_prune(student, example_inputs, 1.0 - width, scope="all")
    return student


@COMPRESSORS.register("student")
class StudentStep(CompressionStep):
    """Make a student from the incoming model (`make_student`) and distil into it on ctx's data."""

    name = "student"
    requires = Requirements(stage="torch")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.result: Optional[DistillResult] = None
        self.params_before = self.params_after = 0

    def describe(self) -> dict[str, Any]:
        """Parameters, student size and the distillation result."""
        params = {k: v for k, v in self.params.items() if k != "student"}
        out: dict[str, Any] = {"step": self.name, "params": params}
        if self.params_after:
            out["params_before"], out["params_after"] = self.params_before, self.params_after
        if self.result is not None:
            out["result"] = self.result.summary()
        return out

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """The distilled student (a given `student=` module, else one from make_student)."""
        from torch import nn

        x, y, x_val, y_val = context_data(ctx)
        given = self.params.get("student")
        if given is not None and not isinstance(given, nn.Module):
            raise CompressionError("student= must be an nn.Module")
        student = (
            clone_model(given)  # TorchScript: a deepcopy's parameters could not be trained
            if given is not None
            else make_student(
                model, x, width=float(self.params.get("width", 0.5)), keep=self.params.get("keep")
            )
        )
        self.params_before, self.params_after = count_params(model)[0], count_params(student)[0]
        epochs = int(self.params.get("epochs", 30))
        self.result = distill(
            model,
            student,
            x,
            y,
            task=context_task(self.params, ctx),
            x_val=x_val,
            y_val=y_val,
            temperature=float(self.params.get("temperature", 4.0)),
            alpha=float(self.params.get("alpha", 0.7)),
            epochs=epochs,
            lr=float(self.params.get("lr", 1e-3)),
            patience=int(self.params.get("patience", 5)),
            on_epoch=lambda e, loss, val: ctx.report(
                f"student epoch {e} loss {loss:.4f} val {val:.4f}", e / epochs
            ),
        )
        return self.result.student
