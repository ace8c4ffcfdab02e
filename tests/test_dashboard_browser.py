"""The dashboard in headless Chromium: fleet table, live rollout progress, charts, compare, abort; no reloads."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import free_port
from server_data import fill_store

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.server.runner import ServerThread
from edgefleet.sdk.store import Store

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAR = {"Content-Type": "application/x-tar"}
DOCS = Path(__file__).resolve().parent.parent / "docs"
# The tracked screenshot is rewritten only when asked (`EDGEFLEET_UPDATE_SCREENSHOT=1 pytest ...`); a
# normal run writes it into the test's tmp_path, so running the tests leaves the checkout clean.
UPDATE_SCREENSHOT = "EDGEFLEET_UPDATE_SCREENSHOT"


def screenshot(page: Any, tmp_path: Path) -> Path:
    """Take the full-page screenshot: into docs/ when $EDGEFLEET_UPDATE_SCREENSHOT=1, else into tmp_path."""
    target = (
        DOCS / "dashboard.png" if os.environ.get(UPDATE_SCREENSHOT) == "1" else tmp_path / "dashboard.png"
    )
    target.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 0
    return target


@pytest.fixture(autouse=True)
def docs_untouched() -> Iterator[None]:
    """Fail a test that rewrote the tracked docs/dashboard.png without being asked to."""
    tracked = DOCS / "dashboard.png"
    before = tracked.read_bytes() if tracked.exists() else None
    yield
    if os.environ.get(UPDATE_SCREENSHOT) != "1":
        after = tracked.read_bytes() if tracked.exists() else None
        assert after == before, "the test rewrote docs/dashboard.png; write screenshots into tmp_path"


def wait_js(page: Any, expression: str, arg: Any = None, timeout: int = 15000) -> None:
    """Poll a JS predicate from Python: the page's CSP forbids eval, which `wait_for_function` needs."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(
        expression if expression.lstrip().startswith("(") else f"() => ({expression})", arg
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} ms waiting for {expression}")
        time.sleep(0.1)


def wait_text(page: Any, selector: str, text: str, timeout_ms: int = 15000) -> None:
    """Wait until the element's text is `text` (the page updates it live)."""
    wait_js(
        page,
        "([sel, want]) => { const n = document.querySelector(sel); return !!n && n.textContent === want; }",
        arg=[selector, text],
        timeout=timeout_ms,
    )


