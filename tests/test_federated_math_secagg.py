"""Secure aggregation: the sum survives 30 % dropouts, one device's view is hidden, Shamir needs t shares."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest

from edgefleet.agent.federated.aggregate import fedavg
from edgefleet.agent.federated.secagg import (
    PRIME,
    SecAggClient,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    shamir_combine,
    shamir_split,
)


def run_round(
    setup: SecAggSetup,
    updates: Dict[str, np.ndarray],
    weights: Dict[str, float],
    drop_after_masking: Set[str],
    keep_masked: Optional[List[bytes]] = None,
) -> Tuple[np.ndarray, float, SecAggServer]:
    """Drive the four stages in-process; `drop_after_masking` devices mask but never deliver their input."""
    clients = {m: SecAggClient(setup, m, rng=np.random.default_rng(i)) for i, m in enumerate(setup.nodes)}
    server = SecAggServer(setup)
    for m, c in clients.items():
        server.receive_advertise(m, c.advertise())
    for m, c in clients.items():
        server.receive_shares(m, c.share_keys(server.keys_for(m)))
    for m, c in clients.items():
        msg = c.masked_input(server.shares_for(m), updates[m], weights[m])
        if keep_masked is not None:
            keep_masked.append(msg)
        if m not in drop_after_masking:
            server.receive_masked(m, msg)
    request = server.unmask_request()
    for m, c in clients.items():
        if m not in drop_after_masking:
            server.receive_unmask(m, c.unmask(request))
    mean, total = server.result()
    return mean, total, server


@pytest.mark.parametrize("neighbours", [None, 6])
def test_aggregate_equals_fedavg_with_30_percent_dropping_after_masking(neighbours: Optional[int]) -> None:
    rng = np.random.default_rng(1)
    nodes = [f"dev-{i}" for i in range(10)]
    size = 300
    setup = SecAggSetup(
        "round-7", nodes, threshold=4, clip_range=1.0, vector_size=size, max_weight=500, neighbours=neighbours
    )
    updates = {m: rng.normal(0, 0.2, size) for m in nodes}
    weights = {m: float(rng.integers(20, 400)) for m in nodes}
    dropped = set(nodes[2:5])  # 30 %

    mean, total, server = run_round(setup, updates, weights, dropped)

    alive = [m for m in nodes if m not in dropped]
    expected = fedavg([updates[m] for m in alive], [weights[m] for m in alive])
    # Quantization step is 2·clip/levels ≈ 5e-9 here; stochastic rounding keeps the error near it.
    assert np.max(np.abs(mean - expected)) < 1e-6
    assert total == pytest.approx(sum(weights[m] for m in alive), rel=1e-6)
    assert sorted(server.dropped) == sorted(dropped)
    assert sorted(server.survivors) == sorted(alive)


def test_host_view_of_one_device_is_uncorrelated_with_its_update() -> None:
    rng = np.random.default_rng(2)
    nodes = ["a", "b", "c", "d"]
    size = 64
    seen: List[np.ndarray] = []
    truth: List[np.ndarray] = []
    for trial in range(120):
        setup = SecAggSetup(f"trial-{trial}", nodes, threshold=3, clip_range=1.0, vector_size=size)
        updates = {m: rng.uniform(-1, 1, size) for m in nodes}
        masked: List[bytes] = []
        run_round(setup, updates, dict.fromkeys(nodes, 1.0), set(), keep_masked=masked)
        # What the host received from device "a", read as the uint32 ring values.
        seen.append(np.frombuffer(masked[0][13:], dtype="<u4")[:size].astype(np.float64))
        truth.append(updates["a"])
    seen_all = np.concatenate(seen)
    truth_all = np.concatenate(truth)

    corr = np.corrcoef(seen_all, truth_all)[0, 1]
    # Uniform over [0, 2^32): mean 0.5·2^32, each of 8 bins near 1/8 of the values.
    hist, _ = np.histogram(seen_all, bins=8, range=(0, 2**32))

    assert abs(corr) < 0.05
    assert abs(seen_all.mean() / 2**32 - 0.5) < 0.02
    assert np.all(np.abs(hist / seen_all.size - 1 / 8) < 0.02)
    # Without masks the same encoding is almost perfectly correlated: the test can fail.
    plain = (np.clip(truth_all, -1, 1) + 1) / 2 * (2**32 // 4)
    assert np.corrcoef(plain, truth_all)[0, 1] > 0.99


def test_shamir_reconstructs_with_t_shares_and_refuses_fewer() -> None:
    secret = 0xC0FFEE**7 % PRIME
    shares = shamir_split(secret, xs=list(range(1, 8)), threshold=4)

    assert shamir_combine(shares[:4], 4) == secret
    assert shamir_combine(shares[3:], 4) == secret
    with pytest.raises(SecAggError) as err:
        shamir_combine(shares[:3], 4)
    assert err.value.code == "secagg-too-few-shares"
    # t−1 shares interpolated as if they were enough give an unrelated value.
    assert shamir_combine(shares[:3], 3) != secret


def test_round_fails_when_too_few_survive() -> None:
    nodes = [f"n{i}" for i in range(5)]
    setup = SecAggSetup("r", nodes, threshold=4, clip_range=1.0, vector_size=4)
    updates = {m: np.zeros(4) for m in nodes}

    with pytest.raises(SecAggError) as err:
        run_round(setup, updates, dict.fromkeys(nodes, 1.0), {"n0", "n1"})

    assert err.value.code == "secagg-too-few"


def test_client_refuses_request_for_both_shares_of_a_node() -> None:
    nodes = ["a", "b", "c"]
    setup = SecAggSetup("r", nodes, threshold=2, clip_range=1.0, vector_size=3)
    clients = {m: SecAggClient(setup, m) for m in nodes}
    server = SecAggServer(setup)
    for m in nodes:
        server.receive_advertise(m, clients[m].advertise())
    for m in nodes:
        server.receive_shares(m, clients[m].share_keys(server.keys_for(m)))
    for m in nodes:
        server.receive_masked(m, clients[m].masked_input(server.shares_for(m), np.zeros(3)))
    # A curious host lists "b" as survivor and as dropped to learn b's self mask and its private key.
    body = np.array([3, 1, 1, 2, 3, 2], dtype="<u2").tobytes()
    forged = b"SA" + bytes([5]) + setup.tag + body

    with pytest.raises(SecAggError) as err:
        clients["a"].unmask(forged)

    assert err.value.code == "secagg-unsafe-request"


def test_messages_of_another_round_and_impersonation_are_refused() -> None:
    nodes: Sequence[str] = ["a", "b", "c"]
    one = SecAggSetup("r1", nodes, threshold=2, clip_range=1.0, vector_size=3)
    two = SecAggSetup("r2", nodes, threshold=2, clip_range=1.0, vector_size=3)
    advert = SecAggClient(one, "a").advertise()

    with pytest.raises(SecAggError) as wrong_round:
        SecAggServer(two).receive_advertise("a", advert)
    with pytest.raises(SecAggError) as impersonated:
        SecAggServer(one).receive_advertise("b", advert)

    assert wrong_round.value.code == "secagg-wrong-round"
    assert impersonated.value.code == "secagg-impersonation"


def test_setup_round_trips_and_neighbour_graph_is_regular() -> None:
    nodes = [f"n{i}" for i in range(12)]
    setup = SecAggSetup("r9", nodes, threshold=3, clip_range=0.5, vector_size=10, neighbours=4)

    again = SecAggSetup.from_dict(setup.to_dict())
    graph = {m: set(setup.neighbours_of(m)) for m in nodes}

    assert again == setup
    assert all(len(v) == 4 and m not in v for m, v in graph.items())
    assert all(m in graph[j] for m, v in graph.items() for j in v)  # symmetric
    with pytest.raises(ValueError, match="threshold"):
        SecAggSetup("r", nodes, threshold=6, clip_range=1.0, vector_size=1, neighbours=4)
