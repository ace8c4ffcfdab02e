"""A device's install: `pip install 'edgefleet[agent]'` in a fresh venv pulls no host libraries and the agent runs.

Each case names the interpreter it wants and is skipped, with the reason, where that one is absent: it
never falls back to the interpreter running the tests. Python 3.9 installs from the source tree (the
oldest that can build it: setuptools >= 77); Python 3.8 installs the wheel, as a JetPack 5 device gets it
from PyPI. tests/test_agent_oldest_deps.py runs the agent on 3.8 with the oldest declared versions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYENV = Path.home() / ".pyenv" / "versions"
# What a device must never download: the host's heavy libraries.
FORBIDDEN = {"torch", "onnx", "transformers", "fastapi", "onnxscript", "litert-torch", "scikit-learn"}


def _copy_sources(dest: Path) -> Path:
    """Copy the sources, so the build writes its egg-info and build/ into tmp, not the checkout."""
    top_level = {".venv", ".git", "build", "dist", "out", ".mypy-src", ".edgefleet-cache", ".gl", ".whl"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", "_cache"))}
        return skip | (top_level & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _interpreter(version: str) -> Path:
    """pyenv's Python `version` (e.g. 3.9.18), or skip the test saying which one is missing."""
    python = PYENV / version / "bin" / "python3"
    if not python.exists():
        pytest.skip(f"needs Python {version} at {python}; not run on another interpreter")
    return python


@pytest.mark.slow
@pytest.mark.parametrize(
    ("version", "source"), [("3.9.18", "tree"), ("3.8.18", "wheel")], ids=["py3.9-tree", "py3.8-wheel"]
)
def test_agent_extra_installs_no_host_libraries(tmp_path: Path, version: str, source: str) -> None:
    # prepare
    python = _interpreter(version)
    src = _copy_sources(tmp_path / "src")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if source == "wheel":
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
            check=True,
            timeout=600,
            env=env,
        )
        [target] = [str(p) for p in tmp_path.glob("edgefleet-*.whl")]
    else:
        target = str(src)
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"

    # act
    subprocess.run([str(pip), "install", "-q", f"{target}[agent]"], check=True, timeout=600, env=env)
    listed = subprocess.run(
        [str(pip), "list", "--format=freeze"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    used = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.version.split()[0])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    helped = subprocess.run(
        [str(venv / "bin" / "edgefleet-agent"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # assert
    print(f"interpreter: {python} (Python {used}), installed from the {source}")
    assert used == version, f"the venv runs Python {used}, not {version}"
    installed = {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}
    assert "onnxruntime" in installed and "paho-mqtt" in installed
    assert not (installed & FORBIDDEN), f"the agent extra pulled host libraries: {installed & FORBIDDEN}"
    assert helped.returncode == 0, helped.stderr
    assert "--device-id" in helped.stdout and "exit codes" in helped.stdout.lower()
