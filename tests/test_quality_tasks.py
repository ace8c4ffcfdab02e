"""Task metrics of the one scorer (issue 17.1): detection mAP@0.5, CTC token error rate, embedding cosine,
`auto`, directions, and the health check, rollout gate and shadow window reading them.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.manifest import EvalSpec, HealthPolicy
from edgefleet.agent.core.quality import (
    ALL_METRICS,
    METRICS,
    Quality,
    QualityError,
    drop,
    floor_for,
    measure,
    metric_for_task,
    passes,
    reading_from,
    resolve_task,
)
from edgefleet.agent.core.quality_tasks import (
    average_precision,
    edit_distance,
    greedy_decode,
    mean_average_precision,
)
from edgefleet.agent.health import HealthError, check_health
from edgefleet.agent.shadow import ShadowWindow
from edgefleet.sdk.fleet.strategy import AbortRules, TelemetrySample

PAD = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]


def _rows(*dets: list[float], k: int = 4) -> np.ndarray:
    """One image's post-NMS output (1, k, 6), padded."""
    rows = [list(d) for d in dets] + [PAD] * (k - len(dets))
    return np.asarray([rows], dtype=np.float32)


# Ground truth: class 0 at A=[0,0,10,10] and C=[50,50,60,60]; class 1 at B=[20,20,30,30].
LABELS = np.asarray([[[0, 0, 10, 10, 0], [50, 50, 60, 60, 0], [20, 20, 30, 30, 1], [0, 0, 0, 0, -1]]])


def test_map50_against_labels_matches_the_hand_computed_voc_value() -> None:
    # class 0, by score: C (TP), a miss far away (FP), A (TP) -> recall .5 .5 1, precision 1 .5 .667;
    # all-point AP = .5 * 1 + .5 * .667 = .8333. class 1: [21,21,31,31] has IoU 81/119 = .68 with B -> AP 1.
    out = _rows(
        [50, 50, 60, 60, 0.9, 0],
        [100, 100, 110, 110, 0.8, 0],
        [0, 0, 10, 10, 0.7, 0],
        [21, 21, 31, 31, 0.6, 1],
    )
    reading = measure([out], labels=LABELS)
    assert reading.metric == "map50" and reading.value == pytest.approx((5 / 6 + 1.0) / 2)
    assert reading.detail["map50_classes"] == 2
    # class 1's box shifted to IoU 25/175 = .14 < .5 is a false positive: class 1 AP 0
    shifted = _rows(
        [50, 50, 60, 60, 0.9, 0],
        [100, 100, 110, 110, 0.8, 0],
        [0, 0, 10, 10, 0.7, 0],
        [25, 25, 35, 35, 0.6, 1],
    )
    assert measure([shifted], labels=LABELS).value == pytest.approx((5 / 6) / 2)


def test_map50_counts_a_duplicate_box_as_a_false_positive_and_ignores_padding() -> None:
    # A found twice: the second match of the same box is a FP (VOC); recall 1 at precision 1 first -> AP 1
    truth = np.asarray([[[0, 0, 10, 10, 0]]])
    twice = _rows([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0])
    assert measure([twice], labels=truth).value == pytest.approx(1.0)
    # the duplicate ranked first at a miss: FP then TP -> recall 0, 1 precision 0, .5 -> AP .5
    miss_first = _rows([30, 30, 40, 40, 0.95, 0], [0, 0, 10, 10, 0.9, 0])
    assert measure([miss_first], labels=truth).value == pytest.approx(0.5)
    assert average_precision(np.asarray([0.0, 1.0]), np.asarray([0.0, 0.5])) == pytest.approx(0.5)


def test_map50_against_the_fp32_boxes_and_in_the_three_output_form() -> None:
    # prepare: the fp32 model's boxes are the truth; the candidate lost one of its two boxes
    ref = _rows([0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1])
    lost = _rows([0, 0, 10, 10, 0.9, 0])
    # act / assert: class 0 AP 1, class 1 AP 0 -> .5; the fp32 model against itself scores 1
    assert measure([lost], reference=[ref]).value == pytest.approx(0.5)
    assert measure([ref], reference=[ref]).value == pytest.approx(1.0)
    boxes, scores, classes = ref[..., :4], ref[..., 4], ref[..., 5]
    three = [lost[..., :4], lost[..., 4], lost[..., 5]]
    reading = measure(three, reference=[boxes, scores, classes], task="detection")
    assert reading.metric == "map50" and reading.value == pytest.approx(0.5)
    # a quantized model's class column a hair off a whole number still counts as that class
    noisy = ref.copy()
    noisy[0, 1, 5] = 0.98
    assert measure([noisy], reference=[ref]).value == pytest.approx(1.0)


