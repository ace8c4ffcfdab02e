"""Judge measured candidates against the budgets, pick one, and write report.json's content."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

from edgefleet.sdk.build.candidate import Candidate
from edgefleet.sdk.build.errors import BudgetError, BuildError
from edgefleet.sdk.build.model_io import (
    Dataset,
)
from edgefleet.sdk.build.plugins import Unavailable
from edgefleet.sdk.build.profile import profile_dict


def estimate_target_ms(path: Path, profile: Any, batch: int, precision: str) -> Optional[float]:
    """The profile's target latency estimate, when the estimator is installed and knows the model."""
    try:
        from edgefleet.sdk.build.estimate import estimate_latency
    except ImportError:
        return None
    try:
        return float(estimate_latency(path, profile, batch_size=batch, precision=precision).estimate_ms)
    except Exception:  # an estimate is advisory; a model the estimator cannot read gets none
        return None


def budget_reasons(
    cand: Candidate,
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95_budget: Optional[float],
) -> list[str]:
    """Why a measured candidate is over budget (empty when it fits)."""
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
    if cand is not baseline and cand.speedup is not None and cand.speedup < 1.0 and not cand.speed_tie:
        reasons.append(
            f"slower than fp32 on this host ({cand.speedup:.2f}× its speed ±{cand.speedup_noise or 0.0:.2f} "
            f"noise at batch {cand.latency.batch_size if cand.latency else '?'}, timed side by side)"
        )
    return reasons


def choose(
    candidates: list[Candidate],
    baseline: Candidate,
    max_drop: float,
    max_bytes: Optional[int],
    p95: Optional[float],
    only: Sequence[str] = (),
) -> tuple[Candidate, str]:
    """Mark every measured candidate ok/over-budget, then pick the lowest latency+size score.

    With `only` (`--only`), the pick is among those ids; the baseline, measured for comparison, is
    picked only when none of them fits (the reason says so).
    """
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
        reasons = budget_reasons(cand, baseline, max_drop, max_bytes, p95)
        if cand.speedup and cand.size_bytes:
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
        "unavailable": [u.to_dict() for u in unavailable],
    }
