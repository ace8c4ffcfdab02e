"""Telemetry pieces: a streaming latency histogram with fixed log-spaced buckets, system metrics, and
`telemetry_fields()`, which assembles one typed telemetry report (agent/core/events.py `Telemetry`).

The histogram holds a fixed array of counters whatever the request rate, so a busy device never grows
a list of latencies between two telemetry messages. System metrics come from /proc and /sys only.
"""

from __future__ import annotations

import bisect
import glob
import math
import os
import shutil
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from edgefleet.agent.core.codes import QualitySource
from edgefleet.agent.core.parts import Latency, ModelRef, Requests, SystemMetrics
from edgefleet.agent.core.quality import Quality, QualityError, reading_from

PathLike = Union[str, "os.PathLike[str]"]

# Buckets from 1 µs to ~100 s, 10 per decade: a percentile is exact to within ~12 % (one bucket).
MIN_MS = 0.001
MAX_MS = 100_000.0
BUCKETS_PER_DECADE = 10


class LatencyHistogram:
    """Counts latencies (ms) in fixed log-spaced buckets; percentiles are read off the buckets."""

    def __init__(
        self, min_ms: float = MIN_MS, max_ms: float = MAX_MS, per_decade: int = BUCKETS_PER_DECADE
    ) -> None:
        if not 0 < min_ms < max_ms or per_decade < 1:
            raise ValueError("need 0 < min_ms < max_ms and per_decade >= 1")
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.per_decade = per_decade
        self._log_min = math.log10(min_ms)
        decades = math.log10(max_ms) - self._log_min
        # bucket 0 holds everything below min_ms, the last one everything above max_ms
        self.n_buckets = math.ceil(decades * per_decade) + 2
        self.counts: List[int] = [0] * self.n_buckets
        self._bounds = [self.upper_bound(i) for i in range(self.n_buckets - 1)]
        self.count = 0
        self.total_ms = 0.0
        self.max_seen = 0.0
        self.min_seen = math.inf

    def upper_bound(self, bucket: int) -> float:
        """The largest latency (ms) bucket `bucket` holds."""
        if bucket >= self.n_buckets - 1:
            return math.inf
        return float(10 ** (self._log_min + bucket / self.per_decade))

    def record(self, ms: float) -> None:
        """Count one latency in milliseconds (negative or NaN values are ignored)."""
        if not ms >= 0.0:
            return
        # bisect over the precomputed bounds is C code: this sits on every request's path.
        self.counts[bisect.bisect_left(self._bounds, ms)] += 1
        self.count += 1
        self.total_ms += ms
        self.max_seen = max(self.max_seen, ms)
        self.min_seen = min(self.min_seen, ms)

    def record_many(self, values: Iterable[float]) -> None:
        """Count many latencies (ms) at once; the same counts as `record` on each, at a fraction of the cost."""
        # `0.0 <= v` is False for NaN and negatives, which record() ignores too. Sorted, the values of
        # one bucket are one run, found by bisecting: the loop turns once per bucket, not per value.
        kept = sorted(filter((0.0).__le__, values))
        n = len(kept)
        if not n:
            return
        counts, bounds = self.counts, self._bounds
        last = len(bounds)
        lo = 0
        while lo < n:
            bucket = bisect.bisect_left(bounds, kept[lo])
            hi = bisect.bisect_right(kept, bounds[bucket], lo) if bucket < last else n
            counts[bucket] += hi - lo
            lo = hi
        self.count += n
        self.total_ms += sum(kept)
        self.max_seen = max(self.max_seen, kept[-1])
        self.min_seen = min(self.min_seen, kept[0])

    def percentile(self, q: float) -> Optional[float]:
        """The q-th percentile (0–100), interpolated log-linearly inside its bucket; None when empty."""
        if self.count == 0:
            return None
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        rank = q / 100.0 * self.count
        seen = 0
        for bucket, n in enumerate(self.counts):
            if n == 0:
                continue
            if seen + n >= rank:
                lower = self.min_seen if bucket == 0 else max(self.upper_bound(bucket - 1), self.min_seen)
                upper = min(self.upper_bound(bucket), self.max_seen)
                if upper <= lower:
                    return upper
                frac = (rank - seen) / n
                # Latencies are roughly log-normal, so interpolate on the log scale.
                return float(10 ** (math.log10(lower) + frac * (math.log10(upper) - math.log10(lower))))
            seen += n
        return self.max_seen

    def mean(self) -> Optional[float]:
        """Mean latency in ms, None when empty."""
        return self.total_ms / self.count if self.count else None

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram with the same buckets into this one."""
        if other.n_buckets != self.n_buckets or other.min_ms != self.min_ms:
            raise ValueError("histograms with different buckets cannot be merged")
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_seen = max(self.max_seen, other.max_seen)
        self.min_seen = min(self.min_seen, other.min_seen)

    def summary(self) -> Dict[str, Optional[float]]:
        """count, mean, p50, p95, p99 and max in ms (rounded to µs)."""

        def r(v: Optional[float]) -> Optional[float]:
            return None if v is None else round(v, 3)

        return {
            "count": self.count,
            "mean_ms": r(self.mean()),
            "p50_ms": r(self.percentile(50)),
            "p95_ms": r(self.percentile(95)),
            "p99_ms": r(self.percentile(99)),
            "max_ms": r(self.max_seen) if self.count else None,
        }


# ---------------------------------------------------------------------------------------------------
# system metrics


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def rss_bytes() -> Optional[int]:
    """This process's resident set size from /proc/self/status."""
    text = _read("/proc/self/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def soc_temperature_c(root: str = "/sys/class/thermal") -> Optional[float]:
    """The hottest thermal zone in °C (the SoC on a Pi or Jetson), None where /sys has none."""
    hottest: Optional[float] = None
    for path in sorted(glob.glob(os.path.join(root, "thermal_zone*", "temp"))):
        text = _read(path)
        if text is None:
            continue
        try:
            millideg = int(text.strip())
        except ValueError:
            continue
        celsius = millideg / 1000.0
        if -40.0 < celsius < 150.0 and (hottest is None or celsius > hottest):
            hottest = celsius
    return hottest


def system_uptime_s() -> Optional[float]:
    """Seconds since the device booted, from /proc/uptime."""
    text = _read("/proc/uptime")
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def _system_cpu_times() -> Optional[Tuple[float, float]]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    text = _read("/proc/stat")
    if not text:
        return None
    fields = [float(x) for x in text.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


class CpuMeter:
    """CPU % of this process and of the whole device since the previous call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall = time.monotonic()
        self._proc = self._process_seconds()
        self._sys = _system_cpu_times()

    @staticmethod
    def _process_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def sample(self) -> Dict[str, Optional[float]]:
        """process_cpu_percent (100 = one core busy) and system_cpu_percent (100 = all cores busy)."""
        with self._lock:
            wall, proc, sys_times = time.monotonic(), self._process_seconds(), _system_cpu_times()
            d_wall = wall - self._wall
            process = (proc - self._proc) / d_wall * 100.0 if d_wall > 0 else None
            system: Optional[float] = None
            if sys_times is not None and self._sys is not None:
                d_total = sys_times[1] - self._sys[1]
                system = (sys_times[0] - self._sys[0]) / d_total * 100.0 if d_total > 0 else None
            self._wall, self._proc, self._sys = wall, proc, sys_times
        return {
            "process_cpu_percent": None if process is None else round(process, 1),
            "system_cpu_percent": None if system is None else round(system, 1),
        }


_CPU = CpuMeter()


def system_metrics(state_dir: PathLike = ".") -> Dict[str, Any]:
    """CPU %, RSS, free disk under `state_dir`, SoC temperature, load average and device uptime."""
    metrics: Dict[str, Any] = dict(_CPU.sample())
    metrics["rss_bytes"] = rss_bytes()
    try:
        usage = shutil.disk_usage(os.fspath(state_dir))
        metrics["disk_free_bytes"] = usage.free
        metrics["disk_total_bytes"] = usage.total
    except OSError:
        metrics["disk_free_bytes"] = None
    metrics["soc_temp_c"] = soc_temperature_c()
    try:
        metrics["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        metrics["load_avg_1m"] = None
    metrics["system_uptime_s"] = system_uptime_s()
    metrics["cpu_count"] = os.cpu_count()
    return metrics


def system_part(state_dir: PathLike = ".") -> SystemMetrics:
    """`system_metrics()` as the telemetry's typed `system` part."""
    m = system_metrics(state_dir)
    return SystemMetrics(
        process_cpu_percent=m["process_cpu_percent"],
        system_cpu_percent=m["system_cpu_percent"],
        rss_bytes=m["rss_bytes"],
        disk_free_bytes=m["disk_free_bytes"],
        disk_total_bytes=m.get("disk_total_bytes"),
        temp_c=m["soc_temp_c"],
        load_avg_1m=m["load_avg_1m"],
        system_uptime_s=m["system_uptime_s"],
        cpu_count=m["cpu_count"],
    )


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def quality_readings(stats: Mapping[str, Any], last_eval: Optional[Mapping[str, Any]]) -> Tuple[Quality, ...]:
    """The window's quality readings: the last eval (or install health check), then live feedback accuracy."""
    out: List[Quality] = []
    try:
        reading = reading_from(last_eval) if last_eval else None
    except QualityError:
        reading = None
    if reading is not None:
        out.append(reading)
    live = _finite(stats.get("live_accuracy"))
    if live is not None:
        samples = int(stats.get("feedback") or 0)
        out.append(Quality("accuracy", live, samples=samples, source=QualitySource.FEEDBACK.value))
    return tuple(out)


def telemetry_fields(
    stats: Optional[Mapping[str, Any]],
    active: Any,
    system: SystemMetrics,
    *,
    last_eval: Optional[Mapping[str, Any]] = None,
    uptime_s: Optional[float] = None,
    emulated: Optional[str] = None,
    profile: Optional[str] = None,
) -> Dict[str, Any]:
    """The fields of one `Telemetry` message: `ModelServer.window_stats()`, the active model (anything
    with `name` and `version`, or None), system metrics and the last eval report."""
    s: Mapping[str, Any] = stats or {}
    latency = s.get("latency_ms") or {}
    return {
        "model": None if active is None else ModelRef(str(active.name), int(active.version)),
        "profile": profile,
        "emulated": emulated,
        "uptime_s": uptime_s,
        "window_s": _finite(s.get("window_s")),
        "requests": Requests(
            count=int(s.get("count") or 0),
            errors=int(s.get("errors") or 0),
            errors_by_code={str(k): int(v) for k, v in (s.get("errors_by_code") or {}).items()},
            rate_per_s=_finite(s.get("rate_per_s")),
            feedback=int(s.get("feedback") or 0),
            total_count=int(s.get("total_count") or 0),
            total_errors=int(s.get("total_errors") or 0),
        ),
        "latency": Latency.of(int(s.get("count") or 0), lambda k: _finite(latency.get(k))),
        "quality": quality_readings(s, last_eval),
        "system": system,
    }
