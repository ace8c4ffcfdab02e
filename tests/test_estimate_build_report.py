"""A real build for a GPU profile: ranked by estimated device latency, unknown ops listed in report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from edgefleet.sdk.build.builder import build  # noqa: E402
from edgefleet.sdk.build.plan import PlanOptions  # noqa: E402


def _key(tmp_path: Path) -> Any:
    keys = pytest.importorskip("edgefleet.sdk.trust.keys")
    pair = keys.init_keys(tmp_path / "keys")
    return keys.load_private_key(getattr(pair, "private_path", tmp_path / "keys" / "fleet.key"))


@pytest.mark.slow
@pytest.mark.tflite
def test_jetson_build_ranks_by_estimated_device_latency(tmp_path: Path) -> None:
    # prepare: a small CNN; for the Jetson, fp16 runs on its GPU and TFLite INT8 on its CPU. On this
    # host's CPU the INT8 model is the smaller and usually the faster one: host timings would pick it.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()
    x = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    plan = PlanOptions(
        only=("onnx-fp16", "tflite-int8"),
        prune_levels=(),
        mixed_precision=False,
        static_calibrations=("minmax",),
        sensitivity=False,
    )
    out = tmp_path / "bundle"
    # act
    result = build(
        net,
        "jetson-orin-nano",
        calib=x,
        eval=x,
        plan=plan,
        out=out,
        private_key=_key(tmp_path),
        latency_runs=5,
        max_accuracy_drop=0.05,
        workdir=tmp_path / "work",
    )
    # assert
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    by_id = {c["id"]: c for c in report["candidates"]}
    if "tflite-int8" not in by_id or by_id["tflite-int8"]["status"] == "failed":
        pytest.skip(f"no TFLite INT8 candidate here: {by_id.get('tflite-int8', {}).get('reason')}")
    fp16, int8 = by_id["onnx-fp16"], by_id["tflite-int8"]
    assert fp16["estimated_target_latency_ms"] < int8["estimated_target_latency_ms"]
    assert report["chosen"] == "onnx-fp16" == result.chosen.id
    if report["ranked_by"]["basis"] == "gpu-measured":  # a host with a GPU onnxruntime timed it there
        assert report["ranked_by"]["provider"] in report["reason"]
    else:
        assert report["ranked_by"] == {"basis": "estimate", "provider": None}
        assert "estimated device latency" in report["reason"] and "jetson-orin-nano" in report["reason"]
    for cand in [report["baseline"], *report["candidates"]]:
        assert cand["unknown_op_types"] == [], cand["id"]


def test_report_lists_ops_the_estimator_does_not_know(tmp_path: Path) -> None:
    # prepare: an ONNX model with Softsign, an op onnxruntime runs and the estimator has no cost for
    weight = numpy_helper.from_array(np.full((8, 4, 3, 3), 0.05, np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Softsign", ["c"], ["y"]),
        ],
        "softsign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 16, 16])],
        [weight],
    )
    source = tmp_path / "softsign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    x = np.random.default_rng(0).random((16, 4, 16, 16), dtype=np.float32)
    out = tmp_path / "bundle"
    # act
    result = build(
        source,
        "rpi4b",
        calib=x,
        eval=x,
        plan=PlanOptions(
            only=("onnx-int8-dynamic",), prune_levels=(), mixed_precision=False, sensitivity=False
        ),
        out=out,
        private_key=_key(tmp_path),
        latency_runs=5,
        max_accuracy_drop=0.5,
        workdir=tmp_path / "work",
    )
    # assert: every measured candidate names the unknown op, in report.json and on the result
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["baseline"]["unknown_op_types"] == ["Softsign"]
    measured = [c for c in report["candidates"] if c["status"] != "failed"]
    assert measured and all(c["unknown_op_types"] == ["Softsign"] for c in measured)
    assert result.baseline.unknown_op_types == ("Softsign",)
