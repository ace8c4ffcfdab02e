"""Prune, distil and fine-tune models beyond one float input and a classifier: token ids + mask, conv →
flatten → Linear, a two-headed detector, a CTC model (small models defined here, CPU, seconds each)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet.sdk.compress import COMPRESSORS, CompressionContext, CompressionError
from edgefleet.sdk.compress.distill import distill, distill_student
from edgefleet.sdk.compress.prune import channel_prune, channel_scores, count_params, output_layers
from edgefleet.sdk.compress.student import encoder_layers, make_student
from edgefleet.sdk.compress.transfer import finetune_model

VOCAB, SEQ = 24, 8


class SelfAttention(nn.Module):
    """BERT-style attention: q, k, v, o projections, padding masked out."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, d = h.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)

        scores = split(self.q(h)) @ split(self.k(h)).transpose(-1, -2) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e4)
        out = (scores.softmax(-1) @ split(self.v(h))).transpose(1, 2).reshape(n, length, d)
        return self.o(out)


class Block(nn.Module):
    """Post-norm encoder layer: attention and a d → 4d → d feed-forward, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention = SelfAttention(d, heads)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.intermediate, self.output = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.attention(h, mask))
        return self.norm2(h + self.output(torch.nn.functional.gelu(self.intermediate(h))))


class TextClassifier(nn.Module):
    """forward(input_ids int64, attention_mask int64) → class logits; a MiniLM-like encoder in small."""

    def __init__(self, d: int = 16, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Embedding(SEQ, d)
        self.layers = nn.ModuleList(Block(d, 2) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)[None]
        for layer in self.layers:
            h = layer(h, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def text_data(count: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Class = which of the marker tokens 1, 2 appears (0, 1) or neither (2); padding is id 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(count, SEQ))
    labels = rng.integers(0, 3, size=count)
    lengths = rng.integers(4, SEQ + 1, size=count)
    for i in range(count):
        if labels[i] < 2:
            ids[i, rng.integers(0, lengths[i])] = labels[i] + 1
        ids[i, lengths[i] :] = 0
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}, labels.astype(np.int64)


@pytest.fixture(scope="module")
def text() -> tuple[nn.Module, dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = text_data(384, 0)
    x_val, y_val = text_data(192, 1)
    model = TextClassifier().eval()
    result = finetune_model(
        model, x, y, train="full", x_val=x_val, y_val=y_val, epochs=25, lr=3e-3, patience=25
    )
    assert result.value >= 0.9, result.history  # the fixture is a trained teacher
    return result.model, x, y, x_val, y_val


def accuracy_of(model: nn.Module, x: dict[str, np.ndarray], y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(*(torch.from_numpy(a) for a in x.values()))
    return float((logits.argmax(1).numpy() == y).mean())


# -- token ids + mask ------------------------------------------------------------------------------


def test_channel_prune_narrows_only_the_feed_forward_of_a_two_input_transformer(text) -> None:
    # prepare
    model, x, _, x_val, y_val = text
    pruned = copy.deepcopy(model)
    # act
    stats = channel_prune(pruned, x, 0.5)
    # assert
    for layer in pruned.layers:
        assert layer.intermediate.out_features == 32 and layer.output.in_features == 32  # 64 → 32
        assert layer.attention.q.out_features == 16 and layer.output.out_features == 16  # heads, hidden kept
    assert pruned.head.out_features == 3
    assert stats.params_after < stats.params_before
    assert accuracy_of(pruned, x_val, y_val) > 0.5  # still runs on int64 ids, still predicts


def test_prune_step_with_taylor_scores_and_finetune_on_token_ids(text, tmp_path: Path) -> None:
    # prepare
    model, x, y, x_val, y_val = text
    ctx = CompressionContext(
        workdir=tmp_path,
        calib=x,
        calib_labels=y,
        eval_inputs=x_val,
        eval_labels=y_val,
        options={"task": "classification"},
    )
    step = COMPRESSORS.get("prune-channels")(amount=0.5, finetune_epochs=6)
    # act
    pruned = step.apply(model, ctx)
    # assert
    described = step.describe()
    table = described["sensitivity"]
    assert table["formula"] == "S = (L − L_perturbed) / L"
    assert {row["layer"] for row in table["layers"]} == {"layers.0.intermediate", "layers.1.intermediate"}
    assert table["channel_method"].startswith("first-order Taylor")
    assert all(len(v) == 64 for v in table["channel_scores"].values())
    assert count_params(pruned)[0] < count_params(model)[0]
    assert accuracy_of(pruned, x_val, y_val) >= accuracy_of(model, x_val, y_val) - 0.1


def test_taylor_scores_find_the_channels_that_matter(text) -> None:
    # prepare: silence half the intermediate channels of layer 0 (their removal costs nothing)
    model, x, y, _, _ = text
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.layers[0].output.weight[:, 32:] = 0.0
    # act
    scores, method = channel_scores(model, x, y, layers=["layers.0.intermediate"])
    # assert
    values = np.array(scores["layers.0.intermediate"])
    assert "labels" in method
    assert values[32:].max() == pytest.approx(0.0, abs=1e-7) and values[:32].max() > 0


def test_distill_into_a_shallower_copy_keeps_token_ids_integer(text) -> None:
    # prepare
    model, x, y, x_val, y_val = text
    student = make_student(model)
    # act
    result = distill_student(
        model, student, {**x, "y": y}, "classification", val_data=(x_val, y_val), epochs=15, lr=3e-3
    )
    # assert
    found = encoder_layers(model)
    assert found is not None and found[0] == "layers"
    assert len(result.student.layers) == 1 and len(model.layers) == 2  # the teacher is untouched
    assert result.metric == "accuracy" and result.student_metric >= 0.8
    assert result.student_metric == pytest.approx(accuracy_of(result.student, x_val, y_val))


def test_finetune_head_last_n_and_new_classes_on_token_ids(text) -> None:
    # prepare: a new 2-class task (marker 1 or not)
    model, x, y, _, _ = text
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # act
    head = finetune_model(model, x, (y == 0).astype(np.int64), num_classes=2, epochs=8, lr=1e-2)
    last = finetune_model(model, x, (y == 0).astype(np.int64), train="last:3", epochs=3, lr=1e-2)
    # assert
    assert head.trained_layers == ["head"] and head.trainable_params == 16 * 2 + 2
    assert head.model.head.out_features == 2 and head.value > 0.6
    assert last.trained_layers == ["layers.1.output", "layers.1.norm2", "head"]
    changed = {k for k, v in last.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("layers.1.output", "layers.1.norm2", "head")) for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_float_ids_and_bad_train_specs_are_refused(text) -> None:
    model, x, y, _, _ = text
    with pytest.raises(CompressionError, match="last:N"):
        finetune_model(model, x, y, train="some")
    with pytest.raises(CompressionError, match="labels"):
        distill(model, TextClassifier(), x, y[:5], epochs=1)
    with pytest.raises(CompressionError, match="unknown task"):
        distill(model, TextClassifier(), x, y, task="segmentation", epochs=1)


# -- conv → flatten → Linear ----------------------------------------------------------------------


class KeywordCNN(nn.Module):
    """40 mel bins × 20 frames → two Conv1d → flatten → Linear (the speech classifier's shape)."""

    def __init__(self, hard_coded: bool = False) -> None:
        super().__init__()
        self.hard_coded = hard_coded
        self.conv1 = nn.Conv1d(40, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 10, 4)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(mel))))
        return self.fc(h.view(-1, 160) if self.hard_coded else h.flatten(1))


