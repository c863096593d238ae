"""Staged rollouts: a pure engine, state in and actions out (see docs/fleet.md).

Nothing here reads a clock, a database or a socket. The controller loads a
:class:`Rollout` and a snapshot of the selected devices from the store, calls
:func:`step` with the current time, persists the returned rollout and carries
out the returned actions (sign and publish desired states). The operator's
commands (:func:`pause`, :func:`resume`, :func:`abort`, :func:`rollback`) are
pure in the same way.

A device moves through these statuses within one rollout::

    PENDING -> ASSIGNED -> IN_PROGRESS -> SUCCEEDED | FAILED | REJECTED
                  \\____________\\_______-> TIMED_OUT (no terminal answer within the stage timeout;
                                                     a late answer still updates it)
    PENDING -> ALREADY (already ran the version) | SKIPPED (left the selection, runs a newer version)
    moved   -> ROLLBACK_SENT (abort/rollback; NO_PREVIOUS when it ran nothing before)
    PENDING -> CANCELLED (the rollout ended before it moved)

The rollout itself: RUNNING <-> PAUSED -> COMPLETED | ABORTED; RUNNING, PAUSED or
COMPLETED -> ROLLED_BACK (operator). ABORTED and ROLLED_BACK are terminal; a
COMPLETED rollout has no more stages but still gives its version to devices that
join the selection later (until a newer rollout of the same bundle supersedes it).
"""

from __future__ import annotations

__all__ = [
    "FINISHED_STATES",
    "MOVED_STATUSES",
    "RESOLVED_STATUSES",
    "AbortRollout",
    "Action",
    "AdvanceStage",
    "AssignVersion",
    "CompleteRollout",
    "Decision",
    "DeviceRecord",
    "DeviceSnapshot",
    "DeviceStatus",
    "FailureThreshold",
    "HealthGates",
    "HealthReading",
    "PauseRollout",
    "ResumeRollout",
    "RemoveModel",
    "RollbackDevice",
    "RollbackRollout",
    "Rollout",
    "RolloutPolicy",
    "RolloutState",
    "StageProgress",
    "VersionTelemetry",
    "abort",
    "action_from_dict",
    "describe_stages",
    "fail_assignment",
    "measure_health",
    "new_rollout",
    "parse_duration",
    "parse_stages",
    "pause",
    "resume",
    "rollback",
    "stage_progress",
    "stage_targets",
    "step",
]

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.versions import compare_versions

from .rollout_model import (
    _AGENT_FAILED,
    _AGENT_NO_NEWS,
    _AGENT_REJECTED,
    _AGENT_SUCCESS,
    FINISHED_STATES,
    MOVED_STATUSES,
    RESOLVED_STATUSES,
    AbortRollout,
    Action,
    AdvanceStage,
    AssignVersion,
    CompleteRollout,
    D,
    Decision,
    DeviceRecord,
    DeviceSnapshot,
    DeviceStatus,
    FailureThreshold,
    HealthGates,
    HealthReading,
    PauseRollout,
    RemoveModel,
    ResumeRollout,
    RollbackDevice,
    RollbackRollout,
    Rollout,
    RolloutPolicy,
    RolloutState,
    VersionTelemetry,
    action_from_dict,
    parse_duration,
    parse_stages,
)

# -- pure helpers ---------------------------------------------------------------------------------

def new_rollout(rollout_id: str, fleet: str, name: str, version: str, policy: RolloutPolicy, now: float,
                selection: Sequence[tuple[str, str]] = ()) -> Rollout:
    """A RUNNING rollout at stage 0 with no device yet: the first :func:`step` picks them."""
    return Rollout(id=rollout_id, fleet=fleet, name=name, version=version, policy=policy,
                   state=RolloutState.RUNNING, stage=0, stage_started_at=now, created_at=now, updated_at=now,
                   selection=tuple(sorted((str(k), str(v)) for k, v in selection)), devices={})


def stage_targets(stages: Sequence[float], population: int) -> list[int]:
    """Cumulative device counts per stage: ceil(pct * N), each stage at least one more than the last.

    >>> stage_targets((5, 25, 100), 10)
    [1, 3, 10]
    >>> stage_targets((5, 25, 100), 2)
    [1, 2, 2]
    """
    targets: list[int] = []
    previous = 0
    for pct in stages:
        # The epsilon keeps 25% of 100 at 25 despite binary floating point.
        target = max(math.ceil(pct * population / 100.0 - 1e-9), previous + 1)
        target = min(target, population)
        targets.append(target)
        previous = target
    return targets


