"""The fleet controller: thin I/O around the store and the pure rollout engine (docs/fleet.md, "Controller").

One :class:`Controller` per process (a *replica*). It

- connects to the broker with :class:`~edgeship.ota.transport.MqttConnection` (client id
  ``edgeship-controller-<replica>``, MQTT 5 with a fall-back to 3.1.1);
- subscribes to every device's retained ``reported`` and ``status`` with plain filters (every
  replica sees every device's state: retained messages are not delivered to shared
  subscriptions), and to ``events``, ``telemetry`` and ``blocks/request`` through the MQTT 5
  shared subscription ``$share/edgeship-controllers/...`` so replicas split that load;
- parses each message with :mod:`edgeship.ota.protocol` on the MQTT network thread
  (:func:`~edgeship.toolkit.controller_ingest.route_message`, pure) and queues it; a writer
  thread (:class:`~edgeship.toolkit.controller_ingest.IngestWriter`) ingests the queue in batches
  (:meth:`FleetStore.ingest`), so the store's cost is paid once per batch, not per message.
  Malformed, oversized, unknown or mis-addressed messages are counted, logged (rate-limited)
  and dropped; none can stop the controller;
- runs a :class:`~edgeship.toolkit.blockserver.BlockServer` over the release repository;
- every ``tick_s`` reconciles rollouts and A/B tests in the store and carries out the outbox:
  each claimed action becomes a desired state for the device, signed, published and recorded
  by :class:`~edgeship.toolkit.desired_publisher.DesiredPublisher`, the one path every desired
  state takes (assignments, rollbacks, and re-issues before expiry alike);
- re-signs the repository's timestamp and snapshot before they expire, and re-issues desired
  states before they expire;
- reads a silent device's retained ``reported`` again when its record says an update is in
  flight (a report the broker or the ingest queue dropped; :mod:`~edgeship.toolkit.report_reread`
  decides who, bounded per pass);
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
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable

from edgeship.ota.director import load_director_private_key
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import ReportedMessage, TelemetryMessage
from edgeship.ota.release import ReleaseRepository, TargetInfo
from edgeship.ota.topics import (
    EVENTS,
    REPORTED,
    TELEMETRY,
    device_topic,
    device_wildcard,
)
from edgeship.ota.transport import (
    MQTT_V5,
    MqttConnection,
    ReceivedMessage,
)
from edgeship.toolkit.blockserver import BlockServer
from edgeship.toolkit.controller_config import (
    DEFAULT_SHARED_GROUP,
    ControllerConfig,
    default_replica_id,
)
from edgeship.toolkit.controller_ingest import (
    ControllerStats,
    IngestWriter,
    RateLimitedLog,
    RejectedMessage,
    route_message,
)
from edgeship.toolkit.controller_metrics import (
    INGESTED_KINDS,
    FleetCounters,
    MetricsServer,
    render_metrics,
)
from edgeship.toolkit.desired_publisher import DesiredChange, DesiredPublisher, build_desired_state
from edgeship.toolkit.report_reread import forget_rereads, rereads_due
from edgeship.toolkit.rollouts import AssignVersion, RemoveModel, RollbackDevice
from edgeship.toolkit.store import ConcurrentUpdateError, FleetStore, PendingAction

log = logging.getLogger(__name__)

SHARED_KINDS = (EVENTS, TELEMETRY)
"""Kinds split between replicas (shared subscription); reported and status are retained and
must reach every replica, so they use plain filters."""


# -- pure pieces ---------------------------------------------------------------------------------

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

# -- the controller ------------------------------------------------------------------------------

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
        self.publisher = DesiredPublisher(self.connection, self.store, next_sequence=self.repo.next_sequence,
                                          signing_key=self._signing_key, prefix=config.prefix,
                                          expires_s=config.desired_expires_s, target_info=self.repo.target_info)
        self.writer = IngestWriter(self.store, self.stats, self.fleet_counters, clock, batch_max=config.batch_max,
                                   batch_wait_s=config.batch_wait_s, queue_max=config.queue_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rejects = RateLimitedLog()
        self._retry: list[PendingAction] = []
        self._last_refresh_check = 0.0
        self._last_renew_check = 0.0
        self._last_prune = 0.0
        self._last_late_joiner_check = 0.0
        self._last_reread_check = 0.0
        self._reread_at: dict[str, float] = {}
        self._reread_filters: list[str] = []
        self._reread_thread: threading.Thread | None = None
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
        # every retained report arrives with this connection's subscriptions: the first re-read pass waits a period
        self._last_reread_check = self.clock()
        cfg = self.config
        # Shared subscriptions need MQTT 5 here: a 3.1.1 broker (the embedded one) would take
        # "$share/..." for a plain topic name and deliver nothing.
        self.shared = bool(cfg.shared_group) and self.connection.protocol == MQTT_V5
        group = cfg.shared_group if self.shared else None
        if cfg.shared_group and not self.shared:
            log.warning("broker speaks MQTT %s: no shared subscriptions, run a single controller replica",
                        self.connection.protocol)
        self._threads = [threading.Thread(target=self.writer.run, name="controller-ingest", daemon=True),
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
        self.writer.request_stop(timeout)
        for thread in [*self._threads, *([self._reread_thread] if self._reread_thread else [])]:
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
        if isinstance(item.message, ReportedMessage) and item.message.dropped:
            self.stats.add("transfer_dropped", len(item.message.dropped))
            self._rejects.warning("transfer", f"{item.fleet}/{item.device} reported: kept the report, dropped "
                                              f"{'; '.join(item.message.dropped)[:400]}")
        try:
            # Telemetry is a stream of windows: when the writer is behind, shed it rather than
            # stall the network thread (which also carries status, reported and events).
            self.writer.put(item, shed=isinstance(item.message, TelemetryMessage))
        except queue.Full:
            self.stats.add("ingest_dropped")
            self._rejects.warning("queue-full", f"ingest queue full ({self.config.queue_max}); "
                                                f"{kind} from {item.fleet}/{item.device} dropped")

    # -- reconcile --
    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a failed tick is logged; the next one tries again
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
            except Exception:  # one bad row must not stop the others, nor the outbox below (logged)
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
        if self.config.report_reread.max_per_pass and \
                now - self._last_reread_check >= self.config.report_reread.check_every_s:
            self._last_reread_check = now
            self._start_reread(now)
        if now - self._last_prune >= 3600.0:
            self._last_prune = now
            pruned = self.store.prune_telemetry(now - self.config.telemetry_retention_s)
            if pruned:
                log.info("pruned %d telemetry windows older than %.0f s", pruned, self.config.telemetry_retention_s)
        return done

    def _start_reread(self, now: float) -> None:
        """A re-read pass in a thread of its own: each subscription waits for the broker's SUBACK,
        and 100 of them on a loaded broker must not hold up the rollouts' reconcile. One pass at a
        time; a pass still running when the next is due makes that one wait for the next period."""
        if self._reread_thread is not None and self._reread_thread.is_alive():
            return
        self._reread_thread = threading.Thread(target=self._reread_pass, args=(now,), name="controller-reread",
                                               daemon=True)
        self._reread_thread.start()

    def _reread_pass(self, now: float) -> None:
        try:
            self._reread_stale_reports(now)
        except Exception:  # a failed pass is logged; the next period tries again
            log.exception("re-reading stale reports failed; trying again next period")

    def _reread_stale_reports(self, now: float) -> None:
        """Subscribe to the exact ``reported`` topic of each device due a re-read: a new subscription
        makes the broker send that topic's retained message, which the ``+/reported`` subscription's
        handler ingests like any report (ingesting a report twice is harmless: it replaces the
        record). Last pass's subscriptions are dropped first; the broker sent their retained message
        right after its SUBACK."""
        for topic_filter in self._reread_filters:
            self.connection.unsubscribe(topic_filter)
        self._reread_filters = []
        policy = self.config.report_reread
        fleet = None if self.config.fleet == "+" else self.config.fleet
        stale = self.store.stale_in_flight(now - policy.stale_after_s, fleet=fleet)
        self._reread_at = forget_rereads(self._reread_at, now, policy)
        due = rereads_due(stale, self._reread_at, now, policy)
        for device in due:
            if self._stop.is_set():
                break
            topic = device_topic(device.fleet, device.device, REPORTED, self.config.prefix)
            try:
                self.connection.subscribe(topic, _ignore, qos=1)
            except EdgeshipError as exc:  # the broker is away: the next pass tries again
                log.warning("could not re-read %s's report: %s", device.device, exc.message)
                break
            self._reread_filters.append(topic)
            self._reread_at[device.device] = now
        if due:
            self.stats.add("reports_reread", len(self._reread_filters))
            log.info("re-reading the retained report of %d device(s) silent for %.0f s or more with an update in "
                     "flight (%d such in all)", len(self._reread_filters), policy.stale_after_s, len(stale))

    def _fail_assignment(self, rollout_id: str, device: str, detail: str, now: float) -> None:
        """Mark an assignment that cannot be signed FAILED in its rollout now (not at its timeout)."""
        from edgeship.toolkit.rollouts import fail_assignment

        try:
            self.store.update_rollout(rollout_id, lambda r: fail_assignment(r, device, detail, now), now=now)
        except Exception:  # the outbox entry already holds the error; the timeout still ends it (logged)
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
        errors = 0
        changes: list[DesiredChange] = []
        for entry in pending:
            action = entry.action
            if isinstance(action, RemoveModel):
                changes.append(DesiredChange(fleet=entry.fleet, device=action.device, target=None, action="remove",
                                             model=action.name, deployment=f"remove-{entry.id}", token=entry))
                continue
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
            changes.append(DesiredChange(
                fleet=entry.fleet, device=action.device, target=target,
                action="install" if isinstance(action, AssignVersion) else "rollback",
                rollout_id=entry.rollout_id, abtest_id=entry.abtest_id,
                deployment=entry.rollout_id or entry.abtest_id or f"deploy-{entry.id}", token=entry))
        outcome = self.publisher.publish(changes, now)
        self._retry.extend(change.token for change in outcome.unsent)
        for change in outcome.published:
            self.store.complete_action(change.token.id, now)
        for change, why in outcome.refused:
            log.warning("desired state for %s not sent: %s", change.device, why)
            self.store.complete_action(change.token.id, now, error=why)
            if change.rollout_id and change.action == "install":
                self._fail_assignment(change.rollout_id, change.device, why, now)
            errors += 1
            self.stats.add("action_errors")
        self.stats.add("desired_published", len(outcome.published))
        return len(outcome.published), errors

    def _renew_desired(self, now: float) -> None:
        """Re-issue (same bundle, version and action; a new sequence) the desired states that expire
        within ``desired_renew_s``, so a device that comes back after a long absence never finds only an
        expired retained document. What the broker did not take is tried at the next check."""
        expiring = self.store.expiring_desired(now + self.config.desired_renew_s)
        if not expiring:
            return
        changes: list[DesiredChange] = []
        for record in expiring:
            # the device's current set again (every model's target looked up by the publisher)
            changes.append(DesiredChange(fleet=record.fleet, device=record.device, target=None, renew=True,
                                         model=record.name, model_version=record.version, action=record.action,
                                         rollout_id=record.rollout_id, abtest_id=record.abtest_id,
                                         deployment=record.deployment))
        outcome = self.publisher.publish(changes, now)
        for change, why in outcome.refused:
            log.warning("desired state of %s cannot be renewed: %s", change.device, why)
        self.stats.add("desired_renewed", len(outcome.published))
        log.info("renewed %d desired states before they expire", len(outcome.published))

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
                                  rollout_states=self.store.rollout_state_counts(),
                                  transfers=self.store.transfer_totals())
            self._metrics_cache = (time.monotonic(), text)
            return text

    def snapshot_stats(self) -> dict[str, float]:
        """The controller's counters, with the block server's and the connection's state."""
        self.stats.set("queue_depth", self.writer.qsize())
        self.stats.set("connected", 1 if self.connection.is_connected else 0)
        if self.block_server is not None:
            self.stats.set("blocks_sent", self.block_server.blocks_sent)
            for kind, count in list(self.block_server.bytes_by_kind.items()):
                self.stats.set(f"block_bytes_sent.{kind}", count)
        return self.stats.snapshot()

    def _start_metrics(self, host: str, port: int) -> None:
        self._http = MetricsServer(host, port, self.metrics_text).start()


def _ignore(message: ReceivedMessage) -> None:
    """The handler of a re-read subscription: the ``+/reported`` subscription's handler already
    ingests every message on the topic."""


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
