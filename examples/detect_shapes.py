"""Train a small YOLO-class detector on drawn shapes, build it for three devices, compare with plain onnxruntime.

The data is made here: 128×128 scenes of circles, squares and triangles (PIL, random sizes, rotations,
colours, gradient backgrounds, noise and clutter lines), with exact boxes. The model is YOLOv8-like at a
small width: CSP (C2f) blocks, SPPF, a PAN neck and a decoupled anchor-free head on strides 8/16/32.
Post-processing is in the graph (top-100 (anchor, class) pairs, then matrix "fast NMS" per class), so
the model outputs what a device serves and the fleet's scorer reads: boxes (N, 100, 4) as x1, y1, x2, y2
pixels, scores (N, 100) with 0 for padding, classes (N, 100) with -1 for padding. Quality is mAP@0.5 by
`edgefleet.agent.core.quality_tasks.map50` (VOC all-point AP per class, mean over the classes) against
the drawn boxes of held-out scenes. The build runs with `--task detection` for every profile; the table
puts its choices beside plain `quantize_dynamic` and `quantize_static`.

    .venv/bin/python examples/detect_shapes.py [--out DIR] [--profiles rpi4b,rpi5,jetson-orin-nano]
                                               [--train 1500] [--epochs 12] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("circle", "square", "triangle")
SIZE = 128
STRIDES = (8, 16, 32)
# Which pyramid level learns an object, by its longer side in pixels (FCOS-style size ranges).
LEVEL_RANGES = ((0.0, 26.0), (22.0, 50.0), (44.0, 1e9))
TOP_K = 100  # detections per image the model outputs (rows with score 0 are padding)
NMS_IOU = 0.5
MIN_SCORE = 0.03  # lower-scored rows are padding


# ---- data ------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator, away_from: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 90 (L1 over RGB / 3 ≈ 30 per channel) away from the background's mean."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c - away_from).sum() > 90:
            break
    return int(c[0]), int(c[1]), int(c[2])


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a square (r = half diagonal) or an equilateral triangle (r = circumradius)."""
    corners = 4 if kind == "square" else 3
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * i / corners),
            cy + r * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box against many (x1, y1, x2, y2)."""
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def draw_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image (3, 128, 128) float32 in [0, 1], boxes (k, 4) in pixels, classes (k,)."""
    from PIL import Image, ImageDraw

    scale = 2  # drawn at 256² and averaged down: anti-aliased edges as a camera would see them
    side = SIZE * scale
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, side)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((side, side, 3))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    mean_bg = (top + bottom) / 2
    for _ in range(int(rng.integers(0, 4))):  # clutter lines: edges that are not objects
        points = rng.uniform(0, side, 4)
        draw.line(list(points), fill=_colour(rng, mean_bg), width=int(rng.integers(1, 4)) * scale)
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 6))):
        for _attempt in range(20):
            kind = int(rng.integers(0, 3))
            extent = float(rng.uniform(10, 60))  # the box's longer side, in 128² pixels
            if kind == 0:
                r = extent / 2
            elif kind == 1:
                r = (
                    extent / 2 * math.sqrt(2) / rng.uniform(1.0, math.sqrt(2))
                )  # rotated squares fill their box
            else:
                r = extent / math.sqrt(3)
            cx, cy = rng.uniform(r * 0.7, SIZE - r * 0.7, 2)
            angle = float(rng.uniform(0, 2 * math.pi))
            if kind == 0:
                pts = [(cx - r, cy - r), (cx + r, cy + r)]
            else:
                pts = _polygon(CLASSES[kind], cx, cy, r, angle)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = np.clip(np.array([min(xs), min(ys), max(xs), max(ys)]), 0, SIZE)
            if (box[2] - box[0]) < 6 or (box[3] - box[1]) < 6:
                continue
            if boxes and _iou_one(box, np.array(boxes)).max() > 0.15:
                continue
            fill = _colour(rng, mean_bg)
            scaled = [(x * scale, y * scale) for x, y in pts]
            if kind == 0:
                draw.ellipse([scaled[0], scaled[1]], fill=fill)
            else:
                draw.polygon(scaled, fill=fill)
            boxes.append(box)
            classes.append(kind)
            break
    pixels = np.asarray(image, dtype=np.float32).reshape(SIZE, scale, SIZE, scale, 3).mean(axis=(1, 3))
    pixels = pixels + rng.normal(0, rng.uniform(0, 12), pixels.shape)
    x = np.clip(pixels / 255.0, 0, 1).astype(np.float32).transpose(2, 0, 1)
    return x, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int64)


