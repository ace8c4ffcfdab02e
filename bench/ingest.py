"""Ingest bench: telemetry into SQLite through `Ingest` vs raw paho QoS 1, side by side in one run.

A separate publisher process sends N real telemetry messages (the agent's format, 50 devices, per-device
sequence numbers) at QoS 1 through a private Mosquitto. Run 1: a bare paho subscriber (QoS 1) counts
them. Run 2: `edgefleet.sdk.fleet.ingest.Ingest` writes them into a SQLite store. Throughput is messages
from the first publish to the last one received (run 1) or stored (run 2); the target is ingest ≥ 50 % of
raw, with sent == stored and no gap.

    python bench/ingest.py [--messages 20000] [--devices 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_common import PrivateMosquitto, write_result

PUBLISHER = r"""
import sys, time, json
import paho.mqtt.client as mqtt
from edgefleet.agent.core.protocol import Telemetry, Topics
port, fleet, n, devices = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", port)
c.loop_start()
metrics = {"model": "digits", "model_version": 3, "count": 120, "errors": 0, "p50_ms": 0.41, "p95_ms": 0.93,
           "p99_ms": 1.4, "mean_ms": 0.5, "live_accuracy": 0.98, "cpu_percent": 12.5, "rss_mb": 55.2,
           "disk_free_mb": 10240.0, "uptime_s": 3600.0, "emulated": None, "profile": "rpi4b",
           "eval": {"accuracy": 0.99, "at": 1.0}}
topics = [Topics(fleet, f"dev-{d:03d}").telemetry for d in range(devices)]
payloads = []
for i in range(n):
    d = i % devices
    payloads.append((topics[d], Telemetry.from_metrics(f"dev-{d:03d}", i // devices + 1, time.time(), metrics).to_wire()))
print(json.dumps({"start": time.time(), "bytes": len(payloads[0][1])}), flush=True)
last = None
for topic, payload in payloads:
    last = c.publish(topic, payload, qos=1)
last.wait_for_publish(120)
c.disconnect()
c.loop_stop()
"""


def _publish(port: int, fleet: str, n: int, devices: int) -> tuple[float, int, subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(port), fleet, str(n), str(devices)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    head = json.loads(proc.stdout.readline())
    return float(head["start"]), int(head["bytes"]), proc


def run_raw(broker: PrivateMosquitto, n: int, devices: int) -> dict[str, float]:
    import paho.mqtt.client as mqtt

    fleet = "rawbench"
    got = [0]
    done = threading.Event()
    last = [0.0]

    def on_message(c: object, u: object, m: object) -> None:
        got[0] += 1
        if got[0] >= n:
            last[0] = time.time()
            done.set()

    from edgefleet.agent.core.topics import Topics

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(Topics.devices(fleet, "telemetry"), qos=1)
    sub.loop_start()
    time.sleep(0.5)
    start, size, proc = _publish(broker.port, fleet, n, devices)
    ok = done.wait(300)
    proc.wait(60)
    sub.disconnect()
    sub.loop_stop()
    elapsed = (last[0] if ok else time.time()) - start
    return {"received": got[0], "seconds": elapsed, "msg_per_s": got[0] / elapsed, "payload_bytes": size}


def run_ingest(broker: PrivateMosquitto, n: int, devices: int, db_dir: Path) -> dict[str, float]:
    from edgefleet.sdk.fleet.ingest import Ingest
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions
    from edgefleet.sdk.store import Store

    fleet = "ingestbench"
    store = Store(f"sqlite:///{db_dir / 'bench.db'}")
    ingest = Ingest(store, MqttOptions(broker.url), fleet, max_rows=1000, max_delay_s=0.2)
    ingest.start()
    time.sleep(0.5)
    start, size, proc = _publish(broker.port, fleet, n, devices)
    deadline = time.monotonic() + 300
    while ingest.stored_telemetry < n and time.monotonic() < deadline:
        time.sleep(0.01)
    end = time.time()
    proc.wait(60)
    ingest.flush(30)
    stored = store.telemetry_count(fleet)
    gaps = store.gaps(fleet)
    ingest.close()
    store.close()
    elapsed = end - start
    return {
        "received": ingest.received,
        "stored": stored,
        "gaps": len(gaps),
        "seconds": elapsed,
        "msg_per_s": stored / elapsed,
        "payload_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=50)
    args = parser.parse_args()
    broker = PrivateMosquitto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = run_raw(broker, args.messages, args.devices)
            ing = run_ingest(broker, args.messages, args.devices, Path(tmp))
    finally:
        broker.stop()
    ratio = ing["msg_per_s"] / raw["msg_per_s"]
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"telemetry ingest, {args.messages} messages of {raw['payload_bytes']} B from {args.devices} devices, QoS 1"
    )
    for col in ("run", "received", "stored", "seconds", "msg/s"):
        table.add_column(col)
    table.add_row(
        "raw paho subscriber", str(raw["received"]), "-", f"{raw['seconds']:.2f}", f"{raw['msg_per_s']:.0f}"
    )
    table.add_row(
        "Ingest → SQLite",
        str(ing["received"]),
        str(ing["stored"]),
        f"{ing['seconds']:.2f}",
        f"{ing['msg_per_s']:.0f}",
    )
    table.caption = f"ingest / raw = {ratio:.2f} (target ≥ 0.50); sent == stored: {ing['stored'] == args.messages}; gaps: {ing['gaps']}"
    Console().print(table)
    path = write_result(
        "ingest",
        {
            "messages": args.messages,
            "devices": args.devices,
            "raw": raw,
            "ingest": ing,
            "ratio": ratio,
            "target_ratio": 0.5,
            "sent_equals_stored": ing["stored"] == args.messages,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
