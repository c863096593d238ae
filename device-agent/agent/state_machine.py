"""The update state machine: states, events and one aligned transition table.

Pure: no I/O. The updater persists a state before it acts in it (write, fsync,
rename), then asks this module where an event leads. After the Mender client:
reading ``TRANSITIONS`` tells every path an update can take, and a cap on
re-entries of a state (a crash loop) turns into ``LOOP_DETECTED``.

Every outcome of a step is an event looked up here, none is rewritten in code: a
refusal after activation (REJECT) rolls back like any failure; an operator's abort is
an ABORT event wherever the table takes one (a rollback in progress takes none: it
finishes); DEFER is the one row that leads back to its own state: the update waits
there, persisted, for a process that can carry on (PROBATION needs a serving agent).
"""

from __future__ import annotations

__all__ = [
    "PRE_ACTIVATION_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "WAITS",
    "Event",
    "InvalidTransitionError",
    "State",
    "accepts",
    "event_on_reentry",
    "is_terminal",
    "next_state",
    "serving_bundle_key",
]

from collections.abc import Mapping
from enum import Enum


class State(str, Enum):
    IDLE = "IDLE"
    DISK_CHECK = "DISK_CHECK"
    FETCHING = "FETCHING"
    VERIFYING = "VERIFYING"
    INSTALLING = "INSTALLING"
    SELF_TEST = "SELF_TEST"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    ROLLING_BACK = "ROLLING_BACK"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


class Event(str, Enum):
    START = "START"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"            # something broke (I/O, crash, a model that does not pass)
    REJECT = "REJECT"              # refused: trust failure, or the device lacks what the bundle needs
    ABORT = "ABORT"                # an operator asked to stop (rollback command)
    LOOP_DETECTED = "LOOP_DETECTED"  # the state was re-entered too often (crash loop)
    DEFER = "DEFER"                # this process cannot go on here (PROBATION without serving)


S, E = State, Event

# (state, event) -> next state. Pre-activation failures leave the old model active,
# so they end in FAILED / REJECTED directly; after activation every failure rolls back.
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (S.IDLE,         E.START):         S.DISK_CHECK,
    (S.DISK_CHECK,   E.SUCCESS):       S.FETCHING,
    (S.DISK_CHECK,   E.REJECT):        S.REJECTED,
    (S.DISK_CHECK,   E.FAILURE):       S.FAILED,
    (S.DISK_CHECK,   E.ABORT):         S.FAILED,
    (S.DISK_CHECK,   E.LOOP_DETECTED): S.FAILED,
    (S.FETCHING,     E.SUCCESS):       S.VERIFYING,
    (S.FETCHING,     E.FAILURE):       S.FAILED,
    (S.FETCHING,     E.REJECT):        S.REJECTED,
    (S.FETCHING,     E.ABORT):         S.FAILED,
    (S.FETCHING,     E.LOOP_DETECTED): S.FAILED,
    (S.VERIFYING,    E.SUCCESS):       S.INSTALLING,
    (S.VERIFYING,    E.FAILURE):       S.FAILED,
    (S.VERIFYING,    E.REJECT):        S.REJECTED,
    (S.VERIFYING,    E.ABORT):         S.FAILED,
    (S.VERIFYING,    E.LOOP_DETECTED): S.FAILED,
    (S.INSTALLING,   E.SUCCESS):       S.SELF_TEST,
    (S.INSTALLING,   E.FAILURE):       S.FAILED,
    (S.INSTALLING,   E.REJECT):        S.REJECTED,
    (S.INSTALLING,   E.ABORT):         S.FAILED,
    (S.INSTALLING,   E.LOOP_DETECTED): S.FAILED,
    (S.SELF_TEST,    E.SUCCESS):       S.ACTIVATING,
    (S.SELF_TEST,    E.FAILURE):       S.FAILED,
    (S.SELF_TEST,    E.REJECT):        S.REJECTED,
    (S.SELF_TEST,    E.ABORT):         S.FAILED,
    (S.SELF_TEST,    E.LOOP_DETECTED): S.FAILED,
    (S.ACTIVATING,   E.SUCCESS):       S.PROBATION,
    (S.ACTIVATING,   E.FAILURE):       S.ROLLING_BACK,
    (S.ACTIVATING,   E.REJECT):        S.ROLLING_BACK,
    (S.ACTIVATING,   E.ABORT):         S.ROLLING_BACK,
    (S.ACTIVATING,   E.LOOP_DETECTED): S.ROLLING_BACK,
    (S.PROBATION,    E.SUCCESS):       S.COMMITTED,
    (S.PROBATION,    E.FAILURE):       S.ROLLING_BACK,
    (S.PROBATION,    E.REJECT):        S.ROLLING_BACK,
    (S.PROBATION,    E.ABORT):         S.ROLLING_BACK,
    (S.PROBATION,    E.LOOP_DETECTED): S.ROLLING_BACK,
    (S.PROBATION,    E.DEFER):         S.PROBATION,
    (S.ROLLING_BACK, E.SUCCESS):       S.ROLLED_BACK,
    # A rollback that cannot finish is retried on restart; the cap stops a loop in FAILED
    # (the new bundle then stays the one recorded as active: never neither, see serving_bundle_key).
    (S.ROLLING_BACK, E.FAILURE):       S.FAILED,
    (S.ROLLING_BACK, E.REJECT):        S.FAILED,
    (S.ROLLING_BACK, E.LOOP_DETECTED): S.FAILED,
}

