"""Fleet rules the store applies, as pure functions (table-tested in tests/test_fleet_rules.py).

The store reads the rows a rule needs and calls it inside the transaction that writes; the
rule itself never touches SQL, so it is written once and read in one place.
"""

from __future__ import annotations

__all__ = [
    "SINGLE_MODEL_AGENT_REASON",
    "describe_models",
    "model_listing",
    "DesiredModel",
    "LiveWork",
    "document_schema",
    "exclusion_conflict",
    "next_desired_set",
]

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


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
                    agent_version: str | None, removing: bool = False) -> tuple[int | None, str | None]:
    """Which desired-state schema a device gets for ``models``: (schema, None), or (None, why not).

    A device whose reported state carries ``models`` runs a multi-model agent: schema 2, the whole
    set. An agent of one model (no ``models`` in its reports, or none seen yet) reads schema 1
    only: it gets schema 1 while its set holds one model; a second model name is refused for it,
    with a reason an operator can act on, and so is taking a model out (``removing``), which
    schema 1 cannot express.
    """
    if multi_model_agent:
        return 2, None
    if len(models) <= 1 and not removing:  # schema 1 names one bundle: it cannot say "serve nothing"
        return 1, None
    return None, SINGLE_MODEL_AGENT_REASON.format(version=agent_version or "(version unknown)")


def model_listing(*, active_name: str | None, active_version: str | None, update_state: str | None,
                  update_name: str | None, update_version: str | None, models_reported: bool | None,
                  reported: Mapping[str, Mapping[str, Any]], desired: Mapping[str, DesiredModel]) -> list[dict[str, Any]]:
    """Every model of one device, for ``fleet ls`` and ``device show`` (pure): name, the bundle
    version it serves and its serving version, its update state, and what is desired of it.

    A multi-model agent reports each model (``reported``: its ``device_models`` rows); an agent of
    one model reports one active bundle and no serving version (it numbers versions itself). A
    desired model the device does not serve yet is listed with no version."""
    rows: dict[str, dict[str, Any]] = {}
    if models_reported:
        for name, m in reported.items():
            rows[name] = {"name": name, "version": m.get("active_version"), "serving_version": m.get("serving_version"),
                          "update_state": m.get("update_state"), "update_version": m.get("update_version")}
    elif active_name or update_name:
        name = active_name or update_name or ""
        rows[name] = {"name": name, "version": active_version, "serving_version": None,
                      "update_state": update_state, "update_version": update_version}
    for name, entry in desired.items():
        row = rows.setdefault(name, {"name": name, "version": None, "serving_version": None, "update_state": None,
                                     "update_version": None})
        row.update({"desired_version": entry.version, "desired_serving_version": entry.serving_version,
                    "desired_action": entry.action})
    for row in rows.values():
        row.setdefault("desired_version", None)
        row.setdefault("desired_serving_version", None)
        row.setdefault("desired_action", None)
    return [rows[name] for name in sorted(rows)]


def describe_models(models: Iterable[Mapping[str, Any]]) -> str:
    """``digits 1.1.0 (#2), kws 0.1.0 (#5)`` for a table cell; ``-`` for none."""
    parts = []
    for m in models:
        version = m.get("version") or "-"
        serving = f" (#{m['serving_version']})" if m.get("serving_version") is not None else ""
        wanted = m.get("desired_version")
        pending = f" -> {wanted}" if wanted and wanted != m.get("version") else ""
        parts.append(f"{m['name']} {version}{serving}{pending}")
    return ", ".join(parts) or "-"
