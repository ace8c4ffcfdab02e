"""What a build measures about each candidate, and what a build returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from edgefleet.sdk.build.measure import (
    LatencyStats,
    Quality,
)
from edgefleet.sdk.build.plan import CandidateSpec
from edgefleet.sdk.build.plugins import Unavailable

# The widest relative noise band within which a candidate still counts as fp32's speed.
MAX_TIE_BAND = 0.2


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
    speedup_noise: Optional[float] = None  # relative half-width of the band around `speedup`
    unknown_op_types: tuple[str, ...] = ()  # ops the estimator has no cost model for (guessed, listed)

    @property
    def speed_tie(self) -> bool:
        """Whether this candidate's speed equals fp32's within the measured noise."""
        if self.speedup is None:
            return False
        # On a loaded host the band can grow past ±0.4; a candidate this far from fp32 is never a tie,
        # however wide the band (an INT8 model 5× slower than fp32 was once picked as one).
        band = min(self.speedup_noise or 0.0, MAX_TIE_BAND)
        return abs(self.speedup - 1.0) <= band

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
            "unknown_op_types": list(self.unknown_op_types),
            "speedup_vs_fp32": self.speedup,
            "speedup_noise": self.speedup_noise,
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
    unavailable: list[Unavailable] = field(default_factory=list)  # plug-ins this installation cannot run
