"""The update driver: runs one update through the state machine, persisting each
state before acting in it, and resumes (or rolls back) after a restart.

Every state has one action that returns the event the table turns into the next
state; the transition and whatever it changes in the agent state (the active
bundle, the kept ones, the accepted sequence) are written in one atomic save.

Errors map onto events: ``SecurityError`` and ``RuntimeUnavailableError`` (the
bundle is untrusted, or needs what this device lacks) -> REJECT; anything else
-> FAILURE; an operator's rollback -> ABORT. After activation every failure
rolls back; before it the old model never stopped serving.

Test hook (documented, off by default): ``EDGESHIP_AGENT_TEST_PAUSE_IN=STATE``
makes the driver stop (sleep forever) right after it persisted its entry into
STATE, writing ``<data>/test-paused-in-STATE`` first, so a test can SIGKILL the
process at a known point; ``EDGESHIP_AGENT_TEST_KILL_IN=STATE`` makes the
process SIGKILL itself there (a model that kills the agent, a power cut).
"""

from __future__ import annotations

__all__ = [
    "SelfTestResult",
    "TestHooks",
    "UpdateDriver",
    "UpdateInProgressError",
    "classify_error",
    "load_bundle_model",
    "release_memory",
    "tflite_runtime_order",
    "tflite_version_ok",
]

import datetime as _dt
import gc
import logging
import os
import re
import shutil
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError, first_line
from edgeship.ota.golden import GoldenVectors, compare_outputs
from edgeship.ota.hashing import hash_file

from .config import AgentConfig
from .health import (
    ProbationPolicy,
    ProbationSample,
    Verdict,
    latency_gate,
    probation_elapsed,
    probation_verdict,
)
from .persistence import AgentState, InstalledBundle, StateStore, UpdateRecord
from .reporter import NullReporter, Reporter, event_document, state_document
from .runtimes import RuntimeUnavailableError, _importable_tflite, match_names, open_model
from .serving import LoadedModel, ServingModel, model_health, warm_up, zero_inputs
from .slots import apply_retention, free_bytes, install_into_slot, plan_retention, slot_name
from .sources import BundleSource, SlotSource, SourceContext, SourceRegistry, StagedBundle
from .state_machine import (
    PRE_ACTIVATION_STATES,
    Event,
    State,
    event_on_reentry,
    is_terminal,
    next_state,
    serving_bundle_key,
)

log = logging.getLogger("edgeship.agent.updater")

DISK_MARGIN_BYTES = 1 << 20
"""Free space kept beyond the bundle's download and its extraction."""

LITERT_TFLITE_FLOOR = "2.17.0"
"""The TensorFlow Lite version whose kernels every LiteRT (``ai_edge_litert``) release
has: LiteRT was split out of TensorFlow after 2.17. A manifest's ``min_version`` for a
.tflite model is a TensorFlow Lite version (the converter's ``min_runtime_version``),
while LiteRT numbers its own releases (1.x, 2.x), so the two are never compared."""


def tflite_runtime_order(prefer: Sequence[str], runtimes: Sequence[str] | None) -> list[str]:
    """The configured TFLite runtimes (``[runtime] prefer``, in order) that the bundle
    may run on: its manifest's ``runtime.runtimes`` (e.g. only ``tensorflow`` for a
    model with SELECT_TF_OPS); all of them when the manifest names none."""
    allowed = {str(r) for r in runtimes or []}
    return [r for r in prefer if not allowed or r in allowed]


