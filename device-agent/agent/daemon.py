"""``edgeship-agent run``: serving, the update workers, telemetry and the control socket.

Start order (fast to the first prediction, safe against crash loops): take the
data folder's lock; move a one-model layout under ``models/`` (models.py); read each
model's state; count the re-entry of each interrupted update (before any model is
loaded, so a model that kills the process is rolled back after ``max_restarts``);
load and warm each model's bundle to serve; open the HTTP API; then resume the
interrupted updates, one worker thread per model (updates of different models run at
the same time; one model's update never pauses another's serving). Slightly over the
project's usual module size: one concept, the running agent and its entry points.

The fleet link plugs in here: ``Agent(config, reporter=MqttReporter(...),
registry=...)`` and ``agent.submit_desired(envelope, fetcher)`` for each desired
state it receives; the update then takes exactly the path of a local install.
"""

from __future__ import annotations

__all__ = ["Agent", "AgentBusyError", "status_document"]

import logging
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError

from .config import AgentConfig
from .control import AgentLock, ControlServer
from .decoding import DecodeLimits
from .faults import FaultHooks
from .isolated import isolate_verification
from .models import (
    ModelDriver,
    ModelSet,
    peek_package_model,
    peek_package_models,
    read_index,
    write_index,
)
from .persistence import AgentState, InstalledBundle
from .reporter import NullReporter, Reporter, state_document
from .servables import Servables
from .server import ApiServer, ServerLimits, bind_refusal, load_access
from .serving import ServingModel
from .sources import BundleSource, DirectorSource, OfflinePackageSource, SlotSource, SourceRegistry
from .state_machine import State, is_terminal
from .telemetry import TelemetryWindow
from .updater import UpdateDriver

log = logging.getLogger("edgeship.agent")


class AgentBusyError(EdgeshipError):
    """Another edgeship-agent process holds this data folder."""


def _bundle_doc(bundle: InstalledBundle | None) -> dict[str, Any] | None:
    if bundle is None:
        return None
    return {
        "name": bundle.name,
        "version": bundle.version,
        "slot": bundle.slot,
        "format": bundle.model_format,
        "installed_at": bundle.installed_at,
    }


def _host_text(host: str) -> str:
    """A host as it goes in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def status_document(
    config: AgentConfig,
    state: AgentState,
    *,
    running: bool,
    serving: dict[str, Any] | None = None,
    models: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What ``edgeship-agent status --json`` prints: ``models`` lists every model (name,
    version, serving_version, labels, update); the top-level ``active``/``update`` are
    those of the model that changed last (what a one-model reader expects)."""
    update = state.update
    return {
        "models": models if models is not None else [],
        "device": config.device_id,
        "fleet": config.fleet,
        "running": running,
        "active": _bundle_doc(state.active),
        "previous": [_bundle_doc(b) for b in state.previous],
        "last_sequence": state.last_sequence,
        "update": None
        if update is None
        else {
            "id": update.id,
            "kind": update.kind,
            "state": update.state,
            "reason": update.reason,
            "terminal": is_terminal(State(update.state)),
            "bundle": update.bundle,
            "sequence": update.sequence,
            "deployment": update.deployment,
            "started": update.started,
            "finished": update.finished,
            "source": {k: v for k, v in update.source.items() if k != "envelope"},
            "transfer": update.transfer,
            "history": [{"state": s, "at": t, "reason": r} for s, t, r in update.history],
        },
        "serving": serving,
        "server": f"{'https' if config.tls_cert else 'http'}://{_host_text(config.bind_host)}:{config.bind_port}",
    }


_RESERVED_FDS = 64
"""File descriptors kept free of HTTP connections: the control socket, the state
file, the model, MQTT, a bundle being verified."""


MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas: by default each new thread may get its own (up to
    8 per core), and the memory a connection's thread touched stays in its arena
    after the thread ends. The API's threads take turns on the GIL, so two arenas
    cost no throughput. Returns whether glibc took it (musl and macOS: no-op)."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(-8, arenas))  # M_ARENA_MAX


