"""Bearer-token auth: required whenever the server listens beyond loopback, checked in constant time."""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

from edgefleet.sdk.server.errors import ServerConfigError

TOKEN_ENV = "EDGEFLEET_TOKEN"
# Shorter secrets fall to guessing over the network; 16 URL-safe characters carry ~96 bits.
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only.

    Names other than `localhost` count as non-loopback: they may resolve to a public address later.
    """
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve_token(token: Optional[str]) -> Optional[str]:
    """The token given on the command line, else `EDGEFLEET_TOKEN`, else None; blank counts as none."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    if value is None or not value.strip():
        return None
    return value.strip()


def check_token_strength(token: str) -> None:
    """Refuse a token too short to resist guessing."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ServerConfigError(
            f"the API token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} ({TOKEN_HINT})"
        )


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to listen beyond loopback without a token: the API can deploy models to every device."""
    if token is not None:
        check_token_strength(token)
        return
    if not is_loopback(host):
        raise ServerConfigError(
            f"refusing to listen on {host!r} without a token: anyone who reaches it could deploy models "
            f"to the fleet. Pass --token T or set {TOKEN_ENV} ({TOKEN_HINT}), or bind --host 127.0.0.1"
        )


def token_matches(expected: str, presented: Optional[str]) -> bool:
    """Compare a presented token with the expected one in constant time."""
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), presented.encode("utf-8"))


def bearer_from_header(header: Optional[str]) -> Optional[str]:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
