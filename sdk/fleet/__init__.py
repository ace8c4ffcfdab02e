"""The fleet control plane: device registry, selectors, rollout strategies and engine, transfer, ingest.

`Fleet` (in `client`) is the public entry point; it is also exported lazily as `edgefleet.sdk.Fleet`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Fleet"]


def __getattr__(name: str) -> Any:
    if name == "Fleet":
        from edgefleet.sdk.fleet.client import Fleet

        return Fleet
    raise AttributeError(f"module 'edgefleet.sdk.fleet' has no attribute {name!r}")
