"""What every request handler needs: the store, the fleet name, optional actions, upload settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from fastapi import Request

from edgefleet.sdk.server.feed import ChangeFeed
from edgefleet.sdk.store import Store


@runtime_checkable
class FleetActions(Protocol):
    """What the API needs from the fleet control plane to act (read-only views need only the store)."""

    def start_rollout(
        self,
        bundle_paths: list[str],
        selector: str,
        strategy: str,
        *,
        soak_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
        gates: Optional[dict[str, float]] = None,
    ) -> str:
        """Validate and start a rollout in the background; return its id without waiting for it.

        `gates`: quality floors by gate name (`min_accuracy`, `min_agreement`, `min_fidelity`).
        """
        ...

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        """Abort a running rollout: roll back the devices it reached, notify no others."""
        ...


@dataclass
class ServerContext:
    """Shared state of one app instance."""

    store: Store
    fleet: str
    feed: ChangeFeed
    actions: Optional[FleetActions] = None
    token: Optional[str] = None
    bundle_dir: Optional[Path] = None
    trusted_keys: list[Path] = field(default_factory=list)
    max_upload_bytes: int = 512 * 1024 * 1024


def get_ctx(request: Request) -> ServerContext:
    """The app's context (a FastAPI dependency)."""
    return request.app.state.ctx
