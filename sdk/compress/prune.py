"""Pruning: global magnitude (unstructured) and structured channel pruning that really removes channels.

Public API:
    magnitude_prune(model, amount, *, ratios=None) -> PruneStats
        zero the smallest weights: one global threshold over all conv/linear layers, or the given
        per-layer ratios (e.g. from `pruning_ratios(torch_sensitivity(...), amount)`).
    channel_prune(model, example_inputs, amount, *, ratios=None, ignored=None, scores=None,
                  scope="auto") -> PruneStats
        remove whole output channels with torch-pruning (dependent layers shrink with them); the
        layers that produce the model's outputs are kept intact. `example_inputs` are all the
        model's inputs (array, list in argument order, or dict name → array; ids stay int64): the
        dependency graph is traced with them, which is what lets conv → flatten → Linear and
        multi-input transformers prune. `scores` (from `channel_scores`) pick which channels go.
        scope "auto" prunes only the feed-forward (MLP) intermediate channels of a model with
        attention, every conv/linear otherwise; "mlp" / "all" force one or the other.
    channel_scores(model, inputs, targets=None, *, task, layers=None) -> (dict[layer, scores], method)
        per-output-channel first-order Taylor estimates |ΔL| of removing each channel (channels.py,
        re-exported here with output_layers, has_attention, mlp_layers, accumulate_gradients).
    finetune(pruned, teacher, x, y=None, *, task="classification", epochs=10, ...) -> DistillResult
        short recovery training, distilling from the unpruned model (and labels when given).
    MagnitudePruneStep / ChannelPruneStep, registered as "prune-magnitude" / "prune-channels"
        (stage "torch"), params: amount=0.5, by_sensitivity=True, finetune_epochs=0, task, scope;
        .apply(model: nn.Module, ctx) -> nn.Module (a pruned copy; the input model is untouched).
        `.sensitivity` holds the SensitivityTable the ratios came from (for the build's report).

Attention heads are never pruned: torch-pruning can remove whole heads only when told each
attention module's head count and layout, and a wrong guess breaks the reshape into heads; the
residual stream (hidden size) is kept because every layer, LayerNorm and the embeddings share it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.channels import (
    GRAD_SAMPLES,
    accumulate_gradients,
    channel_scores,
    example_batch,
    flatten_feeders,
    has_attention,
    mlp_layers,
    output_layers,
    taylor_importance,
)
from edgefleet.sdk.compress.distill import DistillResult, context_data, context_task, distill
from edgefleet.sdk.compress.sensitivity import (
    SensitivityTable,
    layer_weight,
    prunable_layers,
    pruning_ratios,
    torch_sensitivity,
)
from edgefleet.sdk.compress.tasks import (
    Batch,
    ModelInputs,
    Targets,
    forward,
)

if TYPE_CHECKING:
    from torch import nn

Scope = Literal["auto", "all", "mlp"]


@dataclass(frozen=True)
class PruneStats:
    """Parameter counts and sparsity before and after pruning, plus the ratios used per layer."""

    params_before: int
    params_after: int
    zeros_before: int
    zeros_after: int
    ratios: dict[str, float]

    @property
    def sparsity(self) -> float:
        """Fraction of remaining parameters that are zero."""
        return self.zeros_after / self.params_after if self.params_after else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "sparsity": self.sparsity}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters exactly zero)."""
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p.detach() == 0).sum())
    return total, zeros


def _check_amount(amount: float) -> None:
    if not 0.0 <= amount < 1.0:
        raise CompressionError(f"pruning amount must be within 0..1 (exclusive), got {amount}")


