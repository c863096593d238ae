"""The fleet store's tables (SQLAlchemy 2 Core) and the row helpers both halves of the store share.

See store.py for the store itself and docs/fleet.md for what each table holds.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_DB_URL",
    "LIVE_ROLLOUT_STATES",
    "abtests",
    "desired_sequences",
    "desired_models",
    "desired_states",
    "device_models",
    "device_tags",
    "devices",
    "events",
    "metadata",
    "model_rows",
    "outbox",
    "rollout_devices",
    "rollout_log",
    "rollouts",
    "store_meta",
    "telemetry",
    "transfer_rows",
    "transfers",
]

import json
from collections.abc import Mapping
from typing import Any

from edgeship.ota.errors import require_module
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.rollouts import RolloutState

require_module("sqlalchemy", "host")

import sqlalchemy as sa  # noqa: E402 - after the check that names the extra to install

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
    # True once the device reported a `models` map (a multi-model agent): it reads desired-state
    # schema 2. False/NULL: an agent of one model (schema 1 only).
    sa.Column("models_reported", sa.Boolean),
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
    sa.Column("serving_version", sa.BigInteger),
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

desired_models = sa.Table(
    # The device's current desired set: one row per model it must serve (schema 2's `models`).
    # A rollout or A/B test changes one row; the others are copied into the next document.
    "desired_models", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("model", _NAME, primary_key=True),
    sa.Column("fleet", _ID, nullable=False, index=True),
    sa.Column("version", _VERSION, nullable=False),
    sa.Column("serving_version", sa.BigInteger),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("rollout_id", _ID), sa.Column("abtest_id", _ID), sa.Column("deployment", sa.String(128)),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

device_models = sa.Table(
    # What a multi-model agent reports per model (reported.models); replaced by each report.
    "device_models", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("model", _NAME, primary_key=True),
    sa.Column("active_version", _VERSION), sa.Column("previous_version", _VERSION),
    sa.Column("serving_version", sa.BigInteger),
    sa.Column("update_state", sa.String(32)), sa.Column("update_version", _VERSION),
    sa.Column("update_detail", sa.Text),
    sa.Column("labels", sa.JSON),
    sa.Column("reported_at", sa.Float, nullable=False),
)

transfers = sa.Table(
    # How each update's bundle travelled (the reported update's ``transfer``): one row per device,
    # model and update, written once (a retained report repeats it). Rows are never updated, so
    # sums over the table only grow (the metrics' counters read them).
    "transfers", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("model", _NAME, primary_key=True),
    sa.Column("update_key", sa.String(64), primary_key=True),  # the agent's update id, else the version
    sa.Column("fleet", _ID, nullable=False),
    sa.Column("version", _VERSION, nullable=False),
    sa.Column("deployment", sa.String(128)),  # the rollout's id when a rollout sent it
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("full_bytes", sa.BigInteger, nullable=False),
    sa.Column("base_version", _VERSION),
    sa.Column("fallback", sa.String(256)),
    sa.Column("reported_at", sa.Float, nullable=False),
    sa.Index("ix_transfers_model_version", "model", "version"),
)

store_meta = sa.Table(
    "store_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
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


def bundle_ref(ref: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    if not ref:
        return None, None
    return ref.get("name"), ref.get("version")


def update_fields(update: Mapping[str, Any] | None) -> dict[str, Any]:
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


def latency_json(histogram: LatencyHistogram) -> dict[str, Any]:
    return {"counts": list(histogram.counts), "sum_ms": histogram.total_ms}


def latency_from_json(doc: Any) -> LatencyHistogram:
    if isinstance(doc, str):  # some drivers hand JSON back as text
        doc = json.loads(doc)
    return LatencyHistogram([int(c) for c in doc["counts"]], float(doc.get("sum_ms", 0.0)))




def json_value(value: Any) -> Any:
    """A JSON column's value (drivers that return it as text give a str)."""
    return json.loads(value) if isinstance(value, str) else value


def model_rows(device: str, models: Mapping[str, Mapping[str, Any]], at: float) -> list[dict[str, Any]]:
    """``device_models`` rows from a reported ``models`` map."""
    rows = []
    for name, entry in sorted(models.items()):
        active, previous = entry.get("active") or {}, entry.get("previous") or {}
        update = update_fields(entry.get("update"))
        rows.append({"device_id": device, "model": name, "active_version": active.get("version"),
                     "previous_version": previous.get("version"), "serving_version": entry.get("serving_version"),
                     "update_state": update["update_state"], "update_version": update["update_version"],
                     "update_detail": update["update_detail"], "labels": entry.get("labels"), "reported_at": at})
    return rows


def transfer_rows(fleet: str, device: str, update: Mapping[str, Any] | None, model: str | None,
                  version: str | None, at: float) -> list[dict[str, Any]]:
    """The ``transfers`` row of a reported update that carries a (checked) ``transfer``: [] or
    one row. ``model``/``version``: the model and version the update is about (from the update's
    bundle, else what the report names)."""
    transfer = (update or {}).get("transfer")
    if not isinstance(transfer, Mapping) or not model or not version:
        return []
    update_id = (update or {}).get("id")
    deployment = (update or {}).get("deployment")
    return [{"device_id": device, "model": str(model)[:64], "update_key": str(update_id or version)[:64],
             "fleet": fleet, "version": str(version)[:64],
             "deployment": str(deployment)[:128] if deployment else None, "kind": transfer["kind"],
             "bytes": int(transfer["bytes"]), "full_bytes": int(transfer["full_bytes"]),
             "base_version": transfer.get("base_version"), "fallback": transfer.get("fallback"),
             "reported_at": at}]
