"""Host connections with a list of brokers: the first that accepts is taken, and after a lost link paho
reconnects to the first of the list again, resubscribing there."""

from __future__ import annotations

import queue
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.sdk.fleet.errors import BrokerUnavailable
from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect
from tests.conftest import free_port

pytestmark = pytest.mark.broker


def _publish(url: str, topic: str, payload: bytes) -> None:
    host, port = url.split("://", 1)[1].split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(host, int(port))
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_the_first_broker_that_accepts_is_taken_and_the_first_again_after_a_drop(
    mosquitto_factory: Any, fleet_name: str
) -> None:
    # prepare: the first broker is down, the second runs
    first = mosquitto_factory(start=False)
    second = mosquitto_factory()
    got: queue.Queue = queue.Queue()
    topic = f"{fleet_name}/x"
    # act
    conn = connect(MqttOptions(f"{first.url},{second.url}"), on_message=lambda t, p, r: got.put(p))
    try:
        conn.subscribe([(topic, 1)])
        # assert: connected to the second
        _publish(second.url, topic, b"on-second")
        assert got.get(timeout=10) == b"on-second"
        # act: the first comes up, the second dies: paho reconnects to the first and subscribes again
        first.start()
        second.stop(kill=True)
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the host did not reconnect to the first broker"
            _publish(first.url, topic, b"on-first")
            try:
                if got.get(timeout=0.5) == b"on-first":
                    break
            except queue.Empty:
                continue
    finally:
        conn.close()


def test_every_broker_down_names_each_and_a_mixed_list_is_refused() -> None:
    # prepare
    urls = [f"mqtt://127.0.0.1:{free_port()}", f"mqtt://127.0.0.1:{free_port()}"]
    # act / assert
    with pytest.raises(BrokerUnavailable) as err:
        connect(MqttOptions(",".join(urls)))
    assert all(u in str(err.value) for u in urls)
    with pytest.raises(BrokerUnavailable, match="mix mqtt:// and mqtts://"):
        MqttOptions("mqtt://a:1883,mqtts://b:8883")
    assert MqttOptions("mqtt://a:1, mqtt://b").urls == ("mqtt://a:1", "mqtt://b")
    assert (MqttOptions("mqtt://a:1, mqtt://b").host, MqttOptions("mqtt://a:1").port) == ("a", 1)
