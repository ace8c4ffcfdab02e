"""ONNX → optimized ONNX: onnxslim graph simplification, then onnxruntime's offline graph optimization."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.converters.base import CONVERTERS, ConversionError, ConversionResult, Converter, short_reason
from edgefleet.converters.parity import ParityTolerance, check_parity, compare_many
from edgefleet.converters.runners import named_feeds, open_runner

# "all" is left out on purpose: it adds layout transforms (NCHWc) specific to this host's CPU, so
# the saved graph would not be portable to an ARM device.
ORT_LEVELS = ("none", "basic", "extended")


@CONVERTERS.register("onnx-optimize")
class OnnxOptimize(Converter):
    """Simplify an ONNX graph with onnxslim and save onnxruntime's offline-optimized graph.

    Options: `slim` (bool, default True), `ort_level` ("none", "basic" or "extended"; default
    "extended", which fuses into onnxruntime contrib ops — use "basic" before quantization so the
    quantizer sees plain MatMul/Conv nodes).
    """

    name = "onnx-optimize"
    source = "onnx"
    target = "onnx"
    requires = ("onnx", "onnxruntime", "onnxslim")
    default_tolerance = ParityTolerance(atol=1e-4, rtol=1e-3, min_agreement=0.99, min_fidelity_row=0.9999)

    def convert(self, model: Any, out_path: Path, sample_inputs: dict[str, np.ndarray]) -> ConversionResult:
        """Optimize the ONNX file `model` into `out_path` and check it against the original."""
        self.check_available()
        src = Path(model)
        out_path = Path(out_path)
        level = str(self.options.get("ort_level", "extended"))
        if level not in ORT_LEVELS:
            raise ConversionError(f"unknown ort_level {level!r}; choose one of {', '.join(ORT_LEVELS)}")
        slim = bool(self.options.get("slim", True))
        source_runner = open_runner(src)
        feeds = named_feeds(source_runner, sample_inputs)
        reference = source_runner.run(feeds)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".optimize-") as tmp:
            current = src
            if slim:
                current = Path(tmp) / "slim.onnx"
                _slim(src, current)
            if level != "none":
                optimized = Path(tmp) / "ort.onnx"
                _ort_optimize(current, optimized, level)
                current = optimized
            result_runner = open_runner(current)
            try:
                parity = compare_many(reference, result_runner.run(feeds))
            except ValueError as exc:
                raise ConversionError(f"the optimized graph's outputs changed shape: {exc}") from exc
            check_parity(parity, self.tolerance, "ONNX optimization")
            shutil.copyfile(current, out_path)
        return ConversionResult(
            path=out_path,
            parity=parity,
            format="onnx",
            inputs=result_runner.inputs,
            outputs=result_runner.outputs,
            details={
                "slim": slim,
                "ort_level": level,
                "bytes_before": src.stat().st_size,
                "bytes_after": out_path.stat().st_size,
            },
        )


def _slim(src: Path, dst: Path) -> None:
    """onnxslim: constant folding, dead-node removal, pattern fusion — pure ONNX, runtime-agnostic."""
    import onnx
    import onnxslim

    try:
        slimmed = onnxslim.slim(str(src))
        if slimmed is None:
            raise ConversionError("onnxslim returned no model")
        onnx.save(slimmed, str(dst))
    except ConversionError:
        raise
    except Exception as exc:  # onnxslim surfaces onnx/shape-inference errors of many types
        raise ConversionError(f"onnxslim could not simplify {src.name}: {short_reason(exc)}") from exc


def _ort_optimize(src: Path, dst: Path, level: str) -> None:
    """Let onnxruntime apply its graph optimizations once and save the result."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ConversionError(f"onnxruntime could not optimize {src.name}: {short_reason(exc)}") from exc
    if not dst.exists():
        raise ConversionError(f"onnxruntime wrote no optimized model for {src.name}")
