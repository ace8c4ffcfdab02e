"""The API token: required beyond loopback, checked on every API and metrics request."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from fastapi.testclient import TestClient
from server_data import fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.server.auth import check_bind, is_loopback, resolve_token
from edgefleet.sdk.server.errors import ServerConfigError
from edgefleet.sdk.server.runner import ServerThread
from edgefleet.sdk.store import Store

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture
def store(tmp_path: Path, fleet_name: str) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fill_store(s, fleet_name)
    yield s
    s.close()


@pytest.fixture
def client(store: Store, fleet_name: str) -> Iterator[TestClient]:
    with TestClient(create_app(store, token=TOKEN, fleet_name=fleet_name)) as c:
        yield c


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("fleet.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_bind_beyond_loopback_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ServerConfigError, match="--token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ServerConfigError, match="at least 16"):
        check_bind("0.0.0.0", "short")


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_TOKEN", TOKEN)
    assert resolve_token(None) == TOKEN
    assert resolve_token("other-token-of-enough-length") == "other-token-of-enough-length"
    monkeypatch.setenv("EDGEFLEET_TOKEN", "  ")
    assert resolve_token(None) is None


def test_server_thread_refuses_public_bind_without_token(store: Store, fleet_name: str) -> None:
    with pytest.raises(ServerConfigError, match="refusing to listen"):
        ServerThread(create_app(store, fleet_name=fleet_name), host="0.0.0.0", port=free_port())


@pytest.mark.parametrize(
    "path",
    [
        "/api/devices",
        "/api/rollouts",
        "/api/bundles",
        "/api/telemetry",
        "/api/models",
        "/metrics",
        "/api/health",
    ],
)
def test_requests_without_token_are_401(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"]


def test_wrong_token_is_401_and_right_token_works(client: TestClient) -> None:
    r = client.get("/api/devices", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    assert "wrong" in r.json()["detail"]
    r = client.get("/api/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert len(r.json()) == 4


def test_token_in_query_only_for_the_event_stream(client: TestClient) -> None:
    # EventSource cannot send headers, so the stream alone takes ?access_token=
    r = client.get("/api/devices", params={"access_token": TOKEN})
    assert r.status_code == 401
    r = client.get("/api/events", params={"access_token": "wrong-token-wrong-token"})
    assert r.status_code == 401


def test_posts_need_the_token_too(client: TestClient) -> None:
    assert client.post("/api/rollouts", json={"bundles": [1], "to": "all"}).status_code == 401
    assert client.post("/api/rollouts/x/abort").status_code == 401
    assert client.post("/api/bundles", content=b"x").status_code == 401


def test_dashboard_and_docs_stay_public(client: TestClient) -> None:
    # they hold no fleet data; the page asks for the token when the API answers 401
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


def test_weak_token_refused_by_app_factory(store: Store) -> None:
    with pytest.raises(ServerConfigError):
        create_app(store, token="abc")


def test_cli_refuses_public_bind_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_TOKEN"}
    env["EDGEFLEET_HOME"] = str(tmp_path)
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr
    assert "Traceback" not in proc.stderr
