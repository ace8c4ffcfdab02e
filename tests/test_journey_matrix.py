"""Every model a user brings, built and served end to end (issue 13's journey matrix).

A small residual CNN on the 8×8 digits, defined and trained here (not the zoo), is given to the build as
each source a user has: the nn.Module, a torch.export `.pt2` with a dynamic batch, a `.pt2` with batch 1,
TorchScript, `.onnx` and `.tflite`. Each source is built for each runtime (onnxruntime, TFLite) it can
become, with labelled and with reference eval data: build → `edgefleet inspect` says VERIFIED → the
fleet deploys it to a real agent process over a real Mosquitto → the agent's health check passes → its
local HTTP API answers what the model answers on the host → telemetry in the store carries latency and
quality. A pair no source can give fails at once with an error naming a source that can. Builds,
agents and the broker are shared by every case (module-scoped fixtures).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from edgefleet.sdk.build import builder  # noqa: E402
from edgefleet.sdk.build.errors import BuildError  # noqa: E402
from edgefleet.sdk.build.plan import PlanOptions  # noqa: E402
from tests.agent_net_support import AgentProcess, agent_args  # noqa: E402
from tests.build_support import FakeProfile  # noqa: E402
from tests.conftest import Mosquitto, free_port, wait_for_port  # noqa: E402
from tests.fleet_support import Host, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.tflite]

SOURCES = ("module", "pt2-dynamic", "pt2-batch1", "torchscript", "onnx", "tflite")
RUNTIMES = ("onnxruntime", "tflite")
EVALS = ("labels", "reference")
# The pairs no source can give, and what their error must say (each names a source that can).
IMPOSSIBLE = {
    ("torchscript", "tflite"): "cannot convert a TorchScript file to TFLite",
    ("onnx", "tflite"): "cannot convert an .onnx file to TFLite",
    ("tflite", "onnxruntime"): "cannot become ONNX",
}
PROFILE = "rpi4b"  # a real profile offering both runtimes; each build narrows it to one
BASELINE = {"onnxruntime": "onnx-fp32", "tflite": "tflite-fp32"}
AGENT_OF = {"onnxruntime": "dev-ort", "tflite": "dev-tfl"}


class ResidualCNN(torch.nn.Module):
    """stem → one residual block → global average → linear: the kind of model a user brings."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
        return self.head(h.mean(dim=(2, 3)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return x, digits.target.astype(np.int64)


def _train(x: np.ndarray, y: np.ndarray) -> ResidualCNN:
    """A few mini-batch epochs (~85 % accuracy): quality only has to be the same on host and device."""
    torch.manual_seed(0)
    model = ResidualCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CI machine
    try:
        for _ in range(15):
            for start in range(0, len(xt), 64):
                optimiser.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(xt[start : start + 64]), yt[start : start + 64]
                )
                loss.backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@dataclass
class World:
    """The trained model, its sources on disk, the data files and the fleet's keys."""

    root: Path
    model: ResidualCNN
    sources: dict[str, Any]
    calib: Path
    evals: dict[str, Path]
    x_eval: np.ndarray
    private_key: Path
    public_key: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Train once and save the model in every form a user may hand over."""
    import litert_torch

    from edgefleet.sdk.trust.keys import init_keys

    root = tmp_path_factory.mktemp("journey")
    x, y = _digits()
    model = _train(x[:1200], y[:1200])
    example = torch.from_numpy(x[:4])
    dynamic = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(root / "dynamic.pt2"))
    torch.export.save(torch.export.export(model, (example[:1],)), str(root / "batch1.pt2"))
    torch.jit.save(torch.jit.script(model), str(root / "model.pt"))
    torch.onnx.export(
        model, (example,), str(root / "model.onnx"), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    litert_torch.convert(model, (example[:1],)).export(str(root / "model.tflite"))
    np.savez(root / "calib.npz", x=x[:200])
    np.savez(root / "labels.npz", x=x[1300:1500], y=y[1300:1500])
    np.savez(root / "reference.npz", x=x[1300:1500])
    keys = init_keys(root / "keys")
    return World(
        root=root,
        model=model,
        sources={
            "module": model,
            "pt2-dynamic": root / "dynamic.pt2",
            "pt2-batch1": root / "batch1.pt2",
            "torchscript": root / "model.pt",
            "onnx": root / "model.onnx",
            "tflite": root / "model.tflite",
        },
        calib=root / "calib.npz",
        evals={"labels": root / "labels.npz", "reference": root / "reference.npz"},
        x_eval=x[1500:1504],
        private_key=keys.private_path,
        public_key=keys.public_path,
    )


@dataclass
class Fleet:
    """One broker, the host's fleet (sender + store) with ingest, and one agent per runtime."""

    host: Host
    store: Any
    fleet: str
    ports: dict[str, int]


def _start_agent(
    root: Path, url: str, fleet: str, device: str, key: Path, profile: str
) -> tuple[AgentProcess, int]:
    """A real agent process with its local HTTP API on a free port."""
    port = free_port()
    args = agent_args(root / device, url, fleet, device, key)
    args[args.index("--no-http")] = "--http-port"
    args.insert(args.index("--http-port") + 1, str(port))
    args[args.index("--profile") + 1] = profile
    (root / device).mkdir(parents=True, exist_ok=True)
    proc = AgentProcess(args, root / f"{device}.log")
    proc.start()
    return proc, port


@pytest.fixture(scope="module")
def fleet(world: World) -> Iterator[Fleet]:
    """Mosquitto, ingest into a store, and agents dev-ort / dev-tfl (rpi4b) plus dev-x86 (x86-64)."""
    from edgefleet.sdk.fleet.ingest import Ingest
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions
    from edgefleet.sdk.store import Store

    root = world.root / "fleet"
    broker = Mosquitto(port=free_port(), workdir=root / "broker")
    broker.start()
    name = f"t{uuid.uuid4().hex[:12]}"
    store = Store(f"sqlite:///{root / 'ingest.db'}")
    ingest = Ingest(store, MqttOptions(broker.url), name, max_delay_s=0.05)
    ingest.start()
    host = Host(broker.url, name, root / "host", world.public_key)
    procs: list[AgentProcess] = []
    ports: dict[str, int] = {}
    try:
        for device, profile in (("dev-ort", PROFILE), ("dev-tfl", PROFILE), ("dev-x86", "x86-64")):
            proc, port = _start_agent(root / "agents", broker.url, name, device, world.public_key, profile)
            procs.append(proc)
            ports[device] = port
        for port in ports.values():
            wait_for_port("127.0.0.1", port, 60)
        wait_for(lambda: all((store.device(name, d) or {}).get("online") for d in ports), 60, "agents online")
        yield Fleet(host=host, store=store, fleet=name, ports=ports)
    finally:
        for proc in procs:
            proc.stop()
        host.close()
        ingest.close()
        store.close()
        broker.stop(kill=True)


def _profile(runtime: str) -> FakeProfile:
    """rpi4b narrowed to one runtime, so the build's baseline is the candidate under test."""
    return FakeProfile(
        name=PROFILE,
        threads=1,
        precisions=("fp32",),
        runtimes=("onnxruntime-cpu",) if runtime == "onnxruntime" else ("tflite-xnnpack",),
    )


def _plan(runtime: str, source: str) -> PlanOptions:
    only = ("tflite-as-given",) if source == "tflite" else (BASELINE[runtime],)
    return PlanOptions(prune_levels=(), mixed_precision=False, static_calibrations=(), only=only)


def _http(port: int, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=20) as reply:
        return json.loads(reply.read())


CASES = [(s, r, e) for s in SOURCES for r in RUNTIMES for e in EVALS]


@pytest.mark.parametrize(("source", "runtime", "eval_kind"), CASES, ids=["-".join(c) for c in CASES])
def test_source_runtime_eval_journey(
    world: World, fleet: Fleet, source: str, runtime: str, eval_kind: str, tmp_path: Path
) -> None:
    # prepare: the source, a profile running only this runtime, and a bundle name of this case alone
    case = f"{source}-{runtime}-{eval_kind}"
    model = world.sources[source]
    if (source, runtime) in IMPOSSIBLE:
        # act: the impossible pair fails before any plug-in or model is loaded
        with mock.patch.object(builder, "load_plugins", side_effect=AssertionError("work started")):
            with pytest.raises(BuildError) as caught:
                builder.build(
                    model, _profile(runtime), calib=world.calib, eval=world.evals[eval_kind],
                    out=tmp_path / "never", plan=_plan(runtime, source), private_key=world.private_key,
                )  # fmt: skip
        # assert: the message says what cannot be done and names a source that can
        message = str(caught.value)
        assert IMPOSSIBLE[(source, runtime)] in message
        assert ".pt2" in message and "torch.export.export(model, (x,)" in message
        assert not (tmp_path / "never").exists()
        return
    out = world.root / "bundles" / case

    # act 1: build
    result = builder.build(
        model, _profile(runtime), calib=world.calib, eval=world.evals[eval_kind], out=out,
        plan=_plan(runtime, source), private_key=world.private_key, name=case, version=7, latency_runs=5,
    )  # fmt: skip
    # assert 1: the bundle holds this runtime's model, verified by the fleet key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["runtime"] == runtime and manifest["version"] == 7
    assert manifest["eval"]["kind"] == eval_kind
    assert result.chosen.spec.runtime == runtime
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app

    inspected = CliRunner().invoke(app, ["inspect", str(out), "--key", str(world.public_key)])
    assert inspected.exit_code == 0 and "VERIFIED" in inspected.output, inspected.output

    # act 2: deploy to the agent of this runtime (its install runs the health check)
    device = AGENT_OF[runtime]
    outcome = fleet.host.deploy(out, device, timeout_s=120)
    # assert 2: deployed means the device's health check passed on the bundle's eval data
    assert outcome.status == "deployed", (outcome.status, outcome.reason)

    # act 3: the device's local HTTP API, one row per request (a batch-1 model takes one row)
    port = fleet.ports[device]
    active = _http(port, "/v1/model")
    assert (active.get("name"), active.get("version")) == (case, 7), active
    answers = [
        _http(port, "/v1/infer", {"inputs": {manifest["inputs"][0]["name"]: row[None].tolist()}})
        for row in world.x_eval
    ]
    # assert 3: the device answers what the model answers on the host
    with torch.no_grad():
        expected = world.model(torch.from_numpy(world.x_eval)).numpy()
    got = np.concatenate([np.asarray(next(iter(a["outputs"].values())), np.float32) for a in answers])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)

    # assert 4: telemetry from the device reaches the store with latency and quality for this model
    column = "accuracy" if eval_kind == "labels" else "fidelity"

    def reading() -> Any:
        for row in fleet.store.latest_telemetry(fleet.fleet, device, limit=20):
            if row["model_name"] == case and row["p50_ms"] is not None and row[column] is not None:
                return row
        return None

    row = wait_for(reading, 30, f"telemetry of {case} with latency and {column}")
    assert row["p50_ms"] > 0
    assert row[column] >= manifest["health"]["min_quality"] - 1e-9


