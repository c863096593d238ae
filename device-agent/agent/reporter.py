"""The agent -> fleet reporting seam.

``Reporter`` is what the agent calls; the documents it passes have the shapes of
``edgeship.ota.protocol``'s ReportedMessage, EventMessage and TelemetryMessage
(``to_dict()``), so an MQTT reporter only has to publish them on the
device's topics. Here: ``NullReporter`` (no fleet) and ``LogReporter`` (JSON
lines on the agent's log, what a device without a broker keeps).
"""

from __future__ import annotations

__all__ = [
    "LogReporter",
    "NullReporter",
    "Reporter",
    "agent_version",
    "event_document",
    "state_document",
]

import functools
import json
import logging
import time
from typing import Any, Protocol

from edgeship.ota.protocol import EventMessage, ReportedMessage

from .config import AgentConfig
from .persistence import AgentState
from .state_machine import State


@functools.lru_cache(maxsize=1)
def agent_version() -> str:
    """The installed edgeship distribution's version (reported to the fleet); read on
    first use, not at import (importlib.metadata is not free at start-up)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeship")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
        return "0+unknown"


class Reporter(Protocol):
    """Where the agent's state, events and telemetry go. Implementations must not
    block for long and must not raise (the agent logs and carries on if they do)."""

    def report_state(self, state: dict[str, Any]) -> None: ...

    def report_event(self, event: dict[str, Any]) -> None: ...

    def report_telemetry(self, telemetry: dict[str, Any]) -> None: ...


class NullReporter:
    def report_state(self, state: dict[str, Any]) -> None:
        pass

    def report_event(self, event: dict[str, Any]) -> None:
        pass

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        pass


class LogReporter:
    """Writes each document as one JSON line on the ``edgeship.agent.report`` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("edgeship.agent.report")

    def report_state(self, state: dict[str, Any]) -> None:
        self.log.debug("state %s", json.dumps(state, sort_keys=True))

    def report_event(self, event: dict[str, Any]) -> None:
        self.log.info("event %s", json.dumps(event, sort_keys=True))

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        self.log.info("telemetry %s", json.dumps(telemetry, sort_keys=True))


def _ref(bundle: Any) -> dict[str, str] | None:
    return {"name": bundle.name, "version": bundle.version} if bundle is not None else None


def event_document(state: AgentState, seq: int, entered: State, reason: str) -> dict[str, Any]:
    """An EventMessage dict for entering ``entered``; ``update.verifying`` (entered once the bundle
    is fetched and staged) also carries the update's ``transfer`` (docs/protocol.md)."""
    update = state.update
    bundle = update.bundle if update is not None and update.bundle else None
    doc = EventMessage(
        event=f"update.{entered.value.lower()}",
        ts=time.time(),
        seq=seq,
        deployment=update.deployment if update is not None else None,
        bundle=dict(bundle) if bundle else None,
        state=entered.value,
        detail=reason[:4000] or None,
    ).to_dict()
    if entered is State.VERIFYING and update is not None and update.transfer:
        doc["transfer"] = dict(update.transfer)
    return doc


def state_document(
    config: AgentConfig, state: AgentState, runtime: str | None = None
) -> dict[str, Any]:
    """A ReportedMessage dict: what runs, and where the last update stands."""
    update = state.update
    return ReportedMessage(
        device=config.device_id,
        ts=time.time(),
        active=_ref(state.active),
        previous=_ref(state.previous[0]) if state.previous else None,
        update={
            "id": update.id,
            "kind": update.kind,
            "state": update.state,
            "reason": update.reason[:1000],
            "bundle": update.bundle,
            "sequence": update.sequence,
            "deployment": update.deployment,
            **({"transfer": dict(update.transfer)} if update.transfer else {}),
        }
        if update is not None
        else None,
        agent_version=agent_version(),
        runtime=runtime,
    ).to_dict()
