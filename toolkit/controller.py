"""The fleet controller: thin I/O around the store and the pure rollout engine (docs/fleet.md, "Controller").

One :class:`Controller` per process (a *replica*). It

- connects to the broker with :class:`~edgeship.ota.transport.MqttConnection` (client id
  ``edgeship-controller-<replica>``, MQTT 5 with a fall-back to 3.1.1);
- subscribes to every device's retained ``reported`` and ``status`` with plain filters (every
  replica sees every device's state: retained messages are not delivered to shared
  subscriptions), and to ``events``, ``telemetry`` and ``blocks/request`` through the MQTT 5
  shared subscription ``$share/edgeship-controllers/...`` so replicas split that load;
- parses each message with :mod:`edgeship.ota.protocol` on the MQTT network thread
  (:func:`route_message`, pure) and queues it; a writer thread ingests the queue in batches
  (:meth:`FleetStore.ingest`), so the store's cost is paid once per batch, not per message.
  Malformed, oversized, unknown or mis-addressed messages are counted, logged (rate-limited)
  and dropped; none can stop the controller;
- runs a :class:`~edgeship.toolkit.blockserver.BlockServer` over the release repository;
- every ``tick_s`` reconciles rollouts and A/B tests in the store and carries out the outbox:
  each claimed action becomes a :class:`~edgeship.ota.director.DesiredState` for the device
  (target path, length and hashes from the release repository, the fleet's next director
  sequence), signed with the director key and published retained at QoS 1 on the device's
  ``desired`` topic as a :class:`~edgeship.ota.protocol.DesiredMessage`;
- re-signs the repository's timestamp and snapshot before they expire, and re-issues desired
  states before they expire;
- serves Prometheus metrics over HTTP (:func:`render_metrics`, pure) when given a port.

Threads: the MQTT network thread (parse and queue only), the ingest writer, the reconcile
loop, the block server's worker and the metrics HTTP server. ``stop()`` ends them in that
order of safety: no new messages, the queue drained into the store, the connection closed.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_SHARED_GROUP",
    "ControllerConfig",
    "ControllerStats",
    "Controller",
    "RejectedMessage",
    "build_desired_state",
    "render_metrics",
    "route_message",
    "timestamp_refresh_due",
    "default_replica_id",
]

import datetime as _dt
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeship.ota.director import DesiredState, load_director_private_key, sign_desired_state
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import (
    DesiredMessage,
    ReportedMessage,
    TelemetryMessage,
    encode_message,
    parse_message,
)
from edgeship.ota.release import ReleaseRepository, TargetInfo
from edgeship.ota.topics import (
    DEFAULT_PREFIX,
    DESIRED,
    EVENTS,
    TELEMETRY,
    device_topic,
    device_wildcard,
    parse_device_topic,
    validate_identifier,
)
from edgeship.ota.transport import (
    MQTT_V5,
    BrokerUrl,
    MqttConnection,
    ReceivedMessage,
    TransportError,
)
from edgeship.toolkit.blockserver import BlockServer
from edgeship.toolkit.controller_metrics import (
    INGESTED_KINDS,
    FleetCounters,
    MetricsServer,
    render_metrics,
)
from edgeship.toolkit.rollouts import AssignVersion, RollbackDevice
from edgeship.toolkit.store import ConcurrentUpdateError, FleetStore, IngestItem, PendingAction

log = logging.getLogger(__name__)

DEFAULT_SHARED_GROUP = "edgeship-controllers"
SHARED_KINDS = (EVENTS, TELEMETRY)
"""Kinds split between replicas (shared subscription); reported and status are retained and
must reach every replica, so they use plain filters."""


def default_replica_id() -> str:
    """``<host>-<pid>``: unique per process, so two replicas never share an MQTT client id."""
    host = socket.gethostname().split(".")[0] or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)[:40]
    return f"{safe}-{os.getpid()}"


# -- pure pieces ---------------------------------------------------------------------------------

class RejectedMessage(BadInputError):
    """A message the controller does not ingest (why is in the message)."""


def route_message(topic: str, payload: bytes, received_at: float, prefix: str = DEFAULT_PREFIX) -> IngestItem:
    """Turn one received MQTT message into what the store ingests.

    Pure. The topic names the fleet, the device and the kind; the payload must be a valid
    message of that kind (size cap, JSON, schema version, fields). A ``reported`` message names
    its device: it must be the topic's device, or a device could overwrite another's state
    through a topic it is allowed to publish on.

    Raises:
        RejectedMessage: with the reason (the topic or the payload is not acceptable).
    """
    try:
        where = parse_device_topic(topic, prefix)
    except EdgeshipError as exc:
        raise RejectedMessage(f"topic {topic[:120]!r}: {exc.message}") from None
    if where.kind not in INGESTED_KINDS:
        raise RejectedMessage(f"topic {topic[:120]!r}: the controller does not ingest {where.kind!r} messages")
    try:
        message = parse_message(where.kind, payload)
    except EdgeshipError as exc:
        raise RejectedMessage(f"{where.fleet}/{where.device} {where.kind}: {exc.message}") from None
    if isinstance(message, ReportedMessage) and message.device != where.device:
        raise RejectedMessage(f"{where.fleet}/{where.device} reported: the message names device "
                              f"{message.device[:64]!r}, not the topic's {where.device!r}")
    return IngestItem(where.fleet, where.device, message, received_at)


def build_desired_state(*, fleet: str, device: str, target: TargetInfo, sequence: int, now: float,
                        expires_in_s: float, action: str, rollout: str | None = None,
                        deployment: str | None = None) -> DesiredState:
    """The director's document for one device: the bundle's TUF target, length and hashes from the
    release repository, so the device's two checks (director and TUF) name the same bytes."""
    issued = _dt.datetime.fromtimestamp(int(now), _dt.timezone.utc)
    return DesiredState(fleet=fleet, device=device, bundle=target.name, version=target.version, target=target.path,
                        length=target.length, hashes=dict(target.hashes), sequence=sequence,
                        expires=issued + _dt.timedelta(seconds=int(expires_in_s)), issued=issued,
                        deployment=deployment, rollout=rollout, action=action)


