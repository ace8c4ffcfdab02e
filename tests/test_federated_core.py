"""Federated pieces without a broker: the head in the ONNX graph, the signed plan's checks, the feedback
buffer, the host's update checks and the store's round table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core.federated_msgs import FedRoundCommand, FedUpdate
from edgefleet.agent.core.protocol import parse_command, parse_device_message
from edgefleet.agent.federated.data import DataError, FeedbackBuffer, load_train_data
from edgefleet.agent.federated.plan import PlanError, RoundPlan, parse_plan
from tests.federated_support import digits, digits_mlp


def _plan(**changes: object) -> RoundPlan:
    base = dict(
        task="t1",
        round=1,
        device="d1",
        expires=time.time() + 60,
        model_name="digits",
        model_version=2,
        input="x",
        feature="edgefleet_features",
        weight=np.ones((4, 3), np.float32),
        bias=np.zeros(3, np.float32),
        epochs=1,
        batch=8,
        lr=0.1,
    )
    base.update(changes)
    return RoundPlan(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = digits()
    return digits_mlp(tmp_path_factory.mktemp("m") / "digits.onnx", x[:200], y[:200])


def test_the_head_is_the_last_gemm_and_goes_back_in_its_own_layout(model: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from edgefleet.sdk.federated.result import write_head
    from edgefleet.sdk.federated.task import FEATURE_OUTPUT, find_head, prepare_model

    # prepare
    spec = find_head(onnx.load(str(model)))
    prepared = tmp_path / "prepared.onnx"
    onnx.save(prepare_model(onnx.load(str(model)), spec), str(prepared))
    weight = np.random.default_rng(0).standard_normal(spec.weight.shape).astype(np.float32)
    bias = np.arange(spec.bias.size, dtype=np.float32)
    # act
    out = write_head(prepared, spec, weight, bias, tmp_path / "trained.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = digits()[0][:5]
    logits, features = session.run(["logits", FEATURE_OUTPUT], {"x": x})
    # assert: (features, classes) layout host-side; the graph's transB layout kept; logits = features @ W + b
    assert spec.node == "head" and spec.trans_b and spec.weight.shape == (16, 10) and spec.feature == "r"
    np.testing.assert_allclose(logits, features @ weight + bias, rtol=1e-4, atol=1e-4)


def test_a_matmul_add_head_and_a_named_head_are_found(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.sdk.federated.task import FederatedError, find_head

    # prepare: x → MatMul(W) → Add(B) → Softmax
    w, b = np.ones((4, 3), np.float32), np.zeros(3, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "B"], ["a"]),
            helper.make_node("Softmax", ["a"], ["p"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph)
    # act
    spec = find_head(model)
    named = find_head(model, ["W", "B"])
    # assert
    assert (spec.weight_name, spec.bias_name, spec.feature) == ("W", "B", "x")
    assert named.weight_name == "W"
    with pytest.raises(FederatedError, match="not weights of the model"):
        find_head(model, ["nope"])


def test_a_plan_round_trips_and_values_outside_the_fixed_ranges_are_refused() -> None:
    # prepare
    good = _plan().to_bytes()
    # act
    plan = parse_plan(good, device_id="d1")
    # assert: read back; then every kind of bad plan refused with its code
    assert plan.weight.shape == (4, 3) and plan.lr == pytest.approx(0.1)
    cases = {
        "plan-out-of-range": _plan(lr=50.0).to_bytes(),
        "plan-expired": _plan(expires=time.time() - 1).to_bytes(),
        "plan-wrong-device": _plan(device="other").to_bytes(),
    }
    for code, data in cases.items():
        with pytest.raises(PlanError) as err:
            parse_plan(data, device_id="d1")
        assert err.value.code == code
    obj = json.loads(good)
    obj["epochs"] = 1000
    with pytest.raises(PlanError) as err:
        parse_plan(json.dumps(obj).encode(), device_id="d1")
    assert err.value.code == "plan-out-of-range"


def test_a_plan_edited_after_signing_fails_the_signature(tmp_path: Path) -> None:
    from edgefleet.agent.core.errors import VerifyError
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.sdk.trust.keys import init_keys, load_private_key, sign

    # prepare: a plan signed with the fleet key, then one number changed
    keys = init_keys(tmp_path / "keys")
    data = _plan().to_bytes()
    cmd = FedRoundCommand(
        id="c1",
        plan=data,
        signatures={"signatures": [sign(data, load_private_key(tmp_path / "keys" / "fleet.key"))]},
    )
    trust = TrustStore.from_public_keys([keys.public_path])
    wire = parse_command(cmd.to_wire())
    assert isinstance(wire, FedRoundCommand)
    # act / assert: the original verifies, the edited one does not
    trust.verify_signatures(wire.plan, wire.signatures)
    with pytest.raises(VerifyError):
        trust.verify_signatures(wire.plan.replace(b'"lr":0.1', b'"lr":9.9'), wire.signatures)


def test_the_feedback_buffer_keeps_at_most_n_labelled_inputs_on_disk(tmp_path: Path) -> None:
    # prepare
    buffer = FeedbackBuffer(tmp_path, capacity=3)
    # act: five labelled requests, one unlabelled, one label for an unknown request
    for i in range(5):
        buffer.remember(f"r{i}", {"x": np.full((1, 4), i, np.float32)})
        assert buffer.label(f"r{i}", i % 2)
    buffer.remember("r9", {"x": np.zeros((1, 4), np.float32)})
    unknown = buffer.label("nope", 1)
    x, y = load_train_data(None, "x", FeedbackBuffer(tmp_path, capacity=3))
    # assert: a ring of three files, the newest kept, reread by a new buffer (after a restart)
    assert not unknown and len(list((tmp_path / "feedback").glob("slot-*.npz"))) == 3
    assert sorted(x[:, 0].tolist()) == [2.0, 3.0, 4.0] and sorted(y.tolist()) == [0, 0, 1]


def test_no_local_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--train-data"):
        load_train_data(str(tmp_path), "x", None)


def test_updates_with_a_wrong_shape_nan_or_a_large_norm_are_refused_with_a_code() -> None:
    from edgefleet.sdk.federated.server import FederateSettings, RoundServer

    # prepare: a server whose head has 170 numbers (only its checks are used)
    class _Head:
        size = 170

    class _Task:
        head = _Head()

    server = RoundServer.__new__(RoundServer)
    server.settings = FederateSettings(max_update_norm=10.0)
    server.task = _Task()  # type: ignore[assignment]

    def update(vector: np.ndarray, dtype: str = "float32") -> FedUpdate:
        msg = FedUpdate(
            device="d",
            seq=1,
            ts=1.0,
            task="t",
            round=1,
            ref="c",
            samples=10,
            dtype=dtype,
            shape=(vector.size,),
            data=vector.astype("<f4").tobytes(),
        )
        back = parse_device_message(msg.to_wire())
        assert isinstance(back, FedUpdate)
        return back

    # act / assert
    assert server._check(update(np.zeros(170))) is None
    assert server._check(update(np.zeros(171))) == "update-shape"
    assert server._check(update(np.zeros(170), dtype="float64")) == "update-shape"
    assert server._check(update(np.full(170, np.inf))) == "update-not-finite"
    assert server._check(update(np.full(170, 5.0))) == "update-norm"


def test_rounds_are_kept_in_the_store(tmp_path: Path) -> None:
    from edgefleet.sdk.federated.server import RoundReport
    from edgefleet.sdk.store import Store
    from edgefleet.sdk.store import federated as fed_store

    # prepare
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    fed_store.start_task(store, "t1", "f", "digits", 2, 2, {"rounds": 2})
    # act
    for r in (1, 2):
        report = RoundReport(
            round=r,
            selected=["a", "b"],
            participants=["a"],
            dropouts=["b"],
            bytes_up=10,
            accuracy=0.5 + r / 10,
        )
        fed_store.record_round(store, "t1", report.to_dict())
    fed_store.end_task(store, "t1", "succeeded", epsilon=3.0, delta=1e-5, result_version=3)
    # assert
    [task] = fed_store.tasks(store, "f")
    rows = fed_store.rounds(store, "t1")
    assert task["status"] == "succeeded" and task["epsilon"] == 3.0 and task["result_version"] == 3
    assert [r["accuracy"] for r in rows] == [0.6, 0.7] and rows[0]["dropouts"] == 1
    store.close()


def test_the_rest_api_and_metrics_show_rounds_accuracy_and_epsilon(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from edgefleet.sdk.federated.server import RoundReport
    from edgefleet.sdk.server.app import create_app
    from edgefleet.sdk.store import Store
    from edgefleet.sdk.store import federated as fed_store

    # prepare: a finished task of two rounds in the store
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    fed_store.start_task(store, "t9", "f", "digits", 2, 2, {})
    for r in (1, 2):
        fed_store.record_round(
            store, "t9", RoundReport(round=r, selected=["a"], participants=["a"], accuracy=0.8).to_dict()
        )
    fed_store.end_task(store, "t9", "succeeded", epsilon=4.5, delta=1e-5, result_version=3)
    # act
    with TestClient(create_app(store, fleet_name="f")) as client:
        listed = client.get("/api/federated").json()
        one = client.get("/api/federated/t9").json()
        missing = client.get("/api/federated/nope")
        metrics = client.get("/metrics").text
        page = client.get("/").text
    # assert
    assert listed[0]["task_id"] == "t9" and listed[0]["epsilon"] == 4.5 and listed[0]["rounds_done"] == 2
    assert [r["round"] for r in one["rounds"]] == [1, 2] and missing.status_code == 404
    assert 'edgefleet_federated_epsilon{fleet="f",task="t9",model="digits"} 4.5' in metrics
    assert "edgefleet_federated_rounds" in metrics and 'id="federated-section"' in page
    store.close()
