"""Load bench: simulated agents → Mosquitto → `edgefleet serve`: sent == stored, ingest lag, a rollout.

Three phases against one Mosquitto (a private one on a free port, or `--broker URL`) and a real
`edgefleet serve --broker ... --db sqlite:///...` subprocess, so every stored row comes from the ingest
code `serve` runs:
  1. telemetry: AGENTS simulated devices (bench/load_agents.py, spread over PROCESSES processes, one
     paho client per device on one epoll loop per process) send telemetry at RATE msg/s each for
     SECONDS, QoS 1, in the agent's own wire format;
  2. rollout: telemetry keeps flowing while a signed bundle is uploaded to serve's REST API and rolled
     out to all AGENTS devices (POST /api/rollouts); the simulated devices verify the manifest signature
     and every file's sha256 over the chunks they receive and report `deployed` (they install nothing
     and run no model: see bench/load_agents.py);
  3. scale: BIG_AGENTS devices at BIG_RATE msg/s for SECONDS against a fresh serve and store.

Measured per phase: telemetry sent (acknowledged by the broker) vs stored, compared per device and per
sequence number (the script exits non-zero unless they are equal, with no duplicate and no sequence
gap); ingest lag = the moment a row became visible in the store (polled every POLL_S) minus the
message's `ts`, p50/p95/p99/max; stored msg/s; CPU of the serve process (100 % = one core), Mosquitto
and the simulated devices; the rollout's status, wall time and bytes published. Writes
bench/results/load.json (or --out).

    python bench/load.py [--agents 200 --rate 2 --seconds 60 --big-agents 1000 --big-rate 0.1]
    python bench/load.py --quick          # 50 agents, 10 s, rollout to 50, 100 devices in phase 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_common import RESULTS  # noqa: E402
from bench.load_agents import raise_nofile  # noqa: E402
from bench.load_scale import BROKER_KINDS, merge_into, run_scale, show_scale, start_broker  # noqa: E402

AGENTS_SCRIPT = str(ROOT / "bench" / "load_agents.py")
POLL_S = 0.025
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------
# processes: serve, the simulated devices, and CPU readings


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process from /proc (None when it is not readable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def broker_cpu(pids: int | list[int] | None) -> float | None:
    """CPU seconds of the broker: one process, or the sum over a cluster's nodes (None when unknown)."""
    if pids is None or isinstance(pids, int):
        return cpu_seconds(pids)
    readings = [cpu_seconds(pid) for pid in pids]
    return None if any(r is None for r in readings) else sum(r for r in readings if r is not None)


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """`edgefleet serve` as a subprocess: ingest from the broker into a SQLite store, REST API on a free port."""

    def __init__(self, broker: str, fleet: str, db: Path, key: Path, home: Path, log: Path) -> None:
        self.port = free_port()
        self.db = db
        self.log = log
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, EDGEFLEET_HOME=str(home))
        env.pop("EDGEFLEET_TOKEN", None)  # loopback: no token, and none from the caller's shell
        cmd = [
            sys.executable,
            "-c",
            "from edgefleet.sdk.cli import main; main()",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            f"sqlite:///{db}",
            "--broker",
            broker,
            "--fleet",
            fleet,
            "--trusted-key",
            str(key),
            "--bundle-dir",
            str(home / "bundles"),
            "--log-level",
            "warning",
        ]
        self._log = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"edgefleet serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if api(self.url, "GET", "/api/health", timeout=2).get("ok"):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"edgefleet serve did not answer within 90 s:\n{self.tail()}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float | None:
        """CPU seconds serve has used so far."""
        return cpu_seconds(self.proc.pid)

    def tail(self, lines: int = 30) -> str:
        """The end of serve's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def api(base: str, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
    """One JSON request to serve's API; bytes are sent as a bundle .tar. Raises SystemExit on an API error."""
    headers: dict[str, str] = {}
    data: bytes | None = None
    if isinstance(body, bytes):
        data, headers["Content-Type"] = body, "application/x-tar"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{method} {path} failed with {exc.code}: {exc.read()[:2000]!r}") from exc


