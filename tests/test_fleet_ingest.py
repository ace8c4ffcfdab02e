"""Ingest and registry against a real Mosquitto: telemetry stored in batches, gaps, state, Last Will, $share."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.core.protocol import ModelRef, Progress, State, Telemetry, Topics, will_payload
from edgefleet.sdk.fleet import registry
from edgefleet.sdk.fleet.ingest import Ingest
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.store import Store
from tests.fleet_support import wait_for

pytestmark = pytest.mark.broker


def _client(url: str, will: tuple[str, bytes] | None = None) -> mqtt.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{random.getrandbits(40)}")
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.connect(host, int(port))
    client.loop_start()
    return client


def _telemetry(device: str, seq: int, p95: float = 1.0) -> bytes:
    metrics = {
        "model": "m",
        "model_version": 2,
        "count": 10,
        "errors": 0,
        "p50_ms": 0.5,
        "p95_ms": p95,
        "profile": "rpi4b",
    }
    return Telemetry.from_metrics(device, seq, time.time(), metrics).to_wire()


def test_telemetry_and_events_are_stored_in_order_with_gaps_found(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    # prepare
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    ingest = Ingest(store, MqttOptions(mosquitto.url), fleet_name, max_delay_s=0.05)
    ingest.start()
    device = _client(mosquitto.url)
    topics = Topics(fleet_name, "cam-1")
    # act: seq 1..200 with 50..52 never sent, an event in the middle, garbage that must be dropped
    sent = 0
    for seq in range(1, 201):
        if 50 <= seq <= 52:
            continue
        if seq == 100:
            payload = Progress(
                device="cam-1", seq=seq, ts=time.time(), deploy="r-1", step="download"
            ).to_wire()
            device.publish(topics.evt, payload, qos=1)
            continue
        device.publish(topics.telemetry, _telemetry("cam-1", seq), qos=1).wait_for_publish(5)
        sent += 1
    device.publish(topics.telemetry, b"{not json", qos=1).wait_for_publish(5)
    device.publish(Topics(fleet_name, "cam-2").telemetry, _telemetry("cam-1", 1), qos=1).wait_for_publish(5)
    wait_for(lambda: ingest.received >= sent + 3, 10, "the ingest to receive everything")
    assert ingest.flush(10)
    # assert
    assert store.telemetry_count(fleet_name, "cam-1") == sent
    assert [(g.first_missing, g.last_missing) for g in store.gaps(fleet_name, "cam-1")] == [(50, 52)]
    assert [e["kind"] for e in store.events(fleet_name, "cam-1")] == ["progress"]
    assert ingest.dropped == 2
    series = store.series(fleet_name, device_id="cam-1", model_name="m", model_version=2, bucket_s=3600)
    assert sum(p.count for p in series) == 10 * sent
    ingest.close()
    device.disconnect()
    store.close()


def test_registry_follows_birth_and_last_will(tmp_path: Path, mosquitto: Any, fleet_name: str) -> None:
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    topics = Topics(fleet_name, "cam-1")
    device = _client(mosquitto.url, will=(topics.state, will_payload("cam-1")))
    birth = State(
        device="cam-1",
        seq=1,
        ts=time.time(),
        online=True,
        profile="rpi4b",
        tags=("lab",),
        agent_version="0.1.0",
        runtimes=("onnxruntime",),
        active=ModelRef("digits", 3),
    )
    device.publish(topics.state, birth.to_wire(), qos=1, retain=True).wait_for_publish(5)
    # act: a fresh host reads the retained state
    assert registry.refresh(store, MqttOptions(mosquitto.url), fleet_name) == 1
    row = store.device(fleet_name, "cam-1")
    assert row is not None
    assert (row["online"], row["profile"], row["tags"], row["active_model"], row["active_version"]) == (
        True,
        "rpi4b",
        ["lab"],
        "digits",
        3,
    )
    store.upsert_device(fleet_name, "cam-1", desired_model="digits", desired_version=4)
    assert registry.differences(store, fleet_name) == [
        {"device_id": "cam-1", "desired": "digits v4", "reported": "digits v3", "online": True}
    ]
    # The device dies without a goodbye: the broker publishes its Last Will.
    device._sock.close()  # type: ignore[union-attr]
    device.loop_stop()

    def offline() -> bool:
        registry.refresh(store, MqttOptions(mosquitto.url), fleet_name, quiet_s=0.2, max_wait_s=1)
        return not (store.device(fleet_name, "cam-1") or {}).get("online", True)

    wait_for(offline, 90, "the Last Will")
    # What the device said before going offline stays.
    assert (store.device(fleet_name, "cam-1") or {})["profile"] == "rpi4b"
    store.close()


def _retained_devices(url: str, fleet: str, count: int) -> None:
    """Publish `count` retained birth messages, as devices that then went away."""
    client = _client(url)
    for i in range(count):
        state = State(device=f"d{i}", seq=1, ts=time.time(), online=True, profile="rpi4b")
        client.publish(Topics(fleet, f"d{i}").state, state.to_wire(), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_registry_refresh_ends_on_its_own_sync_message(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    # prepare: 20 retained states, and a quiet period so long that only the sync message can end the wait
    _retained_devices(mosquitto.url, fleet_name, 20)
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    # act
    started = time.monotonic()
    count = registry.refresh(store, MqttOptions(mosquitto.url), fleet_name, quiet_s=30, max_wait_s=60)
    took = time.monotonic() - started
    # assert: every state is in, and the wait did not run into the 30 s quiet period
    assert count == 20 and len(store.devices(fleet_name)) == 20
    assert took < 30, f"refresh waited {took:.1f} s: the sync message never came back"
    store.close()


def test_registry_refresh_without_the_sync_message_falls_back_to_quiet(
    tmp_path: Path, mosquitto: Any, fleet_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: a broker that drops the host's sync message (an older ACL without `host/#`)
    _retained_devices(mosquitto.url, fleet_name, 5)
    real_connect = registry.connect

    def connect_dropping_sync(*args: Any, **kwargs: Any) -> Any:
        conn = real_connect(*args, **kwargs)
        publish = conn.publish
        conn.publish = lambda topic, *a, **k: None if "/host/sync/" in topic else publish(topic, *a, **k)  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(registry, "connect", connect_dropping_sync)
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    # act
    count = registry.refresh(store, MqttOptions(mosquitto.url), fleet_name, quiet_s=0.3, max_wait_s=10)
    # assert: the quiet period still ends the wait with every retained state
    assert count == 5 and len(store.devices(fleet_name)) == 5
    store.close()


def test_shared_subscription_splits_the_load_and_loses_nothing(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    options = MqttOptions(mosquitto.url)
    members = [Ingest(store, options, fleet_name, share_group="ingest", max_delay_s=0.05) for _ in range(2)]
    for m in members:
        m.start()
    assert members[0].filters()[0].startswith("$share/ingest/edgefleet/v1/")
    device = _client(mosquitto.url)
    n = 400
    for seq in range(1, n + 1):
        device.publish(
            Topics(fleet_name, f"cam-{seq % 4}").telemetry, _telemetry(f"cam-{seq % 4}", seq // 4 + 1), qos=1
        )
    wait_for(lambda: sum(m.received for m in members) >= n, 20, "both members to receive")
    for m in members:
        assert m.flush(10)
    assert store.telemetry_count(fleet_name) == n
    assert all(m.stored_telemetry > 0 for m in members)
    # Interleaved writers must not invent gaps: late messages fill the holes they left.
    assert store.gaps(fleet_name) == []
    for m in members:
        m.close()
    device.disconnect()
    store.close()
