"""The deploy state machine's persisted state: deploy.json and last_outcome.json, written atomically.

deploy.json holds the signed command of the deploy downloading (so a restart resumes it from the
transfers' bitmaps); last_outcome.json holds the last deploy's outcome event (so a redelivered command
or a restart resends it). `DeployMachine` asks for every write as an action, outcome first.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from edgefleet.agent.core.fsutil import atomic_write_json, read_json
from edgefleet.agent.core.protocol import DeployCommand
from edgefleet.agent.startup import KILL_POINT_ENV, kill_point

PENDING_FILE = "deploy.json"
OUTCOME_FILE = "last_outcome.json"


def _die_mid_write(path: Path, record: Mapping[str, Any]) -> None:
    """Test hook: leave the temp file atomic_write_json would have made, unsynced, and SIGKILL this process."""
    import tempfile

    fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    kill_point("deploy-recording")


class DeployFiles:
    """The machine's persisted state in the state folder: deploy.json and last_outcome.json (atomic writes)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    @property
    def pending_path(self) -> Path:
        """deploy.json: the command of the deploy downloading."""
        return self.state_dir / PENDING_FILE

    @property
    def outcome_path(self) -> Path:
        """last_outcome.json: the last deploy's outcome event."""
        return self.state_dir / OUTCOME_FILE

    def load_pending(self) -> Any:
        """The stored pending deploy (an unreadable file reads as none)."""
        try:
            return read_json(self.pending_path)
        except ValueError:
            return None

    def load_outcome(self) -> Optional[Dict[str, Any]]:
        """The stored last outcome, or None."""
        try:
            last = read_json(self.outcome_path)
        except ValueError:
            return None
        return last if isinstance(last, dict) else None

    def save_pending(self, cmd: DeployCommand) -> None:
        """Persist the command of the deploy now downloading."""
        record = {"command": base64.b64encode(cmd.to_wire()).decode("ascii")}
        if os.environ.get(KILL_POINT_ENV) == "deploy-recording":
            _die_mid_write(self.pending_path, record)
        atomic_write_json(self.pending_path, record)

    def save_outcome(self, deploy: str, event: Mapping[str, Any]) -> None:
        """Persist a deploy's outcome event."""
        atomic_write_json(self.outcome_path, {"deploy": deploy, "event": dict(event)})

    def clear_pending(self) -> None:
        """Remove deploy.json."""
        try:
            os.unlink(self.pending_path)
        except FileNotFoundError:
            pass
