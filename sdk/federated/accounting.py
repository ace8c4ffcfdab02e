"""Privacy accounting of federated fine-tuning with Google's dp-accounting (RDP or PLD), never by hand."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Union

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
MIN_NOISE = 0.5


@dataclass(frozen=True)
class PrivacySpent:
    """Privacy one federated run spent: (ε, δ) at `level` ("record" or "device") and the inputs that gave it."""

    level: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    per_device: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form for report.json, the manifest and the dashboard."""
        out = asdict(self)
        out["epsilon"] = _json_float(self.epsilon)
        out["per_device"] = {k: _json_float(v) for k, v in self.per_device.items()}
        return out


def _json_float(value: float) -> Union[float, str]:
    """ε is inf without noise; JSON has no inf, so it is written as the string "inf"."""
    return value if math.isfinite(value) else "inf"


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """The RDP accountant logs a warning for each order it drops (harmless); keep them off the progress lines."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant of `kind` ("rdp": Mironov 2017; "pld": privacy loss distributions, tighter)."""
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; use one of {', '.join(ACCOUNTANTS)}")


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (one DP-SGD step or one DP round)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    """Refuse inputs the accountant would misread, naming the one to fix."""
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}; 1e-5 or 1/(10·N) are usual")


def dpsgd_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps at rate q with noise σ, for `delta` (inf if σ = 0)."""
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _accountant(accountant)
    with _quiet_absl():
        acc.compose(_event(noise_multiplier, sample_rate, steps))
        return float(acc.get_epsilon(delta))


def dpsgd_noise_for(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier σ ≥ 0.5 whose ε after `steps` at rate q is ≤ `epsilon` (calibrate_dp_mechanism)."""
    _check(1.0, sample_rate, steps, delta)
    if not epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {epsilon}")
    if steps == 0:
        return 0.0

    # Below σ = 0.5 DP-SGD is rarely useful and the PLD accountant's grid explodes (38 GiB at σ = 1e-3);
    # when even 0.5 meets the target, 0.5 is returned: more noise than needed, never less.
    if dpsgd_epsilon(MIN_NOISE, sample_rate, steps, delta, accountant) <= epsilon:
        return MIN_NOISE

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return _event(sigma, sample_rate, steps)

    make_fresh: Callable[[], dp_accounting.PrivacyAccountant] = lambda: _accountant(accountant)  # noqa: E731
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            make_fresh,
            make_event,
            epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_NOISE, 2 * MIN_NOISE),
            tol=1e-3,
        )
    # Brent's method returns a value within tol of the optimum; step up until ε really is within budget.
    sigma = float(sigma)
    while dpsgd_epsilon(sigma, sample_rate, steps, delta, accountant) > epsilon:
        sigma += 1e-3
    return sigma


def _record_inputs(samples: int, batch_size: int, local_epochs: int, rounds: int) -> tuple:
    """(q, steps) of one device under record-level DP-SGD: q = batch/N, steps = rounds × epochs × ceil(N/batch)."""
    if samples < 1:
        raise ValueError(f"a device needs at least one sample, got {samples}")
    if batch_size < 1 or local_epochs < 1 or rounds < 0:
        raise ValueError("batch_size and local_epochs must be >= 1 and rounds >= 0")
    q = min(1.0, batch_size / samples)
    return q, rounds * local_epochs * math.ceil(samples / batch_size)


def record_level(
    noise_multiplier: Union[float, Mapping[str, float]],
    delta: float,
    samples_per_device: Mapping[str, int],
    batch_size: int,
    local_epochs: int,
    rounds_per_device: Union[int, Mapping[str, int]],
    accountant: str = "rdp",
) -> PrivacySpent:
    """Record-level ε: DP-SGD on each device; the reported ε is the max over devices (their data are disjoint).

    `rounds_per_device` counts the rounds each device actually trained in (an int when all took part in all);
    `noise_multiplier` is one σ for all or a σ per device (see `record_level_noise_per_device`).
    """
    if not samples_per_device:
        raise ValueError(
            "samples_per_device is empty; pass the local sample count of every device that trained"
        )
    per: Dict[str, float] = {}
    worst = ("", 1.0, 0)
    for device, n in samples_per_device.items():
        rounds = rounds_per_device if isinstance(rounds_per_device, int) else rounds_per_device.get(device, 0)
        q, steps = _record_inputs(int(n), batch_size, local_epochs, int(rounds))
        sigma = _sigma_of(noise_multiplier, device)
        per[device] = dpsgd_epsilon(sigma, q, steps, delta, accountant)
        if not worst[0] or per[device] > per[worst[0]]:
            worst = (device, q, steps)
    sigma = _sigma_of(noise_multiplier, worst[0])
    return PrivacySpent("record", per[worst[0]], delta, sigma, worst[1], worst[2], accountant, per)


