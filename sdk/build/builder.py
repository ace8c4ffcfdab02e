"""`build`: for one device profile, convert and compress a model into candidates, measure, pick, bundle.

The plan (see `build_plan.plan_candidates`) lists what the profile can run; each candidate is produced
by the registered converters and compression plug-ins, then measured side by side on this host: size,
accuracy on labelled eval data (or fidelity to the fp32 outputs when there are no labels), host latency
p50/p95 at the profile's batch size and thread count, and the profile's estimated target latency. The
chosen candidate is the one with the lowest `latency/latency_fp32 + size/size_fp32` among those within
the accuracy budget, the profile's size and latency budgets, and no slower than fp32 on this host.
A candidate that fails is reported with its reason and the search goes on.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from edgefleet.sdk.build.errors import BudgetError, BuildError, DataError, ModelLoadError, ProfileError
from edgefleet.sdk.build.plan import CandidateSpec, PlanOptions, Step, plan_candidates
from edgefleet.sdk.build.measure import (
    LatencyStats,
    Quality,
    evaluate,
    measure_latency,
    measure_side_by_side,
    run_model,
)
from edgefleet.sdk.build.model_io import DataLike, Dataset, LoadedModel, fit_to_inputs, load_dataset, load_model

Progress = Optional[Callable[[str, float], None]]
MAX_EVAL_SAMPLES = 2000
BUNDLE_EVAL_SAMPLES = 256


@dataclass
class Candidate:
    """One produced (or failed) candidate with everything measured about it."""

    spec: CandidateSpec
    steps: list[dict[str, Any]] = field(default_factory=list)
    path: Optional[Path] = None
    size_bytes: Optional[int] = None
    quality: Optional[Quality] = None
    accuracy_drop: Optional[float] = None
    latency: Optional[LatencyStats] = None
    estimate_ms: Optional[float] = None
    fixed_batch: Optional[int] = None
    status: str = "ok"  # ok | failed | over-budget
    reason: str = ""
    seconds: float = 0.0
    score: Optional[float] = None
    speedup: Optional[float] = None  # fp32 p50 / this p50, timed in alternation with the fp32 baseline

    @property
    def id(self) -> str:
        """The candidate's id in the plan (e.g. "onnx-int8-static-minmax")."""
        return self.spec.id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "id": self.id,
            "format": self.spec.format,
            "precision": self.spec.precision,
            "runtime": self.spec.runtime,
            "baseline": self.spec.baseline,
            "steps": self.steps,
            "size_bytes": self.size_bytes,
            "quality": self.quality.to_dict() if self.quality else None,
            "accuracy_drop": self.accuracy_drop,
            "host_latency_ms": (
                {"p50": self.latency.p50_ms, "p95": self.latency.p95_ms, **self.latency.to_dict()}
                if self.latency
                else None
            ),
            "estimated_target_latency_ms": self.estimate_ms,
            "speedup_vs_fp32": self.speedup,
            "fixed_batch": self.fixed_batch,
            "status": self.status,
            "reason": self.reason,
            "score": self.score,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class BuildResult:
    """What a build produced: every candidate, the chosen one and why, the report, the bundle folder."""

    profile: str
    baseline: Candidate
    candidates: list[Candidate]
    chosen: Candidate
    reason: str
    report: dict[str, Any]
    bundle_dir: Optional[Path] = None


def load_plugins() -> None:
    """Import every converter and compression plug-in module so the registries know them."""
    import importlib

    import edgefleet.converters  # noqa: F401  (registers the converters)

    for name in ("ort_quant", "tflite_quant", "prune", "mixed_precision", "distill", "transfer"):
        try:
            importlib.import_module(f"edgefleet.sdk.compress.{name}")
        except ImportError:
            # A plug-in whose module is absent is simply not offered by the plan.
            continue


def _resolve_profile(profile: Any) -> Any:
    """A Profile object from a name, a TOML path, or a Profile itself."""
    if not isinstance(profile, (str, Path)):
        return profile
    try:
        from edgefleet.device_profiles import load_profile
    except ImportError as exc:
        raise ProfileError(
            f"cannot load device profile {str(profile)!r}: edgefleet.device_profiles is not available in this installation"
        ) from exc
    try:
        return load_profile(str(profile))
    except Exception as exc:  # the loader's own error types: unknown name, bad TOML, schema errors
        raise ProfileError(f"{exc}") from exc


