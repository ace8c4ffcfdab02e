"""TFLite quantization as compression plug-ins, through litert-torch's quantizers (no TensorFlow needed).

Each step takes a torch module and converts it straight to a quantized `.tflite` file in `ctx.workdir`
(litert-torch quantizes during conversion), returning the file's path:

    TfliteDynamic(batch_size=1)   registered "tflite-dynamic": dynamic-range INT8 (weights INT8,
                                  activations float), litert-torch's `full_dynamic_recipe`.
    TfliteFloat16(batch_size=1)   registered "tflite-fp16": FP16 weights, `full_fp16_recipe`.
    TfliteInt8(batch_size=1, per_channel=True, max_samples=256)
                                  registered "tflite-int8": full INT8 through the PT2E quantizer,
                                  calibrated on `ctx.calib`; integer input/output tensors.

The batch size is fixed at conversion (litert-torch bakes it in); the bundle records it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.sdk.compress.base import (
    COMPRESSORS,
    CompressionContext,
    CompressionError,
    CompressionStep,
    Requirements,
)

_EXTRAS = ("torch", "litert_torch", "ai_edge_litert")


def _calib_inputs(ctx: CompressionContext) -> dict[str, np.ndarray]:
    if not ctx.calib:
        raise CompressionError("TFLite quantization needs calibration inputs: pass --calib FILE.npz with 'x'")
    return ctx.calib


def _out_path(step: CompressionStep, model: Any, ctx: CompressionContext) -> Path:
    """A work-folder file name unique to the model object and the step's parameters."""
    key = json.dumps({"model": id(model), **step.describe()}, sort_keys=True, default=str)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    return ctx.workdir / f"model.{step.name}.{hashlib.sha256(key.encode()).hexdigest()[:8]}.tflite"


class _TfliteStep(CompressionStep):
    """Shared conversion: torch module + quant config → .tflite, with parity-free sanity checks."""

    requires = Requirements(stage="torch", precision="int8", runtime="tflite", extras=_EXTRAS)

    def _quant_config(self, model: Any, args: tuple[Any, ...], ctx: CompressionContext) -> tuple[Any, Any]:
        """(model to convert, litert-torch QuantConfig)."""
        raise CompressionError(f"{self.name} does not define its quantization")

    def apply(self, model: Any, ctx: CompressionContext) -> Path:
        """Convert `model` with this step's quantization; returns the `.tflite` path."""
        missing = self.requires.missing_extras()
        if missing:
            raise CompressionError(f"{self.name} needs {', '.join(missing)}: pip install 'edgefleet[host]'")
        import torch

        from edgefleet.converters.errors import ConversionError
        from edgefleet.converters.runners import open_runner
        from edgefleet.converters.torch_onnx import as_module
        from edgefleet.converters.torch_tflite import quiet_litert

        calib = _calib_inputs(ctx)
        batch = int(self.params.get("batch_size", 1))
        module = as_module(model)
        args = tuple(torch.from_numpy(np.ascontiguousarray(_rows(a, batch))) for a in calib.values())
        out = _out_path(self, model, ctx)
        ctx.report(f"{self.name}: converting", 0.0)
        try:
            import litert_torch

            to_convert, config = self._quant_config(module, args, ctx)
            with quiet_litert():
                edge = litert_torch.convert(to_convert, args, quant_config=config)
                edge.export(str(out))
        except CompressionError:
            raise
        except Exception as exc:  # litert-torch/PT2E raise lowering errors of many kinds
            out.unlink(missing_ok=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompressionError(f"{self.name} failed: {first[:300]}") from exc
        try:
            open_runner(out)
        except ConversionError as exc:
            out.unlink(missing_ok=True)
            raise CompressionError(f"{self.name} wrote a model the interpreter cannot load: {exc}") from exc
        ctx.report(f"{self.name}: done", 1.0)
        return out


def _rows(array: np.ndarray, batch: int) -> np.ndarray:
    """Exactly `batch` rows (repeating the last when there are fewer): the shape baked into the model."""
    if len(array) >= batch:
        return array[:batch]
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])


@COMPRESSORS.register("tflite-dynamic")
class TfliteDynamic(_TfliteStep):
    """Dynamic-range INT8: weights stored INT8, activations stay float."""

    name = "tflite-dynamic"

    def _quant_config(self, model: Any, args: tuple[Any, ...], ctx: CompressionContext) -> tuple[Any, Any]:
        from litert_torch.generative.quantize import quant_recipes

        return model, quant_recipes.full_dynamic_recipe()


@COMPRESSORS.register("tflite-fp16")
class TfliteFloat16(_TfliteStep):
    """FP16 weights (computed in fp16 where the delegate supports it)."""

    name = "tflite-fp16"
    requires = Requirements(stage="torch", precision="fp16", runtime="tflite", extras=_EXTRAS)

    def _quant_config(self, model: Any, args: tuple[Any, ...], ctx: CompressionContext) -> tuple[Any, Any]:
        from litert_torch.generative.quantize import quant_recipes

        return model, quant_recipes.full_fp16_recipe()


@COMPRESSORS.register("tflite-int8")
class TfliteInt8(_TfliteStep):
    """Full INT8 through PT2E: symmetric weights (per channel by default), calibrated activations."""

    name = "tflite-int8"

    def _quant_config(self, model: Any, args: tuple[Any, ...], ctx: CompressionContext) -> tuple[Any, Any]:
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=bool(self.params.get("per_channel", True)))
        )
        prepared = prepare_pt2e(torch.export.export(model, args).module(), quantizer)
        move_exported_model_to_eval(prepared)
        calib = _calib_inputs(ctx)
        batch = len(args[0])
        total = min(len(next(iter(calib.values()))), int(self.params.get("max_samples", 256)))
        with torch.no_grad():
            for start in range(0, total - batch + 1, batch):
                prepared(
                    *(
                        torch.from_numpy(np.ascontiguousarray(a[start : start + batch]))
                        for a in calib.values()
                    )
                )
                ctx.report(f"{self.name}: calibrating", start / max(total, 1))
        converted = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(converted)
        return converted, QuantConfig(pt2e_quantizer=quantizer)