class StoreActions:
    """Control-plane stand-in for the store-only dashboard test: abort writes what the engine would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.aborted: list[str] = []

    def start_rollout(
        self,
        bundle_paths: list[str],
        selector: str,
        strategy: str,
        *,
        soak_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
    ) -> str:
        raise ValueError("this test starts no rollouts")

    def abort_rollout(self, rollout_id: str, reason: str) -> None:
        self.aborted.append(rollout_id)
        rollout = self.store.rollout(rollout_id)
        assert rollout is not None
        for dev in rollout["devices"]:
            self.store.set_rollout_device(rollout_id, dev["device_id"], "rolled-back", reason)
        self.store.set_rollout_status(rollout_id, "aborted", reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is missing: apt-get install -y chromium chromium-driver (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def setup(
    tmp_path: Path, fleet_name: str
) -> Iterator[tuple[ServerThread, Store, StoreActions, dict[str, Any]]]:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    filled = fill_store(store, fleet_name, windows=20)
    actions = StoreActions(store)
    app = create_app(store, actions, fleet_name=fleet_name, poll_s=0.2)
    with ServerThread(app, port=free_port()) as srv:
        yield srv, store, actions, filled
    store.close()


def test_dashboard_live(
    browser: Any,
    setup: tuple[ServerThread, Store, StoreActions, dict[str, Any]],
    fleet_name: str,
    tmp_path: Path,
) -> None:
    srv, store, actions, filled = setup
    running_id = filled["rollouts"][1]
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The dashboard is served with a Content-Security-Policy: anything it blocks is an error here.
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(srv.url + "/")
    # The page marks itself so a reload would be visible: the marker must survive every update.
    page.evaluate("window.__noReload = 42")

    # fleet table: every device with its model version
    page.wait_for_selector("#fleet-table tr[data-device='rpi4b-01']")
    page.wait_for_selector("#live.on")
    assert page.inner_text("#fleet-name") == fleet_name
    rows = page.locator("#fleet-table tbody tr[data-device]")
    assert rows.count() == 4
    assert page.inner_text("#fleet-table tr[data-device='rpi4b-01'] td.model") == "digits v2"
    assert "→ digits v3" in page.inner_text("#fleet-table tr[data-device='rpi5-01'] td.model")

    # charts have data points, per device and per model version
    page.wait_for_selector("#chart-latency-device circle.pt")
    before = page.locator("#chart-latency-device circle.pt").count()
    assert before > 0
    assert page.locator("#chart-latency-version g.series").count() == 2
    assert page.locator("#chart-quality-device circle.pt").count() > 0

    # two versions side by side
    page.wait_for_selector("#compare table")
    assert page.inner_text("#compare tr[data-field='p95_ms'] td.b") != "–"
    assert page.locator("#compare tr[data-field='p95_ms'] td.b.better").count() == 1

    # a rollout's progress moves to done without a reload
    card = f"#rollouts .rollout[data-rollout='{running_id}']"
    page.wait_for_selector(card + "[data-status='running']")
    assert page.inner_text(card + " .progress-text") == "0/1 finished"
    store.set_rollout_device(running_id, "rpi5-01", "deployed")
    store.set_rollout_status(running_id, "succeeded")
    page.wait_for_selector(card + "[data-status='succeeded']", timeout=15000)
    wait_text(page, card + " .progress-text", "1/1 finished")

    # new telemetry shows up in the chart
    now = time.time()
    store.add_telemetry(
        fleet_name,
        [
            {
                "device_id": "rpi4b-01",
                "ts": now + 30 + i * 10,
                "seq": 1000 + i,
                "model_name": "digits",
                "model_version": 2,
                "count": 50,
                "p95_ms": 3.1,
                "accuracy": 0.98,
            }
            for i in range(3)
        ],
    )
    wait_js(
        page, f"document.querySelectorAll('#chart-latency-device circle.pt').length > {before}", timeout=15000
    )

    # an abort shows up: start a rollout in the store, click Abort on its card
    store.create_rollout(
        "canary-7",
        fleet=fleet_name,
        selector="all",
        strategy="canary:25",
        settings={},
        targets=[("rpi4b-01", filled["bundles"][1], 0), ("rpi4b-02", filled["bundles"][1], 1)],
    )
    store.set_rollout_status("canary-7", "running")
    store.set_rollout_device("canary-7", "rpi4b-01", "deployed")
    abort_card = "#rollouts .rollout[data-rollout='canary-7']"
    page.wait_for_selector(abort_card + " button.danger", timeout=15000)
    # the rollout's rows are written one by one: wait until the page shows the last of them
    wait_text(page, abort_card + " .progress-text", "1/2 finished")
    page.click(abort_card + " button.danger")
    page.wait_for_selector(abort_card + "[data-status='aborted']", timeout=15000)
    assert "aborted from the dashboard" in page.inner_text(abort_card + " .reason")
    assert actions.aborted == ["canary-7"]
    assert page.locator(abort_card + " button.danger").count() == 0

    assert page.evaluate("window.__noReload") == 42
    assert errors == []
    screenshot(page, tmp_path)


def test_dashboard_asks_for_the_token(browser: Any, tmp_path: Path, fleet_name: str) -> None:
    token = "browser-token-0123456789abcdef"
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fill_store(store, fleet_name)
    app = create_app(store, token=token, fleet_name=fleet_name, poll_s=0.2)
    try:
        with ServerThread(app, port=free_port(), token=token) as srv:
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_selector("#token-form:not(.hidden)")
            assert page.locator("#fleet-table tr[data-device]").count() == 0
            page.fill("#token-input", token)
            page.click("#token-form button")
            page.wait_for_selector("#fleet-table tr[data-device='rpi4b-01']")
            page.wait_for_selector("#live.on")
    finally:
        store.close()


@pytest.mark.broker
@pytest.mark.slow
def test_dashboard_against_a_live_fleet(
    browser: Any, tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    """Real agents on a real broker, the control plane attached: deploy, watch, abort from the page."""
    import httpx

    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.trust.bundle import pack
    from tests.fleet_support import build_artifacts, wait_for, wait_online
    from tests.server_live_support import Traffic, http_agents

    devices = ["pi-1", "pi-2", "pi-3"]
    art = build_artifacts(tmp_path / "art")
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    fleet = Fleet(broker=mosquitto.url, store=store, fleet=fleet_name, trusted_keys=[art["key"]])
    fleet.start_ingest()
    try:
        with (
            http_agents(
                tmp_path / "agents", mosquitto.url, fleet_name, art["key"], devices, "--eval-interval", "0.5"
            ) as ports,
            Traffic(ports),
        ):
            wait_online(store, fleet_name, fleet.options, devices)
            app = create_app(
                store, fleet, bundle_dir=tmp_path / "bundles", trusted_keys=[art["key"]], poll_s=0.2
            )
            with (
                ServerThread(app, port=free_port()) as srv,
                httpx.Client(base_url=srv.url, timeout=30) as http,
            ):
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(srv.url + "/")
                page.evaluate("window.__noReload = 7")
                page.wait_for_selector("#live.on")
                page.select_option("#window", "300")
                for dev in devices:
                    page.wait_for_selector(f"#fleet-table tr[data-device='{dev}']")

                # deploy v1 with a canary through the API; the page follows it to the end
                ids = {}
                for name in ("v1", "v2"):
                    tar = pack(art[name], tmp_path / f"{name}.tar")
                    ids[name] = http.post("/api/bundles", content=tar.read_bytes(), headers=TAR).json()["id"]
                first = http.post(
                    "/api/rollouts",
                    json={"bundles": [ids["v1"]], "to": "all", "strategy": "canary:34", "soak_s": 1},
                ).json()["id"]
                card = f"#rollouts .rollout[data-rollout='{first}']"
                page.wait_for_selector(card + "[data-status='succeeded']", timeout=90000)
                wait_text(page, card + " .progress-text", "3/3 finished")

                # the fleet table lists every device with the model version it runs
                for dev in devices:
                    wait_text(page, f"#fleet-table tr[data-device='{dev}'] td.model", "tiny v1", 30000)
                # latency from the served inferences reaches the charts
                page.wait_for_selector("#chart-latency-device circle.pt", timeout=30000)
                page.wait_for_selector("#chart-latency-version circle.pt", timeout=30000)

                # a second rollout held after its first wave; abort it from the page
                second = http.post(
                    "/api/rollouts",
                    json={"bundles": [ids["v2"]], "to": "all", "strategy": "waves:34,100", "soak_s": 60},
                ).json()["id"]
                card2 = f"#rollouts .rollout[data-rollout='{second}']"
                wait_for(
                    lambda: (
                        http.get(f"/api/rollouts/{second}").json()["progress"]["by_status"].get("deployed")
                    ),
                    60,
                    "the first wave deployed",
                )
                page.wait_for_selector(card2 + " button.danger", timeout=15000)
                page.click(card2 + " button.danger")
                page.wait_for_selector(card2 + "[data-status='aborted']", timeout=60000)
                assert "aborted from the dashboard" in page.inner_text(card2 + " .reason")
                assert page.locator(card2 + " [data-status='rolled-back']").count() >= 1
                assert page.locator(card2 + " [data-status='not-notified']").count() >= 1
                # the devices it reached are back on v1
                for dev in devices:
                    wait_text(page, f"#fleet-table tr[data-device='{dev}'] td.model", "tiny v1", 30000)
                # points keep arriving as the devices serve: several buckets per device by now
                wait_js(
                    page,
                    "document.querySelectorAll('#chart-latency-device circle.pt').length >= 9",
                    timeout=30000,
                )
                assert page.evaluate("window.__noReload") == 7
                assert errors == []
                screenshot(page, tmp_path)
    finally:
        fleet.close()
        store.close()
