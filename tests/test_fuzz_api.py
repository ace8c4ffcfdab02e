"""Fuzz the REST API of `edgefleet serve` (hypothesis): random path parameters, query parameters and bodies.

Every endpoint of `create_app`, with a store holding a small fleet and a control plane attached (a real
`Fleet` whose broker is unreachable, so actions go as far as they can without sending anything). The
promise: never a 5xx, and every error is a JSON object whose `detail` says what was wrong. The live
stream (`GET /api/events`) never ends, so only its refusal without a token is fuzzed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_data import DEVICES, fill_store

from edgefleet.sdk.fleet.client import Fleet
from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store
from tests.conftest import free_port

pytestmark = [pytest.mark.chaos]

FUZZ = settings(
    # EDGEFLEET_FUZZ_EXAMPLES=1000 searches harder (a few minutes); CI runs the default.
    max_examples=int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TOKEN = "fuzz-token-0123456789abcdef"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A store holding a small fleet and one real bundle; an app with a control plane, one with a token."""
    from edgefleet.sdk.trust.bundle import pack
    from edgefleet.sdk.trust.keys import init_keys
    from tests.agent_net_support import eval_set, export_tiny_onnx, make_bundle

    tmp = tmp_path_factory.mktemp("fuzz-api")
    name = f"f{uuid.uuid4().hex[:10]}"
    store = Store(f"sqlite:///{tmp / 'fleet.db'}" if request.param == "sqlite" else PG_URL)
    filled = fill_store(store, name)
    keys = init_keys(tmp / "keys")
    model = export_tiny_onnx(tmp / "m.onnx")
    bundle = make_bundle(tmp / "b", tmp / "keys", model, eval_set(model, tmp / "e.npz"), version=1)
    # Nothing listens on this port: deploys get as far as the broker, then fail cleanly.
    fleet = Fleet(
        broker=f"mqtt://127.0.0.1:{free_port()}", store=store, fleet=name, trusted_keys=[keys.public_path]
    )
    common = {"bundle_dir": tmp / "bundles", "trusted_keys": [keys.public_path], "max_upload_bytes": 1 << 20}
    with (
        # A server error comes back as the 500 a client would see, not as an exception in the test.
        TestClient(
            create_app(store, fleet, fleet_name=name, **common), raise_server_exceptions=False
        ) as client,
        TestClient(
            create_app(store, None, TOKEN, fleet_name=name, **common), raise_server_exceptions=False
        ) as guarded,
    ):
        # The one real bundle goes in through the API itself, so rollouts can get past their bundle check.
        uploaded = client.post(
            "/api/bundles",
            content=pack(bundle, tmp / "b.tar").read_bytes(),
            headers={"Content-Type": "application/x-tar"},
        )
        assert uploaded.status_code in (200, 201), uploaded.text
        filled["bundles"].append(uploaded.json()["id"])
        yield {"client": client, "guarded": guarded, "filled": filled, "fleet": name}
    store.close()


def _check(response: Any, *, json_body: bool = True) -> None:
    """The API's contract for any input: no server error; errors are JSON with a non-empty `detail`.

    One 5xx is by design: 503 when an action needs the broker and the broker is down (this fixture's
    broker port has nothing behind it); its message must say so.
    """
    request = (response.request.method, str(response.request.url)[:300], response.text[:800])
    if response.status_code == 503:
        assert "broker" in response.json()["detail"], request
    else:
        assert response.status_code < 500, request
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("detail"), str), body
        assert body["detail"].strip(), body
    elif json_body:
        response.json()


# ---- strategies -----------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64]),
)
# Values that broke servers before: non-finite floats, numbers past 64 bits, NUL (PostgreSQL refuses it).
_edge = st.sampled_from(
    ["", "nan", "inf", "-inf", "1e999", "true", "null", "\x00", "a\x00b", str(2**63), str(2**31)]
)
_scalar = st.one_of(_text, _numbers.map(str), _edge)
# A query value: one scalar or a repeated parameter.
_query_value = st.one_of(_scalar, st.lists(_scalar, max_size=3))


