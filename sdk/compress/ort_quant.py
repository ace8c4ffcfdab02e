"""onnxruntime quantization as compression plug-ins: dynamic INT8, static QDQ INT8, FP16.

Every step takes the path of an fp32 ONNX file and writes its result into `ctx.workdir`:

    OrtDynamicInt8(per_channel=True, reduce_range=False, nodes_to_exclude=(), op_types=None)
        registered "ort-dynamic-int8": weights INT8 ahead of time, activations quantized per run.
    OrtStaticInt8(calibration="minmax"|"entropy"|"percentile", per_channel=True, nodes_to_exclude=(),
                  op_types=None, max_samples=256, batch_size=32, symmetric_activations=False)
        registered "ort-static-int8": QDQ graph with activation ranges calibrated on `ctx.calib`.
    OrtFloat16(nodes_to_exclude=(), op_block_list=None)
        registered "ort-fp16": weights and compute in FP16, inputs/outputs kept fp32.

`nodes_to_exclude` keeps the named nodes in fp32 (the mixed-precision plan passes the most
sensitive ones). Whether a quantized graph is faster is never assumed: dynamic INT8 on convolutions
ran 2.6–10× slower than fp32 on this machine, so the build plan measures every candidate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)

CALIBRATIONS = ("minmax", "entropy", "percentile")


def _source(model: Any) -> Path:
    """The ONNX file a step works on; anything else is a user error."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is None or path.suffix.lower() != ".onnx":
        raise CompressionError(
            f"onnxruntime quantization works on an .onnx file, got {model!r}; convert the model first "
            "(converter 'torch-onnx')"
        )
    if not path.is_file():
        raise CompressionError(f"ONNX file {path} does not exist")
    return path


