"""The rollout engine, table by table: (rollout state, fleet snapshot, now) -> actions and next state.

Each table row builds a rollout in a given state from a compact description so
that a row reads as the situation it tests. No clock, no store, no broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.rollouts import (
    AbortRollout,
    AdvanceStage,
    AssignVersion,
    CompleteRollout,
    DeviceRecord,
    DeviceSnapshot,
    DeviceStatus,
    FailureThreshold,
    HealthGates,
    PauseRollout,
    ResumeRollout,
    RollbackDevice,
    RollbackRollout,
    Rollout,
    RolloutPolicy,
    RolloutState,
    VersionTelemetry,
    abort,
    action_from_dict,
    new_rollout,
    parse_duration,
    parse_stages,
    pause,
    resume,
    rollback,
    stage_progress,
    stage_targets,
    step,
)

NAME, NEW, OLD = "digits", "2.0", "1.0"
S = DeviceStatus
T0 = 1000.0


def snap(device: str, version: str | None = OLD, *, online: bool = True, update: str | None = None,
         update_version: str = NEW, at: float | None = None, name: str = NAME,
         telemetry: Sequence[VersionTelemetry] = ()) -> DeviceSnapshot:
    return DeviceSnapshot(device, online=online, active_name=name if version else None, active_version=version,
                          update_state=update, update_name=NAME if update else None,
                          update_version=update_version if update else None, reported_at=at,
                          telemetry=tuple(telemetry))


def fleet(n: int, version: str = OLD, **kwargs: Any) -> list[DeviceSnapshot]:
    return [snap(f"d{i:02d}", version, **kwargs) for i in range(n)]


def rec(device: str, status: str, stage: int | None = 0, assigned_at: float | None = T0,
        previous: str | None = OLD) -> DeviceRecord:
    moved = DeviceStatus(status) not in (S.PENDING, S.ALREADY, S.SKIPPED)
    return DeviceRecord(device, DeviceStatus(status), stage=stage if moved else None,
                        assigned_at=assigned_at if moved else None,
                        previous_name=NAME if moved and previous else None,
                        previous_version=previous if moved else None, updated_at=T0)


def rollout(records: Sequence[DeviceRecord] = (), *, state: str = "RUNNING", stage: int = 0,
            stage_started_at: float = T0, **policy: Any) -> Rollout:
    base = new_rollout("r-test", "fleet1", NAME, NEW, RolloutPolicy(**policy), T0)
    return replace(base, state=RolloutState(state), stage=stage, stage_started_at=stage_started_at,
                   devices={r.device: r for r in records})


def kinds(actions: Sequence[Any]) -> list[str]:
    return [a.kind for a in actions]


def statuses(r: Rollout) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in r.devices.values():
        counts[record.status.value] = counts.get(record.status.value, 0) + 1
    return counts


def hist(latency_ms: float, n: int) -> LatencyHistogram:
    h = LatencyHistogram()
    for _ in range(n):
        h.observe(latency_ms)
    return h


# -- stage sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stages, population, expected", [
    ((5, 25, 100), 10, [1, 3, 10]),
    ((5, 25, 100), 100, [5, 25, 100]),
    ((5, 25, 100), 1000, [50, 250, 1000]),
    ((5, 25, 100), 2, [1, 2, 2]),          # each stage moves at least one more, capped at N
    ((5, 25, 100), 1, [1, 1, 1]),
    ((5, 25, 100), 0, [0, 0, 0]),
    ((1, 2, 3, 100), 10, [1, 2, 3, 10]),   # 1% of 10 rounds up; later stages at least +1
    ((50, 100), 5, [3, 5]),                # ceil(2.5)
    ((33.3, 100), 3, [1, 3]),
    ((100,), 7, [7]),
])
def test_stage_targets(stages: tuple[float, ...], population: int, expected: list[int]) -> None:
    assert stage_targets(stages, population) == expected


# -- parsing and validation ----------------------------------------------------------------------

@pytest.mark.parametrize("text, failures, moved, exceeded", [
    ("10%", 1, 10, False), ("10%", 2, 10, True), ("10%", 1, 1, True), ("10%", 0, 0, False),
    ("0%", 1, 100, True), ("0", 1, 100, True), ("0", 0, 100, False),
    ("3", 3, 5, False), ("3", 4, 100, True), ("100%", 10, 10, False),
])
def test_failure_threshold(text: str, failures: int, moved: int, exceeded: bool) -> None:
    assert FailureThreshold.parse(text).exceeded(failures, moved) is exceeded


@pytest.mark.parametrize("text", ["ten", "5.5", "-1", "120%", "%", ""])
def test_failure_threshold_refuses(text: str) -> None:
    with pytest.raises(BadInputError):
        FailureThreshold.parse(text)


@pytest.mark.parametrize("text, expected", [
    ("max_error_rate=0.05", HealthGates(max_error_rate=0.05)),
    ("max_error_rate=5%,max_p95_ratio=1.5", HealthGates(max_error_rate=0.05, max_p95_ratio=1.5)),
    (" max_p95_ratio = 2 , min_requests=10 ", HealthGates(max_p95_ratio=2.0, min_requests=10)),
    ("", HealthGates()),
])
def test_health_gates_parse(text: str, expected: HealthGates) -> None:
    assert HealthGates.parse(text) == expected


@pytest.mark.parametrize("text", ["max_error_rate", "latency=3", "max_error_rate=x", "max_error_rate=2",
                                  "max_p95_ratio=0", "min_requests=0", "max_p95_ratio=nan", "max_p95_ratio=inf",
                                  "max_error_rate=nan"])
def test_health_gates_refuse(text: str) -> None:
    with pytest.raises(BadInputError):
        HealthGates.parse(text)


@pytest.mark.parametrize("policy", [
    dict(stages=()), dict(stages=(5, 25)), dict(stages=(25, 5, 100)), dict(stages=(0, 100)),
    dict(stages=(5, 5, 100)), dict(stages=(50, 150)), dict(success_threshold_pct=0),
    dict(success_threshold_pct=101), dict(stage_timeout_s=0), dict(bake_s=-1),
])
def test_policy_refuses(policy: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        RolloutPolicy(**policy)


def test_policy_round_trip() -> None:
    policy = RolloutPolicy(stages=(10, 100), success_threshold_pct=75, max_failures=FailureThreshold(count=2),
                           health=HealthGates(max_error_rate=0.1, max_p95_ratio=1.2, min_requests=7),
                           stage_timeout_s=60, bake_s=5)
    assert RolloutPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                           ("1.5h", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "5w", "-3m", "m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(BadInputError):
        parse_duration(text)


def test_parse_stages() -> None:
    assert parse_stages("5, 25,100") == (5.0, 25.0, 100.0)
    with pytest.raises(BadInputError):
        parse_stages("5,x,100")


# -- the first steps -----------------------------------------------------------------------------

# (description, fleet, expected action kinds, expected statuses after)
FIRST_STEP = [
    ("10 devices: stage 1 (5%) moves one", fleet(10), ["assign"], {"ASSIGNED": 1, "PENDING": 9}),
    ("100 devices: 5 move", fleet(100), ["assign"] * 5, {"ASSIGNED": 5, "PENDING": 95}),
    ("already on the version: not moved, not counted",
     fleet(3, NEW) + [snap("x")], ["assign"], {"ALREADY": 3, "ASSIGNED": 1}),
    ("a newer version is never downgraded", [snap("a", "3.0"), snap("b")], ["assign"],
     {"SKIPPED": 1, "ASSIGNED": 1}),
    ("another bundle's device is moved (its model is replaced)", [snap("a", "7.0", name="other")], ["assign"],
     {"ASSIGNED": 1}),
    ("a device with no model at all is moved", [snap("a", None)], ["assign"], {"ASSIGNED": 1}),
    ("empty selection waits for devices (it does not complete)", [], [], {}),
    ("every device already on the version completes", fleet(4, NEW), ["complete"], {"ALREADY": 4}),
]


@pytest.mark.parametrize("devices, expected_kinds, expected_statuses",
                         [pytest.param(f, k, s, id=d) for d, f, k, s in FIRST_STEP])
def test_first_step(devices: list[DeviceSnapshot], expected_kinds: list[str],
                    expected_statuses: dict[str, int]) -> None:
    decision = step(rollout(), devices, T0 + 1)
    assert kinds(decision.actions) == expected_kinds
    assert statuses(decision.rollout) == expected_statuses
    for action in decision.actions:
        if isinstance(action, AssignVersion):
            assert (action.name, action.version, action.stage) == (NAME, NEW, 0)
            record = decision.rollout.devices[action.device]
            assert record.assigned_at == T0 + 1
    expected_state = RolloutState.COMPLETED if expected_kinds == ["complete"] else RolloutState.RUNNING
    assert decision.rollout.state is expected_state


def test_assignment_remembers_the_previous_version() -> None:
    decision = step(rollout(), [snap("a", "7.0", name="other")], T0)
    record = decision.rollout.devices["a"]
    assert (record.previous_name, record.previous_version) == ("other", "7.0")


def test_online_devices_are_moved_before_offline_ones() -> None:
    devices = fleet(19, online=False) + [snap("z-online")]
    decision = step(rollout(), devices, T0)
    assert [a.device for a in decision.actions] == ["z-online"]


def test_offline_devices_are_moved_when_no_online_one_is_left() -> None:
    decision = step(rollout(), fleet(3, online=False), T0)
    assert kinds(decision.actions) == ["assign"]


def test_order_is_stable_and_differs_between_rollouts() -> None:
    devices = fleet(40)
    first = step(rollout(), devices, T0).actions
    again = step(rollout(), list(reversed(devices)), T0).actions
    assert [a.device for a in first] == [a.device for a in again]
    other = replace(rollout(), id="r-other")
    picks = {step(replace(other, id=f"r-{i}"), devices, T0).actions[0].device for i in range(10)}
    assert len(picks) > 1, "every rollout would pick the same canary"


# -- device outcomes ------------------------------------------------------------------------------

# (description, record before, snapshot, now, expected status)
OUTCOMES = [
    ("COMMITTED report -> SUCCEEDED", rec("a", "ASSIGNED"), snap("a", NEW, update="COMMITTED", at=T0 + 5), T0 + 6,
     S.SUCCEEDED),
    ("active is the version, no update info -> SUCCEEDED", rec("a", "ASSIGNED"), snap("a", NEW, at=T0 + 5), T0 + 6,
     S.SUCCEEDED),
    ("PROBATION on the new version is not success yet", rec("a", "ASSIGNED"),
     snap("a", NEW, update="PROBATION", at=T0 + 5), T0 + 6, S.IN_PROGRESS),
    ("FETCHING -> IN_PROGRESS", rec("a", "ASSIGNED"), snap("a", update="FETCHING", at=T0 + 5), T0 + 6,
     S.IN_PROGRESS),
    ("FAILED -> FAILED", rec("a", "IN_PROGRESS"), snap("a", update="FAILED", at=T0 + 5), T0 + 6, S.FAILED),
    ("agent ROLLED_BACK (probation failed) -> FAILED", rec("a", "IN_PROGRESS"),
     snap("a", update="ROLLED_BACK", at=T0 + 5), T0 + 6, S.FAILED),
    ("REJECTED -> REJECTED (apart from FAILED)", rec("a", "ASSIGNED"), snap("a", update="REJECTED", at=T0 + 5),
     T0 + 6, S.REJECTED),
    ("a report from before the assignment is stale", rec("a", "ASSIGNED"), snap("a", update="FAILED", at=T0 - 1),
     T0 + 6, S.ASSIGNED),
    ("a report about another version says nothing", rec("a", "ASSIGNED"),
     snap("a", update="FAILED", update_version="1.5", at=T0 + 5), T0 + 6, S.ASSIGNED),
    ("offline and silent before the timeout: still ASSIGNED", rec("a", "ASSIGNED"), snap("a", online=False),
     T0 + 1799, S.ASSIGNED),
    ("silent at the timeout -> TIMED_OUT", rec("a", "ASSIGNED"), snap("a", online=False), T0 + 1800, S.TIMED_OUT),
    ("stuck in progress at the timeout -> TIMED_OUT", rec("a", "IN_PROGRESS"),
     snap("a", update="VERIFYING", at=T0 + 5), T0 + 1800, S.TIMED_OUT),
    ("a late success after the timeout still counts", rec("a", "TIMED_OUT"),
     snap("a", NEW, update="COMMITTED", at=T0 + 4000), T0 + 4001, S.SUCCEEDED),
    ("a committed device that rolls itself back later turns FAILED", rec("a", "SUCCEEDED"),
     snap("a", update="ROLLED_BACK", at=T0 + 50), T0 + 51, S.FAILED),
    ("IDLE says nothing", rec("a", "ASSIGNED"), snap("a", update="IDLE", at=T0 + 5), T0 + 6, S.ASSIGNED),
]


@pytest.mark.parametrize("before, device, now, expected",
                         [pytest.param(b, s, n, e, id=d) for d, b, s, n, e in OUTCOMES])
def test_device_outcome(before: DeviceRecord, device: DeviceSnapshot, now: float, expected: DeviceStatus) -> None:
    # max_failures 5 and two extra quiet devices keep the rollout from deciding anything else here.
    others = [rec("q1", "ASSIGNED", assigned_at=now), rec("q2", "ASSIGNED", assigned_at=now)]
    r = rollout([before] + others, max_failures=FailureThreshold(count=5), stages=(100,))
    decision = step(r, [device, snap("q1"), snap("q2")], now)
    assert decision.rollout.devices["a"].status is expected


# -- stage decisions -----------------------------------------------------------------------------

def _stage_case(records: list[DeviceRecord], devices: list[DeviceSnapshot], now: float, **policy: Any) -> Any:
    return step(rollout(records, **policy), devices, now)


# (description, records, snapshots, now, policy, expected kinds, expected state)
STAGES = [
    ("stage 1 succeeded: advance and move stage 2's devices",
     [rec("d00", "ASSIGNED")] + [rec(f"d{i:02d}", "PENDING") for i in range(1, 10)],
     [snap("d00", NEW, update="COMMITTED", at=T0 + 1)] + fleet(10)[1:], T0 + 2, {},
     ["advance", "assign", "assign"], "RUNNING"),
    ("stage 1 still in progress: wait",
     [rec("d00", "ASSIGNED")] + [rec(f"d{i:02d}", "PENDING") for i in range(1, 10)],
     [snap("d00", update="INSTALLING", at=T0 + 1)] + fleet(10)[1:], T0 + 2, {}, [], "RUNNING"),
    ("below the threshold with devices unresolved: wait",
     [rec(f"d{i}", "ASSIGNED") for i in range(5)] + [rec(f"p{i}", "PENDING") for i in range(5)],
     [snap(f"d{i}", NEW, update="COMMITTED", at=T0 + 1) for i in range(3)] + [snap("d3", update="FAILED", at=T0 + 1),
                                                                              snap("d4")] + fleet(0)
     + [snap(f"p{i}") for i in range(5)], T0 + 2,
     dict(stages=(50, 100), success_threshold_pct=80, max_failures=FailureThreshold(count=5)), [], "RUNNING"),
    ("reaching the threshold advances without waiting for the rest",
     [rec(f"d{i}", "ASSIGNED") for i in range(5)] + [rec(f"p{i}", "PENDING") for i in range(5)],
     [snap(f"d{i}", NEW, update="COMMITTED", at=T0 + 1) for i in range(4)] + [snap("d4")]
     + [snap(f"p{i}") for i in range(5)], T0 + 2,
     dict(stages=(50, 100), success_threshold_pct=80), ["advance"] + ["assign"] * 5, "RUNNING"),
    ("stage resolved below the threshold (a timeout): abort and roll back",
     [rec(f"d{i}", "ASSIGNED") for i in range(5)] + [rec(f"p{i}", "PENDING") for i in range(5)],
     [snap(f"d{i}", NEW, update="COMMITTED", at=T0 + 1) for i in range(3)] + [snap("d3", update="FAILED", at=T0 + 1),
                                                                              snap("d4", online=False)]
     + [snap(f"p{i}") for i in range(5)], T0 + 1800,
     dict(stages=(50, 100), success_threshold_pct=80, max_failures=FailureThreshold(count=5)),
     ["abort"] + ["rollback"] * 5, "ABORTED"),
    ("last stage succeeded: complete",
     [rec("d00", "SUCCEEDED"), rec("d01", "ASSIGNED", stage=1)],
     [snap("d00", NEW), snap("d01", NEW, update="COMMITTED", at=T0 + 1)], T0 + 2, dict(stages=(50, 100)),
     ["complete"], "COMPLETED"),
    ("two devices, three stages: the empty third stage is not waited for",
     [rec("a", "SUCCEEDED"), rec("b", "ASSIGNED", stage=1)],
     [snap("a", NEW), snap("b", NEW, update="COMMITTED", at=T0 + 1)], T0 + 2, {}, ["complete"], "COMPLETED"),
    ("bake time not over: no advance",
     [rec("d00", "ASSIGNED"), rec("d01", "PENDING")], [snap("d00", NEW, update="COMMITTED", at=T0 + 1), snap("d01")],
     T0 + 59, dict(stages=(50, 100), bake_s=60), [], "RUNNING"),
    ("bake time over: advance",
     [rec("d00", "ASSIGNED"), rec("d01", "PENDING")], [snap("d00", NEW, update="COMMITTED", at=T0 + 1), snap("d01")],
     T0 + 60, dict(stages=(50, 100), bake_s=60), ["advance", "assign"], "RUNNING"),
    ("one device succeeds through every stage in one step when stages are tiny",
     [rec("a", "ASSIGNED")], [snap("a", NEW, update="COMMITTED", at=T0 + 1)], T0 + 2, {}, ["complete"], "COMPLETED"),
]


@pytest.mark.parametrize("records, devices, now, policy, expected_kinds, expected_state",
                         [pytest.param(r, f, n, p, k, s, id=d) for d, r, f, n, p, k, s in STAGES])
def test_stage_decision(records: list[DeviceRecord], devices: list[DeviceSnapshot], now: float,
                        policy: dict[str, Any], expected_kinds: list[str], expected_state: str) -> None:
    decision = _stage_case(records, devices, now, **policy)
    assert kinds(decision.actions) == expected_kinds
    assert decision.rollout.state is RolloutState(expected_state)


def test_advance_assigns_into_the_next_stage_and_resets_its_clock() -> None:
    records = [rec("d00", "ASSIGNED")] + [rec(f"d{i:02d}", "PENDING") for i in range(1, 10)]
    devices = [snap("d00", NEW, update="COMMITTED", at=T0 + 1)] + fleet(10)[1:]
    decision = step(rollout(records), devices, T0 + 2)
    advance = decision.actions[0]
    assert isinstance(advance, AdvanceStage) and (advance.from_stage, advance.to_stage) == (0, 1)
    assert decision.rollout.stage == 1 and decision.rollout.stage_started_at == T0 + 2
    assert all(a.stage == 1 for a in decision.actions[1:])
    progress = stage_progress(decision.rollout)
    assert [p.target for p in progress] == [1, 3, 10]
    assert progress[0].counts == {"SUCCEEDED": 1} and progress[1].counts == {"ASSIGNED": 2}


# -- aborts: failure threshold and health gates --------------------------------------------------

def _telemetry(version: str, requests: int, errors: int, latency_ms: float) -> VersionTelemetry:
    return VersionTelemetry(NAME, version, requests, errors, hist(latency_ms, requests))


FIVE_MOVED = [rec(f"d{i}", "SUCCEEDED") for i in range(5)]

# (description, records, snapshots, policy, expected kinds, reason fragment)
ABORTS = [
    ("one failure of one moved device is above 10%", [rec("a", "ASSIGNED")],
     [snap("a", update="FAILED", at=T0 + 1)], {}, ["abort", "rollback"], "1 failed, 0 rejected"),
    ("REJECTED counts toward the threshold, reported apart", [rec("a", "ASSIGNED")],
     [snap("a", update="REJECTED", at=T0 + 1)], {}, ["abort", "rollback"], "0 failed, 1 rejected"),
    ("max_failures 1 tolerates one failure",
     FIVE_MOVED + [rec("x", "ASSIGNED")], [snap(f"d{i}", NEW) for i in range(5)]
     + [snap("x", update="FAILED", at=T0 + 1)],
     dict(max_failures=FailureThreshold(count=1), stages=(100,), success_threshold_pct=80), ["complete"], None),
    ("tolerated failures still count against the success threshold",
     FIVE_MOVED + [rec("x", "ASSIGNED")], [snap(f"d{i}", NEW) for i in range(5)]
     + [snap("x", update="FAILED", at=T0 + 1)], dict(max_failures=FailureThreshold(count=1), stages=(100,)),
     ["abort"] + ["rollback"] * 6, "only 5 of 6 devices succeeded"),
    ("max_failures 1 aborts at the second failure",
     FIVE_MOVED[:4] + [rec("x", "ASSIGNED"), rec("y", "ASSIGNED")], [snap(f"d{i}", NEW) for i in range(4)]
     + [snap("x", update="FAILED", at=T0 + 1), snap("y", update="REJECTED", at=T0 + 1)],
     dict(max_failures=FailureThreshold(count=1), stages=(100,)), ["abort"] + ["rollback"] * 6,
     "2 of 6 moved devices failed"),
    ("error rate above the gate",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 200, 20, 5.0)])] + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_error_rate=0.05), stages=(100,)), ["abort"] + ["rollback"] * 5, "error rate 10.00%"),
    ("error rate above the gate but too few requests",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 50, 20, 5.0)])] + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_error_rate=0.05), stages=(100,)), ["complete"], None),
    ("error rate at the gate passes",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 200, 10, 5.0)])] + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_error_rate=0.05), stages=(100,)), ["complete"], None),
    ("p95 twice the previous version's",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 300, 0, 18.0), _telemetry(OLD, 300, 0, 9.0)])]
     + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_p95_ratio=1.5), stages=(100,)), ["abort"] + ["rollback"] * 5, "above max_p95_ratio"),
    ("p95 slightly worse passes",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 300, 0, 9.5), _telemetry(OLD, 300, 0, 9.0)])]
     + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_p95_ratio=1.5), stages=(100,)), ["complete"], None),
    ("p95 gate needs baseline samples too",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 300, 0, 50.0), _telemetry(OLD, 10, 0, 5.0)])]
     + [snap(f"d{i}", NEW) for i in range(1, 5)],
     dict(health=HealthGates(max_p95_ratio=1.5), stages=(100,)), ["complete"], None),
    ("baseline merged over several devices' histograms",
     FIVE_MOVED, [snap("d0", NEW, telemetry=[_telemetry(NEW, 100, 0, 40.0)]),
                  snap("d1", NEW, telemetry=[_telemetry(OLD, 60, 0, 9.0)]),
                  snap("d2", NEW, telemetry=[_telemetry(OLD, 60, 0, 9.0)])] + [snap(f"d{i}", NEW) for i in (3, 4)],
     dict(health=HealthGates(max_p95_ratio=2.0), stages=(100,)), ["abort"] + ["rollback"] * 5, "p95 latency"),
]


@pytest.mark.parametrize("records, devices, policy, expected_kinds, fragment",
                         [pytest.param(r, f, p, k, x, id=d) for d, r, f, p, k, x in ABORTS])
def test_abort_decision(records: list[DeviceRecord], devices: list[DeviceSnapshot], policy: dict[str, Any],
                        expected_kinds: list[str], fragment: str | None) -> None:
    decision = step(rollout(records, **policy), devices, T0 + 2)
    assert kinds(decision.actions) == expected_kinds
    if fragment is None:
        return
    assert decision.rollout.state is RolloutState.ABORTED
    first = decision.actions[0]
    assert isinstance(first, AbortRollout) and fragment in first.reason, first.reason
    assert decision.rollout.reason == first.reason
    for action in decision.actions[1:]:
        assert isinstance(action, RollbackDevice) and (action.name, action.version) == (NAME, OLD)
        assert decision.rollout.devices[action.device].status is S.ROLLBACK_SENT


def test_abort_rolls_back_each_device_to_its_own_previous_version() -> None:
    records = [rec("a", "SUCCEEDED", previous="1.0"), rec("b", "SUCCEEDED", previous="1.5"),
               rec("c", "ASSIGNED", previous=None), rec("d", "ALREADY"), rec("e", "PENDING")]
    records[1] = replace(records[1], previous_name="legacy")
    decision = abort(rollout(records), T0 + 5)
    rollbacks = {a.device: (a.name, a.version) for a in decision.actions if isinstance(a, RollbackDevice)}
    assert rollbacks == {"a": (NAME, "1.0"), "b": ("legacy", "1.5")}
    after = {d: r.status for d, r in decision.rollout.devices.items()}
    assert after == {"a": S.ROLLBACK_SENT, "b": S.ROLLBACK_SENT, "c": S.NO_PREVIOUS, "d": S.ALREADY, "e": S.CANCELLED}


def test_failed_and_timed_out_devices_are_rolled_back_too() -> None:
    # Their desired state still names the new version; a rollback desired state makes it agree again.
    records = [rec("a", "FAILED"), rec("b", "TIMED_OUT"), rec("c", "REJECTED")]
    decision = abort(rollout(records), T0 + 5)
    assert sorted(a.device for a in decision.actions if isinstance(a, RollbackDevice)) == ["a", "b", "c"]


# -- pause, resume, operator commands, terminal states -------------------------------------------

def test_paused_rollout_assigns_nothing_and_does_not_advance() -> None:
    records = [rec("d00", "ASSIGNED")] + [rec(f"d{i:02d}", "PENDING") for i in range(1, 10)]
    devices = [snap("d00", NEW, update="COMMITTED", at=T0 + 1)] + fleet(10)[1:]
    decision = step(rollout(records, state="PAUSED"), devices, T0 + 2)
    assert decision.actions == []
    assert decision.rollout.state is RolloutState.PAUSED
    assert decision.rollout.devices["d00"].status is S.SUCCEEDED  # statuses still follow the devices
    resumed = resume(decision.rollout, T0 + 3)
    assert kinds(resumed.actions) == ["resume"]
    assert kinds(step(resumed.rollout, devices, T0 + 4).actions) == ["advance", "assign", "assign"]


def test_paused_rollout_still_aborts_on_failures() -> None:
    decision = step(rollout([rec("a", "ASSIGNED")], state="PAUSED"), [snap("a", update="FAILED", at=T0 + 1)], T0 + 2)
    assert kinds(decision.actions) == ["abort", "rollback"]


@pytest.mark.parametrize("command, state, allowed, next_state", [
    (pause, "RUNNING", True, "PAUSED"), (pause, "PAUSED", False, None), (pause, "COMPLETED", False, None),
    (resume, "PAUSED", True, "RUNNING"), (resume, "RUNNING", False, None), (resume, "ABORTED", False, None),
    (abort, "RUNNING", True, "ABORTED"), (abort, "PAUSED", True, "ABORTED"), (abort, "COMPLETED", False, None),
    (abort, "ABORTED", False, None),
    (rollback, "RUNNING", True, "ROLLED_BACK"), (rollback, "COMPLETED", True, "ROLLED_BACK"),
    (rollback, "PAUSED", True, "ROLLED_BACK"), (rollback, "ABORTED", False, None),
    (rollback, "ROLLED_BACK", False, None),
])
def test_operator_commands(command: Any, state: str, allowed: bool, next_state: str | None) -> None:
    r = rollout([rec("a", "SUCCEEDED")], state=state)
    if not allowed:
        with pytest.raises(BadInputError):
            command(r, T0 + 1)
        return
    decision = command(r, T0 + 1)
    assert decision.rollout.state is RolloutState(next_state)


def test_rollback_of_a_completed_rollout_sends_every_moved_device_back() -> None:
    records = [rec("a", "SUCCEEDED"), rec("b", "SUCCEEDED", stage=1), rec("c", "ALREADY")]
    decision = rollback(rollout(records, state="COMPLETED"), T0 + 9)
    assert kinds(decision.actions) == ["rollback_rollout", "rollback", "rollback"]
    assert step(decision.rollout, [snap("a"), snap("b"), snap("c", NEW), snap("new")], T0 + 10).actions == []


@pytest.mark.parametrize("state", ["ABORTED", "ROLLED_BACK"])
def test_terminal_rollouts_emit_nothing(state: str) -> None:
    r = rollout([rec("a", "ROLLBACK_SENT")], state=state)
    decision = step(r, fleet(5) + [snap("a", update="FAILED", at=T0 + 1)], T0 + 10_000)
    assert decision.actions == [] and decision.rollout == r


# -- dynamic selection -----------------------------------------------------------------------------

def test_device_joining_during_the_rollout_grows_the_population() -> None:
    r = step(rollout(), fleet(10), T0).rollout
    decision = step(r, fleet(10) + [snap("late")], T0 + 1)
    assert decision.rollout.devices["late"].status is S.PENDING
    assert decision.rollout.population() == 11


def test_device_joining_after_completion_gets_the_version() -> None:
    r = rollout([rec("a", "SUCCEEDED")], state="COMPLETED")
    decision = step(r, [snap("a", NEW), snap("late"), snap("late-on-it", NEW)], T0 + 99)
    assert [(a.kind, a.device) for a in decision.actions] == [("assign", "late")]
    assert "joined" in decision.actions[0].reason
    assert decision.rollout.devices["late-on-it"].status is S.ALREADY
    assert decision.rollout.state is RolloutState.COMPLETED


def test_pending_device_that_leaves_the_selection_is_skipped_and_may_come_back() -> None:
    r = rollout([rec("a", "ASSIGNED"), rec("b", "PENDING"), rec("c", "PENDING")], stages=(50, 100))
    gone = step(r, [snap("a"), snap("c")], T0 + 1).rollout
    assert gone.devices["b"].status is S.SKIPPED and gone.population() == 2
    back = step(gone, [snap("a"), snap("b"), snap("c")], T0 + 2).rollout
    assert back.devices["b"].status is S.PENDING


def test_moved_device_that_leaves_the_selection_keeps_its_status_and_times_out() -> None:
    r = rollout([rec("a", "ASSIGNED"), rec("b", "SUCCEEDED")], stages=(100,), success_threshold_pct=50)
    decision = step(r, [snap("b", NEW)], T0 + 1)
    assert decision.rollout.devices["a"].status is S.ASSIGNED
    assert decision.rollout.state is RolloutState.COMPLETED  # 1 of 2 succeeded meets 50%


def test_a_device_that_was_pending_and_gets_the_version_elsewhere_becomes_already() -> None:
    r = rollout([rec("a", "ASSIGNED"), rec("b", "PENDING")], stages=(50, 100))
    decision = step(r, [snap("a"), snap("b", NEW)], T0 + 1)
    assert decision.rollout.devices["b"].status is S.ALREADY


# -- whole runs ----------------------------------------------------------------------------------

def _simulate(n: int, fail: set, policy: RolloutPolicy, max_steps: int = 50) -> tuple[Rollout, list[Any]]:
    """Drive the engine against devices that answer one step after they are assigned."""
    r = new_rollout("r-sim", "f", NAME, NEW, policy, 0.0)
    versions = {f"d{i:03d}": OLD for i in range(n)}
    updates: dict[str, tuple[str, float]] = {}
    log: list[Any] = []
    for t in range(1, max_steps):
        devices = [DeviceSnapshot(d, True, NAME, v, *(("",) * 0), update_state=updates.get(d, (None, 0))[0],
                                  update_name=NAME if d in updates else None,
                                  update_version=updates[d][1] if d in updates else None,  # type: ignore[arg-type]
                                  reported_at=float(t) if d in updates else None)
                   for d, v in versions.items()]
        decision = step(r, devices, float(t))
        r = decision.rollout
        log += decision.actions
        for action in decision.actions:
            if isinstance(action, AssignVersion):
                if action.device in fail:
                    updates[action.device] = ("FAILED", NEW)  # type: ignore[assignment]
                else:
                    versions[action.device] = NEW
                    updates[action.device] = ("COMMITTED", NEW)  # type: ignore[assignment]
            elif isinstance(action, RollbackDevice):
                versions[action.device] = action.version
        if r.state in (RolloutState.COMPLETED, RolloutState.ABORTED):
            break
    return r, log


def test_a_healthy_rollout_of_200_devices_runs_its_stages_and_completes() -> None:
    r, log = _simulate(200, set(), RolloutPolicy())
    assert r.state is RolloutState.COMPLETED
    assert kinds(log).count("assign") == 200 and kinds(log).count("advance") == 2
    assert [p.assigned for p in stage_progress(r)] == [10, 40, 150]


def test_a_rollout_whose_devices_fail_stops_at_its_first_stage() -> None:
    r, log = _simulate(200, {f"d{i:03d}" for i in range(200)}, RolloutPolicy())
    assert r.state is RolloutState.ABORTED
    assert kinds(log).count("assign") == 10 and kinds(log).count("rollback") == 10


def test_actions_survive_a_round_trip_through_dicts() -> None:
    from dataclasses import asdict
    for action in [AssignVersion("a", NAME, NEW, "why", 1), RollbackDevice("a", NAME, OLD, "why"),
                   AdvanceStage(0, 1, "why"), CompleteRollout("done"), AbortRollout("bad"),
                   RollbackRollout("undo"), PauseRollout("p"), ResumeRollout("r")]:
        assert action_from_dict(asdict(action)) == action
    with pytest.raises(BadInputError):
        action_from_dict({"kind": "explode"})


def test_a_rollout_started_before_its_devices_report_waits_then_stages() -> None:
    waiting = step(rollout(), [], T0)
    assert waiting.actions == [] and waiting.rollout.state is RolloutState.RUNNING
    assert "no device matches" in (waiting.rollout.reason or "")
    later = step(waiting.rollout, fleet(20), T0 + 60)
    assert kinds(later.actions) == ["assign"]  # 5% of 20, not all 20 at once


# -- invariants under random fleets ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_invariants_under_random_device_behaviour(seed: int) -> None:
    """Random fleets (offline devices, failures, rejections, silence, joiners, leavers): whatever
    happens, a device is assigned at most once, moved devices never exceed the current stage's
    target, an abort rolls back every moved device, and a terminal rollout says nothing more."""
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 60)
    policy = RolloutPolicy(stages=rng.choice([(5, 25, 100), (50, 100), (100,), (1, 10, 50, 100)]),
                           success_threshold_pct=rng.choice([50, 80, 100]),
                           max_failures=rng.choice([FailureThreshold(pct=10), FailureThreshold(count=3),
                                                    FailureThreshold(pct=50)]),
                           stage_timeout_s=rng.choice([5, 20]))
    behaviour = {f"d{i:02d}": rng.choices(["ok", "fail", "reject", "silent", "slow"], [80, 5, 3, 5, 7])[0]
                 for i in range(n)}
    online = {d: rng.random() > 0.1 for d in behaviour}
    versions: dict[str, str | None] = {d: rng.choice([OLD, OLD, OLD, NEW, "0.5", None]) for d in behaviour}
    updates: dict[str, tuple[str, float]] = {}
    assigned_once: dict[str, int] = {}
    present = set(behaviour)
    r = new_rollout("r-rand", "f", NAME, NEW, policy, 0.0)
    finished_at: int | None = None
    for t in range(1, 120):
        if rng.random() < 0.05:  # a device joins
            device = f"j{t:03d}"
            behaviour[device], online[device], versions[device] = "ok", True, OLD
            present.add(device)
        if rng.random() < 0.03 and present:  # a device leaves the selection
            present.discard(rng.choice(sorted(present)))
        devices = []
        for d in sorted(present):
            state, at = updates.get(d, (None, None))
            devices.append(DeviceSnapshot(d, online[d], NAME if versions[d] else None, versions[d],
                                          update_state=state, update_name=NAME if state else None,
                                          update_version=NEW if state else None, reported_at=at))
        before = r
        decision = step(r, devices, float(t))
        r = decision.rollout
        if before.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
            assert decision.actions == [] and r == before
        for action in decision.actions:
            if isinstance(action, AssignVersion):
                assigned_once[action.device] = assigned_once.get(action.device, 0) + 1
                kind = behaviour[action.device]
                if not online[action.device] or kind == "silent":
                    continue
                if kind == "ok":
                    versions[action.device] = NEW
                    updates[action.device] = ("COMMITTED", t + 0.5)
                elif kind == "slow":
                    updates[action.device] = ("FETCHING", t + 0.5)
                else:
                    updates[action.device] = ("FAILED" if kind == "fail" else "REJECTED", t + 0.5)
        if r.state is RolloutState.ABORTED and before.state is not RolloutState.ABORTED:
            moved_before = {d for d, rec in r.devices.items() if rec.status in (S.ROLLBACK_SENT, S.NO_PREVIOUS)}
            rolled = {a.device for a in decision.actions if isinstance(a, RollbackDevice)}
            assert rolled == {d for d in moved_before if r.devices[d].status is S.ROLLBACK_SENT}
            assert all(r.devices[d].previous_version for d in rolled)
            assert "abort" in kinds(decision.actions)
        if r.state is RolloutState.RUNNING and any(isinstance(a, AssignVersion) for a in decision.actions):
            # Assignments never overfill the stage they were made for.
            assert len(r.moved()) <= stage_targets(policy.stages, r.population())[r.stage]
        if r.state in (RolloutState.ABORTED, RolloutState.COMPLETED) and finished_at is None:
            finished_at = t
    assert all(count == 1 for count in assigned_once.values()), assigned_once
    # Every rollout ends: all answer within the timeout, so it completes or aborts.
    assert finished_at is not None, (r.state, r.reason, statuses(r))


# -- reasons: recomputed at every step -------------------------------------------------------------

NEWER = "9.0.0"


@pytest.mark.parametrize("records, devices, now, state, reason_has", [
    # no device yet: waits, and says until when
    ([], [], T0 + 10, "RUNNING", "no device matches the selection yet (ends after 1800 s)"),
    # still none after the stage timeout: ends, and says why
    ([], [], T0 + 1800, "ABORTED", "no device matched the selection within the stage timeout (1800 s)"),
    # stage 2 waits for its devices: the stage-1 "no device" reason is gone
    ([rec("d00", "SUCCEEDED"), rec("d01", "ASSIGNED", stage=1)], fleet(2), T0 + 10, "RUNNING",
     "stage 2: 0 of 1 devices succeeded, waiting for 1"),
    # a device that runs a newer version is skipped, counted and said
    ([], [snap("d00", NEWER), snap("d01", NEW)], T0 + 1, "COMPLETED",
     "no device needed the version: 1 already ran it, 1 skipped (they run a newer version)"),
    ([], [snap("d00", NEWER)], T0 + 1, "COMPLETED",
     "no device needed the version: 0 already ran it, 1 skipped (they run a newer version)"),
    ([rec("d00", "SUCCEEDED", stage=2)], [snap("d00", NEW, update="COMMITTED"), snap("d01", NEWER)], T0 + 1,
     "COMPLETED", "1 skipped (they run a newer version), every other selected device has the version"),
    # without skipped devices the completion says so plainly
    ([], [snap("d00", NEW)], T0 + 1, "COMPLETED", "every selected device already runs the version"),
])
def test_reason_says_what_the_rollout_waits_for_or_why_it_ended(
        records: list[DeviceRecord], devices: list[DeviceSnapshot], now: float, state: str, reason_has: str) -> None:
    start = replace(rollout(records, stage=max([r.stage or 0 for r in records], default=0)),
                    reason="waiting: no device matches the selection yet")
    decision = step(start, devices, now)
    assert decision.rollout.state is RolloutState(state), decision.rollout.reason
    assert reason_has in (decision.rollout.reason or ""), decision.rollout.reason


def test_a_rollout_with_no_device_ends_at_its_stage_timeout_and_queues_nothing() -> None:
    decision = step(rollout(stage_timeout_s=60), [], T0 + 60)
    assert decision.rollout.state is RolloutState.ABORTED
    assert kinds(decision.actions) == ["abort"]
    assert step(rollout(stage_timeout_s=60), [], T0 + 59).rollout.state is RolloutState.RUNNING
