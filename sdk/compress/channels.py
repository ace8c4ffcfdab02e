"""Which channels structured pruning may remove and how much each matters, on torch-pruning's graph.

Public API:
    output_layers(model, example) -> list[str]: conv/linear layers producing the model's outputs.
    has_attention(model) / mlp_layers(model): transformer detection and its feed-forward Linears.
    accumulate_gradients(model, inputs, targets=None, *, task) -> str: ∂L/∂θ into `.grad`.
    channel_scores(model, inputs, targets=None, *, task, layers=None) -> (dict[layer, scores], method)
        per-output-channel first-order Taylor estimates |ΔL| of removing each channel.
    flatten_feeders(model, example) -> list[str]: layers a Linear reads through a flatten.
    example_batch(inputs) -> Batch: two samples of every input, to trace with.
    taylor_importance(): the torch-pruning Importance that ranks channels by that score.

Why a Taylor estimate instead of measuring each channel: see docs/compress.md ("Per-channel scores").
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional, Sequence

from edgefleet.sdk.compress.sensitivity import layer_weight, prunable_layers
from edgefleet.sdk.compress.tasks import (
    Batch,
    ModelInputs,
    Targets,
    as_batch,
    check_task,
    forward,
    pseudo_targets,
    run_batched,
    supervised_loss,
    target_tensors,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

GRAD_SAMPLES = 256  # samples whose gradients estimate the channel scores (enough for a stable ranking)


def example_batch(inputs: ModelInputs) -> Batch:
    """Two samples of every input: enough to trace, and batch 2 keeps flatten/view dims unambiguous."""
    return as_batch(inputs).take(slice(0, 2))


def output_layers(model: nn.Module, example: Any) -> list[str]:
    """Names of the conv/linear layers that produce the model's outputs directly (kept intact).

    Walks the autograd graph back from every output and stops at the first conv/linear on each path,
    so every head of a multi-head detector is found, not only the last layer that ran.
    """
    import torch

    batch = (
        example
        if isinstance(example, Batch)
        else as_batch(list(example) if isinstance(example, tuple) else example)
    )
    layers = prunable_layers(model)
    if not layers:
        return []
    made: dict[Any, str] = {}
    order: list[str] = []

    def hook(_m: Any, _i: Any, out: Any, name: str) -> None:
        order.append(name)
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made[out.grad_fn] = name

    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
        for name, module in layers.items()
    ]
    try:
        with torch.enable_grad():
            outs = forward(model, batch.take(slice(0, 1)))
    finally:
        for handle in handles:
            handle.remove()
    found: list[str] = []
    seen: set[Any] = set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made:
            if made[node] not in found:
                found.append(made[node])
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    if found:
        return found
    return [order[-1]] if order else [list(layers)[-1]]


def has_attention(model: nn.Module) -> bool:
    """Whether the model has attention modules (nn.MultiheadAttention or a class named *Attention*)."""
    from torch import nn

    return any(
        isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
        for m in model.modules()
    )


def mlp_layers(model: nn.Module) -> list[str]:
    """The expanding Linear of each feed-forward block (d → k·d, read back by a k·d → d Linear)."""
    from torch import nn

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    back = {(m.in_features, m.out_features) for m in linears.values()}
    return [
        name
        for name, m in linears.items()
        if m.out_features > m.in_features and (m.out_features, m.in_features) in back
    ]


def taylor_importance() -> Any:
    """A torch-pruning Importance: |Σ g·θ| over everything removing a channel removes (see doc)."""
    import torch
    import torch_pruning as tp
    from torch import nn
    from torch_pruning.pruner import function

    out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
    in_fns = (function.prune_conv_in_channels, function.prune_linear_in_channels)
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

    class TaylorChannelImportance(tp.importance.Importance):
        """ΔL(remove channel c) ≈ −Σ_{θ ∈ group(c)} ∂L/∂θ · θ; the score is its magnitude."""

        magnitude = tp.importance.MagnitudeImportance(p=1)

        @torch.no_grad()
        def __call__(self, group: Any) -> Any:
            total: Optional[torch.Tensor] = None
            size = len(group[0].idxs)
            for i, (dep, idxs) in enumerate(group):
                layer, fn, root = dep.layer, dep.pruning_fn, group[i].root_idxs
                if any(r is None for r in root):
                    continue
                local = _contribution(layer, fn, list(idxs), out_fns, in_fns, norm_types)
                if local is None:
                    continue
                if total is None:
                    total = torch.zeros(size, dtype=torch.float64)
                total.scatter_add_(0, torch.tensor(root), local.double())
            if total is None:  # no gradients on this group (no labels): L1 magnitude instead
                return self.magnitude(group)
            return total.abs().float()

    return TaylorChannelImportance()


def _contribution(
    layer: Any,
    fn: Any,
    idxs: list[int],
    out_fns: tuple[Any, ...],
    in_fns: tuple[Any, ...],
    norms: tuple[Any, ...],
) -> Optional[torch.Tensor]:
    """Σ g·θ per channel for one member of a torch-pruning group (None when it has no gradients)."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.grad is None:
        return None
    bias = getattr(layer, "bias", None)
    if fn in out_fns:
        if getattr(layer, "transposed", False):
            w, g = weight.transpose(0, 1)[idxs], weight.grad.transpose(0, 1)[idxs]
        else:
            w, g = weight[idxs], weight.grad[idxs]
        local = (w * g).flatten(1).sum(1)
        if bias is not None and bias.grad is not None:
            local = local + bias[idxs] * bias.grad[idxs]
        return local
    if fn in in_fns:
        if getattr(layer, "groups", 1) != 1:
            return None
        w = weight if getattr(layer, "transposed", False) else weight.transpose(0, 1)
        g = weight.grad if getattr(layer, "transposed", False) else weight.grad.transpose(0, 1)
        return (w[idxs] * g[idxs]).flatten(1).sum(1)
    if isinstance(layer, norms) and weight.dim() == 1:
        local = weight[idxs] * weight.grad[idxs]
        if bias is not None and bias.grad is not None:
            local = local + bias[idxs] * bias.grad[idxs]
        return local
    return None


