"""Compression bench: fp32 vs every candidate, beside plain `quantize_dynamic`, measured in one run.

Models: the digits CNN (trained here; accuracy on the held-out half), MobileNetV2 and ResNet-18
(torchvision, random weights: latency and size only) and all-MiniLM-L6-v2 (cosine of sentence
embeddings to fp32 over the example's held-out sentences). For each candidate: size, median latency
at batch 1 with 1 and 2 onnxruntime threads, accuracy or cosine. Prints a table, writes
`bench/results/compress.json` and a markdown table `bench/results/compress.md` (copied into
docs/compress.md).

    python bench/compress.py [--models digits,mobilenet_v2,resnet18,minilm] [--runs 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
# a log file or pipe gets wide tables instead of 80 folded columns
console = Console() if sys.stdout.isatty() else Console(width=170)


def export(model: Any, sample: np.ndarray, path: Path) -> Path:
    """torch → ONNX through the project's converter (TorchScript exporter, parity checked)."""
    from edgefleet.converters.base import CONVERTERS

    CONVERTERS.get("torch-onnx")().convert(model, path, {"input": sample})
    return path


def quantize_plain(src: Path, dst: Path) -> Path:
    """What most users try first: onnxruntime's quantize_dynamic with its defaults."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))
    return dst


def quantize_static_qdq(src: Path, dst: Path, calib: np.ndarray) -> Path:
    """Static INT8, QDQ, per-channel weights, min-max calibration on `calib`, after onnxruntime's
    pre-processing (without it ResNet-18's QDQ model ran 2.3x slower than fp32 at batch 1 here; with
    it 2.2x faster)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgefleet.sdk.compress.onnx_fakequant import make_session

    name = make_session(src).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        """Feeds calibration samples one batch of 8 at a time."""

        def __init__(self) -> None:
            self.batches = iter([{name: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.batches, None)

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return dst


def measure_latency(
    rows: list[dict[str, Any]], paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int
) -> None:
    """Fill ms_1_thread / ms_2_threads of each row, candidates timed round-robin."""
    from edgefleet.sdk.compress.minilm import median_latencies_ms

    for threads, key in ((1, "ms_1_thread"), (2, "ms_2_threads")):
        medians = median_latencies_ms(paths, feed, threads=threads, runs=runs)
        for row in rows:
            row[key] = medians[row["candidate"]]


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier."""
    from edgefleet.sdk.compress.onnx_fakequant import make_session

    session = make_session(path)
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def vision_rows(name: str, work: Path, runs: int) -> list[dict[str, Any]]:
    """fp32, plain dynamic, static QDQ, 50 % channel-pruned fp32 and pruned + static INT8."""
    import torch

    from edgefleet.sdk.compress.prune import channel_prune, count_params, finetune
    from edgefleet.sdk.zoo import torchvision_model, trained_digits_cnn

    torch.manual_seed(0)
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    if name == "digits":
        model, split = trained_digits_cnn()
        calib, x_test, y_test = split.x_train[:256], split.x_test, split.y_test
        x_train, y_train = split.x_train, split.y_train
    else:
        model = torchvision_model(name)
        calib = np.random.default_rng(0).random((16, 3, 224, 224), dtype=np.float32)
    sample = calib[:1]
    feed = {"input": sample}
    pruned = copy.deepcopy(model)
    channel_prune(pruned, sample, 0.5)
    if name == "digits":
        finetune(pruned, model, x_train, y_train, epochs=15, x_val=x_test, y_val=y_test)
    params = (count_params(model)[0], count_params(pruned)[0])

    fp32 = export(model, sample, work / f"{name}_fp32.onnx")
    pruned_fp32 = export(pruned, sample, work / f"{name}_pruned50_fp32.onnx")
    candidates: list[tuple[str, Callable[[], Path]]] = [
        ("fp32", lambda: fp32),
        ("int8 dynamic (quantize_dynamic defaults)", lambda: quantize_plain(fp32, work / f"{name}_dyn.onnx")),
        ("int8 static QDQ per-channel", lambda: quantize_static_qdq(fp32, work / f"{name}_qdq.onnx", calib)),
        ("pruned 50% channels, fp32", lambda: pruned_fp32),
        (
            "pruned 50% + int8 static QDQ",
            lambda: quantize_static_qdq(pruned_fp32, work / f"{name}_pruned_qdq.onnx", calib),
        ),
    ]
    rows = []
    paths = {}
    for label, make in candidates:
        with console.status(f"{name}: {label}"):
            path = paths[label] = make()
            row: dict[str, Any] = {
                "model": name,
                "candidate": label,
                "size_bytes": path.stat().st_size,
                "params": params[1] if "pruned" in label else params[0],
            }
            if x_test is not None and y_test is not None:
                row["accuracy"] = onnx_accuracy(path, x_test, y_test)
        rows.append(row)
    with console.status(f"{name}: latency"):
        measure_latency(rows, paths, feed, runs)
    return rows


def minilm_rows(work: Path, runs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """fp32, plain dynamic, per-channel dynamic and the sensitivity-driven mixed plan for rpi4b."""
    from edgefleet.sdk.compress.minilm import (
        encode_each,
        export_onnx,
        fidelity,
        load_sentences,
        load_tokenizer_and_encoder,
        reference_outputs,
        seq128_feed,
        split_sentences,
    )
    from edgefleet.sdk.compress.mixed_precision import mixed_precision_int8, quantize_dynamic_per_channel

    tokenizer, encoder = load_tokenizer_and_encoder()
    calib_sentences, eval_sentences = split_sentences(load_sentences())
    fp32 = export_onnx(encoder, tokenizer, work / "minilm_fp32.onnx")
    calib = encode_each(tokenizer, calib_sentences)
    evaluation = encode_each(tokenizer, eval_sentences)
    reference = reference_outputs(fp32, evaluation)
    feed = seq128_feed(tokenizer, eval_sentences[0])
    mixed_info: dict[str, Any] = {}

    def mixed() -> Path:
        result = mixed_precision_int8(
            fp32, work / "minilm_mixed.onnx", calib, evaluation, max_size_ratio=0.30
        )
        mixed_info.update(result.summary())
        return result.path

    candidates: list[tuple[str, Callable[[], Path]]] = [
        ("fp32", lambda: fp32),
        ("int8 dynamic (quantize_dynamic defaults)", lambda: quantize_plain(fp32, work / "minilm_dyn.onnx")),
        (
            "int8 dynamic per-channel",
            lambda: quantize_dynamic_per_channel(fp32, work / "minilm_dyn_pc.onnx"),
        ),
        ("int8 mixed precision (sensitivity, size ≤ 0.30×)", mixed),
    ]
    rows = []
    paths = {}
    for label, make in candidates:
        with console.status(f"minilm: {label}"):
            path = paths[label] = make()
            fid = fidelity(reference, path, evaluation)
            rows.append(
                {
                    "model": "minilm",
                    "candidate": label,
                    "size_bytes": path.stat().st_size,
                    "mean_cosine": fid.mean,
                    "min_cosine": fid.minimum,
                }
            )
    with console.status("minilm: latency"):
        measure_latency(rows, paths, feed, runs)
    return rows, mixed_info


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Size and speed relative to the same model's fp32 row (measured in this run)."""
    base = {row["model"]: row for row in rows if row["candidate"] == "fp32"}
    for row in rows:
        ref = base[row["model"]]
        row["size_ratio"] = row["size_bytes"] / ref["size_bytes"]
        row["speedup_1_thread"] = ref["ms_1_thread"] / row["ms_1_thread"]
        row["speedup_2_threads"] = ref["ms_2_threads"] / row["ms_2_threads"]


def quality(row: dict[str, Any]) -> str:
    """Accuracy, or mean/min cosine, or a dash for random-weight models."""
    if "accuracy" in row:
        return f"acc {row['accuracy']:.4f}"
    if "mean_cosine" in row:
        return f"cos {row['mean_cosine']:.4f} / min {row['min_cosine']:.4f}"
    return "—"


COLUMNS = ("model", "candidate", "size MB", "size ×", "ms 1T", "× 1T", "ms 2T", "× 2T", "quality")


def cells(row: dict[str, Any]) -> list[str]:
    """One table row as strings."""
    return [
        row["model"],
        row["candidate"],
        f"{row['size_bytes'] / 1e6:.2f}",
        f"{row['size_ratio']:.2f}",
        f"{row['ms_1_thread']:.2f}",
        f"{row['speedup_1_thread']:.2f}",
        f"{row['ms_2_threads']:.2f}",
        f"{row['speedup_2_threads']:.2f}",
        quality(row),
    ]


def main() -> int:
    """Run the selected models and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,mobilenet_v2,resnet18,minilm")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "minilm":
            minilm, extra["minilm_mixed_precision"] = minilm_rows(work, args.runs)
            rows += minilm
        elif name in ("digits", "mobilenet_v2", "resnet18"):
            rows += vision_rows(name, work, args.runs)
        else:
            console.print(f"[red]unknown model {name!r}[/]: use digits, mobilenet_v2, resnet18, minilm")
            return 2
    add_ratios(rows)
    table = Table(title="Compression candidates (batch 1; × = ratio to fp32 measured in this run)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "candidate", "quality") else "right")
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "seconds": round(time.time() - started, 1),
        "runs_per_median": args.runs,
    }
    (RESULTS / "compress.json").write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=2))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    (RESULTS / "compress.md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {RESULTS / 'compress.json'} and compress.md in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
