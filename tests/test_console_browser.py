"""The console in a real browser (Debian's Chromium, driven by Playwright) against a real controller,
a real Mosquitto and simulated devices speaking the real protocol: pages render, live updates
arrive without a reload, Abort pressed in the browser aborts the rollout and the controller rolls
the moved devices back, a viewer has no buttons and a stranger gets the login page. The run writes
screenshots of the main pages into docs/images/ (shown in README.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from console_fixtures import OPERATOR_TOKEN, V1, VIEWER_TOKEN, serve
from controller_fixtures import (  # noqa: F401 - fixtures
    SimDevice,
    cli,
    db_url,
    devices_factory,
    digits_repo_template,
    release_repo,
    start_controller,
)
from polling import wait_for

from edgeship.toolkit.store import FleetStore

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.chromium]

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser() -> Iterator[Any]:
    from conftest import chromium_binary
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_binary(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def log_in(browser: Any, base: str, token: str, path: str = "/") -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of abort and promote
    page.goto(base + path)
    assert page.url.startswith(base + "/login"), page.url
    page.fill("#secret", token)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)
    return page


def test_console_in_a_real_browser(browser: Any, mosquitto_broker: Any, release_repo: Path, db_url: str,
                                   devices_factory: Callable[..., SimDevice]) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    sims = [devices_factory(f"pi-{i:02d}", active=dict(V1)) for i in range(6)]
    controller = start_controller(mosquitto_broker.url, release_repo, db_url, tick_s=0.2)
    store = FleetStore(db_url)
    console = serve(store)
    base = console.url
    try:
        for i, sim in enumerate(sims):
            sim.telemetry(requests=120, errors=i % 2, latency_ms=2.0 + i * 0.4, drift=0.05 * i)
        wait_for(lambda: len(store.list_devices("plant")) == 6 and all(d.telemetry_at for d in store.list_devices()),
                 what="six devices and their telemetry ingested")

        # a stranger gets the login page, and nothing else
        stranger = browser.new_page()
        stranger.goto(base + "/rollouts")
        assert "/login" in stranger.url and stranger.locator("#secret").is_visible()

        # the fleet renders, then a device's change arrives without a reload
        page = log_in(browser, base, OPERATOR_TOKEN)
        assert page.locator("[data-testid=devices-total]").inner_text() == "6"
        assert page.locator("tr[data-device]").count() == 6
        page.evaluate("window.notReloaded = true")
        sims[2].report(update={"state": "PROBATION", "bundle": {"name": "digits", "version": "1.1.0"}})
        page.wait_for_selector("tr[data-device=pi-02] >> text=PROBATION", timeout=15000)
        assert page.evaluate("window.notReloaded") is True
        sims[2].report(update={"state": "COMMITTED", "bundle": dict(V1)})
        page.screenshot(path=str(SCREENSHOTS / "console-fleet.png"), full_page=True)

        # a device: models, update, latency histogram, history
        page.click("a[href='/devices/pi-03']")
        page.wait_for_selector("[data-testid=version-digits] >> text=1.0.0")
        assert page.locator("svg[aria-label^='latency histogram']").count() == 1
        page.screenshot(path=str(SCREENSHOTS / "console-device.png"), full_page=True)

        # a rollout fills its stages live; Abort pressed in the browser aborts it and rolls back
        rollout_id = cli(["rollout", "start", "digits", "1.1.0", "--fleet", "plant", "--stages", "50,100",
                          "--db", db_url]).stdout.strip()
        page.goto(f"{base}/rollouts/{rollout_id}")
        page.evaluate("window.notReloaded = true")
        wait_for(lambda: sum(not s.desired.empty() for s in sims) >= 3, timeout=20, what="the first stage's devices")
        time.sleep(1.0)  # nobody else is moved in stage 1
        moved = [sim for sim in sims if not sim.desired.empty()]
        for sim in moved:
            sim.commit(sim.desired.get_nowait())
        assert len(moved) == 3, [s.device for s in moved]
        page.wait_for_selector("svg rect title >> text=SUCCEEDED: 3", state="attached", timeout=15000)
        assert page.evaluate("window.notReloaded") is True
        page.screenshot(path=str(SCREENSHOTS / "console-rollout.png"), full_page=True)
        page.click("button[data-action=abort]")
        page.wait_for_selector("[data-testid=rollout-state] >> text=ABORTED", timeout=15000)
        assert store.load_rollout(rollout_id)[0].state.value == "ABORTED"
        for sim in moved:  # the controller publishes each moved device's signed rollback
            rollback = wait_for(lambda s=sim: (not s.desired.empty()) and s.desired.get_nowait(), timeout=20,
                                what=f"{sim.device}'s rollback")
            assert (rollback.action, rollback.version) == ("rollback", "1.0.0")

        # an A/B test: each arm's samples and interval as a chart, the verdict in words
        test_id = cli(["abtest", "start", "digits:1.0.0", "digits:1.1.0", "--fleet", "plant", "--metric",
                       "latency_p95", "--min-samples", "5", "--db", db_url]).stdout.strip()
        from edgeship.toolkit.abtest import assign_arm

        # devices that join now, two hashing to each arm (the test id is random), each on its arm's version
        arms: dict = {"A": [], "B": []}
        for i in range(200):
            name = f"ab-{i:03d}"
            if len(arms[assign_arm(test_id, name, 50.0)]) < 2:
                arms[assign_arm(test_id, name, 50.0)].append(name)
        joined = {arm: [devices_factory(name, active={"name": "digits", "version": "1.1.0" if arm == "B" else "1.0.0"})
                        for name in names] for arm, names in arms.items()}
        for round_ in range(8):
            for arm, members in joined.items():
                for sim in members:
                    sim.telemetry(requests=60, latency_ms=(6.0 if arm == "B" else 2.0) + 0.3 * (round_ % 3))
        wait_for(lambda: len(store.telemetry_windows("plant", since=time.time() - 60)) >= 32,
                 what="the A/B telemetry ingested")
        page.goto(f"{base}/abtests/{test_id}")
        verdict = page.wait_for_selector("[data-testid=verdict]").inner_text()
        assert "A" in verdict and "faster" in verdict, verdict
        assert page.locator("svg[aria-label^=\"each arm\"] circle").count() >= 32
        page.screenshot(path=str(SCREENSHOTS / "console-abtest.png"), full_page=True)

        # a viewer sees the same pages and no button
        viewer = log_in(browser, base, VIEWER_TOKEN, f"/rollouts/{rollout_id}")
        viewer.wait_for_selector("[data-testid=rollout-state]")
        assert viewer.locator("button[data-action]").count() == 0
    finally:
        console.stop()
        store.close()
        controller.stop()


def test_the_fleet_table_pages_and_a_later_page_updates_live(browser: Any, tmp_path: Path) -> None:
    from console_fixtures import fill_fleet

    from edgeship.ota.protocol import ReportedMessage
    from edgeship.toolkit.store import IngestItem

    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    ids = fill_fleet(store, devices=130, windows=1)
    console = serve(store)
    try:
        page = log_in(browser, console.url, VIEWER_TOKEN)
        assert page.locator("[data-testid=devices-total]").inner_text() == "130"
        assert page.locator("tr[data-device]").count() == 100
        page.click("a[data-page=next]")
        page.wait_for_selector(f"tr[data-device={ids[100]}]")
        assert [page.locator("tr[data-device]").nth(i).get_attribute("data-device") for i in range(30)] == ids[100:]
        assert page.locator(f"tr[data-device={ids[0]}]").count() == 0

        # a device on this second page changes; its row changes without a reload, on this page
        page.evaluate("window.notReloaded = true")
        now = time.time()
        store.ingest([IngestItem("plant", ids[120], ReportedMessage(
            ids[120], now, dict(V1), update={"state": "PROBATION", "bundle": {"name": "digits", "version": "1.1.0"}}),
            now)])
        page.wait_for_selector(f"tr[data-device={ids[120]}] >> text=PROBATION", timeout=15000)
        assert page.evaluate("window.notReloaded") is True
        assert page.locator("tr[data-device]").count() == 30
        page.click("a[data-page=previous]")
        page.wait_for_selector(f"tr[data-device={ids[0]}]")
        assert page.locator("tr[data-device]").count() == 100
    finally:
        console.stop()
        store.close()
