"""The profile layer's exceptions."""

from __future__ import annotations


class ProfileError(Exception):
    """A profile cannot be found or its file is invalid; the message names the file, field and allowed values."""
