"""The fleet against three MQTT brokers: Mosquitto, amqtt (PyPI) and aedes (npm), each started by the test
on a free port, with real agent processes on their default MQTT settings (no --mqtt-version).

On each broker: the registry finds the devices, a release and then a fine-tuned one roll out (the second
as a bsdiff4 delta), and every telemetry message the agents sent is in the store exactly once.
"""

from __future__ import annotations

import queue
import time
from collections import Counter
from pathlib import Path

import pytest

from edgefleet.agent.core.protocol import Telemetry, Topics, parse_device_message
from edgefleet.agent.core.topics import TopicKind
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.fleet.mqtt_url import MqttOptions, connect
from edgefleet.sdk.store import Store
from tests import interop_support
from tests.agent_net_support import eval_set, export_tiny_onnx, make_bundle
from tests.fleet_support import agents, wait_for, wait_online

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# The brokers' fixtures (shared with tests/test_agent_mqtt_fallback.py).
aedes = interop_support.aedes
amqtt_broker = interop_support.amqtt_broker

BROKERS = ["mosquitto", "amqtt", "aedes"]
# The version each broker ends up speaking with an agent on `mqtt_version = "auto"`.
NEGOTIATED = {"mosquitto": "5", "amqtt": "3.1.1", "aedes": "3.1.1"}
DEVICES = ["i1", "i2"]


def _fine_tuned(src: Path, dst: Path) -> Path:
    """The same ONNX model with one bias nudged: what fine-tuning a head changes (a small delta)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name.endswith("bias"):
            arr = numpy_helper.to_array(init).copy()
            arr[0] += 0.5
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys, v1 and v2 (v1 fine-tuned) of the tiny model, signed."""
    from edgefleet.sdk.trust.keys import init_keys

    d = tmp_path_factory.mktemp("interop")
    keys = init_keys(d / "keys")
    m1 = export_tiny_onnx(d / "m1.onnx", seed=0)
    m2 = _fine_tuned(m1, d / "m2.onnx")
    e1 = eval_set(m1, d / "e1.npz")
    return {
        "key": keys.public_path,
        "v1": make_bundle(d / "v1", d / "keys", m1, e1, version=1, min_accuracy=0.0),
        "v2": make_bundle(d / "v2", d / "keys", m2, e1, version=2, min_accuracy=0.0),
    }


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(name, url) of a broker of this test's own."""
    name = str(request.param)
    if name == "mosquitto":
        return name, request.getfixturevalue("mosquitto").url
    fixture = "amqtt_broker" if name == "amqtt" else "aedes"
    return name, request.getfixturevalue(fixture).url


class Wire:
    """Every state, event and telemetry message of the fleet as the broker delivered it (seq per device)."""

    def __init__(self, url: str, fleet: str) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.conn = connect(MqttOptions(url), on_message=lambda t, p, r: self.inbox.put((t, p)))
        self.conn.subscribe([(Topics.devices(fleet, kind), 1) for kind in ("state", "evt", "telemetry")])
        self.seqs: dict[str, list[int]] = {}
        self.telemetry: dict[str, list[int]] = {}

    def drain(self) -> None:
        """Sort what arrived so far by device."""
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            parts = Topics.parse(topic)
            if parts is None or not payload:
                continue
            message = parse_device_message(payload)
            self.seqs.setdefault(parts.device or "", []).append(message.seq)
            if parts.kind == TopicKind.TELEMETRY and isinstance(message, Telemetry):
                self.telemetry.setdefault(parts.device or "", []).append(message.seq)

    def close(self) -> None:
        """Disconnect."""
        self.conn.close()


def _stored_seqs(store: Store, fleet: str, device: str) -> list[int]:
    """The `seq` of every telemetry row of a device, repeats kept."""
    from sqlalchemy import select

    from edgefleet.sdk.store import telemetry

    query = select(telemetry.c.seq).where((telemetry.c.fleet == fleet) & (telemetry.c.device_id == device))
    with store.engine.connect() as conn:
        return [int(s) for (s,) in conn.execute(query) if s is not None]


def test_registry_delta_rollout_and_telemetry_on_every_broker(
    broker: tuple[str, str],
    releases: dict[str, Path],
    tmp_path: Path,
    fleet_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prepare: the broker, a store, the fleet with its ingest, a listener on the wire
    name, url = broker
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(broker=url, store=store, fleet=fleet_name, trusted_keys=[releases["key"]])
    ingest = fleet.start_ingest()
    wire = Wire(url, fleet_name)
    try:
        with agents(tmp_path, url, fleet_name, releases["key"], DEVICES) as procs:
            # act 1: the registry finds both devices, with their profile
            wait_online(store, fleet_name, fleet.options, DEVICES, timeout=60)
            rows = {d["device_id"]: d for d in fleet.devices(refresh=True)}
            assert {i: rows[i]["profile"] for i in DEVICES} == {i: "x86-64" for i in DEVICES}
            # act 2: v1 to all, then v2 to all, which goes out as a patch against v1
            first = fleet.deploy(releases["v1"], "all", timeout_s=90)
            assert first.status == "succeeded", store.rollout(first.id)
            second = fleet.deploy(releases["v2"], "all", timeout_s=90)
            row = store.rollout(second.id)
            assert second.status == "succeeded", row
            assert row is not None and all(d["status"] == "deployed" for d in row["devices"])
            assert sorted(row["settings"]["patches"]) == DEVICES, "v2 did not go out as a delta"
            fleet.refresh()
            active = {
                d["device_id"]: (d["active_model"], d["active_version"]) for d in store.devices(fleet_name)
            }
            assert active == {i: ("tiny", 2) for i in DEVICES}
            # a few more telemetry windows, then a clean stop (the retained offline state goes last)
            time.sleep(1.5)
            codes = {i: procs[i].stop() for i in DEVICES}
        # assert: the agents ran on defaults and negotiated the broker's version; they stopped cleanly
        assert codes == {i: 0 for i in DEVICES}, {i: procs[i].log()[-3000:] for i in DEVICES}
        for device in DEVICES:
            assert f"with MQTT {NEGOTIATED[name]} " in procs[device].log(), procs[device].log()[-3000:]
        # assert: what the agents sent (a gap-free seq run, birth to goodbye) is what the store holds
        for device in DEVICES:

            def arrived(d: str = device) -> bool:
                wire.drain()
                every = sorted(wire.seqs.get(d, []))
                return bool(every) and every == list(range(every[0], every[-1] + 1))

            wait_for(arrived, 20, f"every message of {device} on the wire, without a hole")
            sent = wire.telemetry.get(device, [])
            assert len(sent) >= 3, f"{device} sent only {len(sent)} telemetry messages"
            wait_for(
                lambda d=device, s=sent: set(s) <= set(_stored_seqs(store, fleet_name, d)),
                20,
                f"every telemetry message of {device} stored",
            )
            assert ingest.flush(10)
            stored = _stored_seqs(store, fleet_name, device)
            assert sorted(stored) == sorted(set(sent)), (device, sorted(set(sent) ^ set(stored)))
            assert [s for s, n in Counter(stored).items() if n > 1] == []
    finally:
        wire.close()
        fleet.close()
        store.close()
