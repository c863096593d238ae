"""The controller's Prometheus page: the text exposition written by a pure function, and a small
HTTP server for it (docs/fleet.md, "Metrics"). No client library: the format is a few lines of text,
and the figures come from the store and the controller's counters at scrape time."""

from __future__ import annotations

__all__ = ["INGESTED_KINDS", "MetricsServer", "render_metrics"]

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram
from edgeship.ota.topics import EVENTS, REPORTED, STATUS, TELEMETRY

log = logging.getLogger(__name__)

INGESTED_KINDS = (REPORTED, STATUS, EVENTS, TELEMETRY)
"""The topic kinds the controller ingests (and counts per kind)."""


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value: Optional[float]) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, float) and value != value:  # NaN
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_metrics(summary: Mapping[str, Mapping[str, Any]], rollouts: Sequence[Mapping[str, Any]],
                   stats: Mapping[str, float], window_s: float) -> str:
    """The Prometheus text exposition (format 0.0.4) of the fleet and the controller. Pure.

    Args:
        summary: :meth:`FleetStore.fleet_summary` (per fleet: devices, online, versions, requests,
            errors and the merged latency histogram of the last ``window_s`` seconds).
        rollouts: :meth:`FleetStore.list_rollouts` rows (id, fleet, name, version, state, stage,
            devices: per-status counts).
        stats: the controller's own counters (:meth:`ControllerStats.snapshot`).
    """
    out: List[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[Tuple[Dict[str, Any], Optional[float]]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(**labels)} {_number(value)}")

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
    family("edgeship_fleet_requests", "gauge", f"Inference requests reported over the last {window_s:g} s.",
           [({"fleet": f}, summary[f]["requests"]) for f in fleets])
    family("edgeship_fleet_errors", "gauge", f"Inference errors reported over the last {window_s:g} s.",
           [({"fleet": f}, summary[f]["errors"]) for f in fleets])
    family("edgeship_fleet_error_rate", "gauge", f"Errors per request over the last {window_s:g} s.",
           [({"fleet": f}, (summary[f]["errors"] / summary[f]["requests"]) if summary[f]["requests"] else None)
            for f in fleets])
    quantile_samples = []
    for f in fleets:
        histogram: LatencyHistogram = summary[f]["latency"]
        for q in (0.5, 0.95, 0.99):
            quantile_samples.append(({"fleet": f, "quantile": q}, histogram.quantile_ms(q)))
    family("edgeship_fleet_latency_ms", "gauge",
           f"Fleet-wide inference latency quantiles (ms) from the devices' merged histograms, last {window_s:g} s.",
           quantile_samples)
    bucket_samples: List[Tuple[Dict[str, Any], Optional[float]]] = []
    for f in fleets:
        histogram = summary[f]["latency"]
        running = 0
        for bound, count in zip(LATENCY_BUCKETS_MS, histogram.counts):
            running += count
            bucket_samples.append(({"fleet": f, "le": bound}, running))
        bucket_samples.append(({"fleet": f, "le": "+Inf"}, histogram.count))
    out.append(f"# HELP edgeship_fleet_latency_window_ms Merged latency histogram of the last {window_s:g} s "
               "(cumulative buckets, ms).")
    out.append("# TYPE edgeship_fleet_latency_window_ms histogram")
    for labels, value in bucket_samples:
        out.append(f"edgeship_fleet_latency_window_ms_bucket{_labels(**labels)} {_number(value)}")
    for f in fleets:
        histogram = summary[f]["latency"]
        out.append(f"edgeship_fleet_latency_window_ms_sum{_labels(fleet=f)} {_number(float(histogram.total_ms))}")
        out.append(f"edgeship_fleet_latency_window_ms_count{_labels(fleet=f)} {histogram.count}")
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
    counters = [
        ("edgeship_controller_messages_total", "counter", "MQTT messages received, per kind.", "received"),
        ("edgeship_controller_messages_rejected_total", "counter",
         "Messages dropped as malformed, oversized, unknown or mis-addressed, per kind.", "rejected"),
    ]
    for name, kind, help_text, prefix in counters:
        family(name, kind, help_text, [({"kind": k}, stats.get(f"{prefix}.{k}", 0))
                                       for k in INGESTED_KINDS + ("other",)])
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
        ("edgeship_controller_blocks_sent_total", "counter", "Blocks served to devices.", "blocks_sent"),
        ("edgeship_controller_block_bytes_sent_total", "counter", "Block bytes served to devices.",
         "block_bytes_sent"),
        ("edgeship_controller_tick_seconds", "gauge", "Duration of the last reconcile tick.", "tick_s"),
        ("edgeship_controller_ticks_total", "counter", "Reconcile ticks run.", "ticks"),
        ("edgeship_controller_timestamp_expires_in_seconds", "gauge",
         "Seconds until the release repository's timestamp metadata expires.", "timestamp_expires_in_s"),
        ("edgeship_controller_connected", "gauge", "1 while connected to the broker.", "connected"),
    ]
    for name, kind, help_text, key in singles:
        family(name, kind, help_text, [({}, stats.get(key))] if key in stats else [])
    return "\n".join(out) + "\n"



class MetricsServer:
    """``GET /metrics`` (and ``/``) answered with ``page()``; anything else 404; a failing page 503."""

    def __init__(self, host: str, port: int, page: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = page().encode("utf-8")
                except Exception as exc:  # the store may be busy or gone: say so, do not die
                    log.warning("metrics scrape failed: %s", exc)
                    self.send_error(503, "metrics unavailable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise BadInputError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="controller-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