def tflite_version_ok(
    runtime: str, have: str, min_version: str | None, validated_with: Mapping[str, Any] | None
) -> tuple[bool, str]:
    """Whether TFLite runtime ``runtime`` at version ``have`` provides the TensorFlow Lite
    version ``min_version`` the bundle states, and why.

    tflite_runtime and tensorflow use TensorFlow's numbering: compared directly. LiteRT
    provides at least ``LITERT_TFLITE_FLOOR``; above it, only the converter's own proof
    counts (the model was validated on LiteRT at this version or an older one)."""
    if not min_version:
        return True, "no minimum runtime version"
    if runtime != "litert":
        if _version_tuple(have) >= _version_tuple(str(min_version)):
            return True, f"{runtime} {have} >= {min_version}"
        return False, f"bundle needs {runtime} >= {min_version}, this device has {have}"
    if _version_tuple(str(min_version)) <= _version_tuple(LITERT_TFLITE_FLOOR):
        return True, f"TensorFlow Lite {min_version} <= {LITERT_TFLITE_FLOOR}, which every LiteRT has"
    validated = validated_with or {}
    if validated.get("runtime") == "litert" and validated.get("version") and _version_tuple(
        have
    ) >= _version_tuple(str(validated["version"])):
        return True, f"validated by the converter on litert {validated['version']} (this device: {have})"
    return False, (
        f"bundle needs TensorFlow Lite >= {min_version}; litert {have} is not known to provide it "
        f"(LiteRT numbers its releases apart from TensorFlow; the converter validated the model "
        f"with {validated.get('runtime', 'no runtime')} {validated.get('version', '')})".rstrip()
    )


class UpdateInProgressError(EdgeshipError):
    """Another update is running; one at a time."""


class _Aborted(Exception):
    pass


def classify_error(exc: BaseException) -> Event:
    """REJECT for trust failures and bundles this device cannot run, else FAILURE."""
    if isinstance(exc, (SecurityError, RuntimeUnavailableError)):
        return Event.REJECT
    return Event.FAILURE


@dataclass
class TestHooks:
    """Test-only: pause or SIGKILL the process on entering a state (see the module doc)."""

    __test__ = False  # not a pytest class

    pause_in: frozenset[str] = frozenset()
    kill_in: frozenset[str] = frozenset()
    marker_dir: Path | None = None
    inject: Callable[[State], None] | None = None  # raise here to inject a failure in a state

    @classmethod
    def from_env(cls, marker_dir: Path) -> TestHooks:
        def states(name: str) -> frozenset[str]:
            return frozenset(
                s.strip().upper() for s in os.environ.get(name, "").split(",") if s.strip()
            )

        return cls(
            pause_in=states("EDGESHIP_AGENT_TEST_PAUSE_IN"),
            kill_in=states("EDGESHIP_AGENT_TEST_KILL_IN"),
            marker_dir=marker_dir,
        )

    def on_enter(self, state: State) -> None:
        if state.value in self.kill_in:
            log.warning("test hook: SIGKILL on entering %s", state.value)
            os.kill(os.getpid(), signal.SIGKILL)
        if state.value in self.pause_in:
            if self.marker_dir is not None:
                (self.marker_dir / f"test-paused-in-{state.value}").write_text(str(os.getpid()))
            log.warning("test hook: paused on entering %s", state.value)
            while True:
                time.sleep(3600)


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    reason: str
    new_ms: float | None = None
    running_ms: float | None = None


