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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Union

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.versions import compare_versions


class RolloutState(str, Enum):
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    ROLLED_BACK = "ROLLED_BACK"


FINISHED_STATES = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK})
"""No more stages. ABORTED and ROLLED_BACK emit nothing ever again; COMPLETED still serves joiners."""


class DeviceStatus(str, Enum):
    PENDING = "PENDING"
    ALREADY = "ALREADY"
    SKIPPED = "SKIPPED"
    ASSIGNED = "ASSIGNED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    ROLLBACK_SENT = "ROLLBACK_SENT"
    NO_PREVIOUS = "NO_PREVIOUS"
    CANCELLED = "CANCELLED"


D = DeviceStatus
MOVED_STATUSES = frozenset({D.ASSIGNED, D.IN_PROGRESS, D.SUCCEEDED, D.FAILED, D.REJECTED, D.TIMED_OUT})
"""Devices that were given the rollout's version (and are not yet rolled back)."""
RESOLVED_STATUSES = frozenset({D.SUCCEEDED, D.FAILED, D.REJECTED, D.TIMED_OUT})
"""Moved devices whose outcome is known for the stage decision."""

# Agent update states (edgeship.agent.state_machine) and what they mean for a rollout.
_AGENT_SUCCESS = frozenset({"COMMITTED"})
_AGENT_FAILED = frozenset({"FAILED", "ROLLED_BACK"})
_AGENT_REJECTED = frozenset({"REJECTED"})
_AGENT_NO_NEWS = frozenset({"IDLE"})


# -- policy ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FailureThreshold:
    """Abort when more than ``count`` devices, or more than ``pct`` % of the moved devices, failed.

    Failed means FAILED or REJECTED (reported apart, counted together here).
    Exactly one of ``count`` and ``pct`` is set.
    """

    count: int | None = None
    pct: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.pct is None):
            raise BadInputError("a failure threshold is either a count (3) or a percentage (10%)")
        if self.count is not None and self.count < 0:
            raise BadInputError(f"failure threshold {self.count} must be >= 0")
        if self.pct is not None and not 0.0 <= self.pct <= 100.0:
            raise BadInputError(f"failure threshold {self.pct}% must be within 0-100%")

    @classmethod
    def parse(cls, text: str) -> FailureThreshold:
        """``"10%"`` (percentage of moved devices) or ``"3"`` (a number of devices)."""
        value = str(text).strip()
        try:
            if value.endswith("%"):
                return cls(pct=float(value[:-1]))
            return cls(count=int(value))
        except ValueError:
            raise BadInputError(f"--max-failures {text!r}: use a percentage (10%) or a number of devices (3)") from None

    def exceeded(self, failures: int, moved: int) -> bool:
        if self.count is not None:
            return failures > self.count
        assert self.pct is not None
        return moved > 0 and failures * 100.0 > self.pct * moved

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.pct:g}%"


