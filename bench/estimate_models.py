"""Held-out architectures for the estimator (random weights): a YOLO-style detector and a speech encoder.

Neither model's op mix was used to tune the estimator; bench/estimate.py and tests/test_estimate_*.py
cost and time them. `yolo_detector()` is a YOLOv8n-like CSP (C2f) backbone, SPPF and PAN neck with
three decoupled heads (~2.6 M parameters, input 1×3×320×320); `speech_encoder()` is a 4-layer
Transformer CTC encoder over 80 log-mel bins × 300 frames (two stride-2 1-D convolutions, then
pre-norm encoder layers, then a CTC projection). `width`/`depth`/`frames` shrink them for tests.
"""

from __future__ import annotations

from typing import Any


def _modules() -> Any:
    import torch
    from torch import nn

    class ConvBnSiLU(nn.Module):
        """Conv → BatchNorm → SiLU, YOLO's basic block."""

        def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(cout)
            self.act = nn.SiLU()

        def forward(self, x: Any) -> Any:
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        """Two 3×3 convolutions with an optional residual."""

        def __init__(self, c: int, shortcut: bool) -> None:
            super().__init__()
            self.cv1 = ConvBnSiLU(c, c, 3)
            self.cv2 = ConvBnSiLU(c, c, 3)
            self.add = shortcut

        def forward(self, x: Any) -> Any:
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        """CSP block with n bottlenecks whose outputs are all concatenated (YOLOv8's C2f)."""

        def __init__(self, cin: int, cout: int, n: int, shortcut: bool = True) -> None:
            super().__init__()
            self.c = cout // 2
            self.cv1 = ConvBnSiLU(cin, 2 * self.c, 1)
            self.cv2 = ConvBnSiLU((2 + n) * self.c, cout, 1)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x: Any) -> Any:
            ys = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                ys.append(m(ys[-1]))
            return self.cv2(torch.cat(ys, 1))

    class SPPF(nn.Module):
        """Spatial pyramid pooling, fast: three chained 5×5 max-pools concatenated."""

        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            hidden = cin // 2
            self.cv1 = ConvBnSiLU(cin, hidden, 1)
            self.cv2 = ConvBnSiLU(hidden * 4, cout, 1)
            self.pool = nn.MaxPool2d(5, 1, 2)

        def forward(self, x: Any) -> Any:
            x = self.cv1(x)
            y1 = self.pool(x)
            y2 = self.pool(y1)
            return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))

    class Detector(nn.Module):
        """Backbone (C2f) → SPPF → PAN neck → per-level box (4×16 DFL bins) and class heads."""

        def __init__(self, width: float, depth: float, classes: int) -> None:
            super().__init__()

            def ch(c: int) -> int:
                return max(8, int(c * width) // 8 * 8)

            def n(k: int) -> int:
                return max(1, round(k * depth))

            c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
            self.stem = nn.Sequential(ConvBnSiLU(3, c1, 3, 2), ConvBnSiLU(c1, c2, 3, 2), C2f(c2, c2, n(3)))
            self.p3 = nn.Sequential(ConvBnSiLU(c2, c3, 3, 2), C2f(c3, c3, n(6)))
            self.p4 = nn.Sequential(ConvBnSiLU(c3, c4, 3, 2), C2f(c4, c4, n(6)))
            self.p5 = nn.Sequential(ConvBnSiLU(c4, c5, 3, 2), C2f(c5, c5, n(3)), SPPF(c5, c5))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.td4 = C2f(c5 + c4, c4, n(3), False)
            self.td3 = C2f(c4 + c3, c3, n(3), False)
            self.down3 = ConvBnSiLU(c3, c3, 3, 2)
            self.bu4 = C2f(c3 + c4, c4, n(3), False)
            self.down4 = ConvBnSiLU(c4, c4, 3, 2)
            self.bu5 = C2f(c4 + c5, c5, n(3), False)
            box, cls = max(16, c3 // 4, 64), max(c3, min(classes, 100))
            self.box = nn.ModuleList(
                nn.Sequential(ConvBnSiLU(c, box, 3), ConvBnSiLU(box, box, 3), nn.Conv2d(box, 64, 1))
                for c in (c3, c4, c5)
            )
            self.cls = nn.ModuleList(
                nn.Sequential(ConvBnSiLU(c, cls, 3), ConvBnSiLU(cls, cls, 3), nn.Conv2d(cls, classes, 1))
                for c in (c3, c4, c5)
            )

        def forward(self, x: Any) -> Any:
            x3 = self.p3(self.stem(x))
            x4 = self.p4(x3)
            x5 = self.p5(x4)
            t4 = self.td4(torch.cat([self.up(x5), x4], 1))
            t3 = self.td3(torch.cat([self.up(t4), x3], 1))
            b4 = self.bu4(torch.cat([self.down3(t3), t4], 1))
            b5 = self.bu5(torch.cat([self.down4(b4), x5], 1))
            outs = []
            for level, feat in enumerate((t3, b4, b5)):
                y = torch.cat([self.box[level](feat), self.cls[level](feat)], 1)
                outs.append(y.flatten(2))
            return torch.cat(outs, 2)

    class SpeechEncoder(nn.Module):
        """80 log-mel × frames → 2 stride-2 Conv1d + GELU → pre-norm Transformer layers → CTC logits."""

        def __init__(self, d_model: int, layers: int, heads: int, vocab: int, distinct: bool) -> None:
            super().__init__()
            self.subsample = nn.Sequential(
                nn.Conv1d(80, d_model, 3, 2, 1), nn.GELU(), nn.Conv1d(d_model, d_model, 3, 2, 1), nn.GELU()
            )
            layer = nn.TransformerEncoderLayer(
                d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            # TransformerEncoder deep-copies one layer: draw each layer's weights again, or every layer
            # holds the same tensors (which the ONNX exporter stores once, a model unlike a trained one)
            for module in self.encoder.modules() if distinct else ():
                reset = getattr(module, "_reset_parameters", None) or getattr(
                    module, "reset_parameters", None
                )
                if reset is not None and module is not self.encoder:
                    reset()
            self.norm = nn.LayerNorm(d_model)
            self.ctc = nn.Linear(d_model, vocab)

        def forward(self, mel: Any) -> Any:
            x = self.subsample(mel).transpose(1, 2)
            return self.ctc(self.norm(self.encoder(x))).log_softmax(-1)

    return Detector, SpeechEncoder


def yolo_detector(width: float = 0.23, depth: float = 0.34, classes: int = 80, seed: int = 0) -> Any:
    """A YOLOv8n-like detector with random weights (width 0.23, depth 0.34: 2.63 M parameters)."""
    import torch

    torch.manual_seed(seed)
    detector, _ = _modules()
    return detector(width, depth, classes).eval()


def speech_encoder(
    d_model: int = 256, layers: int = 4, heads: int = 4, vocab: int = 32, seed: int = 0, distinct: bool = True
) -> Any:
    """A 4-layer Transformer CTC encoder over 80 log-mel bins, random weights (3.4 M parameters).

    `distinct=False` keeps nn.TransformerEncoder's copies of one layer: the exporter then stores the
    shared weights once and onnxruntime's optimized graph, which folds them per layer, is bigger.
    """
    import torch

    torch.manual_seed(seed)
    _, encoder = _modules()
    return encoder(d_model, layers, heads, vocab, distinct).eval()


def parameters(module: Any) -> int:
    """Number of parameters of a torch module."""
    return int(sum(p.numel() for p in module.parameters()))
