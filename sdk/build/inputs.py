"""A build's inputs made ready: the model loaded, data named and typed for it, or synthetic data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgefleet.sdk.build.errors import BuildError, DataError, ModelLoadError
from edgefleet.sdk.build.model_io import (
    Dataset,
    LoadedModel,
    exported_source,
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
        return exported_source(model)
    if isinstance(model, torch.jit.ScriptModule):
        return LoadedModel(stage="torch", model=model.eval(), kind="torchscript")
    if isinstance(model, torch.nn.Module):
        return LoadedModel(stage="torch", model=model.eval(), kind="module")
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
    return replace(ds, inputs=inputs)


def compress_targets(ds: Dataset, task: str) -> Any:
    """The targets the compression steps that train read (ctx.options["calib_targets"] / ["eval_targets"]).

    The form sdk/compress/distill.split_data gives: labels `y` with `y_lengths` as {"y", "y_lengths"}
    (CTC); `y_0`, `y_1`, … as a list in that order (detection targets in the model's raw output layout);
    else the labels themselves (class ids, CTC tokens, target embeddings). Detection labels (N, G, 5) are
    post-NMS boxes for the scorer, not a raw-layout target: None then, so the steps use the teacher.
    """
    if "y_lengths" in ds.targets:
        return {"y": ds.labels, "y_lengths": ds.targets["y_lengths"]}
    numbered = sorted((k for k in ds.targets if k[2:].isdigit()), key=lambda k: int(k[2:]))
    if numbered:
        return [ds.targets[k] for k in numbered]
    if task == "detection" or (ds.labels is not None and ds.labels.ndim == 3 and ds.labels.shape[2] == 5):
        return None
    return ds.labels


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


def check_same_rows(calib: Optional[Dataset], eval_ds: Optional[Dataset]) -> None:
    """Calibration and eval data must name the same inputs with the same row shapes (numpy only, fast)."""
    if calib is None or eval_ds is None:
        return
    if sorted(calib.inputs) != sorted(eval_ds.inputs):
        raise DataError(
            f"the calibration data has arrays {sorted(calib.inputs)} and the eval data {sorted(eval_ds.inputs)}; "
            "save the same input names in both .npz files"
        )
    for key, array in calib.inputs.items():
        other = eval_ds.inputs[key]
        if array.shape[1:] != other.shape[1:]:
            raise DataError(
                f"input {key!r} has rows of shape {array.shape[1:]} in the calibration data but "
                f"{other.shape[1:]} in the eval data; both must match the model's input (batch first)"
            )


def check_only(plan: Any, specs: list[Any], loaded: LoadedModel, runtimes: list[str], prof: Any) -> None:
    """Refuse `--only` ids this source or profile cannot give, before any work, saying which source can."""
    if not plan.only:
        return
    from edgefleet.sdk.build.plan import plan_candidates, source_limits

    have = {s.id for s in specs}
    missing = [cid for cid in plan.only if cid not in have]
    if not missing:
        return
    everything = plan_candidates(
        "torch",
        runtimes=runtimes,
        precisions=list(getattr(prof, "precisions", ["fp32"])),
        has_calib=True,
        options=replace(plan, only=()),
        source="module",
    )
    possible = {s.id for s in everything}
    limits = source_limits(loaded.kind, loaded.stage, runtimes, replace(plan, only=()))
    if any(cid in have for cid in plan.only) and not any(
        cid.startswith(what.rstrip("*")) for cid in missing for what, _ in limits
    ):
        return  # a list shared between profiles: ids another profile has are skipped here
    lines = []
    for cid in missing:
        why = [reason for what, reason in limits if cid.startswith(what.rstrip("*"))]
        if why:
            lines.append(f"--only {cid}: {why[0]}")
        elif cid in possible:
            lines.append(f"--only {cid}: not possible from this source ({loaded.kind})")
        else:
            lines.append(
                f"--only {cid}: no such candidate for profile {prof.name!r}; its candidates are "
                f"{', '.join(sorted(have | possible))}"
            )
    raise BuildError("\n".join(lines))


def check_source_early(kind: str, runtimes: list[str], plan: Any, prof: Any) -> None:
    """Before torch loads: refuse `--only` ids and profiles this kind of source cannot give at all."""
    from edgefleet.sdk.build.plan import source_limits

    stage = kind if kind in ("onnx", "tflite") else "torch"
    limits = source_limits(kind, stage, runtimes, replace(plan, only=()))
    for cid in plan.only:
        for what, why in limits:
            if cid.startswith(what.rstrip("*")):
                raise BuildError(f"--only {cid}: {why}")
    reasons = dict(limits)
    if runtimes == ["tflite"] and "tflite-*" in reasons:
        raise BuildError(f"profile {prof.name!r} runs only TFLite, and {reasons['tflite-*']}")
    if "tflite" not in runtimes and "onnx-*" in reasons:
        raise BuildError(
            f"profile {prof.name!r} runs {', '.join(runtimes)}, not TFLite, and {reasons['onnx-*']}"
        )
