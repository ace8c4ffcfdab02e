"""Errors of `edgefleet build`: bad model files, bad data, unknown profiles, budgets nobody meets."""

from __future__ import annotations

from typing import Any

from edgefleet.sdk.errors import EdgefleetError


class BuildError(EdgefleetError):
    """A build could not produce a bundle; the message names the problem and the fix."""


class ModelLoadError(BuildError):
    """The model file is missing, corrupt, truncated or of a format build does not read."""


class DataError(BuildError):
    """Calibration/eval data is missing, malformed, or does not fit the model's inputs."""


class ProfileError(BuildError):
    """The device profile is unknown or invalid."""


class BudgetError(BuildError):
    """No candidate met the accuracy, size and latency budgets; `candidates` holds the closest ones."""

    def __init__(self, message: str, candidates: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.candidates = candidates
