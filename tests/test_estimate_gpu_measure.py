"""GPU profiles: candidates timed on the host's GPU providers when it has them, else ranked by the estimate.

No GPU is at hand on the test hosts: the provider list onnxruntime reports is monkeypatched, the
timings are real (onnxruntime then runs on the CPU, and the record says so). The ranking by a measured
GPU speed is checked on candidate records handed to `choose`, as the other choose tests do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.device_profiles import load_profile
from edgefleet.sdk.build import measure
from edgefleet.sdk.build.candidate import Candidate
from edgefleet.sdk.build.choose import choose, estimate_target_ms, make_report, ranked_by
from edgefleet.sdk.build.measure import (
    LatencyStats,
    Quality,
    build_providers,
    evaluate,
    measure_side_by_side,
    providers_scope,
    run_model,
)
from edgefleet.sdk.build.model_io import Dataset
from edgefleet.sdk.build.plan import CandidateSpec
from edgefleet.sdk.build.profile import host_gpu_providers

ort = pytest.importorskip("onnxruntime")
CUDA = "CUDAExecutionProvider"


def _conv(path: Path, kernel: int) -> Path:
    """A 1x16x24x24 Conv model: the kernel size sets its cost."""
    weight = numpy_helper.from_array(np.full((16, 16, kernel, kernel), 0.01, np.float32), "w")
    pad = kernel // 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4)],
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture()
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """onnxruntime says it has CUDA; every runner the build opens is recorded with what it asked for."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    opened: list[tuple[Any, ...]] = []
    real = measure.open_runner

    def spy(path: Path, threads: Optional[int] = None, providers: Any = None, **kw: Any) -> Any:
        opened.append((Path(path).name, tuple(providers or ())))
        return real(path, threads=threads, providers=providers, **kw)

    monkeypatch.setattr(measure, "open_runner", spy)
    return opened


def test_gpu_profile_times_on_its_gpu_providers_and_records_what_ran(
    tmp_path: Path, cuda_listed: list[tuple[Any, ...]]
) -> None:
    # prepare: the Jetson runs ONNX on CUDA / TensorRT; this onnxruntime claims CUDA (it has no GPU)
    jetson = load_profile("jetson-orin-nano")
    providers = host_gpu_providers(jetson)
    assert providers == [CUDA]
    big, small = _conv(tmp_path / "big.onnx", 5), _conv(tmp_path / "small.onnx", 1)
    x = {"x": np.random.default_rng(0).random((4, 16, 24, 24), dtype=np.float32)}
    # act: timed as the build's worker times a candidate, inside the build's provider scope
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), providers_scope(providers):
        base, cand = measure_side_by_side(big, small, x, runs=5, min_seconds=0.0)
    # assert: CUDA was asked for, the session fell back to the CPU, and the record says the CPU
    assert cuda_listed == [
        ("big.onnx", (CUDA, "CPUExecutionProvider")),
        ("small.onnx", (CUDA, "CPUExecutionProvider")),
    ]
    assert base.provider == cand.provider == "CPUExecutionProvider"
    assert not base.on_gpu and not cand.on_gpu
    assert cand.to_dict()["provider"] == "CPUExecutionProvider"
    assert build_providers() == ()  # the scope ended


def test_without_a_gpu_measurement_the_estimate_ranks(
    tmp_path: Path, cuda_listed: list[tuple[Any, ...]]
) -> None:
    # prepare: real measurements under the GPU scope (they ran on the CPU) and real estimates
    jetson = load_profile("jetson-orin-nano")
    big, small = _conv(tmp_path / "big.onnx", 5), _conv(tmp_path / "small.onnx", 3)
    x = {"x": np.random.default_rng(1).random((4, 16, 24, 24), dtype=np.float32)}
    reference = run_model(big, x)
    with pytest.warns(UserWarning), providers_scope(host_gpu_providers(jetson)):
        base_lat, cand_lat = measure_side_by_side(big, small, x, runs=5, min_seconds=0.0)
    cands = []
    for cid, path, lat, baseline in (("onnx-fp32", big, base_lat, True), ("onnx-k3", small, cand_lat, False)):
        cand = Candidate(spec=CandidateSpec(cid, "onnx", "fp32", "onnxruntime", baseline=baseline))
        cand.path, cand.size_bytes, cand.latency = path, path.stat().st_size, lat
        cand.quality = evaluate(run_model(path, x), reference=reference)  # fidelity to fp32
        cand.speedup = base_lat.p50_ms / lat.p50_ms
        cand.speedup_noise = lat.ratio_noise
        cand.estimate_ms = estimate_target_ms(path, jetson, 1, "fp32")
        cands.append(cand)
    base, k3 = cands
    assert base.estimate_ms and k3.estimate_ms and k3.estimate_ms < base.estimate_ms
    # act
    chosen, reason = choose(cands, base, 0.99, None, None, profile=jetson)
    report = make_report(jetson, base, cands, chosen, reason, Dataset(x), Dataset(x), 0.99, None, None, 1, 1)
    # assert: nothing ran on a GPU, so the estimate ranks, and report.json says so
    assert chosen is k3
    assert "estimated device latency" in reason and CUDA not in reason
    assert report["ranked_by"] == {"basis": "estimate", "provider": None}
    assert report["candidates"][1]["host_latency_ms"]["provider"] == "CPUExecutionProvider"


