"""Compress the real all-MiniLM-L6-v2 sentence encoder for a Raspberry Pi 4B, offline.

Exports the encoder to ONNX, then tries: plain `quantize_dynamic` (onnxruntime defaults), dynamic
INT8 with per-channel weights, and the sensitivity-driven mixed INT8/fp32 plan. Fidelity is the cosine
between fp32 and compressed sentence embeddings over the held-out sentences in
`sdk/compress/data/minilm_sentences.txt` (one sentence per run, as a device serves them); latency is the
median at sequence length 128, batch 1, on 1 thread (candidates timed in turn, so load from
other processes hits them alike). Prints the sensitivity ranking and a table of
every candidate and writes `report.json` into --out.

    python examples/minilm_text.py [--out DIR] [--max-size-ratio 0.30] [--min-mean-cosine 0.995]
                                   [--min-cosine 0.98] [--min-speedup 1.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def parse_args() -> argparse.Namespace:
    """Command-line options: output folder and the budget the chosen candidate must meet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for models and report.json")
    parser.add_argument("--profile", default="rpi4b")
    parser.add_argument("--max-size-ratio", type=float, default=0.30)
    parser.add_argument("--min-mean-cosine", type=float, default=0.995)
    parser.add_argument("--min-cosine", type=float, default=0.98)
    parser.add_argument("--min-speedup", type=float, default=1.5)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency median")
    return parser.parse_args()


def main() -> int:
    """Run the comparison; exit status 0 when a candidate meets the whole budget, 1 otherwise."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgefleet.sdk.compress.minilm import (
        encode_each,
        export_onnx,
        fidelity,
        load_sentences,
        load_tokenizer_and_encoder,
        median_latencies_ms,
        reference_outputs,
        seq128_feed,
        split_sentences,
    )
    from edgefleet.sdk.compress.mixed_precision import (
        mixed_precision_int8,
        quantize_dynamic_per_channel,
    )

    args = parse_args()
    # a log file or pipe gets wide tables instead of 80 folded columns
    console = Console() if sys.stdout.isatty() else Console(width=170)
    out = args.out or Path(tempfile.mkdtemp(prefix="edgefleet-minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, encoder = load_tokenizer_and_encoder()
    sentences = load_sentences()
    calib_sentences, eval_sentences = split_sentences(sentences)
    console.print(
        f"all-MiniLM-L6-v2 for [bold]{args.profile}[/]: {len(calib_sentences)} calibration and "
        f"{len(eval_sentences)} evaluation sentences; models in {out}"
    )
    fp32 = export_onnx(encoder, tokenizer, out / "minilm_fp32.onnx")
    calib = encode_each(tokenizer, calib_sentences)
    evaluation = encode_each(tokenizer, eval_sentences)
    reference = reference_outputs(fp32, evaluation)
    latency_feed = seq128_feed(tokenizer, eval_sentences[0])

    candidates: dict[str, Path] = {"fp32": fp32}
    with console.status("plain quantize_dynamic (defaults)"):
        plain = out / "minilm_dynamic_default.onnx"
        quantize_dynamic(str(fp32), str(plain), weight_type=QuantType.QInt8)
        candidates["int8 dynamic (defaults)"] = plain
    with console.status("dynamic INT8, per-channel weights"):
        candidates["int8 dynamic per-channel"] = quantize_dynamic_per_channel(
            fp32, out / "minilm_dynamic_per_channel.onnx"
        )
    with console.status("mixed precision: sensitivity + plan") as status:
        mixed = mixed_precision_int8(
            fp32,
            out / "minilm_mixed_int8.onnx",
            calib,
            evaluation,
            min_mean_cosine=args.min_mean_cosine,
            min_cosine=args.min_cosine,
            max_size_ratio=args.max_size_ratio,
            progress=lambda message, _f: status.update(f"mixed precision: {message}"),
        )
    candidates["int8 mixed (sensitivity)"] = mixed.path
    sens = mixed.sensitivity
    sens.layers = sens.layers[:10]
    console.print(sens.to_rich("Most sensitive ONNX nodes (INT8 alone)"))
    console.print(f"kept fp32 by the plan: {mixed.excluded or 'none'}")

    fp32_size = fp32.stat().st_size
    rows: list[dict[str, Any]] = []
    with console.status("latency, all candidates in turn"):
        ms_1 = median_latencies_ms(candidates, latency_feed, threads=1, runs=args.runs)
        ms_2 = median_latencies_ms(candidates, latency_feed, threads=2, runs=args.runs)
    base_ms = ms_1["fp32"]
    for name, path in candidates.items():
        with console.status(f"fidelity of {name}"):
            fid = fidelity(reference, path, evaluation)
        ms1, ms2 = ms_1[name], ms_2[name]
        size = path.stat().st_size
        failures = []
        if name != "fp32":
            if size > args.max_size_ratio * fp32_size:
                failures.append(f"size {size / fp32_size:.2f}× > {args.max_size_ratio}×")
            if fid.mean < args.min_mean_cosine:
                failures.append(f"mean cosine {fid.mean:.4f} < {args.min_mean_cosine}")
            if fid.minimum < args.min_cosine:
                failures.append(f"min cosine {fid.minimum:.4f} < {args.min_cosine}")
            if base_ms / ms1 < args.min_speedup:
                failures.append(f"speed-up {base_ms / ms1:.2f}× < {args.min_speedup}×")
        rows.append(
            {
                "candidate": name,
                "size_bytes": size,
                "size_ratio": size / fp32_size,
                "mean_cosine": fid.mean,
                "min_cosine": fid.minimum,
                "latency_ms_1_thread": ms1,
                "latency_ms_2_threads": ms2,
                "speedup_1_thread": base_ms / ms1,
                "status": "baseline" if name == "fp32" else ("ok" if not failures else "over-budget"),
                "reason": "; ".join(failures),
            }
        )

    table = Table(title=f"all-MiniLM-L6-v2 for {args.profile} (seq 128, batch 1)")
    for column in ("candidate", "MB", "size", "mean cos", "min cos", "ms 1T", "ms 2T", "speed-up", "status"):
        table.add_column(column, justify="left" if column in ("candidate", "status") else "right")
    for row in rows:
        table.add_row(
            row["candidate"],
            f"{row['size_bytes'] / 1e6:.1f}",
            f"{row['size_ratio']:.2f}×",
            f"{row['mean_cosine']:.4f}",
            f"{row['min_cosine']:.4f}",
            f"{row['latency_ms_1_thread']:.1f}",
            f"{row['latency_ms_2_threads']:.1f}",
            f"{row['speedup_1_thread']:.2f}×",
            row["status"] + (f": {row['reason']}" if row["reason"] else ""),
        )
    console.print(table)
    ok = [row for row in rows if row["status"] == "ok"]
    chosen = min(ok, key=lambda row: row["size_bytes"]) if ok else None
    if chosen:
        console.print(f"[green]chosen:[/] {chosen['candidate']} (smallest within the whole budget)")
    else:
        console.print("[yellow]no candidate meets the whole budget; see the reasons above[/]")
    report = {
        "model": "all-MiniLM-L6-v2",
        "profile": args.profile,
        "budget": {
            "max_size_ratio": args.max_size_ratio,
            "min_mean_cosine": args.min_mean_cosine,
            "min_cosine": args.min_cosine,
            "min_speedup_1_thread": args.min_speedup,
        },
        "eval_sentences": len(eval_sentences),
        "candidates": rows,
        "mixed_precision": mixed.summary(),
        "chosen": chosen["candidate"] if chosen else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.print(f"report: {out / 'report.json'}")
    return 0 if chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
