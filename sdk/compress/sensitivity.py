"""Per-layer sensitivity analysis: how much the loss grows when one layer alone is pruned or quantized.

For every layer i we perturb only that layer and measure the loss on calibration data:

    S_i = (L(θ with layer i perturbed) − L(θ)) / L(θ)

i.e. the relative loss increase (the issue's S_i written with L as a loss, so a layer whose
perturbation hurts more gets a larger S_i and ranks higher). With labels L is the cross-entropy of the
model's logits; without labels the fp32 outputs are the reference and S_i is the relative output
distortion ‖y_i − y‖² / ‖y‖² (L(θ) is 0 there, so no ratio is taken).

Public API:
    torch_sensitivity(model, inputs, labels=None, *, perturbation="prune", ratio=0.5, bits=8,
                      layers=None, batch_size=256, progress=None) -> SensitivityTable
    onnx_sensitivity(model_path, feeds, *, nodes=None, output_index=0, reference=None,
                     progress=None) -> SensitivityTable           (per-node INT8 quantization)
    pruning_ratios(table, target, *, max_ratio=0.9, weights=None) -> dict[str, float]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union

import numpy as np

from edgefleet.sdk.compress.base import CompressionError

if TYPE_CHECKING:
    import torch
    from rich.table import Table
    from torch import nn

Perturbation = Literal["prune", "channels", "quantize", "zero"]
ModelInputs = Union[np.ndarray, Sequence[np.ndarray]]
Progress = Optional[Callable[[str, float], None]]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's (or ONNX node's) sensitivity: its loss when perturbed alone and the score S_i."""

    name: str
    kind: str
    params: int
    loss: float
    score: float


@dataclass
class SensitivityTable:
    """Layers sorted from most to least sensitive, with the unperturbed loss they were compared to."""

    perturbation: str
    baseline_loss: float
    layers: list[LayerSensitivity] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers.sort(key=lambda layer: layer.score, reverse=True)

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [layer.name for layer in self.layers]

    def scores(self) -> dict[str, float]:
        """S_i by layer name."""
        return {layer.name: layer.score for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "perturbation": self.perturbation,
            "baseline_loss": self.baseline_loss,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_rich(self, title: str = "Per-layer sensitivity") -> Table:
        """A rich table, most sensitive layer first."""
        from rich.table import Table

        table = Table(title=f"{title} ({self.perturbation}; baseline loss {self.baseline_loss:.4g})")
        for column in ("#", "layer", "kind", "params", "loss perturbed", "S_i"):
            table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
        for rank, layer in enumerate(self.layers, start=1):
            table.add_row(
                str(rank),
                layer.name,
                layer.kind,
                f"{layer.params:,}",
                f"{layer.loss:.4g}",
                f"{layer.score:.4g}",
            )
        return table


# ----------------------------------------------------------------------------------------------
# torch modules


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The convolution and linear layers of `model` by qualified name (what pruning/quantizing touch)."""
    from torch import nn

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor of a conv/linear layer."""
    import torch

    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise CompressionError(f"{type(module).__name__} has no weight tensor")
    return weight


def as_tensors(inputs: ModelInputs) -> tuple[torch.Tensor, ...]:
    """Positional model inputs as tensors (one array, or a sequence of arrays in argument order)."""
    import torch

    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if not arrays:
        raise CompressionError("no model inputs given: pass at least one array of samples")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise CompressionError(f"input arrays have different sample counts {sorted(lengths)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def run_batched(model: nn.Module, tensors: tuple[torch.Tensor, ...], batch_size: int = 256) -> torch.Tensor:
    """Run `model` over the samples in batches under no_grad and concatenate the outputs."""
    import torch

    outputs = []
    with torch.no_grad():
        for start in range(0, len(tensors[0]), batch_size):
            out = model(*(t[start : start + batch_size] for t in tensors))
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out.float())
    return torch.cat(outputs)


def _loss(outputs: torch.Tensor, labels: Optional[torch.Tensor], reference: torch.Tensor) -> float:
    """Cross-entropy against labels, or relative squared distortion against the fp32 outputs."""
    import torch

    if labels is not None:
        return float(torch.nn.functional.cross_entropy(outputs, labels))
    denom = float((reference**2).sum()) or 1.0
    return float(((outputs - reference) ** 2).sum()) / denom


def _perturbed_weight(
    weight: torch.Tensor, perturbation: Perturbation, ratio: float, bits: int
) -> torch.Tensor:
    """The weight as the perturbation leaves it (a new tensor; the original is left untouched)."""
    import torch

    w = weight.detach().clone()
    if perturbation == "zero":
        return torch.zeros_like(w)
    if perturbation == "prune":
        k = round(ratio * w.numel())
        if k > 0:
            threshold = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= threshold] = 0.0
        return w
    if perturbation == "channels":
        norms = w.abs().reshape(w.shape[0], -1).sum(dim=1)
        k = round(ratio * w.shape[0])
        if k > 0:
            w[norms.argsort()[:k]] = 0.0
        return w
    if perturbation == "quantize":
        return fake_quantize_per_channel(w, bits=bits, axis=0)
    raise CompressionError(f"unknown perturbation {perturbation!r}; use prune, channels, quantize or zero")


