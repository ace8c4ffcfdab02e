"""The host's per-op-class efficiency: a short onnxruntime micro-benchmark, cached in the cache folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device_profiles import load_profile
from edgefleet.sdk.build import estimate_calibrate
from edgefleet.sdk.build.estimate import DEFAULT_EFFICIENCY, OP_CLASSES, profile_efficiency

pytest.importorskip("onnxruntime")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """EDGEFLEET_HOME in tmp_path and no EDGEFLEET_CACHE_DIR: the cache must land under the home."""
    monkeypatch.delenv("EDGEFLEET_CACHE_DIR", raising=False)
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _host_like() -> Any:
    """A 1-thread stand-in for the host profile (named "host", so the estimator calibrates it)."""
    return dataclasses.replace(load_profile("x86-64"), name="host", threads=1)


def test_micro_benchmark_measures_every_class(home: Path) -> None:
    # act: a very short run (timings are not asserted, only that each class got a positive figure)
    table = estimate_calibrate.micro_benchmark(_host_like(), seconds_per_case=0.005)
    # assert
    assert set(table) == {*OP_CLASSES, "op_overhead_us"}
    assert all(value > 0 for value in table.values())


def test_host_efficiency_is_cached_under_edgefleet_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a fake benchmark that counts its runs
    runs: list[int] = []

    def fake(profile: Any, seconds_per_case: float = 0.25) -> dict[str, Any]:
        runs.append(1)
        return {"conv": 0.4, "dwconv": 0.1, "matmul": 0.5, "elementwise": 0.3, "op_overhead_us": 2.0}

    monkeypatch.setattr(estimate_calibrate, "micro_benchmark", fake)
    profile = _host_like()
    # act
    first = estimate_calibrate.host_efficiency(profile)
    second = estimate_calibrate.host_efficiency(profile)
    # assert: measured once, then read back from $EDGEFLEET_HOME/cache
    assert runs == [1]
    assert (
        first
        == second
        == {"conv": 0.4, "dwconv": 0.1, "matmul": 0.5, "elementwise": 0.3, "op_overhead_us": 2.0}
    )
    cache = home / "cache" / estimate_calibrate.CACHE_FILE
    assert json.loads(cache.read_text(encoding="utf-8"))["efficiency"]["conv"] == 0.4
    # a different thread count is another machine state: measured again
    estimate_calibrate.host_efficiency(dataclasses.replace(profile, threads=2))
    assert runs == [1, 1]
    # and the estimator uses the cached table for the host profile
    assert profile_efficiency(dataclasses.replace(profile, threads=2))["matmul"] == 0.5


def test_corrupt_cache_is_measured_again(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = home / "cache" / estimate_calibrate.CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json", encoding="utf-8")
    monkeypatch.setattr(
        estimate_calibrate, "micro_benchmark", lambda profile, seconds_per_case=0.25: {"conv": 0.7}
    )
    assert estimate_calibrate.host_efficiency(_host_like()) == {"conv": 0.7}


def test_device_profiles_without_a_table_use_the_defaults_and_never_benchmark(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        estimate_calibrate, "micro_benchmark", lambda *a, **k: pytest.fail("benchmarked a device")
    )
    assert profile_efficiency(load_profile("rpi4b")) == DEFAULT_EFFICIENCY
    custom = dataclasses.replace(load_profile("rpi4b"), efficiency={"conv": 0.2})
    assert profile_efficiency(custom) == {**DEFAULT_EFFICIENCY, "conv": 0.2}