def _runtime_names(profile: Any) -> list[str]:
    """The profile's runtimes reduced to the plan's two families: "onnxruntime" and "tflite"."""
    names = profile.runtime_names() if hasattr(profile, "runtime_names") else list(profile.runtimes)
    out: list[str] = []
    for raw in names:
        # Profiles name execution providers/delegates (onnxruntime-cuda, tflite-xnnpack); the file
        # format and runtime package are what the plan chooses between.
        family = (
            "onnxruntime"
            if str(raw).startswith("onnxruntime")
            else "tflite"
            if str(raw).startswith(("tflite", "litert"))
            else str(raw)
        )
        if family not in out:
            out.append(family)
    return out


def _as_loaded(model: Any) -> LoadedModel:
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


def _torch_inputs(ds: Dataset) -> Dataset:
    """Name a single 'x' array "input" and cast float64 to float32 (torch's default dtype)."""
    inputs = {("input" if k == "x" else k): v for k, v in ds.inputs.items()}
    inputs = {
        k: (v.astype(np.float32) if v.dtype == np.float64 else np.ascontiguousarray(v))
        for k, v in inputs.items()
    }
    return Dataset(inputs, ds.labels)


def _check_torch_accepts(module: Any, ds: Dataset, role: str) -> None:
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


def _synthetic(input_shape: list[tuple[int, ...]], stage: str, specs: list[Any]) -> Dataset:
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


