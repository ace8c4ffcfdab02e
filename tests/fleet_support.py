"""Helpers of the fleet tests: signed tiny bundles, real agent subprocesses, and polling the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet.sdk.store import Store
from tests.agent_net_support import AgentProcess, agent_args, eval_set, export_tiny_onnx, make_bundle


def build_artifacts(d: Path) -> dict[str, Path]:
    """Keys and signed bundles: v1 and v2 (good), v3 (does not load), and v2 built for another profile."""
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(d / "keys")
    m1 = export_tiny_onnx(d / "m1.onnx", seed=0)
    m2 = export_tiny_onnx(d / "m2.onnx", seed=1)
    e1, e2 = eval_set(m1, d / "e1.npz"), eval_set(m2, d / "e2.npz")
    garbage = d / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model " * 40)
    k = d / "keys"
    return {
        "key": keys.public_path,
        "v1": make_bundle(d / "v1", k, m1, e1, version=1),
        "v2": make_bundle(d / "v2", k, m2, e2, version=2),
        "broken": make_bundle(d / "broken", k, garbage, e1, version=3),
        "v2-arm64": make_bundle(d / "v2-arm64", k, m2, e2, version=2, profile="arm64"),
        "v1-arm64": make_bundle(d / "v1-arm64", k, m1, e1, version=1, profile="arm64"),
    }


@contextmanager
def agents(
    tmp_path: Path, url: str, fleet: str, key: Path, ids: list[str], *extra: str, profile: str | None = None
) -> Iterator[dict[str, AgentProcess]]:
    """Start real agent processes (`edgefleet-agent`) and stop them at the end."""
    procs: dict[str, AgentProcess] = {}
    try:
        for device in ids:
            args = agent_args(tmp_path / device, url, fleet, device, key, *extra)
            if profile is not None:
                args[args.index("--profile") + 1] = profile
            (tmp_path / device).mkdir(parents=True, exist_ok=True)
            proc = AgentProcess(args, tmp_path / f"{device}.log")
            proc.start()
            procs[device] = proc
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def wait_online(store: Store, fleet: str, options: Any, ids: list[str], timeout: float = 30.0) -> None:
    """Wait until every device's retained state says online (read through the registry)."""
    from edgefleet.sdk.fleet import registry

    def ready() -> bool:
        registry.refresh(store, options, fleet, quiet_s=0.2, max_wait_s=1.0)
        rows = {d["device_id"]: d for d in store.devices(fleet)}
        return all(rows.get(i, {}).get("online") for i in ids)

    wait_for(ready, timeout, f"devices {ids} online")


def device_statuses(store: Store, rollout_id: str) -> dict[str, str]:
    """Device id → status within a rollout."""
    row = store.rollout(rollout_id)
    assert row is not None
    return {d["device_id"]: d["status"] for d in row["devices"]}
