"""The controller's store (SQLAlchemy 2 Core): devices, events, telemetry, desired states,
rollouts, A/B tests, and an outbox of actions that must reach devices (see docs/fleet.md).

One :class:`FleetStore` per process, opened from a SQLAlchemy URL:
``sqlite:///fleet.db`` (WAL journal, a busy timeout, so the controller and the
CLI can use the file at the same time) or ``postgresql://...`` (psycopg 3).

Writes that must keep up with a fleet go through :meth:`FleetStore.ingest`: a
batch of parsed MQTT messages in one transaction, one ``executemany`` per
statement kind. Times are float seconds since the epoch (UTC) on the
controller's clock, which is the clock the rollout engine compares.

Rollouts are saved with optimistic concurrency: each has a ``revision``; a save
names the revision it was computed from and fails with
:class:`ConcurrentUpdateError` when someone else (the CLI, another controller
replica) saved in between. :meth:`FleetStore.update_rollout` does the
load-decide-save-retry loop around a pure function of ``edgeship.toolkit.rollouts``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_DB_URL",
    "ConcurrentUpdateError",
    "DesiredRecord",
    "DeviceInfo",
    "FleetStore",
    "IngestItem",
    "PendingAction",
    "check_store_url",
    "new_id",
    "open_store",
    "parse_selection",
]

import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from edgeship.ota.errors import BadInputError, EdgeshipError, require_module
from edgeship.ota.protocol import EventMessage, ReportedMessage, StatusMessage, TelemetryMessage
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram
from edgeship.toolkit.abtest import ABTest, Arm, Metric, TelemetryWindow, plan_assignments
from edgeship.toolkit.rollouts import (
    Action,
    AssignVersion,
    Decision,
    DeviceRecord,
    DeviceSnapshot,
    DeviceStatus,
    RollbackDevice,
    Rollout,
    RolloutPolicy,
    RolloutState,
    VersionTelemetry,
    action_from_dict,
    step,
)

require_module("sqlalchemy", "host")

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

DEFAULT_DB_URL = "sqlite:///fleet.db"

_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only
_ID = sa.String(64)
_NAME = sa.String(64)
_VERSION = sa.String(64)

metadata = sa.MetaData()

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("fleet", _ID, nullable=False, index=True),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("status_at", sa.Float),
    sa.Column("active_name", _NAME), sa.Column("active_version", _VERSION),
    sa.Column("previous_name", _NAME), sa.Column("previous_version", _VERSION),
    sa.Column("update_state", sa.String(32)),
    sa.Column("update_name", _NAME), sa.Column("update_version", _VERSION),
    sa.Column("update_detail", sa.Text),
    sa.Column("reported_at", sa.Float),
    sa.Column("reported", sa.JSON),
    sa.Column("agent_version", sa.String(64)), sa.Column("runtime", sa.String(64)),
    sa.Column("telemetry_at", sa.Float),
    sa.Column("last_requests", sa.Integer), sa.Column("last_errors", sa.Integer),
    sa.Column("last_p95_ms", sa.Float), sa.Column("last_drift", sa.Float),
)

device_tags = sa.Table(
    "device_tags", metadata,
    sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Index("ix_device_tags_key_value", "key", "value"),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
    sa.Column("device_id", _ID, nullable=False),
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("deployment", sa.String(128)),
    sa.Column("bundle_name", _NAME), sa.Column("bundle_version", _VERSION),
    sa.Column("state", sa.String(32)),
    sa.Column("detail", sa.Text),
    # QoS 1 delivers at least once: a redelivered event is dropped, not stored twice.
    sa.UniqueConstraint("device_id", "seq", "ts", name="uq_events_device_seq_ts"),
    sa.Index("ix_events_device_received", "device_id", "received_at"),
)

telemetry = sa.Table(
    "telemetry", metadata,
    sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
    sa.Column("device_id", _ID, nullable=False),
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("window_s", sa.Float, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("latency", sa.JSON, nullable=False),  # {"counts": [...], "sum_ms": float}, fixed buckets
    sa.Column("p95_ms", sa.Float),
    sa.Column("bundle_name", _NAME), sa.Column("bundle_version", _VERSION),
    sa.Column("feedback_correct", sa.Integer), sa.Column("feedback_total", sa.Integer),
    sa.Column("drift", sa.Float),
    sa.Index("ix_telemetry_device_received", "device_id", "received_at"),
    sa.Index("ix_telemetry_fleet_received", "fleet", "received_at"),
)

desired_sequences = sa.Table(
    "desired_sequences", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("last_sequence", sa.BigInteger, nullable=False),
)

desired_states = sa.Table(
    "desired_states", metadata,
    sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
    sa.Column("device_id", _ID, nullable=False),
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("name", _NAME, nullable=False), sa.Column("version", _VERSION, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("rollout_id", _ID), sa.Column("abtest_id", _ID), sa.Column("deployment", sa.String(128)),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("envelope", sa.JSON),
    sa.UniqueConstraint("device_id", "sequence", name="uq_desired_device_sequence"),
)

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("fleet", _ID, nullable=False, index=True),
    sa.Column("name", _NAME, nullable=False), sa.Column("version", _VERSION, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("stage_started_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("selection", sa.JSON, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("superseded_by", _ID),
)

rollout_devices = sa.Table(
    "rollout_devices", metadata,
    sa.Column("rollout_id", _ID, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stage", sa.Integer), sa.Column("assigned_at", sa.Float),
    sa.Column("previous_name", _NAME), sa.Column("previous_version", _VERSION),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("detail", sa.Text),
)

rollout_log = sa.Table(
    "rollout_log", metadata,
    sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", _ID, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("device_id", _ID),
    sa.Column("detail", sa.Text),
)

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("rollout_id", _ID), sa.Column("abtest_id", _ID),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("device_id", _ID),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("done_at", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("claimed_by", sa.String(128)),
    sa.Column("claimed_at", sa.Float),
    sa.Index("ix_outbox_pending", "done_at", "id"),
)

abtests = sa.Table(
    "abtests", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("a_name", _NAME, nullable=False), sa.Column("a_version", _VERSION, nullable=False),
    sa.Column("b_name", _NAME, nullable=False), sa.Column("b_version", _VERSION, nullable=False),
    sa.Column("metric", sa.String(16), nullable=False),
    sa.Column("split_pct", sa.Float, nullable=False),
    sa.Column("min_samples", sa.Integer, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False), sa.Column("power", sa.Float, nullable=False),
    sa.Column("selection", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("promoted_rollout", _ID),
)

LIVE_ROLLOUT_STATES = (RolloutState.RUNNING.value, RolloutState.PAUSED.value)


class ConcurrentUpdateError(EdgeshipError):
    """The rollout changed since it was read (another writer saved first); read it again and retry."""


# -- values the store hands out -------------------------------------------------------------------

@dataclass(frozen=True)
class IngestItem:
    """One parsed MQTT message and where it came from (the topic's fleet and device)."""

    fleet: str
    device: str
    message: Any  # ReportedMessage | StatusMessage | EventMessage | TelemetryMessage
    received_at: float


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    fleet: str
    online: bool
    first_seen: float
    last_seen: float
    active_name: str | None
    active_version: str | None
    previous_name: str | None
    previous_version: str | None
    update_state: str | None
    update_name: str | None
    update_version: str | None
    update_detail: str | None
    reported_at: float | None
    agent_version: str | None
    runtime: str | None
    telemetry_at: float | None
    last_requests: int | None
    last_errors: int | None
    last_p95_ms: float | None
    last_drift: float | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:  # the attribute plan_assignments and the engine read
        return self.id

    @property
    def last_error_rate(self) -> float | None:
        if not self.last_requests or self.last_errors is None:
            return None
        return self.last_errors / self.last_requests

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "last_error_rate": self.last_error_rate}


