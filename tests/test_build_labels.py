"""The build's data: labels `y` in each task's format and training targets `y_*` (issue 17.1, model_io / inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.converters.base import TensorSpec
from edgefleet.sdk.build.errors import DataError
from edgefleet.sdk.build.inputs import compress_targets
from edgefleet.sdk.build.measure import task_scope
from edgefleet.sdk.build.model_io import Dataset, fit_to_inputs, load_dataset

ROWS = 6


def _x() -> np.ndarray:
    return np.zeros((ROWS, 4), np.float32)


def _boxes() -> np.ndarray:
    y = np.full((ROWS, 3, 5), -1.0, np.float32)
    y[:, 0] = [1.0, 1.0, 5.0, 5.0, 2.0]
    return y


@pytest.mark.parametrize(
    ("task", "labels"),
    [
        ("detection", _boxes()),
        ("auto", _boxes()),
        ("ctc", np.array([[1, 2, 3, -1]] * ROWS, np.int64)),
        ("auto", np.array([[1, 2, 3, -1]] * ROWS, np.int64)),
        ("embedding", np.ones((ROWS, 8), np.float32)),
        ("embedding", np.ones((ROWS, 5, 8), np.float32)),
        ("classification", np.arange(ROWS)),
        ("auto", np.arange(ROWS)),
    ],
)
def test_task_labels_load_from_an_npz_as_given(tmp_path: Path, task: str, labels: np.ndarray) -> None:
    # prepare
    path = tmp_path / "eval.npz"
    np.savez(path, x=_x(), y=labels)
    # act
    ds = load_dataset(path, "eval", task)
    # assert: the labels reach the scorer untouched
    assert ds is not None and list(ds.inputs) == ["x"]
    assert ds.labels is not None and ds.labels.dtype == labels.dtype
    np.testing.assert_array_equal(ds.labels, labels)


def test_a_multi_input_npz_keeps_its_inputs_and_takes_y_and_targets_apart(tmp_path: Path) -> None:
    # prepare: two named inputs, CTC tokens, their lengths, and an input whose name merely starts with y_
    path = tmp_path / "speech.npz"
    ids = np.arange(ROWS * 5).reshape(ROWS, 5)
    np.savez(
        path,
        input_ids=ids,
        attention_mask=np.ones((ROWS, 5), np.int64),
        y_pos=np.ones((ROWS, 2), np.float32),
        y=np.array([[3, 1, -1]] * ROWS),
        y_lengths=np.full(ROWS, 2),
    )
    # act
    ds = load_dataset(path, "calibration", "ctc")
    # assert
    assert ds is not None
    assert sorted(ds.inputs) == ["attention_mask", "input_ids", "y_pos"]
    assert list(ds.targets) == ["y_lengths"]
    assert ds.labels is not None and ds.labels.shape == (ROWS, 3)
    np.testing.assert_array_equal(ds.inputs["input_ids"], ids)


def test_the_build_task_scope_decides_which_labels_fit() -> None:
    # prepare
    tokens = (_x(), np.array([[1, 2, 3, -1]] * ROWS))
    # act
    with task_scope("ctc"):
        ds = load_dataset(tokens, "eval")
    with task_scope("classification"), pytest.raises(DataError) as refused:
        load_dataset(tokens, "eval")
    # assert
    assert ds is not None and ds.labels is not None and ds.labels.shape == (ROWS, 4)
    assert "one integer per sample" in str(refused.value) and "--task" in str(refused.value)


@pytest.mark.parametrize(
    ("task", "labels", "message"),
    [
        ("classification", np.eye(3, dtype=np.int64)[np.arange(ROWS) % 3], "y.argmax(axis=1)"),
        ("auto", np.eye(3, dtype=np.int64)[np.arange(ROWS) % 3], "look one-hot"),
        ("auto", np.eye(3, dtype=np.float32)[np.arange(ROWS) % 3], "look one-hot"),
        ("auto", np.zeros(ROWS, np.float32), "must be integers (class indices)"),
        ("auto", np.zeros(ROWS + 1, np.int64), "one integer per sample (6); got shape (7,)"),
        ("classification", np.zeros((ROWS, 2, 5)), "need that --task"),
        ("detection", np.zeros((ROWS, 3, 4)), "detection labels `y` must be (N, G, 5)"),
        ("detection", np.full((ROWS, 3, 5), 0.5), "must hold whole numbers"),
        ("ctc", np.full((ROWS, 4), 0.5, np.float32), "CTC labels `y` must be integer tokens"),
        ("embedding", np.ones((ROWS, 8), np.int64), "must be float target vectors"),
        ("embedding", np.ones(ROWS, np.float32), "must be float target vectors"),
        ("ctc", np.ones((ROWS + 1, 4), np.int64), "one row per sample (6)"),
        ("detection", np.full((ROWS, 3, 5), "a"), "must be numbers"),
    ],
)
def test_labels_that_do_not_fit_the_task_name_the_format(task: str, labels: np.ndarray, message: str) -> None:
    # act
    with pytest.raises(DataError) as refused:
        load_dataset((_x(), labels), "eval", task)
    # assert
    assert message in str(refused.value)


def test_training_targets_must_have_a_row_per_sample_and_lengths_need_tokens() -> None:
    # act
    with pytest.raises(DataError) as short:
        load_dataset({"x": _x(), "y_0": np.zeros((ROWS - 1, 3))}, "calibration", "detection")
    with pytest.raises(DataError) as alone:
        load_dataset({"x": _x(), "y_lengths": np.ones(ROWS)}, "calibration", "ctc")
    with pytest.raises(DataError) as unknown:
        load_dataset((_x(), np.arange(ROWS)), "eval", "segmentation")
    # assert
    assert "'y_0' must have one row per sample (6)" in str(short.value)
    assert "'y_lengths' but no labels 'y'" in str(alone.value)
    assert "unknown task 'segmentation'" in str(unknown.value)


def test_compress_targets_take_the_form_the_compression_steps_read() -> None:
    # prepare
    from edgefleet.sdk.compress.distill import split_data

    tokens = np.array([[1, 2, -1]] * ROWS)
    lengths = np.full(ROWS, 2)
    raw = {f"y_{i}": np.full((ROWS, 7), float(i)) for i in (0, 1, 10, 2)}
    ctc = load_dataset({"x": _x(), "y": tokens, "y_lengths": lengths}, "calibration", "ctc")
    detection = load_dataset({"x": _x(), "y": _boxes(), **raw}, "calibration", "detection")
    boxes_only = load_dataset({"x": _x(), "y": _boxes()}, "calibration", "auto")
    classes = load_dataset((_x(), np.arange(ROWS)), "calibration", "auto")
    assert ctc is not None and detection is not None and boxes_only is not None and classes is not None
    # act
    ctc_targets = compress_targets(ctc, "ctc")
    detection_targets = compress_targets(detection, "detection")
    # assert: CTC as split_data gives it; detection's raw targets in index order, without the boxes `y`
    _, expected = split_data({"x": _x(), "y": tokens, "y_lengths": lengths})
    assert isinstance(ctc_targets, dict) and sorted(ctc_targets) == sorted(expected) == ["y", "y_lengths"]
    np.testing.assert_array_equal(ctc_targets["y_lengths"], lengths)
    assert [float(t[0, 0]) for t in detection_targets] == [0.0, 1.0, 2.0, 10.0]
    assert compress_targets(boxes_only, "auto") is None  # post-NMS boxes are the scorer's, not a raw target
    assert compress_targets(classes, "classification") is classes.labels


def test_head_and_fit_to_inputs_keep_labels_and_targets() -> None:
    # prepare
    ds = Dataset({"x": _x()}, np.array([[1, 2]] * ROWS), {"y_lengths": np.full(ROWS, 2)})
    # act
    fitted = fit_to_inputs(ds, [TensorSpec(name="input", dtype="float32", shape=(None, 4))], "eval")
    head = fitted.head(4)
    # assert
    assert list(fitted.inputs) == ["input"] and list(fitted.targets) == ["y_lengths"]
    assert len(head) == 4 and head.labels is not None and head.labels.shape == (4, 2)
    assert head.targets["y_lengths"].shape == (4,)


def test_compress_targets_feed_the_ctc_trainer() -> None:
    # prepare
    pytest.importorskip("torch")
    from edgefleet.sdk.compress.tasks import target_tensors

    ds = load_dataset(
        {"x": _x(), "y": np.array([[1, 2, -1]] * ROWS), "y_lengths": np.full(ROWS, 2)}, "calibration", "ctc"
    )
    assert ds is not None
    # act
    tensors = target_tensors("ctc", compress_targets(ds, "ctc"), ROWS)
    # assert: tokens and lengths as the CTC loss reads them
    assert tensors is not None and [tuple(t.shape) for t in tensors] == [(ROWS, 3), (ROWS,)]
    assert tensors[1].tolist() == [2] * ROWS
