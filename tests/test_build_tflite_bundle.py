"""A TFLite bundle from `build` installs on the device: one input naming and one dtype mapping on both sides."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from build_support import FakeProfile  # noqa: E402

from edgefleet.agent.core.manifest import Manifest  # noqa: E402
from edgefleet.agent.core.runtimes import load_runtime  # noqa: E402
from edgefleet.agent.health import check_health  # noqa: E402
from edgefleet.agent.server import ModelServer  # noqa: E402
from edgefleet.sdk.build.builder import build  # noqa: E402
from edgefleet.sdk.build.plan import PlanOptions  # noqa: E402
from edgefleet.sdk.trust.keys import init_keys, load_private_key  # noqa: E402
from edgefleet.sdk.zoo import trained_digits_cnn  # noqa: E402

pytestmark = [pytest.mark.tflite, pytest.mark.slow]
TFLITE_ONLY = FakeProfile(name="tflite-device", runtimes=("tflite-xnnpack",), precisions=("fp32", "int8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    root = tmp_path_factory.mktemp("tflite-bundle")
    model, split = trained_digits_cnn(epochs=10)
    result = build(
        model,
        TFLITE_ONLY,
        calib=(split.x_train, split.y_train),
        eval=(split.x_test, split.y_test),
        max_accuracy_drop=0.05,
        out=root / "bundle",
        plan=PlanOptions(prune_levels=(), mixed_precision=False, only=("tflite-int8",)),
        private_key=load_private_key(init_keys(root / "keys").private_path),
        latency_runs=5,
        workdir=root / "work",
        name="digits",
    )
    return result, root / "bundle", root / "work"


def test_tflite_bundle_passes_the_device_health_check(built: tuple[Any, Path, Path]) -> None:
    # prepare: the bundle as an agent finds it in a slot
    _, bundle, _ = built
    manifest = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    server = ModelServer(threads=1)
    loaded = server.load(bundle / manifest.model.file, name="digits", version=1, slot="a", runtime="tflite")
    names = [t.name for t in loaded.info.inputs]
    # act
    report = check_health(
        lambda feeds: server.run_on(loaded, feeds),
        names,
        [t.name for t in loaded.info.outputs],
        bundle / manifest.eval.file,
        manifest.eval,
        manifest.health,
        batch_size=manifest.model.batch_size,
    )
    # assert: the manifest, eval.npz and the device runtime use the same short input names
    assert report.passed, report.reason
    assert [t.name for t in manifest.inputs] == names
    assert not any(n.startswith("serving_default_") or ":" in n for n in names)
    with np.load(bundle / "eval.npz") as npz:
        assert set(names) <= set(npz.files)


def test_full_int8_candidate_runs_float_data_on_the_device_runtime(built: tuple[Any, Path, Path]) -> None:
    # prepare: the full-INT8 candidate the build measured, and the bundle's float eval data
    result, bundle, _ = built
    int8 = next(c for c in result.candidates if c.id == "tflite-int8")
    assert int8.status != "failed", int8.reason
    assert int8.path is not None and int8.quality is not None
    runtime = load_runtime("tflite", int8.path, threads=1)
    with np.load(bundle / "eval.npz") as npz:
        x, y = npz[runtime.inputs[0].name], npz["y"]
    # act
    started = time.perf_counter()
    logits = runtime.run({runtime.inputs[0].name: x})[0]
    # assert: float32 in and out (quantized inside), accuracy as the host measured it
    assert time.perf_counter() - started < 60
    assert runtime.tensor_details()["inputs"][0]["dtype"] == np.int8
    assert runtime.inputs[0].dtype == "float32" and logits.dtype == np.float32
    assert abs(float(np.mean(logits.argmax(1) == y)) - int8.quality.value) < 0.03


class TwoInputs(torch.nn.Module):
    """A model with two inputs of different widths: their order must survive conversion and bundling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(3, 6)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(image)) - self.b(extra)


def test_multi_input_tflite_bundle_names_every_input_alike_and_passes_health(tmp_path: Path) -> None:
    # prepare: two named inputs of different widths, reference eval (no labels)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.random((48, 4), dtype=np.float32),
        "extra": rng.random((48, 3), dtype=np.float32),
    }
    model = TwoInputs().eval()
    # act
    build(
        model, TFLITE_ONLY, calib=data, eval=data, out=tmp_path / "bundle",
        plan=PlanOptions(prune_levels=(), mixed_precision=False, only=("tflite-fp32",)),
        private_key=load_private_key(init_keys(tmp_path / "keys").private_path), latency_runs=5,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    manifest = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    server = ModelServer(threads=1)
    loaded = server.load(bundle / manifest.model.file, name="two", version=1, slot="a", runtime="tflite")
    names = [t.name for t in loaded.info.inputs]
    report = check_health(
        lambda feeds: server.run_on(loaded, feeds), names, [t.name for t in loaded.info.outputs],
        bundle / manifest.eval.file, manifest.eval, manifest.health, batch_size=manifest.model.batch_size,
    )  # fmt: skip
    # assert: one naming in manifest, eval.npz and runtime; each array has its own input's width
    assert report.passed, report.reason
    assert [t.name for t in manifest.inputs] == names and len(names) == 2
    with np.load(bundle / "eval.npz") as npz:
        widths = {n: npz[n].shape[1] for n in names}
    assert widths == {t.name: t.shape[1] for t in loaded.info.inputs}
    feeds = {n: data["image"][:1] if widths[n] == 4 else data["extra"][:1] for n in names}
    [got] = server.run_on(loaded, feeds).values()
    with torch.no_grad():
        expected = model(torch.from_numpy(data["image"][:1]), torch.from_numpy(data["extra"][:1])).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
