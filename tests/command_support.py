"""Sign the commands a test publishes itself, as the host does: the online key beside the fleet key.

Agents refuse unsigned commands by default (`command-unsigned`); tests that publish raw commands (not
through Fleet, which signs) pass them through `signed` first.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from edgefleet.sdk.trust.command_signing import CommandSigner

_SIGNERS: dict[Path, CommandSigner] = {}
_LOCK = threading.Lock()


def signer(keys_dir: Path) -> CommandSigner:
    """The online-key signer of a folder made by `init_keys` (one per folder, so counters keep rising)."""
    folder = Path(keys_dir).resolve()
    with _LOCK:
        if folder not in _SIGNERS:
            loaded = CommandSigner.load(folder)
            assert loaded is not None, f"{folder} holds no online key: make it with init_keys"
            _SIGNERS[folder] = loaded
        return _SIGNERS[folder]


def signed(keys_dir: Path, payload: bytes, device: str) -> bytes:
    """`payload` signed for `device` when it is a JSON object; any other bytes (garbage) as they are.

    A command that names another device in its `device` field is signed for that device, as the host
    would: the agent then refuses it as misaddressed.
    """
    try:
        command = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(command, dict) or "auth" in command:
        return payload
    target = command.get("device")
    return signer(keys_dir).sign(payload, target if isinstance(target, str) and target else device)
