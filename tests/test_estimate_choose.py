"""Picking with the estimator: never a bigger, not-faster model; GPU profiles ranked by estimated latency."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from edgefleet.device_profiles import load_profile
from edgefleet.sdk.build.candidate import Candidate
from edgefleet.sdk.build.choose import choose
from edgefleet.sdk.build.errors import BudgetError
from edgefleet.sdk.build.measure import LatencyStats, Quality
from edgefleet.sdk.build.plan import CandidateSpec
from edgefleet.sdk.build.profile import runs_onnx_on_gpu


def _cand(
    cid: str,
    *,
    size: int,
    speedup: float,
    estimate: Optional[float],
    precision: str = "int8",
    fmt: str = "onnx",
    noise: float = 0.05,
    baseline: bool = False,
) -> Candidate:
    spec = CandidateSpec(cid, fmt, "fp32" if baseline else precision, "onnxruntime", baseline=baseline)
    p50 = 10.0 / speedup
    return Candidate(
        spec=spec,
        size_bytes=size,
        quality=Quality("accuracy", 0.98, samples=100),
        latency=LatencyStats(p50, p50 * 1.2, p50, 10, 1, 4, noise),
        estimate_ms=estimate,
        speedup=speedup,
        speedup_noise=noise,
    )


def test_bigger_and_not_faster_is_over_budget_even_when_its_estimate_fits() -> None:
    # prepare: the speech plan for rpi4b: fp32 estimated over the 100 ms budget, the optimized
    # graph 1.87x fp32's size at fp32's speed, static INT8 2.1x faster
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=154.0, baseline=True)
    opt = _cand("onnx-fp32-opt", size=1870, speedup=1.02, estimate=6.75, precision="fp32")
    int8 = _cand("onnx-int8-static-minmax", size=270, speedup=2.1, estimate=73.0)
    # act
    chosen, _ = choose([base, opt, int8], base, 0.01, None, 100.0)
    # assert
    assert chosen is int8
    assert opt.status == "over-budget" and "bigger than fp32 (1.87× its size) and not faster" in opt.reason


def test_bigger_and_not_faster_is_never_the_fallback() -> None:
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=154.0, baseline=True)
    opt = _cand("onnx-fp32-opt", size=1870, speedup=1.0, estimate=6.75, precision="fp32")
    with pytest.raises(BudgetError):
        choose([base, opt], base, 0.01, None, 100.0)


def test_bigger_but_clearly_faster_may_still_be_picked() -> None:
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=150.0, baseline=True)
    fast = _cand("onnx-fp32-opt", size=1100, speedup=3.0, estimate=60.0, precision="fp32")
    chosen, _ = choose([base, fast], base, 0.01, None, 100.0)
    assert chosen is fast and fast.status == "ok"


def test_gpu_profile_ranks_by_estimated_device_latency() -> None:
    # prepare: on the host's CPU INT8 is fastest; on the Jetson's GPU the estimator rates fp16 fastest
    jetson = load_profile("jetson-orin-nano")
    assert runs_onnx_on_gpu(jetson)
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=6.0, baseline=True)
    int8 = _cand("onnx-int8-static-minmax", size=260, speedup=2.0, estimate=3.0)
    fp16 = _cand("onnx-fp16", size=500, speedup=0.9, estimate=2.0, precision="fp16", noise=0.01)
    cpu_tflite = _cand("tflite-int8", size=250, speedup=2.8, estimate=9.0, fmt="tflite")
    # act
    chosen, reason = choose([base, int8, fp16, cpu_tflite], base, 0.01, None, 20.0, profile=jetson)
    # assert
    assert chosen is fp16
    assert "estimated device latency" in reason and "jetson-orin-nano" in reason
    assert fp16.status == "ok"  # slower on the host's CPU does not matter for a GPU target
    assert (
        cpu_tflite.status == "over-budget" and "estimated slower than fp32 on the device" in cpu_tflite.reason
    )


def test_cpu_profile_keeps_ranking_by_host_speed() -> None:
    rpi = load_profile("rpi4b")
    assert not runs_onnx_on_gpu(rpi)
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=6.0, baseline=True)
    int8 = _cand("onnx-int8-static-minmax", size=260, speedup=2.0, estimate=3.0)
    fp16 = _cand("onnx-fp16", size=500, speedup=1.5, estimate=2.0, precision="fp16")
    chosen, _ = choose([base, int8, fp16], base, 0.01, None, 100.0, profile=rpi)
    assert chosen is int8


def test_gpu_profile_without_estimates_falls_back_to_host_speed() -> None:
    jetson = load_profile("jetson-orin-nano")
    base = _cand("onnx-fp32", size=1000, speedup=1.0, estimate=None, baseline=True)
    int8 = _cand("onnx-int8-static-minmax", size=260, speedup=2.0, estimate=None)
    chosen, reason = choose([base, int8], base, 0.01, None, None, profile=jetson)
    assert chosen is int8 and "side by side" in reason


@pytest.mark.slow
def test_speech_plan_for_rpi4b_never_picks_a_bigger_model(tmp_path: Path) -> None:
    """The issue's case end to end: a speech Transformer whose optimized graph is bigger than fp32's."""
    pytest.importorskip("torch")
    import numpy as np
    from test_estimate_contrib import _bench_models

    from edgefleet.sdk.build.builder import build
    from edgefleet.sdk.build.plan import PlanOptions

    # prepare: shared layer weights (nn.TransformerEncoder's copies) make onnx-fp32-opt ~3x fp32's size
    model = _bench_models().speech_encoder(d_model=64, layers=2, heads=2, distinct=False)
    mel = np.random.default_rng(0).standard_normal((64, 80, 64)).astype(np.float32)
    plan = PlanOptions(prune_levels=(), static_calibrations=("minmax",), mixed_precision=False, tflite=False)
    # act
    result = build(model, "rpi4b", calib=mel, eval=mel, plan=plan, latency_runs=5, workdir=tmp_path / "work")
    # assert
    by_id = {c.id: c for c in result.candidates}
    base = result.baseline
    assert base.size_bytes and base.estimate_ms
    assert result.chosen.size_bytes is not None and (
        result.chosen.size_bytes <= base.size_bytes or (result.chosen.speedup or 0) > 1.0
    )
    for cand in result.candidates:
        if cand.spec.precision == "fp32" and cand.estimate_ms is not None:
            assert cand.estimate_ms >= 0.5 * base.estimate_ms, cand.id
    opt = by_id["onnx-fp32-opt"]
    if (
        opt.size_bytes
        and opt.size_bytes > base.size_bytes
        and not ((opt.speedup or 0) > 1.0 and not opt.speed_tie)
    ):
        assert opt.status == "over-budget" and "bigger than fp32" in opt.reason


def test_host_gpu_providers_lists_only_what_this_onnxruntime_offers(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    from edgefleet.sdk.build.profile import host_gpu_providers

    jetson = load_profile("jetson-orin-nano")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert host_gpu_providers(jetson) == []
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert host_gpu_providers(jetson) == ["CUDAExecutionProvider"]
    assert host_gpu_providers(load_profile("rpi4b")) == []
