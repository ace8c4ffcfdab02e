"""The API against a live fleet: real Mosquitto, real agent processes, the control plane attached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store
from edgefleet.sdk.trust.bundle import pack
from tests.fleet_support import build_artifacts, wait_for, wait_online
from tests.server_live_support import Traffic, http_agents

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = ["dev-a", "dev-b", "dev-c"]
TAR = {"Content-Type": "application/x-tar"}


@pytest.fixture
def live(tmp_path: Path, mosquitto: Any, fleet_name: str) -> Iterator[dict[str, Any]]:
    """A fleet of three agents on its own broker, ingest running, and an API client with actions."""
    art = build_artifacts(tmp_path / "art")
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[art["key"]])
    fleet.start_ingest()
    with (
        http_agents(
            tmp_path / "agents", mosquitto.url, fleet_name, art["key"], DEVICES, "--eval-interval", "0.5"
        ) as ports,
        Traffic(ports),
    ):
        wait_online(store, fleet_name, fleet.options, DEVICES)
        app = create_app(store, fleet, bundle_dir=tmp_path / "bundles", trusted_keys=[art["key"]], poll_s=0.2)
        with TestClient(app) as client:
            yield {"client": client, "store": store, "fleet": fleet, "art": art, "tmp": tmp_path}
    fleet.close()
    store.close()


def upload(live: dict[str, Any], name: str) -> int:
    tar = pack(live["art"][name], live["tmp"] / f"{name}.tar")
    r = live["client"].post("/api/bundles", content=tar.read_bytes(), headers=TAR)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def wait_rollout(
    client: TestClient, rollout_id: str, statuses: set[str], timeout: float = 60.0
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        row: dict[str, Any] = client.get(f"/api/rollouts/{rollout_id}").json()
        return row if row["status"] in statuses else None

    return wait_for(reached, timeout, f"rollout {rollout_id} in {statuses}")


def test_upload_deploy_and_watch_through_the_api(live: dict[str, Any], fleet_name: str) -> None:
    client = live["client"]
    assert client.get("/api/health").json()["actions"] is True
    # act: upload a signed bundle, then roll it out with a canary
    bundle_id = upload(live, "v1")
    r = client.post(
        "/api/rollouts", json={"bundles": [bundle_id], "to": "all", "strategy": "canary:34", "soak_s": 0.5}
    )
    assert r.status_code == 202, r.text
    rollout_id = r.json()["id"]
    # assert: it finishes, every device runs v1, telemetry of v1 arrives
    done = wait_rollout(client, rollout_id, {"succeeded", "completed", "aborted"})
    assert done["status"] == "succeeded", done
    assert done["progress"]["succeeded"] == len(DEVICES)
    assert done["progress"]["fraction"] == 1.0
    wait_for(
        lambda: all(d["active_version"] == 1 for d in client.get("/api/devices").json()),
        30,
        "every device reporting v1",
    )
    versions = wait_for(
        lambda: [m for m in client.get("/api/models").json() if m["model_version"] == 1 and m["p95_ms"]],
        30,
        "telemetry of v1 with latency",
    )
    assert versions[0]["model_name"] == "tiny"
    series = client.get("/api/telemetry", params={"group_by": "device", "bucket_s": 1}).json()["series"]
    assert {s["key"] for s in series} >= set(DEVICES)
    metrics = client.get("/metrics").text
    assert f'edgefleet_device_online{{fleet="{fleet_name}",device="dev-a"' in metrics
    assert "edgefleet_inference_latency_seconds{" in metrics
    assert (
        f'edgefleet_rollout_state{{fleet="{fleet_name}",rollout="{rollout_id}",state="succeeded"}} 1'
        in metrics
    )


def test_abort_through_the_api_rolls_back(live: dict[str, Any]) -> None:
    client = live["client"]
    v1 = upload(live, "v1")
    first = client.post("/api/rollouts", json={"bundles": [v1], "to": "all"}).json()["id"]
    assert wait_rollout(client, first, {"succeeded", "completed", "aborted"})["status"] == "succeeded"
    v2 = upload(live, "v2")
    # a long soak holds the rollout after its first wave, so the abort lands mid-rollout
    r = client.post(
        "/api/rollouts", json={"bundles": [v2], "to": "all", "strategy": "waves:34,100", "soak_s": 60}
    )
    assert r.status_code == 202, r.text
    rollout_id = r.json()["id"]
    wait_for(
        lambda: client.get(f"/api/rollouts/{rollout_id}").json()["progress"]["by_status"].get("deployed"),
        60,
        "the first wave deployed",
    )
    # a second rollout to the same devices is refused while this one runs
    clash = client.post("/api/rollouts", json={"bundles": [v2], "to": "all"})
    assert clash.status_code == 409
    assert "already in a rollout" in clash.json()["detail"]
    # act
    r = client.post(f"/api/rollouts/{rollout_id}/abort", json={"reason": "operator stop"})
    assert r.status_code == 200
    # assert
    ended = wait_rollout(client, rollout_id, {"aborted"})
    assert ended["reason"] == "operator stop"
    statuses = {d["device_id"]: d["status"] for d in ended["devices"]}
    # the first wave was reached and rolled back; the last wave was never told
    assert set(statuses.values()) == {"rolled-back", "not-notified"}
    wait_for(
        lambda: all(d["active_version"] == 1 for d in client.get("/api/devices").json()),
        30,
        "every device back on v1",
    )
    again = client.post(f"/api/rollouts/{rollout_id}/abort")
    assert again.status_code == 409


def test_refusals_send_nothing(live: dict[str, Any]) -> None:
    client = live["client"]
    other_profile = upload(live, "v2-arm64")
    r = client.post("/api/rollouts", json={"bundles": [other_profile], "to": "all"})
    assert r.status_code == 422
    assert "no bundle for the profile" in r.json()["detail"]
    r = client.post("/api/rollouts", json={"bundles": [other_profile], "to": "tag:nope"})
    assert r.status_code == 422
    assert client.get("/api/rollouts").json() == []
    time.sleep(0.5)
    assert all(d["active_version"] is None for d in client.get("/api/devices").json())
