"""Per-layer sensitivity as the seed defines it, and the table `edgefleet build` prints and keeps.

For every layer i we perturb only that layer (θ_i → perturbed, the rest as trained) and compare the
loss on calibration data:

    S_i = (L(θ) − L(θ with layer i perturbed)) / L(θ)

L is the task's loss against the labels (cross-entropy, CTC, detection, 1 − cosine; see tasks.py).
Perturbing a layer that matters makes the loss rise, so its S_i is **negative**, and the more
negative, the more sensitive the layer; S_i ≈ 0 means the layer can be perturbed for free, and S_i > 0
means the perturbation happened to lower the calibration loss. The table is sorted most sensitive
(lowest S_i) first. Without labels L(θ) is a distortion against the model's own outputs, which is 0
at θ: then no ratio is taken and S_i = −‖y_i − y‖² / ‖y‖² (summed over the float outputs), again
negative for layers that matter (`normalized` is False in the table).

The perturbation used is part of the table (`perturbation`, `description`): "zero" is the seed's
θ_i = 0 for the whole layer; "prune", "channels" and "quantize" apply what a compression step would
(the smallest-|w| weights, the smallest-L1 output channels, per-channel fake quantization).

Per-channel scores (`channel_scores`, filled by `prune.channel_scores`) approximate S for one output
channel at a time; see docs/compress.md for why a first-order Taylor estimate replaces running the
model once per channel.

Public API:
    torch_sensitivity(model, inputs, labels=None, *, task="classification", perturbation="prune",
                      ratio=0.5, bits=8, layers=None, batch_size=256, progress=None) -> SensitivityTable
    SensitivityTable.to_rows() -> list[dict]; .to_json() -> dict (report.json); .to_rich() -> Table
    onnx_sensitivity(model_path, feeds, *, nodes=None, output_index=0, progress=None) -> SensitivityTable
    pruning_ratios(table, target, *, max_ratio=0.9, weights=None) -> dict[str, float]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union

import numpy as np

from edgefleet.sdk.compress.base import CompressionError
from edgefleet.sdk.compress.tasks import (
    ModelInputs,
    Targets,
    as_batch,
    check_task,
    run_batched,
    supervised_loss,
    target_tensors,
)

if TYPE_CHECKING:
    import torch
    from rich.table import Table
    from torch import nn

Perturbation = Literal["prune", "channels", "quantize", "zero"]
Progress = Optional[Callable[[str, float], None]]
FORMULA = "S = (L − L_perturbed) / L"

__all__ = [
    "FORMULA",
    "LayerSensitivity",
    "ModelInputs",
    "SensitivityTable",
    "as_tensors",
    "describe_perturbation",
    "layer_weight",
    "onnx_sensitivity",
    "prunable_layers",
    "pruning_ratios",
    "torch_sensitivity",
]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's (or ONNX node's) sensitivity: its loss when perturbed alone and S_i (see module doc)."""

    name: str
    kind: str
    params: int
    loss: float
    score: float


