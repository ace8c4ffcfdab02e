"""Pruning: global magnitude (unstructured) and structured channel pruning that really removes channels.

Public API:
    magnitude_prune(model, amount, *, ratios=None) -> PruneStats
        zero the smallest weights: one global threshold over all conv/linear layers, or the given
        per-layer ratios (e.g. from `pruning_ratios(torch_sensitivity(...), amount)`).
    channel_prune(model, example_inputs, amount, *, ratios=None, ignored=None) -> PruneStats
        remove whole output channels with torch-pruning (dependent layers shrink with them); the
        output layer is kept intact.
    finetune(pruned, teacher, x, y=None, *, epochs=10, ...) -> DistillResult
        short recovery training, distilling from the unpruned model (and labels when given).
    MagnitudePruneStep / ChannelPruneStep, registered as "prune-magnitude" / "prune-channels"
        (stage "torch"), params: amount=0.5, by_sensitivity=True, finetune_epochs=0;
        .apply(model: nn.Module, ctx) -> nn.Module (a pruned copy; the input model is untouched).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)
from edgefleet.sdk.compress.distill import DistillResult, distill
from edgefleet.sdk.compress.sensitivity import (
    ModelInputs,
    as_tensors,
    layer_weight,
    prunable_layers,
    pruning_ratios,
    torch_sensitivity,
)

if TYPE_CHECKING:
    from torch import nn


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


def output_layers(model: nn.Module, example: tuple[Any, ...]) -> list[str]:
    """Names of the conv/linear layers whose output channels are the model's outputs (kept intact)."""
    layers = prunable_layers(model)
    if not layers:
        return []
    # torch-pruning cannot narrow the output without changing what the model predicts; the last
    # conv/linear in execution order is that layer for feed-forward classifiers.
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
        for name, module in layers.items()
    ]
    try:
        import torch

        with torch.no_grad():
            model(*example)
    finally:
        for handle in handles:
            handle.remove()
    return [order[-1]] if order else [list(layers)[-1]]


def channel_prune(
    model: nn.Module,
    example_inputs: ModelInputs,
    amount: float,
    *,
    ratios: Optional[dict[str, float]] = None,
    ignored: Optional[Sequence[str]] = None,
) -> PruneStats:
    """Physically remove `amount` of the output channels (per-layer `ratios` when given) in place."""
    import torch_pruning as tp

    _check_amount(amount)
    model.eval()
    example = tuple(t[:1] for t in as_tensors(example_inputs))
    layers = prunable_layers(model)
    keep = list(ignored) if ignored is not None else output_layers(model, example)
    unknown = [name for name in keep if name not in layers]
    if unknown:
        raise CompressionError(f"ignored layers {unknown} are not conv/linear layers of the model")
    ratio_dict = None
    if ratios is not None:
        bad = set(ratios) - set(layers)
        if bad:
            raise CompressionError(f"ratios name layers the model does not have: {sorted(bad)}")
        ratio_dict = {layers[name]: float(r) for name, r in ratios.items() if name not in keep}
    before = count_params(model)
    widths = {name: int(layer_weight(m).shape[0]) for name, m in layers.items()}
    try:
        pruner = tp.pruner.MagnitudePruner(
            model,
            example if len(example) > 1 else example[0],
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=[layers[name] for name in keep],
        )
        pruner.step()
    except Exception as exc:
        raise CompressionError(f"structured pruning failed on this model: {exc}") from exc
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
    x: np.ndarray,
    y: Optional[np.ndarray] = None,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    x_val: Optional[np.ndarray] = None,
    y_val: Optional[np.ndarray] = None,
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
    result = distill(
        teacher,
        pruned,
        x,
        y,
        x_val=x_val,
        y_val=y_val,
        epochs=epochs,
        lr=lr,
        patience=max(2, epochs // 3),
        alpha=0.5,
    )
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

    def describe(self) -> dict[str, Any]:
        """Parameters, parameter counts before/after and the fine-tune result."""
        out: dict[str, Any] = {"step": self.name, "params": dict(self.params)}
        if self.stats is not None:
            out["stats"] = self.stats.to_dict()
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
        table = torch_sensitivity(
            model,
            list(ctx.calib.values()),
            ctx.calib_labels,
            perturbation=self.perturbation,  # type: ignore[arg-type]
            ratio=min(0.9, max(amount, 0.1)),
            layers=[name for name in prunable_layers(model) if name not in exclude],
        )
        return pruning_ratios(table, amount)

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
            x = next(iter(ctx.calib.values()))
            x_val = next(iter(ctx.eval_inputs.values())) if ctx.eval_inputs else None
            self.finetuned = finetune(
                pruned,
                model,
                x,
                ctx.calib_labels,
                epochs=epochs,
                x_val=x_val,
                y_val=ctx.eval_labels if x_val is not None else None,
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
    """Structured channel pruning with torch-pruning; per-layer ratios from channel sensitivity."""

    name = "prune-channels"
    perturbation = "channels"

    def _prune(self, model: nn.Module, ctx: CompressionContext, amount: float) -> PruneStats:
        if not ctx.calib:
            raise CompressionError("channel pruning needs example inputs (ctx.calib) to trace the model")
        inputs = list(ctx.calib.values())
        keep = output_layers(model, tuple(t[:1] for t in as_tensors(inputs)))
        ratios = self._ratios(model, ctx, amount, exclude=keep)
        return channel_prune(model, inputs, amount, ratios=ratios, ignored=keep)
