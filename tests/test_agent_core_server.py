"""ModelServer: inputs checked, errors typed, feedback, window stats, atomic swap with requests in flight."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import pytest

from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo
from edgefleet.agent.server import InferError, ModelServer
from tests.agent_core_support import IN_FEATURES, predict, tiny_onnx


class GatedRuntime(Runtime):
    """A runtime whose `run` waits for a gate, so a test can hold a request in flight."""

    name = "test-gated"
    gates: dict[str, threading.Event] = {}
    entered: dict[str, threading.Event] = {}
    closed: dict[str, bool] = {}

    def __init__(self, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(model_path, threads, providers)
        self.key = model_path.name
        self.gates.setdefault(self.key, threading.Event())
        self.entered[self.key] = threading.Event()
        self.closed[self.key] = False

    @property
    def inputs(self) -> List[TensorInfo]:
        return [TensorInfo("x", "float32", (None, 2))]

    @property
    def outputs(self) -> List[TensorInfo]:
        return [TensorInfo("y", "float32", (None, 2))]

    @property
    def providers(self) -> List[str]:
        return ["test"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        assert not self.closed[self.key], "ran on a closed session"
        self.entered[self.key].set()
        assert self.gates[self.key].wait(10)
        return [feeds["x"] * (2.0 if self.key == "new" else 1.0)]

    def close(self) -> None:
        self.closed[self.key] = True


if "test-gated" not in RUNTIMES:
    RUNTIMES.register("test-gated")(GatedRuntime)


@pytest.fixture
def server(tmp_path: Path) -> ModelServer:
    srv = ModelServer(threads=1)
    model = srv.load(tiny_onnx(tmp_path / "m.onnx"), name="tiny", version=1, slot="a")
    srv.activate(model)
    return srv


def test_no_model_raises_typed_error() -> None:
    srv = ModelServer(threads=1)
    with pytest.raises(InferError) as info:
        srv.infer(np.zeros((1, 8), np.float32))
    assert info.value.code == "no-model"
    assert srv.window_stats()["errors_by_code"] == {"no-model": 1}


def test_infer_matches_runtime_and_casts_dtype(server: ModelServer, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, IN_FEATURES))  # float64 from the caller
    result = server.infer({"x": x}, request_id="r1")
    np.testing.assert_allclose(
        result.outputs["logits"], predict(tmp_path / "m.onnx", x.astype(np.float32)), rtol=1e-6
    )
    assert (result.request_id, result.model_name, result.model_version) == ("r1", "tiny", 1)
    assert result.latency_ms > 0
    bare = server.infer(x.astype(np.float32))  # one-input model: a bare array is fine
    assert bare.request_id != "r1"


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ({"y": np.zeros((1, 8))}, "missing ['x']"),
        ({"x": np.zeros((1, 5))}, "expects"),
        ({"x": np.zeros(8)}, "rank 2"),
        ({"x": [["a"] * 8]}, "not a float32"),
        ("text", "mapping"),
    ],
)
def test_bad_inputs_name_the_problem(server: ModelServer, inputs: Any, fragment: str) -> None:
    with pytest.raises(InferError) as info:
        server.infer(inputs)
    assert info.value.code == "bad-input"
    assert fragment in info.value.reason


def test_feedback_gives_live_accuracy(server: ModelServer) -> None:
    x = np.random.default_rng(2).standard_normal((4, IN_FEATURES)).astype(np.float32)
    ids = []
    for row in x:
        r = server.infer(row[None, :])
        ids.append((r.request_id, int(r.outputs["logits"].argmax())))
    server.feedback(ids[0][0], ids[0][1])
    server.feedback(ids[1][0], ids[1][1])
    server.feedback(ids[2][0], (ids[2][1] + 1) % 4)
    with pytest.raises(InferError) as info:
        server.feedback("nope", 1)
    assert info.value.code == "unknown-request"
    with pytest.raises(InferError):
        server.feedback(ids[3][0], -1)
    stats = server.window_stats()
    assert stats["count"] == 4 and stats["feedback"] == 3
    assert stats["live_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert stats["p50_ms"] is not None and stats["p95_ms"] >= stats["p50_ms"]
    again = server.window_stats()
    assert again["count"] == 0 and again["total_count"] == 4


def test_feedback_memory_is_bounded(tmp_path: Path) -> None:
    srv = ModelServer(threads=1, feedback_capacity=3)
    srv.activate(srv.load(tiny_onnx(tmp_path / "m.onnx"), name="t", version=1, slot="a"))
    first = srv.infer(np.zeros((1, 8), np.float32)).request_id
    for _ in range(3):
        srv.infer(np.zeros((1, 8), np.float32))
    with pytest.raises(InferError):
        srv.feedback(first, 0)


def test_swap_keeps_in_flight_request_on_old_session(tmp_path: Path) -> None:
    # prepare: "old" serves; one request is held inside it
    for key in ("old", "new"):
        GatedRuntime.gates[key] = threading.Event()
    GatedRuntime.gates["new"].set()
    srv = ModelServer(threads=1)
    srv.activate(srv.load(tmp_path / "old", name="m", version=1, slot="a", runtime="test-gated"))
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(srv.infer(np.ones((1, 2), np.float32))))
    worker.start()
    assert GatedRuntime.entered["old"].wait(5)
    # act: switch while the old request is still running
    new = srv.load(tmp_path / "new", name="m", version=2, slot="b", runtime="test-gated")
    previous = srv.activate(new)
    during = srv.infer(np.ones((1, 2), np.float32))
    # assert: new requests use the new model; the old session stays open until its request ends
    assert previous is not None and previous.version == 1
    assert during.model_version == 2 and during.outputs["y"][0, 0] == 2.0
    assert GatedRuntime.closed["old"] is False
    GatedRuntime.gates["old"].set()
    worker.join(5)
    assert results[0].model_version == 1 and results[0].outputs["y"][0, 0] == 1.0
    assert GatedRuntime.closed["old"] is True
    assert srv.window_stats()["errors"] == 0


def test_many_swaps_under_load_fail_no_request(tmp_path: Path) -> None:
    srv = ModelServer(threads=1)
    paths = [tiny_onnx(tmp_path / f"m{i}.onnx", seed=i) for i in range(2)]
    srv.activate(srv.load(paths[0], name="t", version=1, slot="a"))
    stop = threading.Event()
    errors: list[BaseException] = []
    workers = 4
    # Versions each worker got answers from; the next swap waits until every worker has been answered
    # by the current version, so each swap happens under load from all of them (not left to the scheduler).
    seen: list[set[int]] = [set() for _ in range(workers)]
    cond = threading.Condition()

    def hammer(me: int) -> None:
        x = np.zeros((1, 8), np.float32)
        while not stop.is_set():
            try:
                version = srv.infer(x).model_version
            except BaseException as exc:  # any failure is the bug under test
                errors.append(exc)
                continue
            if version not in seen[me]:
                with cond:
                    seen[me].add(version)
                    cond.notify_all()

    def every_worker_saw(version: int) -> bool:
        return all(version in s for s in seen) or bool(errors)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        with cond:
            assert cond.wait_for(lambda: every_worker_saw(1), timeout=30), seen
        for v in range(2, 12):
            srv.activate(srv.load(paths[v % 2], name="t", version=v, slot="ab"[v % 2]))
            with cond:
                assert cond.wait_for(lambda v=v: every_worker_saw(v), timeout=30), (v, seen)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert errors == []
    assert srv.active is not None and srv.active.version == 11
    # every worker was answered by every one of the 11 versions, none failed across the 10 swaps
    assert all(s == set(range(1, 12)) for s in seen), seen