class _Producer:
    """Produces candidate files, caching torch variants and ONNX exports shared between candidates."""

    def __init__(
        self,
        loaded: LoadedModel,
        calib: Dataset,
        eval_ds: Dataset,
        workdir: Path,
        batch_size: int,
        progress: Progress,
    ) -> None:
        from edgefleet.sdk.compress import CompressionContext

        self.loaded = loaded
        self.calib = calib
        self.workdir = workdir
        self.batch_size = batch_size
        self.ctx = CompressionContext(
            workdir=workdir / "steps",
            calib=calib.inputs,
            calib_labels=calib.labels,
            eval_inputs=eval_ds.inputs,
            eval_labels=eval_ds.labels,
            progress=progress,
        )
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
            converter = CONVERTERS.get("torch-onnx")()
            result = converter.convert(model, self.workdir / f"variant{index}.onnx", self.samples)
            self._onnx[key] = (
                result.path,
                [*described, {**converter.describe(), "parity": result.parity.to_dict(), **result.details}],
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
            if spec.tflite_quant is not None:
                plugin = COMPRESSORS.get(spec.tflite_quant.name)(
                    batch_size=self.batch_size, **spec.tflite_quant.params
                )
                path = plugin.apply(model, self.ctx)
                return Path(path), [*described, plugin.describe()], self.batch_size
            converter = CONVERTERS.get("torch-tflite")(batch_size=self.batch_size)
            result = converter.convert(model, out, self.samples)
            return (
                result.path,
                [*described, {**converter.describe(), "parity": result.parity.to_dict()}],
                result.fixed_batch,
            )
        path, described = self._onnx_of(spec)
        steps = list(described)
        for step in spec.onnx_steps:
            if step.name in CONVERTERS:
                converter = CONVERTERS.get(step.name)(**step.params)
                result = converter.convert(path, self.workdir / f"{spec.id}.onnx", self.samples)
                path = result.path
                steps.append({**converter.describe(), "parity": result.parity.to_dict()})
            else:
                plugin = COMPRESSORS.get(step.name)(**step.params)
                path = Path(plugin.apply(path, self.ctx))
                steps.append(plugin.describe())
        return path, steps, None


def _estimate(path: Path, profile: Any, batch: int, precision: str) -> Optional[float]:
    """The profile's target latency estimate, when the estimator is installed and knows the model."""
    try:
        from edgefleet.sdk.build.estimate import estimate_latency
    except ImportError:
        return None
    try:
        return float(estimate_latency(path, profile, batch_size=batch, precision=precision).estimate_ms)
    except Exception:  # an estimate is advisory; a model the estimator cannot read gets none
        return None


def _budget_reasons(
    cand: Candidate,
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95_budget: Optional[float],
) -> list[str]:
    """Why a measured candidate is over budget (empty when it fits)."""
    reasons = []
    if cand.accuracy_drop is not None and cand.accuracy_drop > max_drop + 1e-12:
        unit = "accuracy" if cand.quality and cand.quality.metric == "accuracy" else "1 − cosine"
        reasons.append(f"{unit} drop {cand.accuracy_drop:.4f} > budget {max_drop:.4f}")
    if max_bytes is not None and cand.size_bytes is not None and cand.size_bytes > max_bytes:
        reasons.append(f"size {cand.size_bytes / 1e6:.2f} MB > profile limit {max_bytes / 1e6:.2f} MB")
    if p95_budget is not None and cand.estimate_ms is not None and cand.estimate_ms > p95_budget:
        reasons.append(
            f"estimated target latency {cand.estimate_ms:.2f} ms > profile p95 budget {p95_budget:.2f} ms"
        )
    if cand is not baseline and cand.speedup is not None and cand.speedup < 1.0:
        reasons.append(
            f"slower than fp32 on this host ({cand.speedup:.2f}× its speed at batch "
            f"{cand.latency.batch_size if cand.latency else '?'}, timed side by side)"
        )
    return reasons


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
) -> BuildResult:
    """Build `model` for `profile`; with `out`, write the signed bundle and report.json into that folder.

    `calib`/`eval`: an .npz path (`x`, optional `y`), an array, `(x, y)` or a dict of named inputs.
    `max_accuracy_drop` is in accuracy (0.01 = one point) with labels, else in 1 − mean cosine to fp32.
    `private_key`: an Ed25519 key or the path of a PEM file; None uses the fleet key (`edgefleet keys init`).
    `name` is the bundle's model name in the manifest.
    """
    if not 0 <= max_accuracy_drop < 1:
        raise BuildError(f"--max-accuracy-drop must be in [0, 1) (0.01 = one point), got {max_accuracy_drop}")
    load_plugins()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BuildError(
            f"output folder {out_dir} exists and is not empty; choose a new folder or pass --force"
        )
    loaded = _as_loaded(model)
    calib_ds = load_dataset(calib, "calibration")
    eval_ds = load_dataset(eval, "eval")
    if calib_ds is None and eval_ds is None:
        if input_shape is None:
            raise DataError(
                "no data: pass --calib and/or --eval (.npz with 'x', optional 'y'), or --input-shape"
            )
        calib_ds = eval_ds = _synthetic(input_shape, loaded.stage, loaded.inputs)
    elif calib_ds is None:
        calib_ds = eval_ds
    elif eval_ds is None:
        eval_ds = calib_ds
    if calib_ds is None or eval_ds is None:
        raise DataError("no calibration or eval data could be read")
    if loaded.stage == "torch":
        calib_ds, eval_ds = _torch_inputs(calib_ds), _torch_inputs(eval_ds)
        _check_torch_accepts(loaded.model, calib_ds, "calibration")
        _check_torch_accepts(loaded.model, eval_ds, "eval")
    else:
        calib_ds = fit_to_inputs(calib_ds, loaded.inputs, "calibration")
        eval_ds = fit_to_inputs(eval_ds, loaded.inputs, "eval")
    eval_ds = Dataset(
        {k: v[:MAX_EVAL_SAMPLES] for k, v in eval_ds.inputs.items()},
        None if eval_ds.labels is None else eval_ds.labels[:MAX_EVAL_SAMPLES],
    )

    # The profile is resolved after the model and data, so their errors come first and do not depend on it.
    prof = _resolve_profile(profile)
    batch = int(getattr(prof, "batch_size", 1) or 1)
    use_threads = int(threads or min(int(getattr(prof, "threads", 1) or 1), os.cpu_count() or 1))
    max_mb = getattr(prof, "max_model_mb", None)
    max_bytes = int(max_mb * 1024 * 1024) if max_mb else None
    p95_budget = getattr(prof, "p95_latency_ms", None)
    specs = plan_candidates(
        loaded.stage,
        runtimes=_runtime_names(prof),
        precisions=list(getattr(prof, "precisions", ["fp32"])),
        has_calib=True,
        options=plan,
    )
    if not specs:
        raise BuildError(
            f"profile {prof.name!r} runs {_runtime_names(prof)}, and nothing in this installation converts a "
            f"{loaded.stage} model to those; give a torch model (for TFLite) or an ONNX file (for onnxruntime)"
        )

    own_tmp = tempfile.TemporaryDirectory(prefix="edgefleet-build-") if workdir is None else None
    work = Path(own_tmp.name) if own_tmp is not None else Path(workdir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    try:
        producer = _Producer(loaded, calib_ds, eval_ds, work, batch, progress)
        candidates: list[Candidate] = []
        reference: Optional[list[np.ndarray]] = None
        baseline: Optional[Candidate] = None
        for index, spec in enumerate(specs):
            if progress:
                progress(f"candidate {spec.id}", index / len(specs))
            cand = Candidate(spec=spec)
            start = time.perf_counter()
            try:
                path, steps, fixed = producer.produce(spec)
                cand.path, cand.steps, cand.fixed_batch = path, steps, fixed
                cand.size_bytes = path.stat().st_size
                outputs = run_model(path, eval_ds.inputs, threads=use_threads)
                if reference is None:
                    reference = outputs  # the baseline comes first in every plan
                cand.quality = evaluate(outputs, labels=eval_ds.labels, reference=reference)
                if baseline is None or baseline.path is None:
                    cand.latency = measure_latency(
                        path, eval_ds.inputs, batch_size=batch, threads=use_threads, runs=latency_runs
                    )
                    cand.speedup = 1.0
                else:
                    base_stats, cand.latency = measure_side_by_side(
                        baseline.path,
                        path,
                        eval_ds.inputs,
                        batch_size=batch,
                        threads=use_threads,
                        runs=latency_runs,
                    )
                    cand.speedup = base_stats.p50_ms / cand.latency.p50_ms
                cand.estimate_ms = _estimate(path, prof, batch, spec.precision)
            except Exception as exc:  # any plug-in failure is reported and the search goes on
                cand.status = "failed"
                cand.reason = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[
                        :500
                    ]
                )
                if spec.baseline:
                    raise BuildError(
                        f"the fp32 baseline ({spec.id}) failed, so nothing can be compared: {cand.reason}"
                    ) from exc
            cand.seconds = time.perf_counter() - start
            if spec.baseline and baseline is None:
                baseline = cand
            candidates.append(cand)
        if progress:
            progress("measured every candidate", 1.0)
        if baseline is None:
            raise BuildError("the plan has no fp32 baseline candidate to compare with")
        chosen, reason = _choose(candidates, baseline, max_accuracy_drop, max_bytes, p95_budget)
        report = _report(
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
        )
        bundle_dir = None
        if out_dir is not None:
            bundle_dir = _write_bundle(
                out_dir, chosen, prof, eval_ds, reference, report, private_key, name, work
            )
        return BuildResult(prof.name, baseline, candidates, chosen, reason, report, bundle_dir)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def _choose(
    candidates: list[Candidate],
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95: Optional[float],
) -> tuple[Candidate, str]:
    """Mark every measured candidate ok/over-budget, then pick the lowest latency+size score."""
    if baseline.quality is None or baseline.latency is None or not baseline.size_bytes:
        raise BuildError(f"the fp32 baseline ({baseline.id}) was not measured: {baseline.reason}")
    base_value = baseline.quality.value
    for cand in candidates:
        if cand.status == "failed" or cand.quality is None:
            continue
        if cand.quality.metric == "accuracy":
            cand.accuracy_drop = base_value - cand.quality.value
        else:
            cand.accuracy_drop = 1.0 - cand.quality.value
        reasons = _budget_reasons(cand, baseline, max_drop, max_bytes, p95)
        if cand.speedup and cand.size_bytes:
            # Latency ratio from the side-by-side timing, size ratio from the files: equal weights.
            cand.score = 1.0 / cand.speedup + cand.size_bytes / baseline.size_bytes
        if reasons:
            cand.status, cand.reason = "over-budget", "; ".join(reasons)
        else:
            cand.status, cand.reason = "ok", "within every budget"
    ok = [c for c in candidates if c.status == "ok" and c.score is not None]
    if not ok:
        ranked = (
            sorted(
                [c for c in candidates if c.status != "failed"],
                key=lambda c: (c.accuracy_drop or 0.0, c.score or 9e9),
            )[:3]
            + [c for c in candidates if c.status == "failed"][:2]
        )
        lines = "\n".join(f"  - {c.id}: {c.status}: {c.reason}" for c in ranked)
        raise BudgetError(
            f"no candidate meets the budgets (max accuracy drop {max_drop}); closest candidates:\n{lines}\n"
            "Raise --max-accuracy-drop, choose a bigger profile, or give more calibration data.",
            [c.to_dict() for c in ranked],
        )
    chosen = min(ok, key=lambda c: (c.score or 0.0, c.accuracy_drop or 0.0))
    p50 = chosen.latency.p50_ms if chosen.latency else float("nan")
    size = chosen.size_bytes or 0
    reason = (
        f"lowest latency+size score among {len(ok)} candidates within budget: p50 {p50:.3f} ms "
        f"({chosen.speedup or 1.0:.2f}× fp32's speed side by side), size {size / baseline.size_bytes:.2f}× "
        f"fp32, {'accuracy' if chosen.quality and chosen.quality.metric == 'accuracy' else '1 − cosine'} drop "
        f"{chosen.accuracy_drop or 0.0:.4f} ≤ {max_drop}"
    )
    return chosen, reason


