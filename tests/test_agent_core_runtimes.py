"""Runtime plug-ins: onnxruntime and TFLite load, describe and run models; failures become RuntimeLoadError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes import RUNTIMES, load_runtime
from edgefleet.agent.core.runtimes.onnx import choose_providers
from edgefleet.agent.core.runtimes.tflite import tensor_names
from tests.agent_core_support import IN_FEATURES, predict, tiny_onnx


def test_onnx_runtime_matches_bare_session(tmp_path: Path) -> None:
    # prepare
    model = tiny_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((5, IN_FEATURES)).astype(np.float32)
    # act
    rt = load_runtime("onnxruntime", model, threads=1)
    out = rt.run({"x": x})
    # assert
    np.testing.assert_allclose(out[0], predict(model, x), rtol=1e-6)
    assert [t.name for t in rt.inputs] == ["x"]
    assert rt.inputs[0].shape == (None, IN_FEATURES)
    assert rt.outputs[0].dtype == "float32"
    assert rt.providers[-1] == "CPUExecutionProvider"
    assert rt.describe()["runtime"] == "onnxruntime"
    rt.close()
    with pytest.raises(RuntimeLoadError):
        rt.run({"x": x})


def test_provider_choice_keeps_order_and_cpu_fallback() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers([], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers([], available) == available


def test_unknown_runtime_lists_known(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError) as info:
        load_runtime("tensorflow-full", tmp_path / "m", threads=1)
    assert info.value.code == "runtime-unknown"
    assert "onnxruntime" in info.value.reason and "tflite" in info.value.reason
    assert "onnxruntime" in RUNTIMES.names()


def test_garbage_model_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01this is not a model")
    with pytest.raises(RuntimeLoadError) as info:
        load_runtime("onnxruntime", bad, threads=1)
    assert info.value.code == "model-load-failed"
    assert "bad.onnx" in info.value.reason


@pytest.mark.tflite
def test_tflite_runtime_runs_litert_model(tmp_path: Path) -> None:
    # prepare: a small torch model converted without TensorFlow, batch fixed at 1
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 4)).eval()
    path = tmp_path / "m.tflite"
    litert_torch.convert(net, (torch.zeros(1, IN_FEATURES),)).export(str(path))
    x = np.random.default_rng(0).standard_normal((3, IN_FEATURES)).astype(np.float32)
    # act
    rt = load_runtime("tflite", path, threads=2)
    name = rt.inputs[0].name
    one = rt.run({name: x[:1]})
    many = rt.run({name: x})  # split into rows: the converted batch is 1
    # assert
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(one[0], want[:1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(many[0], want, rtol=1e-4, atol=1e-5)
    assert "XNNPACK" in rt.providers[0]
    assert rt.threads == 2
    # the short name the build writes into the manifest and eval.npz, not 'serving_default_args_0:0'
    assert ":" not in name and not name.startswith("serving_default_")
    assert rt.fixed_batch == 1


def test_tflite_tensor_names_are_short_unless_they_would_collide() -> None:
    assert tensor_names(["serving_default_x:0", "serving_default_mask:0"]) == ["x", "mask"]
    assert tensor_names(["StatefulPartitionedCall:0"]) == ["StatefulPartitionedCall"]
    # shortening would make two inputs one name: the raw names stay
    assert tensor_names(["serving_default_x:0", "x:1"]) == ["serving_default_x:0", "x:1"]


def test_onnx_static_batch_model_runs_any_row_count_in_chunks(tmp_path: Path) -> None:
    # prepare: the tiny classifier with its batch fixed at 2 (as a static-batch torch.export gives)
    import onnx

    model = tiny_onnx(tmp_path / "dyn.onnx")
    proto = onnx.load(str(model))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    x = np.random.default_rng(1).standard_normal((5, IN_FEATURES)).astype(np.float32)
    # act
    rt = load_runtime("onnxruntime", fixed, threads=1)
    by_run = rt.run({"x": x})[0]
    by_runner = rt.runner()({"x": x})[0]
    exact = rt.runner()({"x": x[:2]})[0]
    # assert: 5 rows run as 2 + 2 + 1 (padded), each equal to the dynamic model's answer
    assert rt.fixed_batch == 2
    np.testing.assert_allclose(by_run, predict(model, x), rtol=1e-6)
    np.testing.assert_allclose(by_runner, predict(model, x), rtol=1e-6)
    assert exact.shape == (2, 4)
