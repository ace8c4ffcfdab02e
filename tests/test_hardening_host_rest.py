"""REST hardening (issue 15 point 6): non-finite numbers, unbounded lists, the dashboard's CSP header."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from fastapi.testclient import TestClient
from server_data import fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store


class RecordingActions:
    """A control plane stand-in: records what reaches it (nothing may, for a refused request)."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, ...]] = []

    def start_rollout(
        self,
        bundle_paths: list[str],
        selector: str,
        strategy: str,
        *,
        soak_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
        gates: Optional[dict[str, float]] = None,
    ) -> str:
        self.started.append((bundle_paths, selector, strategy, soak_s, timeout_s, gates))
        return "r1"

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        raise AssertionError("not called here")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture
def actions() -> RecordingActions:
    return RecordingActions()


@pytest.fixture
def client(store: Store, actions: RecordingActions, fleet_name: str) -> Iterator[TestClient]:
    fill_store(store, fleet_name)
    with TestClient(create_app(store, actions, fleet_name=fleet_name)) as c:
        yield c


def _post_raw(client: TestClient, path: str, text: str) -> Any:
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("timeout_s", "1e309"),
        ("soak_s", "1e309"),
        ("timeout_s", "NaN"),
        ("soak_s", "Infinity"),
        ("min_accuracy", "NaN"),
        ("min_fidelity", "-Infinity"),
    ],
)
def test_a_non_finite_number_in_a_rollout_request_is_422(
    client: TestClient, actions: RecordingActions, field: str, literal: str
) -> None:
    # prepare: JSON as a client sends it (Python's json accepts NaN/Infinity and turns 1e309 into inf)
    text = f'{{"bundles": [1], "to": "all", "{field}": {literal}}}'
    # act
    r = _post_raw(client, "/api/rollouts", text)
    # assert
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    assert "finite" in r.json()["detail"]
    assert actions.started == []


@pytest.mark.parametrize("literal", ["inf", "nan", "1e309", "-Infinity"])
def test_a_non_finite_number_in_a_query_is_422(client: TestClient, literal: str) -> None:
    # act
    r = client.get(f"/api/telemetry?since={literal}")
    # assert
    assert r.status_code == 422, r.text
    assert "since" in r.json()["detail"]
    assert "finite" in r.json()["detail"]


def test_finite_numbers_still_pass(client: TestClient, actions: RecordingActions) -> None:
    # act
    r = _post_raw(client, "/api/rollouts", '{"bundles": [1], "to": "all", "timeout_s": 1e300}')
    series = client.get("/api/telemetry?since=0")
    # assert
    assert r.status_code == 202, r.text
    assert actions.started and actions.started[0][4] == 1e300
    assert series.status_code == 200


def test_a_huge_bundles_list_is_refused_quickly(client: TestClient, actions: RecordingActions) -> None:
    # prepare: 2 million ids (the fuzzer's case ran past 120 s)
    text = '{"to": "all", "bundles": [' + ",".join(["1"] * 2_000_000) + "]}"
    # act
    started = time.monotonic()
    r = _post_raw(client, "/api/rollouts", text)
    took = time.monotonic() - started
    # assert
    assert r.status_code in (413, 422), r.text
    assert "bundles" in r.json()["detail"] or "too large" in r.json()["detail"]
    assert took < 10, f"refusing took {took:.1f} s"
    assert actions.started == []


def test_a_long_bundles_list_under_the_body_cap_is_422(client: TestClient, actions: RecordingActions) -> None:
    # act: 1,000 ids are a small body but far more than one bundle per target profile
    r = client.post("/api/rollouts", json={"to": "all", "bundles": [1] * 1000})
    # assert
    assert r.status_code == 422, r.text
    assert "bundles" in r.json()["detail"]
    assert actions.started == []


def test_the_dashboard_is_sent_with_a_content_security_policy(client: TestClient) -> None:
    # act
    page = client.get("/")
    script = client.get("/static/app.js")
    # assert
    csp = page.headers.get("content-security-policy", "")
    assert page.status_code == 200
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in csp
    assert "object-src 'none'" in csp
    assert script.headers.get("content-security-policy") == csp
    assert page.headers.get("x-content-type-options") == "nosniff"
