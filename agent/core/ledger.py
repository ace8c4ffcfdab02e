"""The agent's record of the newest version installed per model name, which blocks rollback attacks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import atomic_write_json, read_json

LEDGER_FILE = "versions.json"


class VersionLedger:
    """Highest version ever recorded for each model name, kept in `state_dir/versions.json` (atomic)."""

    def __init__(self, state_dir: Union[str, os.PathLike[str]]) -> None:
        self.path = Path(state_dir) / LEDGER_FILE

    def _read(self) -> Dict[str, int]:
        data = read_json(self.path, default={})
        if not isinstance(data, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in data.values()
        ):
            # Refusing is safer than treating a damaged ledger as empty, which would re-open rollback.
            raise VerifyError(
                "ledger-corrupt",
                f"{self.path} is not a name → version map; restore it from backup or reprovision the device",
            )
        return data

    def last(self, name: str) -> Optional[int]:
        """The highest version recorded for `name`, or None when none was ever installed."""
        return self._read().get(name)

    def all(self) -> Dict[str, int]:
        """Every recorded name and its highest version."""
        return dict(self._read())

    def record(self, name: str, version: int) -> int:
        """Remember that `version` of `name` was installed; the ledger only moves forward. Returns the stored value."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"a version is an integer >= 1, got {version!r}")
        data = self._read()
        current = data.get(name)
        if current is not None and current >= version:
            return current
        data[name] = version
        atomic_write_json(self.path, data)
        return version
