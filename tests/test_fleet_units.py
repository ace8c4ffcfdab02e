"""Unit tests of the fleet control plane's pure parts: selectors, strategies, abort rules, telemetry rows."""

from __future__ import annotations

import pytest

from edgefleet.agent.core.codes import FAILED_DEVICE, DeviceStatus
from edgefleet.agent.core.manifest import HealthPolicy
from edgefleet.agent.core.protocol import Latency, Progress, Quality, Requests, Telemetry
from edgefleet.sdk.fleet.errors import BrokerUnavailable, BundleRefused, SelectorError, StrategyError
from edgefleet.sdk.fleet.ingest import flatten_telemetry
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.fleet.selectors import parse_selector, resolve
from edgefleet.sdk.fleet.strategy import AbortRules, TelemetrySample, parse_strategy
from edgefleet.sdk.fleet.transfer import choose_chunk_size

DEVICES = [
    {"device_id": "cam-1", "tags": ["lab"], "profile": "rpi4b"},
    {"device_id": "cam-2", "tags": ["lab", "door"], "profile": "rpi4b"},
    {"device_id": "nano-1", "tags": [], "profile": "jetson-nano"},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", ["cam-1", "cam-2", "nano-1"]),
        ("cam-2", ["cam-2"]),
        ("tag:lab", ["cam-1", "cam-2"]),
        ("tag:door", ["cam-2"]),
        ("profile:jetson-nano", ["nano-1"]),
    ],
)
def test_selectors_resolve(text: str, expected: list[str]) -> None:
    assert resolve(text, DEVICES) == expected
    assert str(parse_selector(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("cam-9", "unknown device 'cam-9'; known devices: cam-1, cam-2, nano-1"),
        ("tag:roof", "no device has tag 'roof'; tags in this fleet: door, lab"),
        ("profile:rpi5", "profiles in this fleet: jetson-nano, rpi4b"),
        ("group:x", "unknown kind 'group'"),
        ("tag:", "must be 1-128"),
        ("a b", "is not a device id"),
    ],
)
def test_selectors_refuse_with_the_fix(text: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        resolve(text, DEVICES)
    assert fragment in str(info.value)


def test_empty_fleet_says_to_start_an_agent() -> None:
    with pytest.raises(SelectorError, match="start an agent"):
        resolve("all", [])


def test_strategies_plan_waves() -> None:
    ids = [f"d{i:02d}" for i in range(10)]
    assert parse_strategy("all").plan(ids) == [ids]
    assert parse_strategy("canary:10").plan(ids) == [ids[:1], ids[1:]]
    assert parse_strategy("canary:25").plan(ids) == [ids[:3], ids[3:]]
    assert parse_strategy("waves:10,50,100").plan(ids) == [ids[:1], ids[1:5], ids[5:]]
    # A canary of 1 % of a small fleet is still one device, and never an empty wave.
    assert parse_strategy("canary:1").plan(ids[:3]) == [ids[:1], ids[1:3]]
    assert parse_strategy("waves:50,60,100").plan(ids[:2]) == [ids[:1], ids[1:2]]
    assert parse_strategy("canary:100").plan(ids[:2]) == [ids[:2]]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("fast", "unknown strategy"),
        ("canary:0", "(0, 100]"),
        ("canary:x", "not a percentage"),
        ("waves:50,10,100", "must grow"),
        ("waves:10,50", "must reach 100"),
    ],
)
def test_strategies_refuse(text: str, fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
        parse_strategy(text)


def test_failure_share_waits_for_the_minimum_count() -> None:
    rules = AbortRules(max_failed_pct=20, min_finished=5)
    four = {"a": "rejected", "b": "deployed", "c": "deployed", "d": "deployed", "e": "sent"}
    assert rules.check_outcomes(four) is None
    five = {**four, "e": "timed-out"}
    reason = rules.check_outcomes(five)
    assert reason is not None and "2 of 5" in reason and "1 rejected, 1 timed-out" in reason
    assert AbortRules(max_failed_pct=50, min_finished=5).check_outcomes(five) is None


def test_default_rules_abort_on_the_first_failure() -> None:
    assert AbortRules().check_outcomes({"a": "rejected", "b": "pending"}) is not None
    assert AbortRules().check_outcomes({"a": "deployed", "b": "pending"}) is None


def test_the_failure_share_counts_the_statuses_the_engine_sets() -> None:
    # prepare: every status a device can have in a rollout, as the engine writes them (enum members)
    statuses = {f"d-{s.value}": s for s in DeviceStatus}
    # act
    reason = AbortRules(max_failed_pct=10, min_finished=1).check_outcomes(statuses)
    # assert: the failures are exactly the engine's failure outcomes (rejected, timed-out), among the
    # finished devices (those plus deployed); nothing counts a status no code sets
    assert {DeviceStatus.REJECTED, DeviceStatus.TIMED_OUT} == FAILED_DEVICE
    assert reason is not None and "2 of 3 finished" in reason and "1 rejected, 1 timed-out" in reason
    # a "failed" status (which no code sets) is not a failure the rules count
    assert "failed" not in {s.value for s in DeviceStatus}
    assert AbortRules().check_outcomes({"a": "failed", "b": "deployed"}) is None


def _sample(device: str, count: int = 10, p95: float | None = 1.0, **quality: float) -> TelemetrySample:
    return TelemetrySample(device, count, p95, quality)


def test_telemetry_rules_use_the_manifest_budget() -> None:
    health = HealthPolicy(metric="accuracy", min_quality=0.9, max_p95_ms=5.0)
    fast = _sample("a", 100, 2.0, accuracy=0.95)
    slow = _sample("b", 300, 9.0)
    idle = _sample("c", 0, 50.0)
    rules = AbortRules(min_samples=1, min_requests=1)
    assert rules.check_telemetry([fast, idle], health) is None
    reason = rules.check_telemetry([fast, slow], health)
    # each device is judged on its own windows: b is slow, a is not pooled with it
    assert reason is not None and "p95 latency 9.000 ms on b" in reason and "5 ms budget" in reason
    assert AbortRules(max_p95_ms=10).check_telemetry([fast, slow], health) is None
    assert AbortRules(min_samples=3).check_telemetry([fast, slow], health) is None
    assert AbortRules(telemetry=False).check_telemetry([fast, slow], health) is None
    worse = _sample("a", accuracy=0.7)
    reason = rules.check_telemetry([worse], health)
    assert reason is not None and "eval-set accuracy 0.7000" in reason and "minimum 0.9" in reason
    assert rules.check_telemetry([worse], None) is None


def test_min_agreement_gates_agreement_readings() -> None:
    # prepare: a reference-eval bundle whose devices agree with the fp32 model on 80 % of rows
    low = [_sample("a", agreement=0.80, fidelity=0.999), _sample("b", agreement=0.82, fidelity=0.998)]
    # act / assert: the rule's floor gates the agreement mean; other metrics are not confused with it
    reason = AbortRules(min_agreement=0.9, min_samples=1).check_telemetry(low, None)
    assert reason is not None and "eval-set agreement 0.8100" in reason and "minimum 0.9" in reason
    assert AbortRules(min_agreement=0.8, min_samples=1).check_telemetry(low, None) is None
    assert (
        AbortRules(min_accuracy=0.9, min_samples=1).check_telemetry(low, None) is None
    )  # no accuracy readings
    # the manifest's floor applies when the rule sets none (health metric agreement, floor 0.95)
    reason = AbortRules(min_samples=1).check_telemetry(
        low, HealthPolicy(metric="agreement", min_quality=0.95)
    )
    assert reason is not None and "agreement" in reason
    with pytest.raises(StrategyError, match="--min-agreement"):
        AbortRules(min_agreement=1.5)


def test_min_fidelity_gates_fidelity_readings() -> None:
    # prepare: outputs drifted from the reference (mean cosine 0.97)
    drifted = [_sample("a", fidelity=0.97), _sample("b", fidelity=0.97)]
    # act / assert
    reason = AbortRules(min_fidelity=0.99, min_samples=1).check_telemetry(drifted, None)
    assert reason is not None and "eval-set fidelity 0.9700" in reason and "minimum 0.99" in reason
    assert AbortRules(min_fidelity=0.95, min_samples=1).check_telemetry(drifted, None) is None
    # a manifest naming no metric gates the bundle's eval metric (here fidelity, floor 1 - 0.005)
    health = HealthPolicy(min_quality=0.995)
    assert AbortRules(min_samples=1).check_telemetry(drifted, health, "fidelity") is not None
    assert AbortRules(min_samples=1).check_telemetry(drifted, health, "agreement") is None
    assert AbortRules.from_dict(AbortRules(min_fidelity=0.9).to_dict()).min_fidelity == 0.9
    with pytest.raises(StrategyError, match="--min-fidelity"):
        AbortRules(min_fidelity=-0.1)


def test_a_sample_reads_typed_telemetry() -> None:
    # prepare: a telemetry message with an eval reading (fidelity, agreement in detail) and feedback
    message = Telemetry(
        device="cam-1",
        seq=1,
        ts=1.0,
        requests=Requests(count=12),
        latency=Latency(count=12, p95_ms=3.5),
        quality=(
            Quality("fidelity", 0.98, 64, {"agreement": 0.9}, "eval"),
            Quality("accuracy", 0.75, 4, {}, "feedback"),
        ),
    )
    # act
    sample = TelemetrySample.of(message)
    # assert
    assert (sample.device_id, sample.count, sample.p95_ms) == ("cam-1", 12, 3.5)
    assert dict(sample.quality) == {"fidelity": 0.98, "agreement": 0.9}
    assert sample.live_accuracy == 0.75


def test_abort_rules_refuse_nonsense_and_round_trip() -> None:
    with pytest.raises(StrategyError):
        AbortRules(max_failed_pct=100)
    with pytest.raises(StrategyError):
        AbortRules(min_finished=0)
    with pytest.raises(StrategyError):
        AbortRules(min_accuracy=2)
    rules = AbortRules(max_failed_pct=10, min_finished=3, max_p95_ms=4.0)
    assert AbortRules.from_dict(rules.to_dict()) == rules


def test_telemetry_rows_carry_the_store_columns() -> None:
    message = Telemetry.from_metrics(
        device="cam-1",
        seq=7,
        ts=100.0,
        metrics={
            "model": "digits",
            "model_version": 3,
            "count": 12,
            "errors": 1,
            "p50_ms": 0.5,
            "p95_ms": 1.5,
            "p99_ms": 2.0,
            "mean_ms": 0.7,
            "live_accuracy": None,
            "eval": {"accuracy": 0.98, "at": 99.0},
            "profile": "rpi4b",
            "cpu_percent": 12.0,
        },
    )
    row = flatten_telemetry(message)
    assert (row["device_id"], row["seq"], row["ts"]) == ("cam-1", 7, 100.0)
    assert (row["model_name"], row["model_version"], row["count"], row["errors"]) == ("digits", 3, 12, 1)
    assert (row["p95_ms"], row["eval_accuracy"], row["live_accuracy"]) == (1.5, 0.98, None)
    assert row["cpu_percent"] == 12.0


@pytest.mark.parametrize(
    ("evaluation", "expected"),
    [
        ({"metric": "accuracy", "value": 0.97, "source": "install"}, 0.97),  # the install's health report
        ({"metric": "cosine", "value": 0.99, "source": "install"}, None),  # fidelity is not accuracy
        ({"accuracy": 0.95, "value": 0.1}, 0.95),  # a periodic eval names accuracy itself
        ({"accuracy": "high"}, None),  # junk from a device is dropped, not stored
    ],
)
def test_eval_accuracy_is_read_from_both_eval_shapes(evaluation, expected) -> None:  # type: ignore[no-untyped-def]
    message = Telemetry.from_metrics(
        device="cam-1", seq=1, ts=1.0, metrics={"model": "m", "eval": evaluation}
    )
    assert flatten_telemetry(message)["eval_accuracy"] == expected


def test_chunk_size_stays_under_the_broker_limit() -> None:
    assert choose_chunk_size(None) == 256 * 1024
    assert choose_chunk_size(None, 4096) == 4096
    assert choose_chunk_size(65536) == 65536 - 512
    with pytest.raises(BundleRefused, match="max_packet_size"):
        choose_chunk_size(600)


def test_broker_options_refuse_bad_urls_and_half_tls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert MqttOptions("mqtts://broker.example").port == 8883
    assert MqttOptions("mqtt://10.0.0.1:1884").port == 1884
    for url in ("http://x:1", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(BrokerUnavailable):
            MqttOptions(url)
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(BrokerUnavailable, match="go together"):
        MqttOptions("mqtts://h", tls_cert=str(cert))
    with pytest.raises(BrokerUnavailable, match="no such file"):
        MqttOptions("mqtts://h", tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(BrokerUnavailable, match="username"):
        MqttOptions("mqtt://h", password="p")


def test_the_download_step_says_how_many_chunks_the_device_holds() -> None:
    # the engine skips the broadcast for a device that already holds every chunk (a resumed download)
    def progress(**detail: object) -> Progress:
        return Progress(device="cam-1", seq=1, ts=1.0, deploy="r-1", step="download", detail=dict(detail))

    assert progress(have=5, chunks=5).chunk_counts() == (5, 5)
    assert progress(have=0, chunks=7, name="m").chunk_counts() == (0, 7)
    assert progress().chunk_counts() == (None, None)
    assert progress(have=True, chunks="7").chunk_counts() == (None, None)
