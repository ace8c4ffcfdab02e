"""The build plan: candidates, measurement, budget logic, report.json and the signed bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from build_support import FakeProfile  # noqa: E402

from edgefleet.sdk.build.builder import Candidate, build  # noqa: E402
from edgefleet.sdk.build.choose import choose  # noqa: E402
from edgefleet.sdk.build.errors import BudgetError, BuildError  # noqa: E402
from edgefleet.sdk.build.measure import LatencyStats, Quality  # noqa: E402
from edgefleet.sdk.build.plan import CandidateSpec, PlanOptions, plan_candidates  # noqa: E402
from edgefleet.sdk.zoo import trained_digits_cnn  # noqa: E402

FAST = PlanOptions(prune_levels=(), mixed_precision=False, tflite=False, static_calibrations=("minmax",))


@pytest.fixture(scope="module")
def digits() -> tuple[Any, Any]:
    return trained_digits_cnn(epochs=15)


def test_plan_lists_what_the_profile_runs() -> None:
    specs = plan_candidates(
        "torch", runtimes=["onnxruntime"], precisions=["fp32", "int8"], has_calib=True, options=FAST
    )
    ids = [s.id for s in specs]
    assert ids[0] == "onnx-fp32"
    assert specs[0].baseline
    assert "onnx-int8-dynamic" in ids
    assert "onnx-int8-static-minmax" in ids
    assert not any("fp16" in i for i in ids)  # the profile has no fp16
    assert not any(s.format == "tflite" for s in specs)


def test_plan_for_tflite_only_device_from_onnx_has_nothing() -> None:
    assert plan_candidates("onnx", runtimes=["tflite"], precisions=["fp32"], has_calib=True) == []


def _cand(cid: str, *, acc: float, p50: float, size: int, baseline: bool = False) -> Candidate:
    spec = CandidateSpec(cid, "onnx", "fp32" if baseline else "int8", "onnxruntime", baseline=baseline)
    return Candidate(
        spec=spec,
        size_bytes=size,
        quality=Quality("accuracy", acc, samples=100),
        latency=LatencyStats(p50, p50 * 1.2, p50, 10, 1, 1),
        speedup=1.0 / p50,  # the baselines below run at 1 ms
    )


def test_budget_logic_marks_and_picks() -> None:
    # prepare: a baseline and four candidates, each failing a different budget or fitting
    base = _cand("fp32", acc=0.98, p50=1.0, size=1000, baseline=True)
    too_lossy = _cand("lossy", acc=0.95, p50=0.3, size=250)
    too_slow = _cand("slow", acc=0.98, p50=1.5, size=250)
    too_big = _cand("big", acc=0.98, p50=0.5, size=3_000_000)
    good = _cand("good", acc=0.975, p50=0.6, size=300)
    # act
    chosen, reason = choose([base, too_lossy, too_slow, too_big, good], base, 0.01, 2_000_000, None)
    # assert
    assert chosen is good
    assert "within budget" in reason
    assert too_lossy.status == "over-budget" and "drop 0.0300 > budget 0.0100" in too_lossy.reason
    assert too_slow.status == "over-budget" and "slower than fp32" in too_slow.reason
    assert too_big.status == "over-budget" and "profile limit" in too_big.reason
    assert base.status == "ok"


def test_budget_nobody_meets_lists_closest_with_reasons() -> None:
    base = _cand("fp32", acc=0.98, p50=1.0, size=5_000_000, baseline=True)
    small = _cand("int8", acc=0.90, p50=0.5, size=1_500_000)
    with pytest.raises(BudgetError, match="no candidate meets") as info:
        choose([base, small], base, 0.01, 1_000_000, None)
    text = str(info.value)
    assert "fp32: over-budget: size" in text
    assert "int8: over-budget: accuracy drop" in text
    assert [c["id"] for c in info.value.candidates] == ["fp32", "int8"]


def test_estimated_latency_over_profile_budget_is_over_budget() -> None:
    base = _cand("fp32", acc=0.98, p50=1.0, size=1000, baseline=True)
    base.estimate_ms = 80.0
    fast = _cand("int8", acc=0.98, p50=0.5, size=300)
    fast.estimate_ms = 20.0
    chosen, _ = choose([base, fast], base, 0.01, None, 50.0)
    assert chosen is fast
    assert "estimated target latency 80.00 ms > profile p95 budget 50.00 ms" in base.reason


def test_build_digits_measures_every_candidate(digits: tuple[Any, Any]) -> None:
    # prepare
    model, split = digits
    # act
    result = build(
        model,
        FakeProfile(),
        calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test),
        max_accuracy_drop=0.01,
        plan=FAST,
        latency_runs=10,
    )
    # assert: baseline first, every candidate measured, the chosen one within budget
    report = result.report
    ids = [c["id"] for c in report["candidates"]]
    assert ids == ["onnx-fp32", "onnx-fp32-opt", "onnx-fp16", "onnx-int8-dynamic", "onnx-int8-static-minmax"]
    for cand in report["candidates"]:
        assert cand["status"] in ("ok", "over-budget")
        assert cand["size_bytes"] > 0
        assert cand["host_latency_ms"]["p50"] > 0
        assert 0.9 < cand["quality"]["value"] <= 1.0
    chosen = next(c for c in report["candidates"] if c["id"] == report["chosen"])
    assert chosen["status"] == "ok"
    assert chosen["accuracy_drop"] <= 0.01
    assert report["baseline"]["id"] == "onnx-fp32"
    assert report["data"] == {"calib_samples": 898, "eval_samples": 899, "labels": True, "metric": "accuracy"}
    json.dumps(report)  # report.json must serialise


def test_build_without_labels_uses_fidelity(digits: tuple[Any, Any]) -> None:
    model, split = digits
    result = build(model, FakeProfile(), eval=split.x_test[:200], plan=FAST, latency_runs=5)
    assert result.baseline.quality is not None
    assert result.baseline.quality.metric == "fidelity"
    assert result.baseline.quality.value == pytest.approx(1.0)
    assert result.chosen.accuracy_drop is not None and result.chosen.accuracy_drop <= 0.01


def test_build_writes_a_signed_bundle_with_report(digits: tuple[Any, Any], tmp_path: Path) -> None:
    keys = pytest.importorskip("edgefleet.sdk.trust.keys")
    from edgefleet.agent.core.manifest import Manifest

    # prepare
    model, split = digits
    pair = keys.init_keys(tmp_path / "keys")
    key = keys.load_private_key(
        pair.private_path if hasattr(pair, "private_path") else tmp_path / "keys" / "fleet.key"
    )
    out = tmp_path / "bundle"
    # act
    result = build(
        model,
        FakeProfile(),
        calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test),
        out=out,
        plan=PlanOptions(
            only=("onnx-int8-static-minmax",), prune_levels=(), mixed_precision=False, tflite=False
        ),
        private_key=key,
        latency_runs=5,
        name="digits",
    )
    # assert
    assert result.bundle_dir == out
    manifest = Manifest.from_bytes((out / "manifest.json").read_bytes())
    assert manifest.name == "digits"
    assert manifest.target.profile == "test-device"
    assert manifest.eval.kind == "labels"
    assert manifest.health.min_accuracy is not None and manifest.health.min_accuracy > 0.9
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == result.chosen.id
    with np.load(out / "eval.npz") as npz:
        assert set(npz.files) == {"input", "y"}
        assert npz["input"].shape[1:] == (1, 8, 8)
    assert manifest.model.file == "model.onnx"
    assert (out / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_build_rejects_existing_non_empty_output(digits: tuple[Any, Any], tmp_path: Path) -> None:
    model, split = digits
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BuildError, match="exists and is not empty"):
        build(model, FakeProfile(), eval=(split.x_test, split.y_test), out=out, plan=FAST)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_build_full_plan_prunes_and_quantizes(digits: tuple[Any, Any]) -> None:
    model, split = digits
    result = build(
        model,
        FakeProfile(precisions=("fp32", "int8")),
        calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test),
        plan=PlanOptions(prune_levels=(0.5,), finetune_epochs=5, mixed_precision=False, tflite=False),
        latency_runs=10,
    )
    pruned = [c for c in result.candidates if c.id.startswith("pruned50-")]
    assert len(pruned) == 2
    for cand in pruned:
        assert cand.status != "failed", cand.reason
        assert cand.steps[0]["step"] == "prune-channels"
    fp32 = next(c for c in result.candidates if c.id == "onnx-fp32")
    assert pruned[0].size_bytes is not None and fp32.size_bytes is not None
    assert pruned[0].size_bytes < 0.6 * fp32.size_bytes


def test_build_multi_input_integer_model_by_input_names() -> None:
    # prepare: a tiny text encoder taking (input_ids, attention_mask), like MiniLM
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            self.proj = torch.nn.Linear(32, 16)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.proj(self.embed(input_ids)) * attention_mask.unsqueeze(-1).float()
            return hidden.sum(1)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(0, 100, (64, 12)).astype(np.int64),
        "attention_mask": (rng.random((64, 12)) > 0.2).astype(np.int64),
    }
    # act
    result = build(
        Encoder().eval(),
        FakeProfile(precisions=("fp32", "int8")),
        eval=data,
        plan=PlanOptions(only=("onnx-int8-dynamic",), prune_levels=(), mixed_precision=False, tflite=False),
        max_accuracy_drop=0.02,
        latency_runs=5,
    )
    # assert: fidelity (no labels), both inputs fed by name, the INT8 candidate measured
    dynamic = next(c for c in result.candidates if c.id == "onnx-int8-dynamic")
    assert dynamic.status in ("ok", "over-budget")
    assert dynamic.quality is not None and dynamic.quality.metric == "fidelity"
    assert dynamic.quality.value > 0.98
