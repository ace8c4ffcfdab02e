"""DP-SGD for a softmax head: per-example clipping bounds, the noise scale, device-level clipping and noise shares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefleet.agent.federated.dp import (
    add_noise_share,
    clip_rows,
    clip_update,
    dpsgd_steps,
    head_accuracy,
    noise_share_std,
    privatize_gradients,
    sample_rate,
    softmax_head_grads,
    train_softmax_head,
)


def test_clipping_bounds_every_row_and_keeps_small_ones() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 5, size=(200, 12))
    rows[:10] *= 1e-3

    clipped = clip_rows(rows, 1.5)

    assert np.all(np.linalg.norm(clipped, axis=1) <= 1.5 + 1e-9)
    np.testing.assert_allclose(clipped[:10], rows[:10])
    assert np.linalg.norm(clip_update(rows[10], 1.0)) == pytest.approx(1.0)


def test_noise_scale_is_sigma_times_clip_over_batch() -> None:
    rng = np.random.default_rng(1)
    per_example = np.zeros((50, 4000))

    noisy = privatize_gradients(per_example, clip=2.0, noise_multiplier=1.5, rng=rng)

    # The sum of zero rows is zero, so all that is left is N(0, (1.5·2)²) / 50.
    assert noisy.std() == pytest.approx(1.5 * 2.0 / 50, rel=0.05)
    assert abs(noisy.mean()) < 0.01
    # Without noise the result is the clipped mean.
    rows = np.ones((4, 9))
    np.testing.assert_allclose(privatize_gradients(rows, 1.0, 0.0, rng), np.full(9, 1 / 3))


def test_per_example_grads_match_finite_differences_and_fast_clipping() -> None:
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    x, y = rng.normal(size=(4, 5)), np.array([0, 2, 1, 2])

    grads, _ = softmax_head_grads(w, b, x, y)

    def loss(wf: np.ndarray) -> float:
        _, value = softmax_head_grads(wf[:15].reshape(5, 3), wf[15:], x[:1], y[:1])
        return value

    flat = np.concatenate([w.ravel(), b])
    numeric = np.array([(loss(flat + 1e-6 * e) - loss(flat - 1e-6 * e)) / 2e-6 for e in np.eye(18)])
    np.testing.assert_allclose(grads[0], numeric, atol=1e-6)


def test_noise_shares_add_up_to_the_central_noise() -> None:
    rng = np.random.default_rng(3)
    n, size = 25, 20000

    total = sum(add_noise_share(np.zeros(size), 1.2, 0.5, n, rng) for _ in range(n))

    assert noise_share_std(1.2, 0.5, n) == pytest.approx(1.2 * 0.5 / 5)
    assert np.std(total) == pytest.approx(1.2 * 0.5, rel=0.03)


def test_dpsgd_training_learns_and_noise_hurts() -> None:
    rng = np.random.default_rng(4)
    centers = rng.normal(0, 3, size=(3, 8))
    y = rng.integers(0, 3, size=600)
    x = centers[y] + rng.normal(size=(600, 8))
    w0, b0 = np.zeros((8, 3)), np.zeros(3)

    plain = train_softmax_head(w0, b0, x, y, epochs=3, batch_size=32, lr=0.5, rng=rng)
    private = train_softmax_head(
        w0, b0, x, y, epochs=3, batch_size=32, lr=0.5, rng=rng, clip=1.0, noise_multiplier=1.0
    )
    drowned = train_softmax_head(
        w0, b0, x, y, epochs=3, batch_size=32, lr=0.5, rng=rng, clip=1.0, noise_multiplier=500.0
    )

    assert plain.steps == private.steps == dpsgd_steps(600, 32, 3) == 3 * math.ceil(600 / 32)
    assert sample_rate(600, 32) == pytest.approx(32 / 600)
    assert head_accuracy(plain.weight, plain.bias, x, y) > 0.95
    assert head_accuracy(private.weight, private.bias, x, y) > 0.9
    assert head_accuracy(drowned.weight, drowned.bias, x, y) < head_accuracy(
        private.weight, private.bias, x, y
    )


def test_fedprox_pulls_towards_the_global_head() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(200, 4)), rng.integers(0, 2, size=200)
    w0, b0 = np.zeros((4, 2)), np.zeros(2)

    free = train_softmax_head(w0, b0, x, y, epochs=5, batch_size=16, lr=0.5, rng=np.random.default_rng(0))
    prox = train_softmax_head(
        w0, b0, x, y, epochs=5, batch_size=16, lr=0.5, rng=np.random.default_rng(0), mu=1.0
    )

    assert np.linalg.norm(prox.weight) < np.linalg.norm(free.weight)
    with pytest.raises(ValueError, match="mu"):
        train_softmax_head(
            w0, b0, x, y, epochs=1, batch_size=16, lr=0.5, rng=np.random.default_rng(0), mu=5.0
        )


def test_train_refuses_labels_outside_the_head() -> None:
    with pytest.raises(ValueError, match="labels"):
        train_softmax_head(
            np.zeros((2, 3)),
            np.zeros(3),
            np.zeros((2, 2)),
            np.array([0, 3]),
            epochs=1,
            batch_size=1,
            lr=0.1,
            rng=np.random.default_rng(0),
        )