def output_path(step: CompressionStep, source: Path, ctx: CompressionContext) -> Path:
    """A file name in the work folder unique to (source, step, parameters), so candidates never collide."""
    key = json.dumps({"src": str(source.resolve()), **step.describe()}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    return ctx.workdir / f"{source.stem}.{step.name}.{digest}.onnx"


def _excluded(params: dict[str, Any]) -> Optional[list[str]]:
    names = list(params.get("nodes_to_exclude") or ())
    return names or None


def _preprocess(source: Path, workdir: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference + basic optimization) into workdir.

    Symbolic shape inference is skipped: it fails on transformer graphs such as MiniLM here, and the
    quantizer needs only ONNX's own shape inference. Falls back to the unprocessed file when it fails.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = workdir / f"{source.stem}.pre.onnx"
    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    except Exception:  # pre-processing is an optimization; the quantizer accepts the raw graph too
        target.unlink(missing_ok=True)
        return source
    return target


def _check_written(path: Path, step: str) -> Path:
    """Load the written file once, so a broken graph fails here with the step's name on it."""
    from edgefleet.converters.errors import ConversionError
    from edgefleet.converters.runners import open_runner

    try:
        open_runner(path)
    except ConversionError as exc:
        path.unlink(missing_ok=True)
        raise CompressionError(f"{step} produced a model onnxruntime cannot load: {exc}") from exc
    return path


@COMPRESSORS.register("ort-dynamic-int8")
class OrtDynamicInt8(CompressionStep):
    """Dynamic INT8: weights quantized once (per channel by default), activations at run time."""

    name = "ort-dynamic-int8"
    requires = Requirements(stage="onnx", precision="int8", runtime="onnxruntime", extras=("onnxruntime",))

    def apply(self, model: Any, ctx: CompressionContext) -> Path:
        """Quantize the ONNX file `model` and return the new file's path."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = _source(model)
        out = output_path(self, source, ctx)
        ctx.report(f"{self.name}: quantizing {source.name}", 0.0)
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=".quant-") as tmp:
            pre = _preprocess(source, Path(tmp)) if self.params.get("preprocess", True) else source
            try:
                quantize_dynamic(
                    str(pre),
                    str(out),
                    op_types_to_quantize=self.params.get("op_types"),
                    per_channel=bool(self.params.get("per_channel", True)),
                    reduce_range=bool(self.params.get("reduce_range", False)),
                    weight_type=QuantType.QUInt8
                    if self.params.get("weight_type") == "quint8"
                    else QuantType.QInt8,
                    nodes_to_exclude=_excluded(self.params),
                )
            except Exception as exc:  # the quantizer raises plain Exceptions for unsupported graphs
                out.unlink(missing_ok=True)
                raise CompressionError(f"{self.name} failed on {source.name}: {exc}") from exc
        ctx.report(f"{self.name}: done", 1.0)
        return _check_written(out, self.name)


class _NpzReader:
    """onnxruntime CalibrationDataReader over the calibration arrays, in batches."""

    def __init__(self, feeds: dict[str, np.ndarray], batch_size: int) -> None:
        self.feeds = feeds
        self.batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        count = len(next(iter(self.feeds.values())))
        for start in range(0, count, self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.feeds.items()}

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        """The next batch, or None when the data is exhausted (the reader protocol)."""
        return next(self._iter, None)

    def rewind(self) -> None:
        """Start again from the first batch (entropy/percentile calibration reads twice)."""
        self._iter = self._batches()


def calibration_feeds(source: Path, calib: dict[str, np.ndarray], max_samples: int) -> dict[str, np.ndarray]:
    """Calibration arrays keyed by the graph's input names, checked against its ranks and dtypes."""
    from edgefleet.converters.runners import open_runner

    if not calib:
        raise CompressionError(
            "static INT8 needs calibration data: pass --calib FILE.npz with an array 'x' of model inputs"
        )
    specs = open_runner(source).inputs
    names = [s.name for s in specs]
    arrays = [calib[n] for n in names] if all(n in calib for n in names) else list(calib.values())
    if len(arrays) != len(specs):
        raise CompressionError(f"the model takes inputs {names}; the calibration data has {list(calib)}")
    feeds: dict[str, np.ndarray] = {}
    for spec, array in zip(specs, arrays):
        if array.ndim != len(spec.shape):
            raise CompressionError(
                f"calibration input {spec.name!r} has shape {array.shape}; the model expects rank "
                f"{len(spec.shape)} {spec.shape}"
            )
        feeds[spec.name] = np.ascontiguousarray(array[:max_samples]).astype(spec.dtype, copy=False)
    return feeds


@COMPRESSORS.register("ort-static-int8")
class OrtStaticInt8(CompressionStep):
    """Static INT8 in QDQ format: weights per channel, activation ranges calibrated on `ctx.calib`."""

    name = "ort-static-int8"
    requires = Requirements(stage="onnx", precision="int8", runtime="onnxruntime", extras=("onnxruntime",))

    def apply(self, model: Any, ctx: CompressionContext) -> Path:
        """Calibrate and quantize the ONNX file `model`; returns the QDQ file's path."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        source = _source(model)
        method = str(self.params.get("calibration", "minmax"))
        if method not in CALIBRATIONS:
            raise CompressionError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")
        feeds = calibration_feeds(source, ctx.calib, int(self.params.get("max_samples", 256)))
        out = output_path(self, source, ctx)
        ctx.report(f"{self.name}: calibrating ({method}) on {len(next(iter(feeds.values())))} samples", 0.0)
        symmetric = bool(self.params.get("symmetric_activations", False))
        with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=".quant-") as tmp:
            pre = _preprocess(source, Path(tmp)) if self.params.get("preprocess", True) else source
            try:
                # The calibrators print histogram summaries to stdout, which would corrupt `--json` output.
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(pre),
                        str(out),
                        _NpzReader(feeds, int(self.params.get("batch_size", 32))),
                        quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=self.params.get("op_types"),
                        per_channel=bool(self.params.get("per_channel", True)),
                        reduce_range=bool(self.params.get("reduce_range", False)),
                        # uint8 activations + int8 weights is what onnxruntime's CPU kernels run fastest.
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=_excluded(self.params),
                        calibrate_method={
                            "minmax": CalibrationMethod.MinMax,
                            "entropy": CalibrationMethod.Entropy,
                            "percentile": CalibrationMethod.Percentile,
                        }[method],
                        extra_options={"ActivationSymmetric": symmetric},
                    )
            except Exception as exc:  # the quantizer raises plain Exceptions for unsupported graphs
                out.unlink(missing_ok=True)
                raise CompressionError(f"{self.name} ({method}) failed on {source.name}: {exc}") from exc
        ctx.report(f"{self.name}: done", 1.0)
        return _check_written(out, self.name)


@COMPRESSORS.register("ort-fp16")
class OrtFloat16(CompressionStep):
    """FP16 weights and compute (onnxruntime's float16 converter); inputs and outputs stay fp32."""

    name = "ort-fp16"
    requires = Requirements(
        stage="onnx", precision="fp16", runtime="onnxruntime", extras=("onnxruntime", "onnx")
    )

    def apply(self, model: Any, ctx: CompressionContext) -> Path:
        """Convert the ONNX file `model` to FP16; returns the new file's path."""
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        source = _source(model)
        out = output_path(self, source, ctx)
        ctx.report(f"{self.name}: converting {source.name}", 0.0)
        try:
            fp16 = convert_float_to_float16(
                onnx.load(str(source)),
                keep_io_types=True,
                node_block_list=_excluded(self.params),
                op_block_list=self.params.get("op_block_list"),
            )
            onnx.save(fp16, str(out))
        except Exception as exc:  # onnx/onnxruntime raise many types for graphs they cannot convert
            out.unlink(missing_ok=True)
            raise CompressionError(f"{self.name} failed on {source.name}: {exc}") from exc
        ctx.report(f"{self.name}: done", 1.0)
        return _check_written(out, self.name)
