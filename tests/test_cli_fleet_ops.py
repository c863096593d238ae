"""``edgeship fleet ls``, ``deploy``, ``device show`` and ``device tag`` through the real CLI edge
(click's CliRunner) over a real SQLite store filled with parsed protocol messages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeship.ota.protocol import EventMessage, ReportedMessage, StatusMessage, TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.cli import main
from edgeship.toolkit.store import FleetStore, IngestItem


def run(args: list[str], code: int = 0) -> Any:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == code, (args, result.output)
    return result


def run_json(args: list[str]) -> Any:
    return json.loads(run(args + ["--json"]).stdout)


def _telemetry(requests: int, errors: int, latency_ms: float, version: str = "1.0.0",
               drift: float | None = None) -> TelemetryMessage:
    histogram = LatencyHistogram()
    for _ in range(requests):
        histogram.observe(latency_ms)
    return TelemetryMessage(time.time(), 10.0, requests, errors, histogram,
                            bundle={"name": "digits", "version": version}, drift=drift)


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Three devices of fleet plant and one of lab, with state, events and telemetry."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    now = time.time()
    v1 = {"name": "digits", "version": "1.0.0"}
    items = [
        IngestItem("plant", "cam-1", StatusMessage("online"), now),
        IngestItem("plant", "cam-1", ReportedMessage("cam-1", now, v1, update={"state": "COMMITTED", "bundle": v1}),
                   now),
        IngestItem("plant", "cam-1", _telemetry(100, 5, 4.0, drift=0.2), now),
        IngestItem("plant", "cam-1", _telemetry(100, 0, 4.0, drift=0.3), now),
        IngestItem("plant", "cam-1", EventMessage("update_committed", now, 1, bundle=v1, state="COMMITTED"), now),
        IngestItem("plant", "cam-2", StatusMessage("offline"), now - 600),
        IngestItem("plant", "cam-2", ReportedMessage("cam-2", now, v1, update={
            "state": "FAILED", "bundle": {"name": "digits", "version": "1.1.0"}, "detail": "golden mismatch"}),
                   now - 600),
        IngestItem("plant", "cam-3", StatusMessage("online"), now),
        IngestItem("lab", "bench-1", StatusMessage("online"), now),
    ]
    with FleetStore(url) as store:
        store.ingest(items)
        store.set_tags("cam-1", {"site": "berlin", "hw": "pi4"})
        store.set_tags("cam-2", {"site": "berlin"})
    return url


def test_fleet_ls_json_has_every_column(db: str) -> None:
    doc = run_json(["fleet", "ls", "--db", db])
    assert doc["total"] == 4 and doc["online"] == 3
    rows = {r["device"]: r for r in doc["devices"]}
    cam1 = rows["cam-1"]
    assert (cam1["online"], cam1["bundle"], cam1["version"], cam1["update_state"]) == (True, "digits", "1.0.0",
                                                                                       "COMMITTED")
    assert cam1["requests"] == 200 and cam1["error_rate"] == pytest.approx(0.025)
    assert 3.0 < cam1["p95_ms"] <= 5.0 and cam1["drift"] == pytest.approx(0.3)  # the latest window's
    assert rows["cam-2"]["update_state"] == "FAILED" and rows["cam-2"]["update_version"] == "1.1.0"
    assert rows["cam-2"]["online"] is False and rows["cam-2"]["p95_ms"] is None
    assert rows["cam-1"]["tags"] == {"site": "berlin", "hw": "pi4"}


def test_fleet_ls_filters_by_fleet_and_selection(db: str) -> None:
    assert [r["device"] for r in run_json(["fleet", "ls", "--db", db, "--fleet", "lab"])["devices"]] == ["bench-1"]
    rows = run_json(["fleet", "ls", "--db", db, "--select", "site=berlin"])["devices"]
    assert [r["device"] for r in rows] == ["cam-1", "cam-2"]
    rows = run_json(["fleet", "ls", "--db", db, "--select", "site=berlin", "--select", "hw=pi4"])["devices"]
    assert [r["device"] for r in rows] == ["cam-1"]


def test_fleet_ls_table_for_people(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = run(["fleet", "ls", "--db", db]).stdout
    for text in ("cam-1", "digits 1.0.0", "COMMITTED", "FAILED 1.1.0", "3 of 4 online", "2.5%"):
        assert text in out, text
    assert "no devices in fleet nowhere" in run(["fleet", "ls", "--db", db, "--fleet", "nowhere"]).stdout


def test_fleet_ls_reads_the_environment(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_DB", db)
    monkeypatch.setenv("EDGESHIP_BROKER", "mqtt://127.0.0.1:1883")
    assert run_json(["fleet", "ls"])["total"] == 4
    monkeypatch.setenv("EDGESHIP_BROKER", "http://nope")
    assert "error: broker URL" in run(["fleet", "ls"], code=2).output


@pytest.mark.parametrize("args,why", [
    (["fleet", "ls", "--select", "site"], "TAG=VALUE"),
    (["fleet", "ls", "--fleet", "bad/fleet"], "fleet"),
    (["fleet", "ls", "--window", "soon"], ""),
    (["deploy", "digits", "1.0.0"], "either --device"),
    (["deploy", "digits", "1.0.0", "--device", "cam-1", "--select", "site=berlin"], "not both"),
    (["deploy", "digits", "1.0.0", "--device", "ghost"], "unknown device"),
    (["deploy", "digits", "1.0.0", "--device", "cam-1", "--fleet", "lab"], "not in fleet lab"),
    (["deploy", "digits", "1.0.0", "--select", "site=mars"], "no device matches site=mars"),
    (["deploy", "Bad Name!", "1.0.0", "--device", "cam-1"], ""),
    (["deploy", "digits", "not-a-version!", "--device", "cam-1"], ""),
    (["device", "show", "ghost"], "unknown device"),
    (["device", "tag", "cam-1"], "at least one"),
    (["device", "tag", "cam-1", "novalue"], "KEY=VALUE"),
    (["device", "tag", "cam-1", "a=b", "--remove", "a"], "both set and removed"),
    (["device", "tag", "ghost", "a=b"], "unknown device"),
])
def test_bad_input_is_one_line_and_exit_2(db: str, args: list[str], why: str) -> None:
    result = run(args + ["--db", db], code=2)
    assert result.output.startswith("error: ") or "Error:" in result.output
    assert why in result.output
    assert "Traceback" not in result.output


def test_deploy_queues_assignments_for_the_controller(db: str) -> None:
    doc = run_json(["deploy", "digits", "1.1.0", "--select", "site=berlin", "--db", db])
    assert doc["queued"] == [{"device": "cam-1", "fleet": "plant"}, {"device": "cam-2", "fleet": "plant"}]
    doc = run_json(["deploy", "digits", "1.1.0", "--device", "bench-1", "--device", "cam-3", "--db", db])
    assert {q["device"]: q["fleet"] for q in doc["queued"]} == {"bench-1": "lab", "cam-3": "plant"}
    with FleetStore(db) as store:
        pending = store.pending_actions()
    assert sorted((p.fleet, p.action.device, p.action.name, p.action.version) for p in pending) == [
        ("lab", "bench-1", "digits", "1.1.0"), ("plant", "cam-1", "digits", "1.1.0"),
        ("plant", "cam-2", "digits", "1.1.0"), ("plant", "cam-3", "digits", "1.1.0")]
    assert all(p.action.kind == "assign" and p.rollout_id is None for p in pending)
    assert "queued digits 1.1.0 for 1 device(s): cam-3" in run(
        ["deploy", "digits", "1.1.0", "--device", "cam-3", "--db", db]).stdout


def test_device_tag_sets_and_removes(db: str) -> None:
    assert run_json(["device", "tag", "cam-3", "site=paris", "line=2", "--db", db])["tags"] == {
        "site": "paris", "line": "2"}
    assert run_json(["device", "tag", "cam-3", "site=rome", "--remove", "line", "--db", db])["tags"] == {
        "site": "rome"}
    assert "cam-3: site=rome" in run(["device", "tag", "cam-3", "site=rome", "--db", db]).stdout
    assert [r["device"] for r in run_json(["fleet", "ls", "--select", "site=rome", "--db", db])["devices"]] == ["cam-3"]


def test_device_show_json_and_text(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    doc = run_json(["device", "show", "cam-1", "--db", db])
    assert doc["device"]["id"] == "cam-1" and doc["device"]["tags"] == {"site": "berlin", "hw": "pi4"}
    assert doc["desired"] is None
    assert doc["telemetry"]["digits:1.0.0"]["requests"] == 200
    assert doc["telemetry"]["digits:1.0.0"]["error_rate"] == pytest.approx(0.025)
    assert [e["event"] for e in doc["events"]] == ["update_committed"]
    with FleetStore(db) as store:
        store.record_desired(fleet="plant", device="cam-1", sequence=3, name="digits", version="1.1.0",
                             issued_at=time.time(), rollout_id="r-1")
    doc = run_json(["device", "show", "cam-1", "--db", db])
    assert doc["desired"]["version"] == "1.1.0" and doc["desired"]["sequence"] == 3
    out = run(["device", "show", "cam-2", "--db", db]).stdout
    for text in ("cam-2", "offline", "FAILED", "golden mismatch", "site=berlin"):
        assert text in out, text
    out = run(["device", "show", "cam-1", "--db", db]).stdout
    assert "desired  digits 1.1.0 (install, sequence 3, rollout r-1)" in out and "update_committed" in out


@pytest.mark.parametrize("args,why", [
    (["controller", "--broker", "http://x:1", "--repo", "."], "broker URL"),
    (["controller", "--broker", "mqtt://user:pw@127.0.0.1:1883", "--repo", "."], "credentials"),
    (["controller", "--broker", "mqtt://127.0.0.1:1", "--repo", "/nonexistent/repo"], "not an edgeship release"),
    (["controller", "--broker", "mqtt://127.0.0.1:1", "--repo", ".", "--fleet", "a/b"], "fleet"),
    (["controller", "--broker", "mqtt://127.0.0.1:1", "--repo", ".", "--metrics-port", "70000"], "metrics-port"),
])
def test_controller_bad_input_is_one_line_and_exit_2(args: list[str], why: str, tmp_path: Path) -> None:
    result = run(args + ["--db", f"sqlite:///{tmp_path / 'f.db'}"], code=2)
    assert result.output.startswith("error: ") and why in result.output and "Traceback" not in result.output
