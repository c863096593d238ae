"""The store with many models per device: what a multi-model agent reports is kept per model, its
telemetry is one window per model, rollouts read a device as it serves their model, and the
desired set changes one entry at a time (SQLite; the migration test covers PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.ota.protocol import ModelTelemetry, ReportedMessage, TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.fleet_rules import DesiredModel
from edgeship.toolkit.store import FleetStore, IngestItem


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    return FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")


def _hist(ms: float, n: int) -> LatencyHistogram:
    h = LatencyHistogram()
    for _ in range(n):
        h.observe(ms)
    return h


def test_reported_models_are_kept_per_model_and_replaced_by_each_report(store: FleetStore) -> None:
    first = ReportedMessage("m", 1.0, {"name": "kws", "version": "2.0.0"}, agent_version="0.2.0", models={
        "digits": {"active": {"name": "digits", "version": "1.0.0"}, "serving_version": 3},
        "kws": {"active": {"name": "kws", "version": "2.0.0"}, "serving_version": 1,
                "update": {"state": "COMMITTED", "bundle": {"name": "kws", "version": "2.0.0"}}}})
    store.ingest([IngestItem("f", "m", first, 1.0),
                  IngestItem("f", "old", ReportedMessage("old", 1.0, {"name": "digits", "version": "1.0.0"},
                                                         agent_version="0.1.0"), 1.0)])
    rows = store.device_models_of(["m", "old"])
    assert set(rows) == {"m"} and rows["m"]["kws"]["update_state"] == "COMMITTED"
    assert store.device_forms(["m", "old", "nobody"]) == {"m": (True, "0.2.0"), "old": (False, "0.1.0")}
    # the next report no longer names kws: it is not served any more
    store.ingest([IngestItem("f", "m", ReportedMessage("m", 2.0, agent_version="0.2.0", models={
        "digits": {"active": {"name": "digits", "version": "1.0.0"}, "serving_version": 3}}), 2.0)])
    assert set(store.device_models_of(["m"])["m"]) == {"digits"}


def test_a_rollout_reads_each_device_as_it_serves_the_rollouts_model(store: FleetStore) -> None:
    store.ingest([
        IngestItem("f", "m", ReportedMessage("m", 1.0, {"name": "kws", "version": "2.0.0"}, models={
            "digits": {"active": {"name": "digits", "version": "1.0.0"}},
            "kws": {"active": {"name": "kws", "version": "2.0.0"},
                    "update": {"state": "FETCHING", "bundle": {"name": "kws", "version": "2.1.0"}}}}), 1.0),
        IngestItem("f", "old", ReportedMessage("old", 1.0, {"name": "digits", "version": "1.0.0"}), 1.0)])
    digits = {s.device: s for s in store.fleet_snapshot("f", model="digits")}
    kws = {s.device: s for s in store.fleet_snapshot("f", model="kws")}
    # the multi-model device's top-level `active` (kws) is not what the digits rollout sees
    assert (digits["m"].active_name, digits["m"].active_version, digits["m"].update_state) == \
        ("digits", "1.0.0", None)
    assert (kws["m"].active_name, kws["m"].update_state, kws["m"].update_version) == ("kws", "FETCHING", "2.1.0")
    # a device of one model is read from its one active model, whatever the rollout's model
    assert (kws["old"].active_name, kws["old"].active_version) == ("digits", "1.0.0")
    # a model the device does not serve: nothing active
    assert {s.device: s.active_name for s in store.fleet_snapshot("f", model="other")} == {"m": None,
                                                                                         "old": "digits"}


def test_per_model_telemetry_is_one_window_per_model(store: FleetStore) -> None:
    message = TelemetryMessage(10.0, 10.0, 30, 1, _hist(2.0, 30), {"name": "digits", "version": "1.0.0"}, models=(
        ModelTelemetry("digits", "1.0.0", 3, 30, 1, _hist(2.0, 30)),
        ModelTelemetry("kws", "2.0.0", 1, 5, 0, _hist(9.0, 5))))
    store.ingest([IngestItem("f", "m", message, 10.0)])
    windows = sorted((w.name, w.version, w.requests, w.errors) for w in store.telemetry_windows("f", since=0.0))
    # the top-level fields repeat the first model's: not counted a second time
    assert windows == [("digits", "1.0.0", 30, 1), ("kws", "2.0.0", 5, 0)]
    kws = store.fleet_snapshot("f", telemetry_since=0.0, model="kws")[0]
    assert {(t.name, t.requests) for t in kws.telemetry} == {("digits", 30), ("kws", 5)}


def test_the_desired_set_changes_one_entry_at_a_time(store: FleetStore) -> None:
    store.record_desired(fleet="f", device="m", sequence=1, name="digits", version="1.0.0", issued_at=1.0)
    store.record_desired(fleet="f", device="m", sequence=2, name="kws", version="2.0.0", issued_at=2.0,
                         rollout_id="r-1")
    store.record_desired(fleet="f", device="m", sequence=3, name="digits", version="1.1.0", issued_at=3.0,
                         models={"digits": DesiredModel("digits", "1.1.0", 4), "kws": DesiredModel("kws", "2.0.0", 1)})
    assert store.desired_set("m") == {"digits": DesiredModel("digits", "1.1.0", 4),
                                      "kws": DesiredModel("kws", "2.0.0", 1)}
    assert store.desired_map("f", {"kws"}) == {"m": ("kws", "2.0.0")}
    assert store.desired_map("f") == {"m": ("digits", "1.1.0")}  # the latest document's changed entry
    assert store.serving_version_of("f", "digits", "1.1.0") == 4
    assert store.serving_version_of("f", "digits", "9.9.9") is None