def server_limits(config: AgentConfig) -> ServerLimits:
    """The API's limits from the config, the connection cap held below the process's
    file limit (raised to its hard limit first) so connections alone never exhaust it."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (OSError, ValueError):  # pragma: no cover - a sandbox that forbids it
        soft = 1024
    cap = config.max_connections
    if soft != resource.RLIM_INFINITY and cap > soft - _RESERVED_FDS:
        cap = max(1, soft - _RESERVED_FDS)
        log.warning(
            "[limits] max_connections %d lowered to %d: the file limit is %d (LimitNOFILE= in the unit)",
            config.max_connections, cap, soft,
        )
    return ServerLimits(
        max_body_bytes=config.max_body_bytes,
        max_connections=cap,
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
        decode=DecodeLimits(max_batch=config.max_batch, max_tensor_bytes=config.max_tensor_bytes),
    )


class Agent:
    """The running agent. ``start()`` returns once it serves; ``stop()`` ends it."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        reporter: Reporter | None = None,
        registry: SourceRegistry | None = None,
        hooks: FaultHooks | None = None,
    ) -> None:
        self.config = config
        self.reporter = reporter or NullReporter()
        self.registry = registry or SourceRegistry(wrap=isolate_verification)
        self.hooks = hooks
        self.servables = Servables()
        self.models = ModelSet(
            config, self.servables, reporter=_ModelReporter(self), registry=self.registry, hooks=hooks,
        )
        self.lock = AgentLock(config.lock_file)
        self.api: ApiServer | None = None
        self.grpc: Any = None  # grpc_server.GrpcServer where [server] grpc_port is set
        self.control: ControlServer | None = None
        self._stop = threading.Event()
        self._wakes: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._workers_lock = threading.Lock()
        self._started = False
        self.started_at = 0.0

    # -- one-model views (the model that changed last) -------------------------------------------
    @property
    def driver(self) -> ModelDriver | None:
        return self.models.primary()

    @property
    def serving(self) -> ServingModel:
        driver = self.models.primary()
        return driver.versions.serving if driver is not None else ServingModel()

    # -- life cycle ------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        """Take the data folder's lock; while a command-line install or rollback holds
        it (no agent ran when it started), wait for it to finish, then serve."""
        waiting_for: int | None = None
        while not self.lock.acquire(role="run"):
            pid, role = self.lock.holder()
            if role in (None, "run"):
                raise AgentBusyError(f"another edgeship-agent (pid {pid}) holds {self.config.lock_file}")
            if waiting_for != pid:
                log.info("waiting for `edgeship-agent %s` (pid %s) to finish before serving", role, pid)
                waiting_for = pid
            time.sleep(0.1)

    def start(self) -> Agent:
        self.started_at = time.time()
        limit_malloc_arenas()
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        access = load_access(
            self.config.api_token_file, self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca
        )
        refusal = bind_refusal(self.config.bind_host, access, self.config.trusted_network)
        if refusal is not None:
            raise BadInputError(refusal)
        limits = server_limits(self.config)
        if self.config.grpc_port is not None:
            from .grpc_server import grpc_available

            if not grpc_available():
                raise BadInputError(
                    "[server] grpc_port is set but grpcio is not installed: pip install 'edgeship[grpc]' "
                    "(or remove grpc_port to serve REST only)"
                )
        self._take_lock()
        try:
            self.models.open()
            self.models.load_boot_models()
            self.api = ApiServer(
                self.servables,
                self.config.data_dir,
                self.config.bind_host,
                self.config.bind_port,
                health=self._health,
                limits=limits,
                access=access,
            ).start()
            if self.config.grpc_port is not None:
                from .grpc_server import GrpcServer
                from .server import _agent_version

                self.grpc = GrpcServer(
                    self.api.servables,
                    self.config.bind_host,
                    self.config.grpc_port,
                    limits=limits,
                    token=access.token,
                    tls_cert=self.config.tls_cert,
                    tls_key=self.config.tls_key,
                    tls_client_ca=self.config.tls_client_ca,
                    version=_agent_version(),
                ).start()
            log.info("serving protocols: %s", ", ".join(p["name"] + " " + p["address"] for p in self.protocols()))
            self.control = ControlServer(self.config.control_socket, self.dispatch).start()
        except BaseException:
            self.lock.release()
            raise
        self._started = True
        for driver in self.models.drivers():
            self._worker_for(driver.name)
        thread = threading.Thread(target=self._telemetry, name="edgeship-telemetry", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._report_state()
        return self

    def stop(self) -> None:
        self._stop.set()
        for wake in list(self._wakes.values()):
            wake.set()
        if self.api is not None:
            self.api.stop()
        if self.grpc is not None:
            self.grpc.stop()
        if self.control is not None:
            self.control.stop()
        self.lock.release()

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""

        def handler(signum: int, frame: Any) -> None:
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        while not self._stop.wait(0.5):
            pass
        self.stop()

    # -- workers ---------------------------------------------------------------------------------
    def _worker_for(self, name: str) -> threading.Event:
        """The wake-up event of ``name``'s update worker (started on first use)."""
        with self._workers_lock:
            wake = self._wakes.get(name)
            if wake is None:
                wake = self._wakes[name] = threading.Event()
                if self._started:
                    thread = threading.Thread(
                        target=self._work, args=(name, wake), name=f"edgeship-updater-{name}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            return wake

    def _work(self, name: str, wake: threading.Event) -> None:
        driver = self.models.driver(name)
        while not self._stop.is_set():
            if driver.in_progress:
                try:
                    driver.run()
                except Exception:  # pragma: no cover - the driver ends updates itself; the worker must live on
                    log.exception("update worker of %s failed", name)
                    time.sleep(1)
                self._report_state()
                continue
            wake.wait(1.0)
            wake.clear()

    def _telemetry(self) -> None:
        window = TelemetryWindow(self.servables, self.config.data_dir)
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.reporter.report_telemetry(window.take())
            except Exception:  # a failed report must not end the telemetry thread
                log.exception("telemetry report failed")

    def reported_document(self, driver: UpdateDriver | None = None) -> dict[str, Any]:
        """The reported state: top-level fields from ``driver`` (default: the model that
        changed last), ``models`` for every model (what a multi-model controller reads)."""
        driver = driver or self.models.primary()
        state = driver.snapshot() if driver is not None else AgentState()
        model = driver.serving.current if driver is not None and driver.serving is not None else None
        doc = state_document(self.config, state, model.runner.runtime if model else None)
        doc["models"] = {
            entry["name"]: {
                "active": entry["active"],
                "previous": entry["previous"],
                "serving_version": entry["serving_version"],
                "update": {k: v for k, v in (entry["update"] or {}).items() if k != "history"} or None,
                "labels": entry["labels"],
                "removed": entry["removed"],
            }
            for entry in self.models.status()
        }
        return doc

    def _report_state(self) -> None:
        try:
            self.reporter.report_state(self.reported_document())
        except Exception:  # a failed report must not break the caller (an update's end)
            log.exception("state report failed")

    def _health(self) -> tuple[bool, dict[str, Any]]:
        serving = [v.serving.current for v in self.servables]
        loaded = [m for m in serving if m is not None]
        primary = self.models.primary()
        update = primary.state.update if primary is not None else None
        doc: dict[str, Any] = {
            "status": "ok" if loaded else "no model serving",
            "update": update.state if update else None,
        }
        current = primary.serving.current if primary is not None and primary.serving is not None else None
        first = current or (loaded[0] if loaded else None)
        if first is not None:
            doc["model"] = {"name": first.name, "version": first.version}
        return bool(loaded), doc

    # -- requests --------------------------------------------------------------------------------
    def submit(
        self, source: BundleSource, kind: str = "install", *, model: str | None = None
    ) -> dict[str, Any]:
        """Start an update of ``model`` (default: the model the source names; persisted
        before this returns); that model's worker runs it. A package's or a director's
        verification runs in a child (isolated.py) unless turned off."""
        name = model or _source_model(source)
        self.models.unremove(name)
        driver = self.models.driver(name)
        base = int(read_index(self.config).get("last_sequence", 0))
        record = driver.begin(isolate_verification(source), kind, base_sequence=base)
        self.models.last_changed = name
        self._worker_for(name).set()
        return {"update": record.id, "state": record.state, "model": name}

    def submit_desired(
        self, envelope: dict[str, Any], fetcher: Any, record: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The fleet's entry point: a director envelope and a TUF fetcher (see sources.py);
        ``record["model"]`` names the model of a schema-2 document."""
        source = DirectorSource(envelope, fetcher, record)
        return self.submit(source, model=source.model or _source_model(source))

    def accepted(self, sequence: int) -> None:
        """A desired state was acted on in full: an older one is a replay from now on."""
        index = read_index(self.config)
        if sequence > int(index.get("last_sequence", 0)):
            index["last_sequence"] = sequence
            write_index(self.config, index)

    def last_sequence(self) -> int:
        highest = max((d.state.last_sequence for d in self.models.drivers()), default=0)
        return max(highest, int(read_index(self.config).get("last_sequence", 0)))

    def remove_model(self, name: str, reason: str) -> bool:
        """The desired state no longer names ``name``: unload it (False: its update is
        being aborted first; ask again)."""
        done = self.models.remove(name, reason)
        if done:
            self._report_state()
        return done

    def is_redelivery(self, envelope: dict[str, Any]) -> bool:
        """Whether a desired state was already acted on (a retained message seen again
        after a reconnect): its sequence is not above the last accepted one. A peek
        for deduplication only; an update verifies the signature itself."""
        signed = envelope.get("signed") if isinstance(envelope, dict) else None
        sequence = signed.get("sequence") if isinstance(signed, dict) else None
        return isinstance(sequence, int) and sequence <= self.last_sequence()

    def rollback(self, model: str | None = None) -> dict[str, Any]:
        """Abort ``model``'s update in progress (after activation it rolls back), or roll
        back to its most recent kept bundle through a full update of kind ``rollback``.
        Without ``model``: the only model, or the one whose update is in progress."""
        driver = self._driver_for(model)
        source = driver.rollback_request()
        if source is None:
            update = driver.state.update
            return {"update": update.id if update else None, "aborted": True, "model": driver.name}
        return self.submit(source, kind="rollback", model=driver.name)

    def _driver_for(self, model: str | None) -> ModelDriver:
        if model is not None:
            driver = self.models.get(model)
            if driver is None:
                raise BadInputError(f"no model {model!r} on this device (models: {', '.join(self.models.names()) or 'none'})")
            return driver
        busy = [d for d in self.models.drivers() if d.in_progress]
        served = [d for d in self.models.drivers() if not d.state.removed]
        if len(busy) == 1:
            return busy[0]
        if len(served) == 1:
            return served[0]
        if not served:
            raise BadInputError("nothing to roll back to: no model is installed on this device")
        raise BadInputError(f"name the model (--model): this device serves {', '.join(d.name for d in served)}")

    def protocols(self) -> list[dict[str, str]]:
        """The protocols this agent serves and where (the start log line, ``status --json``)."""
        found: list[dict[str, str]] = []
        if self.api is not None:
            base = f"{self.api.scheme}://{_host_text(self.api.host)}:{self.api.port}"
            found += [
                {"name": "tfserving-rest", "address": f"{base}/v1/models"},
                {"name": "oip-rest", "address": f"{base}/v2"},
            ]
        if self.grpc is not None:
            address = f"{_host_text(self.grpc.host)}:{self.grpc.port}"
            kind = "grpcs" if self.grpc.tls else "grpc"
            found += [
                {"name": "oip-grpc", "address": f"{kind}://{address} inference.GRPCInferenceService"},
                {"name": "tfserving-grpc", "address": f"{kind}://{address} tensorflow.serving.PredictionService"},
            ]
        return found

    def status(self) -> dict[str, Any]:
        primary = self.models.primary()
        model = primary.serving.current if primary is not None and primary.serving is not None else None
        serving = None
        if model is not None:
            snap = model.stats.snapshot()
            serving = {
                "name": model.name,
                "version": model.version,
                "serving_version": model.serving_version,
                "runtime": model.runner.runtime,
                "runtime_version": model.runner.runtime_version,
                "requests": snap["requests"],
                "errors": snap["errors"],
                "caller_errors": snap["caller_errors"],
                "nonfinite": snap["nonfinite"],
                "nonfinite_input": snap["nonfinite_input"],
                "p95_ms": snap["latency"].quantile_ms(0.95),
                "loaded_at": model.loaded_at,
            }
        state = primary.snapshot() if primary is not None else AgentState()
        doc = status_document(self.config, state, running=True, serving=serving, models=self.models.status())
        doc["memory"] = {"budget_mb": self.config.memory_budget_mb or None,
                         "used_mb": round(self.models.memory_used() / (1 << 20), 3)}
        if self.api is not None:
            doc["server"] = f"{self.api.scheme}://{_host_text(self.api.host)}:{self.api.port}"
        doc["protocols"] = self.protocols()
        return doc

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request."""
        op = request["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "install":
            package = request.get("package")
            if not isinstance(package, str) or not package:
                raise BadInputError("install needs 'package' (a path)")
            if not Path(package).is_file():
                raise BadInputError(
                    f"offline package {package}: no such file as the agent sees it (the agent opens "
                    "the path itself; under systemd, PrivateTmp= and ProtectHome= hide /tmp and /home "
                    "from it: put the package where the agent's user can read it, e.g. a USB mount "
                    "under /media)"
                )
            names = peek_package_models(Path(package))
            started = [self.submit(OfflinePackageSource(package, model=n if len(names) > 1 else None), model=n)
                       for n in names]
            return {"ok": True, **started[0], "updates": started}
        if op == "rollback":
            model = request.get("model")
            return {"ok": True, **self.rollback(model if isinstance(model, str) and model else None)}
        raise BadInputError(f"unknown control operation {op!r} (ping, status, install, rollback)")


def _source_model(source: BundleSource) -> str:
    """The model a source is for, before it is verified (a routing hint: the update
    refuses a verified bundle of another model)."""
    if isinstance(source, SlotSource):
        return source.bundle.name
    if isinstance(source, OfflinePackageSource):
        return source.model or peek_package_model(source.path)
    if isinstance(source, DirectorSource):
        signed = source.envelope.get("signed") if isinstance(source.envelope, dict) else None
        if source.model is not None:
            return source.model
        if isinstance(signed, dict) and isinstance(signed.get("bundle"), str):
            return str(signed["bundle"])
    raise BadInputError(f"cannot tell which model {source.describe()} is for")


class _ModelReporter:
    """What each model's driver reports through: its events carry the model's name, and
    its state reports carry every model (``models``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def report_event(self, event: dict[str, Any]) -> None:
        bundle = event.get("bundle") or {}
        if isinstance(bundle, dict) and bundle.get("name"):
            event = {**event, "model": bundle["name"]}
        self.agent.reporter.report_event(event)

    def report_state(self, state: dict[str, Any]) -> None:
        driver = self.agent.models.primary()
        self.agent.reporter.report_state(self.agent.reported_document(driver))

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        self.agent.reporter.report_telemetry(telemetry)
