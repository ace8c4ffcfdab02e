"""Chaos: the broker is killed (SIGKILL) and restarted, the ingest goes away, the broker's queue overflows.

Real Mosquitto brokers with persistence on, real agent processes, the real `Fleet`, rollout engine and
ingest over a SQLite store. What each test promises is in its name; docs/chaos-fleet.md has the numbers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core.topics import Topics
from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.store import Store
from tests.chaos_support import ChaosProxy, TopicWatcher, export_wide_onnx, ranges
from tests.fleet_support import agents, build_artifacts, device_statuses, stored_seqs, wait_for, wait_online

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.slow]

# Agents retry fast here (the broker is back within a second); production defaults are 0.5-60 s.
FAST_RECONNECT = "reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.agent_net_support import eval_set, make_bundle

    d = tmp_path_factory.mktemp("chaos-broker-bundles")
    out = build_artifacts(d)
    # v2 of the same model, ~1 MB: over a thousand 1 KiB chunks, so a kill lands mid-broadcast.
    wide = export_wide_onnx(d / "wide.onnx")
    out["v2-wide"] = make_bundle(d / "v2-wide", d / "keys", wide, eval_set(wide, d / "ew.npz"), version=2)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def _config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "agent.toml"
    path.write_text(FAST_RECONNECT + extra)
    return str(path)


def _kill_and_restart(broker: Any) -> None:
    """kill -9, then start again on the same port and persistence folder."""
    broker.stop(kill=True)
    broker.start()


def _slot_versions(state_dir: Path) -> dict[str, Any]:
    """What the device's A/B slots hold on disk: active/previous slot → model version, and rejections."""
    state = json.loads((state_dir / "install.json").read_text())
    out: dict[str, Any] = {"rejected": state.get("rejected") or []}
    for role in ("active", "previous"):
        slot = state.get(role)
        manifest = state_dir / "slots" / str(slot) / "manifest.json"
        out[role] = json.loads(manifest.read_text())["version"] if slot and manifest.is_file() else None
    out["ledger"] = json.loads((state_dir / "versions.json").read_text())
    return out


# ---------------------------------------------------------------------------------------------------
# 1. kill -9 the broker twice during a rollout


def test_a_broker_killed_twice_mid_rollout_the_rollout_completes_and_each_device_installs_once(
    tmp_path: Path, mosquitto: Any, fleet_name: str, store: Store, artifacts: dict[str, Path]
) -> None:
    # prepare: three agents on v1, a host ingesting as `edgefleet serve` does (no client id)
    ids = ["d1", "d2", "d3"]
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    watcher = TopicWatcher(
        mosquitto.url, Topics.devices(fleet_name, "cmd"), Topics.broadcast_filter(fleet_name)
    )
    try:
        fleet.start_ingest()
        with agents(
            tmp_path, mosquitto.url, fleet_name, artifacts["key"], ids, "--config", _config(tmp_path)
        ):
            wait_online(store, fleet_name, fleet.options, ids)
            assert fleet.deploy(artifacts["v1"], "all", timeout_s=60).status == "succeeded"
            # act: kill the broker right after the canary's deploy command (the device is subscribing
            # and reporting), and again in the middle of the second wave's broadcast (chunks in flight)
            handle = fleet.deploy(
                artifacts["v2-wide"],
                "all",
                strategy="canary:30",
                soak_s=1.0,
                timeout_s=90,
                chunk_size=1024,
                delta=False,
                wait=False,
            )

            def command_at(device: str) -> float | None:
                return next(
                    (
                        at
                        for at, topic, payload in watcher.seen()
                        if topic.endswith(f"/dev/{device}/cmd") and handle.id.encode() in payload
                    ),
                    None,
                )

            wait_for(lambda: command_at("d1"), 30, "the canary's deploy command")
            started = time.monotonic()
            _kill_and_restart(mosquitto)
            second_wave = wait_for(lambda: command_at("d2"), 60, "the second wave's deploy commands")
            wait_for(
                lambda: (
                    sum(1 for at, t, _ in watcher.seen() if "/artifact/" in t and at > second_wave) >= 100
                ),
                60,
                "the second wave's broadcast to be under way",
            )
            _kill_and_restart(mosquitto)
            status = handle.wait(120)
            measured = {
                "first_kill_to_end_s": round(time.monotonic() - started, 2),
                **handle.engine.stats.to_dict(),
            }
            print(f"\nmeasured (broker killed twice mid-rollout): {json.dumps(measured)}")
            # assert: the rollout finished on its own, every device reports v2
            assert handle.error is None
            assert status == "succeeded", (store.rollout(handle.id) or {}).get("devices")
            assert device_statuses(store, handle.id) == {i: "deployed" for i in ids}
            # The ingest (a non-persistent session) still follows the fleet after two broker restarts.
            wait_for(
                lambda: all((store.device(fleet_name, i) or {}).get("active_version") == 2 for i in ids),
                30,
                "the ingest to see every device on v2",
            )
            for device in ids:
                slots = _slot_versions(tmp_path / device)
                # Installed exactly once: a second install of v2 would have been refused by the ledger
                # (a rejection on record) or, had it passed, overwritten the slot that still holds v1.
                assert slots == {"active": 2, "previous": 1, "rejected": [], "ledger": {"tiny": 2}}, device
            # What reached the store agrees: at most one `switched` per device (a QoS 1 redelivery
            # repeats the same seq; a second install would carry a new one).
            switched = Counter(
                e["device_id"]
                for e in {
                    (e["device_id"], e["seq"]): e
                    for e in store.events(fleet_name, limit=1000)
                    if e["kind"] == "progress"
                    and e["payload"].get("deploy") == handle.id
                    and e["payload"].get("step") == "switched"
                }.values()
            )
            assert max(switched.values(), default=0) <= 1, switched
    finally:
        watcher.close()
        fleet.close()


