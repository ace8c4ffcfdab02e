"""The environment variables `edgefleet` commands read: one name per setting, whichever the command.

Names a release used before still work for a while: a command reads them when the current name and the
flag are unset, and says on stderr which name to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

BROKER = "EDGEFLEET_BROKER"
BROKER_PASSWORD = "EDGEFLEET_BROKER_PASSWORD"
DB = "EDGEFLEET_DB"
TOKEN = "EDGEFLEET_TOKEN"
HOME = "EDGEFLEET_HOME"
CREDENTIALS = "EDGEFLEET_CREDENTIALS"
KEY_PASSPHRASE = "EDGEFLEET_KEY_PASSPHRASE"

# Old name -> the name that replaced it (`serve` read the broker password from EDGEFLEET_MQTT_PASSWORD,
# every other command from EDGEFLEET_BROKER_PASSWORD).
RENAMED: dict[str, str] = {"EDGEFLEET_MQTT_PASSWORD": BROKER_PASSWORD}


def _warn(message: str) -> None:
    from edgefleet.sdk.cli.errors import err_console

    err_console().print(f"[yellow]warning:[/] {message}")


def read_old_names(current: str) -> Callable[[str | None], str | None]:
    """A typer option callback: when the option is unset, take a value from an old name of `current`."""
    old_names = [old for old, new in RENAMED.items() if new == current]

    def callback(value: str | None) -> str | None:
        for old in old_names:
            legacy = os.environ.get(old)
            if not legacy:
                continue
            if value is None:
                _warn(f"{old} is deprecated: set {current} instead (read {old} this time)")
                return legacy
            _warn(f"{old} is deprecated and ignored: {current} or the flag is set")
        return value

    return callback


__all__ = [
    "BROKER",
    "BROKER_PASSWORD",
    "CREDENTIALS",
    "DB",
    "HOME",
    "KEY_PASSPHRASE",
    "RENAMED",
    "TOKEN",
    "read_old_names",
]