class LineReader:
    """Reads JSON lines from a child's stdout with a timeout (its own buffer, so select() stays right)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def read(self, timeout: float) -> dict[str, Any]:
        """The next line as JSON; SystemExit when the child exits or stays silent past `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(
                    f"simulated agents (pid {self.proc.pid}) gave no answer within {timeout:.0f} s"
                )
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    raise SystemExit(
                        f"simulated agents (pid {self.proc.pid}) exited with {self.proc.wait(5)}; see their log"
                    )
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))


class AgentPool:
    """Simulated devices in several processes, driven together."""

    def __init__(
        self,
        broker: str | list[str],
        fleet: str,
        devices: int,
        processes: int,
        key: Path,
        log_dir: Path,
        rate: float,
        first: int = 0,
        mqtt_version: str = "5",
        connect_rate: float = 0.0,
    ) -> None:
        # A list of brokers (the nodes of a cluster): process i talks to broker i modulo their number.
        brokers = [broker] if isinstance(broker, str) else list(broker)
        self.devices = devices
        processes = max(1, min(processes, devices))
        counts = [devices // processes + (1 if i < devices % processes else 0) for i in range(processes)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[LineReader] = []
        self.logs = []
        start = first
        try:
            for i, count in enumerate(counts):
                log = (log_dir / f"agents-{fleet}-{i}.log").open("wb")
                self.logs.append(log)
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        AGENTS_SCRIPT,
                        "--broker",
                        brokers[i % len(brokers)],
                        "--mqtt-version",
                        mqtt_version,
                        "--fleet",
                        fleet,
                        "--first",
                        str(start),
                        "--count",
                        str(count),
                        "--total",
                        str(first + devices),
                        "--trusted-key",
                        str(key),
                        "--telemetry-interval",
                        str(1.0 / rate),
                        "--connect-rate",
                        str(connect_rate / processes),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
                self.procs.append(proc)
                self.readers.append(LineReader(proc))
                start += count
            paced = devices / connect_rate if connect_rate > 0 else 0.0
            self.ready = [r.read(240 + paced) for r in self.readers]
        except BaseException:
            self.kill()
            raise
        if not all(r.get("ready") for r in self.ready):
            self.kill()
            raise SystemExit(f"simulated agents did not start: {self.ready}")
        self.connect_s = max(float(r["connect_s"]) for r in self.ready)

    def call(self, cmd: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
        """Send one command to every process and collect their answers."""
        line = (json.dumps(cmd) + "\n").encode()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            proc.stdin.flush()
        return [r.read(timeout) for r in self.readers]

    def cpu(self) -> float:
        """CPU seconds of all the simulated devices' processes so far."""
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.procs)

    def close(self, clear: bool = True) -> None:
        """Quit every process (offline state, retained state and session removed), killing any that hangs."""
        try:
            self.call({"cmd": "quit", "clear": clear}, timeout=30)
        except (SystemExit, OSError):
            pass
        self.kill()

    def kill(self) -> None:
        """Make sure no process is left."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for log in self.logs:
            log.close()


class StorePoller(threading.Thread):
    """Polls the store's telemetry table; the moment a row is first seen is its store time."""

    def __init__(self, db: Path, fleet: str, interval: float = POLL_S) -> None:
        super().__init__(name="store-poller", daemon=True)
        self.db = db
        self.fleet = fleet
        self.interval = interval
        self.seen: dict[tuple[str, int], tuple[float, float]] = {}  # (device, seq) → (seen at, ts)
        self.duplicates = 0
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.last_id = 0
        self.errors = 0

    def run(self) -> None:
        """Poll until stopped."""
        conn = sqlite3.connect(str(self.db), timeout=5)
        try:
            while not self.stop_flag.wait(self.interval):
                try:
                    rows = conn.execute(
                        "SELECT id, device_id, seq, ts FROM telemetry WHERE fleet = ? AND id > ? ORDER BY id",
                        (self.fleet, self.last_id),
                    ).fetchall()
                except sqlite3.Error:
                    self.errors += 1  # a busy moment of the writer: read again next time
                    continue
                now = time.time()
                with self.lock:
                    for row_id, device, seq, ts in rows:
                        self.last_id = max(self.last_id, int(row_id))
                        key = (str(device), int(seq))
                        if key in self.seen:
                            self.duplicates += 1
                        else:
                            self.seen[key] = (now, float(ts))
        finally:
            conn.close()

    def have(self, keys: set[tuple[str, int]]) -> int:
        """How many of `keys` are stored."""
        with self.lock:
            return sum(k in self.seen for k in keys)

    def lags(self, keys: set[tuple[str, int]]) -> list[float]:
        """Store time minus sent time (s) of the stored `keys`."""
        with self.lock:
            return [self.seen[k][0] - self.seen[k][1] for k in keys if k in self.seen]

    def stored(self) -> set[tuple[str, int]]:
        """Every (device, seq) stored."""
        with self.lock:
            return set(self.seen)

    def close(self) -> None:
        """Stop polling."""
        self.stop_flag.set()
        self.join(10)


def db_scalar(db: Path, sql: str, *args: Any) -> Any:
    """One value from the store (read-only use)."""
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def wait_online(db: Path, fleet: str, n: int, timeout: float, announced: bool = False) -> float:
    """Wait until the store shows `n` devices online (their births ingested); returns seconds.

    With `announced`, a device counts once its birth is stored even if the host has since presumed it
    offline: births of thousands of devices take longer to store than a silent device's liveness
    window (max(keepalive, 2 × telemetry interval)), and it is back online with its first telemetry.
    """
    start = time.monotonic()
    sql = "SELECT count(*) FROM devices WHERE fleet = ?" + ("" if announced else " AND online = 1")
    while True:
        try:
            online = db_scalar(db, sql, fleet)
        except sqlite3.Error:
            online = 0
        if online >= n:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise SystemExit(f"only {online}/{n} devices online in the store after {timeout:.0f} s")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# the bundle


def make_bundle(d: Path, key_dir: Path, megabytes: float) -> tuple[Path, Path, int, str, int]:
    """A signed bundle of an ONNX MLP of about `megabytes` (built with onnx.helper, no torch); also packed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.sdk.trust.bundle import create_bundle, pack
    from edgefleet.sdk.trust.keys import load_private_key

    features, classes = 64, 10
    hidden = max(16, int(megabytes * 1024 * 1024 / 4 / (features + classes)))
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
        ],
        "load-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_path = d / "load-mlp.onnx"
    onnx.save(model, str(model_path))
    x = rng.standard_normal((64, features)).astype(np.float32)
    y = (np.maximum(x @ w1, 0) @ w2).argmax(1).astype(np.int64)  # the model's own answers: accuracy 1.0
    np.savez(d / "eval.npz", x=x, y=y)
    name, version = "load-mlp", 1
    fields = {
        "name": name,
        "version": version,
        "target": {"profile": "x86-64", "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, features]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, classes]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 1000.0, "warmup_runs": 1, "timeout_s": 60},
    }
    bundle = create_bundle(
        d / "bundle",
        model_path=model_path,
        eval_npz_path=d / "eval.npz",
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )
    manifest = json.loads((bundle / "manifest.json").read_bytes())
    size = sum(int(e["size"]) for e in manifest["files"].values())
    return bundle, pack(bundle, d / "bundle.tar"), size, name, version


# ---------------------------------------------------------------------------------------------------
# phases


def say(text: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max (nearest rank) in ms of `values` given in seconds."""
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "count": 0}
    arr = np.sort(np.asarray(values)) * 1000

    def q(p: float) -> float:
        return round(float(arr[min(len(arr) - 1, max(0, int(np.ceil(p / 100 * len(arr))) - 1))]), 1)

    return {"p50_ms": q(50), "p95_ms": q(95), "p99_ms": q(99), "max_ms": q(100), "count": len(arr)}


def sent_keys(reports: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """Every (device, seq) of telemetry the broker acknowledged."""
    return {(dev, int(seq)) for r in reports for dev, seqs in r["telemetry"].items() for seq in seqs}


@dataclass
class Checks:
    """Failures found on the way; the script exits non-zero when there is any."""

    failures: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> bool:
        """Record `what` when not `ok`."""
        if not ok:
            self.failures.append(what)
            print(f"FAILED: {what}", file=sys.stderr)
        return ok


def settle(
    poller: StorePoller, sent: set[tuple[str, int]], timeout: float
) -> tuple[float, set[tuple[str, int]]]:
    """Wait until every sent message is stored (or `timeout`); returns (seconds waited, missing)."""
    start = time.monotonic()
    while poller.have(sent) < len(sent) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    # One more poll after the last row, so anything extra the ingest wrote shows up too.
    time.sleep(3 * poller.interval)
    return time.monotonic() - start, sent - poller.stored()


def compare(
    label: str,
    checks: Checks,
    poller: StorePoller,
    sent: set[tuple[str, int]],
    reports: list[dict[str, Any]],
    db: Path,
    fleet: str,
) -> dict[str, Any]:
    """sent vs stored for the whole fleet so far: same (device, seq) set, no duplicate, no gap."""
    stored = poller.stored()
    rows = int(db_scalar(db, "SELECT count(*) FROM telemetry WHERE fleet = ?", fleet))
    gaps = int(db_scalar(db, "SELECT count(*) FROM gaps WHERE fleet = ?", fleet))
    missing, extra = sent - stored, stored - sent
    unacked = sum(int(r["unacked"]) for r in reports)
    errors = [e for r in reports for e in r["errors"]]
    disconnects = sum(int(r["disconnects"]) for r in reports)
    suback_failures = sum(int(r.get("suback_failures", 0)) for r in reports)
    checks.expect(
        not missing,
        f"{label}: {len(missing)} acknowledged telemetry messages never stored, e.g. {sorted(missing)[:3]}",
    )
    checks.expect(
        not extra, f"{label}: {len(extra)} stored telemetry rows nobody sent, e.g. {sorted(extra)[:3]}"
    )
    checks.expect(rows == len(sent), f"{label}: {rows} telemetry rows stored for {len(sent)} sent")
    checks.expect(poller.duplicates == 0, f"{label}: {poller.duplicates} duplicate telemetry rows")
    checks.expect(gaps == 0, f"{label}: the store recorded {gaps} sequence gaps")
    checks.expect(unacked == 0, f"{label}: {unacked} publishes never acknowledged by the broker")
    checks.expect(disconnects == 0, f"{label}: simulated devices were disconnected {disconnects} times")
    checks.expect(suback_failures == 0, f"{label}: the broker refused {suback_failures} subscriptions")
    checks.expect(not errors, f"{label}: simulated devices reported errors: {errors[:3]}")
    return {
        "sent": len(sent),
        "stored": len(stored & sent),
        "rows": rows,
        "sent_equals_stored": not missing and not extra and rows == len(sent),
        "duplicates": poller.duplicates,
        "gaps": gaps,
        "unacked": unacked,
        "disconnects": disconnects,
        "suback_failures": suback_failures,
    }


def telemetry_phase(
    label: str,
    checks: Checks,
    pool: AgentPool,
    poller: StorePoller,
    serve: Serve,
    mosquitto_pid: int | list[int] | None,
    rate: float,
    seconds: float,
    already: set[tuple[str, int]],
) -> tuple[dict[str, Any], set[tuple[str, int]]]:
    """Send telemetry at `rate` per device for `seconds`; sent vs stored and lag."""
    start = time.time() + 1.0
    pool.call({"cmd": "telemetry", "rate": rate, "start": start, "seconds": seconds})
    time.sleep(max(0.0, start - time.time()))
    cpu0 = (serve.cpu(), broker_cpu(mosquitto_pid), pool.cpu(), time.monotonic())
    time.sleep(max(0.0, start + seconds - time.time()))
    cpu1 = (serve.cpu(), broker_cpu(mosquitto_pid), pool.cpu(), time.monotonic())
    reports = pool.call({"cmd": "report", "wait_s": 60}, timeout=120)
    sent = sent_keys(reports)
    fresh = sent - already
    waited, missing = settle(poller, sent, timeout=120)
    cpu2 = serve.cpu()
    wall = cpu1[3] - cpu0[3]
    result = compare(label, checks, poller, sent, reports, serve.db, poller.fleet)
    lag = poller.lags(fresh)
    ends = [poller.seen[k][0] for k in fresh if k in poller.seen]
    result.update(
        devices=pool.devices,
        rate_per_device=rate,
        seconds=seconds,
        phase_sent=len(fresh),
        phase_stored=len(fresh & poller.stored()),
        offered_msg_per_s=round(pool.devices * rate, 1),
        stored_msg_per_s=round(len(ends) / max(1e-9, max(ends, default=start) - start), 1),
        lag=percentiles(lag),
        settle_after_end_s=round(waited, 2),
        serve_cpu_percent=_pct(cpu0[0], cpu1[0], wall),
        serve_cpu_s_until_settled=_sub(cpu2, cpu0[0]),
        mosquitto_cpu_percent=_pct(cpu0[1], cpu1[1], wall),
        agents_cpu_percent=_pct(cpu0[2], cpu1[2], wall),
        serve_rss_mib=rss_mib(serve.proc.pid),
        agents_send_lateness_ms=_worst([r["send_lateness_ms"] for r in reports]),
        missing_after_settle=len(missing),
    )
    return result, sent


def rollout_phase(
    checks: Checks,
    pool: AgentPool,
    poller: StorePoller,
    serve: Serve,
    mosquitto_pid: int | list[int] | None,
    tar: Path,
    bundle_bytes: int,
    name: str,
    version: int,
    rate: float,
    already: set[tuple[str, int]],
    timeout: float,
) -> tuple[dict[str, Any], set[tuple[str, int]]]:
    """Upload the bundle and roll it out to every device through serve's API, with telemetry flowing."""
    start = time.time() + 0.5
    pool.call({"cmd": "telemetry", "rate": rate, "start": start, "seconds": None})
    time.sleep(max(0.0, start - time.time()) + 1.0)
    uploaded = api(serve.url, "POST", "/api/bundles", tar.read_bytes(), timeout=120)
    cpu0 = (serve.cpu(), broker_cpu(mosquitto_pid), pool.cpu(), time.monotonic())
    began = time.time()
    body = {"bundles": [int(uploaded["id"])], "to": "all", "strategy": "all", "timeout_s": timeout}
    refusals: list[str] = []
    while True:
        try:
            row = api(serve.url, "POST", "/api/rollouts", body, timeout=120)
            break
        except SystemExit as exc:
            # 503: serve could not reach the broker in time (its MQTT thread busy with thousands of
            # devices) and asks for a retry; the refusal sent nothing. Retried, and counted.
            if "failed with 503" not in str(exc) or len(refusals) >= 5:
                raise
            refusals.append(str(exc)[:300])
            say(f"rollout refused ({len(refusals)}): {str(exc)[:160]}; retrying in 5 s")
            time.sleep(5)
    rollout_id = str(row["id"])
    while not row.get("finished"):
        if time.time() - began > timeout + 60:
            break
        # What a watching user's dashboard does: status and counts once a second; the per-device rows
        # (5,000 of them at the largest size) once, at the end.
        time.sleep(1.0)
        row = api(serve.url, "GET", f"/api/rollouts/{rollout_id}?devices=false")
    row = api(serve.url, "GET", f"/api/rollouts/{rollout_id}")
    ended = time.time()
    cpu1 = (serve.cpu(), broker_cpu(mosquitto_pid), pool.cpu(), time.monotonic())
    pool.call({"cmd": "stop"})
    reports = pool.call({"cmd": "report", "wait_s": 60}, timeout=120)
    sent = sent_keys(reports)
    fresh = sent - already
    waited, _ = settle(poller, sent, timeout=120)
    statuses = [str(d.get("status")) for d in row.get("devices", [])]
    outcomes = [o for r in reports for o in r["outcomes"].values()]
    actives = [a for r in reports for a in r["active"].values()]
    deploy_s = [s for r in reports for s in r["deploy_seconds"]]
    wall = cpu1[3] - cpu0[3]
    checks.expect(
        row.get("status") == "succeeded",
        f"rollout {rollout_id} ended {row.get('status')}: {row.get('reason')}",
    )
    checks.expect(
        statuses.count("deployed") == pool.devices,
        f"rollout: {statuses.count('deployed')}/{pool.devices} devices deployed in the store",
    )
    checks.expect(
        outcomes.count("deployed") == pool.devices
        and all(a == {"name": name, "version": version} for a in actives),
        f"rollout: {outcomes.count('deployed')}/{pool.devices} simulated devices verified and report {name} v{version}",
    )
    result = compare("rollout (telemetry during it)", checks, poller, sent, reports, serve.db, poller.fleet)
    settings = row.get("settings") or {}
    stats = settings.get("stats") or {}
    result.update(
        rollout_id=rollout_id,
        status=row.get("status"),
        # Per-device outcomes: the store's status of each device, and what each simulated device saw.
        device_statuses=dict(Counter(statuses)),
        device_outcomes=dict(Counter(str(o) for o in outcomes)),
        post_refusals=refusals,
        reason=row.get("reason"),
        devices=pool.devices,
        deployed_in_store=statuses.count("deployed"),
        verified_by_devices=outcomes.count("deployed"),
        seconds=round(ended - began, 2),
        bundle_bytes=bundle_bytes,
        published_bytes=stats.get("total_bytes"),
        transfer_stats=stats,
        timeline_s=settings.get("timeline"),
        device_deploy_s=percentiles(deploy_s),
        phase_sent=len(fresh),
        phase_stored=len(fresh & poller.stored()),
        telemetry_rate_per_device=rate,
        lag=percentiles(poller.lags(fresh)),
        settle_after_end_s=round(waited, 2),
        serve_cpu_percent=_pct(cpu0[0], cpu1[0], wall),
        mosquitto_cpu_percent=_pct(cpu0[1], cpu1[1], wall),
        agents_cpu_percent=_pct(cpu0[2], cpu1[2], wall),
        serve_rss_mib=rss_mib(serve.proc.pid),
    )
    return result, sent


def _pct(a: float | None, b: float | None, wall: float) -> float | None:
    return None if a is None or b is None or wall <= 0 else round(100 * (b - a) / wall, 1)


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def _worst(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        for k, v in item.items():
            if v is not None:
                out[k] = max(out.get(k, v), v)
    return out


# ---------------------------------------------------------------------------------------------------
# main


def run(args: argparse.Namespace, tmp: Path, checks: Checks) -> dict[str, Any]:
    """Every phase; returns the results."""
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp / "keys")
    _, tar, bundle_bytes, name, version = make_bundle(tmp, tmp / "keys", args.bundle_mb)
    broker = start_broker(args.broker_kinds[0], args.broker, args.nats_replicas)
    # serve on the first node; the devices on the others when the broker is a cluster
    url, device_urls, mqtt_version = broker.serve_url, broker.device_urls, broker.mqtt_version
    mosquitto_pid: list[int] | None = broker.pids or None
    tag = uuid.uuid4().hex[:6]
    out: dict[str, Any] = {}
    try:
        # Phases 1 and 2: one fleet, one serve, one store.
        fleet = f"load{tag}a"
        serve = Serve(url, fleet, tmp / "a.db", keys.public_path, tmp / "home-a", tmp / "serve-a.log")
        poller = StorePoller(tmp / "a.db", fleet)
        poller.start()
        pool: AgentPool | None = None
        try:
            say(
                f"phase 1: {args.agents} devices in {args.processes} processes, {args.rate:g} msg/s each for {args.seconds:g} s"
            )
            pool = AgentPool(
                device_urls,
                fleet,
                args.agents,
                args.processes,
                keys.public_path,
                tmp,
                args.rate,
                mqtt_version=mqtt_version,
            )
            births = wait_online(tmp / "a.db", fleet, args.agents, timeout=180)
            phase1, sent = telemetry_phase(
                "telemetry", checks, pool, poller, serve, mosquitto_pid, args.rate, args.seconds, set()
            )
            phase1.update(connect_s=round(pool.connect_s, 2), births_stored_s=round(births, 2))
            out["telemetry"] = phase1
            say(
                f"phase 2: rollout of a {bundle_bytes / 1048576:.2f} MiB bundle to {args.agents} devices, telemetry on"
            )
            out["rollout"], _ = rollout_phase(
                checks,
                pool,
                poller,
                serve,
                mosquitto_pid,
                tar,
                bundle_bytes,
                name,
                version,
                args.rate,
                sent,
                args.rollout_timeout,
            )
        finally:
            if pool is not None:
                pool.close(clear=True)
            poller.close()
            serve.stop()
        # Phase 3: many devices at a low rate, fresh serve and store.
        fleet = f"load{tag}b"
        serve = Serve(url, fleet, tmp / "b.db", keys.public_path, tmp / "home-b", tmp / "serve-b.log")
        poller = StorePoller(tmp / "b.db", fleet)
        poller.start()
        pool = None
        try:
            say(f"phase 3: {args.big_agents} devices, {args.big_rate:g} msg/s each for {args.seconds:g} s")
            pool = AgentPool(
                device_urls,
                fleet,
                args.big_agents,
                args.processes,
                keys.public_path,
                tmp,
                args.big_rate,
                mqtt_version=mqtt_version,
            )
            births = wait_online(tmp / "b.db", fleet, args.big_agents, timeout=300)
            phase3, _ = telemetry_phase(
                "scale", checks, pool, poller, serve, mosquitto_pid, args.big_rate, args.seconds, set()
            )
            phase3.update(connect_s=round(pool.connect_s, 2), births_stored_s=round(births, 2))
            out["scale"] = phase3
        finally:
            if pool is not None:
                pool.close(clear=True)
            poller.close()
            serve.stop()
    finally:
        broker.stop()
    return out


def show(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="load: simulated agents → Mosquitto → edgefleet serve (SQLite)")
    for col in (
        "phase",
        "devices × msg/s",
        "sent",
        "stored",
        "equal",
        "stored msg/s",
        "lag p50/p95/p99/max ms",
        "serve CPU",
    ):
        table.add_column(col)

    def lag(r: dict[str, Any]) -> str:
        q = r["lag"]
        return "/".join(
            "-" if q[k] is None else f"{q[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")
        )

    for key in ("telemetry", "rollout", "scale"):
        r = results.get(key)
        if not r:
            continue
        if key == "rollout":
            title = f"rollout ({r['status']}, {r['seconds']:.1f} s)"
            rate, throughput = r["telemetry_rate_per_device"], "-"
        else:
            title = f"{key} {r['seconds']:g} s"
            rate, throughput = r["rate_per_device"], f"{r['stored_msg_per_s']:.0f}"
        table.add_row(
            title,
            f"{r['devices']} × {rate:g}",
            str(r["phase_sent"]),
            str(r["phase_stored"]),
            "yes" if r["sent_equals_stored"] else "NO",
            throughput,
            lag(r),
            f"{r['serve_cpu_percent']} %",
        )
    roll = results.get("rollout") or {}
    mib = 1024 * 1024
    table.caption = (
        f"lag = row visible in the store (polled every {POLL_S * 1000:.0f} ms) − message ts; serve CPU 100 % = one core. "
        + (
            f"Rollout: {roll.get('deployed_in_store')}/{roll.get('devices')} deployed, "
            f"{(roll.get('bundle_bytes') or 0) / mib:.2f} MiB bundle, {(roll.get('published_bytes') or 0) / mib:.2f} MiB published; "
            if roll
            else ""
        )
        + "simulated devices verify signature + sha256 but run no model. "
        f"Shared {results['machine']['cpus']}-core machine, load average {results['load_before']} before, {results['load_after']} after."
    )
    # A pipe or CI log gets the full table rather than 80 folded columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def scale_main(
    args: argparse.Namespace, out: Path, nofile: int, checks: Checks, load_before: list[float], started: float
) -> None:
    """The scaling mode: every size on every broker kind; merged into the JSON under `scaling`."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-load-scale-") as tmp:
        try:
            scaling = run_scale(sys.modules[__name__], args, Path(tmp), checks)
        except SystemExit as exc:
            for log in sorted(Path(tmp).glob("*.log")):
                text = log.read_text(errors="replace").strip()
                if text:
                    print(f"--- {log.name}\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
            raise SystemExit(f"load bench (scale) failed: {exc}") from exc
    meta = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "sizes": args.scale,
        "nofile_limit": nofile,
        "processes_min": args.processes,
        "devices_per_process": args.devices_per_process,
        "connect_rate_per_s": args.connect_rate or None,
        "command": "python " + " ".join(sys.argv),
        "failures": checks.failures,
        "ok": not checks.failures,
    }
    show_scale(scaling)
    merge_into(out, scaling, meta)
    print(f"wrote {out} (key 'scaling')")
    if checks.failures:
        raise SystemExit("load bench (scale) failed:\n  " + "\n  ".join(checks.failures))


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--agents", type=int, default=None, help="devices in phases 1-2 (default 200; quick 50)"
    )
    parser.add_argument("--rate", type=float, default=2.0, help="telemetry msg/s per device in phases 1-2")
    parser.add_argument(
        "--seconds", type=float, default=None, help="length of phases 1 and 3 (default 60; quick 10)"
    )
    parser.add_argument(
        "--big-agents", type=int, default=None, help="devices in phase 3 (default 1000; quick 100)"
    )
    parser.add_argument("--big-rate", type=float, default=0.1, help="telemetry msg/s per device in phase 3")
    parser.add_argument(
        "--processes", type=int, default=None, help="processes for the simulated devices (default 4; quick 2)"
    )
    parser.add_argument(
        "--broker", default=None, help="mqtt://HOST:PORT (default: a private Mosquitto on a free port)"
    )
    parser.add_argument(
        "--broker-kind",
        default="mosquitto",
        help="mosquitto (a private one) or nats-cluster (3 private nodes: serve on one, devices on the "
        "others); with --scale a comma-separated list runs each",
    )
    parser.add_argument(
        "--nats-replicas",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="nats-cluster: JetStream replicas of the MQTT streams (sessions, QoS 1 and retained messages)",
    )
    parser.add_argument(
        "--scale",
        default=None,
        help="scaling mode: comma-separated fleet sizes (e.g. 200,1000,5000), each a fresh serve with "
        "telemetry at --big-rate and a rollout to all (bench/load_scale.py)",
    )
    parser.add_argument(
        "--scale-seconds", type=float, default=30.0, help="telemetry seconds per size in scaling mode"
    )
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=1250,
        help="scaling mode: at most this many simulated devices per process",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=0.0,
        help="scaling mode: devices connecting per second, fleet-wide (default 0: all at once, as after a "
        "broker restart; a fleet booting over a minute is e.g. 100)",
    )
    parser.add_argument("--bundle-mb", type=float, default=1.0, help="size of the rolled-out model")
    parser.add_argument("--rollout-timeout", type=float, default=300.0, help="seconds a device may take")
    parser.add_argument("--quick", action="store_true", help="a small run for CI")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/load.json; quick load-quick.json)",
    )
    args = parser.parse_args()
    args.broker_kinds = [k.strip() for k in args.broker_kind.split(",") if k.strip()]
    for kind in args.broker_kinds:
        if kind not in BROKER_KINDS:
            raise SystemExit(f"--broker-kind {kind!r}: use {' or '.join(BROKER_KINDS)}")
    if not args.broker_kinds or (len(args.broker_kinds) > 1 and not args.scale):
        raise SystemExit("--broker-kind takes one kind (a comma-separated list only with --scale)")
    try:
        args.scale = [int(n) for n in args.scale.split(",")] if args.scale else None
    except ValueError:
        raise SystemExit(
            f"--scale {args.scale!r}: use comma-separated device counts, e.g. 200,1000,5000"
        ) from None
    if args.scale and (min(args.scale) < 1 or args.devices_per_process < 1 or args.scale_seconds <= 0):
        raise SystemExit("--scale sizes and --devices-per-process must be >= 1, --scale-seconds > 0")
    args.agents = args.agents or (50 if args.quick else 200)
    args.seconds = args.seconds or (10.0 if args.quick else 60.0)
    args.big_agents = args.big_agents or (100 if args.quick else 1000)
    args.processes = args.processes or (2 if args.quick else 4)
    out = args.out or RESULTS / ("load-quick.json" if args.quick else "load.json")
    for what, value in (
        ("--agents", args.agents),
        ("--big-agents", args.big_agents),
        ("--processes", args.processes),
    ):
        if value < 1:
            raise SystemExit(f"{what} must be at least 1")
    if args.rate <= 0 or args.big_rate <= 0 or args.seconds <= 0:
        raise SystemExit("--rate, --big-rate and --seconds must be > 0")
    if args.broker and not args.broker.startswith("mqtt://"):
        raise SystemExit(f"--broker {args.broker!r}: use mqtt://HOST:PORT")
    nofile = raise_nofile()
    # SIGTERM (a CI timeout) unwinds like an error, so serve, the agents and the broker are stopped.
    signal.signal(signal.SIGTERM, _terminate)
    checks = Checks()
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.time()
    if args.scale:
        scale_main(args, out, nofile, checks, load_before, started)
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-load-") as tmp:
        try:
            phases = run(args, Path(tmp), checks)
        except SystemExit as exc:
            # Show the logs of what failed before the temporary folder goes.
            for log in sorted(Path(tmp).glob("*.log")):
                text = log.read_text(errors="replace").strip()
                if text:
                    print(f"--- {log.name}\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
            raise SystemExit(f"load bench failed: {exc}") from exc
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "config": {
            "agents": args.agents,
            "rate": args.rate,
            "seconds": args.seconds,
            "big_agents": args.big_agents,
            "big_rate": args.big_rate,
            "processes": args.processes,
            "broker": args.broker or f"private {args.broker_kinds[0]}",
            "bundle_mb": args.bundle_mb,
            "quick": args.quick,
            "nofile_limit": nofile,
            "store": "sqlite",
            "poll_s": POLL_S,
        },
        "simulated_devices": (
            "bench/load_agents.py: one paho MQTT 5 client per device, persistent session, retained birth and "
            "Last Will, agent-format messages with per-device seq; on deploy: signature + file list + "
            "sha256 of every file checked, no install, no model, no health check"
        ),
        **phases,
        "ok": not checks.failures,
        "failures": checks.failures,
    }
    show(results, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if checks.failures:
        raise SystemExit("load bench failed:\n  " + "\n  ".join(checks.failures))


if __name__ == "__main__":
    main()
