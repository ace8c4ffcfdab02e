"""Streaming latency histogram and system metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.telemetry import LatencyHistogram, soc_temperature_c, system_metrics

# One bucket is a factor 10**(1/10) ≈ 1.26 wide, so a percentile read off buckets is within that factor.
BUCKET = 10 ** (1 / 10)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.002, max_value=5000.0, allow_nan=False), min_size=1, max_size=400),
    st.sampled_from([50.0, 95.0, 99.0]),
)
def test_percentiles_within_one_bucket(values: list[float], q: float) -> None:
    hist = LatencyHistogram()
    for v in values:
        hist.record(v)
    got = hist.percentile(q)
    assert got is not None
    lo = float(np.percentile(values, q, method="inverted_cdf"))
    assert lo / BUCKET <= got <= lo * BUCKET * 1.0001
    assert min(values) <= got <= max(values)


def test_memory_is_bounded_and_summary_complete() -> None:
    hist = LatencyHistogram()
    size = len(hist.counts)
    rng = np.random.default_rng(0)
    for v in rng.lognormal(0.0, 1.0, 20000):
        hist.record(float(v))
    hist.record(1e9)  # beyond the last bucket: counted, not lost
    hist.record(float("nan"))  # ignored
    assert len(hist.counts) == size
    summary = hist.summary()
    assert summary["count"] == 20001
    assert summary["p50_ms"] is not None and 0.8 < summary["p50_ms"] < 1.25
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_empty_and_merge() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    assert a.percentile(95) is None and a.mean() is None
    a.record(1.0)
    b.record(3.0)
    a.merge(b)
    assert a.count == 2 and a.mean() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        a.percentile(101)
    with pytest.raises(ValueError):
        a.merge(LatencyHistogram(per_decade=5))


def test_system_metrics_from_proc(tmp_path: Path) -> None:
    metrics = system_metrics(tmp_path)
    assert metrics["rss_bytes"] > 1_000_000
    assert metrics["disk_free_bytes"] > 0
    assert metrics["system_uptime_s"] > 0
    for key in ("process_cpu_percent", "system_cpu_percent", "soc_temp_c", "load_avg_1m"):
        assert key in metrics


def test_soc_temperature_takes_hottest_zone(tmp_path: Path) -> None:
    for i, text in enumerate(["41500\n", "57250\n", "garbage\n"]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(text)
    assert soc_temperature_c(str(tmp_path)) == pytest.approx(57.25)
    assert soc_temperature_c(str(tmp_path / "none")) is None
