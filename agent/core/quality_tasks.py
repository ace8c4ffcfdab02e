"""Task metrics of the quality scorer: detection mAP@0.5, CTC token error rate, embedding cosine, `auto`.

Numpy only (Python 3.8), imported by agent/core/quality.py on the host and on devices. The formats each
scorer reads (model outputs, labels `y`, reference outputs) are listed in docs/quality.md.

- Detections: one output (N, K, 6) of post-NMS rows [x1, y1, x2, y2, score, class], or three outputs
  boxes (N, K, 4), scores (N, K), classes (N, K). Rows with score <= 0, class < 0 or a NaN are padding.
- Detection labels `y`: (N, G, 5) rows [x1, y1, x2, y2, class]; rows with class < 0 are padding.
- CTC: the first output (N, T, C) is per-frame scores (greedy decode: argmax, collapse repeats, drop the
  blank, index 0 by default), or (N, T) integer frame tokens; labels `y` (N, L) integer tokens, padded
  with negative values.
- Embedding: the first output (N, ..., D) holds vectors along its last axis; labels `y` are target
  vectors of the same shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from edgefleet.agent.core.errors import AgentError

if TYPE_CHECKING:
    import numpy as np

CLASSIFICATION = "classification"
DETECTION = "detection"
CTC = "ctc"
EMBEDDING = "embedding"
AUTO = "auto"
TASKS = (CLASSIFICATION, DETECTION, CTC, EMBEDDING)
IOU_THRESHOLD = 0.5
CTC_BLANK = 0


class TaskDataError(AgentError, ValueError):
    """Outputs, labels or reference outputs do not fit the task's format; the reason names the fix."""

    default_code = "eval-invalid"


def _bad(reason: str) -> TaskDataError:
    return TaskDataError("eval-invalid", reason)


def _shape(array: Any) -> Tuple[int, ...]:
    import numpy as np

    return tuple(int(d) for d in np.shape(array))


# ---- detection -----------------------------------------------------------------------------------


def _is_integral(values: np.ndarray) -> bool:
    import numpy as np

    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def _three_outputs(outputs: Sequence[Any]) -> bool:
    """Whether the outputs are (boxes (N, K, 4), scores (N, K), classes (N, K))."""
    if len(outputs) != 3:
        return False
    boxes, scores, classes = (_shape(o) for o in outputs)
    return len(boxes) == 3 and boxes[2] == 4 and scores == boxes[:2] and classes == boxes[:2]


def _rows_form(output: Any) -> bool:
    """Whether one output is post-NMS rows (N, K, 6) with integral classes (or padding) in column 5."""
    import numpy as np

    shape = _shape(output)
    if len(shape) != 3 or shape[2] != 6:
        return False
    arr = np.asarray(output, dtype=np.float64)
    return _is_integral(np.nan_to_num(arr[..., 5], nan=-1.0))


def is_detection_output(outputs: Sequence[Any]) -> bool:
    """Whether the model's outputs are in a detection format this scorer reads."""
    return bool(outputs) and (_three_outputs(outputs) or _rows_form(outputs[0]))


def detections(outputs: Sequence[Any]) -> List[np.ndarray]:
    """Per image, the (k, 6) rows [x1, y1, x2, y2, score, class] of real detections (padding removed)."""
    import numpy as np

    if _three_outputs(outputs):
        boxes, scores, classes = (np.asarray(o, dtype=np.float64) for o in outputs)
        rows = np.concatenate([boxes, scores[..., None], classes[..., None]], axis=2)
    elif outputs and len(_shape(outputs[0])) == 3 and _shape(outputs[0])[2] == 6:
        rows = np.asarray(outputs[0], dtype=np.float64)
    else:
        raise _bad(
            f"detection outputs must be post-NMS rows (N, K, 6) [x1, y1, x2, y2, score, class] or three "
            f"outputs boxes (N, K, 4), scores (N, K), classes (N, K); got shapes {[_shape(o) for o in outputs]}"
        )
    # A quantized model's class column may come back as 1.98 for 2: classes are whole numbers.
    rows = rows.copy()
    rows[..., 5] = np.rint(rows[..., 5])
    out = []
    for image in rows:
        keep = np.all(np.isfinite(image), axis=1) & (image[:, 4] > 0) & (image[:, 5] >= 0)
        out.append(image[keep])
    return out


def ground_truth(labels: Any) -> List[np.ndarray]:
    """Per image, the (g, 5) label rows [x1, y1, x2, y2, class] (rows with class < 0 are padding)."""
    import numpy as np

    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 5:
        raise _bad(
            f"detection labels `y` must be (N, G, 5) rows [x1, y1, x2, y2, class], padded with class -1; "
            f"got shape {_shape(labels)}"
        )
    if not _is_integral(np.nan_to_num(arr[..., 4], nan=-1.0)):
        raise _bad("the class column (last) of detection labels `y` must hold whole numbers")
    return [image[np.all(np.isfinite(image), axis=1) & (image[:, 4] >= 0)] for image in arr]


