"""Fleet rules the store applies, as pure functions (table-tested in tests/test_fleet_rules.py).

The store reads the rows a rule needs and calls it inside the transaction that writes; the
rule itself never touches SQL, so it is written once and read in one place.
"""

from __future__ import annotations

__all__ = ["LiveWork", "exclusion_conflict"]

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LiveWork:
    """A rollout that is RUNNING or PAUSED, or an A/B test that RUNS, on one fleet."""

    kind: str  # "rollout" | "abtest"
    id: str
    names: frozenset[str]
    """The model (bundle) names it moves: one for a rollout, the two arms' for a test."""
    state: str
    version: str = ""


def exclusion_conflict(kind: str, names: Iterable[str], fleet: str, live: Iterable[LiveWork], *,
                       promoting: str | None = None) -> str | None:
    """Why a new rollout or A/B test (``kind``) of ``names`` cannot start on ``fleet``; None: it can.

    One model name is moved by one thing at a time: a live rollout of a name excludes another
    rollout and any A/B test of that name, and a running A/B test excludes rollouts and other tests
    of either arm's name (each would reassign the devices both select, back and forth every tick).
    ``promoting``: the A/B test a new rollout promotes, which does not count against it.
    Rollouts of other names, and so other models on the same devices, are never in the way.
    """
    wanted = frozenset(names)
    label = "/".join(sorted(wanted))
    for work in live:
        if not work.names & wanted or work.id == promoting:
            continue
        if work.kind == "rollout":
            name = sorted(work.names & wanted)[0]
            if kind == "rollout":
                return (f"rollout {work.id} of {name} {work.version} on fleet {fleet} is {work.state}; "
                        "abort it or let it finish first")
            return (f"rollout {work.id} of {name} on fleet {fleet} is {work.state}; "
                    "abort it or let it finish before an A/B test of that bundle")
        if kind == "rollout":
            return f"A/B test {work.id} of {label} runs on fleet {fleet}; promote or stop it first"
        return f"A/B test {work.id} of {label} already runs on fleet {fleet}; stop or promote it first"
    return None
