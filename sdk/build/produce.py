"""Produce candidate model files: torch variants, ONNX exports and TFLite conversions, each made once."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

from edgefleet.sdk.build.isolate import DEFAULT_CANDIDATE_TIMEOUT_S
from edgefleet.sdk.build.isolate_torch import ForkedCalls
from edgefleet.sdk.build.model_io import (
    Dataset,
    LoadedModel,
)
from edgefleet.sdk.build.plan import CandidateSpec

Progress = Optional[Callable[[str, float], None]]
# ONNX compression steps that feed the graph calibration batches of their `batch_size` parameter.
BATCHED_ONNX_STEPS = ("ort-static-int8", "mixed-int8")


def _inferred_task(model: Any, calib: Dataset, rows: int = 8) -> str:
    """`auto` for the training steps: the scorer's `infer_task` on the torch model's outputs, else `auto`.

    Only a torch model (the torch stage's input) is run; anything that cannot run here leaves `auto`,
    which the steps train as classification, as before tasks existed.
    """
    import torch

    from edgefleet.agent.core.quality_tasks import infer_task
    from edgefleet.sdk.compress.tasks import as_batch, forward, set_mode

    if not isinstance(model, torch.nn.Module):
        return "auto"
    labels = None if calib.labels is None else calib.labels[:rows]
    was_training = model.training
    try:
        set_mode(model, False)  # this look must not update batch-norm statistics
        with torch.no_grad():
            outputs = [
                o.numpy() for o in forward(model, as_batch({k: v[:rows] for k, v in calib.inputs.items()}))
            ]
    except Exception:  # a model that does not run on these rows fails later, with its own error
        return "auto"
    finally:
        set_mode(model, was_training)
    task = infer_task(outputs, labels=labels, reference=outputs if labels is None else None)
    return "auto" if task == "classification" else task


class Producer:
    """Produces candidate files, caching torch variants and ONNX exports shared between candidates."""

    def __init__(
        self,
        loaded: LoadedModel,
        calib: Dataset,
        eval_ds: Dataset,
        workdir: Path,
        batch_size: int,
        progress: Progress,
        exporter: Optional[str] = None,
        calls: Optional[ForkedCalls] = None,
    ) -> None:
        from edgefleet.sdk.build.inputs import compress_targets
        from edgefleet.sdk.build.measure import build_task
        from edgefleet.sdk.compress import CompressionContext

        self.loaded = loaded
        self.calib = calib
        self.workdir = workdir
        self.batch_size = batch_size
        self.exporter = exporter  # None: the converter's default for the source (converters/torch_onnx.py)
        # Conversions load graphs in native runtimes (parity, LiteRT): each runs in a forked child.
        self.calls = calls if calls is not None else ForkedCalls(DEFAULT_CANDIDATE_TIMEOUT_S, progress)
        self.ctx = CompressionContext(
            workdir=workdir / "steps",
            calib=calib.inputs,
            calib_labels=calib.labels,
            eval_inputs=eval_ds.inputs,
            eval_labels=eval_ds.labels,
            progress=progress,
            options={},
        )
        # The build's --task, for the steps that train (distillation, fine-tuning after pruning); with
        # `auto`, the one the scorer infers from the torch model's outputs on a few calibration rows.
        task = build_task()
        if task == "auto":
            task = _inferred_task(loaded.model, calib)
        if task != "auto":
            self.ctx.options["task"] = task
        # The training targets in the form the steps read (CTC lengths, raw-layout detection targets);
        # detection boxes are the scorer's labels, not targets, and give None (teacher targets instead).
        for key, ds in (("calib_targets", calib), ("eval_targets", eval_ds)):
            targets = compress_targets(ds, task)
            if targets is not ds.labels:
                self.ctx.options[key] = targets
        self._variants: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
        self._onnx: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
        self.samples = {k: v[:8] for k, v in calib.inputs.items()}

    def _variant(self, spec: CandidateSpec) -> tuple[Any, list[dict[str, Any]]]:
        """The torch model after the spec's torch-stage steps (pruning), computed once per variant."""
        from edgefleet.sdk.compress import COMPRESSORS

        key = spec.variant
        if key not in self._variants:
            model = self.loaded.model
            described: list[dict[str, Any]] = []
            for step in spec.torch_steps:
                plugin = COMPRESSORS.get(step.name)(**step.params)
                model = plugin.apply(copy.deepcopy(model), self.ctx)
                described.append(plugin.describe())
            self._variants[key] = (model, described)
        return self._variants[key]

    def _onnx_of(self, spec: CandidateSpec) -> tuple[Path, list[dict[str, Any]]]:
        """The fp32 ONNX file of the spec's torch variant (or the given ONNX file)."""
        if self.loaded.stage == "onnx":
            return Path(self.loaded.model), [{"step": "input", "params": {"format": "onnx"}}]
        key = spec.variant
        if key not in self._onnx:
            from edgefleet.converters import CONVERTERS

            model, described = self._variant(spec)
            index = len(self._onnx)
            options: dict[str, Any] = {"exporter": self.exporter} if self.exporter else {}
            converter = CONVERTERS.get("torch-onnx")(**options)
            out, samples = self.workdir / f"variant{index}.onnx", self.samples

            def export(progress: Progress) -> tuple[Any, dict[str, Any]]:
                return converter.convert(model, out, samples), converter.describe()

            result, about = self.calls.call(export, f"{spec.id}: exporting to ONNX")
            self._onnx[key] = (
                result.path,
                [*described, {**about, "parity": result.parity.to_dict(), **result.details}],
            )
        return self._onnx[key]

    def produce(self, spec: CandidateSpec) -> tuple[Path, list[dict[str, Any]], Optional[int]]:
        """Write the candidate's model file; returns (path, steps described, fixed batch)."""
        from edgefleet.converters import CONVERTERS
        from edgefleet.sdk.compress import COMPRESSORS

        if self.loaded.stage == "tflite":
            return Path(self.loaded.model), [{"step": "input", "params": {"format": "tflite"}}], None
        if spec.format == "tflite":
            model, described = self._variant(spec)
            out = self.workdir / f"{spec.id}.tflite"
            ctx, samples = self.ctx, self.samples
            if spec.tflite_quant is not None:
                plugin = COMPRESSORS.get(spec.tflite_quant.name)(
                    batch_size=self.batch_size, **spec.tflite_quant.params
                )

                def quantize(progress: Progress) -> tuple[Any, dict[str, Any]]:
                    ctx.progress = progress  # in the child: its progress goes up the pipe
                    return plugin.apply(model, ctx), plugin.describe()

                path, about = self.calls.call(quantize, f"{spec.id}: converting and quantizing to TFLite")
                return Path(path), [*described, about], self.batch_size
            converter = CONVERTERS.get("torch-tflite")(batch_size=self.batch_size)

            def convert(progress: Progress) -> tuple[Any, dict[str, Any]]:
                return converter.convert(model, out, samples), converter.describe()

            result, about = self.calls.call(convert, f"{spec.id}: converting to TFLite")
            return (
                result.path,
                [*described, {**about, "parity": result.parity.to_dict()}],
                result.fixed_batch,
            )
        path, steps, fixed, pending = self.prepare(spec)
        if not pending:
            return path, steps, fixed
        path, done = apply_onnx_steps(path, spec.id, pending, self.workdir, self.samples, self.ctx)
        return path, [*steps, *done], fixed

    def prepare(
        self, spec: CandidateSpec
    ) -> tuple[Path, list[dict[str, Any]], Optional[int], list[tuple[str, dict[str, Any]]]]:
        """The torch-stage work of a candidate, here: (file, steps described, fixed batch, ONNX steps left).

        The ONNX steps left (quantizers, optimizers) load the graph in onnxruntime; the build runs them in
        its worker process (isolate.py) so that a native crash there fails one candidate, not the build.
        """
        if self.loaded.stage == "tflite" or spec.format == "tflite":
            path, steps, fixed = self.produce(spec)
            return path, steps, fixed, []
        path, described = self._onnx_of(spec)
        pending: list[tuple[str, dict[str, Any]]] = []
        for step in spec.onnx_steps:
            params = dict(step.params)
            if self.loaded.static_batch is not None and step.name in BATCHED_ONNX_STEPS:
                # A static-batch graph takes exactly its batch: calibrate it in batches of that size.
                params["batch_size"] = self.loaded.static_batch
            pending.append((step.name, params))
        return path, list(described), None, pending


def step_module(name: str) -> str:
    """The module that registers the converter or compression step `name` (a worker imports it)."""
    from edgefleet.converters import CONVERTERS
    from edgefleet.sdk.compress import COMPRESSORS

    registry: Any = CONVERTERS if name in CONVERTERS else COMPRESSORS
    return str(registry.get(name).__module__)


def known_step_modules(names: list[str]) -> list[str]:
    """step_module of every registered name; unknown ones fail their candidate later, with the reason."""
    from edgefleet.agent.core.registry import UnknownPluginError

    out = []
    for name in names:
        try:
            out.append(step_module(name))
        except UnknownPluginError:
            continue
    return out


def apply_onnx_steps(
    path: Path,
    candidate_id: str,
    steps: list[tuple[str, dict[str, Any]]],
    workdir: Path,
    samples: dict[str, Any],
    ctx: Any,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run ONNX-stage steps (converters by name, else compression steps) on `path`: (new path, described)."""
    from edgefleet.converters import CONVERTERS
    from edgefleet.sdk.compress import COMPRESSORS

    described: list[dict[str, Any]] = []
    for name, params in steps:
        if name in CONVERTERS:
            converter = CONVERTERS.get(name)(**params)
            result = converter.convert(path, workdir / f"{candidate_id}.onnx", samples)
            path = result.path
            described.append({**converter.describe(), "parity": result.parity.to_dict()})
        else:
            plugin = COMPRESSORS.get(name)(**params)
            path = Path(plugin.apply(path, ctx))
            described.append(plugin.describe())
    return path, described