def reference_truth(reference: Sequence[Any], min_score: float = 0.0) -> List[np.ndarray]:
    """The fp32 model's detections as ground truth: rows with score > min_score, as [x1, y1, x2, y2, class]."""
    import numpy as np

    out = []
    for image in detections(reference):
        kept = image[image[:, 4] > min_score]
        out.append(np.concatenate([kept[:, :4], kept[:, 5:6]], axis=1))
    return out


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box [x1, y1, x2, y2] with each row of `boxes` (continuous coords)."""
    import numpy as np

    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    inter = w * h
    area = max(0.0, float((box[2] - box[0]) * (box[3] - box[1])))
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-300), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC (2010+) all-point interpolated AP: area under the precision envelope over recall."""
    import numpy as np

    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def mean_average_precision(
    found: Sequence[np.ndarray], truth: Sequence[np.ndarray], threshold: float = IOU_THRESHOLD
) -> Tuple[float, int]:
    """(mAP at IoU >= threshold, number of classes with ground truth); VOC matching, per class.

    Detections of a class, over all images, are taken by descending score (ties: image order, then row
    order); each matches the ground-truth box of its class and image with the highest IoU, a true
    positive when that IoU >= threshold and the box is not matched yet, else a false positive. Classes
    without ground truth are left out; with no ground truth at all the score is 1.0 when nothing was
    detected either, else 0.0.
    """
    import numpy as np

    if len(found) != len(truth):
        raise _bad(f"{len(found)} images of detections for {len(truth)} images of ground truth")
    classes = sorted({int(c) for image in truth for c in image[:, 4]})
    if not classes:
        return (1.0 if all(len(image) == 0 for image in found) else 0.0), 0
    aps = []
    for cls in classes:
        gts = [image[image[:, 4] == cls, :4] for image in truth]
        npos = sum(len(g) for g in gts)
        dets = [
            (-float(row[4]), i, j)
            for i, image in enumerate(found)
            for j, row in enumerate(image)
            if row[5] == cls
        ]
        dets.sort()
        matched = [np.zeros(len(g), dtype=bool) for g in gts]
        tp = np.zeros(len(dets))
        for k, (_, i, j) in enumerate(dets):
            if len(gts[i]) == 0:
                continue
            overlaps = iou(found[i][j, :4], gts[i])
            best = int(np.argmax(overlaps))
            if overlaps[best] >= threshold and not matched[i][best]:
                matched[i][best] = True
                tp[k] = 1.0
        ctp = np.cumsum(tp)
        cfp = np.cumsum(1.0 - tp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, 1e-300)
        aps.append(average_precision(recall, precision))
    return float(np.mean(aps)), len(classes)


def map50(
    outputs: Sequence[Any], *, labels: Any = None, reference: Optional[Sequence[Any]] = None
) -> Tuple[float, int]:
    """mAP@0.5 of the outputs' detections against labels `y`, else against the reference's detections."""
    found = detections(outputs)
    if labels is not None:
        truth = ground_truth(labels)
    elif reference is not None:
        truth = reference_truth(reference)
    else:
        raise _bad("mAP@0.5 needs labels `y` or reference outputs")
    return mean_average_precision(found, truth)


# ---- CTC -----------------------------------------------------------------------------------------


def greedy_decode(output: Any, blank: int = CTC_BLANK) -> List[List[int]]:
    """Per row: argmax per frame (or the given frame tokens), repeats collapsed, blanks dropped."""
    import numpy as np

    arr = np.asarray(output)
    if arr.ndim == 3:
        frames = arr.argmax(axis=2)
    elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        frames = arr
    else:
        raise _bad(
            f"a CTC output must be per-frame scores (N, T, C) or integer frame tokens (N, T); got shape "
            f"{_shape(output)} ({arr.dtype})"
        )
    out = []
    for row in frames:
        tokens: List[int] = []
        previous = None
        for t in row.tolist():
            if t not in (previous, blank):
                tokens.append(int(t))
            previous = t
        out.append(tokens)
    return out


def label_tokens(labels: Any, blank: int = CTC_BLANK) -> List[List[int]]:
    """Per row, the target tokens of labels `y` (N, L): negative padding and the blank removed."""
    import numpy as np

    arr = np.asarray(labels)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or _is_integral(arr.astype(np.float64))):
        raise _bad(
            f"CTC labels `y` must be integer tokens (N, L) padded with -1; got {_shape(labels)} ({arr.dtype})"
        )
    return [[int(t) for t in row.tolist() if t >= 0 and t != blank] for row in arr.astype(np.int64)]