@dataclass
class SensitivityTable:
    """Layers sorted most sensitive (lowest S) first, with the unperturbed loss they were compared to."""

    perturbation: str
    baseline_loss: float
    layers: list[LayerSensitivity] = field(default_factory=list)
    description: str = ""
    loss: str = ""
    normalized: bool = True
    channel_scores: dict[str, list[float]] = field(default_factory=dict)
    channel_method: str = ""

    def __post_init__(self) -> None:
        self.layers.sort(key=lambda layer: layer.score)
        if not self.description:
            self.description = describe_perturbation(self.perturbation)

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [layer.name for layer in self.layers]

    def scores(self) -> dict[str, float]:
        """S_i by layer name."""
        return {layer.name: layer.score for layer in self.layers}

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per layer, most sensitive first: rank, layer, kind, params, loss, S, channels."""
        rows = []
        for rank, layer in enumerate(self.layers, start=1):
            row: dict[str, Any] = {
                "rank": rank,
                "layer": layer.name,
                "kind": layer.kind,
                "params": layer.params,
                "loss_perturbed": layer.loss,
                "S": layer.score,
            }
            channels = self.channel_scores.get(layer.name)
            if channels:
                row["channels"] = len(channels)
                row["channel_score_min"] = float(min(channels))
                row["channel_score_max"] = float(max(channels))
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for report.json: formula, perturbation, baseline, rows and channel scores."""
        return {
            "formula": FORMULA if self.normalized else "S = −(L_perturbed − L), L(θ) = 0 (no labels)",
            "perturbation": self.perturbation,
            "description": self.description,
            "loss": self.loss,
            "baseline_loss": self.baseline_loss,
            "normalized": self.normalized,
            "layers": self.to_rows(),
            "channel_method": self.channel_method,
            "channel_scores": {name: list(values) for name, values in self.channel_scores.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The raw layer records (kept for callers of the first version); prefer to_json()."""
        return {
            "perturbation": self.perturbation,
            "baseline_loss": self.baseline_loss,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_rich(self, title: str = "Per-layer sensitivity") -> Table:
        """A rich table, most sensitive layer first; print it with sdk.cli.output.print_table."""
        from rich.table import Table

        formula = FORMULA if self.normalized else "S = L − L_perturbed (L = 0 without labels)"
        table = Table(
            title=f"{title}: {formula}; baseline L = {self.baseline_loss:.4g}{f' ({self.loss})' if self.loss else ''}",
            caption=f"perturbation: {self.description}",
        )
        columns = ["#", "layer", "kind", "params", "L perturbed", "S"]
        if self.channel_scores:
            columns.append("channel scores min–max")
        for column in columns:
            table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
        for row in self.to_rows():
            cells = [
                str(row["rank"]),
                row["layer"],
                row["kind"],
                f"{row['params']:,}",
                f"{row['loss_perturbed']:.4g}",
                f"{row['S']:+.4g}",
            ]
            if self.channel_scores:
                cells.append(
                    f"{row['channel_score_min']:.3g}–{row['channel_score_max']:.3g}"
                    if "channels" in row
                    else "—"
                )
            table.add_row(*cells)
        return table


def describe_perturbation(perturbation: str, ratio: float = 0.5, bits: int = 8) -> str:
    """What a perturbation does to one layer, in words (shown under the table)."""
    texts = {
        "zero": "every weight of the layer set to 0 (θ_i = 0)",
        "prune": f"the {ratio:.0%} smallest-|w| weights of the layer set to 0",
        "channels": f"the {ratio:.0%} output channels with the smallest L1 norm set to 0",
        "quantize": f"weights fake-quantized to {bits}-bit, symmetric, per output channel",
        "int8-dynamic-per-channel": "node quantized alone to INT8 (dynamic activations, per-channel weights), "
        "simulated in fp32; L = 1 − mean cosine to fp32",
    }
    return texts.get(perturbation, perturbation)


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
    """Positional model inputs as tensors (array, arrays in argument order, or dict); ids stay int64."""
    return as_batch(inputs).tensors


def _distortion(outs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Σ over float outputs of ‖y − y_ref‖² / ‖y_ref‖²."""
    total = 0.0
    for out, ref in zip(outs, reference):
        if not ref.is_floating_point():
            continue
        denom = float((ref**2).sum()) or 1.0
        total += float(((out - ref) ** 2).sum()) / denom
    return total


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
    labels: Targets = None,
    *,
    task: str = "classification",
    perturbation: Perturbation = "prune",
    ratio: float = 0.5,
    bits: int = 8,
    layers: Optional[Sequence[str]] = None,
    batch_size: int = 256,
    progress: Progress = None,
) -> SensitivityTable:
    """Perturb each layer alone (all weights zero, the smallest `ratio` of its weights or channels, or
    quantize to `bits`) and score it with S_i = (L − L_i) / L on (inputs, labels) (see module doc).

    The model is restored exactly after each layer; it is left in eval mode.
    """
    import torch

    check_task(task)
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
    batch = as_batch(inputs)
    targets = target_tensors(task, labels, len(batch))
    reference = run_batched(model, batch, batch_size)

    def loss_of(outs: list[torch.Tensor]) -> float:
        if targets is None:
            return _distortion(outs, reference)
        with torch.no_grad():
            return float(supervised_loss(task, outs, targets, batch.mask))

    base = loss_of(reference)
    normalized = targets is not None and base > 0
    results = []
    for index, (name, module) in enumerate(candidates.items()):
        weight = layer_weight(module)
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(_perturbed_weight(saved, perturbation, ratio, bits))
            loss = loss_of(run_batched(model, batch, batch_size))
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        score = (base - loss) / base if normalized else base - loss  # the seed's sign: harm → S < 0
        results.append(LayerSensitivity(name, type(module).__name__, int(weight.numel()), loss, score))
        if progress is not None:
            progress(f"sensitivity {name}", (index + 1) / len(candidates))
    loss_name = {
        "classification": "cross-entropy",
        "ctc": "CTC",
        "detection": "BCE + L1",
        "embedding": "1 − cosine",
    }[task]
    return SensitivityTable(
        perturbation,
        base,
        results,
        description=describe_perturbation(perturbation, ratio, bits),
        loss=loss_name if targets is not None else "relative output distortion (no labels)",
        normalized=normalized,
    )


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
        results.append(LayerSensitivity(name, info.op_type, info.params, loss, -loss))  # S = 0 − L_i
        if progress is not None:
            progress(f"sensitivity {name}", (index + 1) / len(candidates))
    return SensitivityTable(
        "int8-dynamic-per-channel", 0.0, results, loss="1 − mean cosine", normalized=False
    )
