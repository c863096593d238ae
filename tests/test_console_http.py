"""The console over HTTP, as a careless or hostile client meets it: every page answers for a
logged-in user, nothing answers without a login, a viewer cannot press a button, a forged or
cross-site request changes nothing, and a button does what the CLI's command does."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from console_fixtures import (  # noqa: F401 - fixtures
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    ab_telemetry,
    console_store,
    fill_fleet,
    serve,
    start_abtest,
    start_rollout,
)

from edgeship.toolkit.store import FleetStore


class Client:
    """A browser-like client that keeps its cookie and never follows redirects by itself."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookie:
            sent["Cookie"] = self.cookie
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        answer = {k.lower(): v for k, v in response.getheaders()}
        conn.close()
        if "set-cookie" in answer:
            self.cookie = answer["set-cookie"].split(";")[0]
        return response.status, answer, text

    def login(self, secret: str) -> int:
        return self.request("POST", "/login", {"secret": secret, "next": "/"})[0]

    def csrf(self, path: str) -> str:
        _, _, text = self.request("GET", path)
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', text)
        assert match, "no CSRF token on the page"
        return match.group(1)


@pytest.fixture
def fleet(console_store: FleetStore) -> Iterator[tuple[Any, FleetStore, str, str]]:
    fill_fleet(console_store, devices=12)
    fill_fleet(console_store, devices=10, fleet="lab")  # the A/B test's fleet: one bundle, one experiment
    rollout_id = start_rollout(console_store)
    test_id = start_abtest(console_store, fleet="lab")
    ab_telemetry(console_store, test_id, fleet="lab")
    server = serve(console_store)
    yield server, console_store, rollout_id, test_id
    server.stop()


def test_every_page_answers_a_logged_in_viewer(fleet: Any) -> None:
    server, _, rollout_id, test_id = fleet
    client = Client(server.port)
    assert client.login(VIEWER_TOKEN) == 303
    for path, words in [("/", "plant-00001"), ("/?online=no", "plant-00000"), ("/?tag=site%3Dberlin", "plant-00000"),
                        ("/devices/plant-00001", "digits"), ("/rollouts", rollout_id),
                        (f"/rollouts/{rollout_id}", "RUNNING"), ("/abtests", test_id),
                        (f"/abtests/{test_id}", "<svg"), (f"/rollouts/{rollout_id}?part=live", "stage 1")]:
        status, headers, text = client.request("GET", path)
        assert status == 200 and words in text, (path, status, text[:300])
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
    # a viewer sees no button and no CSRF token
    _, _, page = client.request("GET", f"/rollouts/{rollout_id}")
    assert "data-action" not in page and 'name="csrf"' not in page


def test_filters_narrow_the_fleet_table(fleet: Any) -> None:
    server, _, _, _ = fleet
    client = Client(server.port)
    client.login(VIEWER_TOKEN)
    _, _, offline = client.request("GET", "/?online=no&fleet=plant")
    rows = re.findall(r'data-device="([^"]+)"', offline)
    assert rows == ["plant-00000", "plant-00003", "plant-00006", "plant-00009"]
    _, _, tagged = client.request("GET", "/?tag=site%3Dberlin")
    assert re.findall(r'data-device="([^"]+)"', tagged) == ["plant-00000"]
    status, _, text = client.request("GET", "/?online=maybe")
    assert status == 400 and "online: use yes or no" in text