def keyword_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=count)
    mel = rng.normal(size=(count, 40, 20)).astype(np.float32) * 0.5
    for i, label in enumerate(labels):
        mel[i, label * 10 : label * 10 + 10, :] += 1.0  # each keyword lights its own band
    return mel, labels.astype(np.int64)


def test_conv_flatten_linear_prunes_and_the_linear_follows() -> None:
    # prepare
    torch.manual_seed(0)
    x, _ = keyword_data(128, 0)
    model = KeywordCNN().eval()
    # act
    channel_prune(model, x, 0.5)
    # assert
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 8
    assert model.fc.in_features == 80 and model.fc.out_features == 4
    assert model(torch.from_numpy(x[:3])).shape == (3, 4)


def test_hard_coded_view_keeps_the_flattened_layer_and_prunes_the_rest() -> None:
    x, _ = keyword_data(16, 0)
    model = KeywordCNN(hard_coded=True).eval()
    channel_prune(model, x, 0.5)
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 16  # feeds view(-1, 160)
    assert model(torch.from_numpy(x[:3])).shape == (3, 4)


def test_keyword_cnn_prune_step_distill_and_transfer(tmp_path: Path) -> None:
    # prepare
    torch.manual_seed(0)
    x, y = keyword_data(256, 0)
    x_val, y_val = keyword_data(128, 1)
    teacher = finetune_model(
        KeywordCNN(), x, y, train="full", x_val=x_val, y_val=y_val, epochs=10, lr=3e-3
    ).model
    ctx = CompressionContext(
        workdir=tmp_path, calib={"mel": x}, calib_labels=y, eval_inputs={"mel": x_val}, eval_labels=y_val
    )
    # act
    pruned = COMPRESSORS.get("prune-channels")(amount=0.5, finetune_epochs=4).apply(teacher, ctx)
    student = distill(teacher, make_student(teacher, x, width=0.5), x, y, x_val=x_val, y_val=y_val, epochs=8)
    moved = COMPRESSORS.get("transfer")(num_classes=2, epochs=6).apply(
        teacher,
        CompressionContext(workdir=tmp_path, calib={"mel": x}, calib_labels=(y == 0).astype(np.int64)),
    )
    # assert
    assert pruned.fc.in_features < 160 and student.student.conv1.out_channels == 8
    assert student.student_metric >= 0.9
    assert moved(torch.from_numpy(x[:2])).shape == (2, 2)


