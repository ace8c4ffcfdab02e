"""The agent's exception hierarchy: every failure carries a stable code and a reason a human can act on."""

from __future__ import annotations

from typing import Optional


class AgentError(Exception):
    """Base of every agent failure; `code` is stable and machine-readable, `reason` says what to do."""

    default_code = "agent-error"

    def __init__(self, code: Optional[str] = None, reason: str = "") -> None:
        self.code = code or self.default_code
        self.reason = reason
        super().__init__(f"[{self.code}] {reason}" if reason else self.code)


class ConfigError(AgentError):
    """The agent's configuration or flags are invalid; the reason names the field."""

    default_code = "config-invalid"


class ProtocolError(AgentError):
    """A message on the wire is malformed, unknown or not meant for this device."""

    default_code = "bad-message"


class VerifyError(AgentError):
    """A bundle, manifest, file or key rotation failed verification; nothing was installed."""

    default_code = "verify-failed"


class TransferError(AgentError):
    """A chunked transfer failed (unknown transfer, bad index, oversized chunk, hash mismatch)."""

    default_code = "transfer-failed"


class RuntimeLoadError(AgentError):
    """A model could not be loaded or run by the runtime it asks for."""

    default_code = "runtime-failed"


class InstallError(AgentError):
    """An install failed at a named step (verify, write, load, health, switch); the old model serves on."""

    default_code = "install-failed"

    def __init__(self, step: str, code: Optional[str] = None, reason: str = "") -> None:
        self.step = step
        super().__init__(code, reason)
