"""Exceptions of the fleet control plane: each names the problem and how to fix it."""

from __future__ import annotations

from edgefleet.sdk.errors import EdgefleetError


class FleetError(EdgefleetError):
    """Base of every refusal or failure of the fleet control plane."""


class SelectorError(FleetError):
    """A target selector is malformed or names no known device."""


class StrategyError(FleetError):
    """A rollout strategy or abort rule is malformed."""


class BundleRefused(FleetError):
    """A bundle cannot be deployed: unreadable, tampered, unsigned, or no bundle fits a device's profile."""


class RolloutConflict(FleetError):
    """Some target devices are already in a rollout that has not ended."""


class RolloutNotFound(FleetError, LookupError):
    """No rollout with that id exists in this fleet."""


class BrokerUnavailable(FleetError):
    """The MQTT broker cannot be reached or refused the connection."""


class RolloutAborted(FleetError):
    """A rollout stopped by itself (abort rule) or by request; `rollout_id` and the reason are kept."""

    def __init__(self, rollout_id: str, reason: str) -> None:
        super().__init__(f"rollout {rollout_id} aborted: {reason}")
        self.rollout_id = rollout_id
        self.reason = reason