def _sigma_of(noise_multiplier: Union[float, Mapping[str, float]], device: str) -> float:
    """The σ one device used: the common one, or its entry in a per-device mapping."""
    if isinstance(noise_multiplier, Mapping):
        if device not in noise_multiplier:
            raise ValueError(f"no noise multiplier for device {device!r}; pass one per device that trained")
        return float(noise_multiplier[device])
    return float(noise_multiplier)


def record_level_noise_for(
    epsilon: float,
    delta: float,
    samples_per_device: Mapping[str, int],
    batch_size: int,
    local_epochs: int,
    rounds: int,
    accountant: str = "rdp",
) -> float:
    """One σ for every device such that each device's record-level ε after `rounds` is ≤ `epsilon`."""
    if not samples_per_device:
        raise ValueError("samples_per_device is empty; pass the local sample count of every device")
    sigmas = []
    # Many devices share a sample count; calibrate each distinct count once.
    for n in sorted(set(int(v) for v in samples_per_device.values())):
        q, steps = _record_inputs(n, batch_size, local_epochs, rounds)
        sigmas.append(dpsgd_noise_for(epsilon, delta, q, steps, accountant))
    return max(sigmas)


def record_level_noise_for_min(
    epsilon: float,
    delta: float,
    min_samples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    accountant: str = "rdp",
) -> float:
    """One σ that keeps record-level ε ≤ `epsilon` for EVERY device holding ≥ `min_samples` examples.

    Calibrating at min_samples alone is not enough: steps per epoch are ceil(N/batch), so ε jumps up at
    N = k·batch + 1 (one more step at q ≈ 1/k). Within one such segment ε falls as N grows, and the peaks
    fall with k (tests/test_federated_math_accounting.py checks it), so the worst N ≥ min_samples is
    min_samples itself or the first peak above it.
    """
    if min_samples < 1 or batch_size < 1:
        raise ValueError(f"need min_samples >= 1 and batch_size >= 1, got {min_samples} and {batch_size}")
    peak = (min_samples + batch_size - 1) // batch_size * batch_size + 1
    candidates = {"min": min_samples, "peak": peak}
    return record_level_noise_for(epsilon, delta, candidates, batch_size, local_epochs, rounds, accountant)


def record_level_noise_per_device(
    epsilon: float,
    delta: float,
    samples_per_device: Mapping[str, int],
    batch_size: int,
    local_epochs: int,
    rounds: int,
    accountant: str = "rdp",
) -> Dict[str, float]:
    """A σ per device, each just reaching `epsilon`: devices with more data get less noise for the same ε."""
    cache: Dict[int, float] = {}
    out: Dict[str, float] = {}
    for device, n in samples_per_device.items():
        if int(n) not in cache:
            q, steps = _record_inputs(int(n), batch_size, local_epochs, rounds)
            cache[int(n)] = dpsgd_noise_for(epsilon, delta, q, steps, accountant)
        out[device] = cache[int(n)]
    return out


def _device_rate(clients_per_round: int, fleet_size: int) -> float:
    """q = clients per round / fleet size: the device-level analogue of the batch sampling rate."""
    if fleet_size < 1 or not 1 <= clients_per_round <= fleet_size:
        raise ValueError(
            f"need 1 <= clients_per_round <= fleet_size, got {clients_per_round} of {fleet_size}"
        )
    return clients_per_round / fleet_size


def device_level(
    noise_multiplier: float,
    delta: float,
    clients_per_round: int,
    fleet_size: int,
    rounds: int,
    accountant: str = "rdp",
) -> PrivacySpent:
    """Device-level ε (DP-FedAvg, McMahan et al. 2018): q = clients per round / fleet, steps = rounds.

    Poisson sampling of devices is assumed, as in the paper; a fixed-size draw is close for large fleets.
    """
    q = _device_rate(clients_per_round, fleet_size)
    eps = dpsgd_epsilon(noise_multiplier, q, rounds, delta, accountant)
    return PrivacySpent("device", eps, delta, noise_multiplier, q, rounds, accountant)


def device_level_noise_for(
    epsilon: float,
    delta: float,
    clients_per_round: int,
    fleet_size: int,
    rounds: int,
    accountant: str = "rdp",
) -> float:
    """σ (relative to the update clip) for a device-level (ε, δ) after `rounds` rounds."""
    return dpsgd_noise_for(epsilon, delta, _device_rate(clients_per_round, fleet_size), rounds, accountant)
