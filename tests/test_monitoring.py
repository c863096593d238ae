"""Monitoring as code, checked with Prometheus' own promtool: the controller's and the agent's metrics
pages pass `promtool check metrics`, the alert rules load and fire on their cases (`promtool test rules`), and
every query of the shipped Grafana dashboards and alert rules is valid PromQL over metric names the
controller and the agent really export."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fixtures import TFServingClient

from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.controller_metrics import FleetCounters, render_metrics
from edgeship.toolkit.dashboards import DASHBOARDS, device_dashboard, fleet_dashboard

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "toolkit" / "monitoring"
ALERTS = MONITORING / "prometheus-alerts.yml"
METRIC = re.compile(r"\b((?:edgeship|process)_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60)


def families(text: str) -> set[str]:
    """The metric names a Prometheus page declares, histogram series names included."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return names


def controller_page() -> str:
    """A controller page with every family present: two fleets, versions, a rollout, counters."""
    slow, fast = LatencyHistogram(), LatencyHistogram()
    for value in [1.0] * 90 + [40.0] * 10:
        slow.observe(value)
    fast.observe(0.3)
    summary = {"plant": {"devices": 3, "online": 2, "versions": {"digits:1.0.0": 2, "none": 1}, "requests": 101,
                         "errors": 5, "latency": slow,
                         "by_version": {("digits", "1.0.0"): {"requests": 100, "errors": 5, "latency": slow,
                                                              "drift_max": 0.5},
                                        ("digits", "1.1.0"): {"requests": 1, "errors": 0, "latency": fast,
                                                              "drift_max": None}}}}
    counters = FleetCounters()
    counters.add("plant", {"name": "digits", "version": "1.0.0"}, 100, 5, slow)
    rollouts = [{"id": "r-1", "fleet": "plant", "name": "digits", "version": "1.1.0", "state": "RUNNING",
                 "stage": 1, "devices": {"SUCCEEDED": 1, "PENDING": 2}}]
    stats = {"received.telemetry": 10, "rejected.other": 1, "ingested": 10, "batches": 2, "ingest_dropped": 0,
             "queue_depth": 0, "ingest_lag_s": 0.1, "ingest_lag_max_s": 0.3, "desired_published": 4,
             "action_errors": 0, "blocks_sent": 3, "block_bytes_sent.delta": 1000, "block_bytes_sent.full": 2000,
             "block_bytes_sent.metadata": 40, "transfer_dropped": 1, "tick_s": 0.01, "ticks": 9,
             "timestamp_expires_in_s": 80000, "connected": 1}
    return render_metrics(summary, rollouts, stats, 60, counters=counters.snapshot(),
                          rollout_states={("plant", "RUNNING"): 1, ("plant", "ABORTED"): 2},
                          transfers={("plant", "delta"): (95, 4_750_000), ("plant", "compressed"): (5, 7_500_000)})


