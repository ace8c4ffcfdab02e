"""A Pi's install: `pip install '.[agent]'` in a fresh venv pulls no host libraries and the agent runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a device must never download: the host's heavy libraries.
FORBIDDEN = {"torch", "onnx", "transformers", "fastapi", "onnxscript", "litert-torch", "scikit-learn"}
# The oldest Python the agent supports; fall back to this interpreter when pyenv does not have it.
PY39 = Path.home() / ".pyenv" / "versions" / "3.9.18" / "bin" / "python"


def _copy_sources(dest: Path) -> Path:
    """Copy the tracked tree, so the build writes its egg-info into tmp, not the checkout."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".mypy-src", "*_cache"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_agent_extra_installs_no_host_libraries(tmp_path: Path) -> None:
    # prepare
    python = str(PY39) if PY39.exists() else sys.executable
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    # act
    subprocess.run([str(pip), "install", "-q", f"{src}[agent]"], check=True, timeout=600, env=env)
    listed = subprocess.run(
        [str(pip), "list", "--format=freeze"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    helped = subprocess.run(
        [str(venv / "bin" / "edgefleet-agent"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # assert
    installed = {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}
    assert "onnxruntime" in installed and "paho-mqtt" in installed
    assert not (installed & FORBIDDEN), f"the agent extra pulled host libraries: {installed & FORBIDDEN}"
    assert helped.returncode == 0, helped.stderr
    assert "--device-id" in helped.stdout and "exit codes" in helped.stdout.lower()
