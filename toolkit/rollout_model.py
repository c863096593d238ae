"""What the rollout engine reads and returns: rollout and device states, the policy (stages,
thresholds, health gates), the device snapshot and record, the rollout, the actions and the
decision. Plain data with its parsing and checks; the engine that moves them is rollouts.py."""

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
    "RemoveModel",
    "RollbackRollout",
    "Rollout",
    "RolloutPolicy",
    "RolloutState",
    "VersionTelemetry",
    "action_from_dict",
    "parse_duration",
    "parse_stages",
]

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Union

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram


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
class RemoveModel:
    """Take model ``name`` out of ``device``'s desired set (``edgeship undeploy``); its other models stay."""

    device: str
    name: str
    reason: str
    kind: str = field(default="remove", init=False)


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


Action = Union[AssignVersion, RollbackDevice, RemoveModel, AdvanceStage, CompleteRollout, AbortRollout,
               RollbackRollout, PauseRollout, ResumeRollout]
_ACTIONS = {cls.__dataclass_fields__["kind"].default: cls for cls in
            (AssignVersion, RollbackDevice, RemoveModel, AdvanceStage, CompleteRollout, AbortRollout,
             RollbackRollout, PauseRollout, ResumeRollout)}


def action_from_dict(doc: Mapping[str, Any]) -> Action:
    """Rebuild an action from ``dataclasses.asdict(action)`` (how the store's outbox keeps them)."""
    fields = dict(doc)
    cls = _ACTIONS.get(str(fields.pop("kind", "")))
    if cls is None:
        raise BadInputError(f"unknown rollout action {doc.get('kind')!r}")
    return cls(**fields)


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

