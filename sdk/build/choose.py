"""Judge measured candidates against the budgets, pick one, and write report.json's content.

On a CPU profile candidates are ranked by their speed measured on this host side by side with fp32
(the host's CPU is a fair proxy for another CPU's relative speeds). On a profile that runs ONNX on a
GPU the host's CPU says nothing about the device: when the build timed the ONNX candidates on this
host's GPU (CUDA / TensorRT, measure.providers_scope) they are ranked by that measured speed relative to
fp32, else by their estimated device latency (GPU_SIZE_WEIGHT keeps size as a tie-breaker). The
absolute p95 budget is always judged on the estimate: the host's GPU is not the device's. Either way a
candidate bigger than fp32 that is not faster than fp32 is never picked: it would only cost the device
memory and download time.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

from edgefleet.agent.core.quality import drop
from edgefleet.sdk.build.candidate import Candidate
from edgefleet.sdk.build.errors import BudgetError, BuildError
from edgefleet.sdk.build.model_io import (
    Dataset,
)
from edgefleet.sdk.build.plugins import Unavailable
from edgefleet.sdk.build.profile import profile_dict, runs_onnx_on_gpu

# On GPU profiles: score = estimated latency / fp32's + GPU_SIZE_WEIGHT × size / fp32's, so a 5 %
# estimated speed difference outweighs fp32's whole size; size only separates near-equal candidates.
GPU_SIZE_WEIGHT = 0.05


def estimate_target(path: Path, profile: Any, batch: int, precision: str) -> Optional[dict[str, Any]]:
    """The profile's target latency estimate as report fields (estimate_ms, unknown_op_types, class_ms...).

    None when the estimator is not installed or cannot read the model: an estimate is advisory.
    """
    try:
        from edgefleet.sdk.build.estimate import estimate_latency
    except ImportError:
        return None
    try:
        return estimate_latency(path, profile, batch_size=batch, precision=precision).to_dict()
    except Exception:  # an estimate is advisory; a model the estimator cannot read gets none
        return None


def estimate_target_ms(path: Path, profile: Any, batch: int, precision: str) -> Optional[float]:
    """The profile's target latency estimate, when the estimator is installed and knows the model."""
    found = estimate_target(path, profile, batch, precision)
    return None if found is None else float(found["estimate_ms"])


def gpu_provider(cand: Candidate) -> Optional[str]:
    """The GPU execution provider that timed this candidate on the host, None when it ran on the CPU."""
    return cand.latency.provider if cand.latency is not None and cand.latency.on_gpu else None


def ranked_by(profile: Any, baseline: Candidate) -> dict[str, Any]:
    """How `choose` ranks for this profile: `gpu-measured` (with the provider), `estimate` or `host`."""
    if profile is None or not runs_onnx_on_gpu(profile):
        return {"basis": "host", "provider": baseline.latency.provider if baseline.latency else None}
    provider = gpu_provider(baseline)
    if provider is not None:
        return {"basis": "gpu-measured", "provider": provider}
    return {"basis": "estimate" if baseline.estimate_ms else "host", "provider": None}


def estimated_speedup(cand: Candidate, baseline: Candidate) -> Optional[float]:
    """fp32's estimated device latency / this candidate's, None when either has no estimate."""
    if not cand.estimate_ms or not baseline.estimate_ms:
        return None
    return baseline.estimate_ms / cand.estimate_ms