def test_worker_processes_see_the_build_providers() -> None:
    # the build's candidate workers are fresh interpreters: the scope reaches them through the environment
    code = "from edgefleet.sdk.build.measure import build_providers; print(','.join(build_providers()))"
    with providers_scope([CUDA, "CPUExecutionProvider"]):
        inside = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
        )
    outside = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == CUDA  # the CPU is always appended, never asked for
    assert outside.stdout.strip() == ""


def _record(
    cid: str,
    *,
    size: int,
    p50: float,
    speedup: float,
    estimate: float,
    provider: str,
    precision: str = "fp16",
    fmt: str = "onnx",
    baseline: bool = False,
) -> Candidate:
    """A candidate record as choose receives it (the GPU ranking needs a GPU-timed one: none is at hand)."""
    spec = CandidateSpec(cid, fmt, "fp32" if baseline else precision, "onnxruntime", baseline=baseline)
    return Candidate(
        spec=spec,
        size_bytes=size,
        quality=Quality("accuracy", 0.98, samples=100),
        latency=LatencyStats(p50, p50 * 1.2, p50, 50, 1, 1, 0.02, provider),
        estimate_ms=estimate,
        speedup=speedup,
        speedup_noise=0.02,
    )


def test_gpu_timed_candidates_rank_by_their_measured_speed() -> None:
    # prepare: the estimate rates INT8 fastest; timed on the host's GPU fp16 is fastest, INT8 slower than
    # fp32 (its QDQ nodes fall back); TFLite runs on the CPU and keeps its estimate
    jetson = load_profile("jetson-orin-nano")
    base = _record("onnx-fp32", size=1000, p50=2.0, speedup=1.0, estimate=6.0, provider=CUDA, baseline=True)
    fp16 = _record("onnx-fp16", size=500, p50=1.0, speedup=2.0, estimate=2.5, provider=CUDA)
    int8 = _record("onnx-int8-static-minmax", size=260, p50=2.6, speedup=0.77, estimate=2.0, provider=CUDA)
    tfl = _record(
        "tflite-int8", size=250, p50=9.0, speedup=0.3, estimate=9.0, provider="XNNPACK", fmt="tflite"
    )
    # act
    chosen, reason = choose([base, fp16, int8, tfl], base, 0.01, None, 20.0, profile=jetson)
    # assert
    assert chosen is fp16
    assert f"measured on this host's GPU ({CUDA})" in reason and "2.00× fp32's speed" in reason
    assert int8.status == "over-budget" and "slower than fp32 on this host's GPU" in int8.reason
    assert tfl.status == "over-budget" and "estimated slower than fp32 on the device" in tfl.reason
    assert ranked_by(jetson, base) == {"basis": "gpu-measured", "provider": CUDA}


def test_a_gpu_timing_does_not_rank_a_cpu_profile() -> None:
    rpi = load_profile("rpi4b")
    base = _record("onnx-fp32", size=1000, p50=2.0, speedup=1.0, estimate=6.0, provider=CUDA, baseline=True)
    small = _record(
        "onnx-int8", size=260, p50=1.0, speedup=2.0, estimate=3.0, provider=CUDA, precision="int8"
    )
    chosen, reason = choose([base, small], base, 0.01, None, None, profile=rpi)
    assert chosen is small and "side by side" in reason and "GPU" not in reason
    assert ranked_by(rpi, base)["basis"] == "host"
