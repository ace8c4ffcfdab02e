"""The device side imports no host library: not torch, onnx, cryptography, nor edgefleet.sdk."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgefleet.agent
import edgefleet.device_profiles

FORBIDDEN = (
    "torch",
    "onnx",
    "onnxslim",
    "fastapi",
    "sqlalchemy",
    "transformers",
    "cryptography",
    "edgefleet.sdk",
    "edgefleet.converters",
)


def _modules() -> list[str]:
    names = []
    for pkg in (edgefleet.agent, edgefleet.device_profiles):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def test_agent_and_profiles_import_no_host_library() -> None:
    # prepare
    modules = ["edgefleet.agent", "edgefleet.device_profiles", *_modules()]
    assert "edgefleet.agent.core.verify" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # act
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    # assert
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    leaked = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert leaked == [], f"the agent side pulled in host libraries: {leaked}"


def _oldest_python() -> str | None:
    """A working Python 3.9 interpreter, the oldest the agent supports, when this machine has one."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python")))
    candidates.append(shutil.which("python3.9") or "")
    for candidate in filter(None, candidates):
        # pyenv shims exist even where the version is not selected; only a real run proves it works.
        probe = subprocess.run([candidate, "-c", "pass"], check=False, capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


def test_verification_modules_run_on_python_3_9(tmp_path: Path) -> None:
    # prepare: a package layout for the agent alone, as a device without the host side sees it
    python = _oldest_python()
    if python is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    pkg = tmp_path / "site" / "edgefleet"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    os.symlink(Path(edgefleet.agent.__file__).parent, pkg / "agent")
    from edgefleet.agent.core.manifest import canonical_bytes

    manifest = {
        "schema": "edgefleet.manifest/1",
        "name": "m",
        "version": 1,
        "created": "2026-01-01T00:00:00Z",
        "expires": "2027-01-01T00:00:00Z",
        "target": {"profile": "rpi3b"},
        "model": {"file": "model.tflite", "format": "tflite", "runtime": "tflite"},
        "inputs": [{"name": "x", "dtype": "uint8", "shape": [1, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": None}],
        "files": {
            "model.tflite": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
            "eval.npz": {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()},
        },
        "eval": {"file": "eval.npz", "kind": "reference", "metric": "top1_agreement"},
        "health": {"min_fidelity": 0.9},
    }
    (tmp_path / "manifest.json").write_bytes(canonical_bytes(manifest))
    (tmp_path / "model.tflite").write_bytes(b"abc")
    script = (
        "import sys\n"
        "from edgefleet.agent.core.manifest import Manifest\n"
        "from edgefleet.agent.core.verify import verify_file\n"
        "from edgefleet.agent.core.ledger import VersionLedger\n"
        "import edgefleet.agent.core.trust\n"
        f"m = Manifest.from_bytes(open({str(tmp_path / 'manifest.json')!r}, 'rb').read())\n"
        f"verify_file({str(tmp_path / 'model.tflite')!r}, m.files['model.tflite'], 10)\n"
        f"VersionLedger({str(tmp_path / 'state')!r}).record(m.name, m.version)\n"
        "print(sys.version_info[:2], m.name, m.version)\n"
    )
    # act
    done = subprocess.run(
        [python, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": os.environ.get("PATH", "")},
    )
    # assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(3, 9) m 1"
