"""Pruning: global/sensitivity magnitude pruning, structured channel pruning that narrows layers, fine-tune."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet.sdk.compress import COMPRESSORS, CompressionContext, CompressionError
from edgefleet.sdk.compress.prune import channel_prune, count_params, magnitude_prune
from edgefleet.sdk.compress.sensitivity import prunable_layers
from edgefleet.sdk.zoo import accuracy, trained_digits_cnn


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, object]:
    torch.set_num_threads(1)
    return trained_digits_cnn(epochs=15)


def weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in prunable_layers(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_global_magnitude_prune_zeroes_the_requested_fraction(digits) -> None:
    # prepare
    model, split = digits
    pruned = copy.deepcopy(model)
    # act
    stats = magnitude_prune(pruned, 0.5)
    # assert
    assert weight_sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    assert stats.params_after == stats.params_before  # unstructured: same shapes, zeros inside
    assert stats.zeros_after > stats.zeros_before
    assert accuracy(pruned, split.x_test, split.y_test) > accuracy(model, split.x_test, split.y_test) - 0.05


def test_per_layer_ratios_are_applied_per_layer(digits) -> None:
    model, _ = digits
    pruned = copy.deepcopy(model)
    names = list(prunable_layers(pruned))
    ratios = {names[0]: 0.1, names[-1]: 0.7}
    magnitude_prune(pruned, 0.5, ratios=ratios)
    layers = prunable_layers(pruned)
    assert float((layers[names[0]].weight == 0).float().mean()) == pytest.approx(0.1, abs=0.02)
    assert float((layers[names[-1]].weight == 0).float().mean()) == pytest.approx(0.7, abs=0.02)
    assert float((layers[names[1]].weight == 0).float().mean()) < 0.01  # not named: untouched


def test_channel_prune_physically_removes_channels(digits) -> None:
    model, split = digits
    pruned = copy.deepcopy(model)
    stats = channel_prune(pruned, split.x_train[:8], 0.5)
    widths = [m.weight.shape[0] for m in prunable_layers(pruned).values()]
    assert widths[:-1] == [8, 16, 32, 32]  # half of 16, 32, 64, 64
    assert widths[-1] == 10  # the output layer keeps every class
    assert stats.params_after < 0.4 * stats.params_before
    with torch.no_grad():
        assert pruned(torch.from_numpy(split.x_test[:3])).shape == (3, 10)


def test_channel_prune_step_with_sensitivity_and_finetune_recovers_accuracy(digits, tmp_path: Path) -> None:
    # prepare
    model, split = digits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = CompressionContext(
        workdir=tmp_path,
        calib={"x": split.x_train},
        calib_labels=split.y_train,
        eval_inputs={"x": split.x_test},
        eval_labels=split.y_test,
    )
    step = COMPRESSORS.get("prune-channels")(amount=0.5, by_sensitivity=True, finetune_epochs=8)
    # act
    pruned = step.apply(model, ctx)
    # assert
    base = accuracy(model, split.x_test, split.y_test)
    assert count_params(pruned)[0] < 0.45 * count_params(model)[0]
    assert accuracy(pruned, split.x_test, split.y_test) >= base - 0.03
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    described = step.describe()
    assert described["stats"]["params_after"] == count_params(pruned)[0]
    assert described["finetune"]["metric"] == "accuracy"
    assert len(set(described["stats"]["ratios"].values())) > 1  # sensitivity spread the ratios


def test_magnitude_step_finetune_keeps_pruned_weights_zero(digits, tmp_path: Path) -> None:
    model, split = digits
    ctx = CompressionContext(workdir=tmp_path, calib={"x": split.x_train}, calib_labels=split.y_train)
    pruned = COMPRESSORS.get("prune-magnitude")(amount=0.6, finetune_epochs=3).apply(model, ctx)
    assert weight_sparsity(pruned) >= 0.59


def test_bad_pruning_requests_raise(digits, tmp_path: Path) -> None:
    model, split = digits
    with pytest.raises(CompressionError, match="amount"):
        magnitude_prune(copy.deepcopy(model), 1.0)
    with pytest.raises(CompressionError, match="does not have"):
        magnitude_prune(copy.deepcopy(model), 0.5, ratios={"missing": 0.3})
    with pytest.raises(CompressionError, match="not conv/linear"):
        channel_prune(copy.deepcopy(model), split.x_train[:4], 0.5, ignored=["nope"])
    with pytest.raises(CompressionError, match="calib"):
        COMPRESSORS.get("prune-channels")(amount=0.5).apply(model, CompressionContext(workdir=tmp_path))
    with pytest.raises(CompressionError, match="no convolution or linear"):
        magnitude_prune(nn.Sequential(nn.ReLU()), 0.5)
    assert np.isfinite(accuracy(model, split.x_test, split.y_test))