@dataclass(frozen=True)
class HealthGates:
    """Telemetry gates: the new version's error rate and its p95 latency against the previous one.

    A gate is checked only once the new version has served ``min_requests``
    requests (and, for the ratio, the previous versions too): too few samples
    neither abort nor block a stage.
    """

    max_error_rate: float | None = None
    max_p95_ratio: float | None = None
    min_requests: int = 100

    def __post_init__(self) -> None:
        # written so that nan fails them too (a nan gate would never fire)
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise BadInputError(f"max_error_rate={self.max_error_rate} must be a fraction within 0-1 (e.g. 0.05)")
        if self.max_p95_ratio is not None and not 0 < self.max_p95_ratio < math.inf:
            raise BadInputError(f"max_p95_ratio={self.max_p95_ratio} must be a finite positive number (e.g. 1.5)")
        if self.min_requests < 1:
            raise BadInputError(f"min_requests={self.min_requests} must be >= 1")

    @classmethod
    def parse(cls, text: str) -> HealthGates:
        """``"max_error_rate=0.05,max_p95_ratio=1.5[,min_requests=100]"`` (error rate may be ``5%``)."""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            try:
                if not sep:
                    raise ValueError
                if key == "max_error_rate":
                    values[key] = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
                elif key == "max_p95_ratio":
                    values[key] = float(raw)
                elif key == "min_requests":
                    values[key] = int(raw)
                else:
                    raise KeyError(key)
            except KeyError:
                raise BadInputError(
                    f"--health: unknown gate {key!r}; use max_error_rate, max_p95_ratio, min_requests") from None
            except ValueError:
                raise BadInputError(f"--health: {part!r} is not KEY=NUMBER") from None
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.max_error_rate is not None or self.max_p95_ratio is not None


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout moves. ``stages`` are cumulative percentages of the devices to move, ending at 100."""

    stages: tuple[float, ...] = (5.0, 25.0, 100.0)
    success_threshold_pct: float = 90.0
    max_failures: FailureThreshold = field(default_factory=lambda: FailureThreshold(pct=10.0))
    health: HealthGates = field(default_factory=HealthGates)
    stage_timeout_s: float = 1800.0
    bake_s: float = 0.0

    def __post_init__(self) -> None:
        stages = tuple(float(s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise BadInputError("a rollout needs at least one stage (e.g. 5,25,100)")
        if any(not 0 < s <= 100 for s in stages) or any(b <= a for a, b in zip(stages, stages[1:])):
            raise BadInputError(f"stages {_fmt_stages(stages)}: percentages must grow, each within (0, 100]")
        if stages[-1] != 100.0:
            raise BadInputError(f"stages {_fmt_stages(stages)}: the last stage must be 100")
        if not 0 < self.success_threshold_pct <= 100:
            raise BadInputError(f"success threshold {self.success_threshold_pct}% must be within (0, 100]")
        if self.stage_timeout_s <= 0:
            raise BadInputError("the stage timeout must be positive")
        if self.bake_s < 0:
            raise BadInputError("the bake time must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": list(self.stages),
            "success_threshold_pct": self.success_threshold_pct,
            "max_failures": str(self.max_failures),
            "health": asdict(self.health),
            "stage_timeout_s": self.stage_timeout_s,
            "bake_s": self.bake_s,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RolloutPolicy:
        return cls(
            stages=tuple(doc.get("stages", (5.0, 25.0, 100.0))),
            success_threshold_pct=float(doc.get("success_threshold_pct", 90.0)),
            max_failures=FailureThreshold.parse(str(doc.get("max_failures", "10%"))),
            health=HealthGates(**dict(doc.get("health", {}))),
            stage_timeout_s=float(doc.get("stage_timeout_s", 1800.0)),
            bake_s=float(doc.get("bake_s", 0.0)),
        )


def _fmt_stages(stages: Iterable[float]) -> str:
    return ",".join(f"{s:g}" for s in stages)


def parse_stages(text: str) -> tuple[float, ...]:
    """``"5,25,100"`` -> (5.0, 25.0, 100.0); checked by RolloutPolicy."""
    try:
        return tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise BadInputError(f"--stages {text!r}: use percentages separated by commas, e.g. 5,25,100") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` -> seconds."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise BadInputError(f"duration {text!r}: use a positive number with s, m, h or d (e.g. 30m)")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]


# -- what the engine reads -----------------------------------------------------------------------

@dataclass(frozen=True)
class VersionTelemetry:
    """One device's serving statistics for one bundle version over the gate's window."""

    name: str
    version: str
    requests: int
    errors: int
    latency: LatencyHistogram


@dataclass(frozen=True)
class DeviceSnapshot:
    """What the store knows of one selected device.

    ``update_*`` is the agent's last reported update (state from the agent's
    state machine, and the bundle it is about). ``reported_at`` is when the
    controller *received* that report (controller clock, comparable to ``now``).
    """

    device: str
    online: bool = True
    active_name: str | None = None
    active_version: str | None = None
    update_state: str | None = None
    update_name: str | None = None
    update_version: str | None = None
    reported_at: float | None = None
    telemetry: tuple[VersionTelemetry, ...] = ()


@dataclass(frozen=True)
class DeviceRecord:
    """One device within one rollout."""

    device: str
    status: DeviceStatus
    stage: int | None = None
    assigned_at: float | None = None
    previous_name: str | None = None
    previous_version: str | None = None
    updated_at: float = 0.0
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = self.status.value
        return doc


@dataclass(frozen=True)
class Rollout:
    """A rollout's whole state: what the store persists between two steps."""

    id: str
    fleet: str
    name: str
    version: str
    policy: RolloutPolicy
    state: RolloutState = RolloutState.RUNNING
    stage: int = 0
    stage_started_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    selection: tuple[tuple[str, str], ...] = ()
    devices: Mapping[str, DeviceRecord] = field(default_factory=dict)
    reason: str | None = None

    def count(self, *statuses: DeviceStatus) -> int:
        wanted = set(statuses)
        return sum(1 for record in self.devices.values() if record.status in wanted)

    def moved(self) -> list[DeviceRecord]:
        return [r for r in self.devices.values() if r.status in MOVED_STATUSES]

    def population(self) -> int:
        """Devices this rollout moves or will move (the base of the stage percentages)."""
        return sum(1 for r in self.devices.values() if r.status in MOVED_STATUSES or r.status is D.PENDING)


