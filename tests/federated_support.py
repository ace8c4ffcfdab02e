"""Helpers of the federated tests: a small MLP on sklearn digits as ONNX, device shares, signed bundles,
a recorder of every MQTT message, and a rogue device that answers round plans with bad updates."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgefleet.agent.core.federated_msgs import FedRoundCommand, FedUpdate
from edgefleet.agent.core.protocol import State, Topics, parse_command, will_payload

CLASSES = 10
FEATURES = 64
HIDDEN = 16


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits, scaled to [0, 1] as float32, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_mlp(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A 64-16-10 MLP (Gemm, Relu, Gemm) trained briefly on (x, y), with its head zeroed, saved as ONNX."""
    import warnings

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=200, random_state=0).fit(x, y)
    w1, b1 = mlp.coefs_[0].astype(np.float32), mlp.intercepts_[0].astype(np.float32)
    # The head starts from nothing: federated rounds must teach it (accuracy climbs from ~0.1).
    w2, b2 = np.zeros((CLASSES, HIDDEN), np.float32), np.zeros(CLASSES, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="head", transB=1),
        ],
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def digits_bundle(
    out: Path, key_dir: Path, model: Path, eval_x: np.ndarray, eval_y: np.ndarray, version: int = 1
) -> Path:
    """A signed bundle of the digits model (health floor 0: its zeroed head guesses)."""
    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key
    from tests.agent_net_support import PROFILE

    eval_path = out.parent / f"{out.name}-eval.npz"
    np.savez(eval_path, x=eval_x, y=eval_y)
    fields = {
        "name": "digits",
        "version": version,
        "target": {"profile": PROFILE, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, FEATURES]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.0, "max_p95_ms": 1000.0, "warmup_runs": 1, "timeout_s": 60},
    }
    return create_bundle(
        out,
        model_path=model,
        eval_npz_path=eval_path,
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )


def shares(
    x: np.ndarray, y: np.ndarray, n: int, alpha: float = 0.5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A non-IID split of (x, y) over n devices (Dirichlet α per class)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i] += chunk.tolist()
    # Shuffled, so a device's labels are not one class after another (runs of one value prove nothing).
    orders = [rng.permutation(np.array(p, dtype=int)) for p in parts]
    return [(x[o], y[o]) for o in orders]


class Recorder:
    """Every message published on the broker (a `#` subscriber) while it runs: (topic, payload)."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5
        )
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: ready.set()
        self.client.on_message = lambda c, u, m: self._add(m.topic, bytes(m.payload))
        host, port = url.split("://")[1].split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10), "the recorder could not subscribe"

    def _add(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def payload_views(payload: bytes) -> list[bytes]:
    """The payload itself and, for JSON, every string in it decoded from base64 (arrays travel that way)."""
    views = [payload]

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and len(value) >= 8:
            try:
                views.append(base64.b64decode(value, validate=True))
            except ValueError:
                pass
            if value.startswith("{"):
                try:
                    walk(json.loads(value))
                except ValueError:
                    pass

    try:
        obj = json.loads(payload)
    except ValueError:
        return views
    walk(obj)
    # The signed plan is JSON inside base64: look inside it too.
    for raw in list(views[1:]):
        try:
            walk(json.loads(raw))
        except ValueError:
            pass
    return views


class RogueDevice:
    """A device that claims to serve a model and answers each round plan with `make_update(plan) -> bytes | None`.

    It is a plain MQTT client posing as an agent (its retained state says online and which model it runs),
    so the host selects it; what it sends back is what the test wants refused, or nothing (a straggler).
    """

    def __init__(
        self,
        url: str,
        fleet: str,
        device: str,
        model: tuple[str, int],
        make_update: Callable[[dict[str, Any], str], Any],
    ) -> None:
        import paho.mqtt.client as mqtt

        self.topics = Topics(fleet, device)
        self.device = device
        self.make_update = make_update
        self.seq = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"rogue-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5
        )
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(self.topics.cmd, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: ready.set()
        self.client.on_message = lambda c, u, m: self._on_command(bytes(m.payload))
        host, port = url.split("://")[1].split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)
        state = State.from_info(
            device,
            self._next(),
            time.time(),
            True,
            {
                "profile": "x86-64",
                "active": {"name": model[0], "version": model[1]},
                "agent_version": "rogue",
            },
        )
        self.client.publish(self.topics.state, state.to_wire(), qos=1, retain=True).wait_for_publish(5)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _on_command(self, payload: bytes) -> None:
        cmd = parse_command(payload)
        if not isinstance(cmd, FedRoundCommand):
            return
        plan = json.loads(cmd.plan)
        fields = self.make_update(plan, cmd.id)
        if fields is None:
            return
        message = FedUpdate(device=self.device, seq=self._next(), ts=time.time(), **fields)
        self.client.publish(self.topics.evt, message.to_wire(), qos=1)

    def close(self) -> None:
        """Say offline (retained, as an agent's Last Will does) and disconnect."""
        self.client.publish(
            self.topics.state, will_payload(self.device), qos=1, retain=True
        ).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


class DroppingSecAggDevice(RogueDevice):
    """A device that runs secure aggregation honestly up to sharing its keys, then drops (before masking)."""

    def __init__(self, url: str, fleet: str, device: str, model: tuple[str, int]) -> None:
        self.client: Any = None
        self.task = ""
        super().__init__(url, fleet, device, model, lambda plan, ref: None)

    def _step(self, task: str, round_no: int, stage: str, payload: bytes) -> None:
        from edgefleet.agent.core.federated_msgs import FedStep

        message = FedStep(
            device=self.device,
            seq=self._next(),
            ts=time.time(),
            task=task,
            round=round_no,
            stage=stage,
            payload=payload,
        )
        self.client.publish(self.topics.evt, message.to_wire(), qos=1)

    def _on_command(self, payload: bytes) -> None:
        from edgefleet.agent.core.federated_msgs import FedStepCommand
        from edgefleet.agent.federated.secagg import SecAggClient, SecAggSetup

        cmd = parse_command(payload)
        if isinstance(cmd, FedRoundCommand):
            plan = json.loads(cmd.plan)
            self.secagg = SecAggClient(SecAggSetup.from_dict(plan["secagg"]), self.device)
            self._step(plan["task"], plan["round"], "advertise", self.secagg.advertise())
        elif isinstance(cmd, FedStepCommand) and cmd.stage == "keys":
            self._step(cmd.task, cmd.round, "shares", self.secagg.share_keys(cmd.payload))
        # "shares" never gets an answer: this device is gone after its keys were shared.
