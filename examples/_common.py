"""What the three scenario examples share: build for several profiles, plain onnxruntime quantizers, one table.

Each example trains its own model on data it makes, then calls `compare()`: the model is built for every
profile through the public SDK (`edgefleet.sdk.build.release.build_release`, what `edgefleet build
--profile A --profile B` runs), the fp32 ONNX is quantized with plain `onnxruntime.quantization`
(`quantize_dynamic` and `quantize_static`, defaults), and every model is scored by the example's own
quality function and timed round-robin on this host (one run of each in turn, so load from other
processes hits them alike). The table is printed and written to `OUT/results.json`.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

DEFAULT_PROFILES = "rpi4b,rpi5,jetson-orin-nano"
# The candidates the scenarios try (the fp32 baseline always runs): one of each family, so three
# profiles build in minutes on two cores. `edgefleet build` without --only tries a few more.
CANDIDATES = (
    "onnx-fp16",
    "onnx-int8-dynamic",
    "onnx-int8-static-minmax",
    "onnx-int8-static-percentile",
    "onnx-int8-mixed",
    "tflite-dynamic-int8",
    "tflite-int8",
    "tflite-fp16",
)
# Models are scored by the example: inputs → every output of the model.
Quality = Callable[[Path], float]


def console() -> Console:
    """A console wide enough for the tables when the output goes to a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=180)


def profiles_arg(text: str) -> list[str]:
    """`rpi4b,rpi5` → ["rpi4b", "rpi5"], every name checked before any training starts."""
    from edgefleet.sdk.build.profile import resolve_profile

    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        resolve_profile(name)  # raises a BuildError naming the known profiles
    return names