def test_map50_without_any_ground_truth() -> None:
    empty = [np.zeros((0, 6))]
    assert mean_average_precision(empty, [np.zeros((0, 5))]) == (1.0, 0)
    assert mean_average_precision([np.asarray([[0, 0, 1, 1, 0.5, 0]])], [np.zeros((0, 5))]) == (0.0, 0)


def _frames(*rows: list[int], classes: int = 4) -> np.ndarray:
    """One-hot per-frame scores (N, T, C) whose argmax is the given frame tokens."""
    out = np.zeros((len(rows), len(rows[0]), classes), dtype=np.float32)
    for i, row in enumerate(rows):
        for t, token in enumerate(row):
            out[i, t, token] = 1.0
    return out


def test_ctc_greedy_decode_and_token_error_rate_by_hand() -> None:
    # row 0 frames 1 1 0 1 2 2 -> 1 1 2 (the blank 0 splits the repeat); row 1 all blank -> nothing
    logits = _frames([1, 1, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0])
    assert greedy_decode(logits) == [[1, 1, 2], []]
    # labels 1 2 and 3 (padded with -1): one insertion + one deletion over 3 reference tokens
    labels = np.asarray([[1, 2], [3, -1]])
    reading = measure([logits], labels=labels)
    assert reading.metric == "token_error_rate" and reading.value == pytest.approx(2 / 3)
    assert reading.detail["reference_tokens"] == 3 and reading.detail["exact_match"] == 0.0
    # against the fp32 model's decode: the same outputs give 0 errors
    assert measure([logits], reference=[logits], task="ctc").value == 0.0
    assert edit_distance([1, 2, 3, 4, 5, 6], [7, 2, 3, 4, 8, 6, 9]) == 3  # kitten -> sitting


def test_token_error_rate_is_lower_is_better_everywhere() -> None:
    ter = ALL_METRICS["token_error_rate"]
    assert not ter.higher_is_better and ter.gate == "max_token_error_rate"
    assert passes(0.1, 0.2, "token_error_rate") and not passes(0.3, 0.2, "token_error_rate")
    assert passes(0.9, 0.8, "map50") and not passes(0.7, 0.8, "map50")
    # the budget raises the ceiling: fp32's .05 + .1; a rate of .1 is .05 worse than fp32's
    assert floor_for("token_error_rate", 0.05, 0.1) == pytest.approx(0.15)
    assert drop("token_error_rate", 0.05, 0.1) == pytest.approx(0.05)
    assert floor_for("map50", 0.6, 0.1) == pytest.approx(0.5)
    # the three columned metrics keep their rule fields; the task metrics are not among them
    assert set(METRICS) == {"accuracy", "agreement", "fidelity"}


def test_embedding_cosine_mean_and_min_by_hand() -> None:
    # cosines: [1,0]·[1,0] = 1, [1,0]·[0,1] = 0, [1,1]·[1,0] = 1/sqrt(2) -> mean .569, min 0
    got = np.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    want = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    reading = measure([got], reference=[want], task="embedding")
    assert reading.metric == "embedding_cosine"
    assert reading.value == pytest.approx((1 + 0 + 2**-0.5) / 3)
    assert reading.detail["embedding_cosine_min"] == pytest.approx(0.0)
    # token embeddings (N, T, D): every token's vector counts on its own
    tokens = np.asarray([[[1.0, 0.0], [0.0, 1.0]]])
    flipped = np.asarray([[[1.0, 0.0], [0.0, -1.0]]])
    assert measure([tokens], reference=[flipped], task="embedding").value == pytest.approx(0.0)
    assert measure([tokens], labels=tokens.astype(np.float32)).metric == "embedding_cosine"


