"""FedAvg weights, the FedProx gradient and the checks that refuse bad updates with a code."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.federated.aggregate import (
    UpdateRejected,
    check_update,
    fedavg,
    fedprox_gradient,
    fedprox_penalty,
    flatten,
    unflatten,
    update_code,
)


def test_fedavg_weights_by_samples() -> None:
    updates = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([3.0, 3.0])]

    mean = fedavg(updates, [10, 30, 60])

    np.testing.assert_allclose(mean, [0.1 + 1.8, 0.3 + 1.8])
    # Equal weights are the plain mean.
    np.testing.assert_allclose(fedavg(updates, [5, 5, 5]), np.mean(updates, axis=0))


def test_fedavg_refuses_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        fedavg([np.zeros(2)], [0])
    with pytest.raises(ValueError, match="one weight each"):
        fedavg([np.zeros(2)], [1, 2])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])


@pytest.mark.parametrize(
    ("update", "samples", "code"),
    [
        (np.zeros(5), 10, None),
        (np.zeros(4), 10, "update-shape"),
        (np.zeros((5, 1)), 10, "update-shape"),
        ([0.0] * 5, 10, "update-shape"),
        (np.array([0, 0, np.nan, 0, 0.0]), 10, "update-not-finite"),
        (np.array([0, np.inf, 0, 0, 0.0]), 10, "update-not-finite"),
        (np.full(5, 1.0), 10, "update-norm"),  # norm √5 > 2
        (np.zeros(5), 0, "update-samples"),
        (np.zeros(5), float("nan"), "update-samples"),
    ],
)
def test_update_checks_return_a_code(update: object, samples: float, code: object) -> None:
    got = update_code(update, expected_size=5, max_norm=2.0, samples=samples)

    assert got == code
    if code is not None:
        with pytest.raises(UpdateRejected) as err:
            check_update(update, 5, 2.0, samples)
        assert err.value.code == code


def test_fedprox_gradient_is_the_gradient_of_the_penalty() -> None:
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=6), rng.normal(size=6)
    eps = 1e-6
    numeric = np.array(
        [
            (fedprox_penalty(w + eps * e, g, 0.3) - fedprox_penalty(w - eps * e, g, 0.3)) / (2 * eps)
            for e in np.eye(6)
        ]
    )

    np.testing.assert_allclose(fedprox_gradient(w, g, 0.3), numeric, rtol=1e-5)
    np.testing.assert_allclose(fedprox_gradient(w, g, 0.0), 0.0)


def test_flatten_round_trips() -> None:
    tensors = [np.arange(6.0).reshape(2, 3), np.array([7.0, 8.0])]

    back = unflatten(flatten(tensors), [(2, 3), (2,)])

    assert [t.shape for t in back] == [(2, 3), (2,)]
    np.testing.assert_array_equal(back[0], tensors[0])
    with pytest.raises(ValueError, match="shapes need"):
        unflatten(np.zeros(7), [(2, 3)])


def test_device_modules_import_only_numpy_and_pynacl() -> None:
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "import edgefleet.agent.federated.aggregate, edgefleet.agent.federated.dp, edgefleet.agent.federated.secagg\n"
        "bad = ('torch', 'onnx', 'fastapi', 'sklearn', 'scipy', 'dp_accounting', 'edgefleet.sdk', 'cryptography')\n"
        "print(json.dumps(sorted(m for m in bad if m in sys.modules)))\n"
    )

    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)

    assert json.loads(out.stdout) == []
