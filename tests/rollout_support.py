"""Helpers of the rollout tests (issue 14): two tiny classifiers that disagree on a chosen share of inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from tests.agent_net_support import CLASSES, IN_FEATURES


def export_linear(path: Path, weight: np.ndarray, bias: np.ndarray) -> Path:
    """A linear classifier `x` [N, 8] → `logits` [N, 4] with the given weights, exported to ONNX."""
    import torch

    layer = torch.nn.Linear(IN_FEATURES, CLASSES)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    model = torch.nn.Sequential(layer).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, IN_FEATURES),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    return path


def live_inputs(n: int, seed: int = 7) -> np.ndarray:
    """Unlabelled "live" inputs, standard normal rows."""
    return np.random.default_rng(seed).standard_normal((n, IN_FEATURES)).astype(np.float32)


def disagreeing_pair(d: Path, share: float = 0.3) -> tuple[Path, Path, float]:
    """(v1 model, v2 model, measured disagreement): v2 is v1 plus noise scaled so that top-1 differs on
    about `share` of standard-normal inputs."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((CLASSES, IN_FEATURES)), rng.standard_normal(CLASSES) * 0.1
    noise = np.random.default_rng(1).standard_normal((CLASSES, IN_FEATURES))
    x = live_inputs(4000, seed=11).astype(np.float64)
    top1 = (x @ w1.T + b1).argmax(1)
    best, best_gap = 0.0, 2.0
    for scale in np.linspace(0.05, 3.0, 120):
        other = (x @ (w1 + scale * noise).T + b1).argmax(1)
        gap = abs(float((other != top1).mean()) - share)
        if gap < best_gap:
            best, best_gap = float(scale), gap
    w2 = w1 + best * noise
    measured = float(((x @ w2.T + b1).argmax(1) != top1).mean())
    return export_linear(d / "v1.onnx", w1, b1), export_linear(d / "v2.onnx", w2, b1), measured


def export_heavy(path: Path, seed: int = 0, layers: int = 4) -> Path:
    """A classifier with the tiny model's signature (`x` [N, 8] → `logits` [N, 4]) but ~tens of ms of
    convolutions per row on one core: a model an rpi4b runs well within its 100 ms budget and far
    above a Jetson's 20 ms one, with few weights (a small bundle)."""
    import torch

    torch.manual_seed(seed)

    class Heavy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(IN_FEATURES, 48 * 48)
            convs: list[torch.nn.Module] = [torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU()]
            for _ in range(layers):
                convs += [torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU()]
            self.convs = torch.nn.Sequential(*convs)
            self.head = torch.nn.Linear(32, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x).reshape(-1, 1, 48, 48)
            y = self.convs(y).mean(dim=(2, 3))
            return self.head(y)

    model = Heavy().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, IN_FEATURES),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    return path