def magnitude_prune(
    model: nn.Module, amount: float, *, ratios: Optional[dict[str, float]] = None
) -> PruneStats:
    """Zero the smallest-magnitude conv/linear weights in place (see module doc); returns stats."""
    import torch
    from torch.nn.utils import prune

    _check_amount(amount)
    before = count_params(model)
    layers = prunable_layers(model)
    if not layers:
        raise CompressionError("the model has no convolution or linear layers to prune")
    if ratios is None:
        prune.global_unstructured(
            [(module, "weight") for module in layers.values()],
            pruning_method=prune.L1Unstructured,
            amount=amount,
        )
        used = {}
        for name, module in layers.items():
            prune.remove(module, "weight")
            used[name] = float((layer_weight(module) == 0).float().mean())
    else:
        unknown = set(ratios) - set(layers)
        if unknown:
            raise CompressionError(f"ratios name layers the model does not have: {sorted(unknown)}")
        used = {}
        for name, ratio in ratios.items():
            module = layers[name]
            prune.l1_unstructured(module, "weight", amount=float(ratio))
            prune.remove(module, "weight")
            used[name] = float(ratio)
    with torch.no_grad():
        after = count_params(model)
    return PruneStats(before[0], after[0], before[1], after[1], used)


class _ShapeError(CompressionError):
    """Pruning left a model that does not run; `original` is an untouched copy to restore."""

    def __init__(self, message: str, original: nn.Module) -> None:
        super().__init__(message)
        self.original = original


def _adopt(model: nn.Module, source: nn.Module) -> None:
    """Make `model` (in place, same object) hold `source`'s submodules, parameters and buffers."""
    model.__dict__.update({k: v for k, v in source.__dict__.items() if k.startswith("_") or k == "training"})


def _pruned_in_place(
    model: nn.Module, example: Batch, amount: float, ratio_dict: Any, ignored: list[Any], gradients: bool
) -> None:
    """One torch-pruning step; raises _ShapeError (with a copy of the model before) when it breaks."""
    import torch_pruning as tp

    original = copy.deepcopy(model)
    importance = taylor_importance() if gradients else tp.importance.MagnitudeImportance(p=1)
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            example.tensors,
            importance=importance,
            pruning_ratio=amount,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
        )
        pruner.step()
        model.zero_grad(set_to_none=True)
    except Exception as exc:
        raise CompressionError(f"structured pruning failed on this model: {exc}") from exc
    try:
        forward(model, example)  # a shape error surfaces here, not on the device
    except Exception as exc:
        raise _ShapeError(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, original
        ) from exc


def channel_prune(
    model: nn.Module,
    example_inputs: ModelInputs,
    amount: float,
    *,
    ratios: Optional[dict[str, float]] = None,
    ignored: Optional[Sequence[str]] = None,
    scope: Scope = "auto",
    gradients: bool = False,
) -> PruneStats:
    """Physically remove `amount` of the output channels (per-layer `ratios` when given) in place.

    With `gradients` True the parameters' `.grad` (see `accumulate_gradients`) rank the channels by
    the Taylor score; otherwise by L1 magnitude.
    """

    _check_amount(amount)
    if scope not in ("auto", "all", "mlp"):
        raise CompressionError(f"scope must be auto, all or mlp; got {scope!r}")
    model.eval()
    example = example_batch(example_inputs)
    layers = prunable_layers(model)
    keep = list(ignored) if ignored is not None else output_layers(model, example)
    unknown = [name for name in keep if name not in layers]
    if unknown:
        raise CompressionError(f"ignored layers {unknown} are not conv/linear layers of the model")
    if scope == "mlp" or (scope == "auto" and has_attention(model)):
        mlp = mlp_layers(model)
        if not mlp:
            raise CompressionError(
                "the model has attention but no feed-forward (d → k·d → d) Linear pair to prune; "
                "pass scope='all' to prune every layer (may break attention reshapes)"
            )
        keep = sorted(set(keep) | {name for name in layers if name not in mlp})
    ratio_dict = None
    if ratios is not None:
        bad = set(ratios) - set(layers)
        if bad:
            raise CompressionError(f"ratios name layers the model does not have: {sorted(bad)}")
        ratio_dict = {layers[name]: float(r) for name, r in ratios.items() if name not in keep}
    before = count_params(model)
    widths = {name: int(layer_weight(m).shape[0]) for name, m in layers.items()}
    try:
        _pruned_in_place(model, example, amount, ratio_dict, [layers[name] for name in keep], gradients)
    except _ShapeError as first:
        # A forward that hard-codes a size (x.view(-1, 160)) breaks when the layer before the flatten
        # narrows; keep those layers intact and prune the rest.
        flat = [name for name in flatten_feeders(first.original, example) if name not in keep]
        if not flat:
            raise CompressionError(f"structured pruning failed on this model: {first}") from first
        _adopt(model, first.original)
        layers = prunable_layers(model)
        keep = [*keep, *flat]
        if ratio_dict is not None:
            ratio_dict = {layers[n]: r for n, r in (ratios or {}).items() if n not in keep}
        try:
            _pruned_in_place(model, example, amount, ratio_dict, [layers[name] for name in keep], gradients)
        except _ShapeError as second:
            _adopt(model, second.original)
            raise CompressionError(
                f"structured pruning failed on this model: {second}; if its forward hard-codes a size "
                "(x.view(-1, 160)), write x.flatten(1) instead"
            ) from second
    after = count_params(model)
    removed = {
        name: 1.0 - int(layer_weight(m).shape[0]) / widths[name]
        for name, m in prunable_layers(model).items()
        if name in widths
    }
    return PruneStats(before[0], after[0], before[1], after[1], removed)


