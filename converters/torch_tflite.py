"""torch → TFLite through litert-torch (no TensorFlow needed); the batch size is fixed at conversion."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.converters.base import CONVERTERS, ConversionError, ConversionResult, Converter, short_reason
from edgefleet.converters.parity import ParityTolerance, check_parity, compare_many
from edgefleet.converters.runners import named_feeds, open_runner
from edgefleet.converters.torch_onnx import as_module, exported_batch, torch_outputs


def quiet_litert() -> contextlib.AbstractContextManager[Any]:
    """Silence litert-torch's progress log lines (it prints a dozen per conversion to stdout)."""
    return contextlib.redirect_stdout(io.StringIO())


@CONVERTERS.register("torch-tflite")
class TorchToTflite(Converter):
    """Convert a torch module to a `.tflite` file with litert-torch and check parity in the interpreter.

    litert-torch bakes the sample inputs' batch size into the model; the result records it in
    `fixed_batch` (and the bundle manifest does too). Option `quant_config`: a litert-torch
    `QuantConfig` (the TFLite quantization plug-ins pass one); `batch_size` overrides the batch taken
    from the sample inputs.
    """

    name = "torch-tflite"
    source = "torch"
    target = "tflite"
    requires = ("torch", "litert_torch", "ai_edge_litert")
    default_tolerance = ParityTolerance(atol=1e-4, rtol=1e-3, min_agreement=0.99, min_fidelity_row=0.9999)

    def convert(self, model: Any, out_path: Path, sample_inputs: dict[str, np.ndarray]) -> ConversionResult:
        """Convert `model` into `out_path`; parity is measured on every sample input."""
        self.check_available()
        import torch

        if not sample_inputs:
            raise ConversionError("torch → TFLite needs at least one sample input")
        if type(model).__name__ == "RecursiveScriptModule":
            raise ConversionError(
                "litert-torch cannot convert a TorchScript model to TFLite; give the model as .pt2 "
                "(torch.export.save(torch.export.export(model, (x,)), 'model.pt2')) or as an nn.Module"
            )
        module = as_module(model)  # an ExportedProgram converts through ep.module()
        total = len(next(iter(sample_inputs.values())))
        # A static-batch .pt2 only runs at its own batch, so that is the TFLite model's batch too.
        batch = int(exported_batch(model) or self.options.get("batch_size") or total)
        if batch < 1:
            raise ConversionError(f"batch_size must be ≥ 1, got {batch}")
        example = tuple(
            torch.from_numpy(np.ascontiguousarray(_fit(a, batch))) for a in sample_inputs.values()
        )
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        quant_config: Optional[Any] = self.options.get("quant_config")
        reference = torch_outputs(model, sample_inputs)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        try:
            import litert_torch

            with quiet_litert():
                edge = litert_torch.convert(module, example, quant_config=quant_config)
                edge.export(str(tmp))
        except Exception as exc:  # litert-torch raises lowering/MLIR errors of many kinds
            tmp.unlink(missing_ok=True)
            raise ConversionError(
                f"torch → TFLite (litert-torch) failed: {short_reason(exc)}. If an operator is "
                "unsupported, build for the ONNX format instead"
            ) from exc
        try:
            runner = open_runner(tmp, threads=1, runtime="tflite")
            got = runner.run(named_feeds(runner, sample_inputs))
            parity = compare_many(reference, got)
            check_parity(parity, self.tolerance, "torch → TFLite")
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out_path)
        runner = open_runner(out_path, threads=1, runtime="tflite")
        return ConversionResult(
            path=out_path,
            parity=parity,
            format="tflite",
            inputs=runner.inputs,
            outputs=runner.outputs,
            fixed_batch=batch,
            details={"batch_size": batch, "quantized": quant_config is not None},
        )


def _fit(array: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` rows, repeating the last when there are fewer (only shapes matter for export)."""
    if len(array) >= batch:
        return array[:batch]
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])