def fake_quantize_per_channel(weight: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """Symmetric per-channel round-to-nearest quantization, returned dequantized (float)."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(weight.dim()) if d != axis]
    amax = weight.abs().amax(dim=dims, keepdim=True) if dims else weight.abs()
    scale = torch.clamp(amax, min=1e-12) / qmax
    return torch.clamp(torch.round(weight / scale), -qmax, qmax) * scale


def torch_sensitivity(
    model: nn.Module,
    inputs: ModelInputs,
    labels: Optional[np.ndarray] = None,
    *,
    perturbation: Perturbation = "prune",
    ratio: float = 0.5,
    bits: int = 8,
    layers: Optional[Sequence[str]] = None,
    batch_size: int = 256,
    progress: Progress = None,
) -> SensitivityTable:
    """Perturb each layer alone (prune `ratio` of its weights, its channels, or quantize to `bits`)
    and rank the layers by the relative loss increase S_i on (inputs, labels).

    The model is restored exactly after each layer; it is left in eval mode.
    """
    import torch

    if not 0.0 <= ratio <= 1.0:
        raise CompressionError(f"ratio must be within 0..1, got {ratio}")
    candidates = prunable_layers(model)
    if layers is not None:
        unknown = [name for name in layers if name not in candidates]
        if unknown:
            raise CompressionError(
                f"layers {unknown} are not conv/linear layers of the model; "
                f"known: {', '.join(candidates) or 'none'}"
            )
        candidates = {name: candidates[name] for name in layers}
    if not candidates:
        raise CompressionError("the model has no convolution or linear layers to analyse")

    model.eval()
    tensors = as_tensors(inputs)
    label_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    if label_tensor is not None and len(label_tensor) != len(tensors[0]):
        raise CompressionError(
            f"{len(label_tensor)} labels for {len(tensors[0])} samples: give one label per sample"
        )
    reference = run_batched(model, tensors, batch_size)
    base = _loss(reference, label_tensor, reference)
    results = []
    for index, (name, module) in enumerate(candidates.items()):
        weight = layer_weight(module)
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(_perturbed_weight(saved, perturbation, ratio, bits))
            loss = _loss(run_batched(model, tensors, batch_size), label_tensor, reference)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        score = (loss - base) / base if label_tensor is not None and base > 0 else loss - base
        results.append(LayerSensitivity(name, type(module).__name__, int(weight.numel()), loss, score))
        if progress is not None:
            progress(f"sensitivity {name}", (index + 1) / len(candidates))
    return SensitivityTable(perturbation, base, results)


def pruning_ratios(
    table: SensitivityTable,
    target: float,
    *,
    max_ratio: float = 0.9,
    weights: Optional[dict[str, int]] = None,
) -> dict[str, float]:
    """Per-layer pruning ratios whose parameter-weighted mean is `target`, least sensitive pruned most.

    Layers are spread by sensitivity rank: the most sensitive gets half the common level, the least
    sensitive one and a half times it (capped at `max_ratio`); the level is found by bisection so the
    overall fraction removed equals `target` (when the cap allows it).
    """
    if not 0.0 <= target < 1.0:
        raise CompressionError(f"target pruning ratio must be within 0..1 (exclusive), got {target}")
    names = table.ranking()  # most sensitive first
    if not names:
        raise CompressionError("the sensitivity table is empty: nothing to prune")
    sizes = weights or {layer.name: layer.params for layer in table.layers}
    n = len(names)
    # rank 0 (most sensitive) → 0.5, last (least sensitive) → 1.5
    spread = {name: 0.5 + (i / (n - 1) if n > 1 else 0.5) for i, name in enumerate(names)}
    total = float(sum(sizes[name] for name in names))

    def ratios_at(level: float) -> dict[str, float]:
        return {name: min(max_ratio, level * spread[name]) for name in names}

    def mean_at(level: float) -> float:
        r = ratios_at(level)
        return sum(r[name] * sizes[name] for name in names) / total

    lo, hi = 0.0, 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return ratios_at(hi)


# ----------------------------------------------------------------------------------------------
# ONNX graphs: per-node INT8 sensitivity, simulated in fp32 (see onnx_fakequant)


def onnx_sensitivity(
    model_path: Union[str, Path],
    feeds: Union[dict[str, np.ndarray], Sequence[dict[str, np.ndarray]]],
    *,
    nodes: Optional[Sequence[str]] = None,
    output_index: int = 0,
    mask_input: Optional[str] = "attention_mask",
    progress: Progress = None,
) -> SensitivityTable:
    """Quantize each weight-bearing MatMul/Gemm/Conv/Gather node alone (INT8, as onnxruntime's dynamic
    per-channel quantizer would) and rank nodes by the output distortion it causes.

    `feeds` is one batch or a list of batches (run one by one, e.g. one sentence each, as a device
    would). The distortion is 1 − mean per-sample cosine between fp32 and perturbed outputs (token
    outputs are mean-pooled over the `mask_input` feed first); it is what mixed precision budgets on.
    """
    from edgefleet.sdk.compress.onnx_fakequant import FakeQuantGraph, batch_cosines

    graph = FakeQuantGraph.load(model_path)
    candidates = graph.quantizable_nodes()
    if nodes is not None:
        unknown = [name for name in nodes if name not in candidates]
        if unknown:
            raise CompressionError(f"nodes {unknown} are not quantizable weight nodes of the graph")
        candidates = {name: candidates[name] for name in nodes}
    if not candidates:
        raise CompressionError(
            f"{model_path} has no MatMul/Gemm/Conv/Gather nodes with constant weights to quantize"
        )
    batches = [feeds] if isinstance(feeds, dict) else list(feeds)
    reference = graph.run_batches(set(), batches, output_index)
    results = []
    for index, (name, info) in enumerate(candidates.items()):
        outputs = graph.run_batches({name}, batches, output_index)
        loss = float(1.0 - batch_cosines(reference, outputs, batches, mask_input).mean())
        results.append(LayerSensitivity(name, info.op_type, info.params, loss, loss))
        if progress is not None:
            progress(f"sensitivity {name}", (index + 1) / len(candidates))
    return SensitivityTable("int8-dynamic-per-channel", 0.0, results)
