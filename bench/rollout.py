"""Rollout bench: a ~20 MB bundle to 50 receivers vs Mosquitto's plain fan-out, and a last-layer delta.

Side by side in one run against a private Mosquitto:
  1. fan-out baseline: the bundle's bytes published once (same chunks, same publisher code) to 50 plain
     paho subscribers; time until all 50 have every byte; again with subscribers that sha256 every
     byte, the CPU work each device must do to verify (50 simulated devices share 2 cores here);
  2. rollout: `Fleet.deploy(bundle, "all")` to 50 receivers that speak the agent's transfer protocol
     (deploy command, broadcast + repairs, whole-file sha256 checked; no install, so both runs measure
     transfer); bytes the host published and the wall time of `deploy` (registry read, bundle
     verification, commands, broadcast, outcomes);
  3. delta: the same model with only its last layer fine-tuned; the bsdiff4 patch's size over the full
     bundle's, and the patch applied with the agent's own `bspatch` must rebuild the signed file.
The receivers run in 2 processes of 25 clients (one per core), for both runs alike.

    python bench/rollout.py [--devices 50] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_common import PrivateMosquitto, write_result  # noqa: E402

RECEIVERS = str(ROOT / "bench" / "fleet_receivers.py")


def build_models(d: Path, hidden: int) -> tuple[Path, Path]:
    """An MLP of ~20 MB exported to ONNX, and a copy whose last layer alone was fine-tuned."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).eval()
    paths = []
    for version in (1, 2):
        if version == 2:
            # A few SGD steps on the last layer only, everything else frozen.
            for p in model[:4].parameters():
                p.requires_grad_(False)
            opt = torch.optim.SGD(model[4].parameters(), lr=0.01)
            x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
            for _ in range(5):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        path = d / f"mlp-v{version}.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(1, 512),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
        paths.append(path)
    return paths[0], paths[1]


