"""Bridge from the API's actions (start/abort a rollout) to the fleet control plane (`edgefleet.sdk.Fleet`)."""

from __future__ import annotations

from typing import Any, Optional

from edgefleet.sdk.server.context import FleetActions
from edgefleet.sdk.server.errors import Conflict, NotFound, ServerConfigError, Unavailable, Unprocessable


class FleetAdapter:
    """Start and abort rollouts through a `Fleet`, turning its refusals into API errors (422/404/409)."""

    def __init__(self, fleet: Any) -> None:
        missing = [m for m in ("deploy", "abort") if not callable(getattr(fleet, m, None))]
        if missing:
            raise ServerConfigError(
                f"{type(fleet).__name__} cannot act for the API: it lacks {missing}; pass an "
                "edgefleet.sdk.Fleet or an object with start_rollout/abort_rollout"
            )
        self.fleet = fleet

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
        """Start the rollout without waiting for it; returns its id. `gates`: Fleet.deploy's quality floors."""
        options: dict[str, Any] = {"strategy": strategy, "wait": False, **(gates or {})}
        if soak_s is not None:
            options["soak_s"] = soak_s
        if timeout_s is not None:
            options["timeout_s"] = timeout_s
        try:
            result = self.fleet.deploy(bundle_paths, selector, **options)
        except Exception as exc:
            raise _api_error(exc) from exc
        return str(getattr(result, "id", result))

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        """Abort a rollout; the engine rolls back the devices it reached."""
        try:
            self.fleet.abort(rollout_id, reason=reason)
        except Exception as exc:
            raise _api_error(exc) from exc


def _api_error(exc: Exception) -> Exception:
    """Map the fleet's refusal to an API error; anything not a refusal is re-raised as is (a 500)."""
    from edgefleet.sdk.fleet.errors import BrokerUnavailable, FleetError, RolloutConflict

    message = str(exc)
    if isinstance(exc, LookupError):  # RolloutNotFound, and unknown ids from other layers
        return NotFound(message)
    if isinstance(exc, RolloutConflict):
        return Conflict(message)
    if isinstance(exc, BrokerUnavailable):
        return Unavailable(
            f"{message}; the server keeps serving the stored views, retry when the broker is back"
        )
    if isinstance(exc, (FleetError, ValueError)):
        return Unprocessable(message)
    return exc


def actions_for(fleet: Any) -> Optional[FleetActions]:
    """The actions object for `create_app`'s `fleet` argument: None, a FleetActions, or a wrapped Fleet."""
    if fleet is None:
        return None
    if isinstance(fleet, FleetActions):
        return fleet
    return FleetAdapter(fleet)
