"""The agent's start-up checks: a writable state folder, a usable trust root, a loadable device profile.

Each check raises `StartupError` carrying the process exit code (see `edgefleet.agent.exitcodes`), so
the CLI and systemd can tell a bad key from a bad profile without reading the message.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, List, Tuple

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.core.errors import AgentError, VerifyError
from edgefleet.agent.exitcodes import ExitCode

# Python modules that provide each runtime; finding one is enough (nothing is imported here).
_RUNTIME_MODULES = {
    "onnxruntime": ("onnxruntime",),
    "onnx": ("onnxruntime",),
    "tflite": ("ai_edge_litert", "tflite_runtime"),
}


class StartupError(AgentError):
    """The agent cannot start; `exit_code` tells the CLI (and systemd) which problem it is."""

    default_code = "startup-failed"

    def __init__(self, exit_code: ExitCode, reason: str) -> None:
        self.exit_code = exit_code
        super().__init__(exit_code.name.lower().replace("_", "-"), reason)


# Temp files of agent/core/fsutil.atomic_write_bytes (`.NAME.RANDOM.tmp`) that a kill left behind.
_ATOMIC_TMP = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]+\.tmp$")
# Test hook: the agent SIGKILLs itself at the point this variable names (see `kill_point`).
KILL_POINT_ENV = "EDGEFLEET_TEST_KILL_AT"


def prepare_state_dir(state_dir: Path) -> List[str]:
    """Create the state folder, prove it is writable, remove temp files a kill left; return their names."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            ExitCode.STATE_DIR, f"state folder {state_dir} is not writable: {exc}; fix --state-dir"
        ) from None
    return remove_stale_temp_files(state_dir)


def remove_stale_temp_files(state_dir: Path) -> List[str]:
    """Delete half-written atomic-write temp files (e.g. `.deploy.json.x1y2.tmp`) in the state folder.

    Only one agent runs per state folder and this runs before it writes anything, so every such file is
    a leftover of a process killed mid-write; its target still holds the old, complete content.
    """
    removed: List[str] = []
    for entry in os.scandir(state_dir):
        if entry.is_file(follow_symlinks=False) and _ATOMIC_TMP.match(entry.name):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


def kill_point(name: str, delay_s: float = 0.3) -> None:
    """Test hook: SIGKILL this process here when $EDGEFLEET_TEST_KILL_AT is `name` (never set in production).

    The short wait first lets paho's thread send whatever it would have sent by then (e.g. a PUBACK), so
    a test sees what a real crash at this point leaves behind.
    """
    if os.environ.get(KILL_POINT_ENV) == name:
        time.sleep(delay_s)
        os.kill(os.getpid(), signal.SIGKILL)


def open_trust(config: AgentConfig, state_dir: Path) -> Tuple[Any, Any]:
    """The trust store and version ledger of this device."""
    from edgefleet.agent.core.ledger import VersionLedger
    from edgefleet.agent.core.trust import TrustStore

    try:
        return TrustStore.open(state_dir, list(config.trusted_keys)), VersionLedger(state_dir)
    except (VerifyError, OSError, ValueError) as exc:
        raise StartupError(
            ExitCode.TRUST,
            f"no usable trusted key ({', '.join(config.trusted_keys)}): {exc}; "
            "pass the fleet's .pub file with --trusted-key",
        ) from None


def load_profile(config: AgentConfig) -> Tuple[Any, int]:
    """The device profile (emulated or real) and the inference threads it allows."""
    name = config.emulate or config.profile
    try:
        from edgefleet.device_profiles import load_profile as load

        profile = load(name)
    except Exception as exc:  # the loader's own error types name the problem
        raise StartupError(ExitCode.PROFILE, f"device profile {name!r} cannot be loaded: {exc}") from None
    wanted = list(profile.runtime_names()) if hasattr(profile, "runtime_names") else []
    if wanted and not any(runtime_installed(r) for r in wanted):
        raise StartupError(
            ExitCode.PROFILE,
            f"profile {profile.name!r} runs models on {', '.join(wanted)}, and none is installed: "
            "pip install 'edgefleet[agent]' (onnxruntime) or 'edgefleet[tflite]'",
        )
    threads = int(getattr(profile, "threads", 0) or getattr(profile, "cores", 1) or 1)
    if config.emulate:
        # Emulating a device on this machine: no more threads than it has cores, nor than this host has.
        threads = min(threads, int(profile.cores), os.cpu_count() or 1)
    return profile, max(1, threads)


def runtime_installed(name: str) -> bool:
    """Whether a runtime's Python package is importable (found without importing it)."""
    import importlib.util

    modules = _RUNTIME_MODULES.get(name, (name,))
    return any(importlib.util.find_spec(m) is not None for m in modules)
