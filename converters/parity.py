"""Parity between a reference model's outputs and a converted or compressed model's outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from edgefleet.converters.errors import ParityError


@dataclass(frozen=True)
class ParityReport:
    """How close two output tensors are: max abs error, top-1 agreement (rows), mean/min cosine."""

    max_abs_err: float
    top1_agreement: float
    cosine: float
    min_cosine: float
    samples: int
    ref_max_abs: float = 0.0  # scale of the reference, so errors can be judged relative to it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _rows(array: np.ndarray) -> np.ndarray:
    """View an output as (samples, features): batch first, everything else flattened."""
    arr = np.asarray(array, dtype=np.float64)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    if arr.ndim == 1:
        return arr.reshape(1, -1)
    return arr.reshape(arr.shape[0], -1)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> ParityReport:
    """Compare two outputs of the same shape; raises ValueError when the shapes differ."""
    ref = _rows(reference)
    cand = _rows(candidate)
    if ref.shape != cand.shape:
        raise ValueError(
            f"output shapes differ: reference {np.shape(reference)} vs candidate {np.shape(candidate)}"
        )
    max_abs = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
    top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1))) if ref.shape[1] > 1 else 1.0
    dot = np.sum(ref * cand, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one shares no direction.
    cos = np.where(
        norms > 0, dot / np.maximum(norms, 1e-300), np.where(np.all(ref == cand, axis=1), 1.0, 0.0)
    )
    return ParityReport(
        max_abs_err=max_abs,
        top1_agreement=top1,
        cosine=float(np.mean(cos)),
        min_cosine=float(np.min(cos)),
        samples=int(ref.shape[0]),
        ref_max_abs=float(np.max(np.abs(ref))) if ref.size else 0.0,
    )


def compare_many(references: list[np.ndarray], candidates: list[np.ndarray]) -> ParityReport:
    """Compare every output of a model pairwise and keep the worst figure of each kind."""
    if len(references) != len(candidates):
        raise ValueError(f"output counts differ: reference {len(references)} vs candidate {len(candidates)}")
    reports = [compare_outputs(r, c) for r, c in zip(references, candidates)]
    return ParityReport(
        max_abs_err=max(r.max_abs_err for r in reports),
        top1_agreement=min(r.top1_agreement for r in reports),
        cosine=min(r.cosine for r in reports),
        min_cosine=min(r.min_cosine for r in reports),
        samples=min(r.samples for r in reports),
        ref_max_abs=max(r.ref_max_abs for r in reports),
    )


@dataclass(frozen=True)
class ParityTolerance:
    """Limits a conversion must meet; None switches a check off.

    The absolute error may reach `atol + rtol * (largest reference magnitude)`: a ResNet with random
    weights emits logits in the hundreds, where 1e-3 absolute would reject an exact conversion.
    """

    atol: Optional[float] = 1e-4
    rtol: float = 1e-3
    min_top1_agreement: Optional[float] = 0.99
    min_cosine: Optional[float] = 0.999


def check_parity(report: ParityReport, tolerance: ParityTolerance, what: str) -> None:
    """Raise ParityError naming every limit `report` breaks."""
    broken = []
    if tolerance.atol is not None:
        limit = tolerance.atol + tolerance.rtol * report.ref_max_abs
        if report.max_abs_err > limit:
            broken.append(f"max abs error {report.max_abs_err:.3g} > {limit:.3g}")
    if tolerance.min_top1_agreement is not None and report.top1_agreement < tolerance.min_top1_agreement:
        broken.append(f"top-1 agreement {report.top1_agreement:.3f} < {tolerance.min_top1_agreement:.3f}")
    if tolerance.min_cosine is not None and report.min_cosine < tolerance.min_cosine:
        broken.append(f"min cosine {report.min_cosine:.5f} < {tolerance.min_cosine:.5f}")
    if broken:
        raise ParityError(
            f"{what}: outputs no longer match the reference ({'; '.join(broken)}); the converter "
            "changed the model's numerics — try another converter/opset or report the model",
            report,
        )
