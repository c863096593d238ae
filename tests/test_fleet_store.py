"""The fleet store on SQLite (a WAL file) and, marked slow, on a real PostgreSQL server.

Every test that takes the ``store`` fixture runs on both backends.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fleet_fixtures import postgres_server, store  # noqa: F401  (fixtures)

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import EventMessage, ReportedMessage, StatusMessage, TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.abtest import ABTest, Arm, Metric, assign_arm
from edgeship.toolkit.cli import main
from edgeship.toolkit.rollouts import (
    AssignVersion,
    DeviceStatus,
    HealthGates,
    RollbackDevice,
    RolloutPolicy,
    RolloutState,
    abort,
    new_rollout,
    pause,
    step,
)
from edgeship.toolkit.store import ConcurrentUpdateError, FleetStore, IngestItem, parse_selection

FLEET = "plant1"


def hist(*latencies: float) -> LatencyHistogram:
    h = LatencyHistogram()
    for value in latencies:
        h.observe(value)
    return h


def reported(device: str, version: str | None, update: dict[str, Any] | None = None,
             name: str = "digits") -> ReportedMessage:
    return ReportedMessage(device=device, ts=1.0, active={"name": name, "version": version} if version else None,
                           update=update, agent_version="0.1.0", runtime="litert")


def telemetry(version: str, requests: int, errors: int, *latencies: float, correct: int | None = None,
              name: str = "digits") -> TelemetryMessage:
    return TelemetryMessage(ts=5.0, window_s=10.0, requests=requests, errors=errors, latency=hist(*latencies),
                            bundle={"name": name, "version": version},
                            feedback={"correct": correct, "total": requests} if correct is not None else None,
                            drift=0.1)


def item(device: str, message: Any, at: float = 100.0, fleet: str = FLEET) -> IngestItem:
    return IngestItem(fleet, device, message, at)


# -- schema and connection ----------------------------------------------------------------------

def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    with FleetStore(f"sqlite:///{tmp_path / 'f.db'}") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_bad_url_is_bad_input() -> None:
    with pytest.raises(BadInputError):
        FleetStore("not a url")


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    with FleetStore(url) as s:
        s.ingest([item("d1", StatusMessage("online"))])
    with FleetStore(url) as s:
        assert s.get_device("d1").online


# -- ingest ------------------------------------------------------------------------------------

def test_ingest_every_kind_of_message(store: FleetStore) -> None:
    store.ingest([
        item("d1", StatusMessage("online", 1.0), at=100.0),
        item("d1", reported("d1", "1.0", {"state": "FETCHING", "bundle": {"name": "digits", "version": "2.0"}}),
             at=101.0),
        item("d1", EventMessage("update_started", ts=2.0, seq=1, bundle={"name": "digits", "version": "2.0"},
                                state="FETCHING"), at=102.0),
        item("d1", telemetry("1.0", 100, 5, 3.0, 4.0, 40.0), at=103.0),
        item("d2", StatusMessage("offline"), at=104.0),
    ])
    d1 = store.get_device("d1")
    assert (d1.fleet, d1.online, d1.first_seen, d1.last_seen) == (FLEET, True, 100.0, 103.0)
    assert (d1.active_name, d1.active_version) == ("digits", "1.0")
    assert (d1.update_state, d1.update_name, d1.update_version) == ("FETCHING", "digits", "2.0")
    assert d1.reported_at == 101.0 and d1.runtime == "litert"
    assert (d1.last_requests, d1.last_errors, d1.last_error_rate) == (100, 5, 0.05)
    assert d1.last_p95_ms is not None and d1.last_p95_ms > 4.0
    d2 = store.get_device("d2")
    assert d2.online is False and d2.active_version is None
    assert [e["event"] for e in store.recent_events("d1")] == ["update_started"]


def test_flat_update_fields_are_understood(store: FleetStore) -> None:
    store.ingest([item("d1", reported("d1", "1.0", {"state": "FAILED", "name": "digits", "version": "2.0",
                                                    "error": "golden vectors differ"}))])
    d1 = store.get_device("d1")
    assert (d1.update_state, d1.update_version, d1.update_detail) == ("FAILED", "2.0", "golden vectors differ")


def test_redelivered_events_are_stored_once(store: FleetStore) -> None:
    event = EventMessage("committed", ts=9.0, seq=7)
    store.ingest([item("d1", event), item("d1", event)])
    store.ingest([item("d1", event, at=200.0)])
    assert len(store.recent_events("d1")) == 1


def test_later_messages_in_a_batch_win(store: FleetStore) -> None:
    store.ingest([item("d1", StatusMessage("online"), at=1.0), item("d1", StatusMessage("offline"), at=2.0),
                  item("d1", reported("d1", "1.0"), at=3.0), item("d1", reported("d1", "1.1"), at=4.0)])
    d1 = store.get_device("d1")
    assert not d1.online and d1.active_version == "1.1"


def test_ingest_refuses_other_messages(store: FleetStore) -> None:
    with pytest.raises(BadInputError):
        store.ingest([item("d1", "not a message")])


def test_prune_telemetry(store: FleetStore) -> None:
    store.ingest([item("d1", telemetry("1.0", 1, 0, 1.0), at=t) for t in (10.0, 20.0, 30.0)])
    assert store.prune_telemetry(older_than=25.0) == 2
    assert len(store.telemetry_windows(FLEET)) == 1


# -- devices, tags, selection -------------------------------------------------------------------

def test_tags_and_selection(store: FleetStore) -> None:
    store.ingest([item(d, StatusMessage("online")) for d in ("a", "b", "c")] +
                 [item("x", StatusMessage("online"), fleet="other")])
    assert store.set_tags("a", {"site": "berlin", "hw": "pi4"}) == {"site": "berlin", "hw": "pi4"}
    store.set_tags("b", {"site": "berlin", "hw": "jetson"})
    store.set_tags("c", {"site": "paris"})
    store.set_tags("x", {"site": "berlin"})

    def ids(selection: list[str], fleet: str | None = FLEET) -> list[str]:
        return [d.id for d in store.list_devices(fleet, parse_selection(selection))]

    assert ids([]) == ["a", "b", "c"]
    assert ids(["site=berlin"]) == ["a", "b"]
    assert ids(["site=berlin", "hw=pi4"]) == ["a"]
    assert ids(["site=rome"]) == []
    assert ids(["site=berlin"], fleet=None) == ["a", "b", "x"]
    assert store.set_tags("a", {"site": "paris"}, remove=["hw"]) == {"site": "paris"}
    assert ids(["site=paris"]) == ["a", "c"]
    assert store.get_device("a").tags == {"site": "paris"}
    with pytest.raises(BadInputError):
        store.set_tags("nobody", {"k": "v"})


@pytest.mark.parametrize("bad", ["site", "=x", "site=", " = "])
def test_parse_selection_refuses(bad: str) -> None:
    with pytest.raises(BadInputError):
        parse_selection([bad])


def test_fleet_snapshot_merges_telemetry_per_version(store: FleetStore) -> None:
    store.ingest([
        item("a", StatusMessage("online")), item("b", StatusMessage("offline")),
        item("a", reported("a", "2.0", {"state": "COMMITTED", "bundle": {"name": "digits", "version": "2.0"}}),
             at=150.0),
        item("a", telemetry("1.0", 10, 1, 5.0, 5.0), at=90.0),     # before the window: left out
        item("a", telemetry("1.0", 10, 1, 5.0, 5.0), at=110.0),
        item("a", telemetry("2.0", 20, 2, 9.0), at=160.0),
        item("a", telemetry("2.0", 30, 0, 9.0, 9.0), at=170.0),
    ])
    snapshot = {s.device: s for s in store.fleet_snapshot(FLEET, telemetry_since=100.0)}
    a, b = snapshot["a"], snapshot["b"]
    assert a.online and not b.online
    assert (a.active_version, a.update_state, a.update_version, a.reported_at) == ("2.0", "COMMITTED", "2.0", 150.0)
    by_version = {t.version: t for t in a.telemetry}
    assert (by_version["1.0"].requests, by_version["1.0"].errors, by_version["1.0"].latency.count) == (10, 1, 2)
    assert (by_version["2.0"].requests, by_version["2.0"].errors, by_version["2.0"].latency.count) == (50, 2, 3)
    assert b.telemetry == ()
    assert all(s.telemetry == () for s in store.fleet_snapshot(FLEET))


# -- desired states ----------------------------------------------------------------------------

def test_desired_sequences_grow_per_device(store: FleetStore) -> None:
    assert [store.next_desired_sequence("a") for _ in range(3)] == [1, 2, 3]
    assert store.next_desired_sequence("b") == 1
    store.record_desired(fleet=FLEET, device="a", sequence=3, name="digits", version="2.0", issued_at=5.0,
                         rollout_id="r-1", envelope={"signed": {}, "signatures": []})
    store.record_desired(fleet=FLEET, device="a", sequence=2, name="digits", version="1.0", issued_at=4.0)
    latest = store.desired_for("a")
    assert latest is not None and (latest.sequence, latest.version, latest.rollout_id) == (3, "2.0", "r-1")
    assert store.desired_map(FLEET) == {"a": ("digits", "2.0")}
    assert store.desired_for("b") is None
    with pytest.raises(BadInputError):
        store.record_desired(fleet=FLEET, device="a", sequence=9, name="d", version="1", action="explode",
                             issued_at=1.0)


def test_desired_sequences_are_unique_under_concurrency(store: FleetStore) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            value = store.next_desired_sequence("hot")
            with lock:
                results.append(value)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(1, 41))


# -- rollouts ----------------------------------------------------------------------------------

def _fleet_of(store: FleetStore, n: int, version: str = "1.0") -> None:
    store.ingest([item(f"d{i:02d}", StatusMessage("online")) for i in range(n)]
                 + [item(f"d{i:02d}", reported(f"d{i:02d}", version)) for i in range(n)])


def test_rollout_round_trip_and_engine_step(store: FleetStore) -> None:
    _fleet_of(store, 10)
    rollout = new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0, selection=[("site", "x")])
    store.create_rollout(rollout)
    loaded, revision = store.load_rollout("r-1")
    assert loaded == rollout and revision == 1

    decision = step(loaded, store.fleet_snapshot(FLEET), 201.0)
    assert store.save_rollout(decision.rollout, revision, decision.actions, before=loaded) == 2
    again, revision = store.load_rollout("r-1")
    assert again == decision.rollout and revision == 2
    pending = store.pending_actions()
    assert [p.action for p in pending] == decision.actions
    assert all(isinstance(p.action, AssignVersion) and p.rollout_id == "r-1" for p in pending)
    store.complete_action(pending[0].id, 202.0)
    assert store.pending_actions() == pending[1:]
    assert [e["kind"] for e in store.rollout_log_entries("r-1")] == ["start", "assign"]

    listed = store.list_rollouts(FLEET)
    assert listed[0]["id"] == "r-1" and listed[0]["devices"] == {"ASSIGNED": 1, "PENDING": 9}


def test_a_stale_save_is_refused(store: FleetStore) -> None:
    _fleet_of(store, 3)
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0))
    loaded, revision = store.load_rollout("r-1")
    store.save_rollout(pause(loaded, 201.0).rollout, revision)
    with pytest.raises(ConcurrentUpdateError):
        store.save_rollout(step(loaded, store.fleet_snapshot(FLEET), 202.0).rollout, revision)
    assert store.load_rollout("r-1")[0].state is RolloutState.PAUSED


def test_update_rollout_retries_over_a_concurrent_writer(store: FleetStore) -> None:
    _fleet_of(store, 3)
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0))
    calls = []

    def decide(rollout: Any) -> Any:
        calls.append(rollout.state)
        if len(calls) == 1:  # someone else pauses it while we decide
            other, revision = store.load_rollout("r-1")
            store.save_rollout(pause(other, 201.0).rollout, revision)
        return step(rollout, store.fleet_snapshot(FLEET), 202.0)

    decision = store.update_rollout("r-1", decide)
    assert calls == [RolloutState.RUNNING, RolloutState.PAUSED]
    assert decision.actions == [] and store.load_rollout("r-1")[0].state is RolloutState.PAUSED


def test_abort_writes_rollbacks_to_the_outbox(store: FleetStore) -> None:
    _fleet_of(store, 10)
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0))
    store.update_rollout("r-1", lambda r: step(r, store.fleet_snapshot(FLEET), 201.0))
    decision = store.update_rollout("r-1", lambda r: abort(r, 202.0))
    rollbacks = [p.action for p in store.pending_actions() if isinstance(p.action, RollbackDevice)]
    assert rollbacks == [a for a in decision.actions if isinstance(a, RollbackDevice)] and len(rollbacks) == 1
    assert rollbacks[0].version == "1.0"
    assert store.load_rollout("r-1")[0].count(DeviceStatus.ROLLBACK_SENT) == 1


def test_one_live_rollout_per_bundle_and_fleet_and_superseding(store: FleetStore) -> None:
    _fleet_of(store, 2)
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0))
    with pytest.raises(BadInputError, match="r-1"):
        store.create_rollout(new_rollout("r-2", FLEET, "digits", "3.0", RolloutPolicy(), 201.0))
    store.create_rollout(new_rollout("r-other", FLEET, "other-model", "1.0", RolloutPolicy(), 201.0))
    store.create_rollout(new_rollout("r-elsewhere", "fleet2", "digits", "3.0", RolloutPolicy(), 201.0))
    assert store.live_rollout_ids() == ["r-1", "r-elsewhere", "r-other"]
    # Complete r-1 by hand, then a newer rollout supersedes it.
    loaded, revision = store.load_rollout("r-1")
    from dataclasses import replace
    store.save_rollout(replace(loaded, state=RolloutState.COMPLETED), revision)
    assert "r-1" in store.live_rollout_ids()
    store.create_rollout(new_rollout("r-2", FLEET, "digits", "3.0", RolloutPolicy(), 300.0))
    assert "r-1" not in store.live_rollout_ids() and "r-2" in store.live_rollout_ids()
    assert [r["id"] for r in store.list_rollouts(states=["COMPLETED"])] == ["r-1"]
    with pytest.raises(BadInputError):
        store.load_rollout("r-nope")


def test_enqueue_actions_outside_a_rollout(store: FleetStore) -> None:
    store.enqueue_actions(FLEET, [AssignVersion("d1", "digits", "2.0", "deploy")], 5.0, abtest_id="ab-1")
    [pending] = store.pending_actions()
    assert pending.abtest_id == "ab-1" and pending.action.device == "d1"


# -- A/B tests ---------------------------------------------------------------------------------

def test_abtest_crud_and_windows(store: FleetStore) -> None:
    test = ABTest(id="ab-1", fleet=FLEET, a=Arm("digits", "1.0"), b=Arm("digits", "2.0"), metric=Metric.ACCURACY,
                  split_pct=30, min_samples=40, created_at=50.0, selection=(("site", "x"),))
    store.create_abtest(test)
    loaded, promoted = store.get_abtest("ab-1")
    assert loaded == test and promoted is None
    store.set_abtest_state("ab-1", "PROMOTED", 60.0, promoted_rollout="r-9")
    assert store.get_abtest("ab-1")[1] == "r-9"
    assert [t.id for t in store.list_abtests(FLEET, states=["PROMOTED"])] == ["ab-1"]
    with pytest.raises(BadInputError):
        store.get_abtest("ab-x")

    store.ingest([item("a", telemetry("1.0", 50, 1, 3.0, correct=45), at=100.0),
                  item("b", telemetry("2.0", 60, 0, 2.0, correct=58), at=101.0)])
    windows = sorted(store.telemetry_windows(FLEET, since=0.0), key=lambda w: w.device)
    assert [(w.device, w.version, w.requests, w.feedback_correct, w.feedback_total) for w in windows] == [
        ("a", "1.0", 50, 45, 50), ("b", "2.0", 60, 58, 60)]
    assert windows[0].latency.count == 1
    store.set_tags("a", {"site": "x"})
    assert [w.device for w in store.telemetry_windows(FLEET, (("site", "x"),))] == ["a"]


def test_fleet_summary_for_metrics(store: FleetStore) -> None:
    store.ingest([item("a", StatusMessage("online")), item("b", StatusMessage("offline")),
                  item("c", StatusMessage("online"), fleet="other"),
                  item("a", reported("a", "2.0")), item("b", reported("b", "1.0")),
                  item("a", telemetry("2.0", 10, 1, 4.0, 4.0), at=50.0),
                  item("a", telemetry("2.0", 20, 0, 8.0), at=150.0),
                  item("b", telemetry("1.0", 5, 5, 300.0), at=160.0)])
    summary = store.fleet_summary(since=100.0)
    mine = summary[FLEET]
    assert (mine["devices"], mine["online"], mine["requests"], mine["errors"]) == (2, 1, 25, 5)
    assert mine["versions"] == {"digits:2.0": 1, "digits:1.0": 1}
    assert mine["latency"].count == 2
    assert summary["other"]["versions"] == {"none": 1} and summary["other"]["online"] == 1


def test_rollouts_and_abtests_of_one_bundle_exclude_each_other(store: FleetStore) -> None:
    from dataclasses import replace

    def abtest(test_id: str) -> ABTest:
        return ABTest(id=test_id, fleet=FLEET, a=Arm("digits", "1.0"), b=Arm("digits", "2.0"),
                      metric=Metric.ERROR_RATE, created_at=10.0)

    store.create_rollout(new_rollout("r-1", FLEET, "digits", "1.0", RolloutPolicy(), 1.0))
    with pytest.raises(BadInputError, match="r-1"):
        store.create_abtest(abtest("ab-1"))
    loaded, revision = store.load_rollout("r-1")
    store.save_rollout(replace(loaded, state=RolloutState.COMPLETED), revision)
    store.create_abtest(abtest("ab-1"))
    assert "r-1" not in store.live_rollout_ids()  # the test now decides what joiners get
    with pytest.raises(BadInputError, match="ab-1"):
        store.create_rollout(new_rollout("r-2", FLEET, "digits", "3.0", RolloutPolicy(), 20.0))
    store.create_rollout(new_rollout("r-other", FLEET, "other", "1.0", RolloutPolicy(), 20.0))
    with pytest.raises(BadInputError):
        store.create_rollout(new_rollout("r-3", FLEET, "other", "2.0", RolloutPolicy(), 20.0),
                             promote_abtest="ab-1")
    store.create_rollout(new_rollout("r-2", FLEET, "digits", "2.0", RolloutPolicy(), 30.0), promote_abtest="ab-1")
    test, promoted = store.get_abtest("ab-1")
    assert (test.state, promoted) == ("PROMOTED", "r-2")


def test_a_step_that_changes_nothing_writes_nothing(store: FleetStore) -> None:
    _fleet_of(store, 3)
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", RolloutPolicy(), 200.0))
    store.update_rollout("r-1", lambda r: step(r, store.fleet_snapshot(FLEET), 201.0))
    revision = store.load_rollout("r-1")[1]
    store.update_rollout("r-1", lambda r: step(r, store.fleet_snapshot(FLEET), 202.0))  # canary still silent
    assert store.load_rollout("r-1")[1] == revision


def test_reconcile_abtest_queues_each_arm_assignment_once(store: FleetStore) -> None:
    _fleet_of(store, 30)
    test = ABTest(id="ab-1", fleet=FLEET, a=Arm("digits", "1.0"), b=Arm("digits", "2.0"), metric=Metric.ACCURACY,
                  created_at=5.0)
    store.create_abtest(test)
    queued = store.reconcile_abtest("ab-1", 10.0)
    expected = sorted(d.id for d in store.list_devices(FLEET) if assign_arm("ab-1", d.id, 50) == "B")
    assert sorted(a.device for a in queued) == expected and {a.version for a in queued} == {"2.0"}
    assert store.reconcile_abtest("ab-1", 11.0) == []  # still in the outbox: not queued twice
    for pending in store.pending_actions():
        store.record_desired(fleet=FLEET, device=pending.action.device, sequence=1, name="digits", version="2.0",
                             issued_at=12.0, abtest_id="ab-1")
        store.complete_action(pending.id, 12.0)
    assert store.reconcile_abtest("ab-1", 13.0) == []  # published: not queued again
    store.ingest([item("late", reported("late", "1.0"))])
    late = store.reconcile_abtest("ab-1", 14.0)
    assert [a.device for a in late] == (["late"] if assign_arm("ab-1", "late", 50) == "B" else [])
    store.set_abtest_state("ab-1", "STOPPED", 15.0)
    assert store.reconcile_abtest("ab-1", 16.0) == []


def test_reconcile_rollout_uses_the_recent_telemetry(store: FleetStore) -> None:
    _fleet_of(store, 10)
    policy = RolloutPolicy(health=HealthGates(max_error_rate=0.1, min_requests=10))
    store.create_rollout(new_rollout("r-1", FLEET, "digits", "2.0", policy, 100.0))
    # An old burst of errors on 2.0 (before the window) must not abort; a recent one must.
    store.ingest([item("d00", telemetry("2.0", 100, 50, 1.0), at=150.0)])
    assert store.reconcile_rollout("r-1", 2000.0, telemetry_window_s=900).rollout.state is RolloutState.RUNNING
    store.ingest([item("d00", telemetry("2.0", 100, 50, 1.0), at=1990.0)])
    decision = store.reconcile_rollout("r-1", 2001.0, telemetry_window_s=900)
    assert decision.rollout.state is RolloutState.ABORTED and "error rate" in (decision.rollout.reason or "")


def test_two_replicas_never_claim_the_same_action(store: FleetStore) -> None:
    store.enqueue_actions(FLEET, [AssignVersion(f"d{i:03d}", "digits", "2.0", "deploy") for i in range(200)], 1.0)
    claimed: dict = {"one": [], "two": []}

    def replica(owner: str) -> None:
        # until the outbox is empty: a claim that lost the race to the other replica returns
        # nothing and is tried again (bounded, so a bug cannot hang the test)
        for _ in range(2000):
            got = store.claim_actions(owner, now=10.0, limit=7)
            for pending in got:
                claimed[owner].append(pending.id)
                store.complete_action(pending.id, 10.0)
            if not got and not store.pending_actions(limit=1):
                return

    threads = [threading.Thread(target=replica, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    one, two = set(claimed["one"]), set(claimed["two"])
    assert not one & two and len(one | two) == 200


def test_a_dead_replicas_claims_expire(store: FleetStore) -> None:
    store.enqueue_actions(FLEET, [AssignVersion("d1", "digits", "2.0", "deploy")], 1.0)
    assert len(store.claim_actions("dead", now=10.0)) == 1
    assert store.claim_actions("alive", now=20.0, lease_s=60) == []
    [taken] = store.claim_actions("alive", now=80.0, lease_s=60)
    store.complete_action(taken.id, 80.0)
    assert store.claim_actions("other", now=1000.0) == [] and store.pending_actions() == []


def test_a_second_running_abtest_of_a_bundle_is_refused_whatever_its_selection(store: FleetStore) -> None:
    """Two running tests of one bundle would each assign the devices both select, back and
    forth every tick: refused in the store's transaction (not only by the CLI)."""
    store.create_abtest(ABTest(id="ab-1", fleet=FLEET, a=Arm("digits", "1.0"), b=Arm("digits", "2.0"),
                               metric=Metric.ERROR_RATE, created_at=10.0))
    with pytest.raises(BadInputError, match="A/B test ab-1 of digits already runs on fleet"):
        store.create_abtest(ABTest(id="ab-2", fleet=FLEET, a=Arm("digits", "1.0"), b=Arm("digits", "3.0"),
                                   metric=Metric.ERROR_RATE, created_at=11.0, selection=(("site", "x"),)))
    store.create_abtest(ABTest(id="ab-3", fleet=FLEET, a=Arm("other", "1.0"), b=Arm("other", "2.0"),
                               metric=Metric.ERROR_RATE, created_at=12.0))  # another bundle: fine
    store.create_abtest(ABTest(id="ab-4", fleet="elsewhere", a=Arm("digits", "1.0"), b=Arm("digits", "2.0"),
                               metric=Metric.ERROR_RATE, created_at=13.0))  # another fleet: fine


# -- Store URLs the store cannot use are one clear line, never a traceback.

@pytest.mark.parametrize("url", ["mysql://x@127.0.0.1/db", "oracle://x@h/db", "mssql+pyodbc://x@h/db"])
def test_unsupported_databases_are_bad_input(url: str) -> None:
    with pytest.raises(BadInputError, match="sqlite:/// or postgresql://"):
        FleetStore(url)


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not SQLite at all\n" * 100)
    with pytest.raises(EdgeshipError, match="cannot open the store"):
        FleetStore(f"sqlite:///{junk}")
    result = CliRunner().invoke(main, ["rollout", "ls", "--db", f"sqlite:///{junk}"])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot open the store")
    assert result.stderr.count("\n") == 1
    assert junk.read_bytes() == b"this is not SQLite at all\n" * 100  # nothing lost


def test_an_unreachable_postgresql_is_one_line() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(EdgeshipError, match="cannot open the store") as caught:
        FleetStore("postgresql://nobody@127.0.0.1:1/fleet")
    assert "\n" not in caught.value.message and "\t" not in caught.value.message
