"""The serving hot path: batched histogram counts, lock-free bookkeeping, the compiled onnxruntime call."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo
from edgefleet.agent.server import InferError, ModelServer
from edgefleet.agent.telemetry import LatencyHistogram
from tests.agent_core_support import IN_FEATURES, predict, tiny_onnx


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0.0, max_value=1e7, allow_nan=False),
            st.sampled_from([float("nan"), -1.0, 0.0, 1e-6, 1e9]),
        ),
        max_size=600,
    ),
    st.lists(st.integers(min_value=0, max_value=80), max_size=8),
)
def test_record_many_counts_like_record(values: list[float], bounds: list[int]) -> None:
    # prepare: values exactly on bucket bounds are where an off-by-one would show
    one, many = LatencyHistogram(), LatencyHistogram()
    values = values + [one.upper_bound(b) for b in bounds]
    # act
    for v in values:
        one.record(v)
    many.record_many(values)
    # assert
    assert many.counts == one.counts and many.count == one.count
    assert many.max_seen == one.max_seen and many.min_seen == one.min_seen
    assert math.isclose(many.total_ms, one.total_ms, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture
def server(tmp_path: Path) -> ModelServer:
    srv = ModelServer(threads=1, feedback_capacity=8)
    srv.activate(srv.load(tiny_onnx(tmp_path / "m.onnx"), name="tiny", version=3, slot="a"))
    return srv


def test_concurrent_requests_are_all_counted(server: ModelServer) -> None:
    # 4 threads × 700 requests cross the batch size of the histogram many times, with no lock on the path
    x = np.zeros((1, IN_FEATURES), np.float32)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(700):
                server.infer(x)
        except BaseException as exc:  # any failure is the bug under test
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    first = server.window_stats()
    server.infer(x)
    second = server.window_stats()
    assert errors == []
    assert first["count"] == 2800 and first["total_count"] == 2800
    assert second["count"] == 1 and second["total_count"] == 2801
    assert first["p50_ms"] is not None and first["p50_ms"] > 0


def test_result_reads_lazily_and_matches_the_session(server: ModelServer, tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, IN_FEATURES)).astype(np.float32)
    result = server.infer({"x": x})
    assert result.outputs is result.outputs  # built once
    np.testing.assert_allclose(result.outputs["logits"], predict(tmp_path / "m.onnx", x), rtol=1e-6)
    assert (result.model_name, result.model_version) == ("tiny", 3)
    assert "tiny v3" in repr(result)


def test_feedback_by_server_id_once_and_only_while_in_the_ring(server: ModelServer) -> None:
    rows = np.random.default_rng(4).standard_normal((10, IN_FEATURES)).astype(np.float32)
    results = [server.infer(row[None, :]) for row in rows]
    # the ring holds the last 8: the first two are gone
    with pytest.raises(InferError) as info:
        server.feedback(results[0].request_id, 0)
    assert info.value.code == "unknown-request"
    last = results[-1]
    server.feedback(last.request_id, int(last.outputs["logits"].argmax()))
    with pytest.raises(InferError) as again:  # one label per prediction
        server.feedback(last.request_id, 0)
    assert again.value.code == "unknown-request"
    stats = server.window_stats()
    assert stats["feedback"] == 1 and stats["live_accuracy"] == 1.0


def test_feedback_by_caller_id_is_bounded(server: ModelServer) -> None:
    x = np.random.default_rng(5).standard_normal((1, IN_FEATURES)).astype(np.float32)
    wrong = (int(server.infer(x).outputs["logits"].argmax()) + 1) % 4
    for i in range(9):
        server.infer(x, request_id=f"app-{i}")
    with pytest.raises(InferError):
        server.feedback("app-0", 0)  # evicted: only the last 8 caller ids are kept
    server.feedback("app-8", wrong)
    assert server.window_stats()["live_accuracy"] == 0.0


def test_batch_prediction_refuses_feedback(server: ModelServer) -> None:
    result = server.infer(np.zeros((3, IN_FEATURES), np.float32))
    with pytest.raises(InferError) as info:
        server.feedback(result.request_id, 1)
    assert info.value.code == "bad-feedback"


def test_compiled_call_matches_and_closes(tmp_path: Path) -> None:
    srv = ModelServer(threads=1)
    model = srv.load(tiny_onnx(tmp_path / "m.onnx"), name="t", version=1, slot="a")
    x = np.random.default_rng(6).standard_normal((4, IN_FEATURES)).astype(np.float32)
    np.testing.assert_allclose(model.call({"x": x})[0], predict(tmp_path / "m.onnx", x), rtol=1e-6)
    model.close()
    with pytest.raises(RuntimeLoadError) as info:
        model.call({"x": x})
    assert info.value.code == "runtime-closed"


def test_inputs_that_miss_the_fast_path_still_work_or_name_the_problem(server: ModelServer) -> None:
    x64 = np.random.default_rng(7).standard_normal((2, IN_FEATURES))
    assert server.infer(x64).outputs["logits"].shape == (2, 4)  # float64 bare array: cast
    strided = np.ascontiguousarray(np.repeat(x64, 2, axis=1), np.float32)[:, ::2]  # float32, not contiguous
    np.testing.assert_allclose(
        server.infer({"x": strided}).outputs["logits"], server.infer(x64).outputs["logits"], rtol=1e-5
    )
    with pytest.raises(InferError) as info:
        server.infer({"x": np.zeros((2, IN_FEATURES + 1), np.float32)})
    assert info.value.code == "bad-input" and "expects" in info.value.reason
    with pytest.raises(InferError) as extra:
        server.infer({"x": np.zeros((1, IN_FEATURES), np.float32), "y": np.zeros(1)})
    assert "unknown ['y']" in extra.value.reason


def test_unload_and_reactivate_route_requests(server: ModelServer, tmp_path: Path) -> None:
    x = np.zeros((1, IN_FEATURES), np.float32)
    model = server.current
    assert model is not None
    server.unload()
    with pytest.raises(InferError) as info:
        server.infer(x)
    assert info.value.code == "no-model"
    server.activate(model)
    assert server.infer(x).model_version == 3
    stats = server.window_stats()
    assert stats["errors_by_code"] == {"no-model": 1} and stats["count"] == 1


class EchoRuntime(Runtime):
    """Returns its input: an output whose declared shape is dynamic past the batch."""

    name = "test-echo"

    def __init__(self, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(model_path, threads, providers)

    @property
    def inputs(self) -> List[TensorInfo]:
        return [TensorInfo("x", "float32", (None, None))]

    @property
    def outputs(self) -> List[TensorInfo]:
        return [TensorInfo("y", "float32", (None, None))]

    @property
    def providers(self) -> List[str]:
        return ["test"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        return [feeds["x"].copy()]

    def close(self) -> None:
        pass


if "test-echo" not in RUNTIMES:
    RUNTIMES.register("test-echo")(EchoRuntime)


def test_feedback_on_a_dynamic_output_shape(tmp_path: Path) -> None:
    srv = ModelServer(threads=1)
    srv.activate(srv.load(tmp_path / "echo", name="echo", version=1, slot="a", runtime="test-echo"))
    one = srv.infer({"x": np.array([[0.1, 0.9, 0.2]], np.float32)})
    batch = srv.infer({"x": np.zeros((2, 3), np.float32)})
    srv.feedback(one.request_id, 1)
    with pytest.raises(InferError) as info:
        srv.feedback(batch.request_id, 0)
    assert info.value.code == "bad-feedback"
    assert srv.window_stats()["live_accuracy"] == 1.0
