"""Fill a store with a small fleet (devices, telemetry of two model versions, rollouts, events) for server tests."""

from __future__ import annotations

import time
from typing import Any, Optional

from edgefleet.sdk.store import Store

DEVICES = {
    "rpi4b-01": "rpi4b",
    "rpi4b-02": "rpi4b",
    "rpi5-01": "rpi5",
    "orin-01": "jetson-orin-nano",
}
# Per profile: p95 latency (ms) of v1 and v2, so per-version summaries differ in a known direction.
P95 = {"rpi4b": (4.0, 3.0), "rpi5": (2.0, 1.5), "jetson-orin-nano": (1.0, 0.8)}


def fill_store(store: Store, fleet: str, now: Optional[float] = None, windows: int = 6) -> dict[str, Any]:
    """Write devices, telemetry (v1 then v2, 10 s windows), a finished and a running rollout, events."""
    now = time.time() if now is None else now
    for dev, profile in DEVICES.items():
        store.upsert_device(
            fleet,
            dev,
            online=dev != "orin-01",
            profile=profile,
            agent_version="0.1.0",
            runtimes=["onnxruntime"],
            emulated=True,
            active_model="digits",
            active_version=2,
            desired_model="digits",
            desired_version=2 if dev != "rpi5-01" else 3,
            last_seen=now - 5,
        )
    messages = []
    seq = 0
    for i in range(windows):
        ts = now - (2 * windows - i) * 10.0
        seq += 1
        for dev, profile in DEVICES.items():
            messages.append(_window(dev, profile, ts, seq, version=1, accuracy=0.97))
    for i in range(windows):
        ts = now - (windows - i) * 10.0
        seq += 1
        for dev, profile in DEVICES.items():
            # rpi4b-02 skips seq numbers once: the store records a gap of 2 messages.
            s = seq + 2 if dev == "rpi4b-02" else seq
            messages.append(_window(dev, profile, ts, s, version=2, accuracy=0.98))
    store.add_telemetry(fleet, messages)
    b1 = store.add_bundle(
        name="digits",
        version=1,
        profile="rpi4b",
        manifest_sha256="a" * 64,
        path="/nonexistent/digits-v1",
        size_bytes=1000,
        manifest={"name": "digits", "version": 1, "model": {"format": "onnx", "runtime": "onnxruntime"}},
    )
    b2 = store.add_bundle(
        name="digits",
        version=2,
        profile="rpi4b",
        manifest_sha256="b" * 64,
        path="/nonexistent/digits-v2",
        size_bytes=1200,
        manifest={"name": "digits", "version": 2, "model": {"format": "onnx", "runtime": "onnxruntime"}},
    )
    done_id = f"{fleet}-r1"
    store.create_rollout(
        done_id,
        fleet=fleet,
        selector="all",
        strategy="canary:25",
        settings={},
        targets=[(dev, b2, 0 if dev == "rpi4b-01" else 1) for dev in DEVICES],
    )
    for dev in DEVICES:
        store.set_rollout_device(done_id, dev, "deployed")
    store.set_rollout_status(done_id, "succeeded")
    running_id = f"{fleet}-r2"
    store.create_rollout(
        running_id,
        fleet=fleet,
        selector="profile:rpi5",
        strategy="all",
        settings={},
        targets=[("rpi5-01", b2, 0)],
    )
    store.set_rollout_status(running_id, "running")
    store.set_rollout_device(running_id, "rpi5-01", "downloading")
    store.add_event(fleet, "rpi4b-01", "deployed", {"type": "deployed", "name": "digits", "version": 2})
    store.add_event(fleet, "rpi5-01", "progress", {"type": "progress", "step": "download"})
    return {"bundles": [b1, b2], "rollouts": [done_id, running_id], "now": now}


def _window(dev: str, profile: str, ts: float, seq: int, *, version: int, accuracy: float) -> dict[str, Any]:
    p95 = P95[profile][version - 1]
    return {
        "device_id": dev,
        "ts": ts,
        "seq": seq,
        "profile": profile,
        "model_name": "digits",
        "model_version": version,
        "count": 100,
        "errors": 0,
        "p50_ms": p95 / 2,
        "p95_ms": p95,
        "p99_ms": p95 * 1.2,
        "mean_ms": p95 / 1.8,
        "eval_accuracy": accuracy,
        "live_accuracy": None,
    }