def edit_distance(hyp: Sequence[int], ref: Sequence[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    previous = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        current = [i] + [0] * len(ref)
        for j, r in enumerate(ref, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r))
        previous = current
    return previous[-1]


def token_error_rate(
    outputs: Sequence[Any],
    *,
    labels: Any = None,
    reference: Optional[Sequence[Any]] = None,
    blank: int = CTC_BLANK,
) -> Tuple[float, int, float]:
    """(token error rate, reference tokens, exact-match share): edit distances over reference length.

    The reference sequence is labels `y`, else the greedy decode of the reference's first output. With
    no reference tokens at all the rate is 0.0 when every hypothesis is empty, else 1.0.
    """
    hyps = greedy_decode(outputs[0], blank)
    if labels is not None:
        refs = label_tokens(labels, blank)
    elif reference is not None:
        refs = greedy_decode(reference[0], blank)
    else:
        raise _bad("the token error rate needs labels `y` or reference outputs")
    if len(refs) != len(hyps):
        raise _bad(f"{len(refs)} reference sequences for {len(hyps)} output rows; give one per row")
    errors = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
    total = sum(len(r) for r in refs)
    exact = sum(1 for h, r in zip(hyps, refs) if h == r) / max(1, len(refs))
    if total == 0:
        return (0.0 if all(not h for h in hyps) else 1.0), 0, exact
    return errors / total, total, exact


# ---- embedding -----------------------------------------------------------------------------------


def embedding_cosines(
    outputs: Sequence[Any], *, labels: Any = None, reference: Optional[Sequence[Any]] = None
) -> np.ndarray:
    """cosine of every embedding vector (the last axis of the first output) to its target vector."""
    import numpy as np

    got = np.asarray(outputs[0], dtype=np.float64)
    if labels is not None:
        target = np.asarray(labels, dtype=np.float64)
    elif reference is not None:
        target = np.asarray(reference[0], dtype=np.float64)
    else:
        raise _bad("the embedding cosine needs target vectors `y` or reference outputs")
    if got.ndim < 2 or got.shape != target.shape:
        raise _bad(
            f"embeddings of shape {_shape(got)} need targets of the same shape (N, ..., D); got {_shape(target)}"
        )
    g = got.reshape(-1, got.shape[-1])
    r = target.reshape(-1, got.shape[-1])
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    dots = np.sum(g * r, axis=1)
    same = np.all(g == r, axis=1)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-300), np.where(same, 1.0, 0.0))


# ---- auto ----------------------------------------------------------------------------------------


def infer_task(outputs: Sequence[Any], labels: Any = None, reference: Optional[Sequence[Any]] = None) -> str:
    """The task `auto` picks from the outputs' shapes and dtypes and the labels present (docs/quality.md).

    In order: detection labels (N, G, 5), or reference outputs in a detection format (with the outputs
    shaped alike) → detection; integer labels (N, L>1)
    with a 3-D first output → ctc; float labels shaped like the first output → embedding; else
    classification (scored as before tasks existed: accuracy with labels, fidelity with reference).
    """
    import numpy as np

    first = _shape(outputs[0]) if outputs else ()
    if labels is not None:
        y = np.asarray(labels)
        if y.ndim == 3 and y.shape[2] == 5:
            return DETECTION
        integral = np.issubdtype(y.dtype, np.integer)
        if integral and y.ndim == 2 and y.shape[1] > 1 and len(first) == 3:
            return CTC
        if np.issubdtype(y.dtype, np.floating) and _shape(y) == first and len(first) >= 2:
            return EMBEDDING
        return CLASSIFICATION
    # The reference (fp32) model's outputs decide: a quantized model's class column may be off by a bit.
    same_shapes = [_shape(o) for o in outputs] == [_shape(r) for r in reference or ()]
    if reference is not None and same_shapes and is_detection_output(reference):
        return DETECTION
    return CLASSIFICATION


def task_scores(
    task: str,
    outputs: Sequence[Any],
    *,
    labels: Any = None,
    reference: Optional[Sequence[Any]] = None,
    blank: int = CTC_BLANK,
) -> Dict[str, float]:
    """The task's metric and its detail scores by name, against labels when given, else the reference."""
    if task == DETECTION:
        value, classes = map50(outputs, labels=labels, reference=reference)
        return {"map50": value, "map50_classes": float(classes)}
    if task == CTC:
        rate, tokens, exact = token_error_rate(outputs, labels=labels, reference=reference, blank=blank)
        return {"token_error_rate": rate, "reference_tokens": float(tokens), "exact_match": exact}
    if task == EMBEDDING:
        cos = embedding_cosines(outputs, labels=labels, reference=reference)
        if cos.size == 0:
            raise _bad("the embedding output holds no vectors")
        return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min())}
    raise _bad(f"unknown task {task!r}; use one of {', '.join(TASKS)} or {AUTO}")
