"""Bringing a store made by an earlier edgeship up to this one's schema, in place.

``migrate(engine)`` runs each time a store is opened for writing (idempotent, cheap when there
is nothing to do): it creates the tables this version added, adds the columns it added to
existing tables (``ALTER TABLE ... ADD COLUMN``, nullable, on SQLite and PostgreSQL alike), and
fills the new tables from the old ones once, recording the schema version in ``store_meta``.

Schema versions:
    1: one model per device (desired states name one bundle).
    2: many models per device: ``desired_models`` (the desired set, one row per model),
       ``device_models`` (what a multi-model agent reports per model),
       ``devices.models_reported``, ``telemetry.serving_version``. The migration copies each
       device's latest desired state into ``desired_models``.
    3: the record of bytes: ``transfers`` (how each update's bundle travelled: delta, compressed
       or full, and its bytes). A new table only: reports from before carry no transfer, so
       there is nothing to fill.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "migrate", "schema_version"]

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgeship.toolkit.store_schema import desired_models, desired_states, metadata, store_meta

SCHEMA_VERSION = 3

ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "devices": ("models_reported",),
    "telemetry": ("serving_version",),
}
"""Columns added to tables that existed before, by table (each nullable)."""


def schema_version(conn: Connection) -> int:
    """The version recorded in the store (1: a store from before versions were recorded)."""
    value = conn.execute(sa.select(store_meta.c.value).where(store_meta.c.key == "schema")).scalar()
    return int(value) if value is not None else 1


def _add_columns(conn: Connection) -> list[str]:
    done = []
    inspector = sa.inspect(conn)
    for table_name, names in ADDED_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table_name)}
        for name in names:
            if name in have:
                continue
            column = metadata.tables[table_name].c[name]
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE {table_name} ADD COLUMN {name} {kind}'))
            done.append(f"{table_name}.{name}")
    return done


def _fill_desired_models(conn: Connection) -> int:
    """Each device's latest desired state becomes its one desired model (schema 1 named one)."""
    latest = (sa.select(desired_states.c.device_id, sa.func.max(desired_states.c.sequence).label("seq"))
              .group_by(desired_states.c.device_id).subquery())
    rows = conn.execute(sa.select(desired_states).join(
        latest, sa.and_(latest.c.device_id == desired_states.c.device_id,
                        latest.c.seq == desired_states.c.sequence))).mappings().all()
    present = {(d, m) for d, m in conn.execute(sa.select(desired_models.c.device_id, desired_models.c.model))}
    new = [{"device_id": r["device_id"], "model": r["name"], "fleet": r["fleet"], "version": r["version"],
            "serving_version": None, "action": r["action"], "rollout_id": r["rollout_id"],
            "abtest_id": r["abtest_id"], "deployment": r["deployment"], "sequence": r["sequence"],
            "updated_at": r["issued_at"]} for r in rows if (r["device_id"], r["name"]) not in present]
    if new:
        conn.execute(sa.insert(desired_models), new)
    return len(new)


def migrate(engine: Engine) -> list[str]:
    """Create, extend and fill the schema up to :data:`SCHEMA_VERSION`; returns what it did.

    Two processes opening the same store at once (the controller and a CLI command) may race:
    the one whose transaction fails tries once more and then finds the work done."""
    try:
        return _migrate(engine)
    except sa.exc.DBAPIError:
        return _migrate(engine)


def _migrate(engine: Engine) -> list[str]:
    done: list[str] = []
    with engine.begin() as conn:
        fresh = not sa.inspect(conn).has_table("devices")
        metadata.create_all(conn)
        if fresh:
            conn.execute(sa.insert(store_meta).values(key="schema", value=str(SCHEMA_VERSION)))
            return ["created"]
        done += _add_columns(conn)
        version = schema_version(conn)
        if version < 2:
            copied = _fill_desired_models(conn)
            done.append(f"desired_models: {copied} rows from desired_states")
        if version < SCHEMA_VERSION:
            conn.execute(sa.delete(store_meta).where(store_meta.c.key == "schema"))
            conn.execute(sa.insert(store_meta).values(key="schema", value=str(SCHEMA_VERSION)))
            done.append(f"schema {version} -> {SCHEMA_VERSION}")
    return done