def measure_health(rollout: Rollout, fleet: Mapping[str, DeviceSnapshot]) -> HealthReading:
    """Merge the snapshot's telemetry: the rollout's version against every other version served."""
    new_hist, base_hist = LatencyHistogram(), LatencyHistogram()
    new_req = new_err = base_req = base_err = 0
    for snapshot in fleet.values():
        for item in snapshot.telemetry:
            if item.name == rollout.name and item.version == rollout.version:
                new_req, new_err, new_hist = new_req + item.requests, new_err + item.errors, new_hist.merge(item.latency)
            else:
                base_req, base_err = base_req + item.requests, base_err + item.errors
                base_hist = base_hist.merge(item.latency)
    return HealthReading(new_req, new_err, new_hist.count, new_hist.quantile_ms(0.95),
                         base_req, base_err, base_hist.count, base_hist.quantile_ms(0.95))


@dataclass(frozen=True)
class StageProgress:
    stage: int
    percent: float
    target: int
    assigned: int
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_progress(rollout: Rollout) -> list[StageProgress]:
    """Per stage: its cumulative target and how its devices stand (for status views and metrics)."""
    population = rollout.population() + rollout.count(D.ROLLBACK_SENT, D.NO_PREVIOUS, D.CANCELLED)
    targets = stage_targets(rollout.policy.stages, population)
    result = []
    for index, pct in enumerate(rollout.policy.stages):
        counts: dict[str, int] = {}
        for record in rollout.devices.values():
            if record.stage == index:
                counts[record.status.value] = counts.get(record.status.value, 0) + 1
        result.append(StageProgress(index, pct, targets[index] if targets else 0, sum(counts.values()), counts))
    return result


def describe_stages(progress: Sequence[StageProgress]) -> list[str]:
    """One phrase per stage, its own counts against its own size (the devices it adds to the
    previous stages' cumulative target): "stage 3 (100%, 9 dev): 9 succeeded", never a running
    total beside a stage's count."""
    phrases, previous = [], 0
    for p in progress:
        size = max(p.target - previous, 0)
        previous = max(previous, p.target)
        counts = ", ".join(f"{n} {k.lower().replace('_', ' ')}" for k, n in sorted(p.counts.items())) or "waiting"
        phrases.append(f"stage {p.stage + 1} ({p.percent:g}%, {size} dev): {counts}")
    return phrases


def _as_map(fleet: Mapping[str, DeviceSnapshot] | Iterable[DeviceSnapshot]) -> dict[str, DeviceSnapshot]:
    if isinstance(fleet, Mapping):
        return dict(fleet)
    return {snapshot.device: snapshot for snapshot in fleet}


def _runs(snapshot: DeviceSnapshot, name: str, version: str) -> bool:
    return snapshot.active_name == name and snapshot.active_version == version


def _newer(snapshot: DeviceSnapshot, name: str, version: str) -> bool:
    if snapshot.active_name != name or snapshot.active_version is None:
        return False
    try:
        return compare_versions(snapshot.active_version, version) > 0
    except BadInputError:
        return False


def _classify_new(snapshot: DeviceSnapshot, rollout: Rollout, now: float) -> DeviceRecord:
    """A device seen in the selection for the first time (or again after leaving it)."""
    if _runs(snapshot, rollout.name, rollout.version):
        return DeviceRecord(snapshot.device, D.ALREADY, updated_at=now, detail="already ran the version")
    if _newer(snapshot, rollout.name, rollout.version):
        return DeviceRecord(snapshot.device, D.SKIPPED, updated_at=now,
                            detail=f"runs the newer {snapshot.active_version}; a rollout never downgrades")
    return DeviceRecord(snapshot.device, D.PENDING, updated_at=now)


def _outcome(snapshot: DeviceSnapshot, rollout: Rollout) -> tuple[DeviceStatus, str | None] | None:
    """What a device's report says about the rollout's version, or None (no news)."""
    if snapshot.update_name == rollout.name and snapshot.update_version == rollout.version and snapshot.update_state:
        state = snapshot.update_state.upper()
        if state in _AGENT_SUCCESS:
            return D.SUCCEEDED, None
        if state in _AGENT_FAILED:
            return D.FAILED, f"agent reported {state}"
        if state in _AGENT_REJECTED:
            return D.REJECTED, "agent reported REJECTED"
        if state not in _AGENT_NO_NEWS:
            return D.IN_PROGRESS, f"agent in {state}"
    if _runs(snapshot, rollout.name, rollout.version):
        return D.SUCCEEDED, None
    return None


