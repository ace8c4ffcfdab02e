"""Per-op-class efficiency of this host, measured by a short onnxruntime micro-benchmark and cached.

Each op class (conv, dwconv, matmul, elementwise) is timed on a few small ONNX graphs shaped like the
layers of common models (ResNet/YOLO 3×3 convolutions, MobileNet depthwise ones, transformer matrix
products, activations and normalizations). A case's efficiency is the estimator's roofline time at
efficiency 1 divided by the measured time less the dispatch overhead; a class's is the geometric mean
of its cases. A chain of tiny Adds gives the per-op dispatch overhead. Times are the 10th percentile of
runs: on a machine shared with other jobs it is the figure least inflated by them (the median of the
same runs moved 4x with the load on the project's 2-core host). The result is cached per machine,
onnxruntime version and thread count in `device_profiles.host.cache_dir()`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

CALIBRATION_VERSION = 3
CACHE_FILE = "estimator-efficiency.json"
_OVERHEAD_CHAIN = 100
# Efficiencies are shares of the profile's figures; a probe that underrates the machine gives > 1.
MAX_EFFICIENCY = 4.0


def cache_path() -> Path:
    """The calibration cache file (next to the host profile's cache)."""
    from edgefleet.device_profiles.host import cache_dir

    return cache_dir() / CACHE_FILE


def host_efficiency(profile: Any, refresh: bool = False) -> dict[str, float]:
    """The host's efficiency table (op class → share, plus op_overhead_us): cached, else measured now."""
    key = _cache_key(profile)
    if not refresh:
        cached = _read_cache(key)
        if cached is not None:
            return cached
    measured = micro_benchmark(profile)
    _write_cache(key, measured)
    return {k: v for k, v in measured.items() if isinstance(v, float)}


def micro_benchmark(profile: Any, seconds_per_case: float = 0.25) -> dict[str, Any]:
    """Time every case on onnxruntime CPU with the profile's threads; returns the efficiency table."""
    import onnx

    from edgefleet.sdk.build.estimate import count_flops, estimate_cost

    threads = int(getattr(profile, "threads", 0) or os.cpu_count() or 1)
    unit = {"conv": 1.0, "dwconv": 1.0, "matmul": 1.0, "elementwise": 1.0}
    by_class: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-calibrate-") as tmp:
        folder = Path(tmp)
        chain = folder / "overhead.onnx"
        onnx.save(_overhead_chain(), str(chain))
        overhead_ms = _time_ms(chain, threads, seconds_per_case) / _OVERHEAD_CHAIN
        for index, (op_class, build) in enumerate(_CASES):
            path = folder / f"case{index}.onnx"
            model = build()
            onnx.save(model, str(path))
            cost = count_flops(path, 1)
            executed = sum(1 for op in cost.ops if op.flops or op.bytes_moved)
            raw = estimate_cost(cost, profile, op_overhead_us=0.0, efficiency=unit).estimate_ms
            measured = _time_ms(path, threads, seconds_per_case) - executed * overhead_ms
            by_class.setdefault(op_class, []).append(raw / max(measured, raw / MAX_EFFICIENCY, 1e-6))
    out: dict[str, Any] = {
        op_class: round(math.exp(sum(math.log(v) for v in values) / len(values)), 4)
        for op_class, values in by_class.items()
    }
    out["op_overhead_us"] = round(overhead_ms * 1000.0, 3)
    return out


def _time_ms(path: Path, threads: int, seconds: float) -> float:
    """10th-percentile latency (ms) of one batch-1 run of `path` on onnxruntime CPU, over ~`seconds`.

    With one thread the run's process CPU time is taken: it is the latency on an idle core, and it
    leaves out the time other jobs hold the core, which a wall clock on a shared machine adds.
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.random.default_rng(0).standard_normal([int(d) for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }
    for _ in range(3):
        session.run(None, feeds)
    clock = time.process_time if threads == 1 else time.perf_counter
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = clock()
        session.run(None, feeds)
        times.append((clock() - start) * 1000.0)
    return float(np.percentile(times, 10))


def _model(nodes: list[Any], inputs: list[Any], output: str, inits: list[Any]) -> Any:
    """A single-graph opset-17 model with a float output whose shape is left to inference."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "case", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(name: str, shape: tuple[int, ...]) -> Any:
    import numpy as np
    from onnx import numpy_helper

    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.05
    return numpy_helper.from_array(data, name)


def _input(name: str, shape: tuple[int, ...]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _conv(
    cin: int, cout: int, size: int, k: int, stride: int = 1, group: int = 1, layers: int = 2
) -> Callable[[], Any]:
    """A chain of `layers` Conv+Relu layers at one resolution (the first may change the channels)."""

    def build() -> Any:
        from onnx import helper

        nodes, inits, prev, ch = [], [], "x", cin
        for i in range(layers):
            inits.append(_weights(f"w{i}", (cout, ch // group, k, k)))
            inits.append(_weights(f"b{i}", (cout,)))
            nodes.append(
                helper.make_node(
                    "Conv",
                    [prev, f"w{i}", f"b{i}"],
                    [f"c{i}"],
                    kernel_shape=[k, k],
                    pads=[k // 2] * 4,
                    strides=[stride if i == 0 else 1] * 2,
                    group=group,
                )
            )
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
            prev, ch = f"r{i}", cout
        return _model(nodes, [_input("x", (1, cin, size, size))], prev, inits)

    return build


def _matmul(m: int, k: int, n: int, layers: int = 2) -> Callable[[], Any]:
    """A chain of token × weight matrix products (a transformer's projections), k → n → k."""

    def build() -> Any:
        from onnx import helper

        nodes, inits, prev, width = [], [], "x", k
        for i in range(layers):
            out = n if i % 2 == 0 else k
            inits.append(_weights(f"w{i}", (width, out)))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
            prev, width = f"m{i}", out
        return _model(nodes, [_input("x", (1, m, k))], prev, inits)

    return build


def _linear(m: int, k: int, n: int) -> Callable[[], Any]:
    """torch's nn.Linear as exported on 2-D input: Gemm with a transposed weight and a bias, then back."""

    def build() -> Any:
        from onnx import helper

        nodes = [
            helper.make_node("Gemm", ["x", "w0", "b0"], ["g0"], transB=1),
            helper.make_node("Gemm", ["g0", "w1", "b1"], ["g1"], transB=1),
        ]
        inits = [_weights("w0", (n, k)), _weights("b0", (n,)), _weights("w1", (k, n)), _weights("b1", (k,))]
        return _model(nodes, [_input("x", (m, k))], "g1", inits)

    return build


def _gelu_transpose(seq: int, hidden: int, heads: int) -> Callable[[], Any]:
    """A transformer's glue: erf-based GELU on the feed-forward width, then a head-split transpose."""

    def build() -> Any:
        import numpy as np
        from onnx import helper, numpy_helper

        inits = [
            numpy_helper.from_array(np.array(v, dtype=np.float32), n)
            for n, v in (("r2", 1.4142135), ("one", 1.0), ("half", 0.5))
        ]
        nodes = [
            helper.make_node("Div", ["x", "r2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]),
            helper.make_node("Mul", ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["g"]),
            helper.make_node("Reshape", ["g", "shape"], ["r"]),
            helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1, 3]),
        ]
        inits.append(
            numpy_helper.from_array(np.array([1, seq, heads, hidden // heads], dtype=np.int64), "shape")
        )
        return _model(nodes, [_input("x", (1, seq, hidden))], "y", inits)

    return build


def _attention_scores(heads: int, seq: int, head: int) -> Callable[[], Any]:
    """Q·Kᵀ then ·V for `heads` heads: the batched matrix products of self-attention."""

    def build() -> Any:
        from onnx import helper

        nodes = [
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("MatMul", ["s", "v"], ["y"]),
        ]
        inputs = [
            _input("q", (1, heads, seq, head)),
            _input("kt", (1, heads, head, seq)),
            _input("v", (1, heads, seq, head)),
        ]
        return _model(nodes, inputs, "y", [])

    return build


def _elementwise(shape: tuple[int, ...], ops: tuple[str, ...]) -> Callable[[], Any]:
    """A chain of element-wise ops (binary ones add the input back, so nothing folds)."""

    def build() -> Any:
        from onnx import helper

        nodes, inits, prev = [], [], "x"
        for i, op in enumerate(ops):
            if op in ("Add", "Mul"):
                nodes.append(helper.make_node(op, [prev, "x"], [f"e{i}"]))
            elif op == "LayerNormalization":
                inits += [_weights(f"g{i}", (shape[-1],)), _weights(f"h{i}", (shape[-1],))]
                nodes.append(helper.make_node(op, [prev, f"g{i}", f"h{i}"], [f"e{i}"], axis=-1))
            elif op == "Softmax":
                nodes.append(helper.make_node(op, [prev], [f"e{i}"], axis=-1))
            else:
                nodes.append(helper.make_node(op, [prev], [f"e{i}"]))
            prev = f"e{i}"
        return _model(nodes, [_input("x", shape)], prev, inits)

    return build


def _overhead_chain() -> Any:
    """`_OVERHEAD_CHAIN` Adds on a 1-element tensor: latency / op count is the dispatch cost."""
    from onnx import helper

    nodes, prev = [], "x"
    for i in range(_OVERHEAD_CHAIN):
        # alternate the constant operand so no optimizer folds the chain into one op
        nodes.append(helper.make_node("Add", [prev, "one" if i % 2 else "two"], [f"t{i}"]))
        prev = f"t{i}"
    inits = [_weights("one", (1,)), _weights("two", (1,))]
    return _model(nodes, [_input("x", (1,))], prev, inits)


# (op class, graph builder): sizes drawn from ResNet-18, MobileNetV2, YOLO-n and BERT-small layers.
_CASES: tuple[tuple[str, Callable[[], Any]], ...] = (
    ("conv", _conv(64, 64, 56, 3)),
    ("conv", _conv(32, 32, 80, 3)),
    ("conv", _conv(96, 192, 28, 1)),
    ("conv", _conv(3, 16, 224, 3, stride=2, layers=1)),
    ("conv", _conv(384, 64, 14, 1)),
    ("dwconv", _conv(144, 144, 56, 3, group=144)),
    ("dwconv", _conv(384, 384, 14, 3, group=384)),
    ("matmul", _matmul(128, 384, 1536)),
    ("matmul", _matmul(75, 256, 256)),
    ("matmul", _attention_scores(12, 128, 32)),
    ("matmul", _linear(150, 256, 1024)),
    ("elementwise", _elementwise((1, 64, 56, 56), ("Sigmoid", "Mul", "Add"))),
    ("elementwise", _elementwise((1, 128, 384), ("LayerNormalization", "Add"))),
    ("elementwise", _elementwise((1, 12, 128, 128), ("Softmax",))),
    ("elementwise", _gelu_transpose(128, 1536, 12)),
    ("elementwise", _elementwise((1, 96, 192), ("LayerNormalization", "Add", "LayerNormalization"))),
    ("elementwise", _elementwise((1, 6, 96, 96), ("Softmax",))),
)


def _cache_key(profile: Any) -> dict[str, Any]:
    """What the measurement depends on: the machine, onnxruntime's version, threads, this module."""
    try:
        import onnxruntime

        ort_version = str(onnxruntime.__version__)
    except ImportError:
        ort_version = "none"
    return {
        "version": CALIBRATION_VERSION,
        "cpu_model": getattr(profile, "cpu_model", ""),
        "cores": getattr(profile, "cores", 0),
        "threads": getattr(profile, "threads", 0),
        "onnxruntime": ort_version,
    }


def _read_cache(key: dict[str, Any]) -> Optional[dict[str, float]]:
    """The cached table when it was measured under the same key, else None."""
    try:
        doc = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("efficiency"), dict):
        return None
    table = doc["efficiency"]
    if not all(isinstance(v, (int, float)) and v > 0 for v in table.values()):
        return None
    return {str(k): float(v) for k, v in table.items()}


def _write_cache(key: dict[str, Any], table: dict[str, Any]) -> None:
    """Store the table atomically; a read-only cache folder only costs a re-measurement next time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".efficiency.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            doc = {
                "key": key,
                "efficiency": table,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            json.dump(doc, fh, indent=2)
        os.replace(tmp, path)
    except OSError:
        return