def test_auto_infers_the_task_from_outputs_and_labels() -> None:
    det = _rows([0, 0, 10, 10, 0.9, 0])
    logits = _frames([1, 2, 0], [3, 0, 0])
    classifier = np.asarray([[0.1, 0.9], [0.8, 0.2]])
    assert resolve_task("auto", [det], labels=LABELS[:, :1]) == "detection"
    assert resolve_task(None, [det], reference=[det]) == "detection"
    assert resolve_task("auto", [logits], labels=np.asarray([[1, 2], [3, -1]])) == "ctc"
    assert resolve_task("auto", [classifier], labels=classifier.astype(np.float32)) == "embedding"
    assert resolve_task("auto", [classifier], labels=np.asarray([1, 0])) == "classification"
    # CTC scores and token embeddings look alike without labels: auto keeps the old default (fidelity)
    assert measure([logits], reference=[logits]).metric == "fidelity"
    assert measure([classifier], labels=np.asarray([1, 1])).metric == "accuracy"
    assert measure([classifier], reference=[classifier]).metric == "fidelity"
    # an explicit classification task scores top-1 agreement against reference outputs
    assert measure([classifier], reference=[classifier], task="classification").metric == "agreement"
    assert metric_for_task("classification", "labels") == "accuracy"
    assert metric_for_task("ctc", "reference") == "token_error_rate"


def test_bad_inputs_are_errors_that_name_the_fix() -> None:
    det = _rows([0, 0, 10, 10, 0.9, 0])
    with pytest.raises(QualityError, match=r"\(N, G, 5\)"):
        measure([det], labels=np.zeros((1, 2, 4)), task="detection")
    with pytest.raises(QualityError, match="detection outputs must be post-NMS rows"):
        measure([np.zeros((2, 10))], labels=np.zeros((2, 1, 5)))
    with pytest.raises(QualityError, match="CTC labels `y` must be integer tokens"):
        measure([_frames([1, 2])], labels=np.asarray([[0.5, 1.5]]), task="ctc")
    with pytest.raises(QualityError, match="need targets of the same shape"):
        measure([np.zeros((2, 4))], reference=[np.zeros((2, 3))], task="embedding")
    with pytest.raises(QualityError, match="unknown task 'segmentation'"):
        measure([det], reference=[det], task="segmentation")
    with pytest.raises(QualityError, match="needs labels `y` or reference outputs"):
        measure([det], task="detection")


def test_readings_of_task_metrics_round_trip() -> None:
    reading = Quality("token_error_rate", 0.12, samples=8, detail={"reference_tokens": 40.0})
    assert Quality.from_dict(reading.to_dict()) == reading
    again = reading_from({"metric": "map50", "value": 0.7, "samples": 3, "detail": {"fidelity": 0.99}})
    assert again is not None and again.metric == "map50" and again.get("fidelity") == 0.99


def test_manifest_eval_and_health_take_the_task_metrics() -> None:
    spec = EvalSpec.from_dict({"file": "eval.npz", "kind": "labels", "metric": "map50", "task": "detection"})
    assert spec.task == "detection" and spec.to_dict()["task"] == "detection"
    assert (
        "task" not in EvalSpec.from_dict({"file": "e.npz", "kind": "labels", "metric": "accuracy"}).to_dict()
    )
    assert (
        EvalSpec.from_dict({"file": "e.npz", "kind": "reference", "metric": "token_error_rate"}).task is None
    )
    with pytest.raises(VerifyError, match="eval.task"):
        EvalSpec.from_dict({"file": "e.npz", "kind": "labels", "metric": "map50", "task": "ctc"})
    with pytest.raises(VerifyError, match="eval.metric"):
        EvalSpec.from_dict({"file": "e.npz", "kind": "labels", "metric": "fidelity"})
    policy = HealthPolicy.from_dict({"metric": "token_error_rate", "min_quality": 0.1}).for_eval(spec)
    assert policy.metric == "token_error_rate" and policy.min_fidelity is None


