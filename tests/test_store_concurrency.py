"""Two ingest processes (real OS processes) writing the same devices at once: no errors, no duplicates, right gaps.

As on a shared subscription, the broker hands each device message to one of the two; redeliveries can
reach either. Every message is a state (device upsert + sequence check) or a telemetry window. The first
test drives the store's methods as ingest calls them (with redeliveries, which a broker sends only on
reconnects); the second runs two real `Ingest` processes on one `$share` group of a real Mosquitto.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest

from edgefleet.sdk.store import Store
from tests.fleet_support import wait_for

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEVICES = [f"cam-{i}" for i in range(6)]
LAST_SEQ = 120
# Sequence numbers the "broker" lost for cam-0: the only gap the store may keep.
LOST = {50, 51, 52}
BATCH = 7


def _messages(worker: int) -> list[tuple[str, int]]:
    """This worker's share: odd or even sequence numbers of every device, plus redeliveries of the other's."""
    out = []
    for seq in range(1, LAST_SEQ + 1):
        for dev in DEVICES:
            if dev == "cam-0" and seq in LOST:
                continue
            if seq % 2 == worker or seq % 9 == 0:  # every 9th reaches both workers (a QoS 1 redelivery)
                out.append((dev, seq))
    return out


def _worker(url: str, fleet: str, worker: int, start: Any, results: Any) -> None:
    """One ingest process: states through upsert_device + note_sequence, telemetry in batches."""
    try:
        store = Store(url)
        start.wait(30)
        pending: list[dict[str, Any]] = []
        for dev, seq in _messages(worker):
            if seq % 10 == 0:
                store.add_telemetry(fleet, pending)
                pending = []
                store.upsert_device(fleet, dev, online=True, profile="rpi4b", agent_version=f"0.{seq}")
                store.note_sequence(fleet, dev, seq)
                store.add_bundle(
                    name="m",
                    version=1,
                    profile="rpi4b",
                    manifest_sha256=(fleet.encode().hex() * 8)[:64],
                    path="/tmp/b",
                    size_bytes=1,
                    manifest={},
                )
                continue
            ts = 1_000_000.0 + seq  # the device's own time: a redelivery carries the same
            pending.append(
                {"device_id": dev, "seq": seq, "ts": ts, "count": 1, "accuracy": 0.9, "fidelity": 0.99}
            )
            if len(pending) >= BATCH:
                store.add_telemetry(fleet, pending)
                pending = []
        store.add_telemetry(fleet, pending)
        store.close()
        results.put((worker, "ok"))
    except BaseException:  # the parent reports whatever went wrong in the child
        results.put((worker, traceback.format_exc()))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else PG_URL


def test_two_ingest_processes_write_the_same_devices_at_once(url: str) -> None:
    # prepare: the schema exists before the workers race (as `edgefleet serve` creates it at start)
    fleet = f"f{uuid.uuid4().hex[:10]}"
    Store(url).close()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, fleet, w, start, results)) for w in (0, 1)]
    for proc in procs:
        proc.start()
    # act
    start.set()
    outcomes = dict(results.get(timeout=240) for _ in procs)
    for proc in procs:
        proc.join(30)
    # assert: both finished cleanly
    assert outcomes == {0: "ok", 1: "ok"}, outcomes
    assert [p.exitcode for p in procs] == [0, 0]
    store = Store(url)
    try:
        telemetry_seqs = {
            (dev, seq)
            for dev in DEVICES
            for seq in range(1, LAST_SEQ + 1)
            if seq % 10 and not (dev == "cam-0" and seq in LOST)
        }
        # one row per message, redeliveries included
        assert store.telemetry_count(fleet) == len(telemetry_seqs)
        for dev in DEVICES:
            rows = store.latest_telemetry(fleet, dev, limit=LAST_SEQ)
            seqs = [r["seq"] for r in rows]
            assert len(seqs) == len(set(seqs)), f"{dev} has duplicate rows"
            assert {r["fidelity"] for r in rows} == {0.99}
            row = store.device(fleet, dev)
            assert row is not None and row["last_seq"] == LAST_SEQ and row["online"] is True
        # late messages filled the holes the other worker opened; only the real loss stays
        assert [(g.device_id, g.first_missing, g.last_missing) for g in store.gaps(fleet)] == [
            ("cam-0", 50, 52)
        ]
        assert len([b for b in store.bundles("m") if b["path"] == "/tmp/b" and b["size_bytes"] == 1]) >= 1
        assert (
            len(
                {
                    b["id"]
                    for b in store.bundles("m")
                    if b["manifest_sha256"] == (fleet.encode().hex() * 8)[:64]
                }
            )
            == 1
        )
        assert [d["device_id"] for d in store.devices(fleet)] == DEVICES
    finally:
        store.close()


def _ingest_worker(url: str, broker: str, fleet: str, ready: Any, stop: Any, results: Any) -> None:
    """One `edgefleet serve`-like ingest process: a member of the `$share/ingest` group."""
    try:
        from edgefleet.sdk.fleet.ingest import Ingest
        from edgefleet.sdk.fleet.mqtt_url import MqttOptions

        store = Store(url)
        ingest = Ingest(store, MqttOptions(broker), fleet, share_group="ingest", max_delay_s=0.02, max_rows=8)
        ingest.start()
        ready.put("ready")
        stop.wait(120)
        ingest.flush(20)
        ingest.close()
        store.close()
        results.put((ingest.received, ingest.stored_telemetry, ingest.failures, ingest.dropped))
    except BaseException:  # the parent reports whatever went wrong in the child
        results.put(traceback.format_exc())


@pytest.mark.broker
def test_two_ingest_processes_on_one_shared_subscription(url: str, mosquitto: Any) -> None:
    # prepare: two ingest processes in one share group, one publisher playing six devices
    import paho.mqtt.client as mqtt

    from edgefleet.agent.core.protocol import State, Telemetry, Topics

    fleet = f"f{uuid.uuid4().hex[:10]}"
    Store(url).close()
    ctx = multiprocessing.get_context("spawn")
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_ingest_worker, args=(url, mosquitto.url, fleet, ready, stop, results))
        for _ in (0, 1)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert ready.get(timeout=60) == "ready"
    time.sleep(1.0)  # both subscriptions are in place before the first message
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{random.getrandbits(40)}")
    device.connect(host, int(port))
    device.loop_start()
    sent_telemetry = 0
    last = 80
    # act: per device, a birth at seq 1 and every 20th seq, telemetry in between; cam-0 loses 50..52
    for seq in range(1, last + 1):
        for dev in DEVICES:
            if dev == "cam-0" and seq in LOST:
                continue
            topics = Topics(fleet, dev)
            if seq == 1 or seq % 20 == 0:
                state = State.from_info(
                    dev, seq, time.time(), True, {"profile": "rpi4b", "agent_version": f"0.{seq}"}
                )
                device.publish(topics.state, state.to_wire(), qos=1)
                continue
            metrics = {"model": "m", "model_version": 1, "count": 1, "p95_ms": 1.0, "eval": {"accuracy": 0.9}}
            device.publish(
                topics.telemetry, Telemetry.from_metrics(dev, seq, 1e6 + seq, metrics).to_wire(), qos=1
            )
            sent_telemetry += 1
    store = Store(url)
    try:
        wait_for(lambda: store.telemetry_count(fleet) >= sent_telemetry, 60, "every telemetry window stored")
        wait_for(
            lambda: all((store.device(fleet, d) or {}).get("last_seq") == last for d in DEVICES),
            30,
            "every device's last sequence number",
        )
        stop.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
        # assert: both members wrote, nothing failed or was dropped, one row per message, only the real gap
        assert all(isinstance(o, tuple) for o in outcomes), outcomes
        assert [o[2:] for o in outcomes] == [(0, 0), (0, 0)], outcomes  # (failures, dropped)
        assert all(o[1] > 0 for o in outcomes), outcomes
        assert sum(o[1] for o in outcomes) == sent_telemetry == store.telemetry_count(fleet)
        assert [(g.device_id, g.first_missing, g.last_missing) for g in store.gaps(fleet)] == [
            ("cam-0", 50, 52)
        ]
        for dev in DEVICES:
            row = store.device(fleet, dev)
            assert row is not None and row["online"] is True and row["profile"] == "rpi4b"
            assert {r["accuracy"] for r in store.latest_telemetry(fleet, dev, limit=200)} == {0.9}
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        device.disconnect()
        device.loop_stop()
        store.close()
