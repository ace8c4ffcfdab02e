"""Aggregation of head updates: FedAvg weighted by samples, the FedProx term, and checks that refuse bad updates."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from edgefleet.agent.core.errors import AgentError

# Stable refusal codes (they go into progress lines, telemetry and report.json).
CODE_SAMPLES = "update-samples"
CODE_SHAPE = "update-shape"
CODE_NOT_FINITE = "update-not-finite"
CODE_NORM = "update-norm"
CODES = (CODE_SAMPLES, CODE_SHAPE, CODE_NOT_FINITE, CODE_NORM)


class UpdateRejected(AgentError):
    """An update was refused before aggregation; `code` says which check failed."""

    default_code = CODE_SHAPE


def update_code(
    update: object, expected_size: int, max_norm: Optional[float] = None, samples: float = 1
) -> Optional[str]:
    """Return the refusal code of an update, or None when it may be aggregated."""
    try:
        check_update(update, expected_size, max_norm, samples)
    except UpdateRejected as exc:
        return exc.code
    return None


def check_update(
    update: object, expected_size: int, max_norm: Optional[float] = None, samples: float = 1
) -> None:
    """Raise UpdateRejected unless `update` is a finite flat vector of `expected_size` within `max_norm`."""
    # Samples come from the wire: a zero, negative or NaN count would poison the weighted mean.
    if not isinstance(samples, (int, float, np.integer, np.floating)) or not samples > 0:
        raise UpdateRejected(CODE_SAMPLES, f"samples must be a positive number, got {samples!r}")
    if not isinstance(update, np.ndarray):
        raise UpdateRejected(CODE_SHAPE, f"update must be a numpy array, got {type(update).__name__}")
    if update.ndim != 1 or update.shape[0] != expected_size:
        raise UpdateRejected(
            CODE_SHAPE, f"update has shape {tuple(update.shape)}, the head needs ({expected_size},)"
        )
    if update.dtype.kind not in "fiu":
        raise UpdateRejected(CODE_SHAPE, f"update has dtype {update.dtype}, expected a float vector")
    if not bool(np.all(np.isfinite(update))):
        bad = int(np.count_nonzero(~np.isfinite(update)))
        raise UpdateRejected(CODE_NOT_FINITE, f"update has {bad} NaN/Inf values")
    if max_norm is not None:
        norm = float(np.linalg.norm(update.astype(np.float64)))
        if norm > max_norm * (1 + 1e-6):
            raise UpdateRejected(CODE_NORM, f"update L2 norm {norm:.4g} is over the bound {max_norm:.4g}")


def fedavg(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of flat update vectors (FedAvg, McMahan et al. 2017: weights = local sample counts)."""
    if len(updates) == 0:
        raise ValueError("fedavg needs at least one update; wait for min-clients before aggregating")
    if len(updates) != len(weights):
        raise ValueError(
            f"fedavg got {len(updates)} updates but {len(weights)} weights; pass one weight each"
        )
    w = np.asarray(weights, dtype=np.float64)
    if not bool(np.all(np.isfinite(w))) or bool(np.any(w <= 0)):
        raise ValueError("fedavg weights must be positive finite sample counts")
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    return np.asarray((w[:, None] * stacked).sum(axis=0) / w.sum())


def fedprox_gradient(weights: np.ndarray, global_weights: np.ndarray, mu: float) -> np.ndarray:
    """Gradient of the FedProx term mu/2·‖w − w_global‖² (Li et al. 2020): add it at every local step."""
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    return np.asarray(mu * (np.asarray(weights, dtype=np.float64) - global_weights))


def fedprox_penalty(weights: np.ndarray, global_weights: np.ndarray, mu: float) -> float:
    """Value of the FedProx term mu/2·‖w − w_global‖² (for the local loss that is logged)."""
    diff = np.asarray(weights, dtype=np.float64) - global_weights
    return float(0.5 * mu * float(np.dot(diff.ravel(), diff.ravel())))


def flatten(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate tensors into one float64 vector, in the order given (the head's tensor order)."""
    if len(tensors) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])


def unflatten(vector: np.ndarray, shapes: Sequence[Tuple[int, ...]]) -> List[np.ndarray]:
    """Split a flat vector back into tensors of `shapes` (the inverse of `flatten`)."""
    sizes = [int(math.prod(s)) for s in shapes]
    if sum(sizes) != vector.shape[0]:
        raise ValueError(f"vector has {vector.shape[0]} values, the shapes need {sum(sizes)}")
    out: List[np.ndarray] = []
    start = 0
    for shape, size in zip(shapes, sizes):
        out.append(vector[start : start + size].reshape(shape))
        start += size
    return out
