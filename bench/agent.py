"""Agent bench: serving overhead, local HTTP latency, a model switch under load, memory and disk footprint.

Everything is measured side by side in one run on this machine:
  1. `ModelServer.infer` vs a bare `session.run` on the very same onnxruntime session, interleaved in
     rounds (digits CNN at batch 1, all-MiniLM-L6-v2 dynamic INT8 per-channel at one sentence);
  2. the local HTTP endpoint (keep-alive, JSON and .npy bodies) vs calling `infer` directly;
  3. a full install (verify → write → load → health → switch) of a new bundle while paced HTTP clients
     send 200 requests/s; failed requests and latency before / during / after the switch;
  4. RSS of separate processes: a bare script holding the onnxruntime session vs the agent's
     ModelServer holding the same model, and the agent's modules with no model loaded;
  5. disk: agent code + paho-mqtt + PyNaCl + cffi + pycparser as installed.
Prints a table, writes `bench/results/agent.json`.

    python bench/agent.py [--skip-minilm] [--overhead-only] [--rate 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
THREADS = 1  # one intra-op thread, as on a loaded Pi; both sides of every comparison use the same


# ----------------------------------------------------------------------------------------------------
# models


def export_digits(workdir: Path) -> tuple[Path, Path]:
    """Train the digits CNN, export it to ONNX (batch dynamic) and write its eval set; (model, eval.npz)."""
    import torch

    from edgefleet.sdk.zoo import trained_digits_cnn

    model, split = trained_digits_cnn(epochs=20)
    path = workdir / "digits.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
    )
    eval_path = workdir / "digits_eval.npz"
    np.savez(eval_path, x=split.x_test[:200].astype(np.float32), y=split.y_test[:200].astype(np.int64))
    return path, eval_path


def export_minilm_int8(workdir: Path) -> tuple[Path, Dict[str, np.ndarray]]:
    """all-MiniLM-L6-v2 → ONNX (TorchScript exporter) → dynamic INT8 per-channel; (model, one sentence's feeds)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgefleet.sdk.zoo import import_torchvision, load_minilm

    import_torchvision()  # transformers imports torchvision; plain import fails beside the CPU torch
    tokenizer, encoder = load_minilm()
    enc = tokenizer(["The agent swaps models without dropping a request."], return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    fp32 = workdir / "minilm.onnx"
    dyn = {
        "input_ids": {0: "b", 1: "s"},
        "attention_mask": {0: "b", 1: "s"},
        "token_type_ids": {0: "b", 1: "s"},
    }
    torch.onnx.export(
        encoder,
        tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")),
        str(fp32),
        input_names=list(feeds),
        output_names=["last_hidden_state"],
        dynamic_axes={**dyn, "last_hidden_state": {0: "b", 1: "s"}},
        opset_version=17,
        dynamo=False,
    )
    int8 = workdir / "minilm_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    fp32.unlink()
    return int8, feeds


# ----------------------------------------------------------------------------------------------------
# 1. overhead


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, per_round: int) -> Dict[str, List[float]]:
    """Mean µs per call of each function, per round; the order alternates so drift hits all alike."""
    for fn in fns.values():
        for _ in range(max(3, per_round // 10)):
            fn()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            out[name].append((time.perf_counter() - start) / per_round * 1e6)
    return out


def _quartiles(values: List[float]) -> List[float]:
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 4), round(q[2], 4)]


def overhead(
    model_path: Path, feeds: Dict[str, np.ndarray], rounds: int, per_round: int, workdir: Path
) -> Dict[str, Any]:
    """Agent.infer and ModelServer.infer vs a bare `session.run` on the same session, same inputs.

    Four callables run in alternating rounds (A B C D, then D C B A, …) so that whatever else the
    machine does hits all of them alike: a bare onnxruntime `session.run(None, feeds)` as a user
    would write it; the compiled `_sess.run` underneath it (the floor: what the agent calls after its
    own input checks); `ModelServer.infer`; and `Agent.infer` (the daemon's entry point, which calls
    ModelServer.infer). Each round gives a mean µs per call; the headline is the ratio of the
    medians of those round means, and the median and quartiles of the per-round ratios are beside it.
    """
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.daemon import Agent
    from edgefleet.agent.server import ModelServer

    server = ModelServer(threads=THREADS)
    server.activate(server.load(model_path, name="m", version=1, slot="a"))
    current = server.current
    if current is None:
        raise RuntimeError("the model did not activate")
    session = current.runtime._session  # the very session the agent serves with
    compiled = session._sess
    output_names = [o.name for o in session.get_outputs()]
    agent = Agent(
        AgentConfig(device_id="bench", profile="x86-64", trusted_keys=(), state_dir=str(workdir / "agent"))
    )
    agent.server = server  # what start() does once the profile is loaded; nothing else is started
    times = interleaved(
        {
            "bare": lambda: session.run(None, feeds),
            "compiled": lambda: compiled.run(output_names, feeds, None),
            "server": lambda: server.infer(feeds),
            "agent": lambda: agent.infer(feeds),
        },
        rounds,
        per_round,
    )
    med = {k: statistics.median(v) for k, v in times.items()}

    def versus(name: str, base: str) -> Dict[str, Any]:
        paired = [a / b for a, b in zip(times[name], times[base])]
        return {
            "overhead_pct": round((med[name] / med[base] - 1.0) * 100.0, 2),
            "paired_ratio_median": round(statistics.median(paired), 4),
            "paired_ratio_quartiles": _quartiles(paired),
        }

    return {
        "bare_us": round(med["bare"], 2),
        "compiled_us": round(med["compiled"], 2),
        "server_us": round(med["server"], 2),
        "agent_us": round(med["agent"], 2),
        "agent_vs_bare": versus("agent", "bare"),
        "server_vs_bare": versus("server", "bare"),
        "agent_vs_compiled": versus("agent", "compiled"),
        "agent_added_us_over_compiled": round(med["agent"] - med["compiled"], 2),
        "fastest_round_us": {k: round(min(v), 2) for k, v in times.items()},
        "rounds": rounds,
        "calls_per_round": per_round,
    }


# ----------------------------------------------------------------------------------------------------
# 2. HTTP


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def http_latency(model_path: Path, x: np.ndarray, n: int) -> Dict[str, Any]:
    """Round trips through the local endpoint (keep-alive) vs direct infer, interleaved; medians in µs."""
    from edgefleet.agent.local_api import LocalApi
    from edgefleet.agent.server import ModelServer

    server = ModelServer(threads=THREADS)
    server.activate(server.load(model_path, name="m", version=1, slot="a"))
    api = LocalApi(server, port=0)
    api.start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    json_body = json.dumps({"inputs": x.tolist()}).encode()
    npy_body = _npy(x)

    def post(body: bytes, headers: Dict[str, str]) -> None:
        conn.request("POST", "/v1/infer", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")

    try:
        times = interleaved(
            {
                "direct": lambda: server.infer(x),
                "http_json": lambda: post(json_body, {"Content-Type": "application/json"}),
                "http_npy": lambda: post(
                    npy_body, {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
                ),
            },
            rounds=10,
            per_round=max(1, n // 10),
        )
    finally:
        conn.close()
        api.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "direct_us": round(med["direct"], 1),
        "http_json_us": round(med["http_json"], 1),
        "http_npy_us": round(med["http_npy"], 1),
        "added_json_us": round(med["http_json"] - med["direct"], 1),
        "added_npy_us": round(med["http_npy"] - med["direct"], 1),
    }


# ----------------------------------------------------------------------------------------------------
# 3. switch under load


def _bundle(workdir: Path, key_dir: Path, model: Path, eval_path: Path, version: int) -> Path:
    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key

    fields = {
        "name": "digits",
        "version": version,
        "target": {"profile": "x86-64", "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.8, "max_p95_ms": 50.0, "warmup_runs": 5, "timeout_s": 30},
    }
    return create_bundle(
        workdir / f"bundle{version}",
        model_path=model,
        eval_npz_path=eval_path,
        manifest_fields=fields,
        private_key=load_private_key(key_dir / "fleet.key"),
    )


def _parts(bundle: Path) -> tuple[bytes, Dict[str, Any], Dict[str, Path]]:
    manifest = (bundle / "manifest.json").read_bytes()
    files = json.loads(manifest)["files"]
    return manifest, json.loads((bundle / "signature.json").read_text()), {f: bundle / f for f in files}


def _summary(lat: List[float]) -> Dict[str, Optional[float]]:
    if not lat:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    arr = np.asarray(lat)
    return {
        "n": len(lat),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p95_ms": round(float(np.percentile(arr, 95)), 3),
        "max_ms": round(float(arr.max()), 3),
    }


def switch_under_load(workdir: Path, model: Path, eval_path: Path, rate: float) -> Dict[str, Any]:
    """Install v2 (full verify/write/load/health/switch) while clients send `rate` HTTP requests/s."""
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.agent.installer import Installer
    from edgefleet.agent.local_api import LocalApi
    from edgefleet.agent.server import ModelServer
    from edgefleet.sdk.trust.keys import init_keys

    key_dir = workdir / "keys"
    init_keys(key_dir)
    b1 = _bundle(workdir, key_dir, model, eval_path, 1)
    b2 = _bundle(workdir, key_dir, model, eval_path, 2)
    state = workdir / "state"
    profile = SimpleNamespace(
        name="x86-64", cores=2, threads=THREADS, max_model_mb=100, runtime_names=lambda: ["onnxruntime"]
    )
    server = ModelServer(threads=THREADS)
    installer = Installer(
        state, profile, server, TrustStore.from_public_keys([key_dir / "fleet.pub"]), "bench"
    )
    installer.install(*_parts(b1))
    api = LocalApi(server, port=0)
    api.start()
    x = np.load(eval_path)["x"][:1]
    body = _npy(x)
    records: List[tuple[float, float, bool, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    clients = 4
    t0 = time.monotonic()

    def client(offset: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
        interval = clients / rate
        due = time.monotonic() + offset
        while not stop.is_set():
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            due += interval
            start = time.monotonic()
            ok, version = False, -1
            try:
                conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npy"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                version = int(resp.getheader("X-Model-Version") or -1)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
            with lock:
                records.append((start - t0, (time.monotonic() - start) * 1000.0, ok, version))
        conn.close()

    threads = [threading.Thread(target=client, args=(i / rate,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    begin = time.monotonic() - t0
    result = installer.install(*_parts(b2))
    end = time.monotonic() - t0
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(5)
    api.stop()
    duration = records[-1][0] - records[0][0] if records else 0.0
    phases = {
        "before": [r[1] for r in records if r[0] < begin],
        "during": [r[1] for r in records if begin <= r[0] <= end],
        "after": [r[1] for r in records if r[0] > end],
    }
    return {
        "target_rate": rate,
        "achieved_rate": round(len(records) / duration, 1) if duration else None,
        "requests": len(records),
        "failed": sum(1 for r in records if not r[2]),
        "versions_served": sorted({r[3] for r in records}),
        "install_s": round(end - begin, 3),
        "installed_version": result.version,
        "latency": {k: _summary(v) for k, v in phases.items()},
    }


# ----------------------------------------------------------------------------------------------------
# 4. memory


_RSS = (
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1]) * 1024\n"
)

_BARE = _RSS + (
    "import json, sys, numpy as np, onnxruntime as ort\n"
    "o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.inter_op_num_threads = 1\n"
    "s = ort.InferenceSession({model!r}, sess_options=o, providers=['CPUExecutionProvider'])\n"
    "feeds = {{k: v for k, v in np.load({feeds!r}).items()}}\n"
    "for _ in range(20): s.run(None, feeds)\n"
    "print(json.dumps({{'rss': rss()}}))\n"
)

_AGENT = _RSS + (
    "import json, numpy as np\n"
    "from edgefleet.agent.server import ModelServer\n"
    "srv = ModelServer(threads={threads})\n"
    "srv.activate(srv.load({model!r}, name='m', version=1, slot='a'))\n"
    "feeds = {{k: v for k, v in np.load({feeds!r}).items()}}\n"
    "for _ in range(20): srv.infer(feeds)\n"
    "print(json.dumps({{'rss': rss()}}))\n"
)

# The modules a running agent imports before any model arrives (daemon, MQTT client, signature checks,
# installer, local HTTP API), with the server, installer and HTTP endpoint constructed and recovered.
_NO_MODEL = _RSS + (
    "import json, sys, tempfile\n"
    "from types import SimpleNamespace\n"
    "import paho.mqtt.client\n"
    "import edgefleet.agent.daemon, edgefleet.agent.mqtt_session, edgefleet.agent.transfer\n"
    "from edgefleet.agent.installer import Installer\n"
    "from edgefleet.agent.local_api import LocalApi\n"
    "from edgefleet.agent.server import ModelServer\n"
    "from edgefleet.agent.telemetry import system_metrics\n"
    "from edgefleet.agent.core.trust import TrustStore\n"
    "state = tempfile.mkdtemp()\n"
    "srv = ModelServer(threads=1)\n"
    "trust = TrustStore.from_public_keys([{pub!r}])\n"
    "inst = Installer(state, SimpleNamespace(name='x86-64', max_model_mb=50), srv, trust, 'd')\n"
    "inst.recover()\n"
    "api = LocalApi(srv, port=0); api.start(); system_metrics(state)\n"
    "heavy = [m for m in ('numpy', 'onnxruntime', 'torch', 'onnx', 'fastapi', 'edgefleet.sdk') if m in sys.modules]\n"
    "print(json.dumps({{'rss': rss(), 'heavy_modules': heavy}}))\n"
)


def _run_py(code: str) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def memory(models: Dict[str, tuple[Path, Dict[str, np.ndarray]]], workdir: Path, pub: Path) -> Dict[str, Any]:
    """RSS in MB of separate processes (median of 3 runs each)."""
    result: Dict[str, Any] = {}
    interp = [_run_py(_RSS + "import json\nprint(json.dumps({'rss': rss()}))\n")["rss"] for _ in range(3)]
    result["python_mb"] = round(statistics.median(interp) / 2**20, 1)
    runs = [_run_py(_NO_MODEL.format(pub=str(pub))) for _ in range(3)]
    result["agent_no_model_mb"] = round(statistics.median(r["rss"] for r in runs) / 2**20, 1)
    result["agent_no_model_heavy_modules"] = runs[0]["heavy_modules"]
    for name, (model, feeds) in models.items():
        feeds_path = workdir / f"{name}_feeds.npz"
        np.savez(feeds_path, **feeds)  # type: ignore[arg-type]
        args = {"threads": THREADS, "model": str(model), "feeds": str(feeds_path)}
        bare = statistics.median(_run_py(_BARE.format(**args))["rss"] for _ in range(3))
        agent = statistics.median(_run_py(_AGENT.format(**args))["rss"] for _ in range(3))
        result[name] = {
            "bare_script_mb": round(bare / 2**20, 1),
            "agent_server_mb": round(agent / 2**20, 1),
            "agent_extra_mb": round((agent - bare) / 2**20, 1),
        }
    return result


# ----------------------------------------------------------------------------------------------------
# 5. disk


def disk() -> Dict[str, Any]:
    """Installed bytes of the agent's code and its dependencies other than numpy and the runtime."""
    import importlib.metadata as md

    agent_dir = ROOT / "agent"
    code = sum(p.stat().st_size for p in agent_dir.rglob("*.py"))
    code += sum(
        p.stat().st_size for p in (ROOT / "device_profiles").rglob("*") if p.suffix in (".py", ".toml")
    )
    deps: Dict[str, int] = {}
    for dist in ("paho-mqtt", "PyNaCl", "cffi", "pycparser"):
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            continue
        deps[dist] = sum(int(f.size or 0) for f in files)
    total = code + sum(deps.values())
    return {
        "agent_code_bytes": code,
        "deps_bytes": deps,
        "total_mb": round(total / 2**20, 2),
    }


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true", help="only the digits CNN (no 90 MB export)")
    parser.add_argument("--rate", type=float, default=200.0, help="HTTP requests/s during the switch")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--overhead-only", action="store_true", help="only the infer overhead; prints it, writes no JSON"
    )
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=140)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-bench-agent-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "threads": THREADS,
    }
    console.print("exporting the digits CNN …")
    digits, digits_eval = export_digits(workdir)
    x1 = np.load(digits_eval)["x"][:1]
    models: Dict[str, tuple[Path, Dict[str, np.ndarray]]] = {"digits_cnn": (digits, {"input": x1})}
    if not args.skip_minilm:
        console.print("exporting MiniLM and quantizing it to INT8 …")
        models["minilm_int8"] = export_minilm_int8(workdir)

    report["overhead"] = {}
    for name, (model, feeds) in models.items():
        console.print(f"overhead: {name} …")
        heavy = name.startswith("minilm")
        report["overhead"][name] = overhead(
            model, feeds, rounds=301 if heavy else 151, per_round=2 if heavy else 300, workdir=workdir
        )
    if args.overhead_only:
        console.print_json(json.dumps(report["overhead"]))
        return
    console.print("local HTTP …")
    report["http"] = http_latency(digits, x1, n=1000)
    console.print(f"install + switch under {args.rate:g} requests/s …")
    report["switch"] = switch_under_load(workdir, digits, digits_eval, args.rate)
    console.print("memory (subprocesses) …")
    report["memory"] = memory(models, workdir, workdir / "keys" / "fleet.pub")
    report["disk"] = disk()

    table = Table(title="edgefleet agent bench")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for name, o in report["overhead"].items():
        a, srv = o["agent_vs_bare"], o["server_vs_bare"]
        table.add_row(f"{name}: bare session.run (median round)", f"{o['bare_us']:.1f} µs", "")
        table.add_row(f"{name}: compiled _sess.run (floor)", f"{o['compiled_us']:.1f} µs", "")
        table.add_row(f"{name}: ModelServer.infer", f"{o['server_us']:.1f} µs", "")
        table.add_row(f"{name}: Agent.infer", f"{o['agent_us']:.1f} µs", "")
        table.add_row(
            f"{name}: Agent.infer overhead vs bare (ratio of medians)", f"{a['overhead_pct']:+.2f} %", "≤ 5 %"
        )
        table.add_row(
            f"{name}: Agent.infer / bare per round (median, quartiles)",
            f"{a['paired_ratio_median']:.4f} ({a['paired_ratio_quartiles'][0]:.4f}–{a['paired_ratio_quartiles'][1]:.4f})",
            "",
        )
        table.add_row(f"{name}: ModelServer.infer overhead vs bare", f"{srv['overhead_pct']:+.2f} %", "")
        table.add_row(
            f"{name}: Agent.infer added over the compiled run",
            f"{o['agent_added_us_over_compiled']:+.2f} µs ({o['agent_vs_compiled']['overhead_pct']:+.2f} %)",
            "",
        )
    h = report["http"]
    table.add_row("digits: direct infer", f"{h['direct_us']:.0f} µs", "")
    table.add_row(
        "digits: HTTP JSON (added)", f"{h['http_json_us']:.0f} µs (+{h['added_json_us']:.0f})", "reported"
    )
    table.add_row(
        "digits: HTTP .npy (added)", f"{h['http_npy_us']:.0f} µs (+{h['added_npy_us']:.0f})", "reported"
    )
    s = report["switch"]
    table.add_row("switch: requests / failed", f"{s['requests']} / {s['failed']}", "0 failed")
    table.add_row("switch: achieved rate", f"{s['achieved_rate']} /s", f"{s['target_rate']:g} /s")
    table.add_row("switch: install duration", f"{s['install_s']:.3f} s", "")
    for phase, lat in s["latency"].items():
        table.add_row(
            f"switch: latency {phase} (n={lat['n']})",
            f"p50 {lat['p50_ms']} p95 {lat['p95_ms']} max {lat['max_ms']} ms",
            "",
        )
    m = report["memory"]
    table.add_row("RSS: bare python", f"{m['python_mb']} MB", "")
    table.add_row("RSS: agent, no model", f"{m['agent_no_model_mb']} MB", "≤ 35 MB")
    for name in models:
        mm = m[name]
        table.add_row(
            f"RSS: {name} bare script / agent",
            f"{mm['bare_script_mb']} / {mm['agent_server_mb']} MB (+{mm['agent_extra_mb']})",
            "≤ +10 MB",
        )
    d = report["disk"]
    table.add_row("disk: agent code + paho + PyNaCl + cffi + pycparser", f"{d['total_mb']} MB", "≤ 10 MB")
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'agent.json'}")


if __name__ == "__main__":
    main()