# -- a two-headed detector ------------------------------------------------------------------------


class TinyDetector(nn.Module):
    """3×16×16 → conv backbone (8×8 cells) → per-cell class logits [N, 64, 2] and boxes [N, 64, 4]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(width, 2, 1)
        self.box = nn.Conv2d(width, 4, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.down(torch.relu(self.stem(image))))
        n = f.shape[0]
        return self.cls(f).flatten(2).transpose(1, 2), self.box(f).flatten(2).transpose(1, 2).reshape(
            n, 64, 4
        )


def detector_data(count: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A bright 2×2 square in one cell: class 0/1 by colour, box = its offset in the cell."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 3, 16, 16)).astype(np.float32) * 0.1
    scores = np.zeros((count, 64, 2), np.float32)
    boxes = np.zeros((count, 64, 4), np.float32)
    for i in range(count):
        cell, kind = rng.integers(0, 64), rng.integers(0, 2)
        r, c = divmod(int(cell), 8)
        images[i, kind, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 2.0
        scores[i, cell, kind] = 1.0
        boxes[i, cell] = [0.5, 0.5, 1.0, 1.0]
    return images, [scores, boxes]


def test_detector_keeps_both_heads_and_trains_on_raw_layout(tmp_path: Path) -> None:
    # prepare
    torch.manual_seed(0)
    x, targets = detector_data(128, 0)
    model = TinyDetector().eval()
    # act
    heads = output_layers(model, x)
    tuned = finetune_model(model, x, targets, task="detection", train="full", epochs=12, lr=3e-3)
    pruned = copy.deepcopy(tuned.model)
    channel_prune(pruned, x, 0.5)
    recovered = distill(tuned.model, pruned, x, targets, task="detection", epochs=6)
    # assert
    assert sorted(heads) == ["box", "cls"]
    assert tuned.metric == "loss" and tuned.value < 0.5 * tuned.initial_value
    assert pruned.cls.out_channels == 2 and pruned.box.out_channels == 4 and pruned.down.out_channels == 8
    outs = pruned(torch.from_numpy(x[:2]))
    assert outs[0].shape == (2, 64, 2) and outs[1].shape == (2, 64, 4)
    assert recovered.metric == "loss" and np.isfinite(recovered.student_metric)


def test_detection_distillation_without_labels_pulls_the_student_to_the_teacher() -> None:
    torch.manual_seed(0)
    x, _ = detector_data(96, 0)
    teacher = TinyDetector().eval()
    student = TinyDetector(width=8).eval()
    result = distill(teacher, student, x, task="detection", epochs=10, lr=3e-3)
    assert result.metric == "kd_loss" and result.history[-1]["val"] > result.history[0]["val"]


# -- CTC ------------------------------------------------------------------------------------------


class TinyCTC(nn.Module):
    """12 features × 20 frames → Conv1d → per-frame Linear → log-probs [N, 20, 5] (blank = 0)."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, width, 3, padding=1)
        self.proj = nn.Linear(width, 5)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(feats)).transpose(1, 2)).log_softmax(-1)