def budget_reasons(
    cand: Candidate,
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95_budget: Optional[float],
    by_estimate: bool = False,
    by_gpu: bool = False,
) -> list[str]:
    """Why a measured candidate is over budget (empty when it fits).

    `by_estimate`: speed is judged by the estimated device latency (GPU profiles), not the host timing.
    `by_gpu`: a candidate timed on the host's GPU alongside fp32 (also on it) is judged by that timing.
    """
    reasons = []
    if cand.accuracy_drop is not None and cand.accuracy_drop > max_drop + 1e-12:
        unit = "accuracy" if cand.quality and cand.quality.metric == "accuracy" else "fidelity"
        reasons.append(f"{unit} drop {cand.accuracy_drop:.4f} > budget {max_drop:.4f}")
    if max_bytes is not None and cand.size_bytes is not None and cand.size_bytes > max_bytes:
        reasons.append(f"size {cand.size_bytes / 1e6:.2f} MB > profile limit {max_bytes / 1e6:.2f} MB")
    if p95_budget is not None and cand.estimate_ms is not None and cand.estimate_ms > p95_budget:
        reasons.append(
            f"estimated target latency {cand.estimate_ms:.2f} ms > profile p95 budget {p95_budget:.2f} ms"
        )
    estimated = estimated_speedup(cand, baseline)
    provider = gpu_provider(cand) if by_gpu else None
    if provider is not None:
        faster = cand.speedup is not None and cand.speedup > 1.0 and not cand.speed_tie
        if cand is not baseline and cand.speedup is not None and cand.speedup < 1.0 and not cand.speed_tie:
            reasons.append(
                f"slower than fp32 on this host's GPU ({cand.speedup:.2f}× its speed "
                f"±{cand.speedup_noise or 0.0:.2f} noise on {provider}, timed side by side)"
            )
    elif by_estimate and estimated is not None:
        faster = estimated > 1.0
        if cand is not baseline and estimated < 1.0:
            reasons.append(f"estimated slower than fp32 on the device ({estimated:.2f}× its speed)")
    else:
        faster = cand.speedup is not None and cand.speedup > 1.0 and not cand.speed_tie
        if cand is not baseline and cand.speedup is not None and cand.speedup < 1.0 and not cand.speed_tie:
            reasons.append(
                f"slower than fp32 on this host ({cand.speedup:.2f}× its speed ±{cand.speedup_noise or 0.0:.2f} "
                f"noise at batch {cand.latency.batch_size if cand.latency else '?'}, timed side by side)"
            )
    if (
        cand is not baseline
        and cand.size_bytes is not None
        and baseline.size_bytes
        and cand.size_bytes > baseline.size_bytes
        and not faster
    ):
        # e.g. an optimized graph whose folded constants duplicate weights fp32 shares: more bytes on
        # the device and nothing gained
        reasons.append(
            f"bigger than fp32 ({cand.size_bytes / baseline.size_bytes:.2f}× its size) and not faster"
        )
    return reasons