def queries_of(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.promtool
def test_controller_metrics_pass_promtool_check_metrics() -> None:
    result = promtool("check", "metrics", stdin=controller_page())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@pytest.mark.promtool
def test_transfer_and_block_byte_counters_pass_promtool_and_list_every_kind() -> None:
    """The record of bytes: what devices report per transfer kind (zeros included, so rate() has a
    series before the first delta), and what the block server sent per stream kind."""
    page = controller_page()
    result = promtool("check", "metrics", stdin=page)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = set(page.splitlines())
    assert {'edgeship_fleet_transfers_total{fleet="plant",kind="delta"} 95',
            'edgeship_fleet_transfers_total{fleet="plant",kind="full"} 0',
            'edgeship_fleet_transfer_bytes_total{fleet="plant",kind="compressed"} 7500000',
            'edgeship_controller_block_bytes_sent_total{kind="delta"} 1000',
            'edgeship_controller_block_bytes_sent_total{kind="compressed"} 0',
            'edgeship_controller_block_bytes_sent_total{kind="metadata"} 40',
            "edgeship_controller_transfer_records_dropped_total 1"} <= lines, page
    assert "# TYPE edgeship_fleet_transfer_bytes_total counter" in lines


@pytest.mark.promtool
def test_promtool_lint_fails_on_names_it_forbids() -> None:
    """The check above can fail: the names the page used to carry are refused."""
    bad = ("# HELP edgeship_fleet_latency_ms Latency.\n# TYPE edgeship_fleet_latency_ms gauge\n"
           'edgeship_fleet_latency_ms{quantile="0.95"} 3\n')
    result = promtool("check", "metrics", stdin=bad)
    assert result.returncode != 0 and "abbreviated units" in result.stdout + result.stderr


@pytest.mark.promtool
def test_alert_rules_load() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


@pytest.mark.promtool
def test_alert_rules_fire_on_their_cases_and_stay_quiet_on_near_misses() -> None:
    result = promtool("test", "rules", str(REPO / "tests" / "monitoring" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.promtool
@pytest.mark.parametrize("build", [fleet_dashboard, device_dashboard], ids=["fleet", "device"])
def test_dashboard_queries_are_valid_promql(build: Any, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, loaded by promtool as a recording rule."""
    exprs = [expr.replace("$__rate_interval", "5m").replace("$fleet", ".*").replace("$bundle", ".*")
             .replace("$instance", ".*") for expr in queries_of(build())]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": expr}
                                                        for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_dashboard_and_alerts_query_only_what_the_controller_exports() -> None:
    exported = families(controller_page())
    used = {name for expr in queries_of(fleet_dashboard()) + alert_queries() for name in METRIC.findall(expr)}
    assert used and used <= exported, sorted(used - exported)


@pytest.fixture
def agent_page(tmp_path: Path, digits_tflite: Path, digits_files: dict[str, Path],
               monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real agent's /metrics after predictions and feedback, on a board with one thermal zone."""
    import numpy as np

    from edgeship.agent import telemetry
    from edgeship.agent.runtimes import open_model
    from edgeship.agent.server import ApiServer
    from edgeship.agent.serving import LoadedModel, ServingModel, warm_up

    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    read_zones = telemetry.device_temperatures_c
    monkeypatch.setattr(telemetry, "device_temperatures_c", lambda root=str(tmp_path / "thermal"): read_zones(root))
    runner = open_model(digits_tflite)
    warm_up(runner)
    serving = ServingModel()
    serving.swap(LoadedModel("digits", "1.0.0", runner))
    server = ApiServer(serving, tmp_path, port=0).start()
    try:
        client = TFServingClient(server.host, server.port)
        x = np.load(digits_files["eval"])["x"][:4].astype(np.float32)
        assert client.predict("digits", x.tolist())[0] == 200
        assert client.request("POST", "/v1/models/digits:feedback", {"labels": [1], "predictions": [1]})[0] == 200
        status, text = client.request("GET", "/metrics")
        assert status == 200
        yield text
    finally:
        server.stop()


@pytest.mark.promtool
def test_agent_metrics_pass_promtool_check_metrics(agent_page: str) -> None:
    """A real agent's /metrics (model, latency histogram, classes, feedback, thermal zone, the HTTP
    connection gauges) as Prometheus' own linter reads it."""
    assert "edgeship_predict_latency_seconds_bucket" in agent_page and "edgeship_device_temperature_celsius" in agent_page
    result = promtool("check", "metrics", stdin=agent_page)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_device_dashboard_queries_only_what_the_agent_exports(agent_page: str) -> None:
    exported = families(agent_page)
    used = {name for expr in queries_of(device_dashboard()) for name in METRIC.findall(expr)}
    assert used and used <= exported, sorted(used - exported)


def test_shipped_dashboards_are_the_code_s_output() -> None:
    for name, build in DASHBOARDS.items():
        assert json.loads((MONITORING / name).read_text()) == build(), f"regenerate {name}: python -m edgeship.toolkit.dashboards"


@pytest.mark.parametrize("build", [fleet_dashboard, device_dashboard], ids=["fleet", "device"])
def test_dashboard_panels_have_unique_ids_and_do_not_overlap(build: Any) -> None:
    panels = build()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_monitoring_export_writes_the_rules_and_dashboards(tmp_path: Path) -> None:
    import sys

    out = tmp_path / "monitoring"
    result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "monitoring", "export", "--out", str(out),
                             "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)["written"]
    assert sorted(Path(p).name for p in written) == ["grafana-device.json", "grafana-fleet.json",
                                                     "prometheus-alerts.yml"]
    for path in written:
        assert Path(path).read_bytes() == (MONITORING / Path(path).name).read_bytes()
    human = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "monitoring", "export", "--out",
                            str(tmp_path / "again")], capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "grafana-fleet.json" in human.stdout, human.stderr
    refused = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "monitoring", "export", "--out",
                              str(out / "grafana-fleet.json")], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