def _profile_dict(prof: Any) -> dict[str, Any]:
    keys = (
        "name",
        "cores",
        "threads",
        "precisions",
        "max_model_mb",
        "p95_latency_ms",
        "batch_size",
        "sustained_gflops",
    )
    out = {k: getattr(prof, k) for k in keys if hasattr(prof, k)}
    out["runtimes"] = _runtime_names(prof)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _report(
    prof: Any,
    baseline: Candidate,
    candidates: list[Candidate],
    chosen: Candidate,
    reason: str,
    calib: Dataset,
    eval_ds: Dataset,
    max_drop: float,
    max_bytes: Optional[int],
    p95: Optional[float],
    threads: int,
    batch: int,
) -> dict[str, Any]:
    """report.json's content (DESIGN.md "Machine-readable outputs")."""
    return {
        "schema": 1,
        "profile": _profile_dict(prof),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "batch_size": batch,
        },
        "data": {
            "calib_samples": len(calib),
            "eval_samples": len(eval_ds),
            "labels": eval_ds.labels is not None,
            "metric": baseline.quality.metric if baseline.quality else None,
        },
        "budget": {"max_accuracy_drop": max_drop, "max_model_bytes": max_bytes, "p95_latency_ms": p95},
        "baseline": baseline.to_dict(),
        "candidates": [c.to_dict() for c in candidates],
        "chosen": chosen.id,
        "reason": reason,
    }


