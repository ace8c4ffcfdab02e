"""The registry's read of every retained state must not stall on a large fleet's burst.

At 5,000 devices, `POST /api/rollouts` on `edgefleet serve` failed with 503 "the broker did not confirm
the subscription within 10 s" (bench/load.py --scale): the registry refresh that precedes a deploy
subscribed to the states first and to its sync topic second, so the second SUBACK queued behind
the whole retained burst, which paho's thread works through with one store write per state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.core.protocol import State, Topics, build_message
from edgefleet.sdk.fleet import registry
from edgefleet.sdk.fleet.mqtt_url import CONNECT_TIMEOUT_S, MqttOptions
from edgefleet.sdk.store import Store

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 120
# Each state's store write made this slow, so the burst outlasts the SUBACK timeout by a margin.
WRITE_DELAY_S = 1.5 * CONNECT_TIMEOUT_S / DEVICES


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def _retain_states(url: str, fleet: str, count: int) -> None:
    """Publish `count` retained online states, as that many devices' births leave them."""
    host, port = url.split("://", 1)[1].split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(host, int(port))
    client.loop_start()
    try:
        infos = []
        for i in range(count):
            device = f"d{i:04d}"
            state = build_message(State, device, 0, time.time(), online=True, info={"profile": "x86-64"})
            infos.append(client.publish(Topics(fleet, device).state, state.to_wire(), qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_retained_burst_slower_than_the_suback_timeout_does_not_fail_the_refresh(
    mosquitto_factory: Any, fleet_name: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: a broker that sends a whole burst at once (no in-flight window, as the load bench's, or
    # a broker honouring paho's Receive Maximum of 65535), many retained states, and a store that
    # takes its time with each
    mosquitto = mosquitto_factory(
        "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
    )
    _retain_states(mosquitto.url, fleet_name, DEVICES)
    apply = registry.apply_state

    def slow_apply(*args: Any, **kwargs: Any) -> Any:
        time.sleep(WRITE_DELAY_S)
        return apply(*args, **kwargs)

    monkeypatch.setattr(registry, "apply_state", slow_apply)
    # act: the refresh a deploy runs first (it waits at most max_wait_s for the burst)
    started = time.monotonic()
    seen = registry.refresh(store, MqttOptions(mosquitto.url), fleet_name, reannounce_s=0)
    # assert: no "did not confirm the subscription", and it returned within its own wait
    assert seen > 0
    assert time.monotonic() - started < CONNECT_TIMEOUT_S