def test_the_fleet_table_pages_through_every_match_by_device_id(console_store: FleetStore) -> None:
    ids = fill_fleet(console_store, devices=230, windows=1)
    fill_fleet(console_store, devices=5, fleet="lab", windows=1)
    server = serve(console_store)
    try:
        client = Client(server.port)
        client.login(VIEWER_TOKEN)

        def rows(text: str) -> list[str]:
            return re.findall(r'data-device="([^"]+)"', text)

        def link(text: str, which: str) -> str:
            match = re.search(rf'<a href="([^"]+)" data-page="{which}"', text)
            return match.group(1).replace("&amp;", "&") if match else ""

        # every page of the plant fleet, 100 at a time, in id order: each device once, none left out
        _, _, page = client.request("GET", "/?fleet=plant")
        assert '<span class="big" data-testid="devices-total">230</span>' in page  # the counts cover every match
        seen, pages = rows(page), [page]
        while link(pages[-1], "next"):
            _, _, nxt = client.request("GET", link(pages[-1], "next"))
            pages.append(nxt)
            seen += rows(nxt)
        assert seen == ids and [len(rows(p)) for p in pages] == [100, 100, 30]
        assert not link(pages[0], "previous") and link(pages[1], "previous") and not link(pages[-1], "next")
        # back from the last page lands on the page before it, with the filter kept
        back = link(pages[-1], "previous")
        assert "fleet=plant" in back
        assert rows(client.request("GET", back)[2]) == rows(pages[1])
        # a page's live part is the same rows; a page size of the operator's choosing
        assert rows(client.request("GET", link(pages[0], "next") + "&part=live")[2]) == rows(pages[1])
        assert len(rows(client.request("GET", "/?fleet=plant&rows=50")[2])) == 50
        _, _, everything = client.request("GET", "/?rows=500")
        assert len(rows(everything)) == 235 and not link(everything, "next")
        # careless paging gets one clear line
        for bad, words in [("/?rows=7", "rows: one of 50, 100, 200, 500"),
                           ("/?after=a&before=b", "give one of them")]:
            status, _, text = client.request("GET", bad)
            assert status == 400 and words in text, (bad, status)
        # past the end: an empty page that still counts every match
        _, _, past = client.request("GET", "/?fleet=plant&after=zzz")
        assert rows(past) == [] and "no device on this page of 230" in past
    finally:
        server.stop()


def test_a_rollouts_device_table_pages_and_filters_by_status(console_store: FleetStore) -> None:
    from edgeship.toolkit.console.views import keyset_page

    ids = fill_fleet(console_store, devices=150, windows=1)
    rollout_id = start_rollout(console_store, stages="10,100")  # stage 1: 15 devices ASSIGNED
    server = serve(console_store)
    try:
        client = Client(server.port)
        client.login(VIEWER_TOKEN)

        def rows(text: str) -> list[str]:
            return re.findall(r'<tr data-device="([^"]+)"', text)

        _, _, first = client.request("GET", f"/rollouts/{rollout_id}")
        assert rows(first) == ids[:100] and "Devices (150)" in first
        nxt = re.search(r'<a href="([^"]+)" data-page="next"', first)
        assert nxt is not None
        _, _, second = client.request("GET", nxt.group(1).replace("&amp;", "&") + "&part=live")
        assert rows(second) == ids[100:]
        assigned = [d for d, r in sorted(console_store.load_rollout(rollout_id)[0].devices.items())
                    if r.status.value == "ASSIGNED"]
        _, _, only = client.request("GET", f"/rollouts/{rollout_id}?status=assigned")
        assert rows(only) == assigned and len(assigned) == 15 and "15 assigned" in only
        status, _, text = client.request("GET", f"/rollouts/{rollout_id}?status=LOST")
        assert status == 400 and "status: one of" in text
        assert client.request("GET", f"/rollouts/{rollout_id}?rows=3")[0] == 400
    finally:
        server.stop()
    # the paging itself, on a sorted list
    assert keyset_page(["a", "b", "c", "d", "e"], 2) == (["a", "b"], False, True)
    assert keyset_page(["a", "b", "c", "d", "e"], 2, after="b") == (["c", "d"], True, True)
    assert keyset_page(["a", "b", "c", "d", "e"], 2, after="d") == (["e"], True, False)
    assert keyset_page(["a", "b", "c", "d", "e"], 2, before="e") == (["c", "d"], True, True)
    assert keyset_page(["a", "b", "c", "d", "e"], 2, before="c") == (["a", "b"], False, True)
    assert keyset_page(["a", "c", "e"], 2, after="b") == (["c", "e"], True, False)  # a device that left