def out_dir(given: Optional[Path], prefix: str) -> Path:
    """The --out folder, created; a fresh temp folder when none is given."""
    import tempfile

    path = given or Path(tempfile.mkdtemp(prefix=f"edgefleet-{prefix}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def signing_key(workdir: Path) -> Path:
    """The fleet key when `edgefleet keys init` made one, else a throwaway key for this example."""
    from edgefleet.sdk.trust.keys import default_key_dir, init_keys

    fleet = default_key_dir() / "fleet.key"
    if fleet.is_file():
        return fleet
    keys = workdir / "example-keys"
    if (keys / "fleet.key").is_file():
        return keys / "fleet.key"
    return init_keys(keys).private_path


def torch_threads() -> None:
    """Train on one thread: on a shared machine a second thread waits for the first (10× slower measured)."""
    import torch

    torch.set_num_threads(1)


def export_onnx(
    model: Any, sample: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]
) -> Path:
    """The fp32 ONNX a user would export: opset 17, dynamic batch, the TorchScript exporter, no warnings."""
    import warnings

    import torch

    dynamic = {name: {0: "batch"} for name in (*inputs, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter(
            "ignore"
        )  # the exporter's deprecation and tracer notes say nothing about the model
        torch.onnx.export(
            model,
            sample,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    return path


class _Reader:
    """onnxruntime's CalibrationDataReader over named arrays, one row per call (batch 1, as served)."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds = feeds
        self.rows = len(next(iter(feeds.values())))
        self.index = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.index >= self.rows:
            return None
        row = {k: v[self.index : self.index + 1] for k, v in self.feeds.items()}
        self.index += 1
        return row

    def rewind(self) -> None:
        self.index = 0


def plain_quantizers(fp32: Path, calib: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """What a user gets from onnxruntime alone: `quantize_dynamic` and `quantize_static` with their defaults.

    Defaults as of onnxruntime 1.2x/1.3x: dynamic = INT8 weights, per-tensor; static = QDQ, INT8 activations
    and weights, per-tensor, MinMax calibration, no `quant_pre_process`. Static calibrates on `calib` rows.
    """
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        """The reader with onnxruntime's base class, which quantize_static checks for."""

    dynamic = out / f"{fp32.stem}.ort-dynamic.onnx"
    static = out / f"{fp32.stem}.ort-static.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(
        logging.ERROR
    )  # "consider pre-processing" on every call: the plain path skips it on purpose
    try:
        with np.errstate(all="ignore"):  # constant tensors give 0/0 scales, which onnxruntime then handles
            quantize_dynamic(str(fp32), str(dynamic))
            quantize_static(str(fp32), str(static), Reader(calib))
    finally:
        root.setLevel(level)
    return {"onnxruntime quantize_dynamic": dynamic, "onnxruntime quantize_static": static}


def run_outputs(path: Path, inputs: dict[str, np.ndarray], threads: int = 2) -> list[np.ndarray]:
    """Every output of an .onnx or .tflite model on `inputs`, in the device's own runtime wrapper."""
    from edgefleet.sdk.build.measure import run_model

    return run_model(path, inputs, threads=threads)


def round_robin_ms(
    models: dict[str, Path], feed: dict[str, np.ndarray], threads: int = 1, runs: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median ms of one batch-1 inference per model, the models timed in turn so load hits them alike."""
    from edgefleet.converters.runners import named_feeds, open_runner

    runners = {name: open_runner(path, threads=threads) for name, path in models.items()}
    feeds = {name: named_feeds(r, feed) for name, r in runners.items()}
    for name, runner in runners.items():
        for _ in range(warmup):
            runner.run(feeds[name])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(feeds[name])
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class Row:
    """One model in the comparison: how it was made, its file, size, host latency and quality."""

    model: str
    how: str
    file: str
    size_bytes: int
    precision: str
    host_ms: float = float("nan")
    quality: float = float("nan")
    estimated_ms: dict[str, Optional[float]] = field(default_factory=dict)


def _estimates(path: Path, profiles: list[str], precision: str) -> dict[str, Optional[float]]:
    """The build's estimated batch-1 latency of a model on every profile (None where it cannot tell)."""
    from edgefleet.sdk.build.choose import estimate_target_ms
    from edgefleet.sdk.build.profile import resolve_profile

    return {p: estimate_target_ms(path, resolve_profile(p), 1, precision) for p in profiles}


def _bundle_model(bundle: Path) -> tuple[Path, str]:
    """The model file of a written bundle and its precision, read from the signed manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return bundle / manifest["model"]["file"], str(manifest.get("build", {}).get("precision", "") or "")


def compare(
    *,
    example: str,
    model: Any,
    fp32_onnx: Path,
    calib: dict[str, Any],
    eval_data: dict[str, Any],
    quality: Quality,
    metric: str,
    profiles: list[str],
    out: Path,
    plan: Any,
    max_accuracy_drop: float,
    latency_feed: dict[str, np.ndarray],
    con: Console,
    latency_runs: int = 20,
    task: str = "auto",
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Build `model` for every profile, quantize `fp32_onnx` with plain onnxruntime, score and time all.

    `calib`/`eval_data` are what `build()` takes (named arrays, `y` for labels). `quality(path)` scores a
    model file on the example's held-out data with the example's metric (`metric` names it). Prints the
    side-by-side table and writes OUT/results.json; returns what it wrote. `task` is the build's
    `--task` (docs/quality.md): which metric the build budgets and the devices' health check scores.
    """
    from edgefleet.sdk.build.measure import task_scope
    from edgefleet.sdk.build.release import build_release
    from edgefleet.sdk.cli.output import library_output_to

    calib_inputs = {k: np.asarray(v) for k, v in calib.items() if k != "y"}
    key = signing_key(out)
    started = time.perf_counter()

    def progress(message: str, fraction: float) -> None:
        if message.startswith("candidate"):
            con.log(f"[{fraction:4.0%}] {message}", highlight=False)

    log = out / "build.log"
    # torch, TensorFlow and onnxruntime notes go to the log, so the tables stay readable
    with library_output_to(log), task_scope(task):
        results = build_release(
            model,
            profiles,
            out / "release",
            overwrite=True,
            calib=calib,
            eval=eval_data,
            max_accuracy_drop=max_accuracy_drop,
            plan=plan,
            private_key=key,
            name=example,
            progress=progress,
            latency_runs=latency_runs,
        )
    build_s = time.perf_counter() - started
    plain = plain_quantizers(fp32_onnx, {k: v[:64] for k, v in calib_inputs.items()}, out)

    rows = [
        Row(example, "fp32 ONNX (torch.onnx.export)", str(fp32_onnx), fp32_onnx.stat().st_size, "fp32"),
        *[Row(example, how, str(path), path.stat().st_size, "int8") for how, path in plain.items()],
    ]
    chosen: dict[str, dict[str, Any]] = {}
    for profile, result in results.items():
        assert result.bundle_dir is not None  # build_release always writes the bundle
        path, _ = _bundle_model(result.bundle_dir)
        precision = result.chosen.spec.precision
        rows.append(
            Row(
                example,
                f"edgefleet → {profile}: {result.chosen.id}",
                str(path),
                path.stat().st_size,
                precision,
            )
        )
        chosen[profile] = {
            "candidate": result.chosen.id,
            "reason": result.reason,
            "bundle": str(result.bundle_dir),
            "build_task": task,
            "build_metric": (result.chosen.quality.metric if result.chosen.quality else None),
            "build_quality": (result.chosen.quality.value if result.chosen.quality else None),
        }
    with con.status(f"{metric} of every model on the held-out set"):
        for row in rows:
            row.quality = float(quality(Path(row.file)))
            row.estimated_ms = _estimates(Path(row.file), profiles, row.precision.split("-")[0])
    with con.status("host latency, every model in turn"):
        timed = round_robin_ms({row.how: Path(row.file) for row in rows}, latency_feed, runs=latency_runs)
    for row in rows:
        row.host_ms = timed[row.how]

    con.print(results_table(example, metric, rows, profiles))
    for profile, info in chosen.items():
        con.print(f"[bold]{profile}[/]: {info['candidate']} — {info['reason']}", highlight=False)
    report = {
        "example": example,
        "metric": metric,
        "profiles": profiles,
        "rows": [asdict(r) for r in rows],
        "chosen": chosen,
        "build_seconds": round(build_s, 1),
        **(extra or {}),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_json_default))
    con.print(f"results: {out / 'results.json'}; bundles: {out / 'release'}; library messages: {log}")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def results_table(example: str, metric: str, rows: list[Row], profiles: list[str]) -> Table:
    """Size, host latency, quality and the profiles' latency estimates of every model, fp32 first."""
    table = Table(title=f"{example}: plain onnxruntime quantizers vs edgefleet build, batch 1")
    for column in (
        "model",
        "KB",
        "× size",
        "host ms (1T)",
        metric,
        "Δ vs fp32",
        *[f"{p} ms*" for p in profiles],
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = rows[0]
    for row in rows:
        table.add_row(
            row.how,
            f"{row.size_bytes / 1024:.1f}",
            f"{row.size_bytes / base.size_bytes:.2f}",
            f"{row.host_ms:.2f}",
            f"{row.quality:.4f}",
            f"{row.quality - base.quality:+.4f}",
            *[_ms(row.estimated_ms.get(p)) for p in profiles],
        )
    table.caption = (
        "* the build's estimate of batch-1 latency on that device (sdk/build/estimate.py), not measured"
    )
    return table


def _ms(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (what README.md shows), from results.json."""
    profiles = report["profiles"]
    rows = report["rows"]
    base = rows[0]
    head = [
        "model",
        "KB",
        "× size",
        "host ms (1T)",
        report["metric"],
        "Δ vs fp32",
        *[f"{p} ms*" for p in profiles],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["how"],
            f"{row['size_bytes'] / 1024:.1f}",
            f"{row['size_bytes'] / base['size_bytes']:.2f}",
            f"{row['host_ms']:.2f}",
            f"{row['quality']:.4f}",
            f"{row['quality'] - base['quality']:+.4f}",
            *[_ms(row["estimated_ms"].get(p)) for p in profiles],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # `python examples/_common.py OUT/results.json` prints the Markdown table
    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
