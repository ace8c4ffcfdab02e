"""Defaults both sides share, each defined once: the broker URL and edgefleet's home folder."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
HOME_ENV = "EDGEFLEET_HOME"
HOME_DIRNAME = ".edgefleet"


def edgefleet_home() -> Path:
    """edgefleet's folder: `$EDGEFLEET_HOME` when set (and not empty), else ~/.edgefleet."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / HOME_DIRNAME)


def agent_state_dir(device_id: str) -> Path:
    """Default state folder of an agent: ~/.edgefleet/agent/ID (under the user's home, like before)."""
    return Path.home() / HOME_DIRNAME / "agent" / device_id


__all__ = ["DEFAULT_BROKER", "HOME_DIRNAME", "HOME_ENV", "agent_state_dir", "edgefleet_home"]
