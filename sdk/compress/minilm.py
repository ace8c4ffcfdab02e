"""all-MiniLM-L6-v2 helpers shared by the text example and the compression bench.

Export to ONNX (TorchScript exporter: a faster graph than dynamo here), the example's sentences,
per-sentence encoding, sentence-embedding fidelity (cosine after mean pooling) and host latency.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from edgefleet.sdk.compress.onnx_fakequant import batch_cosines, make_session, run_session

SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "minilm_sentences.txt"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def load_sentences(path: Optional[Path] = None) -> list[str]:
    """The example's varied sentences, one per line."""
    source = path or SENTENCES_FILE
    if not source.exists():
        raise FileNotFoundError(f"sentence file {source} is missing (it ships in examples/)")
    return [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_sentences(sentences: list[str]) -> tuple[list[str], list[str]]:
    """Every fourth sentence calibrates; the other three quarters evaluate (kept apart)."""
    calib = sentences[::4]
    evaluation = [s for i, s in enumerate(sentences) if i % 4]
    return calib, evaluation


def load_tokenizer_and_encoder() -> tuple[Any, Any]:
    """Tokenizer and encoder module, offline (torchvision first: transformers imports it)."""
    from edgefleet.sdk.zoo import import_torchvision, load_minilm

    import_torchvision()
    return load_minilm()


def export_onnx(encoder: Any, tokenizer: Any, path: Path) -> Path:
    """Export the encoder to ONNX (opset 17, dynamic batch and sequence) with the TorchScript exporter."""
    import torch

    sample = tokenizer(["a sentence to trace the graph"] * 2, return_tensors="pt")
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "last_hidden_state")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            tuple(sample[name] for name in INPUT_NAMES),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    return path


def encode_each(tokenizer: Any, sentences: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed dict per sentence, unpadded (batch 1, as a device serves them)."""
    feeds = []
    for sentence in sentences:
        batch = tokenizer([sentence], truncation=True, max_length=128, return_tensors="np")
        feeds.append({name: batch[name].astype(np.int64) for name in INPUT_NAMES})
    return feeds


def seq128_feed(tokenizer: Any, sentence: str) -> dict[str, np.ndarray]:
    """A batch-1 input padded to 128 tokens, for latency."""
    batch = tokenizer([sentence], padding="max_length", truncation=True, max_length=128, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUT_NAMES}


@dataclass(frozen=True)
class Fidelity:
    """Sentence-embedding cosine to fp32: mean and minimum over the evaluation sentences."""

    mean: float
    minimum: float


def fidelity(
    reference: list[np.ndarray], model: Union[str, Path], feeds: list[dict[str, np.ndarray]]
) -> Fidelity:
    """Cosine between fp32 (`reference` hidden states) and `model`'s mean-pooled embeddings."""
    session = make_session(model, threads=2)
    outputs = [run_session(session, f)[0] for f in feeds]
    cos = batch_cosines(reference, outputs, feeds, "attention_mask")
    return Fidelity(float(cos.mean()), float(cos.min()))


def reference_outputs(model: Union[str, Path], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """fp32 hidden states for each feed."""
    session = make_session(model, threads=2)
    return [run_session(session, f)[0] for f in feeds]


def median_latency_ms(
    model: Union[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one inference, in ms, with `threads` intra-op threads."""
    session = make_session(model, threads=threads)
    for _ in range(warmup):
        run_session(session, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_session(session, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def median_latencies_ms(
    models: dict[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median ms per model, timed round-robin (one run of each in turn) so that load from other
    processes hits every candidate alike and the ratios stay fair on a shared machine."""
    sessions = {name: make_session(path, threads=threads) for name, path in models.items()}
    for session in sessions.values():
        for _ in range(warmup):
            run_session(session, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            run_session(session, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}