def finetune(
    pruned: nn.Module,
    teacher: nn.Module,
    x: ModelInputs,
    y: Targets = None,
    *,
    task: str = "classification",
    epochs: int = 10,
    lr: float = 1e-3,
    x_val: Optional[ModelInputs] = None,
    y_val: Targets = None,
    keep_zeros: bool = False,
) -> DistillResult:
    """Recover accuracy by distilling from the unpruned teacher; `keep_zeros` keeps pruned weights 0."""
    import torch

    masks = {}
    handles: list[Any] = []  # removed after fine-tuning so the returned model carries no hooks
    if keep_zeros:
        masks = {name: (layer_weight(m) != 0) for name, m in prunable_layers(pruned).items()}
        for name, module in prunable_layers(pruned).items():
            mask = masks[name].float()
            handles.append(layer_weight(module).register_hook(lambda grad, mask=mask: grad * mask))
    try:
        result = distill(
            teacher,
            pruned,
            x,
            y,
            task=task,
            x_val=x_val,
            y_val=y_val,
            epochs=epochs,
            lr=lr,
            patience=max(2, epochs // 3),
            alpha=0.5,
        )
    finally:
        for handle in handles:
            handle.remove()
    if keep_zeros:
        # Adam's momentum can still move masked weights slightly; re-apply the masks at the end.
        with torch.no_grad():
            for name, module in prunable_layers(pruned).items():
                layer_weight(module).mul_(masks[name])
    return result


class _PruneStepBase(CompressionStep):
    """Shared parameters and fine-tune logic of the two pruning steps."""

    requires = Requirements(stage="torch")
    perturbation = "prune"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.stats: Optional[PruneStats] = None
        self.finetuned: Optional[DistillResult] = None
        self.sensitivity: Optional[SensitivityTable] = None

    def describe(self) -> dict[str, Any]:
        """Parameters, parameter counts before/after, the sensitivity table and the fine-tune result."""
        out: dict[str, Any] = {"step": self.name, "params": dict(self.params)}
        if self.stats is not None:
            out["stats"] = self.stats.to_dict()
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity.to_json()
        if self.finetuned is not None:
            out["finetune"] = self.finetuned.summary()
        return out

    def _ratios(
        self,
        model: nn.Module,
        ctx: CompressionContext,
        amount: float,
        exclude: Sequence[str] = (),
    ) -> Optional[dict[str, float]]:
        if not self.params.get("by_sensitivity", True):
            return None
        if not ctx.calib:
            raise CompressionError("sensitivity-driven pruning needs calibration inputs (ctx.calib)")
        x, y, _, _ = context_data(ctx)
        self.sensitivity = torch_sensitivity(
            model,
            x,
            y,
            task=context_task(self.params, ctx),
            perturbation=self.perturbation,  # type: ignore[arg-type]
            ratio=min(0.9, max(amount, 0.1)),
            layers=[name for name in prunable_layers(model) if name not in exclude],
            progress=lambda message, f: ctx.report(f"{self.name}: {message}", 0.4 * f),
        )
        return pruning_ratios(self.sensitivity, amount)

    def _prune(self, model: nn.Module, ctx: CompressionContext, amount: float) -> PruneStats:
        raise CompressionError(f"{self.name} does not define how it prunes")

    def apply(self, model: Any, ctx: CompressionContext) -> Any:
        """A pruned (and optionally fine-tuned) copy of `model`; the original stays as it was."""
        amount = float(self.params.get("amount", 0.5))
        if not prunable_layers(model):
            # TorchScript and torch.export graphs call conv/linear as operators, not as layer modules.
            raise CompressionError(
                f"{self.name} needs the model as a Python nn.Module with nn.Conv2d/nn.Linear layers; a "
                f"{type(model).__name__} (TorchScript or torch.export graph) has none to prune: pass the "
                "nn.Module to edgefleet.sdk.build.build(model, ...)"
            )
        pruned = copy.deepcopy(model).eval()
        ctx.report(f"{self.name} {amount:.0%}", 0.0)
        self.stats = self._prune(pruned, ctx, amount)
        epochs = int(self.params.get("finetune_epochs", 0))
        if epochs > 0:
            if not ctx.calib:
                raise CompressionError("fine-tuning after pruning needs training inputs (ctx.calib)")
            x, y, x_val, y_val = context_data(ctx)
            self.finetuned = finetune(
                pruned,
                model,
                x,
                y,
                task=context_task(self.params, ctx),
                epochs=epochs,
                x_val=x_val,
                y_val=y_val,
                keep_zeros=self.perturbation == "prune",
            )
        ctx.report(f"{self.name} {amount:.0%}", 1.0)
        return pruned


@COMPRESSORS.register("prune-magnitude")
class MagnitudePruneStep(_PruneStepBase):
    """Unstructured magnitude pruning: global threshold, or per-layer ratios from sensitivity."""

    name = "prune-magnitude"
    perturbation = "prune"

    def _prune(self, model: nn.Module, ctx: CompressionContext, amount: float) -> PruneStats:
        return magnitude_prune(model, amount, ratios=self._ratios(model, ctx, amount))


@COMPRESSORS.register("prune-channels")
class ChannelPruneStep(_PruneStepBase):
    """Structured channel pruning with torch-pruning: layer ratios from sensitivity, channels by Taylor score."""

    name = "prune-channels"
    perturbation = "channels"

    def _prune(self, model: nn.Module, ctx: CompressionContext, amount: float) -> PruneStats:
        if not ctx.calib:
            raise CompressionError("channel pruning needs example inputs (ctx.calib) to trace the model")
        x, y, _, _ = context_data(ctx)
        task = context_task(self.params, ctx)
        scope = str(self.params.get("scope", "auto"))
        layers = prunable_layers(model)
        keep = output_layers(model, example_batch(x))
        if scope == "mlp" or (scope == "auto" and has_attention(model)):
            mlp = set(mlp_layers(model))
            keep = sorted(set(keep) | {name for name in layers if name not in mlp})
        ratios = self._ratios(model, ctx, amount, exclude=keep)
        used = ""
        if self.params.get("taylor", True):
            used = accumulate_gradients(model, x, y, task=task)
            if used and self.sensitivity is not None:
                scores, method = channel_scores(
                    model, x, y, task=task, layers=[n for n in layers if n not in keep]
                )
                self.sensitivity.channel_scores, self.sensitivity.channel_method = scores, method
        if not used and self.sensitivity is not None:
            self.sensitivity.channel_method = (
                "L1 magnitude (taylor=False, or no loss with a gradient: embeddings without targets)"
            )
        return channel_prune(
            model,
            x,
            amount,
            ratios=ratios,
            ignored=keep,
            scope=scope,  # type: ignore[arg-type]
            gradients=bool(used),
        )


__all__ = [
    "GRAD_SAMPLES",
    "ChannelPruneStep",
    "MagnitudePruneStep",
    "PruneStats",
    "accumulate_gradients",
    "channel_prune",
    "channel_scores",
    "count_params",
    "finetune",
    "has_attention",
    "magnitude_prune",
    "mlp_layers",
    "output_layers",
]