def timestamp_refresh_due(status: Mapping[str, Any], fraction: float = 0.5) -> bool:
    """Re-sign when the timestamp or snapshot has less than ``fraction`` of its validity left.

    ``status`` is :meth:`ReleaseRepository.status`. With the default one-day timestamp this
    re-signs every 12 hours, so a controller that is down for less than half a day never lets
    devices see expired metadata.
    """
    roles = status.get("roles", {})
    for role in ("timestamp", "snapshot"):
        info = roles.get(role)
        if info is None:
            continue
        if info.get("expired") or info.get("expires_in_seconds", 0) < fraction * info.get("validity_seconds", 0):
            return True
    return False


# -- configuration and counters -------------------------------------------------------------------

@dataclass
class ControllerConfig:
    """What one controller replica needs. Times in seconds.

    Attributes:
        broker: ``mqtt://HOST:PORT`` / ``mqtts://HOST:PORT`` or a parsed BrokerUrl.
        repo: the release repository folder (metadata/, targets/, director/).
        db_url: the store's SQLAlchemy URL.
        replica_id: this replica's name (MQTT client id suffix and outbox claim owner).
        fleet: ``"+"`` for every fleet, or one fleet.
        shared_group: the MQTT 5 shared-subscription group; None subscribes with plain filters.
        tick_s: the reconcile period (RUNNING and PAUSED rollouts, A/B tests, the outbox).
        late_joiner_check_s: how often COMPLETED rollouts are reconciled (for devices that join later).
        batch_max, batch_wait_s: an ingest batch holds at most this many messages and waits at
            most this long for more after its first one.
        queue_max: ingest queue bound (messages); with the batch bounds it bounds the lag.
        desired_expires_s: validity of a signed desired state.
        desired_renew_s: re-issue a device's desired state when it expires within this.
        refresh_check_s: how often to check whether the timestamp needs re-signing.
        metrics_port: serve Prometheus metrics on this port (None: no HTTP server; 0: any free port).
        metrics_window_s: the telemetry window of the fleet latency and error metrics.
        telemetry_retention_s: telemetry older than this is pruned (hourly).
    """

    broker: str | BrokerUrl
    repo: str | Path
    db_url: str
    replica_id: str = field(default_factory=default_replica_id)
    prefix: str = DEFAULT_PREFIX
    fleet: str = "+"
    shared_group: str | None = DEFAULT_SHARED_GROUP
    protocol: str = "auto"
    tick_s: float = 1.0
    batch_max: int = 500
    batch_wait_s: float = 0.2
    queue_max: int = 50_000
    actions_per_tick: int = 500
    late_joiner_check_s: float = 15.0
    desired_expires_s: float = 7 * 86400.0
    desired_renew_s: float = 2 * 86400.0
    refresh_check_s: float = 60.0
    refresh_fraction: float = 0.5
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_window_s: float = 60.0
    telemetry_retention_s: float = 7 * 86400.0
    block_rate_bytes_per_s: float = 8 * 1024 * 1024
    block_burst_bytes: float = 4 * 1024 * 1024
    block_qos: int = 1

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.batch_wait_s < 0 or self.batch_max < 1 or self.queue_max < 1:
            raise BadInputError("tick_s must be positive, batch_max and queue_max at least 1")
        if not 0 < self.tick_s <= 3600:  # NaN would make every wait return at once; inf overflows the waits
            raise BadInputError(f"--tick {self.tick_s:g}: use a number of seconds within (0, 3600]")
        if self.shared_group is not None:
            # "$share/GROUP/FILTER": a '/' in the group would shift the filter onto other topics
            validate_identifier(self.shared_group, "--shared-group")
        if not self.replica_id or len(self.replica_id) > 100:
            raise BadInputError("the replica id must be 1-100 characters")
        if self.desired_renew_s >= self.desired_expires_s:
            raise BadInputError("desired states must be renewed before they expire (renew < expires)")


