"""Estimated vs measured latency on `host` for a few models, plus the per-op overhead constant.

Run: .venv/bin/python bench/estimate.py   (about a minute on 2 cores)
Prints a table and writes bench/results/estimate.json. Measured = onnxruntime CPU (or LiteRT with
XNNPACK for .tflite) on this machine at batch 1 with the host profile's threads, median of runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "estimate.json"
SEQ_LEN = 128


def _median_ms(run: Callable[[], Any], min_runs: int = 10, budget_s: float = 3.0) -> float:
    """Median latency of `run` after warm-up, over at least `min_runs` runs or `budget_s` seconds."""
    for _ in range(3):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
        if len(times) >= 500:
            break
    return float(np.median(times))


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure_op_overhead_us(folder: Path, threads: int, n_ops: int = 200) -> float:
    """onnxruntime cost per op: a chain of `n_ops` Add ops on a 1-element tensor, latency / n_ops."""
    import onnx
    from onnx import TensorProto, helper

    nodes = []
    prev = "x"
    for i in range(n_ops):
        # alternate the constant operand so no optimizer folds the chain into one op
        nodes.append(helper.make_node("Add", [prev, "one" if i % 2 else "two"], [f"t{i}"]))
        prev = f"t{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1])],
        [
            helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "chain.onnx"
    onnx.save(model, str(path))
    session = _ort_session(path, threads)
    feed = {"x": np.zeros(1, dtype=np.float32)}
    return _median_ms(lambda: session.run(None, feed)) * 1000.0 / n_ops


def build_models(folder: Path) -> list[dict[str, Any]]:
    """Export the bench models to ONNX (and the digits CNN to TFLite); returns name, path, feed, dims."""
    import torch

    from edgefleet.sdk import zoo

    torch.manual_seed(0)
    out: list[dict[str, Any]] = []

    def export(name: str, module: Any, shape: tuple[int, ...]) -> None:
        path = folder / f"{name}.onnx"
        x = torch.randn(*shape)
        torch.onnx.export(
            module.eval(),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamo=False,
            opset_version=17,
        )
        out.append({"name": name, "path": path, "feed": {"x": x.numpy()}, "dims": None})

    digits = zoo.digits_cnn()
    export("digits-cnn", digits, (1, 1, 8, 8))
    export("mobilenet_v2", zoo.torchvision_model("mobilenet_v2"), (1, 3, 224, 224))
    export("resnet18", zoo.torchvision_model("resnet18"), (1, 3, 224, 224))

    tokenizer, encoder = zoo.load_minilm()
    enc = tokenizer(
        ["edge devices run small models"], padding="max_length", max_length=SEQ_LEN, return_tensors="pt"
    )
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    path = folder / "minilm.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        encoder,
        args,
        str(path),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
        dynamo=False,
        opset_version=17,
    )
    out.append(
        {
            "name": f"minilm (seq {SEQ_LEN})",
            "path": path,
            "feed": {n: a.numpy() for n, a in zip(names, args)},
            "dims": {"sequence": SEQ_LEN},
        }
    )

    import litert_torch

    from edgefleet.converters.torch_tflite import quiet_litert

    tfl = folder / "digits-cnn.tflite"
    with quiet_litert():
        litert_torch.convert(digits.eval(), (torch.randn(1, 1, 8, 8),)).export(str(tfl))
    out.append({"name": "digits-cnn (tflite)", "path": tfl, "feed": None, "dims": None})
    return out


def measure(model: dict[str, Any], threads: int) -> float:
    """Median host latency (ms) of one model on its runtime."""
    path: Path = model["path"]
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
        detail = interp.get_input_details()[0]
        interp.set_tensor(
            detail["index"], np.random.default_rng(0).standard_normal(detail["shape"]).astype(np.float32)
        )
        return _median_ms(interp.invoke)
    session = _ort_session(path, threads)
    feed = model["feed"]
    return _median_ms(lambda: session.run(None, feed))


def main() -> int:
    """Run the bench, print the table, write the JSON."""
    from rich.console import Console
    from rich.table import Table

    from edgefleet.device_profiles.host import load_host_profile
    from edgefleet.sdk.build.estimate import estimate_latency

    # probe again now, so the host figures and the measurements below see the same machine load
    load_before = os.getloadavg()[0]
    host = load_host_profile(refresh=True)
    threads = host.threads
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overhead_us = measure_op_overhead_us(folder, threads)
        for model in build_models(folder):
            est = estimate_latency(
                model["path"], host, batch_size=1, dims=model["dims"], op_overhead_us=overhead_us
            )
            measured = measure(model, threads)
            rows.append(
                {
                    "model": model["name"],
                    "gflop": est.flops / 1e9,
                    "mb_moved": est.bytes_moved / 1e6,
                    "bound": est.bound,
                    "estimate_ms": est.estimate_ms,
                    "measured_ms": measured,
                    "ratio_est_over_measured": est.estimate_ms / measured,
                    "achieved_gflops": est.flops / (measured / 1000.0) / 1e9,
                    "unknown_op_types": list(est.unknown_op_types),
                }
            )
    table = Table(title=f"estimate vs measured on host ({host.cpu_model}, {threads} threads)")
    for col in (
        "model",
        "GFLOP",
        "MB moved",
        "bound",
        "estimate ms",
        "measured ms",
        "est/measured",
        "achieved GFLOP/s",
    ):
        table.add_column(col, justify="left" if col in ("model", "bound") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['gflop']:.4f}",
            f"{r['mb_moved']:.2f}",
            r["bound"],
            f"{r['estimate_ms']:.3f}",
            f"{r['measured_ms']:.3f}",
            f"{r['ratio_est_over_measured']:.2f}",
            f"{r['achieved_gflops']:.1f}",
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    console.print(
        f"host profile: {host.sustained_gflops:g} GFLOP/s, {host.mem_bandwidth_gbs:g} GB/s (probe); "
        f"measured per-op overhead {overhead_us:.2f} µs; 1-min load average {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {host.cores} cores"
    )
    doc = {
        "host": {
            "cpu_model": host.cpu_model,
            "cores": host.cores,
            "threads": threads,
            "sustained_gflops": host.sustained_gflops,
            "mem_bandwidth_gbs": host.mem_bandwidth_gbs,
        },
        "op_overhead_us": overhead_us,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