WAITS: frozenset[tuple[State, Event]] = frozenset(k for k, v in TRANSITIONS.items() if k[0] is v)
"""The rows that lead back to their own state: the driver stops there without re-entering."""

TERMINAL_STATES: frozenset[State] = frozenset({S.IDLE, S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.REJECTED})
"""States in which no update is in progress (IDLE: none was ever started)."""

PRE_ACTIVATION_STATES: frozenset[State] = frozenset(
    {S.DISK_CHECK, S.FETCHING, S.VERIFYING, S.INSTALLING, S.SELF_TEST}
)
"""States in which the running (old) bundle is untouched: a failure ends the update there."""


class InvalidTransitionError(RuntimeError):
    """Misuse: an event that the table does not allow in this state (a bug, not bad input)."""


def next_state(state: State, event: Event) -> State:
    """Where ``event`` leads from ``state``; raises InvalidTransitionError if nowhere."""
    try:
        return TRANSITIONS[(State(state), Event(event))]
    except KeyError:
        raise InvalidTransitionError(f"no transition from {State(state).value} on {Event(event).value}") from None


def accepts(state: State, event: Event) -> bool:
    """Whether the table has a row for ``event`` in ``state``."""
    return (State(state), Event(event)) in TRANSITIONS


def is_terminal(state: State) -> bool:
    return State(state) in TERMINAL_STATES


def event_on_reentry(entries: int, max_restarts: int) -> Event | None:
    """LOOP_DETECTED once a state was re-entered after more than ``max_restarts``
    restarts of the agent, else None.

    ``entries`` counts this entry too: the first (normal) entry is 1, so the
    number of restarts in this state is ``entries - 1``.
    """
    return Event.LOOP_DETECTED if entries - 1 > max_restarts else None


def serving_bundle_key(state: State) -> str:
    """Which bundle of the update record serves after a (re)start in ``state``:
    ``"rollback_to"`` while a rollback is in progress, else ``"active"``.

    The agent state's ``active`` switches to the new bundle in the same atomic
    write that enters PROBATION, and back to ``rollback_to`` in the one that
    enters ROLLED_BACK; in ROLLING_BACK the old bundle is the one to serve.
    """
    return "rollback_to" if State(state) is S.ROLLING_BACK else "active"

