"""Differential privacy on the device: DP-SGD for a softmax head (record level) and update clipping (device level)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np


def clip_rows(per_example: np.ndarray, clip: float) -> np.ndarray:
    """Scale each row so that its L2 norm is at most `clip` (rows already inside are unchanged)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norms = np.linalg.norm(per_example, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return np.asarray(per_example * scale[:, None])


def privatize_gradients(
    per_example: np.ndarray,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    denominator: Optional[float] = None,
) -> np.ndarray:
    """One DP-SGD gradient: rows clipped to `clip`, summed, N(0, (σ·clip)²) added, divided by the batch size.

    With Poisson sampling pass `denominator` = the expected batch size, so that one example's influence on the
    result does not depend on how many others were drawn (Abadi et al. 2016; Opacus does the same).
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    per_example = np.asarray(per_example, dtype=np.float64)
    if per_example.ndim != 2:
        raise ValueError(f"per_example must be (n, d), got shape {per_example.shape}")
    total = clip_rows(per_example, clip).sum(axis=0)
    if noise_multiplier > 0:
        total = total + rng.normal(0.0, noise_multiplier * clip, size=total.shape)
    n = denominator if denominator is not None else max(per_example.shape[0], 1)
    return np.asarray(total / n)


def clip_update(update: np.ndarray, clip: float) -> np.ndarray:
    """Scale a whole update to L2 norm ≤ `clip` (device-level DP: one device is one record)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    update = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(update))
    return update if norm <= clip else np.asarray(update * (clip / norm))


def noise_share_std(noise_multiplier: float, clip: float, min_clients: int) -> float:
    """Std of the Gaussian each device adds so that the sum over ≥ `min_clients` devices has std ≥ σ·clip.

    With secure aggregation the host never sees one update, so it cannot add the noise after the sum is known
    without trusting itself; instead each device adds N(0, (σ·clip)²/min_clients). Gaussians add, so when
    n ≥ min_clients devices survive the sum carries N(0, (σ·clip)²·n/min_clients) ⊇ the accounted noise; the
    host must abort (not aggregate) a round with fewer than `min_clients` survivors.
    """
    if min_clients < 1:
        raise ValueError(f"min_clients must be >= 1, got {min_clients}")
    return float(noise_multiplier * clip / math.sqrt(min_clients))


def add_noise_share(
    update: np.ndarray, noise_multiplier: float, clip: float, min_clients: int, rng: np.random.Generator
) -> np.ndarray:
    """Device-level DP on the device: clip the update to `clip` and add this device's share of the noise."""
    clipped = clip_update(update, clip)
    std = noise_share_std(noise_multiplier, clip, min_clients)
    return np.asarray(clipped + rng.normal(0.0, std, size=clipped.shape))


def add_central_noise(
    total: np.ndarray, noise_multiplier: float, clip: float, rng: np.random.Generator
) -> np.ndarray:
    """Device-level DP on the host (no secure aggregation): N(0, (σ·clip)²) on the sum of clipped updates."""
    total = np.asarray(total, dtype=np.float64)
    return np.asarray(total + rng.normal(0.0, noise_multiplier * clip, size=total.shape))


def sample_rate(samples: int, batch_size: int) -> float:
    """Poisson sampling rate q = batch / N that the DP-SGD trainer uses (capped at 1)."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"need samples >= 1 and batch_size >= 1, got {samples} and {batch_size}")
    return min(1.0, batch_size / samples)


def dpsgd_steps(samples: int, batch_size: int, epochs: int) -> int:
    """Local steps one round of `train_softmax_head` takes: epochs × ceil(N / batch)."""
    if samples < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(
            f"need samples >= 1, batch_size >= 1, epochs >= 0, got {samples}, {batch_size}, {epochs}"
        )
    return int(epochs * math.ceil(samples / batch_size))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max so large logits do not overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def softmax_head_grads(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray
) -> Tuple[np.ndarray, float]:
    """Per-example gradients of the cross-entropy of softmax(x @ weight + bias), flat as [weight, bias] rows."""
    probs = _softmax(x @ weight + bias)
    n = x.shape[0]
    loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean()) if n else 0.0
    err = probs
    err[np.arange(n), y] -= 1.0
    per_w = (x[:, :, None] * err[:, None, :]).reshape(n, -1)
    return np.concatenate([per_w, err], axis=1), loss


class HeadTrainResult(NamedTuple):
    """What one round of local head training produced."""

    weight: np.ndarray
    bias: np.ndarray
    steps: int
    samples: int
    loss: float


def _clipped_sum(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, clip: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Sum of per-example gradients each clipped to `clip`, without materialising the (n, d·k) matrix.

    For a linear softmax head the per-example gradient is e ⊗ [x, 1] with e = p − onehot(y), so its norm is
    ‖e‖·√(‖x‖² + 1) — the same clipping as `clip_rows` at the cost of one matrix product.
    """
    probs = _softmax(x @ weight + bias)
    probs[np.arange(x.shape[0]), y] -= 1.0
    norms = np.linalg.norm(probs, axis=1) * np.sqrt((x * x).sum(axis=1) + 1.0)
    scaled = probs * np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
    return x.T @ scaled, scaled.sum(axis=0)


