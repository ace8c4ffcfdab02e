"""REST API of `edgefleet serve` against a store the test fills: every read endpoint, and bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from server_data import DEVICES, fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture
def filled(store: Store, fleet_name: str) -> dict[str, Any]:
    return fill_store(store, fleet_name)


@pytest.fixture
def client(store: Store, filled: dict[str, Any], fleet_name: str) -> Iterator[TestClient]:
    with TestClient(create_app(store, fleet_name=fleet_name)) as c:
        yield c


def test_health_says_read_only_without_fleet(client: TestClient, fleet_name: str) -> None:
    body = client.get("/api/health").json()
    assert body["ok"] is True
    assert body["fleet"] == fleet_name
    assert body["actions"] is False


def test_devices_list_every_device_with_model_and_latest_telemetry(client: TestClient) -> None:
    # act
    devices = client.get("/api/devices").json()
    # assert
    assert [d["device_id"] for d in devices] == sorted(DEVICES)
    by_id = {d["device_id"]: d for d in devices}
    assert by_id["rpi4b-01"]["active_model"] == "digits"
    assert by_id["rpi4b-01"]["active_version"] == 2
    assert by_id["orin-01"]["online"] is False
    assert by_id["rpi4b-01"]["latest"]["model_version"] == 2
    assert by_id["rpi4b-01"]["latest"]["p95_ms"] == pytest.approx(3.0)
    # rpi5-01 should run v3 but reports v2: desired differs from reported
    assert by_id["rpi5-01"]["differs"] is True
    assert by_id["rpi4b-01"]["differs"] is False


def test_device_detail_has_events_and_gap_count(client: TestClient) -> None:
    body = client.get("/api/devices/rpi4b-02").json()
    assert body["device_id"] == "rpi4b-02"
    # its sequence jumped by 2 once when it switched to v2
    assert body["missing_messages"] == 2
    assert client.get("/api/devices/rpi4b-01").json()["events"][0]["kind"] == "deployed"


def test_unknown_device_is_404_naming_known_devices(client: TestClient) -> None:
    for path in ("/api/devices/ghost", "/api/devices/ghost/events", "/api/devices/ghost/telemetry"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "ghost" in r.json()["detail"]
        assert "rpi4b-01" in r.json()["detail"]
    r = client.get("/api/telemetry", params={"device": "ghost"})
    assert r.status_code == 404


def test_device_events_newest_first(client: TestClient, store: Store, fleet_name: str) -> None:
    store.add_event(fleet_name, "rpi5-01", "rejected", {"type": "rejected", "code": "health"})
    events = client.get("/api/devices/rpi5-01/events").json()
    assert [e["kind"] for e in events] == ["rejected", "progress"]
    recent = client.get("/api/events/recent", params={"limit": 1}).json()
    assert len(recent) == 1
    assert recent[0]["kind"] == "rejected"


def test_telemetry_series_grouped_by_device_version_profile(client: TestClient) -> None:
    by_device = client.get("/api/telemetry", params={"group_by": "device", "bucket_s": 10}).json()
    assert {s["key"] for s in by_device["series"]} == set(DEVICES)
    assert all(len(s["points"]) >= 6 for s in by_device["series"])
    by_version = client.get("/api/telemetry", params={"group_by": "version", "bucket_s": 3600}).json()
    assert [s["label"] for s in by_version["series"]] == ["digits v2", "digits v1"]
    by_profile = client.get("/api/telemetry", params={"group_by": "profile", "profile": "rpi5"}).json()
    assert [s["key"] for s in by_profile["series"]] == ["rpi5"]
    point = by_profile["series"][0]["points"][0]
    assert point["p95_ms"] in (pytest.approx(2.0), pytest.approx(1.5), pytest.approx(1.75))


def test_telemetry_window_filters_old_points(client: TestClient, filled: dict[str, Any]) -> None:
    everything = client.get("/api/telemetry", params={"bucket_s": 1}).json()["series"][0]["points"]
    recent = client.get("/api/telemetry", params={"bucket_s": 1, "window_s": 45}).json()["series"][0][
        "points"
    ]
    assert 0 < len(recent) < len(everything)


def test_device_telemetry_per_version(client: TestClient) -> None:
    body = client.get("/api/devices/rpi4b-01/telemetry", params={"bucket_s": 3600, "latest": 2}).json()
    versions = {s["model_version"]: s for s in body["series"]}
    assert set(versions) == {1, 2}
    assert versions[1]["points"][0]["p95_ms"] == pytest.approx(4.0)
    assert versions[2]["points"][0]["p95_ms"] == pytest.approx(3.0)
    assert len(body["latest"]) == 2


def test_models_and_compare_side_by_side(client: TestClient) -> None:
    models = client.get("/api/models").json()
    assert [(m["model_name"], m["model_version"]) for m in models] == [("digits", 2), ("digits", 1)]
    assert models[0]["devices"] == 4
    assert models[0]["count"] == 4 * 6 * 100
    cmp = client.get("/api/compare").json()
    # defaults: the newest version as B, the one before as A
    assert cmp["a"]["summary"]["model_version"] == 1
    assert cmp["b"]["summary"]["model_version"] == 2
    # v2 is faster and more accurate on every profile in the data
    assert cmp["b"]["summary"]["p95_ms"] < cmp["a"]["summary"]["p95_ms"]
    assert cmp["b"]["summary"]["accuracy"] == pytest.approx(0.98)
    # quality by the vocabulary's names: the labelled data scores accuracy, nothing scored the others
    assert (cmp["b"]["summary"]["agreement"], cmp["b"]["summary"]["fidelity"]) == (None, None)
    assert (
        cmp["b"]["points"][0]["accuracy"] == pytest.approx(0.98)
        and "eval_accuracy" not in cmp["b"]["points"][0]
    )
    assert cmp["a"]["points"]
    assert cmp["b"]["points"]


def test_compare_unknown_version_or_model_is_404(client: TestClient) -> None:
    r = client.get("/api/compare", params={"a": 7})
    assert r.status_code == 404
    assert "version 7" in r.json()["detail"]
    assert "[1, 2]" in r.json()["detail"]
    r = client.get("/api/compare", params={"model": "resnet"})
    assert r.status_code == 404
    assert "digits" in r.json()["detail"]


def test_rollouts_list_and_progress(client: TestClient, filled: dict[str, Any]) -> None:
    done_id, running_id = filled["rollouts"]
    rollouts = client.get("/api/rollouts").json()
    assert [r["id"] for r in rollouts] == [running_id, done_id]
    done = client.get(f"/api/rollouts/{done_id}").json()
    assert done["status"] == "succeeded"
    assert done["finished"] is True
    assert done["progress"] == {
        "total": 4,
        "finished": 4,
        "succeeded": 4,
        "by_status": {"deployed": 4},
        "fraction": 1.0,
        "summary": "4 deployed",
    }
    running = client.get(f"/api/rollouts/{running_id}").json()
    assert running["progress"]["fraction"] == 0.0
    assert running["finished"] is False
    only_running = client.get("/api/rollouts", params={"status": "running"}).json()
    assert [r["id"] for r in only_running] == [running_id]


def test_rollout_without_device_rows_keeps_the_progress(client: TestClient, filled: dict[str, Any]) -> None:
    # prepare
    done_id, running_id = filled["rollouts"]
    # act: the frequent poll's form, and the full one
    for rollout_id in (done_id, running_id):
        light = client.get(f"/api/rollouts/{rollout_id}", params={"devices": "false"}).json()
        full = client.get(f"/api/rollouts/{rollout_id}").json()
        # assert: the same rollout and progress, counted in SQL instead of from the rows
        assert "devices" not in light and len(full["devices"]) == full["progress"]["total"]
        assert light["progress"] == full["progress"]
        assert {k: v for k, v in full.items() if k not in ("devices",)} == light


def test_unknown_rollout_is_404(client: TestClient) -> None:
    r = client.get("/api/rollouts/nope")
    assert r.status_code == 404
    assert "GET /api/rollouts" in r.json()["detail"]
    r = client.get("/api/rollouts/nope", params={"devices": "false"})
    assert r.status_code == 404


def test_bundles_list_and_detail(client: TestClient, filled: dict[str, Any]) -> None:
    bundles = client.get("/api/bundles").json()
    assert [(b["name"], b["version"]) for b in bundles] == [("digits", 2), ("digits", 1)]
    assert "manifest" not in bundles[0]
    assert bundles[0]["format"] == "onnx"
    one = client.get(f"/api/bundles/{filled['bundles'][0]}").json()
    assert one["manifest"]["version"] == 1
    assert client.get("/api/bundles", params={"name": "other"}).json() == []


@pytest.mark.parametrize(
    ("path", "params", "where"),
    [
        ("/api/telemetry", {"bucket_s": 0}, "query parameter 'bucket_s'"),
        ("/api/telemetry", {"bucket_s": "fast"}, "query parameter 'bucket_s'"),
        ("/api/telemetry", {"group_by": "planet"}, "query parameter 'group_by'"),
        ("/api/telemetry", {"version": -1}, "query parameter 'version'"),
        ("/api/bundles/abc", {}, "path parameter 'bundle_id'"),
        ("/api/rollouts", {"limit": 0}, "query parameter 'limit'"),
        ("/api/devices/rpi4b-01/events", {"limit": 0}, "query parameter 'limit'"),
    ],
)
def test_bad_query_is_422_naming_the_parameter(
    client: TestClient, path: str, params: dict[str, Any], where: str
) -> None:
    r = client.get(path, params=params)
    assert r.status_code == 422
    body = r.json()
    assert where in body["detail"]
    assert body["errors"]


def test_since_and_window_together_is_422(client: TestClient) -> None:
    r = client.get("/api/telemetry", params={"since": 0, "window_s": 60})
    assert r.status_code == 422
    assert "not both" in r.json()["detail"]


def test_bundle_404_and_unknown_endpoint(client: TestClient) -> None:
    assert "GET /api/bundles" in client.get("/api/bundles/999").json()["detail"]
    r = client.get("/api/nothing-here")
    assert r.status_code == 404
    assert "/docs" in r.json()["detail"]
    r = client.delete("/api/devices")
    assert r.status_code == 405
    assert "DELETE" in r.json()["detail"]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/devices",
        "/api/devices/{device_id}",
        "/api/bundles",
        "/api/rollouts",
        "/api/rollouts/{rollout_id}/abort",
        "/api/telemetry",
        "/api/compare",
        "/api/events",
        "/metrics",
    ):
        assert path in paths, path
    assert client.get("/docs").status_code == 200


def test_dashboard_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="fleet-table"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200, asset
    # no CDN: nothing may be fetched from elsewhere at run time
    assert "http://" not in page.text.replace("http://www.w3.org", "")
    assert "https://" not in page.text
    assert "https://" not in client.get("/static/app.js").text


def test_empty_store_serves_empty_views(store: Store, fleet_name: str) -> None:
    with TestClient(create_app(store, fleet_name=fleet_name)) as c:
        assert c.get("/api/devices").json() == []
        assert c.get("/api/rollouts").json() == []
        assert c.get("/api/models").json() == []
        assert c.get("/api/telemetry").json()["series"][0]["points"] == []
        assert c.get("/api/compare").status_code == 404
        assert c.get("/metrics").status_code == 200


def test_nan_from_a_device_does_not_break_json(client: TestClient, store: Store, fleet_name: str) -> None:
    store.add_telemetry(
        fleet_name,
        [
            {
                "device_id": "rpi4b-01",
                "ts": 4e9,
                "seq": 10_000,
                "model_name": "digits",
                "model_version": 2,
                "count": 1,
                "p95_ms": float("nan"),
                "eval_accuracy": float("inf"),
            }
        ],
    )
    r = client.get("/api/devices/rpi4b-01")
    assert r.status_code == 200
    assert r.json()["latest"]["p95_ms"] is None
