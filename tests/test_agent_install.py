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
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

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


@pytest.mark.slow
def test_wheel_builds_without_setuptools_warnings(tmp_path: Path) -> None:
    # act: the backend's own output (-v), as `pip install .` shows it on a warning
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(_copy_sources(tmp_path / "src")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )

    # assert
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for sign in (
        "BuildBackendWarning",
        "SetuptoolsDeprecationWarning",
        "is deprecated",
        "absent from the `packages`",
    ):
        assert sign not in text, f"{sign!r} in the build output:\n{text[-4000:]}"
    [wheel] = tmp_path.glob("edgefleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert (
        "edgefleet/sdk/server/static/index.html" in names and "edgefleet/device_profiles/rpi4b.toml" in names
    )
    assert any(n.startswith("edgefleet/sdk/compress/data/") for n in names)
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.8" in metadata


def _floors() -> dict[str, str]:
    """Package → floor of the base install and the agent extras, as pyproject.toml declares them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out: dict[str, str] = {}
    for text in [*project["dependencies"], *extras["agent"], *extras["tflite"]]:
        req = Requirement(text)
        out[req.name.lower()] = next(s.version for s in req.specifier if s.operator == ">=")
    return out


def test_docs_state_the_declared_floors_pythons_and_devices() -> None:
    # prepare
    floors = _floors()
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Installing") : readme.index("## Command line")]
    agent_doc = (REPO / "docs" / "agent.md").read_text()
    profiles_doc = (REPO / "docs" / "profiles.md").read_text()
    from edgefleet.device_profiles import load_profile

    nano = load_profile("jetson-nano")

    # act
    shown = {"numpy": "numpy", "paho-mqtt": "paho-mqtt", "onnxruntime": "onnxruntime", "pynacl": "PyNaCl"}
    shown |= {"ai-edge-litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}
    wanted = [f"{shown[name]} ≥ {floors[name]}" for name in shown]

    # assert: the install section and the agent doc name the floors the oldest-deps test installs
    for text in wanted:
        assert text in install, f"README's install section lacks {text!r}"
        assert text in agent_doc, f"docs/agent.md lacks {text!r}"
    assert "Python 3.8+" in install and "Python ≥ 3.10" in install
    assert "32-bit" in install and "unsupported" in install and "unsupported" in agent_doc
    # the Nano: Python 3.8, CPU runtimes only, and the docs say so
    assert nano.python == "3.8"
    assert not {"onnxruntime-cuda", "onnxruntime-tensorrt"} & set(nano.runtimes)
    assert "| `jetson-nano` |" in profiles_doc and ", ".join(nano.runtimes) in profiles_doc
    assert (
        "## Jetson Nano (JetPack 4.6)" in profiles_doc
        and "32-bit Raspberry Pi OS (armv7l) is not supported" in profiles_doc
    )
