"""The candidates a build tries for a profile: formats × precisions × pruning levels × runtimes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from edgefleet.sdk.compress.base import COMPRESSORS

DEFAULT_PRUNE_LEVELS = (0.3, 0.5)
# torch → ONNX exporters the build can be told to use (`--exporter`); converters/torch_onnx.py runs them.
EXPORTERS = ("auto", "dynamo", "torchscript")
# The one-line re-export that turns a model into a .pt2 with a dynamic batch (messages quote it).
PT2_EXPORT = (
    "torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
    "'model.pt2')"
)
PRUNE_NEEDS_MODULE = (
    "pruned and distilled candidates need the model as a Python nn.Module (edgefleet.sdk.build.build(model, "
    "...)): torch-pruning narrows nn.Conv2d/nn.Linear layers, and {source} holds a graph without them"
)
TFLITE_NEEDS = (
    "litert-torch cannot convert {source} to TFLite; give the model as .pt2 ({export}) or as an nn.Module "
    "through the Python API"
)
STUDENT_NEEDS_TORCH = (
    "a distilled student needs a teacher that runs in torch and can be switched to eval mode (TorchScript "
    ".pt or an nn.Module); {source} cannot be"
)
STUDENT_AUTO_NEEDS_MODULE = (
    "--student auto makes the student from the model's own layers (a shallower transformer or narrower "
    "nn.Conv2d/nn.Linear layers), so it needs the model as a Python nn.Module; {source} holds a graph: "
    "give the model as MODEL.py:NAME (your script that builds it and loads its weights), or your own "
    "student with --student STUDENT.pt (TorchScript: torch.jit.save(torch.jit.script(s), ...)) or "
    "STUDENT.py:NAME"
)
STATIC_CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Step:
    """One plug-in to run: its registry name and parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateSpec:
    """How to produce one candidate: torch-stage steps, the target format, then format-stage steps."""

    id: str
    format: str  # "onnx" or "tflite"
    precision: str  # "fp32", "fp16", "int8", "int8-mixed"
    runtime: str  # "onnxruntime" or "tflite"
    torch_steps: tuple[Step, ...] = ()
    onnx_steps: tuple[Step, ...] = ()
    tflite_quant: Optional[Step] = None  # a torch-stage step that converts straight to .tflite
    baseline: bool = False

    @property
    def variant(self) -> str:
        """Key of the torch model this candidate starts from (shared by candidates with equal steps)."""
        return "+".join(f"{s.name}:{sorted(s.params.items())}" for s in self.torch_steps) or "base"


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the plan: pruning levels, fine-tune epochs, which families to try."""

    prune_levels: tuple[float, ...] = DEFAULT_PRUNE_LEVELS
    finetune_epochs: int = 10
    static_calibrations: tuple[str, ...] = STATIC_CALIBRATIONS
    mixed_precision: bool = True
    tflite: bool = True
    only: tuple[str, ...] = ()  # candidate ids to keep (empty: all)
    # A distilled student candidate: None (none), "auto" (make_student: a shallower copy of a transformer,
    # a narrower copy of anything else), or the student itself (an nn.Module / TorchScript module).
    student: Any = None
    student_epochs: int = 30
    sensitivity: bool = True  # compute and print the per-layer sensitivity table (analysis.py)


def _has(module: str) -> bool:
    from edgefleet.converters.base import unimportable

    return not unimportable([module])


def _onnx_family(
    prefix: str, precisions: set[str], has_calib: bool, calibrations: tuple[str, ...]
) -> list[tuple[str, str, tuple[Step, ...]]]:
    """(id suffix, precision, onnx steps) for one torch variant on onnxruntime."""
    out: list[tuple[str, str, tuple[Step, ...]]] = [
        (f"{prefix}onnx-fp32-opt", "fp32", (Step("onnx-optimize", {"ort_level": "extended"}),))
    ]
    if "fp16" in precisions:
        out.append((f"{prefix}onnx-fp16", "fp16", (Step("ort-fp16"),)))
    if "int8" in precisions:
        out.append((f"{prefix}onnx-int8-dynamic", "int8", (Step("ort-dynamic-int8", {"per_channel": True}),)))
        if has_calib:
            for method in calibrations:
                out.append(
                    (
                        f"{prefix}onnx-int8-static-{method}",
                        "int8",
                        (Step("ort-static-int8", {"calibration": method, "per_channel": True}),),
                    )
                )
    return out


def plan_candidates(
    stage: str,
    *,
    runtimes: list[str],
    precisions: list[str],
    has_calib: bool,
    options: PlanOptions = PlanOptions(),
    source: str = "module",
) -> list[CandidateSpec]:
    """Every candidate worth producing for a model at `stage` on a device with these runtimes/precisions.

    `source` (model_io.SOURCE_KINDS) limits what a torch-stage model can become: only an nn.Module is
    pruned, and a TorchScript file never becomes TFLite (source_limits says why, before any work).
    """
    precision_set = {p.lower() for p in precisions}
    specs: list[CandidateSpec] = []
    if stage == "tflite":
        # A .tflite file cannot be re-quantized without its source; it is measured as given.
        if "tflite" not in runtimes:
            return []
        return [CandidateSpec("tflite-as-given", "tflite", "fp32", "tflite", baseline=True)]
    if "onnxruntime" in runtimes:
        specs.append(CandidateSpec("onnx-fp32", "onnx", "fp32", "onnxruntime", baseline=True))
        for cid, precision, steps in _onnx_family("", precision_set, has_calib, options.static_calibrations):
            specs.append(CandidateSpec(cid, "onnx", precision, "onnxruntime", onnx_steps=steps))
        if options.mixed_precision and "int8" in precision_set and has_calib and "mixed-int8" in COMPRESSORS:
            specs.append(
                CandidateSpec(
                    "onnx-int8-mixed", "onnx", "int8-mixed", "onnxruntime", onnx_steps=(Step("mixed-int8"),)
                )
            )
    prunable = source == "module"
    if (
        stage == "torch"
        and prunable
        and "onnxruntime" in runtimes
        and has_calib
        and "prune-channels" in COMPRESSORS
    ):
        for level in options.prune_levels:
            prune = Step("prune-channels", {"amount": level, "finetune_epochs": options.finetune_epochs})
            tag = f"pruned{round(level * 100)}-"
            specs.append(
                CandidateSpec(
                    f"{tag}onnx-fp32",
                    "onnx",
                    "fp32",
                    "onnxruntime",
                    torch_steps=(prune,),
                    onnx_steps=(Step("onnx-optimize", {"ort_level": "extended"}),),
                )
            )
            if "int8" in precision_set:
                specs.append(
                    CandidateSpec(
                        f"{tag}onnx-int8-static-minmax",
                        "onnx",
                        "int8",
                        "onnxruntime",
                        torch_steps=(prune,),
                        onnx_steps=(Step("ort-static-int8", {"calibration": "minmax", "per_channel": True}),),
                    )
                )
    if (
        stage == "torch"
        and options.student is not None
        and (source == "module" or (source == "torchscript" and not _is_auto(options.student)))
        and "onnxruntime" in runtimes
        and has_calib
        and "student" in COMPRESSORS
    ):
        params: dict[str, Any] = {"epochs": options.student_epochs}
        if not _is_auto(options.student):
            params["student"] = options.student
        distil = Step("student", params)
        specs.append(
            CandidateSpec(
                "student-onnx-fp32",
                "onnx",
                "fp32",
                "onnxruntime",
                torch_steps=(distil,),
                onnx_steps=(Step("onnx-optimize", {"ort_level": "extended"}),),
            )
        )
        if "int8" in precision_set:
            specs.append(
                CandidateSpec(
                    "student-onnx-int8-dynamic",
                    "onnx",
                    "int8",
                    "onnxruntime",
                    torch_steps=(distil,),
                    onnx_steps=(Step("ort-dynamic-int8", {"per_channel": True}),),
                )
            )
    to_tflite = source != "torchscript"
    if stage == "torch" and to_tflite and "tflite" in runtimes and options.tflite and _has("litert_torch"):
        specs.append(
            CandidateSpec("tflite-fp32", "tflite", "fp32", "tflite", baseline="onnxruntime" not in runtimes)
        )
        if "int8" in precision_set:
            specs.append(
                CandidateSpec(
                    "tflite-dynamic-int8", "tflite", "int8", "tflite", tflite_quant=Step("tflite-dynamic")
                )
            )
            if has_calib:
                specs.append(
                    CandidateSpec("tflite-int8", "tflite", "int8", "tflite", tflite_quant=Step("tflite-int8"))
                )
        if "fp16" in precision_set:
            specs.append(
                CandidateSpec("tflite-fp16", "tflite", "fp16", "tflite", tflite_quant=Step("tflite-fp16"))
            )
    if options.only:
        keep = set(options.only)
        specs = [s for s in specs if s.id in keep or s.baseline]
    return specs


def source_limits(
    source: str, stage: str, runtimes: list[str], options: PlanOptions = PlanOptions()
) -> list[tuple[str, str]]:
    """(what, why) for every kind of candidate this profile would get but this source cannot give."""
    from edgefleet.sdk.build.model_io import SOURCE_LABELS

    label = SOURCE_LABELS.get(source, source)
    out: list[tuple[str, str]] = []
    if (
        "tflite" in runtimes
        and options.tflite
        and stage in ("torch", "onnx")
        and source in ("torchscript", "onnx")
    ):
        out.append(("tflite-*", TFLITE_NEEDS.format(source=label, export=PT2_EXPORT)))
    if stage == "tflite" and "onnxruntime" in runtimes:
        out.append(
            (
                "onnx-*",
                f"{label} cannot become ONNX (nothing converts TFLite back); give the model as .pt2 "
                f"({PT2_EXPORT}), as .onnx, or as an nn.Module through the Python API",
            )
        )
    if stage == "torch" and source != "module" and options.prune_levels and "onnxruntime" in runtimes:
        out.append(("pruned*", PRUNE_NEEDS_MODULE.format(source=label)))
    if options.student is not None and "onnxruntime" in runtimes:
        if stage != "torch" or source == "exported":
            out.append(("student-*", STUDENT_NEEDS_TORCH.format(source=label)))
        elif source != "module" and _is_auto(options.student):
            out.append(("student-*", STUDENT_AUTO_NEEDS_MODULE.format(source=label)))
    return out


def _is_auto(student: Any) -> bool:
    return isinstance(student, str) and student == "auto"
