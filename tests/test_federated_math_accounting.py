"""Privacy accounting through dp-accounting: known values, monotony, calibration, record and device level."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from edgefleet.sdk.federated.accounting import (
    device_level,
    device_level_noise_for,
    dpsgd_epsilon,
    dpsgd_noise_for,
    record_level,
    record_level_noise_for,
    record_level_noise_for_min,
)


def test_epsilon_matches_the_library_for_one_setting() -> None:
    # One unsampled Gaussian step: the PLD accountant must agree with the library's exact analytic Gaussian.
    exact = dp_accounting.get_epsilon_gaussian(2.0, 1e-5)

    got = dpsgd_epsilon(2.0, 1.0, 1, 1e-5, accountant="pld")

    assert got == pytest.approx(exact, rel=0.02)
    # Abadi et al.'s MNIST setting (σ = 1.1, q = 256/60000, 60 epochs): RDP value of dp-accounting 0.6.
    assert dpsgd_epsilon(1.1, 256 / 60000, 60 * 235, 1e-5) == pytest.approx(2.6003, abs=0.01)


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    eps = [dpsgd_epsilon(1.0, 0.05, steps, 1e-5) for steps in (10, 100, 1000)]

    assert eps[0] < eps[1] < eps[2]
    assert dpsgd_epsilon(2.0, 0.05, 100, 1e-5) < eps[1]
    assert dpsgd_epsilon(0.0, 0.05, 100, 1e-5) == math.inf
    assert dpsgd_epsilon(1.0, 0.05, 0, 1e-5) == 0.0


def test_noise_for_a_target_epsilon_is_calibrated() -> None:
    sigma = dpsgd_noise_for(4.0, 1e-5, 0.02, 500)

    assert dpsgd_epsilon(sigma, 0.02, 500, 1e-5) <= 4.0
    assert dpsgd_epsilon(sigma * 0.98, 0.02, 500, 1e-5) > 4.0
    # A loose target never gets less than the floor of 0.5.
    assert dpsgd_noise_for(1000.0, 1e-5, 0.02, 5) == 0.5


@pytest.mark.slow
def test_record_level_reports_the_worst_device() -> None:
    spent = record_level(
        1.0, 1e-5, {"small": 80, "big": 800}, batch_size=16, local_epochs=1, rounds_per_device=20
    )

    assert spent.level == "record"
    assert spent.epsilon == max(spent.per_device.values()) == spent.per_device["small"]
    assert spent.sample_rate == pytest.approx(16 / 80)
    assert spent.steps == 20 * 5
    assert spent.to_dict()["per_device"]["big"] < spent.epsilon
    sigma = record_level_noise_for(8.0, 1e-5, {"small": 80, "big": 800}, 16, 1, 20)
    assert record_level(sigma, 1e-5, {"small": 80, "big": 800}, 16, 1, 20).epsilon <= 8.0


def test_device_level_uses_clients_per_round_over_fleet() -> None:
    spent = device_level(1.0, 1e-5, clients_per_round=10, fleet_size=1000, rounds=50)

    assert spent.sample_rate == pytest.approx(0.01)
    assert spent.steps == 50
    assert spent.epsilon == pytest.approx(dpsgd_epsilon(1.0, 0.01, 50, 1e-5))
    assert device_level_noise_for(2.0, 1e-5, 100, 1000, 30) > device_level_noise_for(2.0, 1e-5, 10, 1000, 30)
    with pytest.raises(ValueError, match="clients_per_round"):
        device_level(1.0, 1e-5, clients_per_round=20, fleet_size=10, rounds=5)


@pytest.mark.slow
def test_noise_for_min_samples_covers_every_larger_device() -> None:
    # ε is not monotone in N: one sample over a multiple of the batch adds a step at q ≈ 1.
    sigma = record_level_noise_for_min(8.0, 1e-5, min_samples=32, batch_size=16, local_epochs=1, rounds=10)
    at_min_only = record_level_noise_for(8.0, 1e-5, {"d": 32}, 16, 1, 10)

    eps = [record_level(sigma, 1e-5, {"d": n}, 16, 1, 10).epsilon for n in (32, 33, 48, 49, 200)]

    assert max(eps) <= 8.0
    assert record_level(at_min_only, 1e-5, {"d": 33}, 16, 1, 10).epsilon > 8.0
    peaks = [record_level(1.2, 1e-5, {"d": k * 16 + 1}, 16, 1, 10).epsilon for k in range(1, 5)]
    assert peaks == sorted(peaks, reverse=True)