def test_nothing_answers_without_a_login(fleet: Any) -> None:
    server, _, rollout_id, _ = fleet
    client = Client(server.port)
    status, headers, _ = client.request("GET", f"/rollouts/{rollout_id}")
    assert status == 303 and headers["location"].startswith("/login?next=")
    assert client.request("GET", f"/rollouts/{rollout_id}?part=live")[0] == 401
    assert client.request("POST", f"/rollouts/{rollout_id}/abort", {})[0] == 401
    assert client.request("GET", "/", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})[0] == 303
    assert client.request("GET", "/static/console.js")[0] == 200  # assets are public
    assert client.request("GET", "/healthz")[0] == 200
    status, _, _ = client.request("GET", "/", headers={"Cookie": "edgeship_session=operator.9999999999.00.ff"})
    assert status == 303  # a forged cookie is nobody


def test_wrong_secret_is_refused_and_redirects_stay_on_the_console(fleet: Any) -> None:
    server, _, _, _ = fleet
    client = Client(server.port)
    status, _, text = client.request("POST", "/login", {"secret": "guess", "next": "/"})
    assert status == 401 and "not the operator" in text and not client.cookie
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        status, headers, _ = client.request("POST", "/login", {"secret": VIEWER_TOKEN, "next": target})
        assert status == 303 and headers["location"] == "/"
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]


def test_a_viewer_cannot_act_and_a_forged_or_cross_site_action_changes_nothing(fleet: Any) -> None:
    server, store, rollout_id, _ = fleet
    viewer = Client(server.port)
    viewer.login(VIEWER_TOKEN)
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert viewer.request("POST", f"/rollouts/{rollout_id}/abort", {"csrf": "x"}, origin)[0] == 403
    assert viewer.request("POST", f"/rollouts/{rollout_id}/abort",
                          headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})[0] == 403
    operator = Client(server.port)
    operator.login(OPERATOR_TOKEN)
    token = operator.csrf(f"/rollouts/{rollout_id}")
    assert operator.request("POST", f"/rollouts/{rollout_id}/abort", {}, origin)[0] == 403  # no token
    assert operator.request("POST", f"/rollouts/{rollout_id}/abort", {"csrf": token})[0] == 403  # no origin
    assert operator.request("POST", f"/rollouts/{rollout_id}/abort", {"csrf": token},
                            {"Origin": "http://evil.example"})[0] == 403
    assert operator.request("POST", f"/rollouts/{rollout_id}/abort", {"csrf": token + "0"}, origin)[0] == 403
    assert store.load_rollout(rollout_id)[0].state.value == "RUNNING"
    status, _, _ = operator.request("POST", f"/rollouts/{rollout_id}/pause", {"csrf": token}, origin)
    assert status == 303 and store.load_rollout(rollout_id)[0].state.value == "PAUSED"


def test_buttons_do_what_the_cli_commands_do(fleet: Any) -> None:
    server, store, rollout_id, test_id = fleet
    bearer = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    client = Client(server.port)
    status, _, text = client.request("POST", f"/rollouts/{rollout_id}/resume", headers=bearer)
    assert status == 409 and "only a PAUSED rollout can be resumed" in text, text  # the engine's own refusal
    status, headers, _ = client.request("POST", f"/rollouts/{rollout_id}/abort", headers=bearer)
    assert status == 303 and "ABORTED" in urllib.parse.unquote_plus(headers["location"])
    rollout = store.load_rollout(rollout_id)[0]
    assert rollout.state.value == "ABORTED" and rollout.reason == "aborted by the operator in the console"
    status, headers, _ = client.request("POST", f"/abtests/{test_id}/promote", headers=bearer)
    assert status == 303, headers
    promoted_id = urllib.parse.urlsplit(headers["location"]).path.rsplit("/", 1)[-1]
    promoted = store.load_rollout(promoted_id)[0]
    assert (promoted.version, promoted.policy.stages) == ("1.0.0", (50.0, 100.0))  # A answers faster: the winner
    assert store.get_abtest(test_id)[1] == promoted_id
    assert client.request("POST", "/rollouts/r-missing/abort", headers=bearer)[0] == 404


def test_careless_requests_get_clear_answers(fleet: Any) -> None:
    server, _, _, _ = fleet
    client = Client(server.port)
    client.login(VIEWER_TOKEN)
    assert client.request("GET", "/devices/nobody")[0] == 404
    assert client.request("GET", "/rollouts/r-missing")[0] == 404
    assert client.request("GET", "/abtests/ab-missing")[0] == 404
    assert client.request("GET", "/?tag=no-equals-sign")[0] == 400
    assert client.request("GET", "/no/such/page")[0] == 404
    assert client.request("GET", "/static/../store.py")[0] == 404
    assert client.request("PUT", "/")[0] in (405, 501)
    big = {"csrf": "x" * 20000}
    assert client.request("POST", "/rollouts/r-1/abort", big, {"Origin": "x"})[0] == 413


