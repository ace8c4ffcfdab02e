"""The agent on Python 3.8 with the oldest dependency versions pyproject.toml declares for it.

One venv per set of pins, cached under .edgefleet-cache/ (gitignored), holds exactly the floors of the base
install and the `agent` and `tflite` extras (read from pyproject.toml, so raising a floor retests at the new
one), plus pytest. Each run installs a wheel of the working tree into it, then checks: every agent module
imports on 3.8; the agent test files that need no host SDK pass there; a TFLite model runs there; every
ONNX candidate a host build produces loads in its onnxruntime and gives the host's numbers; a real agent
process from that venv receives the bundle the host built, pushed through a real Mosquitto, installs it
and answers local HTTP inferences; and installing the `host` extra is refused on 3.8.

When Python 3.8 is absent the tests are skipped with the reason: they never fall back to another
interpreter (`EDGEFLEET_PY38=/path/to/python3.8` points them at another one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
WANTED = (3, 8)
PY38 = Path(
    os.environ.get("EDGEFLEET_PY38", Path.home() / ".pyenv" / "versions" / "3.8.18" / "bin" / "python3.8")
)
CACHE = REPO / ".edgefleet-cache" / "agent-py38-oldest"
AGENT_EXTRAS = ("agent", "tflite")
# The last releases that run on Python 3.8; test tools only, never imported by the agent.
TEST_TOOLS = ("pytest==8.3.5", "pytest-timeout==2.3.1", "hypothesis==6.113.0")
# Agent test files that need neither the host SDK nor torch / onnx (those build their fixtures with them).
AGENT_TEST_SUBSET = (
    "tests/test_agent_core_telemetry.py",
    "tests/test_agent_net_protocol.py",
    "tests/test_agent_net_session.py",
    "tests/test_agent_net_transfer.py",
    "tests/test_agent_net_transfer_hash.py",
)
# What the agent must never import, on any Python.
FORBIDDEN_MODULES = ("torch", "onnx", "fastapi", "edgefleet.sdk", "typer", "rich")
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}

pytestmark = pytest.mark.slow


def oldest_pins(python_version: str = "3.8") -> dict[str, str]:
    """Package → the floor (`>=`) pyproject.toml declares for it, over the base install and the agent extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [(req, "") for req in project["dependencies"]]
    declared += [(req, extra) for extra in AGENT_EXTRAS for req in project["optional-dependencies"][extra]]
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    pins: dict[str, str] = {}
    for text, extra in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        assert floors, (
            f"pyproject.toml: {text!r} needs a floor (>=): the oldest-deps test installs the floors"
        )
        pins[canonicalize_name(req.name)] = max(floors, key=Version)
    return pins


def _run(args: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **PIP_ENV}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, check=False, cwd=cwd
    )


def _ok(out: subprocess.CompletedProcess[str], what: str) -> str:
    assert out.returncode == 0, (
        f"{what} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


@dataclass
class OldestVenv:
    """The cached Python 3.8 venv with the agent's oldest dependencies and this tree's wheel."""

    root: Path
    pins: dict[str, str]
    wheel: Path

    @property
    def python(self) -> str:
        """Its interpreter."""
        return str(self.root / "bin" / "python")

    def script(self, name: str) -> str:
        """A console script it installed."""
        return str(self.root / "bin" / name)


def _interpreter_version(python: Path) -> tuple[int, int] | None:
    if not python.exists():
        return None
    out = _run([str(python), "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"], 30)
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _cached_venv(pins: dict[str, str]) -> Path:
    """The venv holding exactly `pins` and the test tools; built once per set of pins."""
    constraints = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    key = hashlib.sha256(f"{PY38.resolve()}\n{constraints}{TEST_TOOLS}".encode()).hexdigest()[:16]
    root = CACHE / key
    stamp = root / ".complete"
    if stamp.exists() and (root / "constraints.txt").is_file():
        return root
    if CACHE.exists():  # older pin sets, or a half-built venv
        shutil.rmtree(CACHE)
    _ok(_run([str(PY38), "-m", "venv", str(root)], 120), "python3.8 -m venv")
    (root / "constraints.txt").write_text(constraints)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(root / "constraints.txt")]
    _ok(_run([*pip, *pins, *TEST_TOOLS], 900), "installing the oldest pins")
    stamp.write_text(constraints)
    return root


