"""Rollout actions through the API: start/abort with a control plane attached, refusals without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from fastapi.testclient import TestClient
from server_data import fill_store

from edgefleet.sdk.server.actions import FleetAdapter
from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.server.errors import ServerConfigError
from edgefleet.sdk.store import Store


class RecordingActions:
    """A control plane stand-in that records calls and writes the rollout rows the real one would."""

    def __init__(self, store: Store, fleet: str) -> None:
        self.store = store
        self.fleet = fleet
        self.started: list[tuple[list[str], str, str, Optional[float], Optional[float]]] = []
        self.aborted: list[tuple[str, str]] = []

    def start_rollout(
        self,
        bundle_paths: list[str],
        selector: str,
        strategy: str,
        *,
        soak_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
    ) -> str:
        self.started.append((bundle_paths, selector, strategy, soak_s, timeout_s))
        rid = f"r{len(self.started)}"
        self.store.create_rollout(
            rid,
            fleet=self.fleet,
            selector=selector,
            strategy=strategy,
            settings={},
            targets=[("rpi4b-01", 1, 0)],
        )
        self.store.set_rollout_status(rid, "running")
        return rid

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        self.aborted.append((rollout_id, reason))
        self.store.set_rollout_status(rollout_id, "aborted", reason)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture
def filled(store: Store, fleet_name: str) -> dict[str, Any]:
    return fill_store(store, fleet_name)


@pytest.fixture
def actions(store: Store, fleet_name: str) -> RecordingActions:
    return RecordingActions(store, fleet_name)


@pytest.fixture
def client(
    store: Store, filled: dict[str, Any], actions: RecordingActions, fleet_name: str
) -> Iterator[TestClient]:
    with TestClient(create_app(store, actions, fleet_name=fleet_name)) as c:
        yield c


def test_health_says_actions_enabled(client: TestClient) -> None:
    assert client.get("/api/health").json()["actions"] is True


def test_start_rollout_passes_bundle_paths_and_options(
    client: TestClient, actions: RecordingActions, filled: dict[str, Any]
) -> None:
    # act
    r = client.post(
        "/api/rollouts",
        json={"bundles": filled["bundles"], "to": "profile:rpi4b", "strategy": "canary:25", "soak_s": 2},
    )
    # assert
    assert r.status_code == 202
    assert r.json()["id"] == "r1"
    assert r.json()["status"] == "running"
    assert actions.started == [
        (["/nonexistent/digits-v1", "/nonexistent/digits-v2"], "profile:rpi4b", "canary:25", 2.0, None)
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"bundles": [1], "to": "all", "strategy": "half"}, "canary:PCT"),
        ({"bundles": [1], "to": "all", "strategy": "waves:50,20"}, "must grow"),
        ({"bundles": [], "to": "all"}, "body field 'bundles'"),
        ({"to": "all"}, "body field 'bundles' is required"),
        ({"bundles": [1]}, "body field 'to' is required"),
        ({"bundles": [1], "to": "all", "soak_s": -1}, "body field 'soak_s'"),
        ({"bundles": ["x"], "to": "all"}, "body field 'bundles.0'"),
    ],
)
def test_bad_rollout_request_is_422(
    client: TestClient, actions: RecordingActions, body: dict[str, Any], needle: str
) -> None:
    r = client.post("/api/rollouts", json=body)
    assert r.status_code == 422
    assert needle in r.json()["detail"]
    assert actions.started == []


def test_rollout_with_unknown_bundle_is_422_and_sends_nothing(
    client: TestClient, actions: RecordingActions
) -> None:
    r = client.post("/api/rollouts", json={"bundles": [424242], "to": "all"})
    assert r.status_code == 422
    assert "424242" in r.json()["detail"]
    assert "POST /api/bundles" in r.json()["detail"]
    assert actions.started == []


def test_rollout_body_that_is_not_json_is_422(client: TestClient) -> None:
    r = client.post("/api/rollouts", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["detail"]


def test_abort_running_rollout(client: TestClient, actions: RecordingActions, filled: dict[str, Any]) -> None:
    running = filled["rollouts"][1]
    r = client.post(f"/api/rollouts/{running}/abort", json={"reason": "operator says stop"})
    assert r.status_code == 200
    assert r.json()["status"] == "aborted"
    assert r.json()["reason"] == "operator says stop"
    assert actions.aborted == [(running, "operator says stop")]


def test_abort_without_body_uses_default_reason(
    client: TestClient, actions: RecordingActions, filled: dict[str, Any]
) -> None:
    r = client.post(f"/api/rollouts/{filled['rollouts'][1]}/abort")
    assert r.status_code == 200
    assert actions.aborted[0][1] == "aborted from the API"


def test_abort_finished_rollout_is_409(
    client: TestClient, actions: RecordingActions, filled: dict[str, Any]
) -> None:
    r = client.post(f"/api/rollouts/{filled['rollouts'][0]}/abort")
    assert r.status_code == 409
    assert "already ended" in r.json()["detail"]
    assert actions.aborted == []


def test_abort_unknown_rollout_is_404(client: TestClient, actions: RecordingActions) -> None:
    r = client.post("/api/rollouts/missing/abort")
    assert r.status_code == 404
    assert actions.aborted == []


def test_actions_refused_without_fleet(store: Store, filled: dict[str, Any], fleet_name: str) -> None:
    with TestClient(create_app(store, fleet_name=fleet_name)) as c:
        r = c.post("/api/rollouts", json={"bundles": filled["bundles"], "to": "all"})
        assert r.status_code == 503
        assert "--broker" in r.json()["detail"]
        r = c.post(f"/api/rollouts/{filled['rollouts'][1]}/abort")
        assert r.status_code == 503
        # the rollout is untouched
        assert c.get(f"/api/rollouts/{filled['rollouts'][1]}").json()["status"] == "running"


class _RefusingFleet:
    """A fleet whose deploy refuses like the control plane does for bad input."""

    fleet = "refusing"

    def deploy(self, bundles: list[str], to: str, **options: Any) -> str:
        raise ValueError(f"unknown selector {to!r}: use a device id, tag:NAME, profile:NAME or all")

    def abort(self, rollout_id: str, reason: str = "") -> None:
        raise LookupError(f"no rollout {rollout_id!r}")


def test_fleet_refusals_become_4xx(store: Store) -> None:
    fill_store(store, "refusing")
    with TestClient(create_app(store, _RefusingFleet())) as c:
        assert c.get("/api/health").json()["fleet"] == "refusing"
        r = c.post("/api/rollouts", json={"bundles": [1], "to": "nonsense:x"})
        assert r.status_code == 422
        assert "unknown selector" in r.json()["detail"]
        r = c.post("/api/rollouts/refusing-r2/abort")
        assert r.status_code == 404


def test_object_without_fleet_methods_is_refused(store: Store) -> None:
    with pytest.raises(ServerConfigError, match="lacks"):
        FleetAdapter(object())
