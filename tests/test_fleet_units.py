"""Unit tests of the fleet control plane's pure parts: selectors, strategies, abort rules, telemetry rows."""

from __future__ import annotations

import pytest

from edgefleet.agent.core.protocol import Telemetry
from edgefleet.sdk.fleet.errors import BrokerUnavailable, BundleRefused, SelectorError, StrategyError
from edgefleet.sdk.fleet.ingest import flatten_telemetry
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.fleet.selectors import parse_selector, resolve
from edgefleet.sdk.fleet.strategy import AbortRules, parse_strategy
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


def test_telemetry_rules_use_the_manifest_budget() -> None:
    health = {"max_p95_ms": 5.0, "min_accuracy": 0.9}
    fast = {"device_id": "a", "count": 100, "p95_ms": 2.0, "eval_accuracy": 0.95}
    slow = {"device_id": "b", "count": 300, "p95_ms": 9.0}
    idle = {"device_id": "c", "count": 0, "p95_ms": 50.0}
    rules = AbortRules()
    assert rules.check_telemetry([fast, idle], health) is None
    reason = rules.check_telemetry([fast, slow], health)
    assert reason is not None and "p95 latency 7.250 ms" in reason and "5 ms budget" in reason
    assert AbortRules(max_p95_ms=10).check_telemetry([fast, slow], health) is None
    assert AbortRules(min_samples=3).check_telemetry([fast, slow], health) is None
    assert AbortRules(telemetry=False).check_telemetry([fast, slow], health) is None
    worse = {"device_id": "a", "count": 10, "p95_ms": 1.0, "eval_accuracy": 0.7}
    reason = rules.check_telemetry([worse], health)
    assert reason is not None and "eval-set accuracy 0.7000" in reason and "minimum 0.9" in reason
    assert rules.check_telemetry([worse], {}) is None


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
    message = Telemetry(
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
    message = Telemetry(device="cam-1", seq=1, ts=1.0, metrics={"model": "m", "eval": evaluation})
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
