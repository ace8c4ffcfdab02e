"""`edgefleet build --task`: a tiny detector, CTC model and embedding model built end to end; report.json and
the manifest name the task's metric (issue 17.1), scored against the fp32 model or against labels `y`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.sdk.cli import app  # noqa: E402

pytestmark = pytest.mark.slow
Module: Any = torch.nn.Module


class TinyDetector(Module):
    """8 boxes per 16×16 image as post-NMS rows [x1, y1, x2, y2, score, class], best score first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, 8 * 8)

    def forward(self, x: Any) -> Any:
        h = self.head(torch.relu(self.conv(x)).flatten(1)).reshape(-1, 8, 8)
        xy = torch.sigmoid(h[..., 0:2]) * 12.0
        wh = torch.sigmoid(h[..., 2:4]) * 8.0 + 1.0
        score = torch.sigmoid(h[..., 4])
        cls = h[..., 5:8].argmax(-1).to(torch.float32)
        rows = torch.cat([xy, xy + wh, score.unsqueeze(-1), cls.unsqueeze(-1)], dim=-1)
        order = score.argsort(dim=1, descending=True)
        return torch.gather(rows, 1, order.unsqueeze(-1).expand(-1, -1, 6))


class TinyCTC(Module):
    """Per-frame scores (N, 12, 5) over a blank and 4 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 5)

    def forward(self, x: Any) -> Any:
        return self.proj(torch.tanh(x))


class TinyEmbedder(Module):
    """A 32-d embedding of a 16-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)

    def forward(self, x: Any) -> Any:
        return torch.nn.functional.normalize(self.proj(x), dim=-1)


MODELS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "detector": (TinyDetector, (3, 16, 16)),
    "ctc": (TinyCTC, (12, 8)),
    "embedder": (TinyEmbedder, (16,)),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.sdk.trust.keys import init_keys

    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    for name, (cls, shape) in MODELS.items():
        torch.manual_seed(0)
        net = cls().eval()
        sample = {"input": np.zeros((2, *shape), np.float32)}
        CONVERTERS.get("torch-onnx")().convert(net, folder / f"{name}.onnx", sample)
        np.savez(folder / f"{name}.npz", x=rng.standard_normal((32, *shape)).astype(np.float32))
    init_keys(folder / "keys")
    return folder


