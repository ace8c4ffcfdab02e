"""The embedded broker: both backends carry a QoS 1 message between two real paho clients."""

from __future__ import annotations

import queue
import uuid

import paho.mqtt.client as mqtt
import pytest

from edgefleet.sdk.fleet.broker import BrokerError, EmbeddedBroker, mosquitto_config


def _roundtrip(url_port: int, payload: bytes) -> bytes:
    """Publish on one client, receive on another, with a timeout on every wait."""
    topic = f"edgefleet/v1/t{uuid.uuid4().hex[:8]}/probe"
    got: queue.Queue[bytes] = queue.Queue()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}")
    subscribed: queue.Queue[bool] = queue.Queue()
    sub.on_message = lambda c, u, m: got.put(m.payload)
    sub.on_subscribe = lambda *a: subscribed.put(True)
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    sub.connect("127.0.0.1", url_port, keepalive=10)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    pub.connect("127.0.0.1", url_port, keepalive=10)
    pub.loop_start()
    try:
        subscribed.get(timeout=10)
        pub.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
        return got.get(timeout=10)
    finally:
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()


@pytest.mark.broker
@pytest.mark.parametrize("backend", ["mosquitto", "amqtt"])
def test_embedded_broker_carries_messages(backend: str) -> None:
    # prepare
    payload = bytes(range(256)) * 256  # a 64 KiB binary chunk
    # act
    with EmbeddedBroker(backend=backend) as broker:  # type: ignore[arg-type]
        received = _roundtrip(broker.port, payload)
        chosen = broker.chosen
    # assert
    assert chosen == backend
    assert received == payload


def test_busy_port_is_refused_with_advice() -> None:
    with EmbeddedBroker(backend="mosquitto") as first:
        with pytest.raises(BrokerError, match="already in use; pick another --port"):
            EmbeddedBroker(port=first.port).start()


def test_generated_mosquitto_config_has_no_queue_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = mosquitto_config("127.0.0.1", 1999, tmp_path)
    assert "max_queued_messages 0" in text
    assert f"persistence_location {tmp_path}/" in text


@pytest.mark.broker
@pytest.mark.parametrize("persistent", [False, True])
def test_host_connections_fall_back_to_mqtt311_on_amqtt(persistent: bool) -> None:
    from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect

    # prepare: amqtt speaks only MQTT 3.1.1; the host asks for MQTT 5 by default
    with EmbeddedBroker(backend="amqtt") as broker:
        # act
        conn = connect(MqttOptions(url=f"mqtt://127.0.0.1:{broker.port}"), persistent=persistent)
        try:
            # assert: connected, with the older protocol
            assert conn.connected.is_set()
            assert conn.client.protocol == mqtt.MQTTv311
        finally:
            conn.client.disconnect()
            conn.client.loop_stop()
