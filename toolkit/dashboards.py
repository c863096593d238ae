"""Grafana dashboards as code: the fleet dashboard (the controller's metrics) and the device
dashboard (one agent's ``/metrics``), built as data by pure functions.

The JSON files shipped in ``toolkit/monitoring/`` are this module's output (``python -m
edgeship.toolkit.dashboards toolkit/monitoring`` rewrites them; a test keeps them equal), so a
change to a panel is a reviewed change to code, and the tests check every query against the
metric names the controller and the agent really export (docs/monitoring.md).
"""

from __future__ import annotations

__all__ = ["device_dashboard", "fleet_dashboard", "write_dashboards"]

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str = "", **options: Any) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, **options}


def _panel(pid: int, kind: str, title: str, targets: Sequence[dict[str, Any]], grid: Sequence[int],
           unit: str | None = None, description: str | None = None,
           defaults: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    x, y, w, h = grid
    field_defaults: dict[str, Any] = dict(defaults or {})
    if unit:
        field_defaults["unit"] = unit
    panel: dict[str, Any] = {
        "id": pid, "type": kind, "title": title, "datasource": _DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"refId": chr(ord("A") + i), "datasource": _DATASOURCE, **t} for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": field_defaults, "overrides": []},
        "options": dict(options or {}),
    }
    if description:
        panel["description"] = description
    return panel


def _latency_quantiles(bucket: str, selector: str, by: str, legend: str) -> list[dict[str, Any]]:
    """p50, p95 and p99 of a latency histogram, grouped ``by`` (one target each)."""
    return [_target(f"histogram_quantile({q}, sum by ({by}, le) (rate({bucket}{{{selector}}}[$__rate_interval])))",
                    f"p{round(q * 100)} {legend}") for q in (0.5, 0.95, 0.99)]


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": _DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1, "hide": 0}


