"""Exceptions of the server layer: refused configurations and API errors with a message saying what to fix."""

from __future__ import annotations

from edgefleet.sdk.errors import EdgefleetError


class ServerError(EdgefleetError):
    """Base of every error the server layer raises."""


class ServerConfigError(ServerError):
    """The server cannot start as configured (e.g. bound beyond loopback without a token)."""


class ApiError(ServerError):
    """A request the API refuses: an HTTP status and a message naming the problem and the fix."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class NotFound(ApiError):
    """The resource a request names does not exist (HTTP 404)."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)


class Unprocessable(ApiError):
    """The request is well-formed but its content cannot be used (HTTP 422)."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)


class Conflict(ApiError):
    """The request clashes with the current state, e.g. aborting a finished rollout (HTTP 409)."""

    def __init__(self, message: str) -> None:
        super().__init__(409, message)


class Unavailable(ApiError):
    """The server lacks what the request needs, e.g. a fleet connection for actions (HTTP 503)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)
