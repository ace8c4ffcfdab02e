"""The load bench's broker choice and its scaling mode: the same fleet at 200 → 1,000 → 5,000 devices.

`bench/load.py --broker-kind mosquitto|nats-cluster` picks the broker: a private Mosquitto on a free port,
or a private 3-node NATS cluster (bench/nats_cluster.py: JetStream, MQTT 3.1.1) with `edgefleet serve` on
node 0 and the simulated devices spread over nodes 1 and 2, as a fleet that outgrew one broker runs.

`bench/load.py --scale 200,1000,5000` runs, for each size on each broker kind, a fresh serve and store:
connect N simulated devices, telemetry at RATE msg/s each for SECONDS (sent == stored checked), then a
rollout of the bundle (1 MB by default) to all N with telemetry on, and reads per-device outcomes (the
store's status of each device, and what each simulated device verified), the broadcast bytes over the
bundle's size, and the CPU and RSS of serve (the host), the broker(s) and the device processes, also per
1,000 devices. Results go under the `scaling` key of the JSON (one entry per broker kind; other keys of
an existing file are kept), and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet_common import PrivateMosquitto
from bench.nats_cluster import NatsCluster

BROKER_KINDS = ("mosquitto", "nats-cluster")
# The ceiling: the bundle goes out once, not once per device (+10 % for chunk framing, repairs).
MAX_BROADCAST_RATIO = 1.1


@dataclass
class BenchBroker:
    """Where serve and the simulated devices connect, which MQTT version, and the broker processes."""

    kind: str
    serve_url: str
    device_urls: list[str]
    mqtt_version: str
    pids: list[int]
    stop: Any = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: Any = field(default=lambda: "", repr=False)

    def rss_mib(self) -> float | None:
        """Resident memory of the broker process(es) together, MiB."""
        return _sum(status_mib(pid, "VmRSS") for pid in self.pids)


def start_broker(kind: str, url: str | None = None, nats_replicas: int = 3) -> BenchBroker:
    """Start the broker of `kind` (or use `url`, an external broker, for serve and devices alike)."""
    if url:
        return BenchBroker("external", url, [url], "5", [], lambda: None)
    if kind == "mosquitto":
        mosquitto = PrivateMosquitto()
        # Mosquitto 2.0 takes any number of connections by default (max_connections -1); what limits
        # thousands of clients is the open-file limit, which the bench raises and the broker inherits.
        return BenchBroker(
            kind,
            mosquitto.url,
            [mosquitto.url],
            "5",
            [mosquitto.proc.pid],
            mosquitto.stop,
            {"max_queued_messages": 0, "max_connections": -1},
        )
    if kind == "nats-cluster":
        # One consumer per QoS 1 subscription, thousands of them: kept on one node and in memory (no
        # node dies in the bench; see NatsCluster for why the failover test keeps 3).
        cluster = NatsCluster(stream_replicas=nats_replicas, consumer_replicas=1).start()
        nodes = cluster.nodes

        def notes() -> str:
            # What the nodes logged beyond their start-up lines: slow consumers, JetStream timeouts.
            lines = []
            for node in nodes:
                try:
                    text = node.log_path.read_text(errors="replace")
                except OSError:
                    continue
                lines += [f"{node.name}: {ln}" for ln in text.splitlines() if "[ERR]" in ln or "[WRN]" in ln]
            return "\n".join(lines[-40:])

        return BenchBroker(
            kind,
            nodes[0].url,
            [n.url for n in nodes[1:]] or [nodes[0].url],
            "3.1.1",
            cluster.pids(),
            cluster.stop,
            {"nodes": len(nodes), **cluster.settings},
            notes,
        )
    raise SystemExit(f"--broker-kind {kind!r}: use one of {', '.join(BROKER_KINDS)}")


def status_mib(pid: int, key: str) -> float | None:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sum(values: Any) -> float | None:
    items = list(values)
    return None if not items or any(v is None for v in items) else round(sum(items), 1)


def _per_k(value: float | None, devices: int) -> float | None:
    return None if value is None else round(value * 1000 / devices, 2)


def scale_step(
    load: Any,
    args: argparse.Namespace,
    broker: BenchBroker,
    devices: int,
    tmp: Path,
    keys: Any,
    bundle: tuple[Path, int, str, int],
    checks: Any,
    out: dict[str, Any],
) -> None:
    """One size on one broker into `out` (kept when a later part fails): connect, telemetry, rollout."""
    tar, bundle_bytes, name, version = bundle
    fleet = f"scale{uuid.uuid4().hex[:6]}n{devices}"
    home = tmp / f"home-{fleet}"
    db = tmp / f"{fleet}.db"
    serve = load.Serve(broker.serve_url, fleet, db, keys.public_path, home, tmp / f"serve-{fleet}.log")
    poller = load.StorePoller(db, fleet)
    poller.start()
    pool = None
    processes = max(args.processes, -(-devices // args.devices_per_process))
    try:
        load.say(f"{broker.kind}: {devices} devices in {processes} processes")
        pool = load.AgentPool(
            broker.device_urls,
            fleet,
            devices,
            processes,
            keys.public_path,
            tmp,
            args.big_rate,
            mqtt_version=broker.mqtt_version,
            connect_rate=args.connect_rate,
        )
        births = load.wait_online(db, fleet, devices, timeout=600, announced=True)
        out.update(connect_s=round(pool.connect_s, 2), births_stored_s=round(births, 2))
        label = f"{broker.kind} {devices}"
        b0, t0 = load.broker_cpu(broker.pids), time.monotonic()
        telemetry, sent = load.telemetry_phase(
            f"{label} telemetry",
            checks,
            pool,
            poller,
            serve,
            broker.pids,
            args.big_rate,
            args.scale_seconds,
            set(),
        )
        b1, t1 = load.broker_cpu(broker.pids), time.monotonic()
        telemetry.update(
            broker_cpu_percent_incl_settle=load._pct(b0, b1, t1 - t0),
            broker_rss_mib=broker.rss_mib(),
            agents_rss_mib=_sum(status_mib(p.pid, "VmRSS") for p in pool.procs),
        )
        out["telemetry"] = telemetry
        load.say(f"{broker.kind}: rollout of {bundle_bytes / 1048576:.2f} MiB to {devices} devices")
        rollout, _ = load.rollout_phase(
            checks,
            pool,
            poller,
            serve,
            broker.pids,
            tar,
            bundle_bytes,
            name,
            version,
            args.big_rate,
            sent,
            args.rollout_timeout,
        )
        stats = rollout.get("transfer_stats") or {}
        broadcast = stats.get("broadcast_bytes")
        ratio = None if broadcast is None else round(broadcast / bundle_bytes, 3)
        rollout.update(
            broadcast_over_bundle=ratio,
            broker_rss_mib=broker.rss_mib(),
            agents_rss_mib=_sum(status_mib(p.pid, "VmRSS") for p in pool.procs),
        )
        checks.expect(
            ratio is not None and ratio <= MAX_BROADCAST_RATIO,
            f"{label}: broadcast {broadcast} bytes = {ratio}× the {bundle_bytes}-byte bundle "
            f"(at most {MAX_BROADCAST_RATIO}×)",
        )
        out["rollout"] = rollout
        serve_hwm = status_mib(serve.proc.pid, "VmHWM")
        out["per_1000_devices"] = {
            "serve_cpu_percent_telemetry": _per_k(telemetry.get("serve_cpu_percent"), devices),
            "serve_cpu_percent_rollout": _per_k(rollout.get("serve_cpu_percent"), devices),
            "serve_rss_mib": _per_k(telemetry.get("serve_rss_mib"), devices),
            "serve_peak_rss_mib": _per_k(serve_hwm, devices),
            "broker_cpu_percent_telemetry": _per_k(telemetry.get("mosquitto_cpu_percent"), devices),
            "broker_rss_mib": _per_k(rollout.get("broker_rss_mib"), devices),
        }
        out["serve_peak_rss_mib"] = None if serve_hwm is None else round(serve_hwm, 1)
    finally:
        if pool is not None:
            pool.close(clear=True)
        poller.close()
        serve.stop()


def run_scale(load: Any, args: argparse.Namespace, tmp: Path, checks: Any) -> dict[str, Any]:
    """Every size on every broker kind asked for; returns {kind: {config, steps}}."""
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp / "keys")
    _, tar, bundle_bytes, name, version = load.make_bundle(tmp, tmp / "keys", args.bundle_mb)
    out: dict[str, Any] = {}
    for kind in args.broker_kinds:
        broker = start_broker(kind, args.broker, args.nats_replicas)
        steps: list[dict[str, Any]] = []
        out[broker.kind] = {
            "broker": broker.settings,
            "mqtt_version": broker.mqtt_version,
            "rate_per_device": args.big_rate,
            "telemetry_seconds": args.scale_seconds,
            "bundle_bytes": bundle_bytes,
            "steps": steps,
        }
        try:
            for devices in args.scale:
                failures = len(checks.failures)
                steps.append({"devices": devices})
                try:
                    bundle = (tar, bundle_bytes, name, version)
                    scale_step(load, args, broker, devices, tmp, keys, bundle, checks, steps[-1])
                except SystemExit as exc:
                    # One size failing (a timeout at 5,000) still leaves the smaller sizes' figures, and
                    # this size's figures up to the failure.
                    checks.expect(False, f"{broker.kind} {devices}: {exc}")
                    steps[-1]["error"] = str(exc)
                steps[-1]["ok"] = len(checks.failures) == failures
                if not steps[-1]["ok"]:
                    # The simulated devices' own account (why a process gave up), then the broker's.
                    tails = []
                    for log in sorted(tmp.glob(f"agents-*n{devices}-*.log")):
                        tails += log.read_text(errors="replace").splitlines()[-3:]
                    steps[-1]["agents_log"] = tails[-12:]
                    said = broker.notes()
                    steps[-1]["broker_log"] = said.splitlines()[-10:]
                    if said:
                        load.say(f"{broker.kind} {devices}: the broker logged\n{said}")
        finally:
            broker.stop()
    return out


def show_scale(results: dict[str, Any]) -> None:
    """One row per broker kind and size."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="load --scale: simulated devices → broker → edgefleet serve (SQLite)")
    for col in (
        "broker",
        "devices",
        "connect s",
        "telemetry sent=stored",
        "lag p99 ms",
        "rollout",
        "deployed",
        "broadcast/bundle",
        "serve CPU % (tel/roll)",
        "serve RSS MiB",
        "broker CPU %",
        "broker RSS MiB",
    ):
        table.add_column(col)
    for kind, body in results.items():
        for step in body["steps"]:
            tel, roll = step.get("telemetry") or {}, step.get("rollout") or {}
            rollout = f"{roll['status']} {roll['seconds']:.0f} s" if roll else "-"
            if "error" in step:
                rollout = f"error: {step['error'][:50]}"
            table.add_row(
                kind,
                f"{step['devices']:,}",
                _fmt(step.get("connect_s")),
                f"{tel['phase_sent']:,}={tel['phase_stored']:,}" if tel else "-",
                _fmt((tel.get("lag") or {}).get("p99_ms")),
                rollout,
                f"{roll['deployed_in_store']}/{roll['devices']}" if roll else "-",
                _fmt(roll.get("broadcast_over_bundle")),
                f"{_fmt(tel.get('serve_cpu_percent'))}/{_fmt(roll.get('serve_cpu_percent'))}",
                _fmt(tel.get("serve_rss_mib")),
                _fmt(tel.get("mosquitto_cpu_percent")),
                _fmt(roll.get("broker_rss_mib") or tel.get("broker_rss_mib")),
            )
    Console(width=None if os.isatty(1) else 200).print(table)


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def merge_into(path: Path, scaling: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Put `scaling` (one entry per broker kind) into the JSON at `path`, keeping what else it holds."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    merged = dict(data.get("scaling") or {})
    for kind, body in scaling.items():
        merged[kind] = {**body, **meta}
    data["scaling"] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
