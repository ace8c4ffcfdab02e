"""The agent core imports no engine or host library until a model needs one (keeps the no-model RSS low)."""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = (
    "edgefleet.agent.core.runtimes",
    "edgefleet.agent.server",
    "edgefleet.agent.health",
    "edgefleet.agent.slots",
    "edgefleet.agent.installer",
    "edgefleet.agent.telemetry",
    "edgefleet.agent.local_api",
)
NEVER = ("torch", "onnx", "fastapi", "sqlalchemy", "transformers", "cryptography", "edgefleet.sdk")
LAZY = ("numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime")


def test_core_modules_import_no_heavy_library() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + f"print(json.dumps(sorted(m for m in {NEVER + LAZY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_loading_a_runtime_plugin_does_not_import_its_engine() -> None:
    code = (
        "import json, sys\n"
        "from edgefleet.agent.core.runtimes.base import runtime_class\n"
        "runtime_class('onnxruntime'); runtime_class('tflite')\n"
        "print(json.dumps(sorted(m for m in ('onnxruntime', 'ai_edge_litert') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == []
