"""The quality vocabulary: one scorer (hand-computed values), readings in every form, old manifests, floors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.manifest import EvalSpec, HealthPolicy, Manifest
from edgefleet.agent.core.quality import (
    METRICS,
    Quality,
    QualityError,
    accuracy,
    agreement,
    canonical_metric,
    columns,
    fidelity,
    floor_for,
    measure,
    passes,
    reading_from,
    score,
)
from edgefleet.agent.health import HealthError, check_health
from edgefleet.converters.parity import compare_many
from edgefleet.sdk.build.measure import evaluate

# Three rows, three classes: row tops are 2, 0, 1.
LOGITS = np.array([[0.1, 0.2, 0.7], [0.9, 0.05, 0.05], [0.2, 0.5, 0.3]])


def test_accuracy_is_the_share_of_rows_whose_top1_is_the_label() -> None:
    # prepare: labels right, wrong, right
    labels = np.array([2, 1, 1])
    # act / assert
    assert accuracy([LOGITS], labels) == pytest.approx(2 / 3)
    assert accuracy(LOGITS, labels.reshape(3, 1)) == pytest.approx(2 / 3)  # an (n, 1) label column too


def test_agreement_needs_every_classifier_output_to_agree() -> None:
    # prepare: the reference's tops are 2, 0, 1; the candidate flips row 1 in its first output and row 2
    # in its second; a one-column output (a score per row) has no top-1 and does not count
    reference = [LOGITS, LOGITS[:, ::-1].copy(), np.array([[1.0], [2.0], [3.0]])]
    candidate = [LOGITS.copy(), LOGITS[:, ::-1].copy(), np.array([[9.0], [9.0], [9.0]])]
    candidate[0][1] = [0.0, 1.0, 0.0]
    candidate[1][2] = [1.0, 0.0, 0.0]
    # act / assert: only row 0 agrees on both classifier outputs
    assert agreement(candidate, reference) == pytest.approx(1 / 3)
    assert agreement([np.ones((3, 1))], [np.ones((3, 1))]) is None


def test_fidelity_is_the_mean_row_cosine_over_all_outputs_concatenated() -> None:
    # prepare: row 0 is identical, row 1 orthogonal (cosine 0), row 2 at 45 degrees once both outputs are
    # joined: [1, 0 | 0] against [1, 0 | 1] → 1 / sqrt(2)
    reference = [np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), np.array([[1.0], [0.0], [1.0]])]
    candidate = [np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([[1.0], [0.0], [0.0]])]
    # act
    mean, worst = fidelity(candidate, reference)
    # assert
    assert mean == pytest.approx((1.0 + 0.0 + 1 / math.sqrt(2)) / 3)
    assert worst == pytest.approx(0.0)


def test_zero_rows_are_identical_only_to_zero_rows() -> None:
    mean, _ = fidelity([np.zeros((2, 3))], [np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])])
    assert mean == pytest.approx(0.5)


def test_score_gives_every_metric_the_data_allows_and_measure_picks_one() -> None:
    # prepare / act
    both = score([LOGITS], labels=np.array([2, 0, 0]), reference=[LOGITS])
    reading = measure([LOGITS], reference=[LOGITS])
    # assert
    assert set(both) == {"accuracy", "agreement", "fidelity", "fidelity_min"}
    assert both["accuracy"] == pytest.approx(2 / 3) and both["agreement"] == 1.0
    assert (reading.metric, reading.value, reading.samples) == ("fidelity", pytest.approx(1.0), 3)
    assert reading.detail["agreement"] == 1.0
    with pytest.raises(QualityError, match="no labels"):
        measure([LOGITS], reference=[LOGITS], metric_name="accuracy")
    with pytest.raises(QualityError, match="2 output.*1"):
        score([LOGITS, LOGITS], reference=[LOGITS])


def test_host_measurement_and_parity_use_the_same_scorer() -> None:
    # prepare: one row flipped
    candidate = LOGITS.copy()
    candidate[0] = candidate[0][::-1]
    expected = score([candidate], reference=[LOGITS])
    # act
    host = evaluate([candidate], reference=[LOGITS])
    parity = compare_many([LOGITS], [candidate])
    # assert
    assert host.metric == "fidelity" and host.value == pytest.approx(expected["fidelity"])
    assert host.detail["agreement"] == pytest.approx(2 / 3)
    assert (parity.agreement, parity.fidelity, parity.fidelity_min) == (
        pytest.approx(expected["agreement"]),
        pytest.approx(expected["fidelity"]),
        pytest.approx(expected["fidelity_min"]),
    )


def test_old_metric_names_map_to_the_vocabulary_and_unknown_ones_are_refused() -> None:
    assert [canonical_metric(n) for n in ("cosine", "top1_agreement", "eval_accuracy", "Accuracy")] == [
        "fidelity",
        "agreement",
        "accuracy",
        "accuracy",
    ]
    with pytest.raises(QualityError, match="unknown quality metric 'quality'.*accuracy, agreement, fidelity"):
        canonical_metric("quality")
    assert {m.gate for m in METRICS.values()} == {"min_accuracy", "min_agreement", "min_fidelity"}
    assert METRICS["agreement"].flag == "--min-agreement"


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        # today's telemetry part
        (
            {
                "metric": "fidelity",
                "value": 0.99,
                "samples": 64,
                "source": "eval",
                "detail": {"agreement": 1},
            },
            {"accuracy": None, "agreement": 1.0, "fidelity": 0.99},
        ),
        # an older agent's install health report against reference outputs
        (
            {"metric": "cosine", "value": 0.98, "cosine": 0.98, "min_cosine": 0.9, "top1_agreement": 0.95},
            {"accuracy": None, "agreement": 0.95, "fidelity": 0.98},
        ),
        # an older agent's periodic eval on labels, and its health report
        ({"accuracy": 0.9, "at": 12.0}, {"accuracy": 0.9, "agreement": None, "fidelity": None}),
        (
            {"metric": "accuracy", "value": 0.8, "source": "install"},
            {"accuracy": 0.8, "agreement": None, "fidelity": None},
        ),
        # an eval that failed, junk
        ({"error": "no model", "code": "no-model"}, {"accuracy": None, "agreement": None, "fidelity": None}),
        ({"accuracy": "high"}, {"accuracy": None, "agreement": None, "fidelity": None}),
    ],
)
def test_store_columns_come_from_every_form_a_reading_arrived_in(part: Any, expected: Any) -> None:
    assert columns(part) == expected


def test_a_reading_round_trips_and_keeps_its_source() -> None:
    reading = Quality("top1_agreement", 0.75, samples=8, detail={"fidelity": 0.9}, source="shadow")
    back = Quality.from_dict(reading.to_dict())
    assert back == Quality("agreement", 0.75, 8, {"fidelity": 0.9}, "shadow")
    assert reading_from(back) is back
    with pytest.raises(QualityError, match="source"):
        Quality("accuracy", 1.0, source="guess")


def test_passes_and_floors_follow_the_metric_direction() -> None:
    assert passes(0.95, 0.95, "accuracy") and not passes(0.949, 0.95, "accuracy")
    assert passes(None, None) and not passes(None, 0.5)
    assert passes(Quality("fidelity", 0.5, detail={"agreement": 0.99}), 0.98, "agreement")
    assert floor_for("accuracy", 0.97, 0.01) == pytest.approx(0.96)
    assert floor_for("fidelity", 1.0, 0.02) == pytest.approx(0.98)
    assert floor_for("accuracy", 0.005, 0.01) == 0.0
    with pytest.raises(QualityError, match="drop budget"):
        floor_for("accuracy", 0.9, 1.5)


# ---- the manifest's eval and health sections ------------------------------------------------------


def _manifest(eval_part: dict[str, Any], health: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": "edgefleet.manifest/1",
        "name": "m",
        "version": 1,
        "created": "2026-01-01T00:00:00Z",
        "expires": "2030-01-01T00:00:00Z",
        "target": {"profile": "rpi4b"},
        "model": {"file": "model.onnx", "format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32"}],
        "outputs": [{"name": "y", "dtype": "float32"}],
        "files": {"model.onnx": {"size": 1, "sha256": "0" * 64}, "eval.npz": {"size": 1, "sha256": "1" * 64}},
        "eval": {"file": "eval.npz", **eval_part},
        "health": health,
    }


@pytest.mark.parametrize(
    ("eval_part", "health", "metric", "floor"),
    [
        ({"kind": "labels", "metric": "accuracy"}, {"min_accuracy": 0.9}, "accuracy", 0.9),
        ({"kind": "reference", "metric": "cosine"}, {"min_fidelity": 0.99}, "fidelity", 0.99),
        ({"kind": "reference", "metric": "top1_agreement"}, {"min_fidelity": 0.9}, "agreement", 0.9),
        # an old agent ignored the floor that did not fit the eval's kind
        ({"kind": "reference", "metric": "cosine"}, {"min_accuracy": 0.9}, "fidelity", None),
        ({"kind": "labels", "metric": "accuracy"}, {}, "accuracy", None),
        # today's form
        (
            {"kind": "reference", "metric": "fidelity"},
            {"metric": "agreement", "min_quality": 0.97},
            "agreement",
            0.97,
        ),
    ],
)
def test_old_and_new_manifests_parse_into_one_health_floor(
    eval_part: dict[str, Any], health: dict[str, Any], metric: str, floor: float | None
) -> None:
    # act
    manifest = Manifest.from_dict(_manifest(eval_part, health))
    # assert
    assert (manifest.health.metric, manifest.health.min_quality) == (metric, floor)
    assert manifest.eval.metric in ("accuracy", "agreement", "fidelity")
    assert manifest.health.to_dict()["metric"] == metric


def test_a_health_metric_the_eval_cannot_score_is_refused_by_name() -> None:
    obj = _manifest({"kind": "labels", "metric": "accuracy"}, {"metric": "fidelity", "min_quality": 0.9})
    with pytest.raises(VerifyError, match="health.metric.*labels"):
        Manifest.from_dict(obj)
    with pytest.raises(VerifyError, match="eval.metric"):
        EvalSpec.from_dict({"file": "eval.npz", "kind": "labels", "metric": "fidelity"})
    with pytest.raises(VerifyError, match="health.min_quality"):
        HealthPolicy.from_dict({"metric": "accuracy", "min_quality": 1.5})


def test_old_policy_names_stay_readable() -> None:
    policy = HealthPolicy.from_dict({"min_accuracy": 0.9})
    assert (policy.min_accuracy, policy.min_fidelity) == (0.9, None)


# ---- the device's health check scores every output ------------------------------------------------


def _two_outputs(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = feeds["x"]
    return {"logits": x[:, :3], "embedding": x[:, 3:] * 2.0}


def test_health_check_scores_every_output_against_its_reference(tmp_path: Path) -> None:
    # prepare: the second output's reference is right for half the rows and opposite for the rest, so
    # a check of the first output alone would see fidelity 1.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    out = _two_outputs({"x": x})
    wrong = out["embedding"].copy()
    wrong[4:] *= -1.0
    np.savez(tmp_path / "eval.npz", x=x, reference=out["logits"], **{"reference:embedding": wrong})
    spec = EvalSpec("eval.npz", "reference", "fidelity")
    expected = score([out["logits"], out["embedding"]], reference=[out["logits"], wrong])
    # act
    report = check_health(
        _two_outputs, ["x"], ["logits", "embedding"], tmp_path / "eval.npz", spec, HealthPolicy(warmup_runs=1)
    )
    # assert
    assert report.metric == "fidelity" and report.value == pytest.approx(expected["fidelity"], abs=1e-6)
    assert report.value < 0.9
    reading = report.quality()
    # both outputs have more than one column, so both count for agreement: half the rows flip
    assert reading is not None and reading.detail["agreement"] == expected["agreement"] == 0.5
    strict = HealthPolicy(metric="fidelity", min_quality=0.95, warmup_runs=0)
    with pytest.raises(HealthError, match="fidelity .* below the manifest minimum 0.9500") as info:
        check_health(_two_outputs, ["x"], ["logits", "embedding"], tmp_path / "eval.npz", spec, strict)
    assert info.value.code == "below-minimum"


def test_health_check_reads_an_older_bundle_with_one_reference_output(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, reference=_two_outputs({"x": x})["logits"])
    spec = EvalSpec("eval.npz", "reference", "agreement")
    policy = HealthPolicy(metric="agreement", min_quality=1.0, warmup_runs=0)
    report = check_health(_two_outputs, ["x"], ["logits", "embedding"], tmp_path / "eval.npz", spec, policy)
    assert report.passed and report.value == 1.0


# ---- the build's budget becomes the device's floor -------------------------------------------------


def _chosen() -> Any:
    from types import SimpleNamespace

    spec = SimpleNamespace(format="onnx", runtime="onnxruntime", precision="int8", tflite_quant=None)
    return SimpleNamespace(
        id="onnx-int8",
        spec=spec,
        path=None,
        fixed_batch=None,
        latency=None,
        steps=[],
        size_bytes=10,
        quality=None,
        accuracy_drop=0.02,
        estimate_ms=None,
        to_dict=lambda: {"id": "onnx-int8"},
    )


def _runner() -> Any:
    from types import SimpleNamespace

    tensor = SimpleNamespace(name="x", dtype="float32", shape=(None, 4))
    return SimpleNamespace(
        inputs=[tensor], outputs=[SimpleNamespace(name="y", dtype="float32", shape=(None, 3))]
    )


@pytest.mark.parametrize(
    ("chosen_q", "reference_q", "drop", "health", "eval_metric"),
    [
        (
            Quality("accuracy", 0.95, 100),
            Quality("accuracy", 0.97, 100),
            0.03,
            ("accuracy", 0.94),
            "accuracy",
        ),
        (Quality("fidelity", 0.995, 64), Quality("fidelity", 1.0, 64), 0.01, ("fidelity", 0.99), "fidelity"),
    ],
)
def test_the_health_floor_is_the_reference_value_less_the_build_budget(
    chosen_q: Quality, reference_q: Quality, drop: float, health: tuple[str, float], eval_metric: str
) -> None:
    from types import SimpleNamespace

    from edgefleet.sdk.build.manifest_fields import manifest_fields_for

    # act
    fields = manifest_fields_for(
        _chosen(),
        SimpleNamespace(name="rpi4b"),
        _runner(),
        name="m",
        subset_quality=chosen_q,
        reference_quality=reference_q,
        max_accuracy_drop=drop,
        max_p95_ms=None,
    )
    # assert
    assert (fields["health"]["metric"], fields["health"]["min_quality"]) == (
        health[0],
        pytest.approx(health[1]),
    )
    assert fields["eval"]["metric"] == eval_metric
    assert "min_accuracy" not in fields["health"] and "min_fidelity" not in fields["health"]


def test_a_build_whose_choice_misses_its_own_floor_on_the_bundle_rows_fails() -> None:
    from types import SimpleNamespace

    from edgefleet.sdk.build.errors import BudgetError
    from edgefleet.sdk.build.manifest_fields import manifest_fields_for

    with pytest.raises(BudgetError, match="below the device's floor 0.9600"):
        manifest_fields_for(
            _chosen(),
            SimpleNamespace(name="rpi4b"),
            _runner(),
            name="m",
            subset_quality=Quality("accuracy", 0.95, 100),
            reference_quality=Quality("accuracy", 0.97, 100),
            max_accuracy_drop=0.01,
            max_p95_ms=None,
        )
