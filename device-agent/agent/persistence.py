"""The agent's durable state: one JSON file, written atomically (write, fsync, rename).

It records which bundle is active, which previous ones are kept (for rollback),
the highest director sequence accepted (replay protection) and the current or
last update with its state machine position. A state is entered only after this
file says so; a restart reads it back and resumes.
"""

from __future__ import annotations

__all__ = ["AgentState", "InstalledBundle", "StateStore", "UpdateRecord"]

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeship.ota.atomicfile import atomic_write_json
from edgeship.ota.errors import BadInputError, EdgeshipError, describe_os_error, first_line

from .state_machine import State

STATE_FORMAT = 1


@dataclass(frozen=True)
class InstalledBundle:
    """A verified bundle unpacked into a slot folder under ``<data>/slots``."""

    name: str
    version: str
    slot: str                      # folder name under slots/
    model_file: str
    model_format: str
    golden_file: str | None = None
    labels_file: str | None = None
    golden_tolerance: dict[str, float] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    installed_at: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> {size, sha256}, from the manifest
    serving_version: int = 0
    """The int64 clients address as ``/versions/N``: from the desired state, or assigned
    on this device (the model's highest known + 1) when the update carried none."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstalledBundle:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass
class UpdateRecord:
    """One update (install or rollback) and where the state machine has it."""

    id: str
    kind: str                      # "install" | "rollback"
    state: str = State.IDLE.value
    reason: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # how to rebuild the source after a restart
    bundle: dict[str, str] | None = None   # {"name", "version"} once known
    staged: InstalledBundle | None = None  # the new bundle, once installed in its slot
    rollback_to: InstalledBundle | None = None
    sequence: int | None = None
    base_sequence: int = 0         # the agent's last_sequence when this update was admitted
    deployment: str | None = None
    fetched: dict[str, Any] | None = None  # the verified, extracted bundle (FETCHING's result)
    entries: dict[str, int] = field(default_factory=dict)
    history: list[list[Any]] = field(default_factory=list)   # [state, unix time, reason]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    probation_started: float | None = None
    serving_version: int | None = None    # what the desired state assigned (None: numbered here)
    rollout: str | None = None     # the rollout's label for the candidate (None: "candidate")
    footprint_bytes: int | None = None  # resident-set growth measured by the self-test
    transfer: dict[str, Any] | None = None  # what travelled for FETCHING (kind, bytes, ...): reported as is

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["staged"] = self.staged.to_dict() if self.staged else None
        data["rollback_to"] = self.rollback_to.to_dict() if self.rollback_to else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        State(known.get("state", State.IDLE.value))  # ValueError for a state the table does not know
        for key in ("staged", "rollback_to"):
            if known.get(key):
                known[key] = InstalledBundle.from_dict(known[key])
        return cls(**known)


@dataclass
class AgentState:
    active: InstalledBundle | None = None
    previous: list[InstalledBundle] = field(default_factory=list)   # most recent first
    last_sequence: int = 0
    update: UpdateRecord | None = None
    max_serving_version: int = 0   # the highest serving version this model ever had here
    removed: bool = False          # the desired state no longer names this model: not loaded, slots kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "active": self.active.to_dict() if self.active else None,
            "previous": [b.to_dict() for b in self.previous],
            "last_sequence": self.last_sequence,
            "update": self.update.to_dict() if self.update else None,
            "max_serving_version": self.max_serving_version,
            "removed": self.removed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        return cls(
            active=InstalledBundle.from_dict(data["active"]) if data.get("active") else None,
            previous=[InstalledBundle.from_dict(b) for b in data.get("previous", [])],
            last_sequence=int(data.get("last_sequence", 0)),
            update=UpdateRecord.from_dict(data["update"]) if data.get("update") else None,
            max_serving_version=int(data.get("max_serving_version", 0)),
            removed=bool(data.get("removed", False)),
        )


class StateStore:
    """Reads and atomically writes ``state.json``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> AgentState:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return AgentState()
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return AgentState.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(
                f"agent state {self.path} is unreadable ({first_line(exc)}); it is only ever replaced atomically, "
                "so this file was edited or the disk is failing: restore it or remove it to start empty"
            ) from None

    def save(self, state: AgentState) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, state.to_dict())
        except OSError as exc:  # the previous state.json is intact (atomic replace)
            raise EdgeshipError(
                f"cannot write agent state {self.path}: {describe_os_error(exc)}"
            ) from None