def test_a_kept_rollout_is_reloaded_when_its_revision_moves(console_store: FleetStore) -> None:
    from edgeship.toolkit.console.views import RolloutReader
    from edgeship.toolkit.fleet_actions import operate_rollout

    fill_fleet(console_store, devices=8)
    rollout_id = start_rollout(console_store)
    reader = RolloutReader()
    first = reader.load(console_store, rollout_id)
    assert reader.load(console_store, rollout_id) is first  # unchanged: the same object
    operate_rollout(console_store, rollout_id, "pause")
    again = reader.load(console_store, rollout_id)
    assert again is not first and again.state.value == "PAUSED"


def test_rollout_health_is_measured_in_the_background_and_then_shown(console_store: FleetStore) -> None:
    import time as clock

    from edgeship.toolkit.console.views import RolloutHealth

    fill_fleet(console_store, devices=8)
    rollout_id = start_rollout(console_store)
    rollout, _ = console_store.load_rollout(rollout_id)
    from edgeship.ota.protocol import TelemetryMessage
    from edgeship.ota.telemetry import LatencyHistogram
    from edgeship.toolkit.store import IngestItem

    latency = LatencyHistogram()
    latency.observe(3.0)
    now = clock.time() + 1
    console_store.ingest([IngestItem("plant", "plant-00001", TelemetryMessage(
        ts=now, window_s=10.0, requests=25, errors=1, latency=latency, bundle={"name": "digits", "version": "1.0.0"}),
        now)])
    health = RolloutHealth(max_age_s=60, settle_s=0.0, clock=lambda: clock.time() + 2)
    reading, age = health.reading(console_store, rollout)
    assert reading is None and age is None  # the first request never waits
    deadline = clock.monotonic() + 10
    while reading is None and clock.monotonic() < deadline:
        clock.sleep(0.05)
        reading, age = health.reading(console_store, rollout)
    assert reading is not None and age is not None and age < 10
    assert (reading.baseline_requests, reading.baseline_errors, reading.new_requests) == (25, 1, 0)


def test_rollout_health_read_window_by_window_is_the_engines_reading_over_every_window(
        console_store: FleetStore) -> None:
    import random

    from console_fixtures import V1, V2, histogram

    from edgeship.ota.protocol import TelemetryMessage
    from edgeship.toolkit.console.views import RolloutHealth
    from edgeship.toolkit.rollouts import measure_health
    from edgeship.toolkit.store import IngestItem

    ids = fill_fleet(console_store, devices=20, windows=1, now=1000.0)
    rollout_id = start_rollout(console_store)
    rollout, _ = console_store.load_rollout(rollout_id)
    start = rollout.created_at
    rng = random.Random(11)
    at = {"t": start + 100.0}
    health = RolloutHealth(settle_s=15.0, clock=lambda: at["t"])
    readings = []
    for round_ in range(6):  # windows arrive between measurements, some on the new version, some late
        items = []
        for i, device in enumerate(ids):
            received = start + round_ * 40.0 + rng.uniform(0, 40)
            bundle = V2 if i % 4 == 0 else V1
            items.append(IngestItem("plant", device, TelemetryMessage(
                ts=received, window_s=10.0, requests=30, errors=rng.randint(0, 2),
                latency=histogram(rng, 30, 3.0 if bundle is V2 else 2.0), bundle=dict(bundle)), received))
        console_store.ingest(items)
        at["t"] = start + round_ * 40.0 + 20.0
        readings.append(health.measure(console_store, rollout))
    at["t"] = start + 10_000.0
    final = health.measure(console_store, rollout)
    snapshot = {s.device: s for s in console_store.fleet_snapshot("plant", (), telemetry_since=rollout.created_at)}
    assert final == measure_health(rollout, snapshot)
    assert final.new_requests == 6 * 5 * 30 and final.baseline_requests == 6 * 15 * 30
    # earlier readings covered less, never more: each window counted once, when settled
    assert [r.new_requests + r.baseline_requests for r in readings] == sorted(
        r.new_requests + r.baseline_requests for r in readings)