def make_bundle(d: Path, key_dir: Path, model: Path, version: int) -> Path:
    import onnxruntime as ort

    from edgefleet.sdk.bundle import create_bundle
    from edgefleet.sdk.keys import load_private_key

    x = np.random.default_rng(1).standard_normal((32, 512)).astype(np.float32)
    y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)
    np.savez(d / f"eval-v{version}.npz", x=x, y=y.astype(np.int64))
    fields = {
        "name": "mlp",
        "version": version,
        "target": {"profile": "x86-64", "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 512]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 1000.0, "warmup_runs": 1, "timeout_s": 60},
    }
    return create_bundle(
        d / f"bundle-v{version}",
        model_path=model,
        eval_npz_path=d / f"eval-v{version}.npz",
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )


def bundle_bytes(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    return sum(int(e["size"]) for e in manifest["files"].values())


def spawn(mode: str, port: int, fleet: str, devices: int, *extra: str) -> list[subprocess.Popen[bytes]]:
    half = devices // 2
    procs = []
    for first, count in ((0, half), (half, devices - half)):
        proc = subprocess.Popen(
            [sys.executable, RECEIVERS, mode, str(port), fleet, str(first), str(count), *extra],
            stdout=subprocess.PIPE,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
    return procs


def finish(procs: list[subprocess.Popen[bytes]]) -> float:
    """Wait for the receivers; the time the last one finished."""
    ends = []
    for proc in procs:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        if not line["done"]:
            raise SystemExit("receivers did not get everything within 10 minutes")
        ends.append(float(line["at"]))
        proc.wait(30)
    return max(ends)


def run_fanout(
    broker: PrivateMosquitto, bundle: Path, devices: int, chunk: int, mode: str = "plain"
) -> dict[str, Any]:
    from edgefleet.sdk.fleet.transfer import Blob, TransferStats
    from edgefleet.sdk.mqtt_url import MqttOptions, connect

    total = bundle_bytes(bundle)
    fleet = f"fanout{mode.replace('-', '')}"
    procs = spawn(mode, broker.port, fleet, devices, f"edgefleet/v1/{fleet}/artifact/#", str(total))
    time.sleep(0.5)
    conn = connect(MqttOptions(broker.url))
    stats = TransferStats()
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    start = time.time()
    for name, entry in sorted(manifest["files"].items()):
        Blob(bundle / name, entry["sha256"], chunk).broadcast(conn, fleet, stats)
    end = finish(procs)
    conn.close()
    return {"seconds": end - start, "published_bytes": stats.broadcast_bytes, "bundle_bytes": total}


def run_rollout(
    broker: PrivateMosquitto, bundle: Path, key: Path, devices: int, db_dir: Path
) -> dict[str, Any]:
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.store import Store

    procs = spawn("agent", broker.port, "bench", devices)
    store = Store(f"sqlite:///{db_dir / 'bench.db'}")
    fleet = Fleet(broker=broker.url, store=store, fleet="bench", trusted_keys=[key])
    time.sleep(0.5)
    start = time.time()
    handle = fleet.deploy(bundle, "all", timeout_s=300)
    end = time.time()
    # Phases relative to the deploy call: before the engine started is the check (registry, bundles).
    offset = handle.engine.started_at - start
    timeline = {
        "engine_started": round(offset, 4),
        **{k: round(v + offset, 4) for k, v in handle.engine.timeline.items()},
    }
    receivers_done = finish(procs)
    stats = handle.engine.stats.to_dict()
    row = store.rollout(handle.id)
    assert row is not None
    deployed = sum(d["status"] == "deployed" for d in row["devices"])
    store.close()
    return {
        "status": handle.status,
        "deployed": deployed,
        "seconds": end - start,
        "receivers_done_after_s": receivers_done - start,
        "bundle_bytes": bundle_bytes(bundle),
        "timeline_s": timeline,
        **stats,
    }


def run_delta(d: Path, v1: Path, v2: Path) -> dict[str, Any]:
    from edgefleet.agent.bspatch import apply_patch
    from edgefleet.sdk.fleet.delta import make_patch

    manifest = json.loads((v2 / "manifest.json").read_bytes())
    model_file = manifest["model"]["file"]
    old_file = json.loads((v1 / "manifest.json").read_bytes())["model"]["file"]
    start = time.perf_counter()
    patch = make_patch(v1 / old_file, v2 / model_file, d / "deltas")
    diff_s = time.perf_counter() - start
    start = time.perf_counter()
    rebuilt = apply_patch((v1 / old_file).read_bytes(), patch.path.read_bytes(), patch.target_size)
    patch_s = time.perf_counter() - start
    ok = hashlib.sha256(rebuilt).hexdigest() == manifest["files"][model_file]["sha256"]
    full = bundle_bytes(v2)
    return {
        "patch_bytes": patch.size,
        "model_bytes": patch.target_size,
        "bundle_bytes": full,
        "ratio_to_bundle": patch.size / full,
        "rebuilt_verifies": ok,
        "diff_seconds": diff_s,
        "apply_seconds": patch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    from edgefleet.sdk.fleet.transfer import DEFAULT_CHUNK_SIZE
    from edgefleet.sdk.keys import init_keys

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        keys = init_keys(d / "keys")
        m1, m2 = build_models(d, args.hidden)
        v1, v2 = make_bundle(d, d / "keys", m1, 1), make_bundle(d, d / "keys", m2, 2)
        broker = PrivateMosquitto()
        try:
            fanout = run_fanout(broker, v1, args.devices, DEFAULT_CHUNK_SIZE)
            fanout_sha = run_fanout(broker, v1, args.devices, DEFAULT_CHUNK_SIZE, "plain-sha256")
            rollout = run_rollout(broker, v1, keys.public_path, args.devices, d)
        finally:
            broker.stop()
        delta = run_delta(d, v1, v2)
    bytes_ratio = rollout["total_bytes"] / rollout["bundle_bytes"]
    time_ratio = rollout["seconds"] / fanout["seconds"]
    time_ratio_sha = rollout["seconds"] / fanout_sha["seconds"]
    from rich.console import Console
    from rich.table import Table

    mb = 1024 * 1024
    table = Table(
        title=f"rollout of a {rollout['bundle_bytes'] / mb:.1f} MiB bundle to {args.devices} receivers"
    )
    for col in ("run", "host published", "× bundle", "seconds", "× fan-out"):
        table.add_column(col)
    table.add_row(
        "naive per-device push (computed)",
        f"{args.devices * rollout['bundle_bytes'] / mb:.1f} MiB",
        f"{args.devices:.2f}",
        "-",
        "-",
    )
    table.add_row(
        "Mosquitto fan-out, plain subscribers",
        f"{fanout['published_bytes'] / mb:.1f} MiB",
        f"{fanout['published_bytes'] / fanout['bundle_bytes']:.2f}",
        f"{fanout['seconds']:.2f}",
        "1.00",
    )
    table.add_row(
        "same fan-out, subscribers hash every byte",
        f"{fanout_sha['published_bytes'] / mb:.1f} MiB",
        f"{fanout_sha['published_bytes'] / fanout_sha['bundle_bytes']:.2f}",
        f"{fanout_sha['seconds']:.2f}",
        f"{fanout_sha['seconds'] / fanout['seconds']:.2f}",
    )
    table.add_row(
        f"Fleet.deploy ({rollout['deployed']}/{args.devices} deployed)",
        f"{rollout['total_bytes'] / mb:.1f} MiB",
        f"{bytes_ratio:.3f}",
        f"{rollout['seconds']:.2f}",
        f"{time_ratio:.2f}",
    )
    table.caption = (
        f"targets: bytes ≤ 1.1× bundle, time ≤ 1.5× fan-out. Against the hashing fan-out: "
        f"{time_ratio_sha:.2f}× (all 50 receivers share this machine's cores). Delta after fine-tuning the last layer: "
        f"{delta['patch_bytes'] / 1024:.1f} KiB = {100 * delta['ratio_to_bundle']:.2f} % of the bundle "
        f"(target ≤ 5 %), rebuilt file verifies: {delta['rebuilt_verifies']}"
    )
    Console().print(table)
    print("rollout phases (s after the deploy call):", json.dumps(rollout["timeline_s"]))
    path = write_result(
        "rollout",
        {
            "devices": args.devices,
            "fanout": fanout,
            "fanout_sha256": fanout_sha,
            "time_ratio_vs_hashing_fanout": time_ratio_sha,
            "rollout": rollout,
            "delta": delta,
            "bytes_ratio": bytes_ratio,
            "time_ratio": time_ratio,
            "targets": {"bytes_ratio": 1.1, "time_ratio": 1.5, "delta_ratio": 0.05},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
