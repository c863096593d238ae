"""``edgeship-agent run``: serving, the update worker, telemetry and the control socket.

Start order (fast to the first prediction, safe against crash loops): take the
data folder's lock; read the state; count the re-entry of an interrupted update
(before any model is loaded, so a model that kills the process is rolled back
after ``max_restarts``); load and warm the bundle to serve; open the HTTP API;
then resume the interrupted update on the worker thread.

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
from .loading import load_bundle_model
from .persistence import AgentState, InstalledBundle
from .reporter import NullReporter, Reporter, state_document
from .server import ApiServer, ServerLimits, bind_refusal, load_access
from .serving import ServingModel
from .sources import BundleSource, DirectorSource, OfflinePackageSource, SourceRegistry
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
    config: AgentConfig, state: AgentState, *, running: bool, serving: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``edgeship-agent status --json`` prints (``active.name/version``, ``update.state/reason``)."""
    update = state.update
    return {
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
        self.serving = ServingModel()
        self.lock = AgentLock(config.lock_file)
        self.driver: UpdateDriver | None = None
        self.api: ApiServer | None = None
        self.control: ControlServer | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0

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
        self._take_lock()
        try:
            driver = self.driver = UpdateDriver(
                self.config,
                serving=self.serving,
                reporter=self.reporter,
                registry=self.registry,
                hooks=self.hooks,
            )
            driver.prepare_resume()
            boot = driver.boot_bundle()
            if boot is not None:
                try:
                    self.serving.swap(load_bundle_model(self.config, boot))
                    log.info("serving %s", boot.label)
                except EdgeshipError as exc:
                    log.error("cannot serve %s: %s", boot.label, exc.message)
            if not driver.in_progress:
                driver.cleanup()
            self.api = ApiServer(
                self.serving,
                self.config.data_dir,
                self.config.bind_host,
                self.config.bind_port,
                health=self._health,
                limits=limits,
                access=access,
            ).start()
            self.control = ControlServer(self.config.control_socket, self.dispatch).start()
        except BaseException:
            self.lock.release()
            raise
        for target, name in (
            (self._work, "edgeship-updater"),
            (self._telemetry, "edgeship-telemetry"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._report_state()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.api is not None:
            self.api.stop()
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
    def _work(self) -> None:
        assert self.driver is not None
        while not self._stop.is_set():
            if self.driver.in_progress:
                try:
                    self.driver.run()
                except Exception:
                    log.exception("update worker failed")
                    time.sleep(1)
                self._report_state()
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _telemetry(self) -> None:
        window = TelemetryWindow(self.serving, self.config.data_dir)
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.reporter.report_telemetry(window.take())
            except Exception:
                log.exception("telemetry report failed")

    def _report_state(self) -> None:
        if self.driver is None:
            return
        try:
            model = self.serving.current
            self.reporter.report_state(
                state_document(
                    self.config, self.driver.snapshot(), model.runner.runtime if model else None
                )
            )
        except Exception:
            log.exception("state report failed")

    def _health(self) -> tuple[bool, dict[str, Any]]:
        model = self.serving.current
        update = self.driver.state.update if self.driver else None
        doc: dict[str, Any] = {
            "status": "ok" if model else "no model serving",
            "update": update.state if update else None,
        }
        if model is not None:
            doc["model"] = {"name": model.name, "version": model.version}
        return model is not None, doc

    # -- requests --------------------------------------------------------------------------------
    def submit(self, source: BundleSource, kind: str = "install") -> dict[str, Any]:
        """Start an update (persisted before this returns); the worker runs it. A package's
        or a director's verification runs in a child (isolated.py) unless turned off."""
        assert self.driver is not None
        record = self.driver.begin(isolate_verification(source), kind)
        self._wake.set()
        return {"update": record.id, "state": record.state}

    def submit_desired(
        self, envelope: dict[str, Any], fetcher: Any, record: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The fleet's entry point: a director envelope and a TUF fetcher (see sources.py)."""
        return self.submit(DirectorSource(envelope, fetcher, record))

    def is_redelivery(self, envelope: dict[str, Any]) -> bool:
        """Whether a desired state was already acted on (a retained message seen again
        after a reconnect): its sequence is not above the last accepted one. A peek
        for deduplication only; an update verifies the signature itself."""
        assert self.driver is not None
        signed = envelope.get("signed") if isinstance(envelope, dict) else None
        sequence = signed.get("sequence") if isinstance(signed, dict) else None
        return isinstance(sequence, int) and sequence <= self.driver.state.last_sequence

    def rollback(self) -> dict[str, Any]:
        """Abort the update in progress (after activation it rolls back), or roll back
        to the most recent kept bundle through a full update of kind ``rollback``."""
        assert self.driver is not None
        source = self.driver.rollback_request()
        if source is None:
            update = self.driver.state.update
            return {"update": update.id if update else None, "aborted": True}
        return self.submit(source, kind="rollback")

    def status(self) -> dict[str, Any]:
        assert self.driver is not None
        model = self.serving.current
        serving = None
        if model is not None:
            snap = model.stats.snapshot()
            serving = {
                "name": model.name,
                "version": model.version,
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
        doc = status_document(self.config, self.driver.snapshot(), running=True, serving=serving)
        if self.api is not None:
            doc["server"] = f"{self.api.scheme}://{_host_text(self.api.host)}:{self.api.port}"
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
            return {"ok": True, **self.submit(OfflinePackageSource(package))}
        if op == "rollback":
            return {"ok": True, **self.rollback()}
        raise BadInputError(f"unknown control operation {op!r} (ping, status, install, rollback)")