class ControllerStats:
    """Thread-safe counters and gauges the metrics and the tests read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def add(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, key: str, value: float) -> None:
        with self._lock:
            self._values[key] = value

    def max(self, key: str, value: float) -> None:
        with self._lock:
            self._values[key] = max(self._values.get(key, value), value)

    def get(self, key: str, default: float = 0) -> float:
        with self._lock:
            return self._values.get(key, default)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class _RateLimitedLog:
    """At most ``burst`` warnings per ``period_s`` per key; the rest only counted (a hostile
    publisher must not be able to fill the disk with our logs)."""

    def __init__(self, burst: int = 10, period_s: float = 10.0) -> None:
        self.burst, self.period_s = burst, period_s
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, text: str) -> None:
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start > self.period_s:
                if count > self.burst:
                    log.warning("%d more %s messages were dropped in the last %.0f s", count - self.burst, key,
                                self.period_s)
                start, count = now, 0
            count += 1
            self._windows[key] = (start, count)
        if count <= self.burst:
            log.warning("dropped %s message: %s", key, text)


# -- the controller ------------------------------------------------------------------------------

_STOP = object()


class Controller:
    """One controller replica (see the module docstring). ``start()``, then ``stop()``;
    ``run()`` does both around a wait for a stop request (SIGTERM/SIGINT in the CLI).

    Args:
        config: what to connect to and how.
        store: an open FleetStore (default: opened from ``config.db_url``; closed by ``stop``).
        clock: the wall clock (epoch seconds) stamped on messages and passed to the engine.
    """

    def __init__(self, config: ControllerConfig, *, store: FleetStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.repo = ReleaseRepository(config.repo)
        if not self.repo.exists():
            raise BadInputError(f"{config.repo} is not an edgeship release repository (no metadata/timestamp.json); "
                                f"create one with: edgeship keys init --repo {config.repo}")
        self._director_key_path = self.repo.director_dir / "director.key"
        self._director_key = load_director_private_key(self._director_key_path)
        self._director_key_mtime = self._director_key_path.stat().st_mtime_ns
        self._own_store = store is None
        self.store = store if store is not None else FleetStore(config.db_url)
        self.stats = ControllerStats()
        self.fleet_counters = FleetCounters()
        # IDENTITY-REPLICA when the identity is known (a password login): a broker that binds client
        # ids to identities (the embedded broker with a broker folder) accepts exactly that
        identity = getattr(config.broker, "username", None) or "edgeship-controller"
        self.client_id = f"{identity}-{config.replica_id}"
        self.connection = MqttConnection(config.broker, client_id=self.client_id, protocol=config.protocol,
                                         clean_start=True,
                                         on_connect=self._on_connect)
        self.block_server: BlockServer | None = None
        self._queue: queue.Queue[Any] = queue.Queue(config.queue_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rejects = _RateLimitedLog()
        self._retry: list[PendingAction] = []
        self._last_refresh_check = 0.0
        self._last_renew_check = 0.0
        self._last_prune = 0.0
        self._last_late_joiner_check = 0.0
        self._http: MetricsServer | None = None
        self._metrics_cache: tuple[float, str] = (0.0, "")
        self._metrics_lock = threading.Lock()
        self.shared = False
        self.started = False

    # -- lifecycle --
    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def start(self, connect_timeout: float = 15.0) -> Controller:
        """Connect, subscribe, start the writer, the reconcile loop, the block server and the metrics."""
        if self.started:
            return self
        self.connection.connect(connect_timeout)
        cfg = self.config
        # Shared subscriptions need MQTT 5 here: a 3.1.1 broker (the embedded one) would take
        # "$share/..." for a plain topic name and deliver nothing.
        self.shared = bool(cfg.shared_group) and self.connection.protocol == MQTT_V5
        group = cfg.shared_group if self.shared else None
        if cfg.shared_group and not self.shared:
            log.warning("broker speaks MQTT %s: no shared subscriptions, run a single controller replica",
                        self.connection.protocol)
        self._threads = [threading.Thread(target=self._write_loop, name="controller-ingest", daemon=True),
                         threading.Thread(target=self._reconcile_loop, name="controller-reconcile", daemon=True)]
        for thread in self._threads:
            thread.start()
        for kind in INGESTED_KINDS:
            wildcard = device_wildcard(kind, cfg.fleet, cfg.prefix)
            topic_filter = f"$share/{group}/{wildcard}" if group and kind in SHARED_KINDS else wildcard
            self.connection.subscribe(topic_filter, self._on_message, qos=1)
        self.block_server = BlockServer(self.connection, self.repo.path, fleet=cfg.fleet, prefix=cfg.prefix,
                                        shared_group=group, rate_bytes_per_s=cfg.block_rate_bytes_per_s,
                                        burst_bytes=cfg.block_burst_bytes, qos=cfg.block_qos).start()
        if cfg.metrics_port is not None:
            self._start_metrics(cfg.metrics_host, cfg.metrics_port)
        self.started = True
        log.info("controller %s started: broker %s (MQTT %s, %s), store %s, repository %s%s", cfg.replica_id,
                 self.connection.broker, self.connection.protocol,
                 f"shared group {group}" if group else "no shared subscriptions", self.store.url, self.repo.path,
                 f", metrics on :{self.metrics_port}" if self._http else "")
        return self

    def request_stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Start, wait for ``request_stop()``, stop."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, write what is queued, end the loops, disconnect, close."""
        self._stop.set()
        if self.block_server is not None:
            self.block_server.stop()
        for kind in INGESTED_KINDS:
            wildcard = device_wildcard(kind, self.config.fleet, self.config.prefix)
            group = self.config.shared_group if self.shared else None
            self.connection.unsubscribe(f"$share/{group}/{wildcard}" if group and kind in SHARED_KINDS else wildcard)
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("ingest queue still full at shutdown; %d messages are not written", self._queue.qsize())
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.connection.close()
        if self._own_store:
            self.store.close()
        self.started = False
        log.info("controller %s stopped", self.config.replica_id)

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ingest: network thread --
    def _on_connect(self, reconnected: bool) -> None:
        self.stats.set("connected", 1)
        if reconnected:
            log.info("reconnected to the broker; retained states arrive again")

    def _on_message(self, message: ReceivedMessage) -> None:
        """Parse and queue (the MQTT network thread: quick, never raises)."""
        now = self.clock()
        kind = message.topic.rsplit("/", 1)[-1]
        kind = kind if kind in INGESTED_KINDS else "other"
        self.stats.add(f"received.{kind}")
        try:
            item = route_message(message.topic, message.payload, now, self.config.prefix)
        except RejectedMessage as exc:
            self.stats.add(f"rejected.{kind}")
            self._rejects.warning(kind, exc.message)
            return
        try:
            if isinstance(item.message, TelemetryMessage):
                # Telemetry is a stream of windows: when the writer is behind, shed it rather than
                # stall the network thread (which also carries status, reported and events).
                self._queue.put_nowait(item)
            else:
                self._queue.put(item, timeout=5.0)
        except queue.Full:
            self.stats.add("ingest_dropped")
            self._rejects.warning("queue-full", f"ingest queue full ({self.config.queue_max}); "
                                                f"{kind} from {item.fleet}/{item.device} dropped")

    # -- ingest: writer thread --
    def _write_loop(self) -> None:
        cfg = self.config
        while True:
            first = self._queue.get()
            if first is _STOP:
                self._queue.task_done()
                return
            batch: list[IngestItem] = [first]
            deadline = time.monotonic() + cfg.batch_wait_s
            stop_after = False
            while len(batch) < cfg.batch_max:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
            self.stats.set("queue_depth", self._queue.qsize())
            if stop_after:
                self._drain_rest()
                return

    def _drain_rest(self) -> None:
        rest: list[IngestItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is not _STOP:
                rest.append(item)
        for start in range(0, len(rest), self.config.batch_max):
            self._write(rest[start:start + self.config.batch_max])

    def _write(self, batch: list[IngestItem]) -> None:
        """One transaction for the batch; if the store refuses it, retry once, then item by item so
        one poison message (say, a value a PostgreSQL column cannot hold) costs only itself."""
        for attempt in range(2):
            try:
                self.store.ingest(batch)
                self._ingested(batch)
                return
            except Exception as exc:  # the store's driver errors have no common base worth naming
                if attempt == 0:
                    log.warning("ingest of %d messages failed (%s); retrying", len(batch), str(exc)[:200])
                    time.sleep(0.2)
        written: list[IngestItem] = []
        for item in batch:
            try:
                self.store.ingest([item])
                written.append(item)
            except Exception as exc:
                self.stats.add("ingest_dropped")
                log.error("store refused a %s message of %s/%s: %s", type(item.message).__name__, item.fleet,
                          item.device, str(exc)[:300])
        self._ingested(written)

    def _ingested(self, batch: Sequence[IngestItem]) -> None:
        if not batch:
            return
        lag = self.clock() - min(item.received_at for item in batch)
        self.stats.add("ingested", len(batch))
        for item in batch:
            if isinstance(item.message, TelemetryMessage):
                self.fleet_counters.add(item.fleet, item.message.bundle, item.message.requests, item.message.errors,
                                        item.message.latency)
        self.stats.add("batches")
        self.stats.set("ingest_lag_s", lag)
        self.stats.max("ingest_lag_max_s", lag)

    # -- reconcile --
    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:
                log.exception("reconcile tick failed; trying again next tick")
            elapsed = time.monotonic() - started
            self.stats.set("tick_s", elapsed)
            self.stats.add("ticks")
            self._stop.wait(max(0.0, self.config.tick_s - elapsed))

    def tick(self, now: float | None = None) -> dict[str, int]:
        """One reconcile: rollouts, A/B tests, the outbox; and the periodic jobs when due.
        Returns what it did (counts). Public so tests can drive it."""
        now = self.clock() if now is None else now
        done = {"rollouts": 0, "abtests": 0, "published": 0, "errors": 0}
        # RUNNING and PAUSED rollouts every tick; COMPLETED ones (still live: they give their version to
        # devices that join the selection later) every late_joiner_check_s, since each reconcile reads the
        # rollout's whole selection and recent telemetry.
        if now - self._last_late_joiner_check >= self.config.late_joiner_check_s:
            self._last_late_joiner_check = now
            live = self.store.live_rollout_ids()
        else:
            rows = self.store.list_rollouts(states=["RUNNING", "PAUSED"], limit=10_000)
            live = [row["id"] for row in sorted(rows, key=lambda row: (row["created_at"], row["id"]))]
        for rollout_id in live:
            try:
                self.store.reconcile_rollout(rollout_id, now)
                done["rollouts"] += 1
            except ConcurrentUpdateError:
                log.debug("rollout %s changed under us (another replica or the CLI); next tick", rollout_id)
            except Exception:  # one bad row must not stop the others, nor the outbox below
                log.exception("rollout %s could not be reconciled; the others go on", rollout_id)
                done["errors"] += 1
        for test in self.store.list_abtests(states=["RUNNING"]):
            try:
                self.store.reconcile_abtest(test.id, now)
                done["abtests"] += 1
            except ConcurrentUpdateError:
                log.debug("A/B test %s changed under us; next tick", test.id)
            except Exception:  # as above
                log.exception("A/B test %s could not be reconciled; the others go on", test.id)
                done["errors"] += 1
        published, errors = self._carry_out(now)
        done["published"] = published
        done["errors"] += errors
        if now - self._last_refresh_check >= self.config.refresh_check_s:
            self._last_refresh_check = now
            self._refresh_repository(now)
        if now - self._last_renew_check >= self.config.refresh_check_s:
            self._last_renew_check = now
            self._renew_desired(now)
        if now - self._last_prune >= 3600.0:
            self._last_prune = now
            pruned = self.store.prune_telemetry(now - self.config.telemetry_retention_s)
            if pruned:
                log.info("pruned %d telemetry windows older than %.0f s", pruned, self.config.telemetry_retention_s)
        return done

    def _fail_assignment(self, rollout_id: str, device: str, detail: str, now: float) -> None:
        """Mark an assignment that cannot be signed FAILED in its rollout now (not at its timeout)."""
        from edgeship.toolkit.rollouts import fail_assignment

        try:
            self.store.update_rollout(rollout_id, lambda r: fail_assignment(r, device, detail, now), now=now)
        except Exception:  # the outbox entry is already completed with the error; the timeout still ends it
            log.exception("rollout %s: could not mark %s FAILED", rollout_id, device)

    def _signing_key(self) -> Any:
        """The director key, re-read when ``edgeship keys rotate director`` replaced the file."""
        try:
            mtime = self._director_key_path.stat().st_mtime_ns
        except OSError:
            return self._director_key
        if mtime != self._director_key_mtime:
            self._director_key = load_director_private_key(self._director_key_path)
            self._director_key_mtime = mtime
            log.info("director key changed on disk; signing with the new key")
        return self._director_key

    def _carry_out(self, now: float) -> tuple[int, int]:
        """Sign and publish the claimed outbox actions. An action whose publish failed stays
        claimed by this replica and is tried again next tick (the outbox lease gives it to another
        replica if this one dies)."""
        pending = self._retry + self.store.claim_actions(self.config.replica_id, now,
                                                         limit=self.config.actions_per_tick)
        self._retry = []
        if not pending:
            return 0, 0
        targets: dict[tuple[str, str], TargetInfo | EdgeshipError] = {}
        key = self._signing_key()
        published = errors = 0
        in_flight: list[tuple[PendingAction, DesiredState, dict[str, Any], Any]] = []
        sequences: dict[str, tuple[int, set]] = {}

        def sequence_for(fleet: str, device: str) -> int:
            # One number from the fleet's director counter serves the whole batch: a sequence must only
            # grow per device, and every later number (a later batch, an offline package) is higher.
            # A device met twice in one batch (an assignment, then its rollback) gets a fresh number.
            current = sequences.get(fleet)
            if current is None or device in current[1]:
                current = sequences[fleet] = (self.repo.next_sequence(fleet), set())
            current[1].add(device)
            return current[0]

        for index, entry in enumerate(pending):
            action = entry.action
            if not isinstance(action, (AssignVersion, RollbackDevice)):
                self.store.complete_action(entry.id, now, error=f"not a device action: {action.kind}")
                continue
            wanted = (action.name, action.version)
            if wanted not in targets:
                try:
                    targets[wanted] = self.repo.target_info(*wanted)
                except EdgeshipError as exc:
                    targets[wanted] = exc
            target = targets[wanted]
            if isinstance(target, EdgeshipError):
                log.error("cannot give %s %s %s: %s", action.device, action.name, action.version, target.message)
                self.store.complete_action(entry.id, now, error=target.message)
                if entry.rollout_id and isinstance(action, AssignVersion):
                    self._fail_assignment(entry.rollout_id, action.device,
                                          f"the controller cannot sign it: {target.message}", now)
                errors += 1
                self.stats.add("action_errors")
                continue
            state = build_desired_state(
                fleet=entry.fleet, device=action.device, target=target,
                sequence=sequence_for(entry.fleet, action.device), now=now,
                expires_in_s=self.config.desired_expires_s,
                action="install" if isinstance(action, AssignVersion) else "rollback",
                rollout=entry.rollout_id, deployment=entry.rollout_id or entry.abtest_id or f"deploy-{entry.id}")
            envelope = sign_desired_state(state, key)
            topic = device_topic(entry.fleet, action.device, DESIRED, self.config.prefix)
            try:
                handle = self.connection.publish(topic, encode_message(DesiredMessage(envelope)), qos=1, retain=True,
                                                 wait=False)
            except TransportError as exc:
                log.warning("desired state for %s not published (%s); retrying next tick", action.device, exc)
                self._retry.extend(pending[index:])
                break
            in_flight.append((entry, state, envelope, handle))
        for entry, state, envelope, handle in in_flight:
            try:
                handle.wait(15.0)
            except TransportError as exc:
                log.warning("desired state for %s not acknowledged (%s); retrying next tick", state.device, exc)
                self._retry.append(entry)
                continue
            self.store.record_desired(
                fleet=entry.fleet, device=state.device, sequence=state.sequence, name=state.bundle,
                version=state.version, action=state.action, issued_at=now,
                expires_at=now + self.config.desired_expires_s, rollout_id=entry.rollout_id,
                abtest_id=entry.abtest_id, deployment=state.deployment, envelope=envelope)
            self.store.complete_action(entry.id, now)
            published += 1
            self.stats.add("desired_published")
        return published, errors

    def _renew_desired(self, now: float) -> None:
        """Re-issue (same bundle, version and action; a new sequence) the desired states that expire
        within ``desired_renew_s``, so a device that comes back after a long absence never finds only an
        expired retained document."""
        expiring = self.store.expiring_desired(now + self.config.desired_renew_s)
        if not expiring:
            return
        key = self._signing_key()
        sequences: dict[str, int] = {}  # one number per fleet: the list holds each device once
        for record in expiring:
            try:
                target = self.repo.target_info(record.name, record.version)
            except EdgeshipError as exc:
                log.warning("desired state of %s (%s %s) cannot be renewed: %s", record.device, record.name,
                            record.version, exc.message)
                continue
            if record.fleet not in sequences:
                sequences[record.fleet] = self.repo.next_sequence(record.fleet)
            state = build_desired_state(fleet=record.fleet, device=record.device, target=target,
                                        sequence=sequences[record.fleet], now=now,
                                        expires_in_s=self.config.desired_expires_s, action=record.action,
                                        rollout=record.rollout_id, deployment=record.deployment)
            envelope = sign_desired_state(state, key)
            try:
                self.connection.publish(device_topic(record.fleet, record.device, DESIRED, self.config.prefix),
                                        encode_message(DesiredMessage(envelope)), qos=1, retain=True, timeout=15.0)
            except TransportError as exc:
                log.warning("renewed desired state for %s not published (%s); next check", record.device, exc)
                return
            self.store.record_desired(fleet=record.fleet, device=record.device, sequence=state.sequence,
                                      name=record.name, version=record.version, action=record.action, issued_at=now,
                                      expires_at=now + self.config.desired_expires_s, rollout_id=record.rollout_id,
                                      abtest_id=record.abtest_id, deployment=record.deployment, envelope=envelope)
            self.stats.add("desired_renewed")
        log.info("renewed %d desired states before they expire", len(expiring))

    def _refresh_repository(self, now: float) -> None:
        moment = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
        try:
            status = self.repo.status(now=moment)
            if timestamp_refresh_due(status, self.config.refresh_fraction):
                status = self.repo.refresh(now=moment)
                log.info("re-signed the repository's timestamp and snapshot (timestamp now expires %s)",
                         status["roles"]["timestamp"]["expires"])
            self.stats.set("timestamp_expires_in_s", status["roles"]["timestamp"]["expires_in_seconds"])
        except EdgeshipError as exc:
            log.error("could not re-sign the release repository's timestamp: %s", exc.message)

    # -- metrics --
    def metrics_text(self, max_age_s: float = 2.0) -> str:
        """The Prometheus page (cached for ``max_age_s``: scrapes are cheap, the store query is not)."""
        with self._metrics_lock:
            at, text = self._metrics_cache
            if time.monotonic() - at < max_age_s and text:
                return text
            now = self.clock()
            summary = self.store.fleet_summary(now - self.config.metrics_window_s)
            rollouts = self.store.list_rollouts(states=["RUNNING", "PAUSED"], limit=100)
            stats = self.snapshot_stats()
            text = render_metrics(summary, rollouts, stats, self.config.metrics_window_s,
                                  counters=self.fleet_counters.snapshot(),
                                  rollout_states=self.store.rollout_state_counts())
            self._metrics_cache = (time.monotonic(), text)
            return text

    def snapshot_stats(self) -> dict[str, float]:
        """The controller's counters, with the block server's and the connection's state."""
        self.stats.set("queue_depth", self._queue.qsize())
        self.stats.set("connected", 1 if self.connection.is_connected else 0)
        if self.block_server is not None:
            self.stats.set("blocks_sent", self.block_server.blocks_sent)
            self.stats.set("block_bytes_sent", self.block_server.bytes_sent)
        return self.stats.snapshot()

    def _start_metrics(self, host: str, port: int) -> None:
        self._http = MetricsServer(host, port, self.metrics_text).start()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (``--json-log``): time, level, logger, message, and the
    exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


__all__.append("JsonLogFormatter")
