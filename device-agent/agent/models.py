"""Many models on one device: one update driver, slot folder and state file per model name,
the move from the one-model layout, and the memory budget.

Layout under the data folder::

    models.json                   {"format": 1, "last_sequence": N}: the highest desired state acted on
    models/<name>/state.json      that model's state (active, kept, update, serving versions)
    models/<name>/slots/<slot>    its bundles
    models/<name>/work/<update>   its update's downloads

An agent that served one model kept ``state.json`` and ``slots/`` at the top of the data
folder; ``migrate_single_model`` moves them under ``models/<name>/`` on the first start
(crash-safe: it can be interrupted and runs again; the old ``state.json`` goes last).

Each model's update runs on its own driver (``ModelDriver``), which publishes into the
model's ``ModelVersions``: during probation the previous version stays loaded and
addressable (label ``stable``), the candidate carries the rollout's label (or
``candidate``); a commit drops the previous and moves ``stable``; a rollback swaps the
kept previous back in without loading it again. One model's update never touches another
model's ``ServingModel``.
"""

from __future__ import annotations

__all__ = [
    "CANDIDATE",
    "ModelDriver",
    "ModelSet",
    "memory_refusal",
    "migrate_single_model",
    "model_home",
    "peek_package_model",
    "peek_package_models",
    "stored_states",
]

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeship.ota.atomicfile import atomic_write_json
from edgeship.ota.errors import BadInputError, EdgeshipError

from .config import AgentConfig
from .faults import FaultHooks
from .loading import load_bundle_model
from .persistence import AgentState, InstalledBundle, StateStore
from .reporter import Reporter
from .selftest import measure_footprint
from .servables import STABLE, ModelVersions, Servables
from .serving import LoadedModel
from .sources import SourceRegistry
from .state_machine import State, is_terminal
from .updater import ModelHome, UpdateDriver

log = logging.getLogger("edgeship.agent.models")

CANDIDATE = "candidate"
"""The label of a version in probation when its rollout names none."""
MODELS_DIR = "models"
INDEX_FORMAT = 1
_MB = 1 << 20


def model_home(config: AgentConfig, name: str) -> ModelHome:
    root = config.data_dir / MODELS_DIR / name
    return ModelHome(root / "slots", root / "work", root / "state.json")


def _index_file(config: AgentConfig) -> Path:
    return config.data_dir / "models.json"


def read_index(config: AgentConfig) -> dict[str, Any]:
    try:
        data = json.loads(_index_file(config).read_text())
    except FileNotFoundError:
        return {"format": INDEX_FORMAT, "last_sequence": 0}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"agent index {_index_file(config)} is unreadable ({exc}); remove it to rebuild") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise BadInputError(f"agent index {_index_file(config)} has an unknown format")
    return data


def write_index(config: AgentConfig, data: dict[str, Any]) -> None:
    atomic_write_json(_index_file(config), {**data, "format": INDEX_FORMAT})


def migrate_single_model(config: AgentConfig) -> str | None:
    """Move a one-model agent's ``state.json`` and ``slots/`` under ``models/<name>/``;
    returns the model's name (None: nothing to move). Bundles that had no serving version
    are numbered oldest first (kept ones 1, 2, ..., the active one last)."""
    legacy = config.state_file
    if not legacy.exists():
        return None
    state = StateStore(legacy).load()
    update = state.update
    name = (
        state.active.name if state.active is not None
        else update.bundle["name"] if update is not None and update.bundle
        else state.previous[0].name if state.previous
        else None
    )
    if name is None:  # an agent that never installed anything: nothing to keep
        legacy.unlink()
        return None
    home = model_home(config, name)
    home.slots_dir.mkdir(parents=True, exist_ok=True)
    if config.slots_dir.is_dir():
        for slot in sorted(config.slots_dir.iterdir()):
            if not (home.slots_dir / slot.name).exists():
                os.replace(slot, home.slots_dir / slot.name)
    if update is not None and (config.work_dir / update.id).is_dir():
        home.work_dir.mkdir(parents=True, exist_ok=True)
        if not (home.work_dir / update.id).exists():
            os.replace(config.work_dir / update.id, home.work_dir / update.id)
    number = state.max_serving_version
    renumbered: dict[str, int] = {}
    for bundle in [*reversed(state.previous), state.active]:
        if bundle is not None and not bundle.serving_version and bundle.slot not in renumbered:
            number += 1
            renumbered[bundle.slot] = number

    def numbered(bundle: InstalledBundle | None) -> InstalledBundle | None:
        if bundle is None or bundle.slot not in renumbered:
            return bundle
        return InstalledBundle.from_dict({**bundle.to_dict(), "serving_version": renumbered[bundle.slot]})

    state.active = numbered(state.active)
    state.previous = [b for b in (numbered(b) for b in state.previous) if b is not None]
    state.max_serving_version = max([state.max_serving_version, *renumbered.values()])
    if update is not None:
        update.rollback_to = numbered(update.rollback_to)
        update.staged = numbered(update.staged)
        if update.fetched:
            root = str(update.fetched.get("root", ""))
            for old, new in ((config.work_dir, home.work_dir), (config.slots_dir, home.slots_dir)):
                if root.startswith(str(old) + os.sep):
                    update.fetched = {**update.fetched, "root": str(new) + root[len(str(old)):]}
        if update.source.get("kind") == "slot":
            update.source = {**update.source, "slots_dir": str(home.slots_dir)}
    StateStore(home.state_file).save(state)
    index = read_index(config)
    index["last_sequence"] = max(int(index.get("last_sequence", 0)), state.last_sequence)
    write_index(config, index)
    legacy.unlink()
    log.info("moved the one-model state of %s under %s", name, home.state_file.parent)
    return name