# ---------------------------------------------------------------------------------------------------
# 2. QoS 1 telemetry over persistent sessions: every sequence number sent is stored exactly once


def _run_for(seconds: float, proxy: ChaosProxy, ids: list[str]) -> None:
    """Let the agents publish for a while: until each sent `seconds` / interval more telemetry messages."""
    want = {d: len(proxy.sent_seqs("/telemetry", d)) + int(seconds / TELEMETRY_INTERVAL_S) for d in ids}
    wait_for(
        lambda: all(len(proxy.sent_seqs("/telemetry", d)) >= n for d, n in want.items()),
        seconds * 10 + 30,
        "the agents to keep publishing",
    )


TELEMETRY_INTERVAL_S = 0.1


def test_qos1_telemetry_sent_equals_stored_across_ingest_and_broker_restarts(
    tmp_path: Path, mosquitto: Any, fleet_name: str, store: Store, artifacts: dict[str, Path]
) -> None:
    # prepare: agents behind a tapping proxy (what they put on the wire is the truth), an ingest with
    # a persistent session (its own client id, clean_start False)
    ids = ["t1", "t2"]
    proxy = ChaosProxy(mosquitto.port).start()
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    ingest_id = f"ingest-{fleet_name}"
    extra = ("--config", _config(tmp_path), "--telemetry-interval", str(TELEMETRY_INTERVAL_S))
    measured: dict[str, Any] = {}
    try:
        fleet.start_ingest(client_id=ingest_id)
        with agents(tmp_path, proxy.url, fleet_name, artifacts["key"], ids, *extra):
            wait_online(store, fleet_name, fleet.options, ids)
            _run_for(1.0, proxy, ids)
            # act 1: the ingest goes away; while it is gone the broker restarts (SIGTERM)
            fleet.close()
            _run_for(1.0, proxy, ids)
            mosquitto.restart()
            _run_for(1.0, proxy, ids)
            fleet.start_ingest(client_id=ingest_id)
            _run_for(1.0, proxy, ids)
            # act 2: the broker is killed (-9) under live traffic and comes back on the same port
            _kill_and_restart(mosquitto)
            _run_for(1.0, proxy, ids)
            # act 3: the ingest goes away and comes back once more, then the agents stop
            fleet.close()
            _run_for(1.0, proxy, ids)
            fleet.start_ingest(client_id=ingest_id)
            _run_for(1.0, proxy, ids)
        # assert: every telemetry seq an agent sent is in the store exactly once, no gap recorded
        for device in ids:
            sent = set(proxy.sent_seqs("/telemetry", device))
            wait_for(
                lambda d=device, s=sent: s <= set(stored_seqs(store, fleet_name, d)),
                30,
                f"every telemetry message of {device} in the store",
            )
            stored = stored_seqs(store, fleet_name, device)
            duplicates = sorted(s for s, n in Counter(stored).items() if n > 1)
            measured[device] = {"sent": len(sent), "stored": len(stored), "duplicates": len(duplicates)}
            assert duplicates == [], (device, duplicates)
            assert set(stored) == sent, (device, sorted(sent ^ set(stored)))
            assert store.gaps(fleet_name, device) == []
            # The agent's counter has no holes: telemetry, events and states together are contiguous.
            every = set(proxy.sent_seqs("", device))
            assert every == set(range(min(every), max(every) + 1)), device
    finally:
        print(f"\nmeasured (sent == stored): {json.dumps(measured)}")
        fleet.close()
        proxy.close()