def test_a_device_of_many_models_lists_each_and_the_fleet_filters_by_any_of_them(console_store: FleetStore) -> None:
    from edgeship.ota.protocol import ReportedMessage, StatusMessage
    from edgeship.toolkit.store import IngestItem

    fill_fleet(console_store, devices=3)
    models = {"digits": {"active": {"name": "digits", "version": "1.1.0"}, "serving_version": 4},
              "kws": {"active": {"name": "kws", "version": "0.2.0"}, "serving_version": 2,
                      "update": {"state": "PROBATION", "bundle": {"name": "kws", "version": "0.2.0"}}}}
    console_store.ingest([
        IngestItem("plant", "gw-1", StatusMessage("online"), 1.0),
        IngestItem("plant", "gw-1", ReportedMessage("gw-1", 1.0, {"name": "kws", "version": "0.2.0"},
                                                    agent_version="0.3.0", models=models), 1.0)])
    server = serve(console_store)
    try:
        client = Client(server.port)
        client.login(VIEWER_TOKEN)
        _, _, page = client.request("GET", "/devices/gw-1")
        rows = dict(re.findall(r'<tr data-model="([^"]+)"><td>[^<]+</td><td data-testid="version-[^"]+">([^<]+)</td>', page))
        assert rows == {"digits": "1.1.0", "kws": "0.2.0"}
        assert "PROBATION" in page
        # the fleet table names both, with their serving versions
        _, _, fleet_page = client.request("GET", "/?fleet=plant")
        assert "digits 1.1.0 (#4), kws 0.2.0 (#2)" in fleet_page
        # a filter by model finds the device through either model; the one-model devices only by theirs
        _, _, by_kws = client.request("GET", "/?bundle=kws")
        assert re.findall(r'data-device="([^"]+)"', by_kws) == ["gw-1"]
        _, _, by_digits = client.request("GET", "/?bundle=digits&version=1.1.0")
        assert re.findall(r'data-device="([^"]+)"', by_digits) == ["gw-1"]
        _, _, by_old = client.request("GET", "/?bundle=digits&version=1.0.0")
        assert "gw-1" not in re.findall(r'data-device="([^"]+)"', by_old) and by_old.count("data-device=") == 3
    finally:
        server.stop()


def test_the_rollout_page_shows_what_its_updates_moved(fleet: Any) -> None:
    """Before any device reports a transfer the page says nothing of bytes; after, one line: bytes
    sent per kind and bytes saved against full bundles."""
    import time

    from edgeship.ota.protocol import ReportedMessage
    from edgeship.toolkit.store import IngestItem

    server, store, rollout_id, _ = fleet
    client = Client(server.port)
    client.login(VIEWER_TOKEN)
    _, _, before = client.request("GET", f"/rollouts/{rollout_id}?part=live")
    assert 'data-testid="rollout-bytes"' not in before
    assigned = sorted(store.load_rollout(rollout_id)[0].devices)[:2]
    now = time.time()
    for device, transfer in zip(assigned, [{"kind": "delta", "bytes": 2_000, "full_bytes": 100_000,
                                            "base_version": "1.0.0"},
                                           {"kind": "compressed", "bytes": 80_000, "full_bytes": 100_000}]):
        update = {"id": f"{device}-1", "state": "COMMITTED", "bundle": {"name": "digits", "version": "1.1.0"},
                  "deployment": rollout_id, "transfer": transfer}
        store.ingest([IngestItem("plant", device, ReportedMessage(device, now, {"name": "digits", "version": "1.1.0"},
                                                                  update=update), now)])
    _, _, after = client.request("GET", f"/rollouts/{rollout_id}?part=live")
    line = re.search(r'data-testid="rollout-bytes">([^<]*)<', after)
    assert line, after[:2000]
    assert line.group(1) == ("bytes: 82.0 kB sent (delta 1 device 2.0 kB, compressed 1 device 80.0 kB); "
                             "saved 118.0 kB (59% of 200.0 kB as full bundles)")