def test_release_for_two_profiles_deploys_each_device_its_profiles_bundle(world: World, fleet: Fleet) -> None:
    # prepare: one release of the .onnx source for rpi4b and x86-64, one name and one version
    from edgefleet.sdk.build.release import build_release

    out = world.root / "release"
    plan = replace(_plan("onnxruntime", "onnx"))
    # act: build both profiles into OUT/<profile>/, then deploy OUT/ to every device
    results = build_release(
        world.sources["onnx"], [PROFILE, "x86-64"], out, version=12, calib=world.calib,
        eval=world.evals["labels"], plan=plan, private_key=world.private_key, name="digits-release",
        latency_runs=5,
    )  # fmt: skip
    manifests = {p: json.loads((out / p / "manifest.json").read_text()) for p in (PROFILE, "x86-64")}
    with mock.patch.dict(os.environ, {"EDGEFLEET_HOME": str(fleet.host.home)}):
        handle = fleet.host.fleet.deploy(out, "all", timeout_s=120, ready_timeout_s=5.0)
    # assert: one name and version; every device got the bundle of its own profile and serves it
    assert set(results) == {PROFILE, "x86-64"}
    assert {(m["name"], m["version"]) for m in manifests.values()} == {("digits-release", 12)}
    assert {p: m["target"]["profile"] for p, m in manifests.items()} == {PROFILE: PROFILE, "x86-64": "x86-64"}
    assert handle.status == "succeeded", fleet.host.fleet.rollout(handle.id)
    row = fleet.host.fleet.rollout(handle.id)
    assert row is not None
    sent = {d["device_id"]: fleet.host.fleet.store.bundle(d["bundle_id"]) for d in row["devices"]}
    for device, profile in (("dev-ort", PROFILE), ("dev-tfl", PROFILE), ("dev-x86", "x86-64")):
        bundle = sent[device]
        assert bundle is not None and bundle["profile"] == profile, (device, bundle)
        assert bundle["manifest_sha256"] == _manifest_sha(out / profile)
        active = _http(fleet.ports[device], "/v1/model")
        assert (active.get("name"), active.get("version")) == ("digits-release", 12), active


