"""What the engines, the metrics and the commands read from the fleet store: telemetry merged
per fleet, device and version, the rollout engine's device snapshot (per model name), what
multi-model devices report per model. A mixin of :class:`~edgeship.toolkit.store.FleetStore`
(it needs the store's engine and device selection)."""

from __future__ import annotations

__all__ = ["FleetReads"]

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram
from edgeship.toolkit.abtest import TelemetryWindow
from edgeship.toolkit.report_reread import TERMINAL_UPDATE_STATES, StaleDevice
from edgeship.toolkit.rollouts import DeviceSnapshot, VersionTelemetry
from edgeship.toolkit.store_schema import (
    device_models,
    devices,
    events,
    latency_from_json,
    rollout_devices,
    rollouts,
    telemetry,
    transfers,
)


class FleetReads:
    """Read-only queries over devices and telemetry (see the module docstring)."""

    engine: Engine

    def _selected(self, fleet: str | None, selection: Sequence[tuple[str, str]]) -> Any:
        raise NotImplementedError  # FleetStore's

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
                histogram = latency_from_json(latency)
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
                entry["latency"] = entry["latency"].merge(latency_from_json(latency))
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

    def _telemetry_rows(self, conn: Connection, ids: Sequence[str], since: float,
                        until: float | None = None) -> Iterable[Any]:
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            query = (sa.select(telemetry.c.device_id, telemetry.c.bundle_name, telemetry.c.bundle_version,
                               telemetry.c.requests, telemetry.c.errors, telemetry.c.latency,
                               telemetry.c.feedback_correct, telemetry.c.feedback_total)
                     .where(telemetry.c.device_id.in_(chunk), telemetry.c.received_at >= since))
            if until is not None:
                query = query.where(telemetry.c.received_at < until)
            yield from conn.execute(query)

    def fleet_snapshot(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                       telemetry_since: float | None = None, model: str | None = None) -> list[DeviceSnapshot]:
        """The rollout engine's input: the selected devices, with their telemetry per version merged
        over the windows received since ``telemetry_since`` (none if None).

        ``model``: each device as it serves that model name. A multi-model device reports each model
        on its own (its other models are no concern of this rollout); a device of one model is read
        from its one active model, as before."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._selected(fleet, selection)).mappings().all()
            per_model: dict[str, Any] = {}
            if model is not None:
                per_model = self._model_rows(conn, [r["id"] for r in rows if r["models_reported"]], model)
            merged: dict[tuple[str, str, str], list[Any]] = {}
            if telemetry_since is not None and rows:
                for device_id, name, version, requests, errors, latency, _c, _t in self._telemetry_rows(
                        conn, [r["id"] for r in rows], telemetry_since):
                    if name is None or version is None:
                        continue
                    slot = merged.setdefault((device_id, name, version), [0, 0, [0] * (len(LATENCY_BUCKETS_MS) + 1),
                                                                         0.0])
                    hist = latency_from_json(latency)
                    slot[0] += requests
                    slot[1] += errors
                    slot[2] = [a + b for a, b in zip(slot[2], hist.counts)]
                    slot[3] += hist.total_ms
        per_device: dict[str, list[VersionTelemetry]] = {}
        for (device_id, name, version), (requests, errors, counts, total) in sorted(merged.items()):
            per_device.setdefault(device_id, []).append(
                VersionTelemetry(name, version, requests, errors, LatencyHistogram(counts, total)))
        snapshots = []
        for r in rows:
            if model is not None and r["models_reported"]:
                m = per_model.get(r["id"], {})
                state = {"active_name": model if m.get("active_version") else None,
                         "active_version": m.get("active_version"), "update_state": m.get("update_state"),
                         "update_name": model if m.get("update_state") else None,
                         "update_version": m.get("update_version")}
            else:
                state = {k: r[k] for k in ("active_name", "active_version", "update_state", "update_name",
                                           "update_version")}
            snapshots.append(DeviceSnapshot(device=r["id"], online=bool(r["online"]), reported_at=r["reported_at"],
                                            telemetry=tuple(per_device.get(r["id"], ())), **state))
        return snapshots

    @staticmethod
    def _model_rows(conn: Connection, ids: Sequence[str], model: str | None = None) -> dict[str, Any]:
        """``device_models`` rows of ``ids``: device -> row (of ``model``), or device -> {name: row}."""
        found: dict[str, Any] = {}
        for start in range(0, len(ids), 500):
            query = sa.select(device_models).where(device_models.c.device_id.in_(list(ids[start:start + 500])))
            if model is not None:
                query = query.where(device_models.c.model == model)
            for r in conn.execute(query).mappings():
                if model is not None:
                    found[r["device_id"]] = dict(r)
                else:
                    found.setdefault(r["device_id"], {})[r["model"]] = dict(r)
        return found

    def device_forms(self, ids: Sequence[str]) -> dict[str, tuple[bool, str | None]]:
        """Each known device: (whether its agent serves many models, its agent version)."""
        found: dict[str, tuple[bool, str | None]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = sa.select(devices.c.id, devices.c.models_reported, devices.c.agent_version).where(
                    devices.c.id.in_(list(ids[start:start + 500])))
                for device, multi, version in conn.execute(query):
                    found[device] = (bool(multi), version)
        return found

    def device_models_of(self, ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """What multi-model devices report per model: device -> model name -> row."""
        with self.engine.connect() as conn:
            return self._model_rows(conn, list(ids))

    def telemetry_windows(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                          since: float = 0.0, until: float | None = None) -> list[TelemetryWindow]:
        """Every telemetry window of the selected devices received since ``since`` (and before
        ``until``, if given): the A/B report's input, and the console's rollout health, which reads
        only the windows that arrived since its last reading."""
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(self._selected(fleet, selection).subquery().c.id))]
            return [TelemetryWindow(device_id, name, version, requests, errors, latency_from_json(latency),
                                    correct or 0, total or 0)
                    for device_id, name, version, requests, errors, latency, correct, total
                    in self._telemetry_rows(conn, ids, since, until)]

    def stale_in_flight(self, reported_before: float, fleet: str | None = None,
                        limit: int = 20_000) -> list[StaleDevice]:
        """Devices whose record says an update is in flight and whose last report came before
        ``reported_before`` (or never), oldest report first: the device's own update state (or one of
        its models') is not a terminal one, or a RUNNING/PAUSED rollout holds it ASSIGNED or
        IN_PROGRESS. The input of :func:`~edgeship.toolkit.report_reread.rereads_due`."""
        terminal = sorted(TERMINAL_UPDATE_STATES)
        silent = sa.or_(devices.c.reported_at.is_(None), devices.c.reported_at < reported_before)
        own = sa.and_(devices.c.update_state.is_not(None), sa.func.upper(devices.c.update_state).not_in(terminal))
        model_in_flight = sa.exists().where(device_models.c.device_id == devices.c.id,
                                            device_models.c.update_state.is_not(None),
                                            sa.func.upper(device_models.c.update_state).not_in(terminal))
        assigned = sa.exists().where(rollout_devices.c.device_id == devices.c.id,
                                     rollout_devices.c.status.in_(["ASSIGNED", "IN_PROGRESS"]),
                                     rollout_devices.c.rollout_id == rollouts.c.id,
                                     rollouts.c.state.in_(["RUNNING", "PAUSED"]))
        query = (sa.select(devices.c.id, devices.c.fleet, devices.c.reported_at)
                 .where(silent, sa.or_(own, model_in_flight, assigned))
                 .order_by(devices.c.reported_at, devices.c.id).limit(limit))
        if fleet is not None:
            query = query.where(devices.c.fleet == fleet)
        with self.engine.connect() as conn:
            return [StaleDevice(device, fleet_, at) for device, fleet_, at in conn.execute(query)]

    # -- the record of bytes ------------------------------------------------------------------

    def transfer_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(fleet, kind) -> (updates, bytes) over every transfer the store holds (the metrics'
        counters: rows are written once and never changed, so these only grow)."""
        query = (sa.select(transfers.c.fleet, transfers.c.kind, sa.func.count(), sa.func.sum(transfers.c.bytes))
                 .group_by(transfers.c.fleet, transfers.c.kind))
        with self.engine.connect() as conn:
            return {(fleet, kind): (int(count), int(total or 0)) for fleet, kind, count, total in conn.execute(query)}

    def last_transfers(self, ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """device -> model -> its last transfer (kind, bytes, full_bytes, base_version, fallback,
        version, reported_at)."""
        found: dict[str, dict[str, dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = (sa.select(transfers).where(transfers.c.device_id.in_(list(ids[start:start + 500])))
                         .order_by(transfers.c.reported_at))
                for r in conn.execute(query).mappings():
                    found.setdefault(r["device_id"], {})[r["model"]] = _transfer_doc(r)
        return found

    def rollout_transfers(self, rollout_id: str, name: str, version: str,
                          device_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """What a rollout's updates moved: :func:`~edgeship.toolkit.transfers.summarize` over the
        transfers of its devices (``device_ids``, or the rollout's own device rows: one query, which
        the console's rollout page runs on every refresh at 10,000 devices) to its model and version
        (the rollout's own, or ones that do not name a deployment)."""
        from edgeship.toolkit.transfers import summarize

        wanted = sa.and_(transfers.c.model == name, transfers.c.version == version,
                         sa.or_(transfers.c.deployment.is_(None), transfers.c.deployment == rollout_id))
        rows: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            if device_ids is None:
                members = sa.select(rollout_devices.c.device_id).where(rollout_devices.c.rollout_id == rollout_id)
                rows = [dict(r) for r in conn.execute(
                    sa.select(transfers).where(transfers.c.device_id.in_(members), wanted)).mappings()]
            else:
                for start in range(0, len(device_ids), 500):
                    query = sa.select(transfers).where(
                        transfers.c.device_id.in_(list(device_ids[start:start + 500])), wanted)
                    rows += [dict(r) for r in conn.execute(query).mappings()]
        return summarize(rows)


def _transfer_doc(row: Any) -> dict[str, Any]:
    return {"kind": row["kind"], "bytes": int(row["bytes"]), "full_bytes": int(row["full_bytes"]),
            "base_version": row["base_version"], "fallback": row["fallback"], "version": row["version"],
            "reported_at": row["reported_at"]}
