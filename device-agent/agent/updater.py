"""The update driver: runs one model's update through the state machine, persisting each
state before acting in it, and resumes (or rolls back) after a restart.

Read it as a table (after the Mender client): ``STEPS`` names one step per state; a step
returns an ``Outcome`` (an event, a reason, and what the transition changes in the agent
state), and ``state_machine.TRANSITIONS`` alone says where that event leads. The
transition and its changes (the active bundle, the kept ones, the accepted sequence) are
written in one atomic save. Nothing bypasses the table:

- a step's error becomes an event by its family (``classify_error``): ``SecurityError``
  and ``RuntimeUnavailableError`` (the bundle is untrusted, or needs what this device
  lacks) -> REJECT, anything else -> FAILURE; after activation the table sends both to
  ROLLING_BACK;
- an operator's rollback is an ABORT event, posted before a step wherever the table
  takes one, and by PROBATION's watch while it waits;
- PROBATION in a process that serves nothing (``install`` without a running agent)
  posts DEFER, the row that stays in PROBATION: the driver stops there, persisted.

What a running update holds in memory beside its persisted record (the live source,
the model loaded by SELF_TEST, the replaced model's statistics) is its ``UpdateSession``;
after a restart it is rebuilt from the record. Runtime compatibility lives with the
runtimes (``runtimes.check_bundle_runtime``), the self-test in selftest.py, fault
injection in faults.py (built by the command line, handed in here).

One driver runs one model name's updates, one at a time; the daemon runs a driver per
model (``ModelHome``: its slots, work folder and state file).

Longer than the project's usual module: one concept, the driver of the table, whose
steps share the session and the persisted record; splitting the steps from the loop
would split what a reader must hold together.
"""

from __future__ import annotations

__all__ = [
    "Outcome",
    "UpdateDriver",
    "UpdateInProgressError",
    "UpdateSession",
    "classify_error",
]

import datetime as _dt
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.ota.delivery import BASE_BUNDLE_NAME
from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError, first_line
from edgeship.ota.hashing import hash_file

from .config import AgentConfig
from .faults import FaultHooks
from .health import ProbationPolicy, ProbationSample, Verdict, probation_elapsed, probation_verdict
from .loading import load_bundle_model, release_memory
from .persistence import AgentState, InstalledBundle, StateStore, UpdateRecord
from .reporter import NullReporter, Reporter, event_document, state_document
from .runtimes import RuntimeUnavailableError, check_bundle_runtime
from .selftest import measure_footprint, run_self_test
from .serving import LoadedModel, ServingModel, model_health
from .slots import (
    apply_retention,
    drop_stale_bases,
    free_bytes,
    install_into_slot,
    plan_retention,
    slot_name,
)
from .sources import BundleSource, SlotSource, SourceContext, SourceRegistry, StagedBundle
from .state_machine import (
    WAITS,
    Event,
    State,
    accepts,
    event_on_reentry,
    is_terminal,
    next_state,
    serving_bundle_key,
)

log = logging.getLogger("edgeship.agent.updater")

DISK_MARGIN_BYTES = 1 << 20
"""Free space kept beyond the bundle's download and its extraction."""

Apply = Callable[[AgentState, UpdateRecord], None]


class UpdateInProgressError(EdgeshipError):
    """Another update of this model is running; one at a time."""


def classify_error(exc: BaseException) -> Event:
    """REJECT for trust failures and bundles this device cannot run, else FAILURE."""
    if isinstance(exc, (SecurityError, RuntimeUnavailableError)):
        return Event.REJECT
    return Event.FAILURE


@dataclass(frozen=True)
class Outcome:
    """What a step ended with: the event the table looks up, the reason recorded with the
    next state, and what a SUCCESS changes in the agent state (in the same atomic save)."""

    event: Event
    reason: str
    apply: Apply | None = None