def _speech(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A 'model' whose frame scores are its input: the eval set decides what it says."""
    return {"logits": feeds["x"]}


def test_health_check_enforces_a_token_error_rate_ceiling(tmp_path: Path) -> None:
    # prepare: 2 rows, decoded 1 1 2 and nothing, labels 1 2 and 3 -> token error rate 2/3
    x = _frames([1, 1, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0])
    np.savez(tmp_path / "eval.npz", x=x, y=np.asarray([[1, 2], [3, -1]]))
    spec = EvalSpec("eval.npz", "labels", "token_error_rate", "ctc")
    loose = HealthPolicy(metric="token_error_rate", min_quality=0.7, warmup_runs=0)
    tight = HealthPolicy(metric="token_error_rate", min_quality=0.5, warmup_runs=0)
    # act
    report = check_health(_speech, ["x"], ["logits"], tmp_path / "eval.npz", spec, loose)
    # assert
    assert report.passed and report.value == pytest.approx(2 / 3)
    reading = report.quality()
    assert reading is not None and reading.metric == "token_error_rate"
    with pytest.raises(
        HealthError, match="token_error_rate 0.6667 .* above the manifest maximum 0.5000"
    ) as info:
        check_health(_speech, ["x"], ["logits"], tmp_path / "eval.npz", spec, tight)
    assert info.value.code == "above-maximum"


def test_health_check_scores_detections_against_labels(tmp_path: Path) -> None:
    # prepare: the 'detector' returns its input; one image, the hand-computed mAP .9167 of the first test
    x = _rows(
        [50, 50, 60, 60, 0.9, 0],
        [100, 100, 110, 110, 0.8, 0],
        [0, 0, 10, 10, 0.7, 0],
        [21, 21, 31, 31, 0.6, 1],
    )
    np.savez(tmp_path / "eval.npz", x=x, y=LABELS)
    spec = EvalSpec("eval.npz", "labels", "map50", "detection")
    # act
    report = check_health(
        lambda f: {"dets": f["x"]},
        ["x"],
        ["dets"],
        tmp_path / "eval.npz",
        spec,
        HealthPolicy(metric="map50", min_quality=0.9, warmup_runs=0),
    )
    # assert
    assert report.passed and report.metric == "map50" and report.value == pytest.approx(11 / 12, abs=1e-6)


def test_rollout_gate_reads_task_metrics_with_their_direction() -> None:
    # prepare: devices report token error rates; the manifest's ceiling is .1
    health = HealthPolicy(metric="token_error_rate", min_quality=0.1)
    bad = [
        TelemetrySample("a", 10, 1.0, {"token_error_rate": 0.2}),
        TelemetrySample("b", 10, 1.0, {"token_error_rate": 0.3}),
    ]
    good = [TelemetrySample("a", 10, 1.0, {"token_error_rate": 0.05})]
    rules = AbortRules(min_samples=1)
    # act / assert
    reason = rules.check_telemetry(bad, health)
    assert (
        reason is not None
        and "eval-set token_error_rate 0.2500" in reason
        and "above the maximum 0.1" in reason
    )
    assert rules.check_telemetry(good, health) is None
    low_map = [TelemetrySample("a", 10, 1.0, {"map50": 0.4})]
    reason = rules.check_telemetry(low_map, HealthPolicy(metric="map50", min_quality=0.6))
    assert reason is not None and "map50 0.4000" in reason and "below the minimum 0.6" in reason


def test_shadow_window_scores_the_task_metric_against_the_replaced_model() -> None:
    # prepare: two requests; the new model drops token 2 in the first (1 error over 2 + 1 tokens)
    window = ShadowWindow("token_error_rate")
    window.add([_frames([1, 0, 0])], [_frames([1, 0, 2])])
    window.add([_frames([3, 3, 0])], [_frames([3, 0, 0])])
    # act
    reading = window.reading("token_error_rate")
    # assert
    assert reading is not None and reading.metric == "token_error_rate" and reading.source == "shadow"
    assert reading.value == pytest.approx(1 / 3) and reading.samples == 2
    boxes = ShadowWindow("map50")
    ref = _rows([0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1])
    boxes.add([_rows([0, 0, 10, 10, 0.9, 0])], [ref])
    shadow = boxes.reading("map50")
    assert shadow is not None and shadow.metric == "map50" and shadow.value == pytest.approx(0.5)


def test_a_telemetry_message_carries_task_readings_to_the_rollout_gate() -> None:
    # prepare: an eval reading of map50 (fidelity in detail) and a shadow token error rate, over the wire
    from edgefleet.agent.core.protocol import Latency, Requests, Telemetry

    message = Telemetry(
        device="cam-1",
        seq=1,
        ts=1.0,
        requests=Requests(count=12),
        latency=Latency(count=12, p95_ms=3.5),
        quality=(
            Quality("map50", 0.61, 64, {"fidelity": 0.99}, "eval"),
            Quality("token_error_rate", 0.2, 9, {}, "shadow"),
        ),
    )
    again = Telemetry.from_wire(message.to_wire())
    # act
    sample = TelemetrySample.of(again)
    # assert
    assert dict(sample.quality) == {"map50": 0.61, "fidelity": 0.99}
    assert dict(sample.shadow) == {"token_error_rate": 0.2} and sample.shadow_samples == 9
