"""Prometheus `/metrics`: valid exposition text with per-device / per-version latency, accuracy, online, rollouts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_data import fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.server.metrics import Exposition, escape_label, format_value
from edgefleet.sdk.store import Store

# One sample line of the text format: name, optional {labels}, value.
SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$'
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse exposition text strictly enough that a malformed line fails the test."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"TYPE twice for {name}"
            typed.add(name)
            continue
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        labels = dict(LABEL.findall(m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    assert set(out) <= typed, "every family has a TYPE line"
    return out


@pytest.fixture
def metrics(tmp_path: Path, fleet_name: str) -> Iterator[dict[str, list[tuple[dict[str, str], float]]]]:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fill_store(store, fleet_name)
    with TestClient(create_app(store, fleet_name=fleet_name)) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        yield parse(r.text)
    store.close()


def _one(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    found = [v for lab, v in samples if all(lab.get(k) == val for k, val in labels.items())]
    assert len(found) == 1, (labels, found)
    return found[0]


def test_online_per_device(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    online = metrics["edgefleet_device_online"]
    assert _one(online, device="rpi4b-01") == 1
    assert _one(online, device="orin-01") == 0


def test_latency_quantiles_per_device_and_version(
    metrics: dict[str, list[tuple[dict[str, str], float]]],
) -> None:
    lat = metrics["edgefleet_inference_latency_seconds"]
    assert _one(lat, device="rpi4b-01", version="2", quantile="0.95") == pytest.approx(0.003)
    assert _one(lat, device="rpi4b-01", version="1", quantile="0.95") == pytest.approx(0.004)
    assert _one(lat, device="rpi4b-01", version="2", quantile="0.5") == pytest.approx(0.0015)


def test_accuracy_and_counters(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    acc = metrics["edgefleet_model_accuracy"]
    assert _one(acc, device="rpi5-01", version="2", kind="eval") == pytest.approx(0.98)
    # live accuracy was never reported: no sample rather than a made-up one
    assert not [v for lab, v in acc if lab["kind"] == "live"]
    assert _one(metrics["edgefleet_inferences_total"], device="rpi5-01", version="1") == 600
    assert _one(metrics["edgefleet_telemetry_missing_messages_total"], device="rpi4b-02") == 2


def test_rollout_state_and_progress(
    metrics: dict[str, list[tuple[dict[str, str], float]]], fleet_name: str
) -> None:
    states = metrics["edgefleet_rollout_state"]
    assert _one(states, rollout=f"{fleet_name}-r1") == 1
    assert _one(states, rollout=f"{fleet_name}-r1", state="succeeded") == 1
    assert _one(states, rollout=f"{fleet_name}-r2", state="running") == 1
    assert _one(metrics["edgefleet_rollout_progress_ratio"], rollout=f"{fleet_name}-r1") == 1.0
    assert _one(metrics["edgefleet_rollout_devices"], rollout=f"{fleet_name}-r2", status="downloading") == 1


def test_device_info_and_desired_differs(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    info = metrics["edgefleet_device_info"]
    assert _one(info, device="rpi5-01", model="digits", version="2", agent_version="0.1.0") == 1
    assert _one(metrics["edgefleet_device_desired_differs"], device="rpi5-01") == 1
    assert _one(metrics["edgefleet_device_desired_differs"], device="rpi4b-01") == 0


def test_label_escaping_and_values() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert format_value(float("nan")) == "NaN"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    exp = Exposition()
    exp.add("x_total", "counter", "help", {"device": 'we"ird\nname'}, 1)
    exp.add("x_total", "counter", "help", {"device": "plain"}, None)
    parsed = parse(exp.render())
    assert parsed["x_total"] == [({"device": 'we\\"ird\\nname'}, 1.0)]
