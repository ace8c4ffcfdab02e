"""Issue 15 point 9: tests leave the real home and the checkout alone.

The suite runs with $EDGEFLEET_HOME in pytest's temp folder (tests/conftest.py `isolated_edgefleet_home`),
so a rollout's deltas or keys of any test never land in ~/.edgefleet; the dashboard
screenshot goes to tmp_path unless $EDGEFLEET_UPDATE_SCREENSHOT=1 (tests/test_dashboard_browser.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.core.paths import edgefleet_home


def test_edgefleet_home_is_in_pytests_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    # prepare
    base = tmp_path_factory.getbasetemp().resolve()
    # act
    home = edgefleet_home().resolve()
    # assert: not the real ~/.edgefleet, but a folder of this run
    assert home != (Path.home() / ".edgefleet").resolve()
    assert base in home.parents, (home, base)


def test_a_process_a_test_starts_inherits_the_isolated_home(tmp_path: Path) -> None:
    # act: what a CLI or agent subprocess sees as its home
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgefleet.agent.core.paths import edgefleet_home; print(edgefleet_home())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout.strip()
    # assert
    assert Path(out).resolve() == edgefleet_home().resolve()
    assert Path(out).resolve() != (Path.home() / ".edgefleet").resolve()


ROOT = Path(__file__).resolve().parent.parent


def test_make_test_installs_the_system_packages_its_tests_need() -> None:
    # prepare
    makefile = (ROOT / "Makefile").read_text()
    script = ROOT / "scripts" / "ensure-system-deps.sh"
    # act: the prerequisites of `test` and the recipe of `deps`, as make reads them
    rules = {
        line.split(":", 1)[0]: line.split(":", 1)[1].split()
        for line in makefile.splitlines()
        if line and not line.startswith(("\t", "#", " ")) and ":" in line and "=" not in line
    }
    recipe = makefile.split("\ndeps:", 1)[1].split("\n\n", 1)[0]
    # assert: `make test` runs the same install step as .ci/run, and it covers what the tests drive
    assert "deps" in rules["test"], rules["test"]
    assert "scripts/ensure-system-deps.sh" in recipe
    assert "scripts/ensure-system-deps.sh" in (ROOT / ".ci" / "run").read_text()
    assert os.access(script, os.X_OK)
    text = script.read_text()
    for package in ("mosquitto", "chromium", "chromium-driver", "espeak-ng", "nats-server"):
        assert f"need+=({package}" in text or f" {package})" in text, package


def test_the_install_step_does_nothing_when_everything_is_there(tmp_path: Path) -> None:
    # prepare: stand-ins for the commands it checks on PATH, and an apt-get that must not run
    for name in ("mosquitto", "chromium", "chromedriver", "npm", "espeak-ng", "nats-server"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    (tmp_path / "apt-get").write_text("#!/bin/sh\necho apt-get ran >&2\nexit 3\n")
    (tmp_path / "apt-get").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    # act
    done = subprocess.run(
        [str(ROOT / "scripts" / "ensure-system-deps.sh")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    # assert
    assert done.returncode == 0, done.stderr
    assert "apt-get ran" not in done.stderr
