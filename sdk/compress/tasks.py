"""Task-aware inputs, targets and losses shared by pruning, sensitivity, distillation and fine-tuning.

A model may take several inputs (token ids + attention mask, …): they are given as one array, a
sequence of arrays in argument order, or a dict name → array in the model's input order (the build's
`Dataset.inputs`). Integer inputs stay integer (int64), floats become float32; ids are never cast to
float. Outputs may be one tensor, a tuple/list or a dict (HF ModelOutput): they are flattened in order.

Tasks (the contract's names, plain strings) and their losses:

| task | supervised loss (targets) | distillation loss (teacher outputs) | validation metric |
|---|---|---|---|
| classification | cross-entropy on output 0 (`y`: class ids [N]) | α·T²·KL(softmax(s/T) ‖ softmax(t/T)) + (1−α)·CE | accuracy, else −KD loss |
| detection | BCE-with-logits on output 0 (per-anchor class/objectness targets in the raw layout, 0/1) + L1 on the other outputs (box regressions, positive anchors only) | MSE on every raw output, each normalised by the teacher output's variance | −loss |
| ctc | `torch.nn.functional.ctc_loss` (output 0 = [N, T, C] logits or log-probs, blank 0; `y` [N, S] padded with ≤ 0 or `y_lengths`) | per-frame KL at temperature T (+ CTC with labels) | −loss |
| embedding | 1 − cosine to target embeddings | 1 − cosine to the teacher's embeddings | mean cosine |

Token-level embeddings [N, L, D] are mean-pooled over `attention_mask` when the model has that input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from edgefleet.sdk.compress.base import CompressionError

if TYPE_CHECKING:
    import torch
    from torch import nn

TASKS = ("classification", "detection", "ctc", "embedding")
ModelInputs = Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray]]
Targets = Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray], None]
MASK_NAME = "attention_mask"


def check_task(task: str) -> str:
    """`task` if it is one of TASKS, else a CompressionError naming them."""
    if task not in TASKS:
        raise CompressionError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return task


@dataclass
class Batch:
    """Model inputs as tensors in argument order, with the attention mask when the model has one."""

    tensors: tuple[torch.Tensor, ...]
    mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def take(self, idx: Any) -> Batch:
        """The rows `idx` of every input (a slice or an index tensor)."""
        return Batch(tuple(t[idx] for t in self.tensors), self.mask[idx] if self.mask is not None else None)


def _array(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise CompressionError(f"{what} is not a numeric array; give numpy arrays of numbers")
    return array


def as_batch(inputs: ModelInputs) -> Batch:
    """Inputs as tensors: floats → float32, integers → int64 (kept integer), bool kept."""
    import torch

    mask_index: Optional[int] = None
    if isinstance(inputs, np.ndarray):
        arrays = [inputs]
    elif isinstance(inputs, Mapping):
        names = list(inputs)
        arrays = [_array(inputs[name], f"input {name!r}") for name in names]
        mask_index = names.index(MASK_NAME) if MASK_NAME in names else None
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        arrays = [_array(a, f"input {i}") for i, a in enumerate(inputs)]
    else:
        raise CompressionError(
            f"model inputs of type {type(inputs).__name__} are not supported; give an array, a list of "
            "arrays in argument order, or a dict input name → array"
        )
    if not arrays:
        raise CompressionError("no model inputs given: pass at least one array of samples")
    if any(a.ndim == 0 for a in arrays):
        raise CompressionError("model inputs must be arrays of samples [N, ...], not scalars")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise CompressionError(f"input arrays have different sample counts {sorted(lengths)}")
    tensors = []
    for array in arrays:
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32, copy=False)
        elif np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.int64, copy=False)  # ids stay integer: embeddings index with them
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)))
    return Batch(tuple(tensors), tensors[mask_index] if mask_index is not None else None)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors (tuple/list/dict/ModelOutput walked in order)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for value in out.values() for t in flat_outputs(value)]
    if isinstance(out, (tuple, list)):
        return [t for value in out for t in flat_outputs(value)]
    return []


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy; TorchScript goes through save/load (a deepcopy's parameters are not leaves,
    so they could not be trained)."""
    import copy
    import io

    import torch

    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)


def set_mode(model: nn.Module, train: bool = False) -> nn.Module:
    """`model.train(train)`, tolerated where unsupported (a torch.export module refuses both modes)."""
    try:
        model.train(train)
    except NotImplementedError:
        pass
    return model


