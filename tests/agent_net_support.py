"""Helpers shared by the agent network tests: a persistent test broker config and a host-side observer."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt

from edgefleet.agent.core.protocol import DeviceMessage, parse_device_message

# conftest's default config lets a root-run Mosquitto drop to user `mosquitto`, which cannot write into
# pytest's 0700 tmp folders, so persistence silently does not happen; `user root` keeps it working.
PERSISTENT_BROKER = (
    "listener {port} 127.0.0.1\n"
    "user root\n"
    "allow_anonymous true\n"
    "persistence true\n"
    "persistence_location {workdir}/\n"
    "autosave_interval 1\n"
    "log_dest file {workdir}/mosquitto.log\n"
    "max_queued_messages 0\n"
)


class Observer:
    """A host-side MQTT listener with a persistent session, so it misses nothing across broker restarts."""

    def __init__(self, url: str, topic_filter: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"obs-{random.getrandbits(40)}", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload), bool(m.retain)))
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: (c.subscribe(topic_filter, qos=1), connected.set())
        host, port = url.split("://", 1)[-1].split(":")  # Python 3.8 has no removeprefix
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect(host, int(port), clean_start=False, properties=props)
        self.client.loop_start()
        assert connected.wait(5), "observer could not connect"
        time.sleep(0.1)

    def next(
        self, want: Callable[[str, bytes], bool], timeout: float = 10.0
    ) -> tuple[str, DeviceMessage, bool]:
        """The next message for which `want(topic, payload)` holds, parsed; queue.Empty after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            topic, payload, retain = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if want(topic, payload):
                return topic, parse_device_message(payload), retain

    def publish(self, topic: str, payload: bytes) -> Any:
        """Publish QoS 1 and wait until the broker has it."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        return info

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------------------------------------
# Bundles and agents for the integration tests.

PROFILE = "x86-64"
IN_FEATURES = 8
CLASSES = 4


def export_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """A 36-parameter linear classifier exported with torch (input `x` [N, 8] → `logits` [N, 4])."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, CLASSES)).eval()
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


def eval_set(model_path: Path, path: Path, *, wrong_labels: bool = False, n: int = 64) -> Path:
    """eval.npz with inputs `x` and labels `y` = the model's own argmax (accuracy 1.0), or all wrong."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((n, IN_FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0].argmax(axis=1)
    if wrong_labels:
        y = (y + 1) % CLASSES
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def make_bundle(
    out: Path,
    key_dir: Path,
    model_path: Path,
    eval_path: Path,
    *,
    version: int,
    name: str = "tiny",
    min_accuracy: float = 0.9,
    max_p95_ms: float = 1000.0,
    profile: str = PROFILE,
    warmup_runs: int = 2,
) -> Path:
    """A signed bundle through the SDK's own bundle writer."""
    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key

    fields = {
        "name": name,
        "version": version,
        "target": {"profile": profile, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, IN_FEATURES]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {
            "min_accuracy": min_accuracy,
            "max_p95_ms": max_p95_ms,
            "warmup_runs": warmup_runs,
            "timeout_s": 60,
        },
    }
    return create_bundle(
        out,
        model_path=model_path,
        eval_npz_path=eval_path,
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )


def agent_args(
    state_dir: Path, broker_url: str, fleet: str, device_id: str, key: Path, *extra: str
) -> list[str]:
    """Command line of an agent subprocess with short intervals for tests."""
    return [
        sys.executable,
        "-m",
        "edgefleet.agent.cli",
        "--device-id",
        device_id,
        "--profile",
        PROFILE,
        "--broker",
        broker_url,
        "--fleet",
        fleet,
        "--state-dir",
        str(state_dir),
        "--trusted-key",
        str(key),
        "--telemetry-interval",
        "0.5",
        "--no-http",
        "--log-level",
        "debug",
        *extra,
    ]


class AgentProcess:
    """An agent running as a real subprocess (for kill -9 tests); logs go to a file in its state dir."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch (again)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns the handle
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        log.close()

    def kill9(self) -> None:
        """SIGKILL, no clean-up at all."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def log(self) -> str:
        """What the agent printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
