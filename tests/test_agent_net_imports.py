"""The agent's import graph stays device-sized: no torch, onnx, fastapi or host SDK, lazy paho/runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = (
    "torch",
    "onnx",
    "onnxslim",
    "fastapi",
    "sqlalchemy",
    "transformers",
    "cryptography",
    "edgefleet.sdk",
)
AGENT_MODULES = [
    "edgefleet.agent.core.protocol",
    "edgefleet.agent.config",
    "edgefleet.agent.exitcodes",
    "edgefleet.agent.transfer",
    "edgefleet.agent.mqtt_session",
    "edgefleet.agent.daemon",
    "edgefleet.agent.cli",
]


def _modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _all_agent_modules() -> list[str]:
    """Every module under agent/ (whoever wrote it), so the rule covers the whole device side."""
    root = Path(__file__).resolve().parents[1] / "agent"
    names = set(AGENT_MODULES)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.add(".".join(["edgefleet.agent", *parts]))
    return sorted(names)


def test_agent_modules_import_nothing_from_the_host_side() -> None:
    loaded = _modules_after("\n".join(f"import {m}" for m in _all_agent_modules()))
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []


def test_cli_help_path_does_not_load_paho_or_numpy() -> None:
    loaded = _modules_after("import edgefleet.agent.cli")
    assert not [m for m in loaded if m.startswith(("paho", "numpy", "onnxruntime"))]
