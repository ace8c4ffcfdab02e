"""Build the digits CNN for a Raspberry Pi 4 and a Jetson Orin Nano, offline, and print what each build chose.

A ~40k-parameter CNN is trained on half of scikit-learn's 1,797 real 8×8 digits and tested on the other
half; `edgefleet.sdk.build` then tries every candidate each profile can run (ONNX fp32/fp16/INT8 with
three calibrations, sensitivity-driven 30 %/50 % channel pruning with a fine-tune, TFLite variants),
measures them side by side and writes a signed bundle per profile.

    .venv/bin/python examples/digits_cnn.py [--out DIR] [--profiles rpi4b,jetson-orin-nano] [--epochs 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console

from edgefleet.sdk import build
from edgefleet.sdk.cli.build import candidates_table
from edgefleet.sdk.zoo import accuracy, trained_digits_cnn


def signing_key(workdir: Path) -> Path:
    """The fleet key when `edgefleet keys init` made one, else a throwaway key for this example."""
    from edgefleet.sdk.trust.keys import default_key_dir, init_keys

    fleet = default_key_dir() / "fleet.key"
    if fleet.is_file():
        return fleet
    return init_keys(workdir / "example-keys").private_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the bundles (default: a temp folder)"
    )
    parser.add_argument("--profiles", default="rpi4b,jetson-orin-nano")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    args = parser.parse_args()
    # Wide enough for the candidate table when the output goes to a file or a pipe.
    console = Console(width=max(Console().width, 200))

    model, split = trained_digits_cnn(epochs=args.epochs)
    fp32_acc = accuracy(model, split.x_test, split.y_test)
    console.print(
        f"digits CNN: {sum(p.numel() for p in model.parameters()):,} parameters, trained on {len(split.x_train)} "
        f"digits, test accuracy {fp32_acc:.2%} on {len(split.x_test)} held-out digits"
    )

    def show_progress(message: str, fraction: float) -> None:
        # One line per candidate; the steps inside a candidate would flood the screen.
        if message.startswith("candidate"):
            console.log(f"[{fraction:4.0%}] {message}", highlight=False)

    with tempfile.TemporaryDirectory(prefix="edgefleet-digits-") as tmp:
        out_root = args.out or Path(tmp)
        key = signing_key(Path(tmp))
        for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
            console.rule(f"build for {profile}")
            result = build(
                model,
                profile,
                calib=(split.x_train, split.y_train),
                eval=(split.x_test, split.y_test),
                max_accuracy_drop=args.max_accuracy_drop,
                out=out_root / f"digits-{profile}",
                private_key=key,
                name="digits-cnn",
                overwrite=True,
                progress=show_progress,
            )
            console.print(candidates_table(result.report))
            console.print(f"[bold]chosen:[/] {result.chosen.id} — {result.reason}", highlight=False)
            pruned = next((c for c in result.candidates if c.id == "pruned50-onnx-int8-static-minmax"), None)
            if pruned is not None and pruned.quality is not None:
                console.print(
                    f"50 % channel-pruned + fine-tuned + static INT8: accuracy {pruned.quality.value:.2%} "
                    f"(fp32 {result.baseline.quality.value if result.baseline.quality else float('nan'):.2%}), "
                    f"size {pruned.size_bytes or 0:,} B vs {result.baseline.size_bytes or 0:,} B",
                    highlight=False,
                )
            console.print(f"bundle: {result.bundle_dir}")


if __name__ == "__main__":
    main()