def choose(
    candidates: list[Candidate],
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95: Optional[float],
    only: Sequence[str] = (),
    profile: Any = None,
) -> tuple[Candidate, str]:
    """Mark every measured candidate ok/over-budget, then pick the lowest latency+size score.

    With `only` (`--only`), the pick is among those ids; the baseline, measured for comparison, is
    picked only when none of them fits (the reason says so). With a `profile` that runs ONNX on a GPU,
    candidates are ranked by their speed measured on this host's GPU when the build timed them there
    (`ranked_by`), else by estimated device latency, instead of host CPU speed.
    """
    on_gpu = profile is not None and runs_onnx_on_gpu(profile)
    by_gpu = on_gpu and gpu_provider(baseline) is not None
    by_estimate = on_gpu and bool(baseline.estimate_ms)
    if baseline.quality is None or baseline.latency is None or not baseline.size_bytes:
        raise BuildError(f"the fp32 baseline ({baseline.id}) was not measured: {baseline.reason}")
    base_value = baseline.quality.value
    for cand in candidates:
        if cand.status == "failed" or cand.quality is None:
            continue
        # The contract's drop: fp32's value less the candidate's, turned round for a lower-is-better metric.
        cand.accuracy_drop = drop(cand.quality.metric, base_value, cand.quality.value)
        reasons = budget_reasons(cand, baseline, max_drop, max_bytes, p95, by_estimate, by_gpu)
        estimated = estimated_speedup(cand, baseline)
        if by_gpu and gpu_provider(cand) and cand.speedup and cand.size_bytes:
            # timed on the host's GPU side by side with fp32: the measured ratio ranks, as on a CPU
            speed = 1.0 if cand.speed_tie else cand.speedup
            cand.score = 1.0 / speed + GPU_SIZE_WEIGHT * (cand.size_bytes / baseline.size_bytes)
        elif by_estimate and cand.size_bytes:
            cand.score = (1.0 / estimated if estimated else 9e9) + GPU_SIZE_WEIGHT * (
                cand.size_bytes / baseline.size_bytes
            )
        elif cand.speedup and cand.size_bytes:
            # Latency ratio from the side-by-side timing, size ratio from the files: equal weights. A
            # speed inside the noise band of fp32's is a tie, so only size separates such candidates.
            speed = 1.0 if cand.speed_tie else cand.speedup
            cand.score = 1.0 / speed + cand.size_bytes / baseline.size_bytes
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
    note = ""
    if only:
        listed = [c for c in ok if c.id in only]
        if listed:
            ok = listed
        else:
            note = f"; none of --only {', '.join(only)} fits, so the fp32 baseline is the pick"
    chosen = min(ok, key=lambda c: (c.score or 0.0, c.size_bytes or 0, c.accuracy_drop or 0.0))
    p50 = chosen.latency.p50_ms if chosen.latency else float("nan")
    size = chosen.size_bytes or 0
    provider = gpu_provider(chosen) if by_gpu else None
    if provider is not None:
        reason = (
            f"lowest device latency among {len(ok)} candidates within budget, measured on this host's GPU "
            f"({provider}) side by side with fp32 ({profile.name} runs ONNX on its GPU): p50 {p50:.3f} ms "
            f"({chosen.speedup or 1.0:.2f}× fp32's speed"
            f"{', a tie within the noise' if chosen.speed_tie and chosen is not baseline else ''}), size "
            f"{size / baseline.size_bytes:.2f}× fp32, "
            f"{'accuracy' if chosen.quality and chosen.quality.metric == 'accuracy' else 'fidelity'} drop "
            f"{chosen.accuracy_drop or 0.0:.4f} ≤ {max_drop}{note}"
        )
        return chosen, reason
    if by_estimate:
        reason = (
            f"lowest estimated device latency among {len(ok)} candidates within budget ({profile.name} runs "
            f"ONNX on its GPU, so host timings do not rank): {chosen.estimate_ms or 0.0:.3f} ms "
            f"({estimated_speedup(chosen, baseline) or 1.0:.2f}× fp32's estimated speed), size "
            f"{size / baseline.size_bytes:.2f}× fp32, "
            f"{'accuracy' if chosen.quality and chosen.quality.metric == 'accuracy' else 'fidelity'} drop "
            f"{chosen.accuracy_drop or 0.0:.4f} ≤ {max_drop}{note}"
        )
        return chosen, reason
    reason = (
        f"lowest latency+size score among {len(ok)} candidates within budget: p50 {p50:.3f} ms "
        f"({chosen.speedup or 1.0:.2f}× fp32's speed side by side"
        f"{', a tie within the noise' if chosen.speed_tie and chosen is not baseline else ''}), size {size / baseline.size_bytes:.2f}× "
        f"fp32, {'accuracy' if chosen.quality and chosen.quality.metric == 'accuracy' else 'fidelity'} drop "
        f"{chosen.accuracy_drop or 0.0:.4f} ≤ {max_drop}{note}"
    )
    return chosen, reason


def make_report(
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
    unavailable: Sequence[Unavailable] = (),
) -> dict[str, Any]:
    """report.json's content (docs/build.md); `unavailable` lists the plug-ins this installation cannot run."""
    return {
        "schema": 1,
        "profile": profile_dict(prof),
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
        "ranked_by": ranked_by(prof, baseline),
        "unavailable": [u.to_dict() for u in unavailable],
    }
