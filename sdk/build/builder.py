"""`build`: for one device profile, convert and compress a model into candidates, measure, pick, bundle.

The plan (`sdk/build/plan.py`) lists what the profile can run; each candidate is produced
by the registered converters and compression plug-ins, then measured side by side on this host: size,
accuracy on labelled eval data (or fidelity to the fp32 outputs when there are no labels), host latency
p50/p95 at the profile's batch size and thread count, and the profile's estimated target latency. The
chosen candidate is the one with the lowest `latency/latency_fp32 + size/size_fp32` among those within
the accuracy budget, the profile's size and latency budgets, and no slower than fp32 on this host
beyond the measured noise (a speed inside the noise band is a tie, scored as equal, so the smaller
model wins). A candidate that fails is reported with its reason and the search goes on.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from edgefleet.sdk.build.analysis import check_student_early, resolve_student, sensitivity_report
from edgefleet.sdk.build.bundle_out import write_bundle
from edgefleet.sdk.build.candidate import BuildResult, Candidate
from edgefleet.sdk.build.choose import choose, estimate_target, make_report
from edgefleet.sdk.build.errors import BuildError, DataError
from edgefleet.sdk.build.inputs import (
    as_loaded,
    check_only,
    check_same_rows,
    check_source_early,
    check_torch_accepts,
    synthetic_inputs,
    torch_inputs,
)
from edgefleet.sdk.build.isolate import (
    DEFAULT_CANDIDATE_TIMEOUT_S,
    CandidateFailed,
    InProcess,
    Job,
    WorkData,
    Worker,
    failure_reason,
    load_reference,
    make_runner,
    warm_modules,
)
from edgefleet.sdk.build.isolate_torch import ConversionFailed, ForkedCalls
from edgefleet.sdk.build.measure import build_task, providers_scope, task_scope
from edgefleet.sdk.build.model_io import (
    SOURCE_LABELS,
    DataLike,
    check_model_file,
    fit_to_inputs,
    load_dataset,
    source_kind,
)
from edgefleet.sdk.build.plan import EXPORTERS, PT2_EXPORT, PlanOptions, Step, plan_candidates, source_limits
from edgefleet.sdk.build.plugins import Unavailable, load_plugins
from edgefleet.sdk.build.produce import Producer, known_step_modules, step_module
from edgefleet.sdk.build.profile import host_gpu_providers, resolve_profile, runtime_names
from edgefleet.sdk.build.release import release_version

Progress = Optional[Callable[[str, float], None]]
MAX_EVAL_SAMPLES = 2000


def build(
    model: Any,
    profile: Any,
    *,
    calib: DataLike = None,
    eval: DataLike = None,  # the public name the issue gives; shadows the builtin only here
    max_accuracy_drop: float = 0.01,
    out: Union[str, Path, None] = None,
    input_shape: Optional[list[tuple[int, ...]]] = None,
    plan: PlanOptions = PlanOptions(),
    threads: Optional[int] = None,
    private_key: Any = None,
    progress: Progress = None,
    latency_runs: int = 50,
    overwrite: bool = False,
    workdir: Union[str, Path, None] = None,
    name: str = "model",
    version: Optional[int] = None,
    exporter: Optional[str] = None,
    isolate: bool = True,
    candidate_timeout: float = DEFAULT_CANDIDATE_TIMEOUT_S,
    task: Optional[str] = None,
) -> BuildResult:
    """Build `model` for `profile`; with `out`, write the signed bundle and report.json into that folder.

    `model`: an nn.Module, a torch.export ExportedProgram, or the path of a .pt2 (torch.export, dynamic
    or static batch), TorchScript .pt, .onnx or .tflite file (docs/build.md: what each can become).
    `calib`/`eval`: an .npz path (`x`, optional `y`), an array, `(x, y)` or a dict of named inputs.
    `max_accuracy_drop` is in accuracy (0.01 = one point) with labels, else in fidelity to fp32
    (docs/quality.md); it is also the devices' health floor (the fp32 value less this).
    `private_key`: an Ed25519 key or the path of a PEM file; None uses the fleet key (`edgefleet keys init`).
    `name` is the bundle's model name in the manifest, `version` its release number (default: the
    build time). `exporter`: "auto", "dynamo" or "torchscript" for torch → ONNX (default: dynamo for
    an ExportedProgram, falling back to its module; torchscript otherwise).
    `isolate`: run each candidate's ONNX steps and measurements in a worker process (isolate.py), so a
    native crash or a hang fails that candidate ("crashed (signal 11)", "timed out after N s") and the
    build goes on; `candidate_timeout` is that deadline in seconds. The torch → ONNX and torch → TFLite
    conversions run each in a child forked from this process under the same deadline (isolate_torch.py).
    False runs all of it in this process.
    `task`: classification, detection, ctc, embedding or auto picks the quality metric (docs/quality.md,
    `edgefleet build --task`); None keeps the surrounding `measure.task_scope`, else auto.
    """
    if task is not None:
        # One scope around the whole build: the candidate worker processes read the task from it too.
        arguments = {k: v for k, v in locals().items() if k not in ("model", "profile", "task")}
        with task_scope(checked_task(task)):
            return build(model, profile, **arguments)
    # Everything a user can mistype is checked before the heavy imports (torch takes seconds).
    if not 0 <= max_accuracy_drop < 1:
        raise BuildError(f"--max-accuracy-drop must be in [0, 1) (0.01 = one point), got {max_accuracy_drop}")
    if not candidate_timeout > 0:
        raise BuildError(f"--candidate-timeout must be a positive number of seconds, got {candidate_timeout}")
    if exporter is not None and exporter not in EXPORTERS:
        raise BuildError(f"--exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if version is not None or out is not None:
        version = release_version(version)
    check_student_early(plan)
    prof = resolve_profile(profile)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BuildError(
            f"output folder {out_dir} exists and is not empty; choose a new folder or pass --force"
        )
    if isinstance(model, (str, Path)):
        check_model_file(Path(model))
        check_source_early(source_kind(Path(model)), runtime_names(prof), plan, prof)
    calib_ds = load_dataset(calib, "calibration")
    eval_ds = load_dataset(eval, "eval")
    check_same_rows(calib_ds, eval_ds)

    unavailable = load_plugins()
    loaded = as_loaded(model)
    plan = resolve_student(plan)
    if exporter == "dynamo" and loaded.kind == "torchscript":
        raise BuildError(
            "--exporter dynamo cannot export a TorchScript file; use --exporter torchscript, or save the "
            f"model as .pt2: {PT2_EXPORT}"
        )
    if calib_ds is None and eval_ds is None:
        if input_shape is None:
            raise DataError(
                "no data: pass --calib and/or --eval (.npz with 'x', optional 'y'), or --input-shape"
            )
        calib_ds = eval_ds = synthetic_inputs(input_shape, loaded.stage, loaded.inputs)
    elif calib_ds is None:
        calib_ds = eval_ds
    elif eval_ds is None:
        eval_ds = calib_ds
    if calib_ds is None or eval_ds is None:
        raise DataError("no calibration or eval data could be read")
    if loaded.stage == "torch":
        if loaded.inputs:  # a .pt2 knows its input names and shapes: a mismatch is named without running it
            calib_ds = fit_to_inputs(calib_ds, loaded.inputs, "calibration")
            eval_ds = fit_to_inputs(eval_ds, loaded.inputs, "eval")
        else:
            calib_ds, eval_ds = torch_inputs(calib_ds), torch_inputs(eval_ds)
        check_torch_accepts(loaded.model, calib_ds, "calibration")
        check_torch_accepts(loaded.model, eval_ds, "eval")
    else:
        calib_ds = fit_to_inputs(calib_ds, loaded.inputs, "calibration")
        eval_ds = fit_to_inputs(eval_ds, loaded.inputs, "eval")
    eval_ds = eval_ds.head(MAX_EVAL_SAMPLES)  # inputs, labels and training targets alike

    # A static-batch .pt2 only runs at its own batch: every candidate is made and timed at it.
    batch = int(loaded.static_batch or getattr(prof, "batch_size", 1) or 1)
    use_threads = int(threads or min(int(getattr(prof, "threads", 1) or 1), os.cpu_count() or 1))
    max_mb = getattr(prof, "max_model_mb", None)
    max_bytes = int(max_mb * 1024 * 1024) if max_mb else None
    p95_budget = getattr(prof, "p95_latency_ms", None)
    runtimes = runtime_names(prof)
    limits = [
        Unavailable(what, "source", why)
        for what, why in source_limits(loaded.kind, loaded.stage, runtimes, plan)
    ]
    if loaded.static_batch is not None:
        limits.append(
            Unavailable(
                f"batch {loaded.static_batch}",
                "source",
                f"this .pt2 was exported with a static batch of {loaded.static_batch}: it is built, measured and "
                f"run on devices in chunks of {loaded.static_batch} rows; for any batch re-export it: {PT2_EXPORT}",
            )
        )
    specs = plan_candidates(
        loaded.stage,
        runtimes=runtimes,
        precisions=list(getattr(prof, "precisions", ["fp32"])),
        has_calib=True,
        options=plan,
        source=loaded.kind,
    )
    check_only(plan, specs, loaded, runtimes, prof)
    if not specs:
        raise BuildError(
            f"profile {prof.name!r} runs {runtimes}, and nothing in this installation converts "
            f"{SOURCE_LABELS.get(loaded.kind, loaded.kind)} to those; give a torch model (.pt2 or nn.Module, for "
            "TFLite) or an ONNX file (for onnxruntime)" + "".join(f"\n  {u}" for u in [*limits, *unavailable])
        )
    unavailable = [*limits, *unavailable]

    own_tmp = tempfile.TemporaryDirectory(prefix="edgefleet-build-") if workdir is None else None
    work = Path(own_tmp.name) if own_tmp is not None else Path(workdir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    try:
        calls = ForkedCalls(candidate_timeout, progress, isolate)
        producer = Producer(loaded, calib_ds, eval_ds, work, batch, progress, exporter, calls)
        data = WorkData(work, calib_ds.inputs, calib_ds.labels, eval_ds.inputs, eval_ds.labels)
        step_names = sorted({step.name for spec in specs for step in spec.onnx_steps})
        warm = warm_modules(known_step_modules(step_names), {s.format for s in specs}, bool(step_names))
        # A GPU profile's ONNX candidates are timed on this host's GPU when its onnxruntime has one
        # (the scope reaches the worker processes through their environment); else on the CPU.
        with providers_scope(host_gpu_providers(prof)):
            runner = make_runner(isolate, data, prof, candidate_timeout, progress, warm)
            try:
                candidates, baseline, reference_files = _measure_all(
                    specs,
                    producer,
                    runner,
                    loaded.static_batch,
                    prof,
                    batch,
                    use_threads,
                    latency_runs,
                    progress,
                )
                sensitivity = (
                    sensitivity_report(loaded, calib_ds, candidates, build_task(), progress, runner, batch)
                    if plan.sensitivity
                    else None
                )
            finally:
                runner.close()
        reference = load_reference(reference_files)
        if progress:
            progress("measured every candidate", 1.0)
        if baseline is None:
            raise BuildError("the plan has no fp32 baseline candidate to compare with")
        chosen, reason = choose(
            candidates, baseline, max_accuracy_drop, max_bytes, p95_budget, plan.only, profile=prof
        )
        report = make_report(
            prof,
            baseline,
            candidates,
            chosen,
            reason,
            calib_ds,
            eval_ds,
            max_accuracy_drop,
            max_bytes,
            p95_budget,
            use_threads,
            batch,
            unavailable,
        )
        report["name"], report["version"] = name, version
        if sensitivity is not None:
            report["sensitivity"] = sensitivity
        report["isolation"] = {
            "mode": runner.mode,
            "candidate_timeout_s": candidate_timeout if isolate else None,
            "worker_restarts": runner.restarts,
            "conversions": calls.mode,  # torch → ONNX / TFLite: "fork" (a child each) or "in-process"
            "conversion_crashes": calls.crashes,
            "conversions_unforked": calls.unforked,  # ran in this process: a child would have hung
        }
        bundle_dir = None
        if out_dir is not None:
            bundle_dir = write_bundle(
                out_dir, chosen, prof, eval_ds, reference, report, private_key, name, work, version
            )
        return BuildResult(prof.name, baseline, candidates, chosen, reason, report, bundle_dir, unavailable)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def checked_task(task: str) -> str:
    """`task` as `task_scope` takes it, or a BuildError naming the choices."""
    from edgefleet.agent.core.quality import QualityError, check_task
    from edgefleet.agent.core.quality_tasks import AUTO, TASKS

    try:
        return check_task(task)
    except QualityError:
        raise BuildError(f"task {task!r} is not one of {', '.join((*TASKS, AUTO))}") from None


def _measure_all(
    specs: list[Any],
    producer: Producer,
    runner: Union[Worker, InProcess],
    static_batch: Optional[int],
    prof: Any,
    batch: int,
    threads: int,
    latency_runs: int,
    progress: Progress,
) -> tuple[list[Candidate], Optional[Candidate], tuple[Path, ...]]:
    """Produce every candidate's torch stage here and the rest in `runner`: (candidates, baseline, reference).

    A candidate that fails (an exception here, or a crash, hang or exception in the worker) is recorded
    with its reason and the search goes on; only a failed fp32 baseline stops the build.
    """
    candidates: list[Candidate] = []
    baseline: Optional[Candidate] = None
    reference: tuple[Path, ...] = ()
    for index, spec in enumerate(specs):
        if progress:
            progress(f"candidate {spec.id}", index / len(specs))
        cand = Candidate(spec=spec)
        start = time.perf_counter()
        try:
            path, steps, fixed, pending = producer.prepare(spec)
            cand.steps, cand.fixed_batch = steps, fixed or static_batch
            first = baseline is None or baseline.path is None
            job = Job(
                id=spec.id,
                source=path,
                steps=tuple(pending),
                modules=tuple(dict.fromkeys(step_module(name) for name, _ in pending)),
                baseline=not reference,  # the baseline comes first in every plan
                baseline_path=None if first or baseline is None else baseline.path,
                reference=reference,
                batch_size=batch,
                threads=threads,
                latency_runs=latency_runs,
                precision=spec.precision,
            )
            measured = runner.run(job)
            cand.path, cand.size_bytes = measured.path, measured.size_bytes
            cand.steps = [*steps, *measured.steps]
            cand.quality, cand.latency = measured.quality, measured.latency
            cand.speedup, cand.speedup_noise = measured.speedup, measured.speedup_noise
            # The whole estimate, for the ops it has no cost for (report.json lists them); its figure is
            # the worker's own when the worker estimated. The worker returns only the figure (isolate.py).
            estimate = estimate_target(measured.path, prof, batch, spec.precision) or {}
            cand.estimate_ms = measured.estimate_ms if measured.estimated else estimate.get("estimate_ms")
            cand.unknown_op_types = tuple(estimate.get("unknown_op_types", ()))
            reference = reference or measured.reference
        except (CandidateFailed, ConversionFailed) as exc:
            cand.status, cand.reason = "failed", exc.reason
        except Exception as exc:  # any plug-in failure is reported and the search goes on
            cand.status, cand.reason = "failed", failure_reason(exc)
        if spec.baseline and cand.status == "failed":
            raise BuildError(
                f"the fp32 baseline ({spec.id}) failed, so nothing can be compared: {cand.reason}"
            )
        cand.seconds = time.perf_counter() - start
        if spec.baseline and baseline is None:
            baseline = cand
        candidates.append(cand)
    return candidates, baseline, reference


__all__ = ["BuildResult", "Candidate", "PlanOptions", "Step", "Unavailable", "build"]
