"""A delta rollout through the real engine and a real Mosquitto, to a device that rebuilds with agent.delta.

The device here is a small in-process stand-in that speaks the transfer protocol and advertises delta
support (the agent daemon does not wire deltas in yet); the rebuild and verification are the agent's own
`edgefleet.agent.delta` functions.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.core.protocol import (
    Deployed,
    FileTransfer,
    Progress,
    Rejected,
    State,
    Topics,
    build_message,
)
from edgefleet.agent.delta import find_base, patch_transfer, rebuild
from edgefleet.sdk.fleet.bundles import load_bundles
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.store import Store
from tests.agent_net_support import make_bundle
from tests.fleet_support import build_artifacts

pytestmark = [pytest.mark.broker]


class DeltaDevice:
    """Runs v1 from a slot folder, takes a deploy, fetches patch or file chunks, rebuilds, verifies."""

    def __init__(self, url: str, fleet: str, device: str, slot_of: Path, state_dir: Path) -> None:
        self.topics = Topics(fleet, device)
        self.device = device
        self.state_dir = state_dir
        slot = state_dir / "slots" / "a"
        slot.mkdir(parents=True)
        for f in slot_of.iterdir():
            (slot / f.name).write_bytes(f.read_bytes())
        self.manifest = json.loads((slot / "manifest.json").read_bytes())
        self.seq = 0
        self.files: dict[str, dict[str, Any]] = {}
        self.outcome: str | None = None
        self.used_delta = False
        self.errors: list[str] = []
        self.lock = threading.Lock()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"delta-{random.getrandbits(32)}"
        )
        self.client.on_message = self.on_message
        self.client.connect(host, int(port))
        self.client.subscribe([(self.topics.cmd, 1), (self.topics.repair_filter, 1)])
        self.client.loop_start()
        info = {
            "profile": self.manifest["target"]["profile"],
            "agent_version": "test",
            "active": {"name": self.manifest["name"], "version": self.manifest["version"]},
            "delta": ["bsdiff4"],
            "tags": [],
            "runtimes": ["onnxruntime"],
        }
        self.send(State, retain=True, online=True, info=info)

    def send(self, cls: Any, retain: bool = False, **fields: Any) -> None:
        self.seq += 1
        msg = build_message(cls, self.device, self.seq, time.time(), **fields)
        self.client.publish(
            self.topics.state if retain else self.topics.evt, msg.to_wire(), qos=1, retain=retain
        )

    def on_message(self, c: Any, u: Any, m: Any) -> None:
        try:
            self._on_message(m)
        except Exception as exc:  # recorded for the test: paho's thread would swallow it
            self.errors.append(repr(exc))

    def _on_message(self, m: Any) -> None:
        with self.lock:
            if m.topic == self.topics.cmd:
                self.deploy(json.loads(m.payload))
                return
            where = self.topics.parse_chunk_topic(m.topic)
            if where is not None and where[0] in self.files:
                st = self.files[where[0]]
                st["chunks"][where[1]] = bytes(m.payload)
                if len(st["chunks"]) == st["spec"].chunks:
                    st["done"] = True
                    self.maybe_finish()

    def deploy(self, cmd: dict[str, Any]) -> None:
        self.deploy_id = cmd["id"]
        for entry in cmd["files"]:
            target = FileTransfer.from_obj(entry)
            spec, base = target, None
            if "delta" in entry and find_base(self.state_dir, entry["delta"]["base_sha256"]) is not None:
                spec = patch_transfer(target, entry["delta"])
                base = find_base(self.state_dir, entry["delta"]["base_sha256"])
                self.used_delta = True
            self.files[spec.sha256] = {
                "spec": spec,
                "target": target,
                "base": base,
                "chunks": {},
                "done": False,
            }
            self.client.subscribe(self.topics.artifact_filter(spec.sha256), qos=1)
        chunks = sum(st["spec"].chunks for st in self.files.values())
        self.send(Progress, deploy=self.deploy_id, step="download", detail={"chunks": chunks, "have": 0})

    def maybe_finish(self) -> None:
        if not all(st["done"] for st in self.files.values()):
            return
        out = self.state_dir / "staged"
        out.mkdir(exist_ok=True)
        for st in self.files.values():
            data = b"".join(st["chunks"][i] for i in range(st["spec"].chunks))
            path = out / st["spec"].file
            path.write_bytes(data)
            if st["base"] is not None:
                rebuild(st["base"], path, out / st["target"].file, st["target"])
            elif hashlib.sha256(data).hexdigest() != st["target"].sha256:
                self.outcome = "rejected"
                self.send(Rejected, deploy=self.deploy_id, step="download", code="hash", reason="bad file")
                return
        self.outcome = "deployed"
        self.send(Deployed, deploy=self.deploy_id, name="tiny", version=2, health={})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fine_tuned(src: Path, dst: Path) -> Path:
    """The same ONNX model with only the last layer's bias nudged: what fine-tuning the head changes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name.endswith("bias"):
            arr = numpy_helper.to_array(init).copy()
            arr[0] += 0.5
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(dst))
    return dst


def test_a_device_on_the_previous_version_gets_only_a_patch_and_rebuilds_the_signed_file(
    tmp_path: Path, mosquitto: Any, fleet_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    art = build_artifacts(tmp_path / "a")
    m1 = next(p for p in art["v1"].iterdir() if p.suffix == ".onnx")
    m2 = _fine_tuned(m1, tmp_path / "m2.onnx")
    v2 = make_bundle(
        tmp_path / "v2", tmp_path / "a" / "keys", m2, art["v1"] / "eval.npz", version=2, min_accuracy=0.0
    )
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[art["key"]])
    # The host knows v1 (it deployed it before): register it.
    fleet._register(
        load_bundles([art["v1"]], trusted_keys=[art["key"]], unpack_root=tmp_path / "u")["x86-64"]
    )
    device = DeltaDevice(mosquitto.url, fleet_name, "d1", art["v1"], tmp_path / "d1")
    try:
        handle = fleet.deploy(v2, "d1", timeout_s=30)
        assert device.errors == []
        assert handle.status == "succeeded"
        assert device.used_delta and device.outcome == "deployed"
        row = store.rollout(handle.id)
        assert row is not None and "d1" in row["settings"]["patches"]
        model_size = m2.stat().st_size
        # Only the patch and eval.npz went out, not the model file.
        full = sum(
            p.stat().st_size for p in v2.iterdir() if p.name not in ("manifest.json", "signature.json")
        )
        assert handle.engine.stats.broadcast_bytes < full - model_size // 2
    finally:
        device.close()
        fleet.close()
        store.close()