@dataclass
class UpdateSession:
    """One update in memory: its persisted record and what only this process holds."""

    record: UpdateRecord
    source: BundleSource | None = None
    """The live source (rebuilt from ``record.source`` after a restart)."""
    prepared: LoadedModel | None = None
    """The new model, loaded and self-tested in SELF_TEST, published in ACTIVATING."""
    footprint_bytes: int | None = None
    """What loading and self-testing the new model added to the resident set."""
    baseline: dict[str, Any] | None = None
    """The replaced model's statistics at activation: probation compares against them."""


MemoryCheck = Callable[[str, int | None], str | None]
"""(model name, footprint in bytes) -> None when it fits, else the refusal's reason."""


@dataclass(frozen=True)
class ModelHome:
    """Where one model's updates live on disk."""

    slots_dir: Path
    work_dir: Path
    state_file: Path

    @classmethod
    def single(cls, config: AgentConfig) -> ModelHome:
        """The data folder's own slots and state (one model per agent)."""
        return cls(config.slots_dir, config.work_dir, config.state_file)


def _transfer_summary(transfer: dict[str, Any] | None) -> str:
    """`` (delta from 1.0.0: 12,345 of 1,048,576 bytes)``: what the FETCHING reason says travelled."""
    if not transfer:
        return ""
    kind = str(transfer.get("kind"))
    what = f"delta from {transfer.get('base_version')}" if kind == "delta" else kind
    text = f" ({what}: {int(transfer.get('bytes') or 0):,} of {int(transfer.get('full_bytes') or 0):,} bytes"
    return text + (f"; {transfer['fallback']})" if transfer.get("fallback") else ")")


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class UpdateDriver:
    """Runs updates one at a time over the state machine (thread-safe entry points).

    ``serving``: where the model serves (None: nothing serves in this process, probation
    waits for the agent); ``hooks``: fault injection (tests); ``memory_check``: the
    memory budget, asked before activation; ``clock``: times probation.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        serving: ServingModel | None = None,
        reporter: Reporter | None = None,
        registry: SourceRegistry | None = None,
        hooks: FaultHooks | None = None,
        store: StateStore | None = None,
        home: ModelHome | None = None,
        memory_check: MemoryCheck | None = None,
        on_change: Callable[[UpdateDriver, State], None] | None = None,
        fetch_lock: threading.Lock | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.home = home or ModelHome.single(config)
        self.clock = clock
        """Times probation: monotonic, so a wall-clock step (NTP after boot on a
        board without an RTC) neither skips the window nor holds it forever."""
        self.store = store or StateStore(self.home.state_file)
        self.serving = serving
        self.reporter = reporter or NullReporter()
        self.registry = registry or SourceRegistry()
        self.hooks = hooks
        self.memory_check = memory_check
        self.on_change = on_change
        self.fetch_lock = fetch_lock or threading.Lock()
        """Held through FETCHING: the models of one agent share the TUF trust folder and the
        fleet link's block downloader, so their transfers take turns."""
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._abort_reason = ""
        self._event_seq = 0
        self._session: UpdateSession | None = None
        self._hook_pending: State | None = None
        self._defer_probation = False
        self.state: AgentState = self.store.load()
        self._saved: dict[str, Any] = self.state.to_dict()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.steps: dict[State, Callable[[UpdateSession], Outcome]] = {
            State.DISK_CHECK: self._disk_check,
            State.FETCHING: self._fetching,
            State.VERIFYING: self._verifying,
            State.INSTALLING: self._installing,
            State.SELF_TEST: self._self_test,
            State.ACTIVATING: self._activating,
            State.PROBATION: self._probation,
            State.ROLLING_BACK: self._rolling_back,
        }

    # -- reading ---------------------------------------------------------------------------------
    @property
    def in_progress(self) -> bool:
        update = self.state.update
        return update is not None and not is_terminal(State(update.state))

    def snapshot(self) -> AgentState:
        """A copy of the state as last saved. Takes no lock: another model's driver reports
        every model's state while it holds its own lock (two drivers asking each other for
        their locks would deadlock)."""
        return AgentState.from_dict(self._saved)

    def save(self, *, publish: bool = True) -> None:
        """Write the state (atomically) and keep the copy ``snapshot`` reads (``publish``:
        a terminal state is shown once its end is cleaned up, see ``_finish``)."""
        with self._lock:
            self.store.save(self.state)
            if publish:
                self._saved = self.state.to_dict()

    def boot_bundle(self) -> InstalledBundle | None:
        """The bundle to serve at start (the old one while a rollback is in progress)."""
        update = self.state.update
        if update is not None and not is_terminal(State(update.state)):
            if serving_bundle_key(State(update.state)) == "rollback_to":
                return update.rollback_to
        return self.state.active

    # -- starting and stopping -------------------------------------------------------------------
    model_name: str | None = None
    """The model this driver updates (None: whatever the bundle names, one model per agent)."""

    def begin(self, source: BundleSource, kind: str = "install", *, base_sequence: int | None = None) -> UpdateRecord:
        """Record a new update (persisted in DISK_CHECK); run it with ``run()``.
        ``base_sequence``: the lowest director sequence it may accept (default: this
        model's last accepted one; the agent passes the highest of all its models)."""
        with self._lock:
            if self.in_progress:
                update = self.state.update
                assert update is not None
                raise UpdateInProgressError(
                    f"update {update.id} is in progress ({update.state}); wait for it to end or roll it back"
                )
            self._abort.clear()
            record = UpdateRecord(
                id=uuid.uuid4().hex[:12],
                kind=kind,
                source=source.to_record(),
                rollback_to=self.state.active,
                base_sequence=max(self.state.last_sequence, base_sequence or 0),
            )
            self._session = UpdateSession(record, source=source)
            self.state.update = record
            # persisted here, in the caller's thread; the test hook fires on the worker's first step
            self._enter(next_state(State.IDLE, Event.START), f"{kind} from {source.describe()}", hook=False)
            self._hook_pending = State(record.state)
            return record

    def rollback_request(self) -> BundleSource | None:
        """The operator's rollback: abort the update in progress (None: it fails, or
        rolls back by itself after activation), else the source of a full update of
        kind ``rollback`` to the most recent kept bundle (BadInputError: none kept)."""
        if self.abort("rollback requested by the operator"):
            return None
        if not self.state.previous:
            raise BadInputError("nothing to roll back to: no previous bundle is kept on this device")
        return SlotSource(self.state.previous[0], self.home.slots_dir)

    def abort(self, reason: str = "rollback requested by the operator") -> bool:
        """Ask the running update to stop (pre-activation: FAILED; after: roll back)."""
        with self._lock:
            if not self.in_progress:
                return False
            self._abort_reason = reason
            self._abort.set()
            return True

    def prepare_resume(self) -> None:
        """At start, before anything is loaded: count the re-entry of the interrupted
        state (persisted) and turn a crash loop into LOOP_DETECTED."""
        with self._lock:
            update = self.state.update
            if update is None or is_terminal(State(update.state)):
                return
            state = State(update.state)
            self._enter(state, f"resumed in {state.value} after a restart", hook=False)
            entries = update.entries.get(state.value, 0)
            event = event_on_reentry(entries, self.config.max_reentries)
            if event is not None:
                self._transition(Outcome(
                    event,
                    f"{state.value} interrupted {entries - 1} times (agent restarts or "
                    f"crashes); cap is {self.config.max_reentries}",
                ))
            elif self.hooks is not None:
                self.hooks.on_enter(state)  # the re-entry is counted on disk before anything can crash

    # -- the loop --------------------------------------------------------------------------------
    def run(self, *, stop_at_probation: bool = False) -> UpdateRecord | None:
        """Step through the table until the update ends, or waits (DEFER: PROBATION when
        nothing serves here, or ``stop_at_probation``)."""
        self._defer_probation = stop_at_probation or self.serving is None
        while True:
            with self._lock:
                update = self.state.update
                if update is None or is_terminal(State(update.state)):
                    if update is not None:
                        self._finish()
                    return update
                state = State(update.state)
                session = self._session_for(update)
            if self._hook_pending is state:
                self._hook_pending = None
                if self.hooks is not None:
                    self.hooks.on_enter(state)
            outcome = self._step(state, session)
            with self._lock:
                if self.state.update is not update or State(update.state) is not state:
                    continue  # pragma: no cover - defensive
                if (state, outcome.event) in WAITS:
                    return update  # stays, persisted as it is: no re-entry is counted
                self._transition(outcome)

    def _step(self, state: State, session: UpdateSession) -> Outcome:
        """One state's step, its errors turned into events (never "in progress" forever)."""
        if self._abort.is_set() and accepts(state, Event.ABORT):
            return Outcome(Event.ABORT, self._abort_reason or "aborted")
        try:
            if self.hooks is not None:
                self.hooks.before_step(state)
            return self.steps[state](session)
        except Exception as exc:  # every failure of a step ends the update somewhere (logged when unexpected)
            if not isinstance(exc, EdgeshipError):
                log.exception("unexpected error in %s", state.value)
            reason = exc.message if isinstance(exc, EdgeshipError) else f"{type(exc).__name__}: {first_line(exc)}"
            return Outcome(classify_error(exc), reason)

    def _session_for(self, update: UpdateRecord) -> UpdateSession:
        session = self._session
        if session is None or session.record is not update:
            session = self._session = UpdateSession(update)
        return session

    # -- persistence -----------------------------------------------------------------------------
    def _enter(self, state: State, reason: str, *, hook: bool = True) -> None:
        update = self.state.update
        assert update is not None
        now = time.time()
        update.state = state.value
        update.reason = reason
        update.entries[state.value] = update.entries.get(state.value, 0) + 1
        update.history.append([state.value, now, reason])
        if is_terminal(state):
            update.finished = now
        self.save(publish=not is_terminal(state))
        log.info("update %s: %s (%s)", update.id, state.value, reason)
        self._report(state, reason)
        if hook and self.hooks is not None:
            self.hooks.on_enter(state)

    def _transition(self, outcome: Outcome) -> None:
        update = self.state.update
        assert update is not None
        target = next_state(State(update.state), outcome.event)
        if outcome.apply is not None and outcome.event is Event.SUCCESS:
            outcome.apply(self.state, update)
        self._enter(target, outcome.reason)

    def _report(self, state: State, reason: str) -> None:
        self._event_seq += 1
        try:
            self.reporter.report_event(event_document(self.state, self._event_seq, state, reason))
            self.reporter.report_state(state_document(self.config, self.state))
            if self.on_change is not None:
                self.on_change(self, state)
        except Exception:  # a reporter must never break an update
            log.exception("reporter failed")

    def _context(self, update: UpdateRecord) -> SourceContext:
        active = self.state.active
        base = self.home.slots_dir / active.slot / BASE_BUNDLE_NAME if active is not None else None
        return SourceContext(
            config=self.config,
            last_sequence=update.base_sequence,
            now=_utcnow(),
            work_dir=self.home.work_dir / update.id,
            trust_dir=self.config.data_dir / "trust",
            base_bundle=base if base is not None and base.is_file() else None,
            base_version=active.version if active is not None else None,
        )

    def _source(self, session: UpdateSession) -> BundleSource:
        if session.source is None:
            session.source = self.registry.rebuild(session.record.source)
        return session.source

    # -- the steps, one per state ----------------------------------------------------------------
    def _disk_check(self, session: UpdateSession) -> Outcome:
        update = session.record
        admission = self._source(session).admit(self._context(update))
        if self.model_name is not None and admission.name != self.model_name:
            raise SecurityError(f"bundle {admission.name} {admission.version} is not model {self.model_name}")
        active = self.state.active
        if (
            update.kind == "install"
            and active is not None
            and (active.name, active.version) == (admission.name, admission.version)
        ):
            raise EdgeshipError(f"{admission.name} {admission.version} is already the active bundle")
        need = admission.length * 2 + DISK_MARGIN_BYTES if admission.length else 0
        free = free_bytes(self.config.data_dir)
        if need and free < need:
            raise EdgeshipError(
                f"insufficient disk: need {need} bytes (bundle {admission.length} bytes, downloaded and "
                f"extracted), free {free} bytes on {self.config.data_dir}"
            )

        def apply(state: AgentState, record: UpdateRecord) -> None:
            record.bundle = {"name": admission.name, "version": admission.version}
            record.sequence = admission.sequence
            record.deployment = admission.deployment
            record.serving_version = admission.serving_version
            record.rollout = admission.rollout
            if admission.sequence is not None:
                state.last_sequence = max(state.last_sequence, admission.sequence)

        reason = f"{admission.name} {admission.version}: {admission.length} bytes, {free} free"
        return Outcome(Event.SUCCESS, reason, apply)

    def _fetching(self, session: UpdateSession) -> Outcome:
        with self.fetch_lock:
            staged = self._source(session).fetch(self._context(session.record))

        def apply(state: AgentState, record: UpdateRecord) -> None:
            record.fetched = staged.to_dict()
            record.transfer = staged.transfer

        return Outcome(Event.SUCCESS, f"fetched and verified {staged.name} {staged.version}"
                       + _transfer_summary(staged.transfer), apply)

    def _verifying(self, session: UpdateSession) -> Outcome:
        update = session.record
        if update.fetched is None:
            raise EdgeshipError("no fetched bundle recorded (state file inconsistent)")
        staged = StagedBundle.from_dict(update.fetched)
        manifest = staged.manifest
        if update.bundle and (staged.name, staged.version) != (update.bundle["name"], update.bundle["version"]):
            raise SecurityError(
                f"bundle holds {staged.name} {staged.version}, the update asked for "
                f"{update.bundle['name']} {update.bundle['version']}"
            )
        root = Path(staged.root)
        for member, info in sorted((manifest.get("files") or {}).items()):
            path = root / member
            try:
                size, digest = hash_file(path)
            except OSError as exc:
                raise EdgeshipError(f"bundle file {path} cannot be read: {exc.strerror or exc}") from None
            if size != info.get("size") or digest != info.get("sha256"):
                raise EdgeshipError(f"bundle file {path} changed on disk since it was verified (size or sha256)")
        runtime = check_bundle_runtime(manifest, self.config.runtime_prefer)
        count = len(manifest.get("files") or {})
        return Outcome(Event.SUCCESS, f"{count} files match the manifest; runtime available ({runtime})")

    def _installing(self, session: UpdateSession) -> Outcome:
        update = session.record
        assert update.fetched is not None
        staged = StagedBundle.from_dict(update.fetched)
        manifest = staged.manifest
        if staged.in_place:
            slot = Path(staged.root).name
        else:
            slot = slot_name(staged.name, staged.version, update.id)
            install_into_slot(Path(staged.root), self.home.slots_dir, slot)
        golden = manifest.get("golden") or None
        installed = InstalledBundle(
            name=staged.name,
            version=staged.version,
            slot=slot,
            model_file=str(manifest["model_file"]),
            model_format=str(manifest["format"]),
            golden_file=golden.get("file") if golden else None,
            labels_file="labels.txt" if "labels.txt" in (manifest.get("files") or {}) else None,
            golden_tolerance={"atol": float(golden.get("atol", 0.0)), "rtol": float(golden.get("rtol", 0.0))}
            if golden
            else None,
            runtime=dict(manifest.get("runtime") or {}),
            installed_at=time.time(),
            files={k: dict(v) for k, v in (manifest.get("files") or {}).items()},
            serving_version=self._serving_version_for(update, staged),
        )

        def apply(state: AgentState, record: UpdateRecord) -> None:
            record.staged = installed
            state.max_serving_version = max(state.max_serving_version, installed.serving_version)

        return Outcome(Event.SUCCESS, f"installed into slot {slot} as serving version {installed.serving_version}",
                       apply)

    def _serving_version_for(self, update: UpdateRecord, staged: StagedBundle) -> int:
        """The desired state's serving version, a kept bundle's own, or the next one here."""
        if staged.in_place:
            kept = next((b for b in self.state.previous if b.slot == Path(staged.root).name), None)
            if kept is not None and kept.serving_version:
                return kept.serving_version
        if update.serving_version:
            return int(update.serving_version)
        known = [self.state.max_serving_version]
        known += [b.serving_version for b in (self.state.active, *self.state.previous) if b is not None]
        return max(known) + 1

    def _self_test(self, session: UpdateSession) -> Outcome:
        installed = session.record.staged
        assert installed is not None
        running = self.serving.current if self.serving is not None else None

        def load_and_test() -> tuple[LoadedModel, Any]:
            model = load_bundle_model(self.config, installed, slots_dir=self.home.slots_dir, warm=False)
            result = run_self_test(
                model, installed, self.home.slots_dir / installed.slot, running,
                runs=self.config.self_test_runs, max_latency_ratio=self.config.self_test_latency_ratio,
            )
            return model, result

        (model, result), measured = measure_footprint(load_and_test)
        if not result.passed:
            raise EdgeshipError(f"self-test failed: {result.reason}")
        # at least the model file: its weights are mapped in whatever the allocator reuses
        model_file = self.home.slots_dir / installed.slot / installed.model_file
        footprint = max(measured or 0, model_file.stat().st_size if model_file.exists() else 0)
        model.footprint_bytes = footprint
        refusal = self.memory_check(installed.name, footprint) if self.memory_check is not None else None
        if refusal is not None:
            return Outcome(Event.REJECT, refusal)
        session.prepared, session.footprint_bytes = model, footprint

        def apply(state: AgentState, record: UpdateRecord) -> None:
            record.footprint_bytes = footprint

        return Outcome(Event.SUCCESS, f"self-test passed: {result.reason}", apply)

    def _activating(self, session: UpdateSession) -> Outcome:
        installed = session.record.staged
        assert installed is not None
        if self.serving is not None:
            model = session.prepared
            if model is None or model.slot != installed.slot:  # after a restart: load and warm again
                model = load_bundle_model(self.config, installed, slots_dir=self.home.slots_dir)
                model.footprint_bytes = session.record.footprint_bytes
            old = self.serving.swap(model)
            session.baseline = old.stats.snapshot() if old is not None else None
            self._published(model, old)
        session.prepared = None

        def apply(state: AgentState, record: UpdateRecord) -> None:
            old_active = state.active
            state.active = installed
            kept = [  # a kept copy of the version now active is no rollback target
                b
                for b in state.previous
                if b.slot not in (installed.slot, old_active.slot if old_active else "")
                and (b.name, b.version) != (installed.name, installed.version)
                and not (old_active and (b.name, b.version) == (old_active.name, old_active.version))
            ]
            state.previous = ([old_active] if old_active and old_active.slot != installed.slot else []) + kept
            record.probation_started = time.time()

        where = "serving" if self.serving is not None else "activated (probation starts when the agent runs)"
        return Outcome(Event.SUCCESS, f"{installed.label} {where}", apply)

    def _probation(self, session: UpdateSession) -> Outcome:
        if self._defer_probation or self.serving is None:
            return Outcome(Event.DEFER, "probation runs when the agent starts")
        policy = ProbationPolicy(
            window_s=self.config.probation_window_s,
            min_requests=self.config.probation_min_requests,
            max_error_rate=self.config.max_error_rate,
            max_nonfinite_rate=self.config.max_nonfinite_rate,
            max_latency_ratio=self.config.max_latency_ratio,
        )
        # The window runs on this process's monotonic clock: an agent restarted during
        # probation watches the model for a whole window again (the persisted
        # probation_started is a wall-clock timestamp, for reports only).
        clock = self.clock
        started = clock()
        baseline = session.baseline
        baseline_p95 = baseline["latency"].quantile_ms(0.95) if baseline and baseline["requests"] else None
        while True:
            if self._abort.is_set():
                return Outcome(Event.ABORT, self._abort_reason or "aborted")
            current = self.serving.current
            if current is None:
                raise EdgeshipError("no model is serving during probation")
            snap = current.stats.snapshot()
            health = model_health(snap)
            sample = ProbationSample(
                elapsed_s=probation_elapsed(started, clock()),
                requests=health["requests"],
                errors=health["errors"],
                nonfinite=health["nonfinite"],
                p95_ms=snap["latency"].quantile_ms(0.95),
                baseline_p95_ms=baseline_p95,
                baseline_requests=baseline["requests"] if baseline else 0,
            )
            verdict, reason = probation_verdict(sample, policy)
            if verdict is Verdict.COMMIT:
                return Outcome(Event.SUCCESS, reason, self._committed)
            if verdict is Verdict.ROLL_BACK:
                return Outcome(Event.FAILURE, f"probation failed: {reason}")
            self._abort.wait(min(0.1, max(0.01, policy.window_s / 20)))

    def _committed(self, state: AgentState, record: UpdateRecord) -> None:
        """Probation passed: the previous version is no longer kept loaded."""
        self._settled(state.active)

    def _rolling_back(self, session: UpdateSession) -> Outcome:
        update = session.record
        target = update.rollback_to
        if self.serving is not None:
            current = self.serving.current
            if target is None:
                old = self.serving.swap(None)
                self._published(None, old)
            elif current is None or current.slot != target.slot:
                model = self._kept_model(target) or load_bundle_model(
                    self.config, target, slots_dir=self.home.slots_dir
                )
                old = self.serving.swap(model)
                self._published(model, old)
        failed = update.staged

        def apply(state: AgentState, record: UpdateRecord) -> None:
            state.active = target
            state.previous = [b for b in state.previous if b.slot != (target.slot if target else "")]
            if failed is not None and failed.slot != (target.slot if target else ""):
                # no longer kept: retention deletes its slot at the end of the update
                state.previous = [b for b in state.previous if b.slot != failed.slot]
            self._settled(target)

        back = target.label if target else "no model (there was none before)"
        return Outcome(Event.SUCCESS, f"rolled back to {back} ({update.reason})", apply)

    # -- what the serving side sees (overridden per model by the daemon) --------------------------
    def _published(self, new: LoadedModel | None, old: LoadedModel | None) -> None:
        """A version was swapped in (``new``) in place of ``old``."""

    def _settled(self, active: InstalledBundle | None) -> None:
        """The update ended with ``active`` serving (committed or rolled back)."""

    def _kept_model(self, bundle: InstalledBundle) -> LoadedModel | None:
        """A version still loaded beside the serving one (the stable version in probation)."""
        return None

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        """After a terminal state: drop the work folder and apply retention."""
        update = self.state.update
        if update is None:
            return
        session, self._session = self._session, None
        if session is not None and session.source is not None:
            try:
                session.source.cleanup(self._context(update))
            except Exception:  # best effort: retention removes the work folder anyway
                log.exception("source cleanup failed")
        self.cleanup()
        release_memory()

    def cleanup(self) -> None:
        """Retention: keep the active and ``keep_previous`` bundles; delete failed ones,
        older ones and leftovers of interrupted updates (slots and work folders)."""
        with self._lock:
            protected: set[str] = set()
            update = self.state.update
            if update is not None and not is_terminal(State(update.state)):
                for bundle in (update.staged, update.rollback_to):
                    if bundle is not None:
                        protected.add(bundle.slot)
            slots = self.home.slots_dir
            on_disk = [p.name for p in slots.iterdir() if p.is_dir()] if slots.is_dir() else []
            plan = plan_retention(self.state.active, self.state.previous, self.config.keep_previous, on_disk, protected)
            if list(plan.keep_previous) != self.state.previous:
                self.state.previous = list(plan.keep_previous)
                self.save(publish=False)
            apply_retention(slots, plan)
            active = self.state.active
            drop_stale_bases(slots, {active.slot} if active is not None else set(), protected)
            work = self.home.work_dir
            if work.is_dir():
                for child in work.iterdir():
                    if update is None or is_terminal(State(update.state)) or child.name != update.id:
                        shutil.rmtree(child, ignore_errors=True)
            self._saved = self.state.to_dict()  # what status shows: only now is the end cleaned up
