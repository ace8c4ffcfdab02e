"""The MiniLM example's data: enough varied held-out sentences, kept apart from calibration."""

from __future__ import annotations

import numpy as np

from edgefleet.sdk.compress.minilm import load_sentences, split_sentences
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
