"""The models an agent serves, by name: one ``ServingModel`` per name, the versions each has
loaded, and the labels that address them.

Every front end (TF Serving REST and gRPC, the Open Inference Protocol over REST and gRPC)
resolves a request through ``Servables.resolve``; every update (one driver per model name)
publishes through ``Servables.serving(name)`` and ``ModelVersions.keep``/``drop``. Nothing
here touches a disk or a socket: it is the in-memory catalogue both sides share.

Versions. Each loaded version has a *serving version*: an int64 that only grows per model
(what TF Serving clients put in ``/versions/N``), beside the bundle's own version string
(``1.0.0``), which is still accepted wherever a version is named. The default version of a
model (no version, no label) is the one its ``ServingModel`` holds: the active slot.

Labels. ``stable`` names the version that last passed probation; the label of a rollout under
way (the deployment's ``rollout`` label, or ``candidate``) names the version in probation. A
label only resolves to a version that is loaded: during probation the agent keeps the
previous version loaded (memory budget permitting), so a client pinned to ``stable`` keeps
its answers until the candidate is trusted.
"""

from __future__ import annotations

__all__ = [
    "STABLE",
    "ModelVersions",
    "Servables",
    "ServableNotFoundError",
]

import re
import threading
from collections.abc import Iterator

from .serving import LoadedModel, NoModelError, ServingModel

STABLE = "stable"
_LABEL = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class ServableNotFoundError(LookupError):
    """The caller named a model, version or label this agent does not serve: a 404, the
    caller's mistake, never counted against a model's health."""


class ModelVersions:
    """One model name: the serving (default) version, other loaded versions, labels."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.serving = ServingModel()
        self._lock = threading.Lock()
        self._others: dict[int, LoadedModel] = {}
        self._labels: dict[str, int] = {}

    # -- what the update side calls -------------------------------------------------------------

    def keep(self, model: LoadedModel) -> None:
        """Keep ``model`` loaded beside the default one (the stable version during probation)."""
        with self._lock:
            self._others[model.serving_version] = model

    def drop(self, serving_version: int) -> LoadedModel | None:
        """Stop addressing a kept version; the caller frees it (requests in flight finish)."""
        with self._lock:
            self._labels = {k: v for k, v in self._labels.items() if v != serving_version
                            or self._default_number() == serving_version}
            return self._others.pop(serving_version, None)

    def set_label(self, label: str, serving_version: int | None) -> None:
        """Point ``label`` at a version (None removes it)."""
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r}: lower-case letters, digits, '_', '.', '-'; 1-64 characters")
        with self._lock:
            if serving_version is None:
                self._labels.pop(label, None)
            else:
                self._labels[label] = int(serving_version)

    # -- what the front ends call ---------------------------------------------------------------

    def _default_number(self) -> int | None:
        current = self.serving.current
        return None if current is None else current.serving_version

    def labels(self) -> dict[str, int]:
        with self._lock:
            return dict(self._labels)

    def loaded(self) -> list[LoadedModel]:
        """Every loaded version, the default first."""
        with self._lock:
            others = sorted(self._others.values(), key=lambda m: -m.serving_version)
        current = self.serving.current
        found = [current] if current is not None else []
        return found + [m for m in others if current is None or m.serving_version != current.serving_version]

    def resolve(self, version: str | None = None, label: str | None = None) -> LoadedModel:
        """The loaded version a request names: a serving version number, a bundle version
        string, a label, or nothing (the default)."""
        if version is not None and label is not None:
            raise ServableNotFoundError("name a version or a label, not both")
        if label is not None:
            with self._lock:
                number = self._labels.get(label)
            if number is None:
                raise ServableNotFoundError(
                    f"Servable not found for request: Label({self.name}, {label}); labels: "
                    f"{', '.join(sorted(self.labels())) or 'none'}"
                )
            return self._by_number(number, f"label {label!r} points at version {number}, which is not loaded")
        if version is None:
            current = self.serving.current
            if current is None:
                raise NoModelError(f"model {self.name!r} has no version serving")
            return current
        if version.isdigit():
            return self._by_number(int(version), f"Servable not found for request: Specific({self.name}, {version})")
        for model in self.loaded():
            if model.version == version:
                return model
        raise ServableNotFoundError(
            f"Servable not found for request: Specific({self.name}, {version}); loaded: "
            + ", ".join(f"{m.serving_version} ({m.version})" for m in self.loaded())
        )

    def _by_number(self, number: int, message: str) -> LoadedModel:
        for model in self.loaded():
            if model.serving_version == number:
                return model
        raise ServableNotFoundError(message)


class Servables:
    """Every model name this agent serves. Adding or removing a name never disturbs the
    others; a request resolves to a ``LoadedModel`` it then runs to completion on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelVersions] = {}

    def ensure(self, name: str) -> ModelVersions:
        with self._lock:
            found = self._models.get(name)
            if found is None:
                found = self._models[name] = ModelVersions(name)
            return found

    def get(self, name: str) -> ModelVersions:
        with self._lock:
            found = self._models.get(name)
        if found is None:
            raise ServableNotFoundError(
                f"Servable not found for request: Latest({name}); this agent serves "
                f"{', '.join(self.names()) or 'no model'}"
            )
        return found

    def publish(self, versions: ModelVersions) -> ModelVersions:
        """Make ``versions`` addressable by its name (its first version serves): until then
        the name is unknown to callers (404), not a model without a version (503)."""
        with self._lock:
            return self._models.setdefault(versions.name, versions)

    def get_or_none(self, name: str) -> ModelVersions | None:
        with self._lock:
            return self._models.get(name)

    def remove(self, name: str) -> ModelVersions | None:
        """Forget ``name``; the caller unloads what it held (requests in flight finish)."""
        with self._lock:
            return self._models.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def __iter__(self) -> Iterator[ModelVersions]:
        with self._lock:
            models = [self._models[n] for n in sorted(self._models)]
        return iter(models)

    def serving(self, name: str) -> ServingModel:
        """The ``ServingModel`` an update for ``name`` swaps into (created on first use)."""
        return self.ensure(name).serving

    def resolve(self, name: str, version: str | None = None, label: str | None = None) -> LoadedModel:
        return self.get(name).resolve(version, label)