def _dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
               panels: list[dict[str, Any]]) -> dict[str, Any]:
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
                  "current": {}, "hide": 0}
    return {"uid": uid, "title": title, "description": description, "tags": ["edgeship"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
            "timezone": "browser", "graphTooltip": 1, "annotations": {"list": []},
            "templating": {"list": [datasource, *variables]}, "panels": panels}


_RED_AT_ONE = {"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                            {"color": "red", "value": 1}]}}


def fleet_dashboard() -> dict[str, Any]:
    """The fleet as the controller sees it: devices, versions, rollouts, serving health, and the
    controller itself. Filtered by fleet and bundle."""
    f = 'fleet=~"$fleet"'
    v = f'{f},bundle=~"$bundle"'
    rate = "[$__rate_interval]"
    by_version = "{{bundle}} {{version}}"
    panels = [
        _panel(1, "stat", "Devices", [_target(f"sum(edgeship_devices{{{f}}})", "devices")], (0, 0, 4, 4)),
        _panel(2, "stat", "Online", [_target(f"sum(edgeship_devices_online{{{f}}})", "online")], (4, 0, 4, 4)),
        _panel(3, "stat", "Offline",
               [_target(f"sum(edgeship_devices{{{f}}}) - sum(edgeship_devices_online{{{f}}})", "offline")],
               (8, 0, 4, 4), defaults=_RED_AT_ONE),
        _panel(4, "bargauge", "Devices by version",
               [_target(f"sum by (bundle, version) (edgeship_devices_by_version{{{f}}})", by_version)],
               (12, 0, 12, 8), description="The active bundle version of each device; empty labels: nothing installed yet."),
        _panel(5, "stat", "Rollouts aborted", [_target(f'sum(edgeship_rollouts{{{f},state="ABORTED"}})', "aborted")],
               (0, 4, 4, 4), defaults=_RED_AT_ONE),
        _panel(6, "stat", "Rollouts running", [_target(f'sum(edgeship_rollouts{{{f},state="RUNNING"}})', "running")],
               (4, 4, 4, 4)),
        _panel(7, "stat", "Rollouts completed",
               [_target(f'sum(edgeship_rollouts{{{f},state="COMPLETED"}})', "completed")], (8, 4, 4, 4)),
        _panel(8, "timeseries", "Requests per second, by version",
               [_target(f"sum by (bundle, version) (rate(edgeship_fleet_requests_total{{{v}}}{rate}))", by_version)],
               (0, 8, 12, 8), unit="reqps"),
        _panel(9, "timeseries", "Error ratio (the model's own failures), by version",
               [_target(f"sum by (bundle, version) (rate(edgeship_fleet_errors_total{{{v}}}{rate})) / "
                        f"sum by (bundle, version) (rate(edgeship_fleet_requests_total{{{v}}}{rate}))", by_version)],
               (12, 8, 12, 8), unit="percentunit",
               description="A caller's bad input is not counted: only failures of the model on valid input."),
        _panel(10, "timeseries", "Latency p50 / p95 / p99, by version",
               _latency_quantiles("edgeship_fleet_latency_seconds_bucket", v, "bundle, version", by_version),
               (0, 16, 12, 8), unit="s"),
        _panel(11, "heatmap", "Latency distribution",
               [_target(f"sum by (le) (increase(edgeship_fleet_latency_seconds_bucket{{{v}}}{rate}))", "{{le}}",
                        format="heatmap")], (12, 16, 12, 8), options={"calculate": False, "yAxis": {"unit": "s"}}),
        _panel(12, "timeseries", "Input drift (largest of any device, recent window)",
               [_target(f"edgeship_fleet_window_drift_max{{{v}}}", by_version)], (0, 24, 12, 8),
               description="How far the mean input lies from the bundle's golden inputs, in their standard deviations."),
        _panel(13, "table", "Rollouts under way",
               [_target(f"edgeship_rollout_stage{{{f}}}", format="table", instant=True),
                _target(f"sum by (rollout, status) (edgeship_rollout_devices{{{f}}})", format="table", instant=True)],
               (12, 24, 12, 8)),
        _panel(14, "timeseries", "Rollout devices by status",
               [_target(f"sum by (rollout, status) (edgeship_rollout_devices{{{f}}})", "{{rollout}} {{status}}")],
               (0, 32, 12, 8)),
        _panel(15, "timeseries", "Controller: messages per second",
               [_target(f"sum by (kind) (rate(edgeship_controller_messages_total{rate}))", "{{kind}}"),
                _target(f"sum by (kind) (rate(edgeship_controller_messages_rejected_total{rate}))", "rejected {{kind}}")],
               (12, 32, 12, 8), unit="ops"),
        _panel(16, "timeseries", "Controller: ingest lag and queue",
               [_target("max by (instance) (edgeship_controller_ingest_lag_seconds)", "lag {{instance}}"),
                _target("max by (instance) (edgeship_controller_ingest_queue)", "queue {{instance}}")], (0, 40, 12, 8)),
        _panel(17, "stat", "Controller connected", [_target("min(edgeship_controller_connected)", "connected")],
               (12, 40, 4, 4)),
        _panel(18, "stat", "Repository timestamp expires in",
               [_target("min(edgeship_controller_timestamp_expires_in_seconds)", "expires in")], (16, 40, 4, 4),
               unit="s"),
        _panel(19, "stat", "Desired states published",
               [_target(f"sum(rate(edgeship_controller_desired_published_total{rate}))", "published")],
               (20, 40, 4, 4), unit="ops"),
        _panel(20, "timeseries", "Update bytes per second, by transfer kind",
               [_target(f"max by (kind) (rate(edgeship_fleet_transfer_bytes_total{{{f}}}{rate}))", "reported {{kind}}"),
                _target(f"sum by (kind) (rate(edgeship_controller_block_bytes_sent_total{rate}))", "sent {{kind}}")],
               (0, 48, 12, 8), unit="Bps",
               description="Reported: what devices say arrived for their updates (delta, compressed, full; store "
                           "totals, the same on every replica, hence max). Sent: what the controllers' block "
                           "servers sent per stream kind (per replica, hence sum)."),
        _panel(21, "stat", "Updates by delta, share",
               [_target(f'sum(increase(edgeship_fleet_transfers_total{{{f},kind="delta"}}[1d])) / '
                        f"sum(increase(edgeship_fleet_transfers_total{{{f}}}[1d]))", "delta share")],
               (12, 48, 6, 4), unit="percentunit",
               description="Of the updates devices reported in the last day, the share that travelled as a delta "
                           "(low: devices lack a base, or no delta is published)."),
    ]
    variables = [_query_variable("fleet", "Fleet", "label_values(edgeship_devices, fleet)"),
                 _query_variable("bundle", "Bundle", 'label_values(edgeship_fleet_requests_total{fleet=~"$fleet"}, bundle)')]
    return _dashboard("edgeship-fleet", "edgeship: fleet",
                      "The fleet as the edgeship controller sees it (scrape the controller's --metrics-port).",
                      variables, panels)


def device_dashboard() -> dict[str, Any]:
    """One device, from its agent's ``/metrics`` (where a site scrapes its devices directly)."""
    i = 'instance=~"$instance"'
    rate = "[$__rate_interval]"
    by_model = "{{model}} {{version}}"
    panels = [
        _panel(1, "timeseries", "Predict requests per second",
               [_target(f"sum by (model, version) (rate(edgeship_predict_requests_total{{{i}}}{rate}))", by_model)],
               (0, 0, 12, 8), unit="reqps"),
        _panel(2, "timeseries", "Failed requests per second, by kind",
               [_target(f"sum by (model, kind) (rate(edgeship_predict_errors_total{{{i}}}{rate}))", "{{model}} {{kind}}")],
               (12, 0, 12, 8), unit="reqps"),
        _panel(3, "timeseries", "Latency p50 / p95 / p99",
               _latency_quantiles("edgeship_predict_latency_seconds_bucket", i, "model, version", by_model),
               (0, 8, 12, 8), unit="s"),
        _panel(4, "heatmap", "Latency distribution",
               [_target(f"sum by (le) (increase(edgeship_predict_latency_seconds_bucket{{{i}}}{rate}))", "{{le}}",
                        format="heatmap")], (12, 8, 12, 8), options={"calculate": False, "yAxis": {"unit": "s"}}),
        _panel(5, "timeseries", "The model's failures against callers' mistakes",
               [_target(f"sum by (model) (rate(edgeship_predict_model_failures_total{{{i}}}{rate}))",
                        "model failures {{model}}"),
                _target(f"sum by (model) (rate(edgeship_predict_caller_errors_total{{{i}}}{rate}))",
                        "caller errors {{model}}"),
                _target(f"sum by (model) (rate(edgeship_predict_nonfinite_input_total{{{i}}}{rate}))",
                        "non-finite from non-finite input {{model}}")],
               (0, 16, 12, 8), unit="ops",
               description="Only the model's own failures count against it (probation, rollouts); callers' 4xx and "
                           "NaN answers to NaN inputs are shown apart (docs/agent.md)."),
        _panel(6, "timeseries", "Predicted classes",
               [_target(f"sum by (model, class) (rate(edgeship_predict_class_total{{{i}}}{rate}))", "{{class}}")],
               (12, 16, 12, 8), unit="ops"),
        _panel(7, "timeseries", "Accuracy on feedback",
               [_target(f"sum by (model) (rate(edgeship_feedback_correct_total{{{i}}}{rate})) / "
                        f"sum by (model) (rate(edgeship_feedback_total{{{i}}}{rate}))", "{{model}}")],
               (0, 24, 12, 8), unit="percentunit"),
        _panel(8, "timeseries", "Mean input (drift)", [_target(f"edgeship_input_mean{{{i}}}", "{{model}}")],
               (12, 24, 12, 8)),
        _panel(9, "stat", "Model swaps", [_target(f"sum(edgeship_model_swaps_total{{{i}}})", "swaps")], (0, 32, 4, 4)),
        _panel(10, "stat", "Model loaded",
               [_target(f"max(edgeship_model_loaded_timestamp_seconds{{{i}}}) * 1000", "loaded")], (4, 32, 4, 4),
               unit="dateTimeFromNow"),
        _panel(11, "timeseries", "Temperature", [_target(f"edgeship_device_temperature_celsius{{{i}}}", "{{zone}}")],
               (8, 32, 8, 8), unit="celsius"),
        _panel(12, "timeseries", "Free disk", [_target(f"edgeship_disk_free_bytes{{{i}}}", "free")], (16, 32, 8, 8),
               unit="bytes"),
        _panel(13, "timeseries", "Agent memory", [_target(f"process_resident_memory_bytes{{{i}}}", "RSS")],
               (0, 40, 12, 8), unit="bytes"),
        _panel(14, "timeseries", "Agent CPU", [_target(f"rate(process_cpu_seconds_total{{{i}}}{rate})", "CPU")],
               (12, 40, 12, 8), unit="percentunit"),
        _panel(15, "timeseries", "HTTP connections",
               [_target(f"edgeship_http_connections{{{i}}}", "open"),
                _target(f"rate(edgeship_http_connections_refused_total{{{i}}}{rate})", "refused per second (503)")],
               (0, 48, 12, 8)),
    ]
    variables = [_query_variable("instance", "Device", "label_values(edgeship_predict_requests_total, instance)")]
    return _dashboard("edgeship-device", "edgeship: device",
                      "One device's agent (scrape its /metrics; see docs/monitoring.md for access).", variables, panels)


DASHBOARDS = {"grafana-fleet.json": fleet_dashboard, "grafana-device.json": device_dashboard}


def write_dashboards(folder: Path) -> list[Path]:
    """Write every dashboard's JSON into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in DASHBOARDS.items():
        path = folder / name
        path.write_text(json.dumps(build(), indent=1) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_dashboards(Path(sys.argv[1] if len(sys.argv) > 1 else "toolkit/monitoring")):
        print(written_path)