def make_scenes(count: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """`count` scenes: images (count, 3, 128, 128), and the boxes and classes of each."""
    rng = np.random.default_rng(seed)
    scenes = [draw_scene(rng) for _ in range(count)]
    return np.stack([s[0] for s in scenes]), [s[1] for s in scenes], [s[2] for s in scenes]


# ---- model -----------------------------------------------------------------------------------------


def make_detector(width: int = 16) -> Any:
    """A YOLOv8-style detector at `width` base channels: C2f backbone, SPPF, PAN neck, anchor-free head."""
    import torch
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(c_out)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        """CSP block: split, a chain of bottlenecks on one half, every stage concatenated, fused."""

        def __init__(self, c_in: int, c_out: int, n: int = 1) -> None:
            super().__init__()
            half = c_out // 2
            self.cv1 = Conv(c_in, 2 * half, 1)
            self.blocks = nn.ModuleList(Bottleneck(half) for _ in range(n))
            self.cv2 = Conv((2 + n) * half, c_out, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = list(self.cv1(x).chunk(2, dim=1))
            for block in self.blocks:
                parts.append(block(parts[-1]))
            return self.cv2(torch.cat(parts, dim=1))

    class SPPF(nn.Module):
        """Spatial pyramid pooling, fast: three chained 5×5 max-pools concatenated."""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.cv1, self.cv2 = Conv(c, c // 2, 1), Conv(c * 2, c, 1)
            self.pool = nn.MaxPool2d(5, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.cv1(x)
            b = self.pool(a)
            c = self.pool(b)
            return self.cv2(torch.cat([a, b, c, self.pool(c)], dim=1))

    class Head(nn.Module):
        """Decoupled head of one level: box distances (l, t, r, b) and class logits per cell."""

        def __init__(self, c: int, hidden: int, classes: int) -> None:
            super().__init__()
            self.box = nn.Sequential(Conv(c, hidden), Conv(hidden, hidden), nn.Conv2d(hidden, 4, 1))
            logits = nn.Conv2d(hidden, classes, 1)
            assert logits.bias is not None
            nn.init.constant_(logits.bias, -4.0)  # start near "nothing here": a stable BCE without focal loss
            self.cls = nn.Sequential(Conv(c, hidden), Conv(hidden, hidden), logits)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.box(x), self.cls(x)

    class Detector(nn.Module):
        """Input (N, 3, 128, 128) in [0, 1]; outputs post-NMS boxes (x1, y1, x2, y2 pixels), scores, classes."""

        points: torch.Tensor  # (anchors, 2) cell centres in pixels
        strides: torch.Tensor  # (anchors, 1)
        upper: torch.Tensor  # (TOP_K, TOP_K) strictly upper triangle: "row i scores above row j"

        def __init__(self, w: int, classes: int) -> None:
            super().__init__()
            c1, c2, c3, c4, c5 = w, 2 * w, 3 * w, 4 * w, 6 * w
            self.stem = nn.Sequential(Conv(3, c1, 3, 2), Conv(c1, c2, 3, 2), C2f(c2, c2))  # 32²
            self.p3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3))  # 16², stride 8
            self.p4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4))  # 8², stride 16
            self.p5 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5), SPPF(c5))  # 4², stride 32
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.top4 = C2f(c5 + c4, c4)
            self.top3 = C2f(c4 + c3, c3)
            self.down3 = Conv(c3, c3, 3, 2)
            self.bottom4 = C2f(c3 + c4, c4)
            self.down4 = Conv(c4, c4, 3, 2)
            self.bottom5 = C2f(c4 + c5, c5)
            hidden = max(w, 16)
            self.heads = nn.ModuleList(Head(c, hidden, classes) for c in (c3, c4, c5))
            points, strides = [], []
            for s in STRIDES:
                n = SIZE // s
                ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() * s + s / 2)
                strides.append(torch.full((n * n, 1), float(s)))
            self.register_buffer("points", torch.cat(points), persistent=False)
            self.register_buffer("strides", torch.cat(strides), persistent=False)
            self.register_buffer("upper", torch.ones(TOP_K, TOP_K).triu(1), persistent=False)

        def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Decoded boxes (N, A, 4) in pixels and class logits (N, A, classes)."""
            s = self.stem(x)
            p3 = self.p3(s)
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            t4 = self.top4(torch.cat([self.up(p5), p4], 1))
            o3 = self.top3(torch.cat([self.up(t4), p3], 1))
            o4 = self.bottom4(torch.cat([self.down3(o3), t4], 1))
            o5 = self.bottom5(torch.cat([self.down4(o4), p5], 1))
            dist, logits = [], []
            for head, feat in zip(self.heads, (o3, o4, o5)):
                d, c = head(feat)
                dist.append(d.flatten(2).transpose(1, 2))
                logits.append(c.flatten(2).transpose(1, 2))
            ltrb = nn.functional.softplus(torch.cat(dist, 1)) * self.strides
            boxes = torch.cat([self.points - ltrb[..., :2], self.points + ltrb[..., 2:]], -1)
            return boxes, torch.cat(logits, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Post-NMS detections: boxes (N, K, 4), scores (N, K) (0 = suppressed), classes (N, K)."""
            boxes, logits = self.raw(x)
            classes = logits.shape[-1]
            # Top-K over every (anchor, class) pair: a cell unsure between two shapes offers both.
            scores, order = torch.sigmoid(logits).flatten(1).topk(TOP_K, dim=1)  # sorted, best first
            anchor, cls = order // classes, order % classes
            boxes = boxes.gather(1, anchor.unsqueeze(-1).expand(-1, -1, 4))
            # Fast NMS (YOLACT): drop a box when a better-scored box of its class overlaps it by > 0.5.
            # Matrix-only, so it exports to ONNX and TFLite without a NonMaxSuppression operator; the class
            # offset moves boxes of different classes apart so they never suppress each other.
            shifted = boxes + cls.unsqueeze(-1).to(boxes.dtype) * (4.0 * SIZE)
            lt = torch.max(shifted.unsqueeze(2)[..., :2], shifted.unsqueeze(1)[..., :2])
            rb = torch.min(shifted.unsqueeze(2)[..., 2:], shifted.unsqueeze(1)[..., 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            area = (shifted[..., 2:] - shifted[..., :2]).clamp(min=0).prod(-1)
            iou = inter / (area.unsqueeze(2) + area.unsqueeze(1) - inter + 1e-7)
            keep = ((iou * self.upper).max(dim=1).values <= NMS_IOU) & (scores >= MIN_SCORE)
            # Dropped rows become exact padding (zeros, class -1): their order among near-equal low
            # scores may differ between runtimes, and padding makes that invisible.
            weight = keep.to(scores.dtype)
            return (
                boxes * weight.unsqueeze(-1),
                scores * weight,
                torch.where(keep, cls, torch.full_like(cls, -1)),
            )

    return Detector(width, len(CLASSES))


# ---- training --------------------------------------------------------------------------------------


def assign(points: np.ndarray, strides: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """For every anchor point the index of the object it learns, or -1 (background).

    A point learns an object when its level fits the object's size and the point lies inside the box
    within 2.5 strides of its centre; the cell holding the centre always does. Ties go to the smaller box.
    """
    target = np.full(len(points), -1, dtype=np.int64)
    best_area = np.full(len(points), np.inf)
    for i, box in enumerate(boxes):
        extent = max(box[2] - box[0], box[3] - box[1])
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        area = (box[2] - box[0]) * (box[3] - box[1])
        level_ok = np.zeros(len(points), dtype=bool)
        for s, (lo, hi) in zip(STRIDES, LEVEL_RANGES):
            if lo <= extent < hi:
                level_ok |= strides == s
        inside = (
            (points[:, 0] > box[0])
            & (points[:, 0] < box[2])
            & (points[:, 1] > box[1])
            & (points[:, 1] < box[3])
        )
        near = np.abs(points - centre).max(axis=1) < 2.5 * strides
        holds_centre = np.abs(points - centre).max(axis=1) <= strides / 2
        chosen = level_ok & ((inside & near) | holds_centre) & (area < best_area)
        target[chosen] = i
        best_area[chosen] = area
    return target


def box_iou_pairs(a: Any, b: Any) -> tuple[Any, Any]:
    """(IoU, GIoU) of matching rows of two (n, 4) xyxy tensors."""
    import torch

    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(1) + 1e-7
    return iou, iou - (hull - union) / hull


def train(
    model: Any,
    images: np.ndarray,
    boxes: list[np.ndarray],
    classes: list[np.ndarray],
    epochs: int,
    batch: int = 32,
    seed: int = 0,
    log: Any = print,
) -> None:
    """AdamW with a cosine schedule; BCE on IoU-aware class targets, GIoU on the positive points' boxes."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    points = model.points.numpy()
    strides = model.strides.numpy()[:, 0]
    targets = [assign(points, strides, b) for b in boxes]
    flipped_boxes = [_flip(b) for b in boxes]
    flipped_targets = [assign(points, strides, b) for b in flipped_boxes]
    steps = epochs * math.ceil(len(images) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        total, start = 0.0, time.perf_counter()
        for first in range(0, len(order), batch):
            idx = order[first : first + batch]
            flip = bool(rng.random() < 0.5)  # horizontal flip of the whole batch; boxes mirror with it
            x = torch.from_numpy(images[idx])
            if flip:
                x = x.flip(-1)
            pred_boxes, logits = model.raw(x)
            rows, cells, gts, labels = [], [], [], []
            for j, i in enumerate(idx):
                t = flipped_targets[i] if flip else targets[i]
                pos = np.nonzero(t >= 0)[0]
                rows.append(np.full(len(pos), j))
                cells.append(pos)
                gts.append((flipped_boxes[i] if flip else boxes[i])[t[pos]])
                labels.append(classes[i][t[pos]])
            r, p = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cells))
            cls_target = torch.zeros_like(logits)
            loss = torch.zeros(())
            if len(r):
                iou, giou = box_iou_pairs(pred_boxes[r, p], torch.from_numpy(np.concatenate(gts)))
                # IoU-aware targets: a well-placed box scores high, so ranking by score ranks by quality.
                cls_target[r, p, torch.from_numpy(np.concatenate(labels))] = iou.detach().clamp(min=0.05)
                loss = loss + 2.0 * (1 - giou).mean()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum")
            loss = loss + bce / max(1, len(r))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(images):.3f} ({time.perf_counter() - start:.1f} s)"
        )
    model.eval()


def _flip(boxes: np.ndarray) -> np.ndarray:
    """Boxes of the horizontally mirrored image."""
    flipped = boxes.copy()
    flipped[:, [0, 2]] = SIZE - boxes[:, [2, 0]]
    return flipped


# ---- evaluation ------------------------------------------------------------------------------------


def labels_array(boxes: list[np.ndarray], classes: list[np.ndarray]) -> np.ndarray:
    """Detection labels as the quality scorer reads them: (N, G, 5) rows [x1, y1, x2, y2, class], class -1 pads."""
    rows = max([1, *(len(b) for b in boxes)])
    out = np.full((len(boxes), rows, 5), -1.0, dtype=np.float32)
    for i, (b, c) in enumerate(zip(boxes, classes)):
        out[i, : len(b), :4] = b
        out[i, : len(b), 4] = c
    return out


def mean_ap(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """mAP@0.5 of the model's (boxes, scores, classes) against labels, by the fleet's one scorer.

    `edgefleet.agent.core.quality_tasks.map50`: VOC all-point AP per class, mean over classes, the same
    code a device runs for its health check.
    """
    from edgefleet.agent.core.quality_tasks import map50

    return float(map50(outputs, labels=labels)[0])


# ---- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options: output folder, profiles, data and training size, --quick for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for bundles and results.json")
    parser.add_argument(
        "--profiles", default=None, help="comma-separated (default: rpi4b,rpi5,jetson-orin-nano)"
    )
    parser.add_argument("--train", type=int, default=1500, help="training scenes")
    parser.add_argument("--test", type=int, default=400, help="held-out scenes for mAP and the build's eval")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=16, help="base channels of the detector")
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.03,
        help="budget: mAP@0.5 against the fp32 detections ≥ 1 − this",
    )
    parser.add_argument("--quick", action="store_true", help="a small run (≤ 60 s) to check the pipeline")
    return parser.parse_args()


def main() -> int:
    """Draw, train, export, build for each profile, compare; exit 0 when the table was written."""
    import _common
    import torch

    from edgefleet.sdk.build.plan import PlanOptions

    args = parse_args()
    con = _common.console()
    _common.torch_threads()
    profiles = _common.profiles_arg(args.profiles or _common.DEFAULT_PROFILES)
    if args.quick:
        args.train, args.test, args.epochs, args.width = 192, 48, 2, 8
    out = _common.out_dir(args.out, "shapes")

    start = time.perf_counter()
    x_train, b_train, c_train = make_scenes(args.train, seed=1)
    x_test, b_test, c_test = make_scenes(args.test, seed=2)
    con.print(
        f"drew {args.train} training and {args.test} held-out scenes ({sum(len(b) for b in b_test)} objects) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    model = make_detector(args.width)
    params = sum(p.numel() for p in model.parameters())
    con.print(f"detector: {params:,} parameters, {len(model.points)} anchor points on strides {STRIDES}")
    start = time.perf_counter()
    train(model, x_train, b_train, c_train, args.epochs, log=lambda m: con.log(m, highlight=False))
    train_s = time.perf_counter() - start
    y_test = labels_array(b_test, c_test)
    with torch.no_grad():
        parts = [model(torch.from_numpy(x_test[i : i + 64])) for i in range(0, len(x_test), 64)]
    torch_map = mean_ap([torch.cat([p[k] for p in parts]).numpy() for k in range(3)], y_test)
    con.print(f"trained in {train_s:.0f} s: mAP@0.5 {torch_map:.4f} on {args.test} held-out scenes (torch)")

    fp32 = _common.export_onnx(
        model,
        (torch.from_numpy(x_test[:2]),),
        out / "detector_fp32.onnx",
        ["images"],
        ["boxes", "scores", "classes"],
    )

    def quality(path: Path) -> float:
        return mean_ap(_common.run_outputs(path, {"images": x_test}), y_test)

    calib_rows = 128 if not args.quick else 32
    plan = PlanOptions(
        prune_levels=(),  # pruning's fine-tune distils a classifier's logits; a detector needs its own loss
        only=("onnx-int8-static-minmax",) if args.quick else _common.CANDIDATES,
    )
    _common.compare(
        example="detect-shapes",
        model=model,
        fp32_onnx=fp32,
        calib={"images": x_train[:calib_rows]},
        # Scored against the fp32 model's own detections (map50 vs reference; fp32 = 1.0): the budget is
        # how much mAP agreement with fp32 a candidate may lose; the table's mAP is against the labels.
        eval_data={"images": x_test},
        task="detection",
        quality=quality,
        metric="mAP@0.5",
        profiles=profiles,
        out=out,
        plan=plan,
        max_accuracy_drop=args.max_accuracy_drop,
        latency_feed={"images": x_test[:1]},
        con=con,
        extra={
            "train_scenes": args.train,
            "test_scenes": args.test,
            "epochs": args.epochs,
            "parameters": params,
            "train_seconds": round(train_s, 1),
            "torch_map50": torch_map,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