def load_bundle_model(
    config: AgentConfig, bundle: InstalledBundle, *, warm: bool = True
) -> LoadedModel:
    """Open a slot's model with the configured runtime preference, warmed."""
    slot = config.slots_dir / bundle.slot
    prefer = tflite_runtime_order(config.runtime_prefer, (bundle.runtime or {}).get("runtimes"))
    runner = open_model(
        slot / bundle.model_file, threads=config.threads, prefer=prefer or list(config.runtime_prefer)
    )
    model = LoadedModel(name=bundle.name, version=bundle.version, runner=runner, slot=bundle.slot)
    golden = None
    if bundle.golden_file and (slot / bundle.golden_file).exists():
        try:
            golden = GoldenVectors.load(slot / bundle.golden_file)
        except EdgeshipError:
            golden = None
    if golden is not None and golden.inputs:
        x = np.asarray(golden.inputs[0], dtype=np.float32)
        model.golden_input_mean = float(x.mean())
        model.golden_input_std = float(x.std()) or None
    if warm:
        first = None
        if golden is not None:
            try:
                first = runner.ordered({n: np.asarray(a)[:1] for n, a in zip(golden.input_names, golden.inputs)})
            except EdgeshipError:
                first = None
        try:
            warm_up(runner, first)
        except EdgeshipError:
            warm_up(runner)
    return model


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class UpdateDriver:
    """Runs updates one at a time over the state machine (thread-safe entry points)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        serving: ServingModel | None = None,
        reporter: Reporter | None = None,
        registry: SourceRegistry | None = None,
        hooks: TestHooks | None = None,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        """Times probation: monotonic, so a wall-clock step (NTP after boot on a
        board without an RTC) neither skips the window nor holds it forever."""
        self.store = store or StateStore(config.state_file)
        self.serving = serving
        self.reporter = reporter or NullReporter()
        self.registry = registry or SourceRegistry()
        self.hooks = hooks or TestHooks()
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._abort_reason = ""
        self._prepared: LoadedModel | None = None
        self._baseline: dict[str, Any] | None = None
        self._event_seq = 0
        self._ctx_cache: dict[str, Any] = {}
        self._hook_pending: State | None = None
        self.state: AgentState = self.store.load()
        config.data_dir.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def in_progress(self) -> bool:
        update = self.state.update
        return update is not None and not is_terminal(State(update.state))

    def snapshot(self) -> AgentState:
        with self._lock:
            return AgentState.from_dict(self.state.to_dict())

    def boot_bundle(self) -> InstalledBundle | None:
        """The bundle to serve at start (the old one while a rollback is in progress)."""
        update = self.state.update
        if update is not None and not is_terminal(State(update.state)):
            if serving_bundle_key(State(update.state)) == "rollback_to":
                return update.rollback_to
        return self.state.active

    # -- starting and stopping -------------------------------------------------------------------
    def begin(self, source: BundleSource, kind: str = "install") -> UpdateRecord:
        """Record a new update (persisted in DISK_CHECK); run it with ``run()``."""
        with self._lock:
            if self.in_progress:
                update = self.state.update
                assert update is not None
                raise UpdateInProgressError(
                    f"update {update.id} is in progress ({update.state}); wait for it to end or roll it back"
                )
            self._abort.clear()
            self._prepared = None
            self._baseline = None
            self._ctx_cache = {"source": source}  # the live source; rebuilt from its record only after a restart
            record = UpdateRecord(
                id=uuid.uuid4().hex[:12],
                kind=kind,
                source=source.to_record(),
                rollback_to=self.state.active,
                base_sequence=self.state.last_sequence,
            )
            self.state.update = record
            # persisted here, in the caller's thread; the test hook fires on the worker's first step
            self._enter(
                next_state(State.IDLE, Event.START), f"{kind} from {source.describe()}", hook=False
            )
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
        return SlotSource(self.state.previous[0])

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
                self._transition(
                    event,
                    f"{state.value} interrupted {entries - 1} times (agent restarts or "
                    f"crashes); cap is {self.config.max_reentries}",
                )
            else:
                self.hooks.on_enter(
                    state
                )  # the re-entry is counted on disk before anything can crash

    # -- the loop --------------------------------------------------------------------------------
    def run(self, *, stop_at_probation: bool = False) -> UpdateRecord | None:
        """Act in the current state until the update ends (or reaches PROBATION when
        nothing serves, e.g. ``install`` while the agent is not running)."""
        while True:
            with self._lock:
                update = self.state.update
                if update is None or is_terminal(State(update.state)):
                    if update is not None:
                        self._finish()
                    return update
                state = State(update.state)
            if self._hook_pending is state:
                self._hook_pending = None
                self.hooks.on_enter(state)
            if (
                state is State.PROBATION
                and (stop_at_probation or self.serving is None)
                and not self._abort.is_set()
            ):
                return update
            try:
                if self._abort.is_set() and state not in (State.ROLLING_BACK,):
                    raise _Aborted()
                if self.hooks.inject is not None:
                    self.hooks.inject(state)
                event, reason, mutate = self._act(state)
            except _Aborted:
                event, reason, mutate = Event.ABORT, self._abort_reason or "aborted", None
            except Exception as exc:  # every failure ends somewhere: never "in progress" forever
                event = classify_error(exc)
                reason = (
                    exc.message
                    if isinstance(exc, EdgeshipError)
                    else f"{type(exc).__name__}: {first_line(exc)}"
                )
                if not isinstance(exc, EdgeshipError):
                    log.exception("unexpected error in %s", state.value)
                mutate = None
                if event is Event.REJECT and state not in PRE_ACTIVATION_STATES:
                    event = Event.FAILURE  # after activation nothing is refused: it rolls back
            with self._lock:
                if self.state.update is not update or State(update.state) is not state:
                    continue  # pragma: no cover - defensive
                self._transition(event, reason, mutate)

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
        self.store.save(self.state)
        log.info("update %s: %s (%s)", update.id, state.value, reason)
        self._report(state, reason)
        if hook:
            self.hooks.on_enter(state)

    def _transition(
        self,
        event: Event,
        reason: str,
        mutate: Callable[[AgentState, UpdateRecord], None] | None = None,
    ) -> None:
        update = self.state.update
        assert update is not None
        target = next_state(State(update.state), event)
        if mutate is not None and event is Event.SUCCESS:
            mutate(self.state, update)
        self._enter(target, reason)

    def _report(self, state: State, reason: str) -> None:
        self._event_seq += 1
        try:
            self.reporter.report_event(event_document(self.state, self._event_seq, state, reason))
            self.reporter.report_state(state_document(self.config, self.state))
        except Exception:  # a reporter must never break an update
            log.exception("reporter failed")

    def _context(self, update: UpdateRecord) -> SourceContext:
        return SourceContext(
            config=self.config,
            last_sequence=update.base_sequence,
            now=_utcnow(),
            work_dir=self.config.work_dir / update.id,
            trust_dir=self.config.data_dir / "trust",
            cache=self._ctx_cache,
        )

    def _source(self, update: UpdateRecord) -> BundleSource:
        source = self._ctx_cache.get("source")
        if source is None:
            source = self._ctx_cache["source"] = self.registry.rebuild(update.source)
        return source

    # -- the actions ----------------------------------------------------------------------------
    def _act(
        self, state: State
    ) -> tuple[Event, str, Callable[[AgentState, UpdateRecord], None] | None]:
        update = self.state.update
        assert update is not None
        action = {
            State.DISK_CHECK: self._disk_check,
            State.FETCHING: self._fetching,
            State.VERIFYING: self._verifying,
            State.INSTALLING: self._installing,
            State.SELF_TEST: self._self_test,
            State.ACTIVATING: self._activating,
            State.PROBATION: self._probation,
            State.ROLLING_BACK: self._rolling_back,
        }[state]
        return action(update)

    def _disk_check(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        source = self._source(update)
        ctx = self._context(update)
        admission = source.admit(ctx)
        active = self.state.active
        if (
            update.kind == "install"
            and active is not None
            and (active.name, active.version) == (admission.name, admission.version)
        ):
            raise EdgeshipError(
                f"{admission.name} {admission.version} is already the active bundle"
            )
        need = admission.length * 2 + DISK_MARGIN_BYTES if admission.length else 0
        free = free_bytes(self.config.data_dir)
        if need and free < need:
            raise EdgeshipError(
                f"insufficient disk: need {need} bytes (bundle {admission.length} bytes, downloaded and "
                f"extracted), free {free} bytes on {self.config.data_dir}"
            )

        def mutate(state: AgentState, record: UpdateRecord) -> None:
            record.bundle = {"name": admission.name, "version": admission.version}
            record.sequence = admission.sequence
            record.deployment = admission.deployment
            if admission.sequence is not None:
                state.last_sequence = max(state.last_sequence, admission.sequence)

        return (
            Event.SUCCESS,
            f"{admission.name} {admission.version}: {admission.length} bytes, {free} free",
            mutate,
        )

    def _fetching(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        source = self._source(update)
        ctx = self._context(update)
        staged = source.fetch(ctx)

        def mutate(state: AgentState, record: UpdateRecord) -> None:
            record.fetched = staged.to_dict()

        return Event.SUCCESS, f"fetched and verified {staged.name} {staged.version}", mutate

    def _verifying(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        if update.fetched is None:
            raise EdgeshipError("no fetched bundle recorded (state file inconsistent)")
        staged = StagedBundle.from_dict(update.fetched)
        manifest = staged.manifest
        if update.bundle and (staged.name, staged.version) != (
            update.bundle["name"],
            update.bundle["version"],
        ):
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
                raise EdgeshipError(
                    f"bundle file {path} cannot be read: {exc.strerror or exc}"
                ) from None
            if size != info.get("size") or digest != info.get("sha256"):
                raise EdgeshipError(
                    f"bundle file {path} changed on disk since it was verified (size or sha256)"
                )
        self._check_runtime(manifest)
        return (
            Event.SUCCESS,
            f"{len(manifest.get('files') or {})} files match the manifest; runtime available",
            None,
        )

    def _check_runtime(self, manifest: dict[str, Any]) -> None:
        """REJECT (RuntimeUnavailableError) a bundle that needs what this device lacks."""
        import platform

        fmt = manifest.get("format")
        needs = manifest.get("runtime") or {}
        machine = platform.machine()
        arches = needs.get("architectures") or []
        if arches and machine not in arches:
            raise RuntimeUnavailableError(f"bundle is built for {arches}, this device is {machine}")
        if fmt == "tflite":
            order = tflite_runtime_order(self.config.runtime_prefer, needs.get("runtimes"))
            if not order:
                raise RuntimeUnavailableError(
                    f"bundle runs only on {list(needs.get('runtimes') or [])}; this agent uses "
                    f"{list(self.config.runtime_prefer)} ([runtime] prefer)"
                )
            found = next((r for r in order if _importable_tflite(r)), None)
            if found is None:
                raise RuntimeUnavailableError(
                    f"bundle is a TFLite model for {order}; none of them is installed here"
                )
            from .runtimes import _module_version

            have = _module_version(
                {"litert": "ai_edge_litert", "tflite_runtime": "tflite_runtime", "tensorflow": "tensorflow"}[found]
            )
            ok, why = tflite_version_ok(found, have, needs.get("min_version"), needs.get("validated_with"))
            if not ok:
                raise RuntimeUnavailableError(why)
            return
        elif fmt == "onnx":
            import importlib.util

            if importlib.util.find_spec("onnxruntime") is None:
                raise RuntimeUnavailableError(
                    "bundle is an ONNX model; onnxruntime is not installed here"
                )
            found, version_module = "onnxruntime", "onnxruntime"
        else:
            raise RuntimeUnavailableError(f"bundle format {fmt!r} is not supported by this agent")
        minimum = needs.get("min_version")
        if minimum:
            from .runtimes import _module_version

            have = _module_version(version_module)
            if _version_tuple(have) < _version_tuple(str(minimum)):
                raise RuntimeUnavailableError(
                    f"bundle needs {found} >= {minimum}, this device has {have}"
                )

    def _installing(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        assert update.fetched is not None
        staged = StagedBundle.from_dict(update.fetched)
        manifest = staged.manifest
        if staged.in_place:
            slot = Path(staged.root).name
        else:
            slot = slot_name(staged.name, staged.version, update.id)
            install_into_slot(Path(staged.root), self.config.slots_dir, slot)
        golden = manifest.get("golden") or None
        installed = InstalledBundle(
            name=staged.name,
            version=staged.version,
            slot=slot,
            model_file=str(manifest["model_file"]),
            model_format=str(manifest["format"]),
            golden_file=golden.get("file") if golden else None,
            labels_file="labels.txt" if "labels.txt" in (manifest.get("files") or {}) else None,
            golden_tolerance={
                "atol": float(golden.get("atol", 0.0)),
                "rtol": float(golden.get("rtol", 0.0)),
            }
            if golden
            else None,
            runtime=dict(manifest.get("runtime") or {}),
            installed_at=time.time(),
            files={k: dict(v) for k, v in (manifest.get("files") or {}).items()},
        )

        def mutate(state: AgentState, record: UpdateRecord) -> None:
            record.staged = installed

        return Event.SUCCESS, f"installed into slot {slot}", mutate

    def _self_test(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        installed = update.staged
        assert installed is not None
        model = load_bundle_model(self.config, installed, warm=False)
        result = self.self_test(model, installed)
        if not result.passed:
            raise EdgeshipError(f"self-test failed: {result.reason}")
        self._prepared = model
        return Event.SUCCESS, f"self-test passed: {result.reason}", None

    def self_test(self, model: LoadedModel, installed: InstalledBundle) -> SelfTestResult:
        """Replay the golden vectors within tolerance, check outputs are finite, and
        time the new model against the running one on this device."""
        runner = model.runner
        slot = self.config.slots_dir / installed.slot
        reasons: list[str] = []
        sample: list[np.ndarray]
        if installed.golden_file:
            golden = GoldenVectors.load(slot / installed.golden_file)
            if installed.golden_tolerance:
                golden = GoldenVectors(
                    golden.input_names,
                    golden.inputs,
                    golden.output_names,
                    golden.outputs,
                    atol=installed.golden_tolerance.get("atol", golden.atol),
                    rtol=installed.golden_tolerance.get("rtol", golden.rtol),
                )
            # by name: the file's tensor order need not be the order the golden vectors were written in
            try:
                feed = runner.ordered({n: np.asarray(x) for n, x in zip(golden.input_names, golden.inputs)})
                produced = match_names(runner.signature.outputs, list(golden.output_names), "output")
            except EdgeshipError as exc:
                return SelfTestResult(False, f"golden vectors do not fit the model: {exc.message}")
            outputs = runner.run(feed)
            check = compare_outputs(golden, {n: outputs[i] for n, i in zip(golden.output_names, produced)})
            if not check.passed:
                return SelfTestResult(False, check.reason)
            reasons.append(check.reason)
            sample = [np.asarray(x)[:1] for x in feed]
        else:
            sample = zero_inputs(runner.signature)
            outputs = runner.run(sample)
            if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
                return SelfTestResult(
                    False, "model gives NaN/Inf outputs for a zero input (no golden vectors)"
                )
            reasons.append("no golden vectors: load and finite-output check only")
        warm_up(runner, sample)
        new_ms = _time_runs(lambda: runner.run(sample), self.config.self_test_runs)
        running_ms = None
        current = self.serving.current if self.serving is not None else None
        same_shapes = current is not None and [
            i.shape for i in current.runner.signature.inputs
        ] == [i.shape for i in runner.signature.inputs]
        if current is not None and same_shapes:
            try:
                running_ms = _time_runs(
                    lambda: current.runner.run(sample), self.config.self_test_runs
                )
            except Exception:
                running_ms = None
        ok, text = latency_gate(new_ms, running_ms, self.config.self_test_latency_ratio)
        reasons.append(text)
        return SelfTestResult(ok, "; ".join(reasons), new_ms, running_ms)

    def _activating(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        installed = update.staged
        assert installed is not None
        if self.serving is not None:
            model = self._prepared
            if model is None or model.slot != installed.slot:
                model = load_bundle_model(
                    self.config, installed
                )  # after a restart: load and warm again
            old = self.serving.swap(model)
            self._baseline = old.stats.snapshot() if old is not None else None
        self._prepared = None

        def mutate(state: AgentState, record: UpdateRecord) -> None:
            old_active = state.active
            state.active = installed
            kept = [  # a kept copy of the version now active is no rollback target
                b
                for b in state.previous
                if b.slot not in (installed.slot, old_active.slot if old_active else "")
                and (b.name, b.version) != (installed.name, installed.version)
                and not (old_active and (b.name, b.version) == (old_active.name, old_active.version))
            ]
            state.previous = (
                [old_active] if old_active and old_active.slot != installed.slot else []
            ) + kept
            record.probation_started = time.time()

        where = (
            "serving"
            if self.serving is not None
            else "activated (probation starts when the agent runs)"
        )
        return Event.SUCCESS, f"{installed.label} {where}", mutate

    def _probation(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        assert self.serving is not None
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
        baseline = self._baseline
        baseline_p95 = (
            baseline["latency"].quantile_ms(0.95) if baseline and baseline["requests"] else None
        )
        while True:
            if self._abort.is_set():
                raise _Aborted()
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
                return Event.SUCCESS, reason, None
            if verdict is Verdict.ROLL_BACK:
                return Event.FAILURE, f"probation failed: {reason}", None
            self._abort.wait(min(0.1, max(0.01, policy.window_s / 20)))

    def _rolling_back(self, update: UpdateRecord):  # type: ignore[no-untyped-def]
        target = update.rollback_to
        if self.serving is not None:
            current = self.serving.current
            if target is None:
                self.serving.swap(None)
            elif current is None or current.slot != target.slot:
                self.serving.swap(load_bundle_model(self.config, target))
        failed = update.staged

        def mutate(state: AgentState, record: UpdateRecord) -> None:
            state.active = target
            state.previous = [
                b for b in state.previous if b.slot != (target.slot if target else "")
            ]
            if failed is not None and failed.slot != (target.slot if target else ""):
                # no longer kept: retention deletes its slot at the end of the update
                state.previous = [b for b in state.previous if b.slot != failed.slot]

        cause = update.reason
        back = target.label if target else "no model (there was none before)"
        return Event.SUCCESS, f"rolled back to {back} ({cause})", mutate

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        """After a terminal state: drop the work folder and apply retention."""
        update = self.state.update
        if update is None:
            return
        source = self._ctx_cache.get("source")
        if source is not None:
            try:
                source.cleanup(self._context(update))
            except Exception:  # pragma: no cover - best effort
                log.exception("source cleanup failed")
        self._ctx_cache = {}
        self._prepared = None
        self._baseline = None
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
            slots = self.config.slots_dir
            on_disk = [p.name for p in slots.iterdir() if p.is_dir()] if slots.is_dir() else []
            plan = plan_retention(
                self.state.active,
                self.state.previous,
                self.config.keep_previous,
                on_disk,
                protected,
            )
            changed = list(plan.keep_previous) != self.state.previous
            if changed:
                self.state.previous = list(plan.keep_previous)
                self.store.save(self.state)
            apply_retention(slots, plan)
            work = self.config.work_dir
            if work.is_dir():
                for child in work.iterdir():
                    if (
                        update is None
                        or is_terminal(State(update.state))
                        or child.name != update.id
                    ):
                        shutil.rmtree(child, ignore_errors=True)


def release_memory() -> bool:
    """After an update: collect the cycles it left (the old runner, golden arrays,
    parsed metadata) and hand glibc's free heap pages back to the kernel
    (``malloc_trim(0)``), so the idle agent does not keep the update's peak.
    Returns whether malloc_trim was available (glibc only)."""
    gc.collect()
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): gc.collect only
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _time_runs(func: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers of a runtime's version: ``2.15.0+nv24.05`` -> (2, 15, 0),
    ``2.16.0rc1`` -> (2, 16, 0). Each dot-separated part gives its leading digits; a
    part with anything after them (a pre-release or local label) is the last one."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)