def _refresh(record: DeviceRecord, snapshot: DeviceSnapshot | None, rollout: Rollout, now: float) -> DeviceRecord:
    status = record.status
    if status is D.PENDING:
        if snapshot is None:
            return replace(record, status=D.SKIPPED, updated_at=now, detail="left the selection before it moved")
        fresh = _classify_new(snapshot, rollout, now)
        return record if fresh.status is D.PENDING else fresh
    if status is D.SKIPPED:
        if snapshot is not None and record.assigned_at is None:
            fresh = _classify_new(snapshot, rollout, now)
            return fresh if fresh.status is not D.SKIPPED else record
        return record
    if status not in MOVED_STATUSES:
        return record
    assert record.assigned_at is not None
    new_status: DeviceStatus = status
    detail = record.detail
    # Only reports received after the assignment count: a retained report from an
    # earlier attempt at the same version must not decide this one.
    if snapshot is not None and snapshot.reported_at is not None and snapshot.reported_at >= record.assigned_at:
        outcome = _outcome(snapshot, rollout)
        if outcome is not None:
            new_status, detail = outcome
    if new_status in (D.ASSIGNED, D.IN_PROGRESS) and now >= record.assigned_at + rollout.policy.stage_timeout_s:
        new_status = D.TIMED_OUT
        offline = snapshot is not None and not snapshot.online
        detail = (f"no terminal answer within {rollout.policy.stage_timeout_s:g} s"
                  + (" (offline)" if offline or snapshot is None else ""))
    if new_status is status and detail == record.detail:
        return record
    return replace(record, status=new_status, detail=detail, updated_at=now)


def _order_key(rollout_id: str, snapshot: DeviceSnapshot | None) -> tuple[int, str]:
    """Online devices first, then a stable pseudo-random order per rollout (canaries spread out)."""
    assert snapshot is not None
    digest = hashlib.sha256(f"{rollout_id}:{snapshot.device}".encode()).hexdigest()
    return (0 if snapshot.online else 1, digest)


def _assign(rollout: Rollout, devices: dict[str, DeviceRecord], fleet: Mapping[str, DeviceSnapshot], limit: int,
            stage: int, now: float, reason: str) -> list[Action]:
    pending = [d for d, r in devices.items() if r.status is D.PENDING and d in fleet]
    pending.sort(key=lambda d: _order_key(rollout.id, fleet[d]))
    actions: list[Action] = []
    for device in pending[:max(limit, 0)]:
        snapshot = fleet[device]
        devices[device] = replace(devices[device], status=D.ASSIGNED, stage=stage, assigned_at=now, updated_at=now,
                                  previous_name=snapshot.active_name, previous_version=snapshot.active_version,
                                  detail=None)
        actions.append(AssignVersion(device, rollout.name, rollout.version, reason, stage))
    return actions


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "n/a"


def _abort_reason(rollout: Rollout, health: HealthReading) -> str | None:
    moved = rollout.moved()
    failed = sum(1 for r in moved if r.status is D.FAILED)
    rejected = sum(1 for r in moved if r.status is D.REJECTED)
    threshold = rollout.policy.max_failures
    if threshold.exceeded(failed + rejected, len(moved)):
        return (f"{failed + rejected} of {len(moved)} moved devices failed ({failed} failed, {rejected} rejected), "
                f"above the failure threshold {threshold}")
    gates = rollout.policy.health
    rate = health.new_error_rate
    if gates.max_error_rate is not None and health.new_requests >= gates.min_requests and rate is not None \
            and rate > gates.max_error_rate:
        return (f"error rate {rate:.2%} of {rollout.version} over {health.new_requests} requests is above "
                f"max_error_rate {gates.max_error_rate:.2%}")
    ratio = health.p95_ratio
    if gates.max_p95_ratio is not None and ratio is not None and health.new_latency_count >= gates.min_requests \
            and health.baseline_latency_count >= gates.min_requests and ratio > gates.max_p95_ratio:
        return (f"p95 latency {health.new_p95_ms:.2f} ms of {rollout.version} is {ratio:.2f}x the previous "
                f"versions' {health.baseline_p95_ms:.2f} ms, above max_p95_ratio {gates.max_p95_ratio:g}")
    return None


def _skipped_newer(rollout: Rollout) -> int:
    """Devices the rollout leaves alone because they run a newer version of the bundle."""
    return sum(1 for r in rollout.devices.values()
               if r.status is D.SKIPPED and (r.detail or "").startswith("runs the newer"))


def _skipped_note(rollout: Rollout) -> str:
    skipped = _skipped_newer(rollout)
    return f"{skipped} skipped (they run a newer version)" if skipped else ""


