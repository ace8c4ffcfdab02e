"""The build's extras around the candidates: the `--student` model, and the per-layer sensitivity table.

The sensitivity table (sdk/compress/sensitivity.py) ranks the model's conv/linear layers by
S = (L − L_perturbed) / L, each layer perturbed alone. A pruned candidate already computed one (its
ratios came from it), and the build reuses the first; otherwise, for a Python nn.Module, the build
computes one with the seed's perturbation (every weight of the layer set to 0) on at most
SENSITIVITY_SAMPLES calibration rows. `edgefleet build` prints it; report.json keeps it under
`sensitivity` (or the reason it is missing).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from edgefleet.sdk.build.errors import BuildError
from edgefleet.sdk.build.model_io import Dataset, LoadedModel, check_model_file, load_model
from edgefleet.sdk.build.model_script import check_script, script_ref
from edgefleet.sdk.build.plan import PlanOptions

Progress = Optional[Callable[[str, float], None]]
SENSITIVITY_SAMPLES = 256  # one forward pass per layer over these rows: seconds on a CNN, minutes on MiniLM
STUDENT_FILE_HINT = (
    "give the student as TorchScript (torch.jit.save(torch.jit.script(student), 'student.pt')), as "
    "STUDENT.py:NAME (your script that builds it), or as an nn.Module through the Python API "
    "(build(..., plan=PlanOptions(student=module)))"
)


def check_student_early(plan: PlanOptions) -> None:
    """A `--student` path that does not exist or is not a torch file fails before anything heavy runs."""
    student = plan.student
    if isinstance(student, (str, Path)) and script_ref(student) is not None:
        check_script(student)
    elif isinstance(student, (str, Path)) and str(student) != "auto":
        path = Path(student)
        if not path.is_file():
            raise BuildError(f"--student {path}: no such file; {STUDENT_FILE_HINT}, or pass --student auto")
        if path.suffix.lower() not in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
            raise BuildError(f"--student {path.name}: not a TorchScript file; {STUDENT_FILE_HINT}")
        check_model_file(path)


def resolve_student(plan: PlanOptions) -> PlanOptions:
    """`plan` with a `--student` path replaced by the loaded, trainable TorchScript module."""
    student = plan.student
    if student is None:
        return plan
    try:  # registers the "student" step (plugins.COMPRESS_MODULES may not list it)
        importlib.import_module("edgefleet.sdk.compress.student")
    except ImportError as exc:
        raise BuildError(
            f"--student needs edgefleet.sdk.compress.student, which failed to import: {exc}"
        ) from exc
    if not isinstance(student, (str, Path)) or str(student) == "auto":
        return plan
    loaded: LoadedModel = load_model(student if script_ref(student) else Path(student))
    if loaded.kind not in ("torchscript", "module"):
        raise BuildError(
            f"--student {Path(student).name} is a {loaded.kind} model; distillation trains the student, and only "
            f"TorchScript or an nn.Module can be trained: {STUDENT_FILE_HINT}"
        )
    return replace(plan, student=loaded.model)


def sensitivity_report(
    loaded: LoadedModel,
    calib: Dataset,
    candidates: list[Any],
    task: str,
    progress: Progress,
    runner: Any = None,
    batch: int = 1,
) -> dict[str, Any]:
    """The table for report.json: a pruning step's, else one computed (torch layers of an nn.Module here;
    ONNX nodes of the fp32 baseline in `runner`, the build's worker), else why there is none."""
    for cand in candidates:
        for step in cand.steps:
            table = step.get("sensitivity") if isinstance(step, dict) else None
            if table:
                return {"source": f"{step.get('step')} step of {cand.id}", **table}
    if loaded.stage != "torch" or loaded.kind != "module":
        return _onnx_table(candidates, runner, batch)
    try:
        from edgefleet.sdk.compress.sensitivity import torch_sensitivity

        rows = min(len(calib), SENSITIVITY_SAMPLES)
        labels = calib.labels[:rows] if calib.labels is not None else None
        table = torch_sensitivity(
            loaded.model,
            [v[:rows] for v in calib.inputs.values()],
            labels,
            task=task if labels is not None and task != "auto" else "classification",
            perturbation="zero",
            progress=progress,
        )
    except Exception as exc:  # the table is advice: a model it cannot analyse still builds
        text = str(exc).strip()
        return {"unavailable": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]}
    return {"source": f"build, on {rows} calibration rows", **table.to_json()}


def _onnx_table(candidates: list[Any], runner: Any, batch: int) -> dict[str, Any]:
    """Per-node INT8 sensitivity of the fp32 ONNX baseline, computed in the build's worker process."""
    from edgefleet.sdk.build.isolate import CandidateFailed, SensitivityJob

    base = next((c for c in candidates if c.spec.baseline and c.path is not None), None)
    if runner is None or base is None or base.path.suffix != ".onnx":
        return {
            "unavailable": "per-layer sensitivity needs the model as a Python nn.Module (torch layers) or an "
            "ONNX baseline (graph nodes); this build has neither"
        }
    try:
        return dict(runner.sensitivity(SensitivityJob(base.id, base.path, batch_size=batch)))
    except CandidateFailed as exc:
        return {"unavailable": exc.reason}
    except Exception as exc:  # in-process runner: the table is advice, the build goes on
        text = str(exc).strip()
        return {"unavailable": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]}


__all__ = ["SENSITIVITY_SAMPLES", "check_student_early", "resolve_student", "sensitivity_report"]
