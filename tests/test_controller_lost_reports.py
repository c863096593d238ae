"""A lost report's second chance: the controller reads a silent device's retained ``reported``
again when its record says an update is in flight. The rule as tables (pure), the store's query
for candidates, and the whole path with a real Mosquitto and a controller whose ingest queue
overflowed while its store was locked."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from controller_fixtures import (  # noqa: F401 - fixtures
    SimDevice,
    db_url,
    devices_factory,
    digits_repo_template,
    release_repo,
    start_controller,
)
from polling import wait_for

from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import ReportedMessage, StatusMessage
from edgeship.toolkit.report_reread import (
    TERMINAL_UPDATE_STATES,
    ReportRereadPolicy,
    StaleDevice,
    forget_rereads,
    rereads_due,
)
from edgeship.toolkit.store import FleetStore, IngestItem

POLICY = ReportRereadPolicy(stale_after_s=100.0, reread_every_s=600.0, max_per_pass=2, check_every_s=15.0)
NOW = 10_000.0


def _stale(device: str, reported_at: float | None) -> StaleDevice:
    return StaleDevice(device, "plant", reported_at)


@pytest.mark.parametrize(("candidates", "last_reread", "expected"), [
    # silent long enough: due; too recent a report: not yet
    ([_stale("a", NOW - 100)], {}, ["a"]),
    ([_stale("a", NOW - 99)], {}, []),
    # never reported at all: due
    ([_stale("a", None)], {}, ["a"]),
    # re-read within reread_every_s: not again; after it: again
    ([_stale("a", NOW - 5000)], {"a": NOW - 599}, []),
    ([_stale("a", NOW - 5000)], {"a": NOW - 600}, ["a"]),
    # bounded per pass: the longest silent first
    ([_stale("c", NOW - 300), _stale("a", NOW - 200), _stale("b", NOW - 400)], {}, ["b", "c"]),
    # never re-read before goes ahead of re-read before, however silent that one is
    ([_stale("old", NOW - 9000), _stale("new", NOW - 150)], {"old": NOW - 700}, ["new", "old"]),
    # a tie on silence: by id, so a cut-short pass resumes in a stable order
    ([_stale("b", NOW - 200), _stale("a", NOW - 200), _stale("c", NOW - 200)], {}, ["a", "b"]),
])
def test_which_devices_are_reread_in_a_pass(candidates: list[StaleDevice], last_reread: dict[str, float],
                                            expected: list[str]) -> None:
    assert [d.device for d in rereads_due(candidates, last_reread, NOW, POLICY)] == expected


def test_ten_thousand_stale_devices_cost_the_broker_a_bounded_trickle() -> None:
    policy = ReportRereadPolicy(max_per_pass=100, check_every_s=15.0, reread_every_s=600.0, stale_after_s=120.0)
    fleet = [_stale(f"d{i:05d}", NOW - 1000 - i) for i in range(10_000)]
    reread: dict[str, float] = {}
    seen: set[str] = set()
    at = NOW
    for _ in range(40):  # ten minutes of passes
        reread = forget_rereads(reread, at, policy)
        due = rereads_due(fleet, reread, at, policy)
        assert len(due) <= 100
        assert not seen & {d.device for d in due}  # nobody twice within reread_every_s
        seen |= {d.device for d in due}
        reread.update({d.device: at for d in due})
        at += policy.check_every_s
    assert len(seen) == 4000 and len(reread) <= 4000


def test_old_reread_times_are_forgotten() -> None:
    assert forget_rereads({"a": NOW - 600, "b": NOW - 599}, NOW, POLICY) == {"b": NOW - 599}


@pytest.mark.parametrize("bad", [{"stale_after_s": 0}, {"reread_every_s": -1}, {"check_every_s": math.nan},
                                 {"max_per_pass": -1}])
def test_a_policy_out_of_range_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        ReportRereadPolicy(**bad)


def test_the_terminal_states_are_the_agents() -> None:
    from edgeship.agent.state_machine import TERMINAL_STATES

    assert {s.value for s in TERMINAL_STATES} == TERMINAL_UPDATE_STATES


def test_the_store_names_silent_devices_with_an_update_in_flight(tmp_path: Path) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    v1, v2 = {"name": "digits", "version": "1.0.0"}, {"name": "digits", "version": "1.1.0"}

    def report(device: str, at: float, update: dict[str, Any] | None, models: dict[str, Any] | None = None) -> None:
        store.ingest([IngestItem("plant", device, StatusMessage("online", at), at),
                      IngestItem("plant", device, ReportedMessage(device, at, v1, update=update, models=models), at)])

    try:
        report("probation-old", 100.0, {"state": "PROBATION", "bundle": v2})
        report("probation-new", 900.0, {"state": "PROBATION", "bundle": v2})
        report("committed-old", 100.0, {"state": "COMMITTED", "bundle": v2})
        report("idle-old", 100.0, None)
        report("model-fetching-old", 200.0, None,
               models={"kws": {"active": {"name": "kws", "version": "1"}, "update": {"state": "FETCHING",
                                                                                  "bundle": {"name": "kws", "version": "2"}}}})
        found = store.stale_in_flight(500.0)
        assert sorted(d.device for d in found) == ["model-fetching-old", "probation-old"]
        assert {d.device: d.reported_at for d in found}["probation-old"] == 100.0
        # a device a live rollout holds ASSIGNED counts even while its own record looks settled
        from console_fixtures import start_rollout

        rollout_id = start_rollout(store, stages="100")
        assigned = {device for device, record in store.load_rollout(rollout_id)[0].devices.items()
                    if record.status.value == "ASSIGNED"}
        assert {"committed-old", "idle-old"} <= assigned
        assert {d.device for d in store.stale_in_flight(500.0)} >= {"committed-old", "idle-old", "probation-old"}
        assert "probation-new" not in {d.device for d in store.stale_in_flight(500.0)}
        assert store.stale_in_flight(500.0, fleet="elsewhere") == []
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.mosquitto
def test_a_report_dropped_while_the_controller_was_busy_is_read_again(
        mosquitto_broker: Any, release_repo: Path, db_url: str, devices_factory: Callable[..., SimDevice]) -> None:
    v1, v2 = {"name": "digits", "version": "1.0.0"}, {"name": "digits", "version": "1.1.0"}
    policy = ReportRereadPolicy(stale_after_s=2.0, reread_every_s=2.0, max_per_pass=10, check_every_s=0.3)
    # one message queued at most, one written at a time: a store that stalls overflows the queue at once
    controller = start_controller(mosquitto_broker.url, release_repo, db_url, queue_max=1, batch_max=1,
                                  report_reread=policy)
    store = FleetStore(db_url)
    lock: sqlite3.Connection | None = None
    try:
        sim = devices_factory("pi-01", active=dict(v1))
        sim.report(update={"state": "PROBATION", "bundle": dict(v2)})
        wait_for(lambda: [d.update_state for d in store.list_devices("plant")] == ["PROBATION"],
                 what="PROBATION ingested")

        # the store stalls (another writer holds it), the controller's ingest queue overflows and the
        # device's final report is dropped; the device will not report again by itself
        lock = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        sim.event("busy-1")
        sim.event("busy-2")
        sim.active = dict(v2)
        sim.report(update={"state": "COMMITTED", "bundle": dict(v2)}, previous=dict(v1))
        wait_for(lambda: controller.snapshot_stats().get("ingest_dropped", 0) >= 1, timeout=20,
                 what="the report dropped by the full ingest queue")
        lock.execute("ROLLBACK")
        lock.close()
        lock = None

        # the retained report, read again, brings the record right
        wait_for(lambda: store.get_device("pi-01").update_state == "COMMITTED", timeout=30,
                 what="the retained COMMITTED report read again")
        device = store.get_device("pi-01")
        assert (device.active_version, device.previous_version) == ("1.1.0", "1.0.0")
        assert controller.snapshot_stats().get("reports_reread", 0) >= 1
        # settled: nobody is re-read any more
        time.sleep(1.0)
        assert store.stale_in_flight(time.time() + 100) == []
    finally:
        if lock is not None:
            lock.close()
        store.close()
        controller.stop()