def _manifest_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("source", ["pt2-dynamic", "pt2-batch1"])
def test_cli_pt2_only_tflite_fp32_installs_and_serves_the_hosts_predictions(
    world: World, fleet: Fleet, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: the command line, with the real rpi4b profile (both runtimes). Whether TFLite
    # fp32 beats the onnxruntime fp32 baseline on this x86 host is a coin toss for a model this small
    # (0.80x-1.1x in full runs), and the pick then follows the timing; this journey is about the TFLite
    # model's install and answers, so the two count as equally fast here.
    from typer.testing import CliRunner

    from edgefleet.sdk.build.candidate import Candidate
    from edgefleet.sdk.cli import app

    monkeypatch.setattr(Candidate, "speed_tie", property(lambda self: self.speedup is not None))

    out = world.root / "cli" / source
    # act
    result = CliRunner().invoke(app, [
        "build", str(world.sources[source]), "--profile", PROFILE, "--calib", str(world.calib),
        "--eval", str(world.evals["labels"]), "--only", "tflite-fp32", "--key", str(world.private_key),
        "-o", str(out), "--name", f"cli-{source}", "--version", "3",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    outcome = fleet.host.deploy(out, AGENT_OF["tflite"], timeout_s=120)
    port = fleet.ports[AGENT_OF["tflite"]]
    name = json.loads((out / "manifest.json").read_text())["inputs"][0]["name"]
    answers = [_http(port, "/v1/infer", {"inputs": {name: row[None].tolist()}}) for row in world.x_eval]
    # assert: the TFLite candidate was picked (not the baseline), installed, and answers as the host does
    assert json.loads((out / "report.json").read_text())["chosen"] == "tflite-fp32"
    assert outcome.status == "deployed", (outcome.status, outcome.reason)
    with torch.no_grad():
        expected = world.model(torch.from_numpy(world.x_eval)).numpy()
    got = np.concatenate([np.asarray(next(iter(a["outputs"].values())), np.float32) for a in answers])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)