@dataclass(frozen=True)
class DesiredRecord:
    device: str
    fleet: str
    sequence: int
    name: str
    version: str
    action: str
    rollout_id: str | None
    abtest_id: str | None
    deployment: str | None
    issued_at: float
    expires_at: float | None
    envelope: dict[str, Any] | None


@dataclass(frozen=True)
class PendingAction:
    """An outbox entry: an action that must reach a device, in the order it was decided."""

    id: int
    fleet: str
    rollout_id: str | None
    abtest_id: str | None
    action: Action
    created_at: float


def new_id(prefix: str) -> str:
    """A short random id such as ``r-3f9a1c0b`` (rollouts) or ``ab-...`` (A/B tests)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def parse_selection(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["site=berlin", "hw=pi4"]`` -> sorted (key, value) pairs; every pair must match (AND)."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise BadInputError(f"selection {item!r}: use TAG=VALUE (e.g. site=berlin)")
        pairs[key.strip()] = value.strip()
    return tuple(sorted(pairs.items()))


def _bundle(ref: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    if not ref:
        return None, None
    return ref.get("name"), ref.get("version")


def _update_fields(update: Mapping[str, Any] | None) -> dict[str, Any]:
    """The agent's ``update`` object: ``state`` plus the bundle it is about, as ``bundle: {name, version}``
    or flat ``name``/``version``, and why it ended as ``reason`` (what the agent reports)."""
    if not update:
        return {"update_state": None, "update_name": None, "update_version": None, "update_detail": None}
    nested = update.get("bundle")
    bundle: Mapping[str, Any] = nested if isinstance(nested, Mapping) else update
    name, version = bundle.get("name"), bundle.get("version")
    detail = update.get("reason") or update.get("detail") or update.get("error")
    return {"update_state": str(update.get("state"))[:32] if update.get("state") else None,
            "update_name": str(name)[:64] if name else None, "update_version": str(version)[:64] if version else None,
            "update_detail": str(detail)[:4096] if detail else None}


def _latency_json(histogram: LatencyHistogram) -> dict[str, Any]:
    return {"counts": list(histogram.counts), "sum_ms": histogram.total_ms}


def _latency_from_json(doc: Any) -> LatencyHistogram:
    if isinstance(doc, str):  # some drivers hand JSON back as text
        doc = json.loads(doc)
    return LatencyHistogram([int(c) for c in doc["counts"]], float(doc.get("sum_ms", 0.0)))


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps the file consistent
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default would be psycopg2)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_store_url(url: str) -> str:
    """A SQLAlchemy URL of a database the store runs on (SQLite or PostgreSQL); no I/O."""
    try:
        backend = sa.engine.make_url(_normalize_url(url)).get_backend_name()
    except sa.exc.ArgumentError as exc:
        raise BadInputError(f"store URL {url!r} is not a SQLAlchemy URL ({exc}); use e.g. {DEFAULT_DB_URL}") \
            from None
    if backend not in ("sqlite", "postgresql"):  # the upserts are written for these two
        raise BadInputError(f"store URL {url!r}: the fleet store runs on sqlite:/// or postgresql://, not {backend}")
    return url


class FleetStore:
    """The store: see the module docstring. Thread-safe (one pooled engine); cheap to share."""

    def __init__(self, url: str = DEFAULT_DB_URL, *, create: bool = True, echo: bool = False) -> None:
        self.url = check_store_url(url)
        try:
            self.engine: Engine = sa.create_engine(_normalize_url(url), echo=echo, future=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise BadInputError(f"store URL {url!r} is not a SQLAlchemy URL ({exc}); use e.g. {DEFAULT_DB_URL}") \
                from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _on_sqlite_connect)
        if create:
            try:
                metadata.create_all(self.engine)
            except sa.exc.DatabaseError as exc:  # OperationalError, or a file that is not a database
                why = " ".join(str(exc.orig).split())  # libpq's messages span lines: keep it one line
                raise EdgeshipError(f"cannot open the store {url}: {why[:200]}") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- dialect helpers ----------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects import postgresql
            return postgresql.insert(table)
        if self.dialect == "sqlite":
            from sqlalchemy.dialects import sqlite
            return sqlite.insert(table)
        return sa.insert(table)  # pragma: no cover - other databases are not supported

    def _insert_ignore(self, table: sa.Table, *keys: str) -> Any:
        return self._insert(table).on_conflict_do_nothing(index_elements=list(keys))

    # -- ingest -------------------------------------------------------------------------------

    def ingest(self, items: Sequence[IngestItem]) -> int:
        """Write a batch of parsed messages in one transaction; returns how many were written.

        Within a batch, later messages of a device win (items keep their order).
        Unknown message types raise BadInputError before anything is written.
        """
        if not items:
            return 0
        new_devices: dict[str, dict[str, Any]] = {}
        status_rows: list[dict[str, Any]] = []
        reported_rows: list[dict[str, Any]] = []
        event_rows: list[dict[str, Any]] = []
        telemetry_rows: list[dict[str, Any]] = []
        device_telemetry: dict[str, dict[str, Any]] = {}
        seen: dict[str, float] = {}
        for item in items:
            message, device, at = item.message, item.device, item.received_at
            new_devices.setdefault(device, {"id": device, "fleet": item.fleet, "online": False, "first_seen": at,
                                            "last_seen": at})
            if isinstance(message, StatusMessage):
                online = message.state == "online"
                status_rows.append({"b_id": device, "online": online, "status_at": at})
                if online:
                    seen[device] = at
            elif isinstance(message, ReportedMessage):
                active, previous = _bundle(message.active), _bundle(message.previous)
                reported_rows.append({
                    "b_id": device, "active_name": active[0], "active_version": active[1],
                    "previous_name": previous[0], "previous_version": previous[1], "reported_at": at,
                    "reported": message.to_dict(), "agent_version": message.agent_version,
                    "runtime": message.runtime, **_update_fields(message.update)})
                seen[device] = at
            elif isinstance(message, EventMessage):
                name, version = _bundle(message.bundle)
                event_rows.append({
                    "device_id": device, "fleet": item.fleet, "ts": message.ts, "seq": message.seq,
                    "received_at": at, "event": message.event, "deployment": message.deployment,
                    "bundle_name": name, "bundle_version": version, "state": message.state,
                    "detail": message.detail})
                seen[device] = at
            elif isinstance(message, TelemetryMessage):
                name, version = _bundle(message.bundle)
                p95 = message.latency.quantile_ms(0.95)
                feedback = message.feedback or {}
                telemetry_rows.append({
                    "device_id": device, "fleet": item.fleet, "ts": message.ts, "received_at": at,
                    "window_s": message.window_s, "requests": message.requests, "errors": message.errors,
                    "latency": _latency_json(message.latency), "p95_ms": p95, "bundle_name": name,
                    "bundle_version": version, "feedback_correct": feedback.get("correct"),
                    "feedback_total": feedback.get("total"), "drift": message.drift})
                device_telemetry[device] = {"b_id": device, "telemetry_at": at, "last_requests": message.requests,
                                            "last_errors": message.errors, "last_p95_ms": p95,
                                            "last_drift": message.drift}
                seen[device] = at
            else:
                raise BadInputError(f"the store does not ingest {type(message).__name__} messages")
        b_id: Any = sa.bindparam("b_id")
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(devices, "id"), list(new_devices.values()))
            if status_rows:
                conn.execute(sa.update(devices).where(devices.c.id == b_id)
                             .values(online=sa.bindparam("online"), status_at=sa.bindparam("status_at")),
                             status_rows)
            if reported_rows:
                columns: dict[str, Any] = {k: sa.bindparam(k) for k in reported_rows[0] if k != "b_id"}
                conn.execute(sa.update(devices).where(devices.c.id == b_id).values(**columns), reported_rows)
            if device_telemetry:
                rows = list(device_telemetry.values())
                columns = {k: sa.bindparam(k) for k in rows[0] if k != "b_id"}
                conn.execute(sa.update(devices).where(devices.c.id == b_id).values(**columns), rows)
            if seen:
                conn.execute(sa.update(devices).where(devices.c.id == b_id)
                             .values(last_seen=sa.bindparam("at")),
                             [{"b_id": d, "at": at} for d, at in seen.items()])
            if event_rows:
                conn.execute(self._insert_ignore(events, "device_id", "seq", "ts"), event_rows)
            if telemetry_rows:
                conn.execute(sa.insert(telemetry), telemetry_rows)
        return len(items)

    def prune_telemetry(self, older_than: float) -> int:
        """Delete telemetry windows received before ``older_than``; returns how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(sa.delete(telemetry).where(telemetry.c.received_at < older_than)).rowcount)

    # -- devices and tags ---------------------------------------------------------------------

    def set_tags(self, device: str, tags: Mapping[str, str], remove: Iterable[str] = ()) -> dict[str, str]:
        """Set (and remove) a device's tags; returns its tags after. Unknown device: BadInputError."""
        with self.engine.begin() as conn:
            if conn.execute(sa.select(devices.c.id).where(devices.c.id == device)).first() is None:
                raise BadInputError(f"unknown device {device!r}; it has never reported to this store")
            keys = list(tags) + list(remove)
            if keys:
                conn.execute(sa.delete(device_tags).where(device_tags.c.device_id == device,
                                                          device_tags.c.key.in_(keys)))
            if tags:
                conn.execute(sa.insert(device_tags),
                             [{"device_id": device, "key": k, "value": v} for k, v in tags.items()])
            return self._tags(conn, [device]).get(device, {})

    def _tags(self, conn: Connection, ids: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        query = sa.select(device_tags.c.device_id, device_tags.c.key, device_tags.c.value)
        if ids is not None:
            if not ids:
                return {}
            query = query.where(device_tags.c.device_id.in_(list(ids)))
        result: dict[str, dict[str, str]] = {}
        for device_id, key, value in conn.execute(query):
            result.setdefault(device_id, {})[key] = value
        return result

    def _selected(self, fleet: str | None, selection: Sequence[tuple[str, str]]) -> Any:
        # Every column but the raw reported document: nothing here reads it, and decoding its JSON
        # for each of 10,000 rows was most of the cost of listing a fleet.
        query = sa.select(*[c for c in devices.c if c.name != "reported"])
        if fleet is not None:
            query = query.where(devices.c.fleet == fleet)
        for key, value in selection:
            query = query.where(sa.exists().where(device_tags.c.device_id == devices.c.id,
                                                  device_tags.c.key == key, device_tags.c.value == value))
        return query.order_by(devices.c.id)

    def list_devices(self, fleet: str | None = None, selection: Sequence[tuple[str, str]] = ()) -> list[DeviceInfo]:
        """The devices of ``fleet`` (all fleets if None) that carry every tag=value of ``selection``."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._selected(fleet, selection)).mappings().all()
            tags = self._tags(conn, [r["id"] for r in rows]) if len(rows) < 5000 else self._tags(conn)
        names = DeviceInfo.__dataclass_fields__
        return [DeviceInfo(**{k: row[k] for k in names if k != "tags"}, tags=tags.get(row["id"], {})) for row in rows]

    def device_listing(self, fleet: str | None = None, selection: Sequence[tuple[str, str]] = (), *,
                       bundle: str = "", version: str = "", state: str = "", online: bool | None = None,
                       limit: int = 500) -> dict[str, Any]:
        """One page of a filtered fleet, counted in SQL (the console's fleet page at 10,000 devices):
        ``devices`` (the first ``limit`` by fleet and id), ``total``, ``online``, ``versions``
        (``"name version"`` or ``""`` -> count) and ``states`` (update state or ``""`` -> count) over
        every match, and ``fleets`` (every fleet in the store)."""
        selected = self._selected(fleet, selection).order_by(None)
        if bundle:
            selected = selected.where(devices.c.active_name == bundle)
        if version:
            selected = selected.where(devices.c.active_version == version)
        if state:
            selected = selected.where(devices.c.update_state.is_(None) if state.lower() == "none"
                                      else sa.func.upper(devices.c.update_state) == state.upper())
        if online is not None:
            selected = selected.where(devices.c.online == online)
        matched = selected.subquery()
        names = DeviceInfo.__dataclass_fields__
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(matched).order_by(matched.c.fleet, matched.c.id).limit(limit)).mappings().all()
            tags = self._tags(conn, [r["id"] for r in rows])
            total, up = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(
                sa.case((matched.c.online, 1), else_=0)), 0))).first() or (0, 0)
            versions = {(f"{n} {v}" if n else ""): int(c) for n, v, c in conn.execute(
                sa.select(matched.c.active_name, matched.c.active_version, sa.func.count())
                .group_by(matched.c.active_name, matched.c.active_version))}
            states = {(st or ""): int(c) for st, c in conn.execute(
                sa.select(matched.c.update_state, sa.func.count()).group_by(matched.c.update_state))}
            fleets = sorted(f for (f,) in conn.execute(sa.select(devices.c.fleet).distinct()))
        listed = [DeviceInfo(**{k: row[k] for k in names if k != "tags"}, tags=tags.get(row["id"], {})) for row in rows]
        return {"devices": listed, "total": int(total), "online": int(up), "versions": versions, "states": states,
                "fleets": fleets}

    def get_device(self, device: str) -> DeviceInfo:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(devices).where(devices.c.id == device)).mappings().first()
            if row is None:
                raise BadInputError(f"unknown device {device!r}; it has never reported to this store")
            tags = self._tags(conn, [device]).get(device, {})
        names = DeviceInfo.__dataclass_fields__
        return DeviceInfo(**{k: row[k] for k in names if k != "tags"}, tags=tags)

    def fleet_summary(self, since: float) -> dict[str, Any]:
        """What the controller's Prometheus metrics need, per fleet: devices and how many are online,
        devices per active (bundle, version), and the fleet's merged latency histogram and request and
        error counts over the telemetry received since ``since``, in all and per reported (bundle,
        version) under ``by_version`` (with the largest drift score)."""
        summary: dict[str, Any] = {}
        with self.engine.connect() as conn:
            online_query = (sa.select(devices.c.fleet, devices.c.online, sa.func.count())
                            .group_by(devices.c.fleet, devices.c.online))
            for fleet, online, count in conn.execute(online_query):
                entry = summary.setdefault(fleet, {"devices": 0, "online": 0, "versions": {}, "requests": 0,
                                                   "errors": 0, "latency": LatencyHistogram()})
                entry["devices"] += int(count)
                entry["online"] += int(count) if online else 0
            versions_query = (sa.select(devices.c.fleet, devices.c.active_name, devices.c.active_version,
                                        sa.func.count())
                              .group_by(devices.c.fleet, devices.c.active_name, devices.c.active_version))
            for fleet, name, version, count in conn.execute(versions_query):
                key = f"{name}:{version}" if name else "none"
                summary[fleet]["versions"][key] = int(count)
            window_query = (sa.select(telemetry.c.fleet, telemetry.c.requests, telemetry.c.errors,
                                      telemetry.c.latency, telemetry.c.bundle_name, telemetry.c.bundle_version,
                                      telemetry.c.drift).where(telemetry.c.received_at >= since))
            for fleet, requests, errors, latency, bundle, version, drift in conn.execute(window_query):
                entry = summary.get(fleet)
                if entry is None:
                    continue
                histogram = _latency_from_json(latency)
                entry["requests"] += requests
                entry["errors"] += errors
                entry["latency"] = entry["latency"].merge(histogram)
                per_version = entry.setdefault("by_version", {}).setdefault(
                    (bundle or "", version or ""),
                    {"requests": 0, "errors": 0, "latency": LatencyHistogram(), "drift_max": None})
                per_version["requests"] += requests
                per_version["errors"] += errors
                per_version["latency"] = per_version["latency"].merge(histogram)
                if drift is not None:
                    per_version["drift_max"] = max(drift, per_version["drift_max"] or drift)
        return summary

    def device_telemetry(self, device: str, since: float) -> dict[tuple[str, str], dict[str, Any]]:
        """One device's telemetry received since ``since``, merged per (bundle, version): requests,
        errors and the latency histogram (the console's device page)."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for _device, name, version, requests, errors, latency, _c, _t in self._telemetry_rows(conn, [device],
                                                                                                    since):
                entry = merged.setdefault((name or "", version or ""),
                                          {"requests": 0, "errors": 0, "latency": LatencyHistogram()})
                entry["requests"] += requests
                entry["errors"] += errors
                entry["latency"] = entry["latency"].merge(_latency_from_json(latency))
        return merged

    def rollout_state_counts(self) -> dict[tuple[str, str], int]:
        """How many rollouts each fleet has in each state (the metrics' ``edgeship_rollouts``)."""
        query = sa.select(rollouts.c.fleet, rollouts.c.state, sa.func.count()).group_by(rollouts.c.fleet,
                                                                                       rollouts.c.state)
        with self.engine.connect() as conn:
            return {(fleet, state): int(count) for fleet, state, count in conn.execute(query)}

    def recent_events(self, device: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = sa.select(events).order_by(events.c.received_at.desc(), events.c.id.desc()).limit(limit)
        if device is not None:
            query = query.where(events.c.device_id == device)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    # -- what the engines read ----------------------------------------------------------------

    def _telemetry_rows(self, conn: Connection, ids: Sequence[str], since: float) -> Iterable[Any]:
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            query = (sa.select(telemetry.c.device_id, telemetry.c.bundle_name, telemetry.c.bundle_version,
                               telemetry.c.requests, telemetry.c.errors, telemetry.c.latency,
                               telemetry.c.feedback_correct, telemetry.c.feedback_total)
                     .where(telemetry.c.device_id.in_(chunk), telemetry.c.received_at >= since))
            yield from conn.execute(query)

    def fleet_snapshot(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                       telemetry_since: float | None = None) -> list[DeviceSnapshot]:
        """The rollout engine's input: the selected devices, with their telemetry per version merged
        over the windows received since ``telemetry_since`` (none if None)."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._selected(fleet, selection)).mappings().all()
            merged: dict[tuple[str, str, str], list[Any]] = {}
            if telemetry_since is not None and rows:
                for device_id, name, version, requests, errors, latency, _c, _t in self._telemetry_rows(
                        conn, [r["id"] for r in rows], telemetry_since):
                    if name is None or version is None:
                        continue
                    slot = merged.setdefault((device_id, name, version), [0, 0, [0] * (len(LATENCY_BUCKETS_MS) + 1),
                                                                         0.0])
                    hist = _latency_from_json(latency)
                    slot[0] += requests
                    slot[1] += errors
                    slot[2] = [a + b for a, b in zip(slot[2], hist.counts)]
                    slot[3] += hist.total_ms
        per_device: dict[str, list[VersionTelemetry]] = {}
        for (device_id, name, version), (requests, errors, counts, total) in sorted(merged.items()):
            per_device.setdefault(device_id, []).append(
                VersionTelemetry(name, version, requests, errors, LatencyHistogram(counts, total)))
        return [DeviceSnapshot(device=r["id"], online=bool(r["online"]), active_name=r["active_name"],
                               active_version=r["active_version"], update_state=r["update_state"],
                               update_name=r["update_name"], update_version=r["update_version"],
                               reported_at=r["reported_at"], telemetry=tuple(per_device.get(r["id"], ())))
                for r in rows]

    def telemetry_windows(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                          since: float = 0.0) -> list[TelemetryWindow]:
        """Every telemetry window of the selected devices received since ``since`` (the A/B report's input)."""
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(self._selected(fleet, selection).subquery().c.id))]
            return [TelemetryWindow(device_id, name, version, requests, errors, _latency_from_json(latency),
                                    correct or 0, total or 0)
                    for device_id, name, version, requests, errors, latency, correct, total
                    in self._telemetry_rows(conn, ids, since)]

    # -- desired states -----------------------------------------------------------------------

    def next_desired_sequence(self, device: str) -> int:
        """Atomically allocate the device's next desired-state sequence number (1, 2, ...)."""
        statement = (self._insert(desired_sequences).values(device_id=device, last_sequence=1)
                     .on_conflict_do_update(index_elements=["device_id"],
                                            set_={"last_sequence": desired_sequences.c.last_sequence + 1})
                     .returning(desired_sequences.c.last_sequence))
        with self.engine.begin() as conn:
            return int(conn.execute(statement).scalar_one())

    def record_desired(self, *, fleet: str, device: str, sequence: int, name: str, version: str,
                       action: str = "install", issued_at: float, expires_at: float | None = None,
                       rollout_id: str | None = None, abtest_id: str | None = None,
                       deployment: str | None = None, envelope: dict[str, Any] | None = None) -> None:
        """Keep the desired state the controller signed and published (its history too)."""
        if action not in ("install", "rollback"):
            raise BadInputError(f"desired action {action!r} must be install or rollback")
        with self.engine.begin() as conn:
            conn.execute(sa.insert(desired_states).values(
                device_id=device, fleet=fleet, sequence=sequence, name=name, version=version, action=action,
                rollout_id=rollout_id, abtest_id=abtest_id, deployment=deployment, issued_at=issued_at,
                expires_at=expires_at, envelope=envelope))

    def desired_for(self, device: str) -> DesiredRecord | None:
        """The device's latest desired state (highest sequence), or None."""
        query = (sa.select(desired_states).where(desired_states.c.device_id == device)
                 .order_by(desired_states.c.sequence.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else self._desired(row)

    def desired_map(self, fleet: str) -> dict[str, tuple[str, str]]:
        """Each device of ``fleet``: the (name, version) of its latest desired state."""
        latest = (sa.select(desired_states.c.device_id, sa.func.max(desired_states.c.sequence).label("seq"))
                  .where(desired_states.c.fleet == fleet).group_by(desired_states.c.device_id).subquery())
        query = (sa.select(desired_states.c.device_id, desired_states.c.name, desired_states.c.version)
                 .join(latest, sa.and_(latest.c.device_id == desired_states.c.device_id,
                                       latest.c.seq == desired_states.c.sequence)))
        with self.engine.connect() as conn:
            return {d: (n, v) for d, n, v in conn.execute(query)}

    def expiring_desired(self, before: float, limit: int = 1000) -> list[DesiredRecord]:
        """Each device's latest desired state if it expires before ``before`` (the controller
        re-issues them so a device that was away long never finds only an expired document)."""
        latest = (sa.select(desired_states.c.device_id, sa.func.max(desired_states.c.sequence).label("seq"))
                  .group_by(desired_states.c.device_id).subquery())
        query = (sa.select(desired_states)
                 .join(latest, sa.and_(latest.c.device_id == desired_states.c.device_id,
                                       latest.c.seq == desired_states.c.sequence))
                 .where(desired_states.c.expires_at.is_not(None), desired_states.c.expires_at < before)
                 .order_by(desired_states.c.expires_at).limit(limit))
        with self.engine.connect() as conn:
            return [self._desired(row) for row in conn.execute(query).mappings()]

    @staticmethod
    def _desired(row: Any) -> DesiredRecord:
        return DesiredRecord(row["device_id"], row["fleet"], int(row["sequence"]), row["name"], row["version"],
                             row["action"], row["rollout_id"], row["abtest_id"], row["deployment"],
                             row["issued_at"], row["expires_at"], row["envelope"])

    # -- rollouts -----------------------------------------------------------------------------

    def create_rollout(self, rollout: Rollout, promote_abtest: str | None = None) -> None:
        """Store a new rollout. Refused while another rollout of the same bundle on the fleet is
        RUNNING or PAUSED, or a RUNNING A/B test there has an arm of that bundle (other than
        ``promote_abtest``, which this rollout promotes: it is marked PROMOTED in the same
        transaction). COMPLETED rollouts of the same bundle are marked superseded (they stop
        giving their version to devices that join later)."""
        with self.engine.begin() as conn:
            busy = conn.execute(sa.select(rollouts.c.id, rollouts.c.version, rollouts.c.state).where(
                rollouts.c.fleet == rollout.fleet, rollouts.c.name == rollout.name,
                rollouts.c.state.in_(LIVE_ROLLOUT_STATES))).first()
            if busy is not None:
                raise BadInputError(
                    f"rollout {busy.id} of {rollout.name} {busy.version} on fleet {rollout.fleet} is {busy.state}; "
                    f"abort it or let it finish first")
            testing = conn.execute(sa.select(abtests.c.id).where(
                abtests.c.fleet == rollout.fleet, abtests.c.state == "RUNNING",
                sa.or_(abtests.c.a_name == rollout.name, abtests.c.b_name == rollout.name))).scalars().all()
            others = [t for t in testing if t != promote_abtest]
            if others:
                raise BadInputError(f"A/B test {others[0]} of {rollout.name} runs on fleet {rollout.fleet}; "
                                    "promote or stop it first")
            if promote_abtest is not None:
                if promote_abtest not in testing:
                    raise BadInputError(f"A/B test {promote_abtest} is not a RUNNING test of {rollout.name} "
                                        f"on fleet {rollout.fleet}")
                conn.execute(sa.update(abtests).where(abtests.c.id == promote_abtest).values(
                    state="PROMOTED", updated_at=rollout.created_at, promoted_rollout=rollout.id))
            conn.execute(sa.insert(rollouts).values(**self._rollout_row(rollout), revision=1))
            conn.execute(sa.update(rollouts).where(
                rollouts.c.fleet == rollout.fleet, rollouts.c.name == rollout.name, rollouts.c.id != rollout.id,
                rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
                .values(superseded_by=rollout.id))
            self._write_devices(conn, rollout, {})
            conn.execute(sa.insert(rollout_log).values(rollout_id=rollout.id, at=rollout.created_at, kind="start",
                                                       detail=f"{rollout.name} {rollout.version}"))

    @staticmethod
    def _rollout_row(rollout: Rollout) -> dict[str, Any]:
        return {"id": rollout.id, "fleet": rollout.fleet, "name": rollout.name, "version": rollout.version,
                "state": rollout.state.value, "stage": rollout.stage, "stage_started_at": rollout.stage_started_at,
                "created_at": rollout.created_at, "updated_at": rollout.updated_at,
                "policy": rollout.policy.to_dict(), "selection": [list(p) for p in rollout.selection],
                "reason": rollout.reason}

    def _write_devices(self, conn: Connection, rollout: Rollout, before: Mapping[str, DeviceRecord]) -> None:
        changed = [r for d, r in rollout.devices.items() if before.get(d) != r]
        if not changed:
            return
        existing = [r.device for r in changed if r.device in before]
        for start in range(0, len(existing), 500):
            conn.execute(sa.delete(rollout_devices).where(rollout_devices.c.rollout_id == rollout.id,
                                                          rollout_devices.c.device_id.in_(existing[start:start + 500])))
        conn.execute(sa.insert(rollout_devices), [
            {"rollout_id": rollout.id, "device_id": r.device, "status": r.status.value, "stage": r.stage,
             "assigned_at": r.assigned_at, "previous_name": r.previous_name, "previous_version": r.previous_version,
             "updated_at": r.updated_at, "detail": r.detail} for r in changed])

    def load_rollout(self, rollout_id: str) -> tuple[Rollout, int]:
        """(rollout, revision). Unknown id: BadInputError."""
        with self.engine.connect() as conn:
            return self._load_rollout(conn, rollout_id)

    def rollout_revision(self, rollout_id: str) -> int | None:
        """The stored revision of a rollout (None: unknown): every change to it or its devices'
        records bumps it, so a reader may keep a loaded rollout until this moves."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(rollouts.c.revision).where(rollouts.c.id == rollout_id)).scalar()
        return None if value is None else int(value)

    def _load_rollout(self, conn: Connection, rollout_id: str) -> tuple[Rollout, int]:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
        if row is None:
            raise BadInputError(f"unknown rollout {rollout_id!r} (see `edgeship rollout ls`)")
        records = {
            r["device_id"]: DeviceRecord(r["device_id"], DeviceStatus(r["status"]), r["stage"], r["assigned_at"],
                                         r["previous_name"], r["previous_version"], r["updated_at"], r["detail"])
            for r in conn.execute(sa.select(rollout_devices).where(rollout_devices.c.rollout_id == rollout_id))
            .mappings()}
        policy = row["policy"] if not isinstance(row["policy"], str) else json.loads(row["policy"])
        selection = row["selection"] if not isinstance(row["selection"], str) else json.loads(row["selection"])
        rollout = Rollout(id=row["id"], fleet=row["fleet"], name=row["name"], version=row["version"],
                          policy=RolloutPolicy.from_dict(policy), state=RolloutState(row["state"]),
                          stage=row["stage"], stage_started_at=row["stage_started_at"], created_at=row["created_at"],
                          updated_at=row["updated_at"], selection=tuple((k, v) for k, v in selection),
                          devices=records, reason=row["reason"])
        return rollout, int(row["revision"])

    def save_rollout(self, rollout: Rollout, expected_revision: int, actions: Sequence[Action] = (),
                     before: Rollout | None = None, now: float | None = None) -> int:
        """Persist a decision: the rollout, its changed device records, its log, and the actions that
        must reach devices (into the outbox), in one transaction. Returns the new revision.

        Raises:
            ConcurrentUpdateError: the stored revision is no longer ``expected_revision``.
        """
        at = rollout.updated_at if now is None else now
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(rollouts).where(rollouts.c.id == rollout.id,
                                                            rollouts.c.revision == expected_revision)
                                  .values(**{k: v for k, v in self._rollout_row(rollout).items() if k != "id"},
                                          revision=expected_revision + 1))
            if result.rowcount != 1:
                raise ConcurrentUpdateError(f"rollout {rollout.id} changed since revision {expected_revision}")
            previous = before.devices if before is not None else self._load_rollout(conn, rollout.id)[0].devices
            self._write_devices(conn, rollout, previous)
            self._log_and_enqueue(conn, rollout.fleet, actions, at, rollout_id=rollout.id)
        return expected_revision + 1

    def _log_and_enqueue(self, conn: Connection, fleet: str, actions: Sequence[Action], at: float,
                         rollout_id: str | None = None, abtest_id: str | None = None) -> None:
        if not actions:
            return
        if rollout_id is not None:
            conn.execute(sa.insert(rollout_log), [
                {"rollout_id": rollout_id, "at": at, "kind": a.kind, "device_id": getattr(a, "device", None),
                 "detail": getattr(a, "reason", None)} for a in actions])
        deliver = [a for a in actions if isinstance(a, (AssignVersion, RollbackDevice))]
        if deliver:
            conn.execute(sa.insert(outbox), [
                {"created_at": at, "fleet": fleet, "rollout_id": rollout_id, "abtest_id": abtest_id, "kind": a.kind,
                 "device_id": a.device, "payload": asdict(a)} for a in deliver])

    def update_rollout(self, rollout_id: str, decide: Callable[[Rollout], Decision], *, now: float | None = None,
                       retries: int = 5) -> Decision:
        """Load, apply ``decide`` (a pure function of the rollout), save; retry on a concurrent save."""
        for attempt in range(retries):
            rollout, revision = self.load_rollout(rollout_id)
            decision = decide(rollout)
            if not decision.actions and replace(decision.rollout, updated_at=rollout.updated_at) == rollout:
                return decision  # nothing changed: no write, no revision bump
            try:
                self.save_rollout(decision.rollout, revision, decision.actions, before=rollout, now=now)
                return decision
            except ConcurrentUpdateError:
                if attempt == retries - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def reconcile_rollout(self, rollout_id: str, now: float, telemetry_window_s: float = 900.0) -> Decision:
        """One reconcile of one rollout: snapshot of its selection (telemetry of the last
        ``telemetry_window_s`` seconds, never before the rollout started), ``step``, save with the
        outbox. What the controller calls for each of :meth:`live_rollout_ids` on every tick."""
        def decide(rollout: Rollout) -> Decision:
            since = max(rollout.created_at, now - telemetry_window_s)
            return step(rollout, self.fleet_snapshot(rollout.fleet, rollout.selection, telemetry_since=since), now)

        return self.update_rollout(rollout_id, decide, now=now)

    def reconcile_abtest(self, test_id: str, now: float) -> list[AssignVersion]:
        """Queue the arm assignments a RUNNING A/B test still needs (devices that joined, or whose
        desired state is not their arm's yet); returns what was queued. Assignments already queued and
        not yet carried out are not queued twice."""
        test, _ = self.get_abtest(test_id)
        if test.state != "RUNNING":
            return []
        desired = self.desired_map(test.fleet)
        for pending in self.pending_actions(limit=100_000):
            if pending.abtest_id == test_id and isinstance(pending.action, AssignVersion):
                desired[pending.action.device] = (pending.action.name, pending.action.version)
        actions = plan_assignments(test, self.list_devices(test.fleet, test.selection), desired)
        if actions:
            self.enqueue_actions(test.fleet, actions, now, abtest_id=test_id)
        return actions

    def list_rollouts(self, fleet: str | None = None, states: Iterable[str] | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        """Rollout rows (no device records), newest first, with per-status device counts."""
        query = sa.select(rollouts).order_by(rollouts.c.created_at.desc(), rollouts.c.id).limit(limit)
        if fleet is not None:
            query = query.where(rollouts.c.fleet == fleet)
        if states is not None:
            query = query.where(rollouts.c.state.in_([str(s) for s in states]))
        counts_query = (sa.select(rollout_devices.c.rollout_id, rollout_devices.c.status, sa.func.count())
                        .group_by(rollout_devices.c.rollout_id, rollout_devices.c.status))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
            counts: dict[str, dict[str, int]] = {}
            for rollout_id, status, count in conn.execute(counts_query):
                counts.setdefault(rollout_id, {})[status] = int(count)
        for row in rows:
            row["devices"] = counts.get(row["id"], {})
        return rows

    def live_rollout_ids(self) -> list[str]:
        """What the controller reconciles: RUNNING and PAUSED rollouts, and COMPLETED ones not yet
        superseded by a newer rollout of the same bundle on the fleet (they serve late joiners)."""
        query = sa.select(rollouts.c.id).where(sa.or_(
            rollouts.c.state.in_(LIVE_ROLLOUT_STATES),
            sa.and_(rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
        )).order_by(rollouts.c.created_at, rollouts.c.id)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def rollout_log_entries(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        query = (sa.select(rollout_log).where(rollout_log.c.rollout_id == rollout_id)
                 .order_by(rollout_log.c.id.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()][::-1]

    # -- the outbox ---------------------------------------------------------------------------

    def enqueue_actions(self, fleet: str, actions: Sequence[Action], now: float, *, rollout_id: str | None = None,
                        abtest_id: str | None = None) -> None:
        """Queue device actions decided outside a rollout (``deploy``, A/B assignments)."""
        with self.engine.begin() as conn:
            self._log_and_enqueue(conn, fleet, actions, now, rollout_id=rollout_id, abtest_id=abtest_id)

    def pending_actions(self, limit: int = 1000) -> list[PendingAction]:
        """Actions not yet carried out, oldest first (a device's actions stay in decision order)."""
        query = sa.select(outbox).where(outbox.c.done_at.is_(None)).order_by(outbox.c.id).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [PendingAction(int(r["id"]), r["fleet"], r["rollout_id"], r["abtest_id"],
                              action_from_dict(r["payload"] if not isinstance(r["payload"], str)
                                               else json.loads(r["payload"])), r["created_at"]) for r in rows]

    def claim_actions(self, owner: str, now: float, limit: int = 500, lease_s: float = 60.0) -> list[PendingAction]:
        """Claim pending actions for one controller replica, so two replicas never carry out the same
        one: unclaimed entries, or entries whose claim is older than ``lease_s`` (a replica that died).
        Returns the entries this call claimed, oldest first."""
        expired = now - lease_s
        claimable = sa.and_(outbox.c.done_at.is_(None),
                            sa.or_(outbox.c.claimed_by.is_(None), outbox.c.claimed_at < expired))
        with self.engine.begin() as conn:
            ids = list(conn.execute(sa.select(outbox.c.id).where(claimable).order_by(outbox.c.id).limit(limit))
                       .scalars())
            if not ids:
                return []
            # The claim re-checks the condition, so a concurrent claimer that got there first wins.
            conn.execute(sa.update(outbox).where(outbox.c.id.in_(ids), claimable)
                         .values(claimed_by=owner, claimed_at=now))
            rows = conn.execute(sa.select(outbox).where(outbox.c.id.in_(ids), outbox.c.claimed_by == owner,
                                                        outbox.c.claimed_at == now).order_by(outbox.c.id)
                                ).mappings().all()
        return [PendingAction(int(r["id"]), r["fleet"], r["rollout_id"], r["abtest_id"],
                              action_from_dict(r["payload"] if not isinstance(r["payload"], str)
                                               else json.loads(r["payload"])), r["created_at"]) for r in rows]

    def complete_action(self, action_id: int, now: float, error: str | None = None) -> None:
        """Mark an outbox entry carried out (``error`` keeps why it could not be)."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(outbox).where(outbox.c.id == action_id).values(done_at=now, error=error))

    # -- A/B tests ----------------------------------------------------------------------------

    def create_abtest(self, test: ABTest) -> None:
        """Store a new A/B test. Refused while a rollout of either arm's bundle is RUNNING or PAUSED on
        the fleet, or another A/B test of either bundle RUNS there (two tests would each assign the
        devices both select, back and forth every tick); COMPLETED rollouts of those bundles are
        superseded (they stop giving their version to devices that join later, which now get an arm)."""
        names = {test.a.name, test.b.name}
        with self.engine.begin() as conn:
            busy = conn.execute(sa.select(rollouts.c.id, rollouts.c.name, rollouts.c.state).where(
                rollouts.c.fleet == test.fleet, rollouts.c.name.in_(names),
                rollouts.c.state.in_(LIVE_ROLLOUT_STATES))).first()
            if busy is not None:
                raise BadInputError(f"rollout {busy.id} of {busy.name} on fleet {test.fleet} is {busy.state}; "
                                    "abort it or let it finish before an A/B test of that bundle")
            other = conn.execute(sa.select(abtests.c.id).where(
                abtests.c.fleet == test.fleet, abtests.c.state == "RUNNING",
                sa.or_(abtests.c.a_name.in_(names), abtests.c.b_name.in_(names)))).first()
            if other is not None:
                raise BadInputError(f"A/B test {other.id} of {'/'.join(sorted(names))} already runs on fleet "
                                    f"{test.fleet}; stop or promote it first")
            conn.execute(sa.update(rollouts).where(
                rollouts.c.fleet == test.fleet, rollouts.c.name.in_(names),
                rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
                .values(superseded_by=test.id))
            conn.execute(sa.insert(abtests).values(
                id=test.id, fleet=test.fleet, a_name=test.a.name, a_version=test.a.version, b_name=test.b.name,
                b_version=test.b.version, metric=test.metric.value, split_pct=test.split_pct,
                min_samples=test.min_samples, alpha=test.alpha, power=test.power,
                selection=[list(p) for p in test.selection], state=test.state, created_at=test.created_at,
                updated_at=test.created_at))

    def get_abtest(self, test_id: str) -> tuple[ABTest, str | None]:
        """(test, id of the rollout it was promoted to or None). Unknown id: BadInputError."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(abtests).where(abtests.c.id == test_id)).mappings().first()
        if row is None:
            raise BadInputError(f"unknown A/B test {test_id!r} (see `edgeship abtest ls`)")
        return self._abtest(row), row["promoted_rollout"]

    @staticmethod
    def _abtest(row: Any) -> ABTest:
        selection = row["selection"] if not isinstance(row["selection"], str) else json.loads(row["selection"])
        return ABTest(id=row["id"], fleet=row["fleet"], a=Arm(row["a_name"], row["a_version"]),
                      b=Arm(row["b_name"], row["b_version"]), metric=Metric(row["metric"]),
                      split_pct=row["split_pct"], min_samples=row["min_samples"], alpha=row["alpha"],
                      power=row["power"], created_at=row["created_at"],
                      selection=tuple((k, v) for k, v in selection), state=row["state"])

    def list_abtests(self, fleet: str | None = None, states: Iterable[str] | None = None) -> list[ABTest]:
        query = sa.select(abtests).order_by(abtests.c.created_at.desc(), abtests.c.id)
        if fleet is not None:
            query = query.where(abtests.c.fleet == fleet)
        if states is not None:
            query = query.where(abtests.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [self._abtest(r) for r in conn.execute(query).mappings()]

    def set_abtest_state(self, test_id: str, state: str, now: float, promoted_rollout: str | None = None) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(abtests).where(abtests.c.id == test_id)
                                  .values(state=state, updated_at=now, promoted_rollout=promoted_rollout))
            if result.rowcount != 1:
                raise BadInputError(f"unknown A/B test {test_id!r}")


def open_store(url: str | None = None) -> FleetStore:
    """The store at ``url``, else $EDGESHIP_DB, else ``sqlite:///fleet.db``."""
    import os

    return FleetStore(url or os.environ.get("EDGESHIP_DB") or DEFAULT_DB_URL)
