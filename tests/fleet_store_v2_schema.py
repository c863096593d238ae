"""The fleet store's tables as the previous release (schema 2: many models per device, no record of
bytes) created them, frozen here so the migration to schema 3 is tested on a store that code really
made (tests/test_fleet_store_migration.py). Do not edit: it is a record of the past."""

from __future__ import annotations

import sqlalchemy as sa

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
