"""A build's inputs made ready: the model loaded, data named and typed for it, or synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.sdk.build.errors import DataError, ModelLoadError
from edgefleet.sdk.build.model_io import (
    Dataset,
    LoadedModel,
    load_model,
)


def as_loaded(model: Any) -> LoadedModel:
    """A torch module/ExportedProgram as given, or a model file loaded with clear errors."""
    if isinstance(model, (str, Path)):
        return load_model(model)
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError("building from a Python model object needs torch installed") from exc
    if isinstance(model, torch.export.ExportedProgram):
        return LoadedModel(stage="torch", model=model.module())
    if isinstance(model, torch.nn.Module):
        return LoadedModel(stage="torch", model=model.eval())
    raise ModelLoadError(
        f"cannot build from a {type(model).__name__}; pass a torch nn.Module, an ExportedProgram, or the path "
        "of a .pt/.pt2/.onnx/.tflite file"
    )


def torch_inputs(ds: Dataset) -> Dataset:
    """Name a single 'x' array "input" and cast float64 to float32 (torch's default dtype)."""
    inputs = {("input" if k == "x" else k): v for k, v in ds.inputs.items()}
    inputs = {
        k: (v.astype(np.float32) if v.dtype == np.float64 else np.ascontiguousarray(v))
        for k, v in inputs.items()
    }
    return Dataset(inputs, ds.labels)


def check_torch_accepts(module: Any, ds: Dataset, role: str) -> None:
    """Run the model on two samples so a shape/dtype mismatch surfaces as a DataError, not deep inside."""
    from edgefleet.converters.torch_onnx import torch_outputs

    try:
        torch_outputs(module, {k: v[:2] for k, v in ds.inputs.items()})
    except Exception as exc:  # torch raises RuntimeError/TypeError for mismatched inputs
        shapes = {k: (v.shape, str(v.dtype)) for k, v in ds.inputs.items()}
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the model does not accept the {role} data {shapes}: {first}; check the shape (batch first) and "
            "dtype of the arrays"
        ) from exc


def synthetic_inputs(input_shape: list[tuple[int, ...]], stage: str, specs: list[Any]) -> Dataset:
    """Random inputs of the given shapes (fidelity only) when the user gave no data."""
    rng = np.random.default_rng(0)
    names = (
        [s.name for s in specs]
        if specs
        else (["input"] if len(input_shape) == 1 else [f"input_{i}" for i in range(len(input_shape))])
    )
    if len(names) != len(input_shape):
        raise DataError(
            f"--input-shape gives {len(input_shape)} shapes; the model takes {len(names)} inputs {names}"
        )
    count = 64
    arrays = {}
    for name, shape in zip(names, input_shape):
        arrays[name] = rng.random((count, *shape[1:]), dtype=np.float32)
    return Dataset(arrays)