def _copy_tracked_tree(dest: Path) -> None:
    """Copy the sources (not the venvs, caches or build output), so a build writes only into `dest`."""
    top_level = {".venv", ".git", "build", "dist", "out", ".mypy-src", ".edgefleet-cache", ".gl", ".whl"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", "_cache"))}
        return skip | (top_level & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, dest, ignore=ignore)


@pytest.fixture(scope="module")
def oldest(tmp_path_factory: pytest.TempPathFactory) -> OldestVenv:
    """The Python 3.8 venv with the oldest declared agent dependencies and a wheel of this tree installed."""
    version = _interpreter_version(PY38)
    if version != WANTED:
        pytest.skip(
            f"needs Python {WANTED[0]}.{WANTED[1]} at {PY38} (found: "
            f"{'.'.join(map(str, version)) if version else 'nothing'}); set "
            "EDGEFLEET_PY38 or `pyenv install 3.8.18`. Not run on another interpreter."
        )
    pins = oldest_pins()
    root = _cached_venv(pins)
    # A wheel, as a device gets it from PyPI: building the source needs setuptools >= 77 (Python >= 3.9).
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    _copy_tracked_tree(src)
    _ok(
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(src)], 600),
        "pip wheel",
    )
    [wheel] = tmp.glob("edgefleet-*.whl")
    pip = [str(root / "bin" / "python"), "-m", "pip"]
    _ok(
        _run([*pip, "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], 300),
        "installing the wheel",
    )
    # The declared requirements resolve with the pins already there: nothing may be upgraded or added.
    constraints = str(root / "constraints.txt")
    extras = ",".join(AGENT_EXTRAS)
    _ok(
        _run([*pip, "install", "-q", "-c", constraints, f"{wheel}[{extras}]"], 600),
        "pip install [agent,tflite]",
    )
    _ok(_run([*pip, "check"], 120), "pip check")
    return OldestVenv(root, pins, wheel)


def test_venv_is_python38_with_exactly_the_declared_floors(oldest: OldestVenv) -> None:
    # act
    version = _run([oldest.python, "-c", "import sys; print(sys.version.split()[0])"], 30).stdout.strip()
    frozen = _ok(_run([oldest.python, "-m", "pip", "list", "--format=freeze"], 60), "pip list")
    meta = _run(
        [
            oldest.python,
            "-c",
            "import importlib.metadata as m; print(m.metadata('edgefleet')['Requires-Python'])",
        ],
        30,
    )

    # assert
    print(f"interpreter: {PY38} (Python {version}); pins: {oldest.pins}")
    assert version.startswith("3.8."), version
    installed = {
        canonicalize_name(n): v for n, v in (line.split("==") for line in frozen.splitlines() if "==" in line)
    }
    for name, floor in oldest.pins.items():
        assert name in installed, f"{name} is not installed on 3.8"
        assert Version(installed[name]) == Version(floor), (
            f"{name}: {installed[name]} installed, floor is {floor}"
        )
    assert {"numpy", "onnxruntime", "paho-mqtt", "pynacl", "tflite-runtime"} <= set(oldest.pins)
    assert meta.stdout.strip() == ">=3.8"


def test_every_agent_module_imports_on_python38(oldest: OldestVenv) -> None:
    # prepare: import every module of the agent and of the profiles, then load every built-in profile
    script = f"""
import importlib, json, pkgutil, sys
import edgefleet.agent, edgefleet.device_profiles
names = []
for pkg in (edgefleet.agent, edgefleet.device_profiles):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
from edgefleet.device_profiles import builtin_names, load_profile
profiles = [load_profile(n).name for n in builtin_names() if n != "host"]
from edgefleet.agent.core.runtimes.tflite import _interpreter_class
bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN_MODULES!r}))
print(json.dumps({{"modules": names, "profiles": profiles, "tflite": _interpreter_class()[1], "forbidden": bad}}))
"""
    # act
    out = json.loads(_ok(_run([oldest.python, "-c", script], 120, cwd=oldest.root), "importing the agent"))

    # assert
    assert "edgefleet.agent.daemon" in out["modules"] and "edgefleet.agent.core.protocol" in out["modules"]
    assert len(out["modules"]) >= 20, out["modules"]
    assert "jetson-nano" in out["profiles"] and "rpi4b" in out["profiles"]
    assert out["tflite"] == "tflite_runtime"  # ai-edge-litert has no Python 3.8 wheels
    assert out["forbidden"] == []


def test_agent_test_subset_passes_on_python38(oldest: OldestVenv, tmp_path: Path) -> None:
    # act: the repository's own agent tests, run by the 3.8 interpreter against the installed wheel
    out = _run(
        [
            oldest.python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
            *AGENT_TEST_SUBSET,
        ],
        900,
        cwd=REPO,
    )

    # assert
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and "error" not in tail.lower().split("passed")[-1]


@pytest.mark.tflite
def test_tflite_model_runs_on_python38(oldest: OldestVenv, tmp_path: Path) -> None:
    # prepare: a TFLite model converted on the host (batch fixed at 1), in a child so TF's logs stay there
    pytest.importorskip("litert_torch")
    model = tmp_path / "m.tflite"
    convert = (
        "import torch, litert_torch, numpy as np, sys\n"
        "torch.manual_seed(0)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()\n"
        "litert_torch.convert(net, (torch.zeros(1, 8),)).export(sys.argv[1])\n"
        "x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)\n"
        "np.save(sys.argv[2], x)\n"
        "np.save(sys.argv[3], net(torch.from_numpy(x)).detach().numpy())\n"
    )
    _ok(
        _run(
            [sys.executable, "-c", convert, str(model), str(tmp_path / "x.npy"), str(tmp_path / "want.npy")],
            300,
        ),
        "convert",
    )
    run = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from edgefleet.agent.core.runtimes import load_runtime\n"
        "rt = load_runtime('tflite', Path(sys.argv[1]), threads=1)\n"
        "out = rt.run({rt.inputs[0].name: np.load(sys.argv[2])})\n"
        "np.save(sys.argv[3], out[0])\n"
        "print(rt.providers[0])\n"
    )

    # act
    got = _ok(
        _run([oldest.python, "-c", run, str(model), str(tmp_path / "x.npy"), str(tmp_path / "got.npy")], 120),
        "tflite on 3.8",
    )

    # assert
    assert got.strip() == "tflite_runtime:XNNPACK"
    np.testing.assert_allclose(
        np.load(tmp_path / "got.npy"), np.load(tmp_path / "want.npy"), rtol=1e-4, atol=1e-5
    )


@pytest.fixture(scope="module")
def host_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The host's own `build()` of a small classifier for x86-64: bundle, keys, every candidate's file."""
    torch = pytest.importorskip("torch")
    from edgefleet.sdk.build.builder import PlanOptions, build
    from edgefleet.sdk.trust.keys import init_keys

    root = tmp_path_factory.mktemp("host-build")
    keys = init_keys(root / "keys")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(root / "eval.npz", x=x, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch / TensorFlow noise; the build's own errors still raise
        result = build(
            net,
            "x86-64",
            eval=root / "eval.npz",
            out=root / "bundle",
            private_key=keys.private_path,
            plan=PlanOptions(prune_levels=()),
            workdir=root / "work",
            max_accuracy_drop=0.05,
            name="tiny",
        )
    return {"bundle": result.bundle_dir, "pub": keys.public_path, "work": root / "work", "x": x[:3]}


def _host_outputs(model: Path, x: np.ndarray) -> np.ndarray:
    """The first output of `model` on this host, through the agent's own runtime classes."""
    from edgefleet.agent.core.runtimes import load_runtime

    runtime = load_runtime("onnxruntime" if model.suffix == ".onnx" else "tflite", model, threads=1)
    return np.asarray(runtime.run({runtime.inputs[0].name: x})[0])


def test_every_onnx_candidate_the_host_builds_loads_on_the_oldest_onnxruntime(
    oldest: OldestVenv, host_build: dict[str, Any], tmp_path: Path
) -> None:
    # prepare: each ONNX file the build produced (fp32, onnxruntime-optimized, int8 dynamic / static /
    # mixed), made portable the way the bundle writer does it
    from edgefleet.converters.onnx_portable import drop_unused_opset_imports

    models = sorted(Path(host_build["work"]).rglob("*.onnx"))
    assert len(models) >= 4, models
    x = host_build["x"]
    np.save(tmp_path / "x.npy", x)
    want = {}
    for index, source in enumerate(models):
        copy = tmp_path / f"m{index}.onnx"
        shutil.copy(source, copy)
        drop_unused_opset_imports(copy)
        want[copy.name] = _host_outputs(copy, x)
    script = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        "x = np.load(sys.argv[1]); out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    out[path] = s.run(None, {s.get_inputs()[0].name: x})[0].tolist()\n"
        "print(json.dumps(out))\n"
    )

    # act
    paths = [str(tmp_path / name) for name in want]
    got = json.loads(
        _ok(_run([oldest.python, "-c", script, str(tmp_path / "x.npy"), *paths], 300), "ORT 1.16")
    )

    # assert: the same numbers as the host's onnxruntime, for every candidate
    for name, expected in want.items():
        np.testing.assert_allclose(np.asarray(got[str(tmp_path / name)]), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.broker
def test_real_agent_on_python38_installs_a_host_built_bundle_and_serves_http(
    oldest: OldestVenv, host_build: dict[str, Any], tmp_path: Path, mosquitto_factory: Any, fleet_name: str
) -> None:
    # prepare: the bundle the host built and signed; the agent runs from the 3.8 venv
    from edgefleet.agent.core.protocol import Topics
    from tests.agent_net_support import PERSISTENT_BROKER, AgentProcess, Observer, agent_args
    from tests.fleet_support import Host

    bundle = Path(host_build["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_file, input_name = manifest["model"]["file"], manifest["inputs"][0]["name"]
    x = host_build["x"]
    want = _host_outputs(bundle / model_file, x)
    broker = mosquitto_factory(PERSISTENT_BROKER)
    device, state = "py38-1", tmp_path / "py38-1"
    args = agent_args(state, broker.url, fleet_name, device, host_build["pub"], "--http-port", "0")
    args = [oldest.script("edgefleet-agent"), *(a for a in args[3:] if a != "--no-http")]
    observer = Observer(broker.url, Topics(fleet_name, device).state)
    agent = AgentProcess(args, tmp_path / "agent.log")
    host = Host(broker.url, fleet_name, tmp_path / "host", host_build["pub"])
    try:
        agent.start()
        observer.next(lambda t, p: json.loads(p).get("online") is True, timeout=60)

        # act
        outcome = host.deploy(bundle, device, timeout_s=120)
        assert outcome.status == "deployed", (outcome, agent.log()[-3000:])
        port = json.loads((state / "http.port").read_text())["port"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/infer",
            data=json.dumps({"inputs": {input_name: x.tolist()}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=30) as response:
            served = json.loads(response.read())
    finally:
        host.close()
        observer.close()
        code = agent.stop()

    # assert
    log = agent.log()
    print(f"agent on {oldest.python}; chosen model {model_file}; served {served}")
    [got] = list(answer["outputs"].values())
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=1e-3, atol=1e-3)
    assert served["version"] == manifest["version"], served
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_host_extra_is_refused_on_python38(oldest: OldestVenv) -> None:
    # act: what `pip install 'edgefleet[host]'` says on a 3.8 device (resolution only, nothing installed)
    refused = _run([oldest.python, "-m", "pip", "install", "--dry-run", f"{oldest.wheel}[host]"], 600)
    cli = _run([oldest.script("edgefleet"), "--help"], 60)

    # assert
    assert refused.returncode != 0
    assert "Requires-Python >=3.10" in refused.stderr, refused.stderr[-3000:]
    assert cli.returncode != 0
    assert "needs Python >= 3.10" in cli.stderr and "edgefleet-agent" in cli.stderr, cli.stderr[-2000:]
