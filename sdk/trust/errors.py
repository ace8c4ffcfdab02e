"""Errors of the trust layer's credentials commands."""

from __future__ import annotations

from edgefleet.sdk.errors import EdgefleetError


class CredentialsError(EdgefleetError):
    """A credentials command could not run; the message names the problem and what to do."""