def _build(root: Path, name: str, task: str, data: str = "") -> tuple[int, str, Path]:
    out = root / f"out-{name}-{task}{data}"
    args = [
        "build", str(root / f"{name}.onnx"), "--profile", "rpi4b", "--eval", str(root / f"{name}{data}.npz"),
        "--task", task, "--only", "onnx-fp32-opt", "--key", str(root / "keys" / "fleet.key"),
        "-o", str(out), "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output, out


@pytest.mark.parametrize(
    ("name", "task", "metric"),
    [
        ("detector", "detection", "map50"),
        ("detector", "auto", "map50"),
        ("embedder", "embedding", "embedding_cosine"),
        ("embedder", "classification", "agreement"),
        ("ctc", "ctc", "token_error_rate"),
    ],
)
def test_build_task_names_its_metric_in_report_and_manifest(
    root: Path, name: str, task: str, metric: str
) -> None:
    # act
    code, output, out = _build(root, name, task)
    # assert: report.json and the manifest name the task's metric, and the device's bound is on it
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["data"]["metric"] == metric
    assert {c["quality"]["metric"] for c in report["candidates"] if c.get("quality")} == {metric}
    assert manifest["eval"]["metric"] == manifest["health"]["metric"] == metric
    assert manifest["eval"]["kind"] == "reference"
    if metric != "agreement":
        assert manifest["eval"]["task"] == (
            "detection" if name == "detector" else name.replace("embedder", "embedding")
        )
    baseline = report["baseline"]["quality"]
    assert baseline["value"] == pytest.approx(0.0 if metric == "token_error_rate" else 1.0, abs=1e-6)


def test_build_refuses_an_unknown_task_and_a_task_the_outputs_do_not_fit(root: Path) -> None:
    # act
    code, output, _ = _build(root, "embedder", "segmentation")
    wrong, wrong_output, _ = _build(root, "embedder", "detection")
    # assert: one line naming the choices; a detection task on an embedder names the expected format
    assert code != 0 and "--task 'segmentation' is not one of" in output and "Traceback" not in output
    assert wrong != 0 and "post-NMS rows (N, K, 6)" in wrong_output and "Traceback" not in wrong_output


def _fp32_outputs(root: Path, name: str, x: np.ndarray) -> list[np.ndarray]:
    """The source ONNX model's outputs, run here as the build's fp32 baseline runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(root / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: x})]


def _labels(task: str, outputs: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Labels in the task's format that the fp32 model gets partly wrong (so its score is neither 0 nor 1)."""
    first = outputs[0]
    if task == "detection":
        # the top 4 boxes of each image; every other image's first box moved away (a miss); a padding row
        y = np.full((len(first), 5, 5), -1.0, np.float32)
        y[:, :4, :4] = first[:, :4, :4]
        y[:, :4, 4] = np.rint(first[:, :4, 5])
        y[::2, 0, :4] += 40.0
        return y
    if task == "ctc":
        # the greedy decode, every third row with one token changed; padded with -1
        from edgefleet.agent.core.quality_tasks import greedy_decode

        rows = [list(r) or [1] for r in greedy_decode(first)]
        for row in rows[::3]:
            row[0] = row[0] % 4 + 1
        y = np.full((len(rows), max(map(len, rows)) + 2), -1, np.int64)
        for i, row in enumerate(rows):
            y[i, : len(row)] = row
        return y
    return (first + 0.2 * rng.standard_normal(first.shape)).astype(np.float32)  # noisy target embeddings


@pytest.mark.parametrize(
    ("name", "task", "metric"),
    [
        ("detector", "detection", "map50"),
        ("detector", "auto", "map50"),
        ("ctc", "ctc", "token_error_rate"),
        ("embedder", "embedding", "embedding_cosine"),
    ],
)
def test_build_task_scores_labels_and_ships_them_with_the_bound(
    root: Path, name: str, task: str, metric: str
) -> None:
    # prepare: labels y in the task's format, scored by hand with the contract's scorer on fp32 outputs
    from edgefleet.agent.core.quality import ALL_METRICS, measure

    rng = np.random.default_rng(1)
    with np.load(root / f"{name}.npz") as npz:
        x = npz["x"]
    outputs = _fp32_outputs(root, name, x)
    y = _labels(ALL_METRICS[metric].task, outputs, rng)
    np.savez(root / f"{name}-labels.npz", x=x, y=y)
    expected = measure(outputs, labels=y, metric_name=metric).value
    assert 0.0 < expected < 1.0  # the labels disagree with the model somewhere, so a wrong scorer shows
    # act
    code, output, out = _build(root, name, task, "-labels")
    # assert: scored against the labels; the candidate loses nothing; the device gets y and the bound
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["data"]["metric"] == metric and report["data"]["labels"] is True
    assert report["baseline"]["quality"]["value"] == pytest.approx(expected, abs=1e-6)
    # (the optimised graph of a tiny model may be refused as bigger and not faster: never for quality)
    for cand in report["candidates"]:
        assert cand["accuracy_drop"] == pytest.approx(0.0, abs=1e-6)
        assert "drop" not in (cand["reason"] or "")
    assert manifest["eval"]["kind"] == "labels"
    assert manifest["eval"]["metric"] == manifest["health"]["metric"] == metric
    assert manifest["eval"]["task"] == ALL_METRICS[metric].task
    bound = expected + 0.01 if metric == "token_error_rate" else expected - 0.01
    assert manifest["health"]["min_quality"] == pytest.approx(bound, abs=1e-6)
    with np.load(out / "eval.npz") as bundled:
        assert "reference" not in bundled.files
        np.testing.assert_array_equal(bundled["y"], y)


def test_build_refuses_labels_that_do_not_fit_the_task_before_building(root: Path) -> None:
    # prepare: CTC tokens given to a detection build, one-hot labels to an auto build
    with np.load(root / "ctc.npz") as npz:
        x = npz["x"]
    np.savez(root / "ctc-onehot.npz", x=x, y=np.eye(5, dtype=np.int64)[np.arange(len(x)) % 5])
    np.savez(root / "ctc-tokens.npz", x=x, y=np.ones((len(x), 4), np.int64))
    # act
    wrong_task, wrong_output, _ = _build(root, "ctc", "detection", "-tokens")
    one_hot, one_hot_output, _ = _build(root, "ctc", "auto", "-onehot")
    # assert: one line each, naming the format wanted and the fix
    assert wrong_task != 0 and "detection labels `y` must be (N, G, 5)" in wrong_output
    assert one_hot != 0 and "look one-hot" in one_hot_output and "y.argmax(axis=1)" in one_hot_output
    assert "Traceback" not in wrong_output + one_hot_output


def test_python_api_takes_the_task_for_a_build_and_a_release(root: Path) -> None:
    # prepare
    from edgefleet.sdk.build.builder import build
    from edgefleet.sdk.build.errors import BuildError
    from edgefleet.sdk.build.measure import TASK_ENV
    from edgefleet.sdk.build.plan import PlanOptions
    from edgefleet.sdk.build.release import build_release

    only = PlanOptions(only=("onnx-fp32-opt",))
    key = root / "keys" / "fleet.key"
    # act
    single = build(root / "embedder.onnx", "rpi4b", eval=root / "embedder.npz", task="embedding", plan=only)
    release = build_release(
        root / "detector.onnx", ["rpi4b"], root / "release", eval=root / "detector.npz", task="detection",
        plan=only, private_key=key,
    )  # fmt: skip
    plain = build(root / "embedder.onnx", "rpi4b", eval=root / "embedder.npz", plan=only)
    with pytest.raises(BuildError) as refused:
        build(root / "embedder.onnx", "rpi4b", eval=root / "embedder.npz", task="segmentation", plan=only)
    # assert: each call scores its own task, and leaves no task behind for the next
    assert single.report["data"]["metric"] == "embedding_cosine"
    assert release["rpi4b"].report["data"]["metric"] == "map50"
    manifest = json.loads((root / "release" / "rpi4b" / "manifest.json").read_text())
    assert manifest["eval"]["task"] == "detection" and manifest["health"]["metric"] == "map50"
    assert plain.report["data"]["metric"] == "fidelity"
    assert "task 'segmentation' is not one of" in str(refused.value)
    assert TASK_ENV not in os.environ


class TwoLayerCTC(Module):
    """Per-frame scores (N, 12, 5) through a hidden layer that channel pruning can narrow."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(8, 32)
        self.proj = torch.nn.Linear(32, 5)

    def forward(self, x: Any) -> Any:
        return self.proj(torch.tanh(self.hidden(x)))


def test_ctc_labels_reach_the_fine_tuning_after_pruning(root: Path) -> None:
    # prepare: a CTC module and its own greedy decode as labels (its fp32 token error rate is 0)
    from edgefleet.agent.core.quality_tasks import greedy_decode
    from edgefleet.sdk.build.builder import build
    from edgefleet.sdk.build.plan import PlanOptions

    torch.manual_seed(0)
    net = TwoLayerCTC().eval()
    x = np.random.default_rng(2).standard_normal((48, 12, 8)).astype(np.float32)
    rows = [r or [1] for r in greedy_decode(net(torch.from_numpy(x)).detach().numpy())]
    y = np.full((len(rows), 13), -1, np.int64)
    for i, row in enumerate(rows):
        y[i, : len(row)] = row
    plan = PlanOptions(prune_levels=(0.5,), finetune_epochs=1, only=("pruned50-onnx-fp32",))
    # act
    result = build(net, "rpi4b", calib={"x": x, "y": y}, task="ctc", max_accuracy_drop=0.9, plan=plan)
    # assert: the pruning step fine-tuned on the labels with the CTC loss ("loss"; "kd_loss" without)
    pruned = next(c for c in result.candidates if c.id == "pruned50-onnx-fp32")
    assert pruned.status == "ok", pruned.reason
    step = next(s for s in pruned.steps if s.get("step") == "prune-channels")
    assert step["finetune"]["task"] == "ctc" and step["finetune"]["metric"] == "loss"
    assert result.baseline.quality is not None and result.baseline.quality.metric == "token_error_rate"
    assert result.baseline.quality.value == pytest.approx(0.0, abs=1e-9)
    assert pruned.accuracy_drop == pytest.approx(pruned.quality.value if pruned.quality else -1.0)