def memory_refusal(name: str, budget_bytes: int, used_bytes: int, need_bytes: int) -> str | None:
    """None when ``need_bytes`` fits beside ``used_bytes`` in ``budget_bytes`` (0: no
    budget), else the REJECTED reason with the numbers."""
    if budget_bytes <= 0 or used_bytes + need_bytes <= budget_bytes:
        return None
    left = max(0, budget_bytes - used_bytes)
    return (
        f"memory budget: {name} needs {need_bytes / _MB:.1f} MB, {left / _MB:.1f} MB of "
        f"{budget_bytes / _MB:.1f} MB budget left ([models] memory_budget_mb)"
    )


def peek_package_model(path: Path) -> str:
    """The (first) model an offline package names; see ``peek_package_models``."""
    return peek_package_models(path)[0]


def peek_package_models(path: Path) -> list[str]:
    """The models an offline package names (its unverified ``desired.json``: one bundle,
    or a schema-2 set), to pick the drivers that verify it: a routing hint only (an update
    refuses a verified bundle of another model). Reads tar headers by hand: no tarfile import."""
    try:
        with open(path, "rb") as handle:
            for _ in range(64):
                header = handle.read(512)
                if len(header) < 512 or not header.strip(b"\0"):
                    break
                member = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                if member == "desired.json" and size <= 64 * 1024:
                    signed = json.loads(handle.read(size)).get("signed") or {}
                    models = signed.get("models")
                    if isinstance(models, dict) and models:
                        return sorted(str(n) for n in models)
                    return [str(signed["bundle"])]
                handle.seek((size + 511) // 512 * 512, os.SEEK_CUR)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInputError(f"offline package {path}: not readable as a package ({exc})") from None
    raise BadInputError(f"offline package {path}: no desired.json naming its model")


class ModelDriver(UpdateDriver):
    """One model's update driver, publishing into the model's versions and labels."""

    def __init__(
        self, config: AgentConfig, name: str, catalog: Servables, *, served: bool = True, **kwargs: Any
    ) -> None:
        versions = ModelVersions(name)
        super().__init__(
            config, serving=versions.serving if served else None, home=model_home(config, name), **kwargs
        )
        self.name = name
        self.model_name = name
        self.catalog = catalog
        self.versions = versions

    def reset_versions(self, served: bool) -> None:
        """A fresh, unpublished set of versions (after the model was removed)."""
        self.versions = ModelVersions(self.name)
        self.serving = self.versions.serving if served else None

    def candidate_label(self) -> str:
        update = self.state.update
        label = (update.rollout if update is not None else None) or CANDIDATE
        return label.lower() if label.lower() != STABLE else CANDIDATE

    def _published(self, new: LoadedModel | None, old: LoadedModel | None) -> None:
        if old is not None and (new is None or old.serving_version != new.serving_version):
            self.versions.keep(old)  # the stable version stays addressable during probation
        if new is not None:
            self.versions.set_label(self.candidate_label(), new.serving_version)
            self.catalog.publish(self.versions)

    def _kept_model(self, bundle: InstalledBundle) -> LoadedModel | None:
        return next((m for m in self.versions.loaded() if m.slot == bundle.slot), None)

    def _settled(self, active: InstalledBundle | None) -> None:
        current = self.versions.serving.current
        for model in self.versions.loaded():
            if current is None or model is not current:
                self.versions.drop(model.serving_version)
        for label in self.versions.labels():
            self.versions.set_label(label, None)
        if active is not None and current is not None:
            self.versions.set_label(STABLE, current.serving_version)
        elif current is None and self.catalog.get_or_none(self.name) is self.versions:
            self.catalog.remove(self.name)  # rolled back to nothing: the name is unknown again


class ModelSet:
    """Every model this agent serves: its driver, versions and memory accounting."""

    def __init__(
        self,
        config: AgentConfig,
        servables: Servables,
        *,
        reporter: Reporter,
        registry: SourceRegistry,
        hooks: FaultHooks | None = None,
        on_change: Callable[[UpdateDriver, State], None] | None = None,
        serving: bool = True,
    ) -> None:
        self.config = config
        self.serve = serving
        """False: nothing serves in this process (``install`` without a running agent):
        updates stop in PROBATION for the agent to watch."""
        self.servables = servables
        self.reporter = reporter
        self.registry = registry
        self.hooks = hooks
        self.on_change = on_change
        self._lock = threading.RLock()
        self._fetch_lock = threading.Lock()  # one transfer at a time (shared trust folder and downloader)
        self._drivers: dict[str, ModelDriver] = {}
        self.last_changed: str | None = None

    # -- opening ---------------------------------------------------------------------------------
    def open(self, *, resume: bool = True) -> None:
        """Migrate the one-model layout, then one driver per model folder; count the
        re-entry of each interrupted update before anything is loaded (``resume``)."""
        migrate_single_model(self.config)
        root = self.config.data_dir / MODELS_DIR
        names = sorted(p.name for p in root.iterdir() if (p / "state.json").exists()) if root.is_dir() else []
        for name in names:
            driver = self.driver(name)
            if resume:
                driver.prepare_resume()

    def load_boot_models(self) -> None:
        """Load what each model serves at start (not the removed ones), measuring each."""
        for driver in self.drivers():
            if driver.state.removed and not driver.in_progress:
                continue
            self.load(driver)

    def _open(self, driver: ModelDriver, bundle: InstalledBundle) -> LoadedModel | None:
        try:
            model, footprint = measure_footprint(
                lambda: load_bundle_model(self.config, bundle, slots_dir=driver.home.slots_dir)
            )
        except EdgeshipError as exc:
            log.error("cannot serve %s: %s", bundle.label, exc.message)
            return None
        model.footprint_bytes = max(footprint or 0, _file_size(driver.home.slots_dir / bundle.slot / bundle.model_file))
        return model

    def load(self, driver: ModelDriver) -> None:
        """Load and publish the bundle ``driver``'s model serves now; in PROBATION also the
        previous version, kept loaded under ``stable`` as before the restart."""
        boot = driver.boot_bundle()
        model = self._open(driver, boot) if boot is not None else None
        if model is not None:
            driver.versions.serving.swap(model)
            self.servables.publish(driver.versions)
            update = driver.state.update
            if update is not None and update.state == State.PROBATION.value:
                driver.versions.set_label(driver.candidate_label(), model.serving_version)
                previous = update.rollback_to
                kept = self._open(driver, previous) if previous is not None and previous.slot != model.slot else None
                if kept is not None:
                    driver.versions.keep(kept)
                    driver.versions.set_label(STABLE, kept.serving_version)
            else:
                driver.versions.set_label(STABLE, model.serving_version)
            log.info("serving %s (version %d)", model.label, model.serving_version)
        if not driver.in_progress:
            driver.cleanup()

    # -- drivers ---------------------------------------------------------------------------------
    def driver(self, name: str) -> ModelDriver:
        """The driver of ``name`` (created, with an empty state, on first use)."""
        with self._lock:
            found = self._drivers.get(name)
            if found is None:
                found = self._drivers[name] = ModelDriver(
                    self.config, name, self.servables, served=self.serve, reporter=self.reporter,
                    registry=self.registry, hooks=self.hooks, memory_check=self.memory_check,
                    on_change=self._changed, fetch_lock=self._fetch_lock,
                )
            return found

    def get(self, name: str) -> ModelDriver | None:
        with self._lock:
            return self._drivers.get(name)

    def drivers(self) -> list[ModelDriver]:
        with self._lock:
            return [self._drivers[n] for n in sorted(self._drivers)]

    def names(self, *, removed: bool = False) -> list[str]:
        return [d.name for d in self.drivers() if removed or not d.state.removed]

    def primary(self) -> ModelDriver | None:
        """The model that changed last (else the first by name): what one-model callers see."""
        with self._lock:
            if self.last_changed in self._drivers:
                return self._drivers[self.last_changed]
            return self._drivers[min(self._drivers)] if self._drivers else None

    def _changed(self, driver: UpdateDriver, state: State) -> None:
        self.last_changed = getattr(driver, "name", None)
        if self.on_change is not None:
            self.on_change(driver, state)

    # -- removal ---------------------------------------------------------------------------------
    def remove(self, name: str, reason: str) -> bool:
        """Stop serving ``name`` (the desired state no longer names it): its slots stay on
        disk per ``[retention]``. False while its update runs (aborted first; try again)."""
        driver = self.get(name)
        if driver is None or driver.state.removed:
            return True
        if driver.in_progress:
            driver.abort(f"model removed from the desired state ({reason})")
            return False
        with driver._lock:
            driver.state.removed = True
            driver.save()
        versions = self.servables.remove(name)
        if versions is not None:
            for model in versions.loaded():
                versions.drop(model.serving_version)
            versions.serving.swap(None)
        self.last_changed = name
        log.info("model %s removed (%s); its slots are kept", name, reason)
        return True

    def restore(self, name: str) -> bool:
        """A removed model named again at the version it kept: serve it again without an
        update. False when there is nothing kept to serve."""
        driver = self.get(name)
        if driver is None or not driver.state.removed or driver.state.active is None:
            return False
        with driver._lock:
            driver.state.removed = False
            driver.save()
        driver.reset_versions(self.serve)
        self.load(driver)
        return True

    def unremove(self, name: str) -> None:
        """An update for a removed model starts: it is a served model again."""
        driver = self.get(name)
        if driver is not None and driver.state.removed:
            with driver._lock:
                driver.state.removed = False
                driver.save()
            driver.reset_versions(self.serve)

    # -- memory ----------------------------------------------------------------------------------
    def memory_check(self, name: str, footprint: int | None) -> str | None:
        """Before activation: does ``name``'s new version fit beside every loaded version?"""
        budget = int(self.config.memory_budget_mb * _MB)
        if budget <= 0:
            return None
        used = sum(m.footprint_bytes or 0 for versions in self.servables for m in versions.loaded())
        return memory_refusal(name, budget, used, footprint or 0)

    def memory_used(self) -> int:
        return sum(m.footprint_bytes or 0 for versions in self.servables for m in versions.loaded())

    # -- reports ---------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Every model: name, active bundle, serving version, labels, loaded versions, update."""
        found = []
        for driver in self.drivers():
            state = driver.snapshot()
            found.append(model_status(driver.name, state, driver.versions if not state.removed else None))
        return found


def stored_states(config: AgentConfig) -> dict[str, AgentState]:
    """Every model's state as the data folder holds it (read-only: nothing is moved; a
    one-model layout not yet moved reads as its one model)."""
    if config.state_file.exists():
        state = StateStore(config.state_file).load()
        name = state.active.name if state.active else (
            state.update.bundle["name"] if state.update and state.update.bundle else None)
        return {name: state} if name else {}
    root = config.data_dir / MODELS_DIR
    names = sorted(p.name for p in root.iterdir() if (p / "state.json").exists()) if root.is_dir() else []
    return {name: StateStore(model_home(config, name).state_file).load() for name in names}


def latest(states: dict[str, AgentState]) -> str | None:
    """The model whose update started last (what one-model readers are shown)."""
    if not states:
        return None
    def started(name: str) -> tuple[float, str]:
        update = states[name].update
        return (update.started if update is not None else 0.0, name)

    return max(states, key=started)


def model_status(name: str, state: AgentState, versions: ModelVersions | None) -> dict[str, Any]:
    """One model's entry of ``status --json`` and of the reported state's ``models``."""
    update = state.update
    active = state.active
    return {
        "name": name,
        "removed": state.removed,
        "version": active.version if active else None,
        "serving_version": active.serving_version if active else None,
        "active": {"name": active.name, "version": active.version, "serving_version": active.serving_version}
        if active else None,
        "previous": {"name": state.previous[0].name, "version": state.previous[0].version}
        if state.previous else None,
        "labels": versions.labels() if versions is not None else {},
        "loaded": [
            {"version": m.version, "serving_version": m.serving_version, "footprint_bytes": m.footprint_bytes}
            for m in versions.loaded()
        ] if versions is not None else [],
        "update": None if update is None else {
            "id": update.id, "kind": update.kind, "state": update.state, "reason": update.reason[:1000],
            "terminal": is_terminal(State(update.state)), "bundle": update.bundle,
            "sequence": update.sequence, "deployment": update.deployment,
            **({"transfer": dict(update.transfer)} if update.transfer else {}),
            "history": [{"state": s, "at": t, "reason": r} for s, t, r in update.history],
        },
    }


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
