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


import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import EventMessage, ReportedMessage, StatusMessage, TelemetryMessage
from edgeship.toolkit.store_migration import migrate
from edgeship.toolkit.store_reads import FleetReads
from edgeship.toolkit.store_schema import (
    DEFAULT_DB_URL,
    bundle_ref,
    device_models,
    device_tags,
    devices,
    events,
    latency_json,
    model_rows,
    telemetry,
    transfer_rows,
    transfers,
    update_fields,
)
from edgeship.toolkit.store_work import (
    ConcurrentUpdateError,
    DesiredRecord,
    IntentRecords,
    PendingAction,
)


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
    models_reported: bool | None = None
    """True: a multi-model agent (its reports carry ``models``); it reads desired-state schema 2."""

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


class FleetStore(FleetReads, IntentRecords):
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
                self.migrations = migrate(self.engine)
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
        reported_models: dict[str, list[dict[str, Any]]] = {}
        transfer_records: list[dict[str, Any]] = []
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
                active, previous = bundle_ref(message.active), bundle_ref(message.previous)
                reported_rows.append({
                    "b_id": device, "active_name": active[0], "active_version": active[1],
                    "previous_name": previous[0], "previous_version": previous[1], "reported_at": at,
                    "reported": message.to_dict(), "agent_version": message.agent_version,
                    "runtime": message.runtime, "models_reported": message.models is not None,
                    **update_fields(message.update)})
                if message.models is not None:
                    reported_models[device] = model_rows(device, message.models, at)
                    # a multi-model agent's top-level update repeats one model's: read each model's own
                    for model_name, entry in message.models.items():
                        model_update = entry.get("update")
                        transfer_records += transfer_rows(
                            item.fleet, device, model_update, model_name,
                            update_fields(model_update)["update_version"] or (entry.get("active") or {}).get("version"),
                            at)
                else:
                    fields = update_fields(message.update)
                    transfer_records += transfer_rows(item.fleet, device, message.update,
                                                      fields["update_name"] or active[0],
                                                      fields["update_version"] or active[1], at)
                seen[device] = at
            elif isinstance(message, EventMessage):
                name, version = bundle_ref(message.bundle)
                event_rows.append({
                    "device_id": device, "fleet": item.fleet, "ts": message.ts, "seq": message.seq,
                    "received_at": at, "event": message.event, "deployment": message.deployment,
                    "bundle_name": name, "bundle_version": version, "state": message.state,
                    "detail": message.detail})
                seen[device] = at
            elif isinstance(message, TelemetryMessage):
                name, version = bundle_ref(message.bundle)
                p95 = message.latency.quantile_ms(0.95)
                feedback = message.feedback or {}
                windows: list[tuple[str | None, str | None, int | None, int, int, Any, dict[str, int], float | None]]
                windows = [(m.name, m.version, m.serving_version, m.requests, m.errors, m.latency, m.feedback or {},
                            m.drift) for m in message.models] or [
                    (name, version, None, message.requests, message.errors, message.latency, feedback,
                     message.drift)]
                # a multi-model agent's windows are per model (its top-level fields repeat the first)
                telemetry_rows.extend({
                    "device_id": device, "fleet": item.fleet, "ts": message.ts, "received_at": at,
                    "window_s": message.window_s, "requests": w_requests, "errors": w_errors,
                    "latency": latency_json(w_latency), "p95_ms": w_latency.quantile_ms(0.95), "bundle_name": w_name,
                    "bundle_version": w_version, "serving_version": w_serving,
                    "feedback_correct": w_feedback.get("correct"), "feedback_total": w_feedback.get("total"),
                    "drift": w_drift}
                    for w_name, w_version, w_serving, w_requests, w_errors, w_latency, w_feedback, w_drift in windows)
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
            if reported_models:
                conn.execute(sa.delete(device_models).where(device_models.c.device_id.in_(list(reported_models))))
                rows = [row for device_rows in reported_models.values() for row in device_rows]
                if rows:
                    conn.execute(sa.insert(device_models), rows)
            if transfer_records:  # a retained report repeats its transfer: the first one is kept
                conn.execute(self._insert_ignore(transfers, "device_id", "model", "update_key"), transfer_records)
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

    def tag_reported_device(self, device: str, fleet: str, tags: Mapping[str, str]) -> str:
        """Set ``tags`` on a device this store knows in ``fleet``: ``changed`` or ``unchanged``;
        ``unknown`` (it has not reported yet) or ``fleet OTHER`` (it reports in another fleet) leave
        everything as it was. The store never invents a device row."""
        with self.engine.begin() as conn:
            known = conn.execute(sa.select(devices.c.fleet).where(devices.c.id == device)).scalar()
            if known is None:
                return "unknown"
            if known != fleet:
                return f"fleet {known}"
            have = self._tags(conn, [device]).get(device, {})
            if all(have.get(k) == v for k, v in tags.items()):
                return "unchanged"
            conn.execute(sa.delete(device_tags).where(device_tags.c.device_id == device,
                                                      device_tags.c.key.in_(list(tags))))
            conn.execute(sa.insert(device_tags), [{"device_id": device, "key": k, "value": v} for k, v in tags.items()])
            return "changed"

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
                       limit: int = 500, after: str = "", before: str = "") -> dict[str, Any]:
        """One page of a filtered fleet, counted in SQL (the console's fleet page at 10,000 devices):
        ``devices`` (``limit`` of them in device id order: the first, those after the id ``after``, or
        those before the id ``before``), ``has_previous`` / ``has_next`` (whether matches lie before the
        first or after the last), ``total``, ``online``, ``versions`` (``"name version"`` or ``""`` ->
        count) and ``states`` (update state or ``""`` -> count) over every match, and ``fleets`` (every
        fleet in the store).

        Keyset paging (``id > after``), not an offset: a page costs the same at any depth of the fleet
        (the primary key's index finds it), and a device that joins does not shift every later page."""
        selected = self._selected(fleet, selection).order_by(None)
        if bundle:
            # a model name: a one-model agent's active bundle, or any model a multi-model agent reports
            served = sa.select(device_models.c.device_id).where(device_models.c.model == bundle)
            if version:
                served = served.where(device_models.c.active_version == version)
            one_model = devices.c.active_name == bundle
            if version:
                one_model = sa.and_(one_model, devices.c.active_version == version)
            selected = selected.where(sa.or_(one_model, devices.c.id.in_(served)))
        elif version:
            served = sa.select(device_models.c.device_id).where(device_models.c.active_version == version)
            selected = selected.where(sa.or_(devices.c.active_version == version, devices.c.id.in_(served)))
        if state:
            selected = selected.where(devices.c.update_state.is_(None) if state.lower() == "none"
                                      else sa.func.upper(devices.c.update_state) == state.upper())
        if online is not None:
            selected = selected.where(devices.c.online == online)
        matched = selected.subquery()
        if before:
            page = (selected.where(devices.c.id < before).order_by(devices.c.id.desc()).limit(limit + 1))
        else:
            page = (selected.where(devices.c.id > after) if after else selected).order_by(devices.c.id).limit(limit + 1)
        names = DeviceInfo.__dataclass_fields__
        with self.engine.connect() as conn:
            rows = list(conn.execute(page).mappings().all())
            more = len(rows) > limit
            rows = rows[:limit]
            if before:
                rows.reverse()
            tags = self._tags(conn, [r["id"] for r in rows])
            # every count of the page in one pass over the matches (was four scans of the table)
            groups = conn.execute(sa.select(matched.c.online, matched.c.active_name, matched.c.active_version,
                                            matched.c.update_state, sa.func.count())
                                  .group_by(matched.c.online, matched.c.active_name, matched.c.active_version,
                                            matched.c.update_state)).all()
            fleets = sorted(f for (f,) in conn.execute(sa.select(devices.c.fleet).distinct()))
        total = up = 0
        versions: dict[str, int] = {}
        states: dict[str, int] = {}
        for is_online, name, version_, update_state, count in groups:
            total += int(count)
            up += int(count) if is_online else 0
            key = f"{name} {version_}" if name else ""
            versions[key] = versions.get(key, 0) + int(count)
            states[update_state or ""] = states.get(update_state or "", 0) + int(count)
        listed = [DeviceInfo(**{k: row[k] for k in names if k != "tags"}, tags=tags.get(row["id"], {})) for row in rows]
        return {"devices": listed, "total": total, "online": up, "versions": versions, "states": states,
                "fleets": fleets, "has_previous": more if before else bool(after), "has_next": bool(before) or more}

    def get_device(self, device: str) -> DeviceInfo:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(devices).where(devices.c.id == device)).mappings().first()
            if row is None:
                raise BadInputError(f"unknown device {device!r}; it has never reported to this store")
            tags = self._tags(conn, [device]).get(device, {})
        names = DeviceInfo.__dataclass_fields__
        return DeviceInfo(**{k: row[k] for k in names if k != "tags"}, tags=tags)


def open_store(url: str | None = None) -> FleetStore:
    """The store at ``url``, else $EDGESHIP_DB, else ``sqlite:///fleet.db``."""
    import os

    return FleetStore(url or os.environ.get("EDGESHIP_DB") or DEFAULT_DB_URL)

