"""Record one real wire payload of every message kind, as the code of the day produces it.

Ran once (`PYTHONPATH=. python tests/data/wire/record_wire.py`) on 2026-12-03 at commit 16f99f5, before
the typed contract changed any wire format: it starts a Mosquitto and a real in-process agent, pushes
signed bundles and sends every command, and stores what travels on the broker under
tests/data/wire/<kind>.json. tests/test_contract_recorded.py parses each of them with the current code,
forever. Kept as the record of how they were made: the sender it used (sdk/push.py) has since gone, so a
new recording for a future format change starts from a copy of this script driving tests/fleet_support.py.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _save(kind: str, topic: str, payload: bytes, note: str) -> None:
    """One recorded message: the topic it travelled on (fleet replaced) and its exact payload bytes."""
    record = {"kind": kind, "topic": topic, "note": note, "payload": payload.decode("utf-8")}
    (HERE / f"{kind}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"recorded {kind}: {len(payload)} bytes on {topic}")


def main() -> int:
    """Record every kind; exit status 1 when one is missing."""
    from edgefleet.agent.config import load_config
    from edgefleet.agent.core import protocol as p
    from edgefleet.agent.daemon import Agent
    from edgefleet.sdk.fleet.transfer import Blob, BundleTransfer
    from edgefleet.sdk.trust.keys import init_keys
    from tests.agent_net_support import (
        IN_FEATURES,
        PERSISTENT_BROKER,
        PROFILE,
        Observer,
        eval_set,
        export_tiny_onnx,
        make_bundle,
    )
    from tests.conftest import Mosquitto, free_port
    from tests.fleet_support import Host

    fleet, device = "recorded", "dev-1"
    work = Path(tempfile.mkdtemp(prefix="wire-record-"))
    broker = Mosquitto(port=free_port(), workdir=work / "broker", extra_config=PERSISTENT_BROKER)
    broker.start()
    keys = init_keys(work / "keys")
    m1, m2 = export_tiny_onnx(work / "m1.onnx", 0), export_tiny_onnx(work / "m2.onnx", 1)
    v1 = make_bundle(work / "v1", work / "keys", m1, eval_set(m1, work / "e1.npz"), version=1)
    v2 = make_bundle(work / "v2", work / "keys", m2, eval_set(m2, work / "e2.npz"), version=2)
    wrong = eval_set(m2, work / "wrong.npz", wrong_labels=True)
    bad = make_bundle(work / "bad", work / "keys", m2, wrong, version=3, min_accuracy=0.9)
    prefix = f"edgefleet/v1/{fleet}/"
    obs = Observer(broker.url, f"{prefix}#")
    seen: list[tuple[str, bytes]] = []

    def drain() -> None:
        while not obs.inbox.empty():
            topic, payload, _ = obs.inbox.get()
            if topic.rsplit("/", 1)[-1] in ("state", "evt", "telemetry"):
                seen.append((topic, payload))

    cfg = load_config(
        None,
        {
            "device_id": device,
            "profile": PROFILE,
            "trusted_keys": [str(keys.public_path)],
            "broker": broker.url,
            "fleet": fleet,
            "state_dir": str(work / device),
            "telemetry_interval_s": 0.3,
            "http_enabled": False,
            "repair_after_s": 0.3,
            "mqtt_infer": True,
            "tags": ["lab", "cam"],
        },
    )
    agent = Agent(cfg)
    agent.start()
    assert agent.session is not None and agent.session.wait_connected(10)
    time.sleep(0.5)
    drain()
    idle_telemetry = [s for s in seen if s[0].endswith("/telemetry")]
    # a push whose broadcast drops chunk 1 of every file: the device asks for it (a `missing` event)
    host = Host(broker.url, fleet, work / "host", keys.public_path)
    out = host.deploy(v1, device, chunk_size=256, chunk_filter=lambda sha, i, data: None if i == 1 else data)
    assert out.status == "deployed", out
    x = np.random.default_rng(5).standard_normal((3, IN_FEATURES)).astype(np.float32)
    one = agent.infer({"x": x[:1]})
    agent.feedback(one.request_id, int(one.outputs["logits"].argmax()))
    time.sleep(0.8)
    assert host.deploy(v2, device, chunk_size=256).status == "deployed"
    topics = p.Topics(fleet, device)
    commands: dict[str, bytes] = {
        "cmd-rollback": p.RollbackCommand(id="rb-1").to_wire(),
        "cmd-eval": p.EvalCommand(id="ev-1").to_wire(),
        "cmd-status": p.StatusCommand(id="st-1").to_wire(),
        "cmd-config": p.ConfigCommand(id="cf-1", telemetry_interval_s=0.3).to_wire(),
        "cmd-infer": p.InferCommand(id="in-1", inputs={"x": p.encode_array(x)}).to_wire(),
        "cmd-rotate-root": p.RotateRootCommand(
            id="rr-1",
            root=b'{"version":2}',
            signatures=({"keyid": "a" * 16, "sig": base64.b64encode(b"s" * 64).decode()},),
        ).to_wire(),
    }
    for payload in commands.values():
        obs.publish(topics.cmd, payload)
        time.sleep(0.6)
    obs.publish(topics.cmd, b'{"v":1,"type":"warp","id":"bad-1"}')
    rejected = host.deploy(bad, device, chunk_size=256)
    assert rejected.status == "rejected", rejected
    host.close()
    time.sleep(0.8)
    drain()
    agent.stop()
    time.sleep(0.3)
    drain()
    obs.close()
    broker.stop()

    # Commands: what the host's senders put on `cmd` (the deploy with and without a delta patch).
    transfer = BundleTransfer(v2, chunk_size=256)
    _save(
        "cmd-deploy",
        topics.cmd,
        transfer.deploy_command("d-1", device).to_wire(),
        "BundleTransfer.deploy_command",
    )
    model_file = next(f.spec.file for f in transfer.files if f.spec.file.endswith(".onnx"))
    patch = Blob(m1, _sha_of(m1), 256)
    delta = transfer.deploy_command("d-2", device, {model_file: (_sha_of(m1), patch)}).to_wire()
    _save(
        "cmd-deploy-delta",
        topics.cmd,
        delta,
        "BundleTransfer.deploy_command with a delta (patch = a stand-in blob)",
    )
    for kind, payload in commands.items():
        _save(kind, topics.cmd, payload, "as the host sends it")
    _save("state-will", topics.state, p.will_payload(device), "Last Will registered at connect")

    def first(pred: Any) -> tuple[str, bytes] | None:
        return next((s for s in seen if pred(s[0], json.loads(s[1]))), None)

    wanted = {
        "state-online": lambda t, o: t.endswith("/state") and o.get("online") is True,
        "state-offline": lambda t, o: t.endswith("/state") and o.get("online") is False and "seq" in o,
        "telemetry-model": lambda t, o: (
            t.endswith("/telemetry")
            and o["metrics"].get("model_version") == 1
            and o["metrics"].get("feedback")
        ),
        "telemetry-eval": lambda t, o: (
            t.endswith("/telemetry")
            and (o["metrics"].get("eval") or {}).get("source") is None
            and o["metrics"].get("eval")
        ),
        "evt-progress": lambda t, o: o.get("type") == "progress",
        "evt-missing": lambda t, o: o.get("type") == "missing",
        "evt-deployed": lambda t, o: o.get("type") == "deployed",
        "evt-rejected": lambda t, o: o.get("type") == "rejected",
        "evt-error": lambda t, o: o.get("type") == "error",
        "evt-result-rollback": lambda t, o: o.get("type") == "result" and o.get("command") == "rollback",
        "evt-result-eval": lambda t, o: o.get("type") == "result" and o.get("command") == "eval",
        "evt-result-status": lambda t, o: o.get("type") == "result" and o.get("command") == "status",
        "evt-result-config": lambda t, o: o.get("type") == "result" and o.get("command") == "config",
        "evt-result-infer": lambda t, o: o.get("type") == "result" and o.get("command") == "infer",
        "evt-result-rotate-root": lambda t, o: (
            o.get("type") == "result" and o.get("command") == "rotate-root"
        ),
    }
    if idle_telemetry:
        _save("telemetry-idle", *_neutral(idle_telemetry[0], fleet), note="agent with no model yet")
    else:
        print("no idle telemetry seen", file=sys.stderr)
    missing = []
    for kind, pred in wanted.items():
        hit = first(pred)
        if hit is None:
            if kind == "evt-result-rotate-root":
                hit = first(lambda t, o: o.get("type") == "error" and o.get("ref") == "rr-1")
                kind = "evt-error-rotate-root"
            if hit is None:
                missing.append(kind)
                continue
        _save(kind, *_neutral(hit, fleet), note="recorded from a real agent")
    if missing:
        print(f"not seen: {missing}", file=sys.stderr)
    return 1 if missing else 0


def _neutral(hit: tuple[str, bytes], fleet: str) -> tuple[str, bytes]:
    return hit[0], hit[1]


def _sha_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
