"""Typed telemetry end to end on the host: a real agent's report → ingest's row → store → CLI and columns.

The report is the one recorded from a real agent (tests/data/wire/telemetry-model.json, schema v1) and
the same report as today's agent sends it (schema v2): both must reach the store with their system and
quality figures, and `edgefleet telemetry` must print the CPU and RSS the agent measured (it printed
`cpu -%, rss - MB` while it looked for keys the agent never sent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.agent.core.events import Telemetry, parse_device_message
from edgefleet.agent.core.parts import SystemMetrics
from edgefleet.agent.core.quality import Quality
from edgefleet.agent.telemetry import system_part, telemetry_fields
from edgefleet.sdk.cli import app
from edgefleet.sdk.fleet.ingest import flatten_telemetry
from edgefleet.sdk.store import Store

RECORDED = Path(__file__).parent / "data" / "wire" / "telemetry-model.json"


def _recorded() -> Telemetry:
    message = parse_device_message(json.loads(RECORDED.read_text())["payload"].encode())
    assert isinstance(message, Telemetry)
    return message


@pytest.mark.parametrize("schema", ["v1", "v2"])
def test_cli_prints_the_cpu_and_rss_the_agent_sent(tmp_path: Path, schema: str) -> None:
    # prepare: the recorded report, as it came (v1) or re-sent by today's agent (v2), ingested into a store
    message = _recorded() if schema == "v1" else parse_device_message(_recorded().to_wire())
    assert isinstance(message, Telemetry)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = Store(url)
    store.upsert_device("f", "dev-1", online=True)
    store.add_telemetry("f", [flatten_telemetry(message)])
    store.close()
    # act
    out = CliRunner().invoke(app, ["telemetry", "dev-1", "--db", url, "--fleet", "f"])
    # assert: the figures the agent measured (57.2 % CPU, 321286144 B = 306.4 MiB RSS)
    assert out.exit_code == 0, out.output
    assert "cpu 57.2%" in out.output and "rss 306.4 MB" in out.output, out.output


def test_store_row_fills_one_column_per_quality_metric() -> None:
    # prepare: a reference-evaluated model (agreement + fidelity) and live feedback
    message = Telemetry(
        device="cam-1",
        seq=3,
        ts=10.0,
        quality=(
            Quality("fidelity", 0.991, samples=200, detail={"agreement": 0.97, "fidelity_min": 0.9}),
            Quality("accuracy", 0.5, samples=2, source="feedback"),
        ),
    )
    # act
    row = flatten_telemetry(message)
    # assert
    assert (row["fidelity"], row["agreement"], row["accuracy"]) == (0.991, 0.97, None)
    assert row["live_accuracy"] == 0.5


def test_agent_side_builds_typed_parts_from_the_server_window() -> None:
    # prepare: what ModelServer.window_stats() returns after two requests and one feedback label
    stats = {
        "count": 2,
        "errors": 1,
        "errors_by_code": {"bad-input": 1},
        "rate_per_s": 4.0,
        "latency_ms": {"mean_ms": 1.5, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 2.0, "max_ms": 2.0},
        "feedback": 1,
        "live_accuracy": 1.0,
        "total_count": 9,
        "total_errors": 1,
        "window_s": 0.5,
    }
    evaluation = {"metric": "accuracy", "value": 0.96, "samples": 64, "source": "install"}

    class Active:
        name, version = "digits", 4

    # act
    fields = telemetry_fields(stats, Active(), SystemMetrics(rss_bytes=1 << 20), last_eval=evaluation)
    message = parse_device_message(Telemetry(device="d", seq=1, ts=1.0, **fields).to_wire())
    # assert: every figure arrives typed
    assert isinstance(message, Telemetry) and message.model is not None
    assert (message.model.name, message.model.version) == ("digits", 4)
    assert message.requests.errors_by_code == {"bad-input": 1} and message.requests.total_count == 9
    assert message.latency.p95_ms == 2.0 and message.latency.count == 2
    assert message.system.rss_mb == 1.0 and message.window_s == 0.5
    accuracy = message.quality_of("accuracy", "eval")
    live = message.quality_of("accuracy", "feedback")
    assert accuracy is not None and (accuracy.value, accuracy.samples) == (0.96, 64)
    assert live is not None and (live.value, live.samples) == (1.0, 1)


def test_system_part_reads_this_machine() -> None:
    part = system_part(".")
    assert part.rss_bytes is not None and part.rss_bytes > 0
    assert part.cpu_count is not None and part.disk_total_bytes
