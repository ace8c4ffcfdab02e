"""The host's exception root: every error edgefleet's host side raises on purpose derives from `EdgefleetError`.

One root per side (docs/architecture.md):

- host (`edgefleet.sdk`, `edgefleet.converters`): `EdgefleetError`; each area has its own family below
  it (`BuildError`, `FleetError`, `ServerError`, `StoreError`, `BundleError`, `KeysError`,
  `CredentialsError`, `CompressionError`, `ConversionError`, `DemoError`, ...), so a caller catches one
  area, or `EdgefleetError` for all of them;
- device (`edgefleet.agent`): `edgefleet.agent.core.errors.AgentError`, standard library only.

This module imports nothing, so `edgefleet.converters` (which sits below `sdk` and imports none of the
rest of it) can derive `ConversionError` from the same root.

`edgefleet.device_profiles` is shared by both sides and imports neither, so its `ProfileError` derives
from `Exception` alone; host code that loads profiles re-raises it as
`edgefleet.sdk.build.errors.ProfileError` (an `EdgefleetError`) where a build or a command needs one.
Every message names the problem and the fix; user mistakes are never reported with `assert`.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of the host's errors: the message names what went wrong and what to do about it."""


__all__ = ["EdgefleetError"]
