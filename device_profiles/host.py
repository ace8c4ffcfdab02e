"""The `host` profile: static parts from host.toml, the rest measured here (a short probe, cached)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from edgefleet.device_profiles.errors import ProfileError
from edgefleet.device_profiles.loader import BUILTIN_DIR, load_profile_file
from edgefleet.device_profiles.schema import Profile

# Bump when the probe changes so old caches are measured again.
PROBE_VERSION = 2
CACHE_FILE = "host-profile.json"

# /proc/cpuinfo flag → profile ISA feature (x86 and Arm spellings).
_FLAG_MAP: Tuple[Tuple[str, str], ...] = (
    ("neon", "neon"),
    ("asimd", "neon"),
    ("asimddp", "dotprod"),
    ("asimdhp", "fp16"),
    ("fphp", "fp16"),
    ("i8mm", "i8mm"),
    ("sve", "sve"),
    ("sse4_2", "sse4_2"),
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("avx512f", "avx512"),
    ("avx512_vnni", "vnni"),
    ("avx_vnni", "vnni"),
    ("amx_tile", "amx"),
)


def cache_dir() -> Path:
    """Cache folder for this machine's measurements: $EDGEFLEET_CACHE_DIR, $EDGEFLEET_HOME/cache, ~/.cache/edgefleet."""
    env = os.environ.get("EDGEFLEET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("EDGEFLEET_HOME")
    return Path(home).expanduser() / "cache" if home else Path.home() / ".cache" / "edgefleet"


def load_host_profile(refresh: bool = False) -> Profile:
    """The profile of this machine; the probe runs once and is cached until the machine changes."""
    facts = host_facts()
    measured = None if refresh else _read_cache(facts)
    if measured is None:
        measured = probe()
        _write_cache(facts, measured)
    overrides: Dict[str, Any] = {
        "cpu.model": facts["cpu_model"],
        "cpu.cores": facts["cores"],
        "cpu.clock_ghz": facts["clock_ghz"],
        "cpu.isa": facts["isa"],
        "cpu.sustained_gflops": measured["gflops"],
        "memory.ram_mb": facts["ram_mb"],
        "memory.bandwidth_gbs": measured["bandwidth_gbs"],
        "software.python": facts["python"],
        "software.os": facts["os"],
    }
    when = measured.get("measured_at", "")
    src = f"measured on this machine ({when}) by edgefleet.device_profiles.host.probe"
    overrides["sources.sustained_gflops"] = (
        f"{measured['gflops']:.1f} GFLOP/s — {src}: numpy float32 {measured['matmul_n']}² matmul, best of runs"
        + (", one thread × physical cores" if measured.get("method") == "per-core" else ", all threads")
    )
    overrides["sources.mem_bandwidth_gbs"] = (
        f"{measured['bandwidth_gbs']:.1f} GB/s — {src}: copy of a {measured['copy_mb']} MB array, read + write"
    )
    overrides["sources.cores"] = f"{facts['cores']} — os.cpu_count()"
    overrides["sources.isa"] = "/proc/cpuinfo flags"
    overrides["sources.cpu_model"] = "/proc/cpuinfo model name"
    overrides["sources.ram_mb"] = "/proc/meminfo MemTotal"
    overrides["sources.clock_ghz"] = "cpufreq cpuinfo_max_freq, else /proc/cpuinfo cpu MHz"
    overrides["sources.python"] = "the running interpreter (sys.version_info)"
    overrides["sources.os"] = "/etc/os-release PRETTY_NAME"
    return load_profile_file(BUILTIN_DIR / "host.toml", overrides)


def probe(seconds: float = 1.0) -> Dict[str, Any]:
    """Measure sustained fp32 GFLOP/s (numpy matmul) and memory bandwidth (array copy) in ~`seconds`."""
    try:
        import numpy as np
    except ImportError:
        raise ProfileError("the host profile measures this machine with numpy; pip install numpy") from None
    n = 256
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    cores = os.cpu_count() or 1
    limit, method = _one_blas_thread()
    with limit:
        np.matmul(a, b, out=out)  # warm-up: BLAS thread pool and page faults
        best = float("inf")
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    gflops = 2.0 * n**3 / best / 1e9
    if method == "per-core":
        # One core measured, times the cores: a busy machine rarely gives every core at once, and the
        # best single-thread run is a stable figure where a multi-thread one collapses under load.
        gflops *= _physical_cores() or cores
    copy_mb = 64  # well beyond any last-level cache, so the copy streams from DRAM
    src = np.ones(copy_mb * 1024 * 1024 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2.0 * src.nbytes / best / 1e9  # a copy reads and writes every byte
    return {
        "gflops": round(gflops, 2),
        "method": method,
        "bandwidth_gbs": round(bandwidth, 2),
        "matmul_n": n,
        "copy_mb": copy_mb,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo: hyperthreads share one core's FMA units."""
    pairs: Set[Tuple[str, str]] = set()
    package = core = ""
    for line in [*_read_text("/proc/cpuinfo").splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core:
            pairs.add((package, core))
            package = core = ""
    return len(pairs)


def _one_blas_thread() -> Tuple[Any, str]:
    """A context limiting numpy's BLAS to one thread (threadpoolctl, when installed) and the method name."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext(), "all-threads"
    return threadpool_limits(limits=1, user_api="blas"), "per-core"


def host_facts() -> Dict[str, Any]:
    """What this machine says about itself: CPU model, cores, clock, ISA, RAM, Python and OS."""
    cpuinfo = _read_text("/proc/cpuinfo")
    model = (
        _cpuinfo_value(cpuinfo, ("model name", "Model", "Hardware")) or platform.processor() or "unknown CPU"
    )
    mhz = _cpuinfo_value(cpuinfo, ("cpu MHz",))
    max_khz = _read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    clock = float(max_khz) / 1e6 if max_khz.isdigit() else (float(mhz) / 1000 if mhz else 1.0)
    flags = set((_cpuinfo_value(cpuinfo, ("flags", "Features")) or "").split())
    isa: List[str] = []
    for flag, feature in _FLAG_MAP:
        if flag in flags and feature not in isa:
            isa.append(feature)
    if platform.machine() in ("aarch64", "arm64") and "neon" not in isa:
        isa.insert(0, "neon")  # Advanced SIMD is mandatory on Armv8
    meminfo = _read_text("/proc/meminfo")
    mem_kb = _cpuinfo_value(meminfo, ("MemTotal",))
    ram_mb = int(mem_kb.split()[0]) // 1024 if mem_kb else 1024
    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 1,
        "clock_ghz": round(clock, 2),
        "isa": isa,
        "ram_mb": ram_mb,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "os": _os_name(),
    }


def _os_name() -> str:
    """PRETTY_NAME from /etc/os-release, else platform's system and release."""
    for line in _read_text("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return f"{platform.system()} {platform.release()}".strip() or "unknown OS"


def _read_cache(facts: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The cached probe result when it was measured on this same machine by this probe version."""
    path = cache_dir() / CACHE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != PROBE_VERSION or doc.get("facts") != facts:
        return None
    measured = doc.get("measured")
    if not isinstance(measured, dict) or not all(
        isinstance(measured.get(k), (int, float)) and measured[k] > 0 for k in ("gflops", "bandwidth_gbs")
    ):
        return None
    return measured


def _write_cache(facts: Dict[str, Any], measured: Dict[str, Any]) -> None:
    """Store the probe result atomically; a read-only cache dir only costs a re-probe next time."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(directory), prefix=".host-profile.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": PROBE_VERSION, "facts": facts, "measured": measured}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / CACHE_FILE)
    except OSError:
        return


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _cpuinfo_value(text: str, keys: Tuple[str, ...]) -> str:
    """The first `key : value` value in /proc/cpuinfo-style text for any of `keys`."""
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        if key.strip() in keys and value.strip():
            return value.strip()
    return ""
