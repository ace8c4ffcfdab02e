"""Per-layer sensitivity as the seed defines it, S = (L − L_perturbed) / L: harm is negative, ranks first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet.sdk.compress import CompressionError
from edgefleet.sdk.compress.sensitivity import pruning_ratios, torch_sensitivity


class TwoPaths(nn.Module):
    """y = strong(x) + weak(x): zeroing `strong` changes the predictions, zeroing `weak` barely does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.strong = nn.Linear(8, 5)
        self.weak = nn.Linear(8, 5)
        with torch.no_grad():
            self.strong.weight.mul_(10.0)
            self.weak.weight.mul_(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.strong(x) + self.weak(x)


@pytest.fixture()
def data() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    model = TwoPaths().eval()
    x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, x, y


@pytest.mark.parametrize("perturbation", ["zero", "prune", "channels", "quantize"])
def test_layer_that_hurts_more_ranks_higher(data, perturbation: str) -> None:
    # prepare
    model, x, y = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # act
    table = torch_sensitivity(model, x, y, perturbation=perturbation, ratio=0.8, bits=4)
    # assert
    assert table.ranking() == ["strong", "weak"]
    scores = table.scores()
    assert scores["strong"] < scores["weak"] <= 1e-6  # L rises when a layer that matters is perturbed
    for key, value in model.state_dict().items():  # the model is restored after each perturbation
        assert torch.equal(value, before[key])


def test_without_labels_scores_output_distortion(data) -> None:
    model, x, _ = data
    table = torch_sensitivity(model, x, perturbation="zero")
    assert table.baseline_loss == 0.0
    assert table.ranking()[0] == "strong"
    assert -1.1 < table.scores()["strong"] < -0.9  # zeroing it removes almost all of the output
    assert not table.normalized
    assert table.to_json()["layers"][0]["layer"] == "strong"


def test_rich_table_lists_every_layer(data) -> None:
    from rich.console import Console

    model, x, y = data
    console = Console(record=True, width=120)
    console.print(torch_sensitivity(model, x, y).to_rich())
    text = console.export_text()
    assert "strong" in text and "weak" in text and "S = (L − L_perturbed) / L" in text
    assert "smallest-|w| weights" in text  # the perturbation used is shown under the table


def test_pruning_ratios_prune_least_sensitive_most(data) -> None:
    model, x, y = data
    table = torch_sensitivity(model, x, y, perturbation="prune")
    ratios = pruning_ratios(table, 0.5)
    assert ratios["weak"] > ratios["strong"]
    mean = sum(ratios[layer.name] * layer.params for layer in table.layers) / sum(
        layer.params for layer in table.layers
    )
    assert mean == pytest.approx(0.5, abs=1e-3)


def test_bad_inputs_raise_clear_errors(data) -> None:
    model, x, y = data
    with pytest.raises(CompressionError, match="not conv/linear"):
        torch_sensitivity(model, x, y, layers=["nope"])
    with pytest.raises(CompressionError, match="labels"):
        torch_sensitivity(model, x, y[:10])
    with pytest.raises(CompressionError, match="ratio"):
        torch_sensitivity(model, x, y, ratio=1.5)
    with pytest.raises(CompressionError, match="unknown perturbation"):
        torch_sensitivity(model, x, y, perturbation="melt")  # type: ignore[arg-type]
    with pytest.raises(CompressionError, match="target pruning ratio"):
        pruning_ratios(torch_sensitivity(model, x, y), 1.2)


def test_score_is_the_seed_formula_with_zeroed_layer(data) -> None:
    # prepare: compute L(θ) and L(θ with `weak` = 0) by hand
    model, x, y = data
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(xt), yt))
        saved = model.weak.weight.clone()
        model.weak.weight.zero_()
        zeroed = float(nn.functional.cross_entropy(model(xt), yt))
        model.weak.weight.copy_(saved)
    # act
    table = torch_sensitivity(model, x, y, perturbation="zero")
    # assert
    assert table.scores()["weak"] == pytest.approx((base - zeroed) / base, rel=1e-5)
    assert table.baseline_loss == pytest.approx(base, rel=1e-6)


def test_table_rows_and_json_keep_formula_and_perturbation(data) -> None:
    import json

    model, x, y = data
    table = torch_sensitivity(model, x, y, perturbation="channels", ratio=0.5)
    rows = table.to_rows()
    assert [row["layer"] for row in rows] == ["strong", "weak"]
    assert rows[0]["rank"] == 1 and rows[0]["S"] == table.scores()["strong"]
    doc = json.loads(json.dumps(table.to_json()))
    assert doc["formula"] == "S = (L − L_perturbed) / L"
    assert doc["perturbation"] == "channels" and "50% output channels" in doc["description"]
    assert doc["loss"] == "cross-entropy" and len(doc["layers"]) == 2


def test_table_prints_as_plain_lines_in_a_pipe(data) -> None:
    import io

    from rich.console import Console

    from edgefleet.sdk.cli.output import print_table

    model, x, y = data
    buffer = io.StringIO()
    print_table(torch_sensitivity(model, x, y, perturbation="zero").to_rich(), Console(file=buffer))
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("Per-layer sensitivity: S = (L − L_perturbed) / L; baseline L =")
    assert lines[2].split()[:2] == ["1", "strong"] and lines[3].split()[:2] == ["2", "weak"]
    assert lines[-1] == "perturbation: every weight of the layer set to 0 (θ_i = 0)"
