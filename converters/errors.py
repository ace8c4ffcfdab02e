"""The converters' exception hierarchy: every failure is a ConversionError; drifted outputs are ParityError."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.sdk.errors import EdgefleetError

if TYPE_CHECKING:
    from edgefleet.converters.parity import ParityReport


class ConversionError(EdgefleetError):
    """A model could not be converted; the message names the problem and what to try instead."""


class ParityError(ConversionError):
    """A converted model's outputs drifted from the reference beyond the allowed tolerance."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report