def _path_segment() -> st.SearchStrategy[str]:
    """A path parameter as a client would send it: known ids, numbers, any text (percent-encoded)."""
    known = st.sampled_from([*DEVICES, "r-none", "1", "2", "0", "-1", "99999999999999999999999"])
    return st.one_of(known, _edge.filter(bool), _numbers.map(str), _text.filter(bool)).map(
        lambda s: quote(s, safe="")
    )


def _params(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the endpoint's own query parameters (random values) plus, sometimes, unknown ones."""
    own = st.dictionaries(st.sampled_from(names), _query_value, max_size=len(names)) if names else st.just({})
    return st.tuples(own, st.dictionaries(_text.filter(bool), _scalar, max_size=2)).map(
        lambda pair: {**pair[1], **pair[0]}
    )


_json = st.recursive(
    st.none() | st.booleans() | _numbers | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


def _dumps(value: Any) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity included (not valid JSON)."""
    return json.dumps(value, allow_nan=True).encode()


# ---- read endpoints -------------------------------------------------------------------------------

READS = {
    "/api/health": [],
    "/api/devices": [],
    "/api/events/recent": ["limit"],
    "/api/telemetry": ["device", "model", "version", "profile", "since", "window_s", "bucket_s", "group_by"],
    "/api/models": ["model"],
    "/api/compare": ["model", "a", "b", "since", "bucket_s"],
    "/api/bundles": ["name"],
    "/api/rollouts": ["status", "limit"],
}
READS_WITH_ID = {
    "/api/devices/{}": ["events"],
    "/api/devices/{}/events": ["limit"],
    "/api/devices/{}/telemetry": ["since", "bucket_s", "latest"],
    "/api/bundles/{}": [],
    "/api/rollouts/{}": [],
}


@pytest.mark.parametrize("path", sorted(READS))
@FUZZ
@given(data=st.data())
def test_read_endpoints_never_fail_on_any_query(
    served: dict[str, Any], path: str, data: st.DataObject
) -> None:
    params = data.draw(_params(READS[path]))
    _check(served["client"].get(path, params=params))


@pytest.mark.parametrize("template", sorted(READS_WITH_ID))
@FUZZ
@given(data=st.data())
def test_read_endpoints_never_fail_on_any_path_parameter(
    served: dict[str, Any], template: str, data: st.DataObject
) -> None:
    segment = data.draw(_path_segment())
    params = data.draw(_params(READS_WITH_ID[template]))
    _check(served["client"].get(template.format(segment), params=params))


@FUZZ
@given(
    path=st.lists(_text.filter(bool), min_size=1, max_size=4),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
def test_unknown_paths_and_methods_are_json_errors(
    served: dict[str, Any], path: list[str], method: str
) -> None:
    url = "/api/" + "/".join(quote(p, safe="") for p in path)
    _check(served["client"].request(method, url))


def test_metrics_and_dashboard_answer(served: dict[str, Any]) -> None:
    client = served["client"]
    _check(client.get("/metrics"), json_body=False)
    assert "edgefleet_up" in client.get("/metrics").text
    _check(client.get("/"), json_body=False)
    _check(client.get("/static/../../etc/passwd"), json_body=False)


# ---- actions --------------------------------------------------------------------------------------

_strategy_text = st.one_of(
    st.sampled_from(
        ["all", "canary:10", "canary:0", "canary:101", "waves:10,50,100", "waves:", "waves:50,10"]
    ),
    _text,
)
_seconds = st.one_of(st.none(), _numbers, st.floats(min_value=0, max_value=1e6))
_selector = st.one_of(
    st.sampled_from(["all", "rpi4b-01", "tag:lab", "profile:rpi5", "nope:x", "tag:"]), _text
)


@FUZZ
@given(data=st.data())
def test_start_rollout_with_well_typed_bodies(served: dict[str, Any], data: st.DataObject) -> None:
    ids = st.one_of(st.sampled_from(served["filled"]["bundles"]), st.integers(-(2**70), 2**70))
    body = data.draw(
        st.fixed_dictionaries(
            {"bundles": st.lists(ids, min_size=1, max_size=3), "to": _selector},
            optional={"strategy": _strategy_text, "soak_s": _seconds, "timeout_s": _seconds},
        )
    )
    r = served["client"].post(
        "/api/rollouts", content=_dumps(body), headers={"Content-Type": "application/json"}
    )
    _check(r)
    assert r.status_code != 202, "nothing can start: the broker is unreachable"


_loose_rollout = st.fixed_dictionaries(
    {},
    optional={
        "bundles": _json,
        "to": _json,
        "strategy": _json,
        "soak_s": _json,
        "timeout_s": _json,
        "x": _json,
    },
)


@FUZZ
@given(
    body=st.one_of(_loose_rollout, _json),
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_start_rollout_with_any_body(served: dict[str, Any], body: Any, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = served["client"].post("/api/rollouts", content=_dumps(body), headers=headers)
    _check(r)
    assert r.status_code != 202


@FUZZ
@given(
    segment=_path_segment(),
    body=st.one_of(st.none(), st.fixed_dictionaries({}, optional={"reason": st.one_of(_text, _json)}), _json),
)
def test_abort_with_any_id_and_body(served: dict[str, Any], segment: str, body: Any) -> None:
    rollouts = served["filled"]["rollouts"]
    target = segment if segment not in ("1", "2") else quote(rollouts[int(segment) - 1], safe="")
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"content": _dumps(body), "headers": {"Content-Type": "application/json"}}
    _check(served["client"].post(f"/api/rollouts/{target}/abort", **kwargs))


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_member_name = st.one_of(
    st.sampled_from(
        ["manifest.json", "signature.json", "model.onnx", "eval.npz", "../escape", "/abs", "a/../../b"]
    ),
    _text.filter(lambda s: bool(s.strip("/")) and "\x00" not in s),
)
_member_data = st.one_of(st.binary(max_size=512), _json.map(_dumps))
_upload = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.tuples(_member_name, _member_data), max_size=4).map(_tar),
)


@FUZZ
@given(body=_upload, content_type=st.sampled_from(["application/x-tar", "application/json", "text/plain"]))
def test_bundle_upload_with_any_bytes(served: dict[str, Any], body: bytes, content_type: str) -> None:
    r = served["client"].post("/api/bundles", content=body, headers={"Content-Type": content_type})
    _check(r)
    assert r.status_code not in (200, 201), "nothing unsigned can be stored"


# ---- auth -----------------------------------------------------------------------------------------


@FUZZ
@given(
    header=st.one_of(st.none(), _text.map(lambda t: f"Bearer {t}"), _text),
    path=st.sampled_from(["/api/devices", "/api/rollouts", "/metrics", "/api/events"]),
    query_token=st.one_of(st.none(), _text),
)
def test_a_wrong_or_missing_token_is_always_a_json_401(
    served: dict[str, Any], header: str | None, path: str, query_token: str | None
) -> None:
    headers: dict[str, bytes] = {}
    if header is not None:
        # Raw bytes: a client may send any octets in a header, not only ASCII.
        headers["Authorization"] = header.encode("utf-8").replace(b"\r", b" ").replace(b"\n", b" ")
    params = {} if query_token is None else {"access_token": query_token}
    r = served["guarded"].get(path, headers=headers, params=params)
    _check(r)
    # A NUL in the query is refused before anything else (it cannot name anything).
    assert r.status_code == 401 or (r.status_code == 422 and "\x00" in (query_token or "")), r.text
