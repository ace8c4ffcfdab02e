"""Knowledge distillation and transfer learning on the digits data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet.sdk.compress import COMPRESSORS, CompressionContext, CompressionError
from edgefleet.sdk.compress.distill import distill
from edgefleet.sdk.compress.transfer import transfer_learn
from edgefleet.sdk.zoo import accuracy, digits_cnn, digits_split, train_classifier, trained_digits_cnn


@pytest.fixture(scope="module")
def teacher() -> tuple[nn.Module, object]:
    torch.set_num_threads(1)
    return trained_digits_cnn(epochs=15)


def small_student(classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, classes)
    )


def test_distilled_student_approaches_the_teacher(teacher) -> None:
    # prepare
    model, split = teacher
    seen = []
    # act
    result = distill(
        model,
        small_student(),
        split.x_train,
        split.y_train,
        x_val=split.x_test,
        y_val=split.y_test,
        epochs=25,
        on_epoch=lambda e, loss, val: seen.append((e, loss, val)),
    )
    # assert
    assert result.metric == "accuracy"
    assert result.teacher_metric == pytest.approx(accuracy(model, split.x_test, split.y_test))
    assert result.student_metric == pytest.approx(accuracy(result.student, split.x_test, split.y_test))
    assert result.student_metric >= result.teacher_metric - 0.05
    assert len(seen) == result.epochs_run and seen[0][1] > seen[-1][1]


def test_distill_without_labels_matches_teacher_predictions(teacher) -> None:
    model, split = teacher
    result = distill(model, small_student(), split.x_train, epochs=20)
    assert result.metric == "kd_loss"
    with torch.no_grad():
        agree = (
            (
                result.student(torch.from_numpy(split.x_test)).argmax(1)
                == model(torch.from_numpy(split.x_test)).argmax(1)
            )
            .float()
            .mean()
        )
    assert float(agree) > 0.9


def test_early_stopping_stops_when_validation_stalls(teacher) -> None:
    model, split = teacher
    result = distill(model, small_student(), split.x_train, split.y_train, epochs=200, patience=2, lr=0.05)
    assert result.stopped_early and result.epochs_run < 200


def test_distill_step_and_its_errors(teacher, tmp_path: Path) -> None:
    model, split = teacher
    ctx = CompressionContext(workdir=tmp_path, calib={"x": split.x_train}, calib_labels=split.y_train)
    step = COMPRESSORS.get("distill")(student=small_student(), epochs=5)
    student = step.apply(model, ctx)
    assert isinstance(student, nn.Module) and step.describe()["result"]["epochs_run"] >= 1
    assert "student" not in step.describe()["params"]
    with pytest.raises(CompressionError, match="student"):
        COMPRESSORS.get("distill")().apply(model, ctx)
    with pytest.raises(CompressionError, match="number of classes"):
        distill(model, small_student(classes=3), split.x_train, split.y_train, epochs=1)
    with pytest.raises(CompressionError, match="labels"):
        distill(model, small_student(), split.x_train, split.y_train[:5], epochs=1)


def test_transfer_learning_trains_only_a_new_head() -> None:
    # prepare: a backbone trained on digits 0-4, new task digits 5-9
    torch.manual_seed(0)
    split = digits_split()
    old_train, new_train = split.y_train < 5, split.y_train >= 5
    new_test = split.y_test >= 5
    backbone = train_classifier(digits_cnn(), split.x_train[old_train], split.y_train[old_train], epochs=15)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    # act
    result = transfer_learn(
        backbone,
        split.x_train[new_train],
        split.y_train[new_train] - 5,
        num_classes=5,
        x_val=split.x_test[new_test],
        y_val=split.y_test[new_test] - 5,
        epochs=40,
        lr=1e-2,
    )
    # assert
    assert result.accuracy >= 0.75  # chance is 0.2; only 325 parameters were trained
    assert result.accuracy == pytest.approx(
        accuracy(result.model, split.x_test[new_test], split.y_test[new_test] - 5)
    )
    assert result.trainable_params == 64 * 5 + 5
    adapted = result.model.state_dict()
    for key, value in before.items():
        if not key.startswith("11."):  # everything but the replaced head is unchanged
            assert torch.equal(adapted[key], value)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_transfer_step_and_bad_labels(tmp_path: Path) -> None:
    split = digits_split()
    model = digits_cnn().eval()
    with pytest.raises(CompressionError, match="num_classes is 3"):
        transfer_learn(model, split.x_train, split.y_train, num_classes=3, epochs=1)
    with pytest.raises(CompressionError, match="not an nn.Linear"):
        transfer_learn(model, split.x_train, split.y_train, num_classes=10, head="0", epochs=1)
    ctx = CompressionContext(workdir=tmp_path, calib={"x": split.x_train})
    with pytest.raises(CompressionError, match="labelled"):
        COMPRESSORS.get("transfer")(num_classes=10).apply(model, ctx)
    ctx.calib_labels = split.y_train
    step = COMPRESSORS.get("transfer")(num_classes=10, epochs=2)
    adapted = step.apply(model, ctx)
    assert adapted(torch.from_numpy(split.x_test[:2])).shape == (2, 10)
    assert np.isfinite(step.describe()["result"]["accuracy"])
