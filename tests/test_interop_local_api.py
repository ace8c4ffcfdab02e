"""The local API as the README calls it: `curl -d '{...}'` sends a form content type, and JSON still works."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

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


def _post(api: LocalApi, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
def test_a_json_body_is_read_whatever_the_content_type(
    api: LocalApi, model_path: Path, content_type: str
) -> None:
    # prepare
    x = np.random.default_rng(1).standard_normal((1, IN_FEATURES)).astype(np.float32)
    # act
    status, raw = _post(api, json.dumps({"inputs": x.tolist()}).encode(), content_type)
    # assert
    assert status == 200, raw
    np.testing.assert_allclose(
        np.array(json.loads(raw)["outputs"]["logits"]), predict(model_path, x), rtol=1e-5
    )


def test_a_body_that_is_not_json_under_an_unknown_type_is_still_415(api: LocalApi) -> None:
    # act
    status, raw = _post(api, b"inputs=1,2,3", "application/x-www-form-urlencoded")
    # assert
    assert status == 415 and json.loads(raw)["error"]["code"] == "unsupported-media-type"


def test_the_readme_curl_line_answers(api: LocalApi) -> None:
    # prepare
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not on PATH")
    row = ", ".join("0.1" for _ in range(IN_FEATURES))
    # act: the README's line, as typed (curl picks application/x-www-form-urlencoded for -d)
    out = subprocess.run(
        [
            curl,
            "-s",
            "-w",
            "\n%{http_code}",
            f"localhost:{api.port}/v1/infer",
            "-d",
            f'{{"inputs": [[{row}]]}}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, code = out.rsplit("\n", 1)
    # assert
    assert code == "200", body
    assert json.loads(body)["model"] == "tiny"
