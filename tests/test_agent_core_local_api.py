"""Local HTTP endpoint: JSON and .npy inference, feedback, model info, and every bad request answered as JSON."""

from __future__ import annotations

import http.client
import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.local_api import LocalApi
from edgefleet.agent.server import ModelServer
from tests.agent_core_support import IN_FEATURES, predict, tiny_onnx


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("api") / "m.onnx")


@pytest.fixture(scope="module")
def api(model_path: Path) -> Iterator[LocalApi]:
    server = ModelServer(threads=1)
    server.activate(server.load(model_path, name="tiny", version=3, slot="a"))
    local = LocalApi(server, port=0, max_body_bytes=64 * 1024)
    local.start()
    yield local
    local.stop()


def call(
    api: LocalApi,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert set(doc["error"]) == {"code", "reason"} and doc["error"]["reason"]
    return dict(doc["error"])


def test_json_infer_and_feedback(api: LocalApi, model_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, IN_FEATURES)).astype(np.float32)
    status, headers, raw = call(api, "POST", "/v1/infer", json.dumps({"inputs": {"x": x.tolist()}}).encode())
    assert status == 200, raw
    doc = json.loads(raw)
    np.testing.assert_allclose(np.array(doc["outputs"]["logits"]), predict(model_path, x), rtol=1e-5)
    assert (doc["model"], doc["version"]) == ("tiny", 3) and headers["x-model-version"] == "3"
    # feedback needs one prediction per request id
    one = call(api, "POST", "/v1/infer", json.dumps({"inputs": x[:1].tolist()}).encode())
    rid = json.loads(one[2])["request_id"]
    status, _, raw = call(api, "POST", "/v1/feedback", json.dumps({"request_id": rid, "label": 1}).encode())
    assert (status, json.loads(raw)) == (200, {"ok": True})
    status, _, raw = call(api, "POST", "/v1/feedback", json.dumps({"request_id": rid, "label": 1}).encode())
    assert status == 404 and error_of(raw)["code"] == "unknown-request"


def test_npy_in_npy_out(api: LocalApi, model_path: Path) -> None:
    x = np.ones((3, IN_FEATURES), np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    status, headers, raw = call(
        api,
        "POST",
        "/v1/infer",
        buf.getvalue(),
        {"Content-Type": "application/x-npy", "Accept": "application/x-npy", "X-Request-Id": "abc"},
    )
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert headers["x-request-id"] == "abc" and headers["x-output-name"] == "logits"
    np.testing.assert_allclose(np.load(io.BytesIO(raw)), predict(model_path, x), rtol=1e-5)


def test_model_and_health(api: LocalApi) -> None:
    status, _, raw = call(api, "GET", "/v1/health")
    assert (status, json.loads(raw)) == (200, {"ok": True, "model": True})
    status, _, raw = call(api, "GET", "/v1/model")
    info = json.loads(raw)
    assert status == 200 and info["name"] == "tiny" and info["inputs"][0]["shape"] == [None, IN_FEATURES]


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "method, path, body, headers, status, code",
    [
        ("POST", "/v1/infer", b"{not json", {}, 400, "bad-input"),
        ("POST", "/v1/infer", b'{"x": 1}', {}, 400, "bad-input"),
        ("POST", "/v1/infer", b'{"inputs": {"x": [[1, 2]]}}', {}, 400, "bad-input"),
        ("POST", "/v1/infer", b'{"inputs": {"x": [[1], [1, 2]]}}', {}, 400, "bad-input"),
        ("POST", "/v1/infer", _pickled_npy(), {"Content-Type": "application/x-npy"}, 400, "bad-input"),
        ("POST", "/v1/infer", b"abc", {"Content-Type": "text/plain"}, 415, "unsupported-media-type"),
        ("POST", "/v1/infer", b"x" * 70_000, {}, 413, "too-large"),
        ("GET", "/v1/nothing", None, {}, 404, "not-found"),
        ("GET", "/v1/infer", None, {}, 405, "method-not-allowed"),
        ("POST", "/v1/feedback", b'{"request_id": 3}', {}, 400, "bad-input"),
    ],
    ids=["json", "no-inputs", "shape", "ragged", "pickle", "media", "size", "path", "method", "feedback"],
)
def test_bad_requests_answered_as_json(
    api: LocalApi,
    method: str,
    path: str,
    body: Optional[bytes],
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got, _, raw = call(api, method, path, body, headers)
    assert got == status
    assert error_of(raw)["code"] == code
    assert call(api, "GET", "/v1/health")[0] == 200  # still serving


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=300),
    kind=st.sampled_from(["application/json", "application/x-npy", "application/x-npz"]),
)
def test_fuzzed_bodies_never_crash(api: LocalApi, body: bytes, kind: str) -> None:
    status, _, raw = call(api, "POST", "/v1/infer", body, {"Content-Type": kind})
    assert status in (200, 400)
    if status == 400:
        error_of(raw)


def test_no_model_is_503_and_loopback_only() -> None:
    local = LocalApi(ModelServer(threads=1), port=0)
    local.start()
    try:
        status, _, raw = call(local, "POST", "/v1/infer", b'{"inputs": [[0, 0, 0, 0, 0, 0, 0, 0]]}')
        assert status == 503 and error_of(raw)["code"] == "no-model"
        assert call(local, "GET", "/v1/model")[0] == 503
    finally:
        local.stop()
    with pytest.raises(AgentError):
        LocalApi(ModelServer(threads=1), host="0.0.0.0")