def _eval_npz(
    path: Path, eval_ds: Dataset, reference: Optional[list[np.ndarray]], input_names: list[str]
) -> Dataset:
    """eval.npz for the device's health check: inputs by name, plus labels `y` or fp32 outputs `reference`."""
    n = min(len(eval_ds), BUNDLE_EVAL_SAMPLES)
    arrays = {name: v[:n] for name, v in zip(input_names, eval_ds.inputs.values())}
    if eval_ds.labels is not None:
        arrays["y"] = eval_ds.labels[:n]
    elif reference is not None:
        arrays["reference"] = reference[0][:n]
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return Dataset(
        {name: v[:n] for name, v in zip(input_names, eval_ds.inputs.values())},
        None if eval_ds.labels is None else eval_ds.labels[:n],
    )


def _write_bundle(
    out_dir: Path,
    chosen: Candidate,
    prof: Any,
    eval_ds: Dataset,
    reference: Optional[list[np.ndarray]],
    report: dict[str, Any],
    private_key: Any,
    name: str,
    work: Path,
) -> Path:
    """Sign and write the bundle; `create_bundle` stages it beside `out_dir` and renames it into place."""
    from edgefleet.converters.runners import open_runner
    from edgefleet.sdk.trust.bundle import BundleError, create_bundle
    from edgefleet.sdk.build.manifest_fields import manifest_fields_for
    from edgefleet.sdk.trust.keys import KeysError, load_private_key

    if chosen.path is None:
        raise BuildError(f"the chosen candidate {chosen.id} has no model file")
    if private_key is None or isinstance(private_key, (str, Path)):
        try:
            private_key = load_private_key(private_key)
        except KeysError as exc:
            raise BuildError(f"cannot sign the bundle: {exc.reason}") from exc
    runner = open_runner(chosen.path)
    eval_path = work / "eval.npz"
    subset = _eval_npz(eval_path, eval_ds, reference, [s.name for s in runner.inputs])
    subset_reference = None if reference is None else [r[: len(subset)] for r in reference]
    subset_quality = evaluate(
        run_model(runner, subset.inputs), labels=subset.labels, reference=subset_reference
    )
    fields = manifest_fields_for(
        chosen,
        prof,
        runner,
        name=name,
        subset_quality=subset_quality,
        max_p95_ms=getattr(prof, "p95_latency_ms", None),
    )
    try:
        return create_bundle(
            out_dir,
            model_path=chosen.path,
            eval_npz_path=eval_path,
            manifest_fields=fields,
            private_key=private_key,
            report=report,
        )
    except BundleError as exc:
        raise BuildError(f"writing the bundle failed: {exc.reason}") from exc


__all__ = ["BuildResult", "Candidate", "PlanOptions", "Step", "build"]