# -- what the engine returns ----------------------------------------------------------------------

@dataclass(frozen=True)
class AssignVersion:
    """Give ``device`` the desired state ``name``/``version`` (signed by the controller)."""

    device: str
    name: str
    version: str
    reason: str
    stage: int | None = None
    kind: str = field(default="assign", init=False)


@dataclass(frozen=True)
class RollbackDevice:
    """Give ``device`` back its previous ``name``/``version`` (a desired state with action rollback)."""

    device: str
    name: str
    version: str
    reason: str
    kind: str = field(default="rollback", init=False)


@dataclass(frozen=True)
class AdvanceStage:
    from_stage: int
    to_stage: int
    reason: str
    kind: str = field(default="advance", init=False)


@dataclass(frozen=True)
class CompleteRollout:
    reason: str
    kind: str = field(default="complete", init=False)


@dataclass(frozen=True)
class AbortRollout:
    reason: str
    kind: str = field(default="abort", init=False)


@dataclass(frozen=True)
class RollbackRollout:
    """The operator rolled a whole rollout back (its RollbackDevice actions follow)."""

    reason: str
    kind: str = field(default="rollback_rollout", init=False)


@dataclass(frozen=True)
class PauseRollout:
    reason: str
    kind: str = field(default="pause", init=False)


@dataclass(frozen=True)
class ResumeRollout:
    reason: str
    kind: str = field(default="resume", init=False)


Action = Union[AssignVersion, RollbackDevice, AdvanceStage, CompleteRollout, AbortRollout, RollbackRollout,
               PauseRollout, ResumeRollout]
_ACTIONS = {cls.__dataclass_fields__["kind"].default: cls for cls in  # type: ignore[attr-defined]
            (AssignVersion, RollbackDevice, AdvanceStage, CompleteRollout, AbortRollout, RollbackRollout,
             PauseRollout, ResumeRollout)}


def action_from_dict(doc: Mapping[str, Any]) -> Action:
    """Rebuild an action from ``dataclasses.asdict(action)`` (how the store's outbox keeps them)."""
    fields = dict(doc)
    cls = _ACTIONS.get(str(fields.pop("kind", "")))
    if cls is None:
        raise BadInputError(f"unknown rollout action {doc.get('kind')!r}")
    return cls(**fields)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class HealthReading:
    """The gate inputs, merged over the snapshot's devices."""

    new_requests: int = 0
    new_errors: int = 0
    new_latency_count: int = 0
    new_p95_ms: float | None = None
    baseline_requests: int = 0
    baseline_errors: int = 0
    baseline_latency_count: int = 0
    baseline_p95_ms: float | None = None

    @property
    def new_error_rate(self) -> float | None:
        return self.new_errors / self.new_requests if self.new_requests else None

    @property
    def baseline_error_rate(self) -> float | None:
        return self.baseline_errors / self.baseline_requests if self.baseline_requests else None

    @property
    def p95_ratio(self) -> float | None:
        if self.new_p95_ms is None or not self.baseline_p95_ms:
            return None
        return self.new_p95_ms / self.baseline_p95_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_error_rate": self.new_error_rate,
                "baseline_error_rate": self.baseline_error_rate, "p95_ratio": self.p95_ratio}


@dataclass(frozen=True)
class Decision:
    rollout: Rollout
    actions: list[Action] = field(default_factory=list)
    health: HealthReading | None = None


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