def accumulate_gradients(
    model: nn.Module, inputs: ModelInputs, targets: Targets = None, *, task: str = "classification"
) -> str:
    """Fill `.grad` of every parameter with ∂L/∂θ on up to GRAD_SAMPLES samples; returns the loss used.

    With labels L is the task loss; without, the model's own hard predictions are the targets
    (`tasks.pseudo_targets`); for embeddings without targets nothing is computed ("" is returned).
    """
    import torch

    batch = as_batch(inputs)
    count = min(len(batch), GRAD_SAMPLES)
    part = batch.take(slice(0, count))
    if targets is not None:
        full = target_tensors(task, targets, len(batch))
        assert full is not None
        goal: Optional[list[torch.Tensor]] = [t[:count] for t in full]
        used = f"{task} loss on the labels"
    else:
        goal = pseudo_targets(task, run_batched(model.eval(), part))
        used = f"{task} loss on the model's own predictions"
    if goal is None:
        return ""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for start in range(0, count, 64):
            idx = slice(start, start + 64)
            piece = part.take(idx)
            loss = supervised_loss(task, forward(model, piece), [t[idx] for t in goal], piece.mask)
            (loss * piece.tensors[0].shape[0] / count).backward()
    return used


def channel_scores(
    model: nn.Module,
    inputs: ModelInputs,
    targets: Targets = None,
    *,
    task: str = "classification",
    layers: Optional[Sequence[str]] = None,
) -> tuple[dict[str, list[float]], str]:
    """Per-output-channel Taylor scores of each conv/linear layer, and how they were obtained."""
    import torch_pruning as tp

    check_task(task)
    work = copy.deepcopy(model).eval()
    used = accumulate_gradients(work, inputs, targets, task=task)
    example = example_batch(inputs)
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example.tensors)
    importance = taylor_importance()
    found = prunable_layers(work)
    out: dict[str, list[float]] = {}
    for name in layers if layers is not None else list(found):
        module = found[name]
        fn = (
            tp.prune_conv_out_channels if not hasattr(module, "in_features") else tp.prune_linear_out_channels
        )
        group = graph.get_pruning_group(module, fn, idxs=list(range(int(layer_weight(module).shape[0]))))
        out[name] = [float(v) for v in importance(group)]
    method = (
        f"first-order Taylor |Σ g·θ| over each channel's group ({used})"
        if used
        else "L1 magnitude (no gradients)"
    )
    return out, method


def flatten_feeders(model: nn.Module, example: Batch) -> list[str]:
    """Conv/linear layers whose channels a Linear reads through a flatten (each channel → many inputs)."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example.tensors)
    found = []
    for name, module in prunable_layers(model).items():
        out = tp.prune_linear_out_channels if hasattr(module, "in_features") else tp.prune_conv_out_channels
        width = int(layer_weight(module).shape[0])
        group = graph.get_pruning_group(module, out, idxs=list(range(width)))
        if any(dep.pruning_fn == tp.prune_linear_in_channels and len(idxs) > width for dep, idxs in group):
            found.append(name)
    return found
