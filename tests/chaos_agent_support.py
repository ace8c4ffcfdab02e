"""Helpers for the agent chaos, fuzz and rotation tests: agents (in process or as processes), bundles,
on-disk forensics of a killed agent, and memory/disk measurements from /proc."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgefleet.agent.config import load_config
from edgefleet.agent.core.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.core.verify import verify_file
from edgefleet.agent.daemon import Agent
from tests.agent_net_support import (
    CLASSES,
    IN_FEATURES,
    PROFILE,
    AgentProcess,
    agent_args,
    eval_set,
    export_tiny_onnx,
)


def manifest_fields(version: int, name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Manifest fields of the tiny classifier (as tests/agent_net_support.make_bundle), with overrides."""
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "target": {"profile": PROFILE, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, IN_FEATURES]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 1000.0, "warmup_runs": 2, "timeout_s": 60},
    }
    fields.update(overrides)
    return fields


def signed_bundle(
    out: Path, private_key: Any, model: Path, eval_npz: Path, version: int, **overrides: Any
) -> Path:
    """A bundle signed with `private_key` (any key, e.g. a rotated-in one); `overrides` edit the manifest."""
    from edgefleet.sdk.trust.bundle import create_bundle

    return create_bundle(
        out,
        model_path=model,
        eval_npz_path=eval_npz,
        manifest_fields=manifest_fields(version, **overrides),
        private_key=private_key,
    )


def export_wide_onnx(path: Path, seed: int, hidden: int) -> Path:
    """A two-layer classifier with the tiny model's interface (`x` [N, 8] → `logits` [N, 4]) and a wide
    hidden layer: `hidden` = 16384 makes an 850 KB file, so writing, loading and checking it take long
    enough (tens of ms) for a timed kill to land inside those steps."""
    import warnings

    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES)
    ).eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but faster here (see REFERENCE.md); its warning is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, IN_FEATURES),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
    return path


@dataclass
class Models:
    """Two different classifiers (tiny, or wide when `hidden` is given) with eval sets (accuracy 1.0 each)."""

    models: list[Path]
    evals: list[Path]

    @classmethod
    def make(cls, folder: Path, hidden: int | None = None) -> Models:
        """Export both models once."""
        folder.mkdir(parents=True, exist_ok=True)
        models = [
            export_tiny_onnx(folder / f"m{i}.onnx", seed=i)
            if hidden is None
            else export_wide_onnx(folder / f"m{i}.onnx", seed=i, hidden=hidden)
            for i in range(2)
        ]
        evals = [eval_set(m, folder / f"e{i}.npz") for i, m in enumerate(models)]
        return cls(models, evals)

    def pick(self, version: int) -> tuple[Path, Path]:
        """The model and eval set of `version` (alternating, so consecutive versions differ in bytes)."""
        return self.models[version % 2], self.evals[version % 2]


def in_process_agent(
    state_dir: Path, broker_url: str, fleet: str, key: Path, device: str = "dev-1", **extra: Any
) -> Agent:
    """A started in-process agent with short intervals; the caller stops it."""
    cfg = load_config(
        None,
        {
            "device_id": device,
            "profile": PROFILE,
            "trusted_keys": [str(key)],
            "broker": broker_url,
            "fleet": fleet,
            "state_dir": str(state_dir),
            "telemetry_interval_s": 5.0,
            "http_enabled": False,
            "repair_after_s": 0.3,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **extra,
        },
    )
    agent = Agent(cfg)
    agent.start()
    if agent.session is None or not agent.session.wait_connected(15):
        agent.stop()
        raise TimeoutError(f"agent {device} did not connect to {broker_url} within 15 s")
    return agent


def agent_process(
    folder: Path, broker_url: str, fleet: str, device: str, key: Path, *, config: dict[str, Any] | None = None
) -> AgentProcess:
    """An agent subprocess with the local HTTP API on a free port and an optional TOML config of settings."""
    folder.mkdir(parents=True, exist_ok=True)
    args = agent_args(folder / "state", broker_url, fleet, device, key)
    args[args.index("--no-http")] = "--http-port"
    args.insert(args.index("--http-port") + 1, "0")
    if config:
        path = folder / "agent.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        args += ["--config", str(path)]
    return AgentProcess(args, folder / "agent.log")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def disk_bytes(folder: Path) -> int:
    """Bytes a folder really takes on disk (allocated blocks, so sparse files count what was written)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:  # removed while we walk (the agent cleans up)
            continue
        if path.is_file():
            total += st.st_blocks * 512
    return total


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class SlotCheck:
    """What a state folder holds: the slot install.json says serves, its verified manifest, and leftovers."""

    active_slot: str | None
    version: int | None
    model_sha256: str | None
    previous_slot: str | None
    leftovers: list[str] = field(default_factory=list)


def check_slots(state_dir: Path) -> SlotCheck:
    """Verify, as the agent's recovery does, every slot install.json points at; raise AssertionError if one fails.

    Each referenced slot must hold a manifest signed by the device's trusted root and files whose size
    and sha256 match it: a "mixed" slot (new manifest, old file) or a half-written one fails here.
    """
    state = (
        json.loads((state_dir / "install.json").read_text()) if (state_dir / "install.json").exists() else {}
    )
    trust = TrustStore.load(state_dir)
    assert trust is not None, f"{state_dir} has no trusted root"
    checked: dict[str, Manifest] = {}
    for slot in (state.get("active"), state.get("previous")):
        if slot is None:
            continue
        folder = state_dir / "slots" / slot
        manifest_bytes = (folder / MANIFEST_FILE).read_bytes()
        trust.verify_signatures(manifest_bytes, (folder / SIGNATURE_FILE).read_bytes())
        manifest = Manifest.from_bytes(manifest_bytes)
        for relpath, entry in manifest.files.items():
            verify_file(folder / relpath, entry, 1 << 30)
        checked[slot] = manifest
    active = state.get("active")
    slots_dir = state_dir / "slots"
    leftovers = (
        sorted(p.name for p in slots_dir.iterdir() if p.name.startswith(".")) if slots_dir.exists() else []
    )
    if active is None:
        return SlotCheck(None, None, None, state.get("previous"), leftovers)
    manifest = checked[active]
    model = state_dir / "slots" / active / manifest.model.file
    return SlotCheck(active, int(manifest.version), sha256_file(model), state.get("previous"), leftovers)


def http_json(port: int, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET (or POST `body` as JSON) on the agent's local API; the parsed JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def infer_over_http(port: int) -> dict[str, Any]:
    """One inference through the agent's local HTTP endpoint (3 rows of the tiny model's input)."""
    x = np.random.default_rng(5).standard_normal((3, IN_FEATURES)).astype(np.float32)
    answer: dict[str, Any] = http_json(port, "/v1/infer", {"inputs": {"x": x.tolist()}})
    return answer


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy (returned), backing off; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