def ctc_data(count: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Two tokens (1..4) per sample, each spoken for 5 frames in its own feature band, padded with 0."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(count, 12, 20)).astype(np.float32) * 0.1
    labels = np.zeros((count, 3), np.int64)
    for i in range(count):
        tokens = rng.integers(1, 5, size=2)
        while tokens[1] == tokens[0]:
            tokens[1] = rng.integers(1, 5)
        labels[i, :2] = tokens
        for j, token in enumerate(tokens):
            feats[i, 3 * (token - 1) : 3 * token, 3 + 8 * j : 8 + 8 * j] += 1.0
    return feats, {"y": labels, "y_lengths": np.full(count, 2, np.int64)}


def test_ctc_finetune_prune_and_frame_distillation(tmp_path: Path) -> None:
    # prepare
    torch.manual_seed(0)
    x, targets = ctc_data(128, 0)
    model = TinyCTC().eval()
    # act
    tuned = finetune_model(model, x, targets, task="ctc", train="full", epochs=15, lr=1e-2)
    ctx = CompressionContext(
        workdir=tmp_path, calib={"feats": x}, options={"task": "ctc", "calib_targets": targets}
    )
    step = COMPRESSORS.get("prune-channels")(amount=0.5, finetune_epochs=3)
    pruned = step.apply(tuned.model, ctx)
    student = distill(tuned.model, TinyCTC(width=8), x, task="ctc", epochs=10, lr=1e-2)
    # assert
    assert tuned.metric == "loss" and tuned.value < 0.5 * tuned.initial_value
    assert pruned.conv.out_channels == 12 and pruned.proj.out_features == 5
    assert step.describe()["sensitivity"]["loss"] == "CTC"
    assert student.metric == "kd_loss" and student.history[-1]["val"] > student.history[0]["val"]
    with pytest.raises(CompressionError, match="CTC labels"):
        finetune_model(model, x, np.zeros((128,), np.int64), task="ctc", epochs=1)


class SpeechEncoder(nn.Module):
    """Conv1d subsampling → nn.TransformerEncoder (torch's MultiheadAttention) → CTC projection."""

    def __init__(self) -> None:
        super().__init__()
        self.subsample = nn.Conv1d(12, 16, 3, stride=2, padding=1)
        layer = nn.TransformerEncoderLayer(16, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.ctc = nn.Linear(16, 5)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.ctc(self.encoder(torch.relu(self.subsample(feats)).transpose(1, 2))).log_softmax(-1)


def test_speech_encoder_prunes_its_feed_forward_and_halves_its_depth() -> None:
    # prepare
    torch.manual_seed(0)
    x, targets = ctc_data(32, 0)
    model = SpeechEncoder().eval()
    # act
    pruned = copy.deepcopy(model)
    channel_prune(pruned, x, 0.5)
    student = make_student(model)
    result = distill(model, student, x, targets, task="ctc", epochs=2)
    # assert
    assert [layer.linear1.out_features for layer in pruned.encoder.layers] == [32] * 4
    assert pruned.subsample.out_channels == 16  # the residual stream keeps its width
    assert pruned(torch.from_numpy(x[:2])).shape == (2, 10, 5)
    assert len(student.encoder.layers) == 2 and student.encoder.num_layers == 2
    assert result.student(torch.from_numpy(x[:2])).shape == (2, 10, 5)


def test_student_step_trains_a_torchscript_student_and_an_automatic_one(text, tmp_path: Path) -> None:
    # prepare
    model, x, y, x_val, y_val = text
    ctx = CompressionContext(
        workdir=tmp_path,
        calib=x,
        calib_labels=y,
        eval_inputs=x_val,
        eval_labels=y_val,
        options={"task": "classification"},
    )
    example = tuple(torch.from_numpy(a[:2]) for a in x.values())
    scripted = torch.jit.trace(make_student(model), example)
    # act
    given = COMPRESSORS.get("student")(student=scripted, epochs=3)
    trained = given.apply(model, ctx)
    auto = COMPRESSORS.get("student")(epochs=3)
    made = auto.apply(model, ctx)
    # assert
    assert isinstance(trained, torch.jit.ScriptModule)
    assert given.describe()["result"]["epochs_run"] >= 1 and "student" not in given.describe()["params"]
    assert len(made.layers) == 1 and auto.describe()["params_after"] < auto.describe()["params_before"]
    assert auto.describe()["result"]["metric"] == "accuracy"