def _roll_back(rollout: Rollout, now: float, reason: str, state: RolloutState, first: Action) -> Decision:
    devices = dict(rollout.devices)
    actions: list[Action] = [first]
    for device in sorted(devices):
        record = devices[device]
        if record.status in MOVED_STATUSES:
            if record.previous_name and record.previous_version:
                actions.append(RollbackDevice(device, record.previous_name, record.previous_version, reason))
                devices[device] = replace(record, status=D.ROLLBACK_SENT, updated_at=now,
                                          detail=f"was {record.status.value}")
            else:
                devices[device] = replace(record, status=D.NO_PREVIOUS, updated_at=now,
                                          detail=f"was {record.status.value}; it ran no model before")
        elif record.status is D.PENDING:
            devices[device] = replace(record, status=D.CANCELLED, updated_at=now, detail="the rollout ended first")
    return Decision(replace(rollout, state=state, devices=devices, reason=reason, updated_at=now), actions)


# -- the engine -----------------------------------------------------------------------------------

def step(rollout: Rollout, fleet: Mapping[str, DeviceSnapshot] | Iterable[DeviceSnapshot],
         now: float) -> Decision:
    """Advance ``rollout`` by one reconciliation.

    Args:
        rollout: the state the store holds.
        fleet: the devices that match the rollout's selection *now* (fleet and tags).
        now: the controller's clock, seconds (the same clock as ``reported_at``).

    Returns:
        The next state and the actions to carry out, in order.
    """
    snapshot = _as_map(fleet)
    if rollout.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
        return Decision(rollout, [])
    devices: dict[str, DeviceRecord] = {d: _refresh(r, snapshot.get(d), rollout, now)
                                        for d, r in rollout.devices.items()}
    for device in sorted(snapshot):
        if device not in devices:
            devices[device] = _classify_new(snapshot[device], rollout, now)
    current = replace(rollout, devices=devices, updated_at=now)
    health = measure_health(current, snapshot)
    actions: list[Action] = []
    last = len(rollout.policy.stages) - 1

    if current.state is RolloutState.COMPLETED:
        actions += _assign(current, devices, snapshot, len(devices), last, now,
                           "joined the selection after the rollout completed")
        return Decision(replace(current, devices=devices), actions, health)

    reason = _abort_reason(current, health)
    if reason is not None:
        return replace(_roll_back(current, now, reason, RolloutState.ABORTED, AbortRollout(reason)), health=health)
    if current.state is RolloutState.PAUSED:
        return Decision(current, actions, health)

    stage, stage_started_at = current.stage, current.stage_started_at
    while True:
        targets = stage_targets(current.policy.stages, current.population())
        moved_total = current.count(*MOVED_STATUSES)
        actions += _assign(current, devices, snapshot, targets[stage] - moved_total, stage, now,
                           f"stage {stage + 1} of {last + 1} ({current.policy.stages[stage]:g}%)")
        current = replace(current, devices=devices)
        pending = current.count(D.PENDING)
        if current.count(*MOVED_STATUSES) < targets[stage] and pending:
            # pending devices not in the snapshot cannot be assigned; wait for them
            current = replace(current, reason=f"stage {stage + 1}: waiting for {pending} selected device(s) "
                                              "that are not reporting to come back")
            break
        if current.population() == 0 and not current.count(D.ALREADY) and not _skipped_newer(current):
            # No device matches yet (none reported, or a tag not set yet): wait rather than
            # complete, or the devices that appear later would all get the version unstaged.
            # Not forever: after the stage timeout the rollout ends and says why.
            timeout = current.policy.stage_timeout_s
            if now - stage_started_at >= timeout:
                why = f"no device matched the selection within the stage timeout ({timeout:g} s)"
                return replace(_roll_back(current, now, why, RolloutState.ABORTED, AbortRollout(why)),
                               health=health)
            current = replace(current, reason=f"waiting: no device matches the selection yet (ends after {timeout:g} s)")
            break
        members = [r for r in devices.values() if r.stage == stage and r.status in MOVED_STATUSES]
        succeeded = sum(1 for r in members if r.status is D.SUCCEEDED)
        threshold = current.policy.success_threshold_pct
        if not members or succeeded * 100.0 >= threshold * len(members):
            if now - stage_started_at < current.policy.bake_s:
                current = replace(current, reason=f"stage {stage + 1}: {succeeded} of {len(members)} devices "
                                                  f"succeeded; baking for {current.policy.bake_s:g} s")
                break
            if stage == last or not pending:
                skipped = _skipped_note(current)
                why = (f"stage {stage + 1}: {succeeded} of {len(members)} devices succeeded "
                       f"({_pct(succeeded, len(members))}); "
                       + (f"{skipped}, every other selected device has the version" if skipped
                          else "every selected device has the version"))
                if not members and not current.moved():
                    why = (f"no device needed the version: {current.count(D.ALREADY)} already ran it, {skipped}"
                           if skipped else "every selected device already runs the version")
                current = replace(current, state=RolloutState.COMPLETED, stage=stage,
                                  stage_started_at=stage_started_at, reason=why)
                actions.append(CompleteRollout(why))
                break
            why = (f"stage {stage + 1}: {succeeded} of {len(members)} devices succeeded "
                   f"({_pct(succeeded, len(members))}, threshold {threshold:g}%)")
            actions.append(AdvanceStage(stage, stage + 1, why))
            stage, stage_started_at = stage + 1, now
            current = replace(current, stage=stage, stage_started_at=stage_started_at)
            continue
        if all(r.status in RESOLVED_STATUSES for r in members):
            counts = {s: sum(1 for r in members if r.status is s) for s in (D.FAILED, D.REJECTED, D.TIMED_OUT)}
            why = (f"stage {stage + 1}: only {succeeded} of {len(members)} devices succeeded "
                   f"({_pct(succeeded, len(members))}, threshold {threshold:g}%; {counts[D.FAILED]} failed, "
                   f"{counts[D.REJECTED]} rejected, {counts[D.TIMED_OUT]} timed out)")
            decision = _roll_back(current, now, why, RolloutState.ABORTED, AbortRollout(why))
            return Decision(decision.rollout, actions + decision.actions, health)
        unresolved = sum(1 for r in members if r.status not in RESOLVED_STATUSES)
        current = replace(current, reason=f"stage {stage + 1}: {succeeded} of {len(members)} devices succeeded, "
                                          f"waiting for {unresolved}")
        break
    return Decision(current, actions, health)


