"""What an operator does to a rollout or an A/B test, in one place for every front end: the CLI
(`edgeship rollout pause|resume|abort|rollback`, `edgeship abtest promote`) and the web console
call these, so a button and a command can never mean two different things.

Each is a thin shell over the pure engines (``rollouts``, ``abtest``) and the store's
transactions; what the engines decide (say, resuming a rollout that is not paused) is theirs.
"""

from __future__ import annotations

__all__ = ["ROLLOUT_OPERATIONS", "OperationResult", "PromotionResult", "abtest_report", "device_models",
           "operate_rollout", "promote_abtest"]

import time
from dataclasses import dataclass
from typing import Any

from edgeship.ota.errors import BadInputError, GateFailedError


def device_models(store: Any, info: Any) -> list[dict[str, Any]]:
    """Every model of one device (name, bundle version, serving version, update state, what is
    desired of it), as `edgeship device show` and the console's device page list them."""
    from edgeship.toolkit.fleet_rules import model_listing

    reported = store.device_models_of([info.id]).get(info.id, {}) if info.models_reported else {}
    return model_listing(
        active_name=info.active_name, active_version=info.active_version, update_state=info.update_state,
        update_name=info.update_name, update_version=info.update_version, models_reported=info.models_reported,
        reported=reported, desired=store.desired_set(info.id))


ROLLOUT_OPERATIONS = ("pause", "resume", "abort", "rollback")
"""The rollout engine's operator transitions, by the name the CLI and the console use."""


@dataclass(frozen=True)
class OperationResult:
    rollout_id: str
    state: str
    reason: str | None
    rollbacks: tuple[tuple[str, str, str], ...]  # (device, name, version) queued to roll back

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "state": self.state, "reason": self.reason,
                "rollbacks_queued": len(self.rollbacks),
                "rollbacks": [{"device": d, "name": n, "version": v} for d, n, v in self.rollbacks]}


def operate_rollout(store: Any, rollout_id: str, operation: str, reason: str | None = None,
                    now: float | None = None) -> OperationResult:
    """Pause, resume, abort or roll back a rollout in one store transaction; the controller
    publishes the rollbacks it queues."""
    from edgeship.toolkit import rollouts as engine

    if operation not in ROLLOUT_OPERATIONS:
        raise BadInputError(f"unknown rollout operation {operation!r} (use one of {', '.join(ROLLOUT_OPERATIONS)})")
    at = time.time() if now is None else now
    step = getattr(engine, operation)
    decision = store.update_rollout(rollout_id, lambda r: step(r, at, reason) if reason else step(r, at), now=at)
    rollbacks = tuple((a.device, a.name, a.version) for a in decision.actions if isinstance(a, engine.RollbackDevice))
    return OperationResult(rollout_id, decision.rollout.state.value, decision.rollout.reason, rollbacks)


def abtest_report(store: Any, test_id: str) -> tuple[Any, Any, str | None]:
    """(the test, its report from the telemetry received since it started, the promoted rollout)."""
    from edgeship.toolkit.abtest import report

    test, promoted = store.get_abtest(test_id)
    windows = store.telemetry_windows(test.fleet, test.selection, since=test.created_at)
    return test, report(test, windows), promoted


@dataclass(frozen=True)
class PromotionResult:
    rollout_id: str
    test_id: str
    arm: str
    name: str
    version: str
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "abtest": self.test_id, "arm": self.arm, "name": self.name,
                "version": self.version, "verdict": self.verdict}


def promote_abtest(store: Any, test_id: str, policy: Any, arm: str | None = None,
                   now: float | None = None) -> PromotionResult:
    """Start a rollout of the winning arm (or ``arm``) to the test's devices.

    Raises:
        BadInputError: the test is not running.
        GateFailedError: no significant winner and no ``arm`` named.
    """
    from edgeship.toolkit.rollouts import new_rollout
    from edgeship.toolkit.store import new_id

    test, result, promoted = abtest_report(store, test_id)
    if test.state != "RUNNING":
        raise BadInputError(f"A/B test {test_id} is {test.state}" + (f" (rollout {promoted})" if promoted else ""))
    label = arm or result.winner
    if label is None:
        raise GateFailedError(f"A/B test {test_id} has no significant winner: {result.verdict} "
                              "(use --arm A|B to promote one anyway)")
    chosen = test.arm(label)
    created = new_rollout(new_id("r"), test.fleet, chosen.name, chosen.version, policy,
                          time.time() if now is None else now, test.selection)
    store.create_rollout(created, promote_abtest=test_id)
    return PromotionResult(created.id, test_id, label, chosen.name, chosen.version, result.verdict)