def train_softmax_head(
    weight: np.ndarray,
    bias: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    mu: float = 0.0,
    global_weight: Optional[np.ndarray] = None,
    global_bias: Optional[np.ndarray] = None,
    clip: Optional[float] = None,
    noise_multiplier: float = 0.0,
) -> HeadTrainResult:
    """Local SGD on a softmax head y = softmax(x @ weight + bias); DP-SGD when `clip` is set.

    DP-SGD draws each step's batch by Poisson sampling at q = batch/N for epochs × ceil(N/batch) steps, clips
    every per-example gradient to `clip`, adds N(0, (σ·clip)²) to the sum and divides by the expected batch:
    exactly what `dpsgd_steps` / `sample_rate` tell the accountant. Without `clip` it is plain shuffled
    mini-batch SGD. FedProx (mu > 0) adds mu·(w − w_global), which touches no data and so costs no privacy.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, d) and y (n,), got {x.shape} and {y.shape}")
    if x.shape[1] != weight.shape[0] or weight.shape[1] != bias.shape[0]:
        raise ValueError(f"head is {weight.shape} + {bias.shape}, features are {x.shape[1]} wide")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= weight.shape[1]):
        raise ValueError(f"labels must lie in [0, {weight.shape[1]}), got [{int(y.min())}, {int(y.max())}]")
    if mu < 0 or lr * mu >= 2:
        # The proximal term alone is a quadratic with curvature mu: SGD on it diverges once lr·mu ≥ 2.
        raise ValueError(f"FedProx needs 0 <= mu < 2/lr, got mu={mu} with lr={lr}; lower mu or lr")
    n = x.shape[0]
    w = np.array(weight, dtype=np.float64)
    b = np.array(bias, dtype=np.float64)
    gw0 = np.asarray(weight if global_weight is None else global_weight, dtype=np.float64)
    gb0 = np.asarray(bias if global_bias is None else global_bias, dtype=np.float64)
    steps = 0
    if n == 0:
        return HeadTrainResult(w, b, 0, 0, 0.0)
    per_epoch = math.ceil(n / batch_size)
    q = sample_rate(n, batch_size)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(per_epoch):
            if clip is not None:
                idx = np.flatnonzero(rng.random(n) < q)
                gw, gb = _clipped_sum(w, b, x[idx], y[idx], clip)
                if noise_multiplier > 0:
                    gw = gw + rng.normal(0.0, noise_multiplier * clip, size=gw.shape)
                    gb = gb + rng.normal(0.0, noise_multiplier * clip, size=gb.shape)
                denom = q * n
            else:
                idx = order[i * batch_size : (i + 1) * batch_size]
                probs = _softmax(x[idx] @ w + b)
                probs[np.arange(idx.size), y[idx]] -= 1.0
                gw, gb = x[idx].T @ probs, probs.sum(axis=0)
                denom = float(idx.size)
            gw = gw / denom
            gb = gb / denom
            if mu > 0:
                gw = gw + mu * (w - gw0)
                gb = gb + mu * (b - gb0)
            w -= lr * gw
            b -= lr * gb
            steps += 1
    probs = _softmax(x @ w + b)
    loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean())
    return HeadTrainResult(w, b, steps, n, loss)


def head_accuracy(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose top-1 class of x @ weight + bias equals the label."""
    if x.shape[0] == 0:
        return 0.0
    return float(np.mean(np.argmax(x @ weight + bias, axis=1) == y))