def test_a_redelivered_telemetry_message_is_stored_once(store: Store, fleet_name: str) -> None:
    # The deterministic half of the test above: the same message twice (QoS 1 redelivery after a
    # broker restart), in one batch and in a later one, next to a late message that fills a gap.
    row = {"device_id": "r1", "ts": 1000.0, "count": 1}
    assert (
        store.add_telemetry(
            fleet_name, [{**row, "seq": 1}, {**row, "seq": 1}, {**row, "seq": 3, "ts": 1002.0}]
        )
        == 2
    )
    assert store.add_telemetry(fleet_name, [{**row, "seq": 1}, {**row, "seq": 2, "ts": 1001.0}]) == 1
    assert sorted(stored_seqs(store, fleet_name, "r1")) == [1, 2, 3]
    assert store.gaps(fleet_name, "r1") == []


# ---------------------------------------------------------------------------------------------------
# 3. the broker's queue limit drops messages for an absent ingest: the host sees the gap and says so

QUEUE_LIMIT = 5


def test_messages_dropped_at_the_broker_queue_limit_show_as_sequence_gaps(
    tmp_path: Path, mosquitto_factory: Any, fleet_name: str, store: Store, artifacts: dict[str, Path]
) -> None:
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from edgefleet.sdk.cli import app
    from edgefleet.sdk.server.app import create_app

    broker = mosquitto_factory(
        "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\n"
        "persistence_location {workdir}/\nautosave_interval 1\nlog_dest file {workdir}/mosquitto.log\n"
        f"max_queued_messages {QUEUE_LIMIT}\n"
    )
    ids = ["g1", "g2"]
    proxy = ChaosProxy(broker.port).start()
    fleet = Fleet(broker=broker.url, store=store, fleet=fleet_name, trusted_keys=[artifacts["key"]])
    ingest_id = f"ingest-{fleet_name}"
    extra = ("--config", _config(tmp_path), "--telemetry-interval", str(TELEMETRY_INTERVAL_S))
    measured: dict[str, Any] = {"max_queued_messages": QUEUE_LIMIT}
    try:
        fleet.start_ingest(client_id=ingest_id)
        with agents(tmp_path, proxy.url, fleet_name, artifacts["key"], ids, *extra):
            wait_online(store, fleet_name, fleet.options, ids)
            _run_for(0.5, proxy, ids)
            # act: the ingest is away while the agents publish far past the broker's queue limit
            fleet.close()
            offline_from = {d: max(proxy.sent_seqs("", d)) for d in ids}
            _run_for(3.0, proxy, ids)
            fleet.start_ingest(client_id=ingest_id)
            _run_for(1.0, proxy, ids)
        for device in ids:
            sent = set(proxy.sent_seqs("/telemetry", device))
            last = max(sent)
            wait_for(
                lambda d=device, n=last: n in set(stored_seqs(store, fleet_name, d)),
                30,
                f"the last telemetry of {device} in the store",
            )
        # assert: the store's gaps are exactly what was sent and never arrived, per device
        for device in ids:
            sent = set(proxy.sent_seqs("/telemetry", device))
            missing = sent - set(stored_seqs(store, fleet_name, device))
            assert missing, f"{device}: nothing was dropped; the queue limit did not bite"
            assert min(missing) > offline_from[device], (
                "only messages sent while the ingest was away are lost"
            )
            reported = [(g.first_missing, g.last_missing) for g in store.gaps(fleet_name, device)]
            assert reported == ranges(missing), device
            measured[device] = {"sent": len(sent), "missing": len(missing), "gaps": reported}
            # ... and the API and CLI say so
            with TestClient(create_app(store, fleet_name=fleet_name)) as client:
                body = client.get(f"/api/devices/{device}").json()
            assert body["missing_messages"] == len(missing)
            out = CliRunner().invoke(
                app, ["telemetry", device, "--db", str(store.engine.url), "--fleet", fleet_name, "--json"]
            )
            assert out.exit_code == 0, out.output
            cli_gaps = [(g["first_missing"], g["last_missing"]) for g in json.loads(out.output)["gaps"]]
            assert cli_gaps == reported
    finally:
        print(f"\nmeasured (queue limit): {json.dumps(measured)}")
        fleet.close()
        proxy.close()
