"""Fleet rules the store applies, as pure functions (table-tested in tests/test_fleet_rules.py).

The store reads the rows a rule needs and calls it inside the transaction that writes; the
rule itself never touches SQL, so it is written once and read in one place.
"""

from __future__ import annotations

__all__ = [
    "SINGLE_MODEL_AGENT_REASON",
    "DesiredModel",
    "LiveWork",
    "document_schema",
    "exclusion_conflict",
    "next_desired_set",
]

from collections.abc import Iterable, Mapping
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


# -- many models per device: the desired set and the form of its document ----------------------

@dataclass(frozen=True)
class DesiredModel:
    """One entry of a device's desired set: the model name, the bundle version it must serve, and why."""

    name: str
    version: str
    serving_version: int | None = None
    action: str = "install"
    rollout_id: str | None = None
    abtest_id: str | None = None
    deployment: str | None = None


def next_desired_set(current: Mapping[str, DesiredModel], change: DesiredModel) -> dict[str, DesiredModel]:
    """The set after ``change``: its model's entry replaced (or added); every other model as it was.

    A rollout or A/B test moves one model name; the director copies the others from the device's
    current desired set, so an update of one model never touches another's."""
    return {**{name: entry for name, entry in current.items() if name != change.name}, change.name: change}


SINGLE_MODEL_AGENT_REASON = "agent {version} serves one model; upgrade the agent"


def document_schema(models: Mapping[str, DesiredModel], *, multi_model_agent: bool,
                    agent_version: str | None) -> tuple[int | None, str | None]:
    """Which desired-state schema a device gets for ``models``: (schema, None), or (None, why not).

    A device whose reported state carries ``models`` runs a multi-model agent: schema 2, the whole
    set. An agent of one model (no ``models`` in its reports, or none seen yet) reads schema 1
    only: it gets schema 1 while its set holds one model; a second model name is refused for it,
    with a reason an operator can act on.
    """
    if multi_model_agent:
        return 2, None
    if len(models) <= 1:
        return 1, None
    return None, SINGLE_MODEL_AGENT_REASON.format(version=agent_version or "(version unknown)")