def forward(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Run `model` on one batch (positional inputs) and flatten its outputs."""
    outs = flat_outputs(model(*batch.tensors))
    if not outs:
        raise CompressionError("the model returned no tensors; it must return a tensor or a tuple of them")
    return outs


def run_batched(model: nn.Module, batch: Batch, batch_size: int = 256) -> list[torch.Tensor]:
    """All outputs over every sample, in batches, without gradients (float outputs as float32)."""
    import torch

    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            parts.append(forward(model, batch.take(slice(start, start + batch_size))))
    return [
        torch.cat([p[i] for p in parts]).float()
        if parts[0][i].is_floating_point()
        else torch.cat([p[i] for p in parts])
        for i in range(len(parts[0]))
    ]


def target_tensors(task: str, targets: Targets, count: int) -> Optional[list[torch.Tensor]]:
    """Targets as tensors for `task`, checked against `count` samples (None stays None)."""
    import torch

    if targets is None:
        return None
    check_task(task)
    if isinstance(targets, np.ndarray):
        arrays = [targets]
    elif isinstance(targets, Mapping):
        keys = list(targets)
        if task == "ctc":
            keys = ["y", "y_lengths"] if "y_lengths" in targets else ["y"]
            missing = [k for k in keys if k not in targets]
            if missing:
                raise CompressionError("CTC targets need 'y' (labels [N, S]) and optional 'y_lengths' [N]")
        arrays = [_array(targets[k], f"target {k!r}") for k in keys]
    else:
        arrays = [_array(a, "target") for a in targets]
    if not arrays:
        raise CompressionError("no targets given")
    for array in arrays:
        if len(array) != count:
            raise CompressionError(f"{len(array)} labels for {count} samples: give one label per sample")
    if task == "classification":
        labels = arrays[0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CompressionError(
                f"classification labels must be class ids [N] (integers); got {labels.dtype} {labels.shape}"
            )
        return [torch.from_numpy(labels.astype(np.int64))]
    if task == "ctc":
        labels = arrays[0]
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise CompressionError(
                f"CTC labels must be integer token ids [N, S] padded with 0 or -1; got {labels.dtype} {labels.shape}"
            )
        lengths = arrays[1] if len(arrays) > 1 else (labels > 0).sum(axis=1)
        return [
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(np.asarray(lengths, dtype=np.int64)),
        ]
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]


def take_targets(targets: Optional[list[torch.Tensor]], idx: Any) -> Optional[list[torch.Tensor]]:
    """The rows `idx` of every target tensor."""
    return None if targets is None else [t[idx] for t in targets]


def pooled(output: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Sentence-level embeddings: [N, D] as is; [N, L, D] mean-pooled over the mask (or every token)."""
    if output.dim() <= 2:
        return output.reshape(output.shape[0], -1)
    tokens = output.reshape(output.shape[0], output.shape[1], -1)
    if mask is None or mask.shape[:2] != tokens.shape[:2]:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _ctc(output: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if output.dim() != 3:
        raise CompressionError(
            f"a CTC model must output [N, T, C] per-frame scores; got {tuple(output.shape)}"
        )
    log_probs = F.log_softmax(output.float(), dim=-1).transpose(0, 1)  # ctc_loss wants [T, N, C]
    frames = log_probs.shape[0]
    input_lengths = labels.new_full((labels.shape[0],), frames)
    return F.ctc_loss(log_probs, labels.clamp(min=0), input_lengths, lengths, blank=0, zero_infinity=True)


def _detection(outs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    import torch.nn.functional as F

    if len(targets) > len(outs):
        raise CompressionError(f"{len(targets)} detection targets for a model with {len(outs)} outputs")
    for i, (out, target) in enumerate(zip(outs, targets)):
        if out.shape != target.shape:
            raise CompressionError(
                f"detection target {i} has shape {tuple(target.shape)} but output {i} is {tuple(out.shape)}: "
                "give targets in the model's raw output layout"
            )
    scores, score_targets = outs[0], targets[0]
    loss = F.binary_cross_entropy_with_logits(scores.float(), score_targets)
    n = scores.shape[0]
    positive = score_targets.reshape(n, scores.shape[1], -1).amax(dim=-1) > 0.5 if scores.dim() > 1 else None
    for out, target in zip(outs[1:], targets[1:]):
        diff = (out.float() - target).abs()
        if positive is not None and out.dim() > 1 and out.shape[1] == positive.shape[1]:
            # regressions count on anchors with an object only (background boxes are arbitrary)
            weights = positive.to(diff.dtype).reshape(n, out.shape[1], *([1] * (out.dim() - 2)))
            loss = loss + (diff * weights).sum() / (weights.expand_as(diff).sum().clamp(min=1.0))
        else:
            loss = loss + diff.mean()
    return loss


def supervised_loss(
    task: str, outs: list[torch.Tensor], targets: list[torch.Tensor], mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The task's loss of the outputs against the targets (see module doc)."""
    import torch.nn.functional as F

    if task == "classification":
        logits = outs[0]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[0].reshape(-1))
    if task == "ctc":
        return _ctc(outs[0], targets[0], targets[1])
    if task == "detection":
        return _detection(outs, targets)
    if task == "embedding":
        emb, target = pooled(outs[0].float(), mask), targets[0].reshape(targets[0].shape[0], -1)
        if emb.shape != target.shape:
            raise CompressionError(
                f"target embeddings have shape {tuple(target.shape)}; the model's are {tuple(emb.shape)}"
            )
        return (1.0 - F.cosine_similarity(emb, target, dim=-1)).mean()
    raise CompressionError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL over the last axis, averaged over every other position, scaled by T² (Hinton)."""
    import torch.nn.functional as F

    classes = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (temperature**2)


def distill_loss(
    task: str,
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    *,
    temperature: float = 4.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """How far the student's outputs are from the teacher's, for `task` (see module doc)."""
    import torch.nn.functional as F

    if task in ("classification", "ctc"):
        return _soft_kl(student[0], teacher[0], temperature)
    if task == "detection":
        loss = student[0].new_zeros(())
        for s, t in zip(student, teacher):
            # each raw output on its own scale: box offsets and logits have different ranges
            loss = loss + F.mse_loss(s.float(), t.float()) / (t.float().var() + 1e-6)
        return loss
    if task == "embedding":
        s, t = pooled(student[0].float(), mask), pooled(teacher[0].float(), mask)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise CompressionError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def combined_loss(
    task: str,
    student: list[torch.Tensor],
    teacher: Optional[list[torch.Tensor]],
    targets: Optional[list[torch.Tensor]],
    *,
    temperature: float,
    alpha: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """α·distillation + (1−α)·supervised; either term alone when the other has nothing to compare to."""
    if teacher is None and targets is None:
        raise CompressionError("nothing to learn from: give labels or a teacher")
    if teacher is None:
        assert targets is not None
        return supervised_loss(task, student, targets, mask)
    soft = distill_loss(task, student, teacher, temperature=temperature, mask=mask)
    if targets is None:
        return soft
    return alpha * soft + (1.0 - alpha) * supervised_loss(task, student, targets, mask)


def metric_name(task: str, has_targets: bool) -> str:
    """The validation metric's name: accuracy / cosine (higher is better), else a loss."""
    if task == "classification":
        return "accuracy" if has_targets else "kd_loss"
    if task == "embedding":
        return "cosine"
    return "loss" if has_targets else "kd_loss"


def validation_score(
    task: str,
    outs: list[torch.Tensor],
    targets: Optional[list[torch.Tensor]],
    teacher: Optional[list[torch.Tensor]],
    *,
    temperature: float = 4.0,
    mask: Optional[torch.Tensor] = None,
) -> float:
    """Higher-is-better score: accuracy, mean cosine, or the negated loss (see metric_name)."""
    import torch.nn.functional as F

    if task == "classification" and targets is not None:
        logits = outs[0]
        predicted = logits.reshape(-1, logits.shape[-1]).argmax(-1)
        return float((predicted == targets[0].reshape(-1)).float().mean())
    if task == "embedding":
        reference = teacher[0] if teacher is not None else None
        if targets is not None:
            target = targets[0].reshape(targets[0].shape[0], -1)
        elif reference is not None:
            target = pooled(reference.float(), mask)
        else:
            raise CompressionError("embedding validation needs target embeddings or a teacher")
        return float(F.cosine_similarity(pooled(outs[0].float(), mask), target, dim=-1).mean())
    if targets is not None:
        return -float(supervised_loss(task, outs, targets, mask))
    if teacher is None:
        raise CompressionError("validation needs labels or a teacher")
    return -float(distill_loss(task, outs, teacher, temperature=temperature, mask=mask))


def reported(task: str, has_targets: bool, score: float) -> float:
    """The metric as people read it: losses positive again."""
    return score if metric_name(task, has_targets) in ("accuracy", "cosine") else -score


def pseudo_targets(task: str, outs: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """Targets from the model's own outputs (for gradients without labels); None for embeddings.

    At θ a distortion loss against the model's own outputs has zero gradient, so first-order scores
    need hard targets: the argmax class, the greedy CTC decoding, thresholded detection scores.
    """
    import torch

    if task == "classification":
        return [outs[0].reshape(-1, outs[0].shape[-1]).argmax(-1).reshape(outs[0].shape[:-1])]
    if task == "ctc":
        best = outs[0].argmax(-1)  # [N, T]
        rows = []
        for row in best.tolist():
            tokens, previous = [], 0
            for token in row:
                if token not in (previous, 0):
                    tokens.append(token)
                previous = token
            rows.append(tokens)
        width = max([1, *(len(r) for r in rows)])
        labels = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
            labels[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        return [labels, torch.tensor([len(r) for r in rows], dtype=torch.int64)]
    if task == "detection":
        return [(torch.sigmoid(outs[0].float()) > 0.5).float(), *[o.detach().float() for o in outs[1:]]]
    return None
