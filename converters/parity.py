"""Parity between a reference model's outputs and a converted or compressed model's outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from edgefleet.agent.core import quality
from edgefleet.converters.errors import ParityError


@dataclass(frozen=True)
class ParityReport:
    """How close a converted model's outputs are to the reference's: max abs error, agreement, fidelity.

    `agreement` and `fidelity` / `fidelity_min` are the quality vocabulary's (agent/core/quality.py),
    scored by the same code the device's health check runs.
    """

    max_abs_err: float
    agreement: float
    fidelity: float
    fidelity_min: float
    samples: int
    ref_max_abs: float = 0.0  # scale of the reference, so errors can be judged relative to it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> ParityReport:
    """Compare two outputs of the same shape; raises ValueError when the shapes differ."""
    if np.shape(reference) != np.shape(candidate):
        raise ValueError(
            f"output shapes differ: reference {np.shape(reference)} vs candidate {np.shape(candidate)}"
        )
    return compare_many([reference], [candidate])


def compare_many(references: list[np.ndarray], candidates: list[np.ndarray]) -> ParityReport:
    """Compare every output of a model: worst absolute error of any output, quality over all outputs."""
    if len(references) != len(candidates):
        raise ValueError(f"output counts differ: reference {len(references)} vs candidate {len(candidates)}")
    for ref, cand in zip(references, candidates):
        if np.shape(ref) != np.shape(cand):
            raise ValueError(f"output shapes differ: reference {np.shape(ref)} vs candidate {np.shape(cand)}")
    try:
        scores = quality.score(candidates, reference=references)
    except quality.QualityError as exc:
        raise ValueError(exc.reason) from None
    refs = [np.asarray(r, dtype=np.float64) for r in references]
    diffs = [np.abs(r - np.asarray(c, dtype=np.float64)) for r, c in zip(refs, candidates)]
    return ParityReport(
        max_abs_err=max((float(d.max()) for d in diffs if d.size), default=0.0),
        # A model without a classifier output (regression, embeddings) has no top-1 to disagree on.
        agreement=scores.get(quality.AGREEMENT, 1.0),
        fidelity=scores[quality.FIDELITY],
        fidelity_min=scores["fidelity_min"],
        samples=int(quality.as_rows(refs[0]).shape[0]),
        ref_max_abs=max((float(np.abs(r).max()) for r in refs if r.size), default=0.0),
    )


@dataclass(frozen=True)
class ParityTolerance:
    """Limits a conversion must meet; None switches a check off.

    The absolute error may reach `atol + rtol * (largest reference magnitude)`: a ResNet with random
    weights emits logits in the hundreds, where 1e-3 absolute would reject an exact conversion.
    """

    atol: Optional[float] = 1e-4
    rtol: float = 1e-3
    min_agreement: Optional[float] = 0.99
    # The worst row's fidelity (its cosine to the reference row), not the mean: one broken row fails.
    min_fidelity_row: Optional[float] = 0.999


def check_parity(report: ParityReport, tolerance: ParityTolerance, what: str) -> None:
    """Raise ParityError naming every limit `report` breaks."""
    broken = []
    if tolerance.atol is not None:
        limit = tolerance.atol + tolerance.rtol * report.ref_max_abs
        if report.max_abs_err > limit:
            broken.append(f"max abs error {report.max_abs_err:.3g} > {limit:.3g}")
    if tolerance.min_agreement is not None and report.agreement < tolerance.min_agreement:
        broken.append(f"top-1 agreement {report.agreement:.3f} < {tolerance.min_agreement:.3f}")
    if tolerance.min_fidelity_row is not None and report.fidelity_min < tolerance.min_fidelity_row:
        broken.append(f"worst-row fidelity {report.fidelity_min:.5f} < {tolerance.min_fidelity_row:.5f}")
    if broken:
        raise ParityError(
            f"{what}: outputs no longer match the reference ({'; '.join(broken)}); the converter "
            "changed the model's numerics — try another converter/opset or report the model",
            report,
        )