def fail_assignment(rollout: Rollout, device: str, detail: str, now: float) -> Decision:
    """The controller could not carry out ``device``'s assignment (it cannot sign the version:
    not published, or the repository is unreadable): the device is FAILED with that reason at
    once, rather than ASSIGNED until its stage timeout; the next :func:`step` applies the abort
    rules to it like any other failure."""
    record = rollout.devices.get(device)
    if record is None or record.status not in (D.ASSIGNED, D.IN_PROGRESS) \
            or rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED):
        return Decision(rollout, [])
    devices = dict(rollout.devices)
    devices[device] = replace(record, status=D.FAILED, detail=detail, updated_at=now)
    return Decision(replace(rollout, devices=devices, updated_at=now), [])


# -- operator commands ----------------------------------------------------------------------------

def pause(rollout: Rollout, now: float, reason: str = "paused by the operator") -> Decision:
    """RUNNING -> PAUSED: no new assignments and no advance; failure and health gates still abort."""
    if rollout.state is not RolloutState.RUNNING:
        raise BadInputError(f"rollout {rollout.id} is {rollout.state.value}; only a RUNNING rollout can be paused")
    return Decision(replace(rollout, state=RolloutState.PAUSED, reason=reason, updated_at=now), [PauseRollout(reason)])


def resume(rollout: Rollout, now: float, reason: str = "resumed by the operator") -> Decision:
    """PAUSED -> RUNNING. Time spent paused counts toward the bake time but not the stage decision."""
    if rollout.state is not RolloutState.PAUSED:
        raise BadInputError(f"rollout {rollout.id} is {rollout.state.value}; only a PAUSED rollout can be resumed")
    return Decision(replace(rollout, state=RolloutState.RUNNING, reason=reason, updated_at=now),
                    [ResumeRollout(reason)])


def abort(rollout: Rollout, now: float, reason: str = "aborted by the operator") -> Decision:
    """RUNNING|PAUSED -> ABORTED, rolling every moved device back to what it ran before."""
    if rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        raise BadInputError(f"rollout {rollout.id} is {rollout.state.value}; only a RUNNING or PAUSED rollout can be "
                            "aborted (use rollback for a COMPLETED one)")
    return _roll_back(rollout, now, reason, RolloutState.ABORTED, AbortRollout(reason))


def rollback(rollout: Rollout, now: float, reason: str = "rolled back by the operator") -> Decision:
    """RUNNING|PAUSED|COMPLETED -> ROLLED_BACK, rolling every moved device back."""
    if rollout.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
        raise BadInputError(f"rollout {rollout.id} is {rollout.state.value}: its devices were already rolled back")
    return _roll_back(rollout, now, reason, RolloutState.ROLLED_BACK, RollbackRollout(reason))
