"""The controller's Prometheus page: the text exposition written by a pure function, and a small
HTTP server for it (docs/fleet.md, "Metrics"). The format is written by the same
:mod:`edgeship.ota.prometheus` as the agent's page; the figures come from the store and the
controller's counters at scrape time."""

from __future__ import annotations

__all__ = ["INGESTED_KINDS", "FleetCounters", "MetricsServer", "WINDOW_QUANTILES", "render_metrics"]

import logging
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from edgeship.ota.errors import BadInputError
from edgeship.ota.prometheus import CONTENT_TYPE, Exposition, latency_seconds
from edgeship.ota.protocol import TRANSFER_KINDS
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import EVENTS, REPORTED, STATUS, TELEMETRY
from edgeship.toolkit.blockserver import STREAM_KINDS
from edgeship.toolkit.rollouts import RolloutState

log = logging.getLogger(__name__)

INGESTED_KINDS = (REPORTED, STATUS, EVENTS, TELEMETRY)
"""The topic kinds the controller ingests (and counts per kind)."""


class FleetCounters:
    """Cumulative serving figures per (fleet, bundle, version), summed from the telemetry this
    controller ingested since it started.

    Prometheus wants counters that only grow (``rate()`` reads any fall as a reset), and the
    store's window of telemetry falls as rows age out: so the counters are kept here, in the
    process, and start from zero with it, as every Prometheus counter does. Replicas each count
    what their shared subscription delivered; ``sum without (instance)`` adds them up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(self, fleet: str, bundle: Mapping[str, str] | None, requests: int, errors: int,
            latency: LatencyHistogram) -> None:
        key = (fleet, (bundle or {}).get("name", ""), (bundle or {}).get("version", ""))
        with self._lock:
            entry = self._series.setdefault(key, {"requests": 0, "errors": 0, "latency": LatencyHistogram()})
            entry["requests"] += requests
            entry["errors"] += errors
            entry["latency"] = entry["latency"].merge(latency)

    def snapshot(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        with self._lock:
            return {key: dict(value) for key, value in self._series.items()}


WINDOW_QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
"""The latency quantiles published as windowed gauges (one metric each: a ``quantile`` label is
reserved for summaries)."""


def _version_labels(fleet: str, bundle: str, version: str) -> dict[str, Any]:
    # ``bundle`` is the model's name: a multi-model device's telemetry arrives per model, so each
    # model of a device adds to its own series (docs/fleet.md, "Many models per device")
    return {"fleet": fleet, "bundle": bundle, "version": version}


def render_metrics(summary: Mapping[str, Mapping[str, Any]], rollouts: Sequence[Mapping[str, Any]],
                   stats: Mapping[str, float], window_s: float,
                   counters: Mapping[tuple[str, str, str], Mapping[str, Any]] | None = None,
                   rollout_states: Mapping[tuple[str, str], int] | None = None,
                   transfers: Mapping[tuple[str, str], tuple[int, int]] | None = None) -> str:
    """The Prometheus text exposition (format 0.0.4) of the fleet and the controller. Pure.

    Names follow Prometheus' conventions, checked by ``promtool check metrics`` in the tests: base
    units (seconds), ``_total`` on counters, no ``quantile`` label outside a summary. Figures over
    the recent window are gauges named ``..._window_...`` (they fall as telemetry ages out);
    counters and the latency histogram only grow (:class:`FleetCounters`).

    Args:
        summary: :meth:`FleetStore.fleet_summary` (per fleet: devices, online, versions, and per
            ``(bundle, version)`` the requests, errors, drift and merged latency histogram of the
            last ``window_s`` seconds).
        rollouts: :meth:`FleetStore.list_rollouts` rows (id, fleet, name, version, state, stage,
            devices: per-status counts).
        stats: the controller's own counters (:meth:`ControllerStats.snapshot`).
        counters: :meth:`FleetCounters.snapshot`: cumulative requests, errors and latency.
        rollout_states: rollouts per (fleet, state), all of them (:meth:`FleetStore.rollout_state_counts`).
        transfers: (updates, bytes) per (fleet, transfer kind), every update the store holds
            (:meth:`FleetStore.transfer_totals`).
    """
    page = Exposition()
    family = page.family
    fleets = sorted(summary)
    family("edgeship_devices", "gauge", "Devices known to the controller.",
           [({"fleet": f}, summary[f]["devices"]) for f in fleets])
    family("edgeship_devices_online", "gauge", "Devices whose retained status is online.",
           [({"fleet": f}, summary[f]["online"]) for f in fleets])
    version_samples = []
    for f in fleets:
        for key, count in sorted(summary[f]["versions"].items()):
            name, _, version = key.partition(":")
            version_samples.append(({"fleet": f, "bundle": name if version else "", "version": version}, count))
    family("edgeship_devices_by_version", "gauge", "Devices per active bundle and version (empty: none yet).",
           version_samples)

    window = [(_version_labels(f, bundle, version), entry) for f in fleets
              for (bundle, version), entry in sorted(summary[f].get("by_version", {}).items())]
    family("edgeship_fleet_window_requests", "gauge",
           f"Inference requests reported over the last {window_s:g} s, per bundle version.",
           [(labels, entry["requests"]) for labels, entry in window])
    family("edgeship_fleet_window_errors", "gauge",
           f"Inference errors (the model's own) reported over the last {window_s:g} s, per bundle version.",
           [(labels, entry["errors"]) for labels, entry in window])
    family("edgeship_fleet_window_error_ratio", "gauge",
           f"Errors per request over the last {window_s:g} s (NaN: no request).",
           [(labels, entry["errors"] / entry["requests"] if entry["requests"] else None) for labels, entry in window])
    for q, tag in WINDOW_QUANTILES:
        family(f"edgeship_fleet_window_latency_{tag}_seconds", "gauge",
               f"{tag} inference latency over the last {window_s:g} s, from the devices' merged histograms.",
               [(labels, None if (v := entry["latency"].quantile_ms(q)) is None else v / 1000.0)
                for labels, entry in window])
    family("edgeship_fleet_window_drift_max", "gauge",
           f"Largest input drift score any device reported over the last {window_s:g} s (NaN: none).",
           [(labels, entry.get("drift_max")) for labels, entry in window])

    cumulative = sorted((counters or {}).items())
    family("edgeship_fleet_requests_total", "counter",
           "Inference requests reported by devices since this controller started, per bundle version.",
           [(_version_labels(*key), entry["requests"]) for key, entry in cumulative])
    family("edgeship_fleet_errors_total", "counter",
           "Inference errors (the model's own) reported since this controller started, per bundle version.",
           [(_version_labels(*key), entry["errors"]) for key, entry in cumulative])
    page.histogram("edgeship_fleet_latency_seconds",
                   "Inference latency reported by devices since this controller started (merged fixed buckets).",
                   [(_version_labels(*key), latency_seconds(entry["latency"])) for key, entry in cumulative])
    # What devices say came over the wire, per transfer kind. Store totals (its rows are written once,
    # never changed), so they only grow and every replica reports the same figure: aggregate replicas
    # with max, not sum. Every kind of every fleet is listed, zeros included, so rate() starts at once.
    moved = dict(transfers or {})
    transfer_keys = [(fleet, kind) for fleet in sorted(set(fleets) | {f for f, _ in moved}) for kind in TRANSFER_KINDS]
    transfer_keys += sorted(key for key in moved if key not in transfer_keys)
    family("edgeship_fleet_transfers_total", "counter",
           "Updates whose bundle devices reported fetching, per transfer kind (delta, compressed, full).",
           [({"fleet": f, "kind": k}, moved.get((f, k), (0, 0))[0]) for f, k in transfer_keys])
    family("edgeship_fleet_transfer_bytes_total", "counter",
           "Bytes devices reported receiving for their updates (every try), per transfer kind.",
           [({"fleet": f, "kind": k}, moved.get((f, k), (0, 0))[1]) for f, k in transfer_keys])
    # Every state of every fleet, zeros included: an alert on a change (the first ABORTED) needs the
    # series to exist before it changes.
    states = dict(rollout_states or {})
    rollout_fleets = sorted(set(fleets) | {fleet for fleet, _ in states})
    family("edgeship_rollouts", "gauge", "Rollouts per state (all the store holds).",
           [({"fleet": fleet, "state": state.value}, states.get((fleet, state.value), 0))
            for fleet in rollout_fleets for state in RolloutState])
    rollout_samples = []
    stage_samples = []
    for row in rollouts:
        base = {"rollout": row["id"], "fleet": row["fleet"], "bundle": row["name"], "version": row["version"],
                "state": row["state"]}
        stage_samples.append((base, int(row["stage"]) + 1))
        for status, count in sorted((row.get("devices") or {}).items()):
            rollout_samples.append(({**base, "status": status}, count))
    family("edgeship_rollout_stage", "gauge", "Current stage of each rollout (1-based).", stage_samples)
    family("edgeship_rollout_devices", "gauge", "Devices of each rollout per status.", rollout_samples)
    per_kind = [
        ("edgeship_controller_messages_total", "counter", "MQTT messages received, per kind.", "received"),
        ("edgeship_controller_messages_rejected_total", "counter",
         "Messages dropped as malformed, oversized, unknown or mis-addressed, per kind.", "rejected"),
    ]
    for name, kind, help_text, prefix in per_kind:
        family(name, kind, help_text, [({"kind": k}, stats.get(f"{prefix}.{k}", 0))
                                       for k in INGESTED_KINDS + ("other",)])
    family("edgeship_controller_block_bytes_sent_total", "counter",
           "Block bytes this controller's block server served, per stream kind (delta, compressed, full bundle, "
           "TUF metadata).", [({"kind": k}, stats.get(f"block_bytes_sent.{k}", 0)) for k in STREAM_KINDS])
    singles = [
        ("edgeship_controller_ingested_total", "counter", "Messages written to the store.", "ingested"),
        ("edgeship_controller_ingest_batches_total", "counter", "Store transactions of the ingest writer.",
         "batches"),
        ("edgeship_controller_ingest_dropped_total", "counter",
         "Messages dropped because the ingest queue was full or the store refused them.", "ingest_dropped"),
        ("edgeship_controller_ingest_queue", "gauge", "Messages waiting for the ingest writer.", "queue_depth"),
        ("edgeship_controller_ingest_lag_seconds", "gauge",
         "Age of the oldest message of the last ingested batch when it was written.", "ingest_lag_s"),
        ("edgeship_controller_ingest_lag_max_seconds", "gauge", "Largest ingest lag seen.", "ingest_lag_max_s"),
        ("edgeship_controller_desired_published_total", "counter", "Signed desired states published.",
         "desired_published"),
        ("edgeship_controller_action_errors_total", "counter",
         "Outbox actions that could not be carried out (not published bundle, signing or publish failure).",
         "action_errors"),
        ("edgeship_controller_reports_reread_total", "counter",
         "Retained reports read again from silent devices with an update in flight (lost reports' second chance).",
         "reports_reread"),
        ("edgeship_controller_blocks_sent_total", "counter", "Blocks served to devices.", "blocks_sent"),
        ("edgeship_controller_transfer_records_dropped_total", "counter",
         "Malformed transfer records dropped from reports that were otherwise accepted.", "transfer_dropped"),
        ("edgeship_controller_tick_seconds", "gauge", "Duration of the last reconcile tick.", "tick_s"),
        ("edgeship_controller_ticks_total", "counter", "Reconcile ticks run.", "ticks"),
        ("edgeship_controller_timestamp_expires_in_seconds", "gauge",
         "Seconds until the release repository's timestamp metadata expires.", "timestamp_expires_in_s"),
        ("edgeship_controller_connected", "gauge", "1 while connected to the broker.", "connected"),
    ]
    for name, kind, help_text, key in singles:
        family(name, kind, help_text, [({}, stats.get(key))] if key in stats else [])
    return page.text()


class MetricsServer:
    """``GET /metrics`` (and ``/``) answered with ``page()``; anything else 404; a failing page 503."""

    def __init__(self, host: str, port: int, page: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = page().encode("utf-8")
                except Exception as exc:  # noqa: BLE001 - the store may be busy or gone: say so, do not die
                    log.warning("metrics scrape failed: %s", exc)
                    self.send_error(503, "metrics unavailable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise BadInputError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="controller-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
