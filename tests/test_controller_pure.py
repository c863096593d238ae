"""The controller's pure pieces, table by table: routing received messages, the desired state it
signs, when the repository's timestamp is re-signed, and the Prometheus page."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeship.ota.director import (
    WrongDeviceError,
    generate_director_key,
    load_director_private_key,
    load_director_public_key,
    sign_desired_state,
    verify_desired_state,
)
from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import (
    EventMessage,
    ReportedMessage,
    StatusMessage,
    TelemetryMessage,
    encode_message,
)
from edgeship.ota.release import TargetInfo
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.cli import main
from edgeship.toolkit.controller import (
    ControllerConfig,
    RejectedMessage,
    build_desired_state,
    render_metrics,
    route_message,
    timestamp_refresh_due,
)
from edgeship.toolkit.controller_metrics import FleetCounters

T = "edgeship/plant/devices/dev-1"


def _telemetry(requests: int = 10, errors: int = 1) -> bytes:
    histogram = LatencyHistogram()
    for _ in range(requests):
        histogram.observe(3.0)
    return encode_message(TelemetryMessage(1.0, 10.0, requests, errors, histogram))


VALID = [
    (f"{T}/status", encode_message(StatusMessage("online")), StatusMessage),
    (f"{T}/reported", encode_message(ReportedMessage("dev-1", 1.0, {"name": "digits", "version": "1.0.0"})),
     ReportedMessage),
    (f"{T}/events", encode_message(EventMessage("update_committed", 1.0, 7)), EventMessage),
    (f"{T}/telemetry", _telemetry(), TelemetryMessage),
]


@pytest.mark.parametrize("topic,payload,kind", VALID, ids=[v[0].rsplit("/", 1)[1] for v in VALID])
def test_valid_messages_become_ingest_items(topic: str, payload: bytes, kind: type) -> None:
    item = route_message(topic, payload, 123.5)
    assert (item.fleet, item.device, item.received_at) == ("plant", "dev-1", 123.5)
    assert isinstance(item.message, kind)


SIGNED = json.dumps({"v": 1, "type": "desired", "envelope": {"signed": {}, "signatures": []}}).encode()
REFUSED = [
    ("not json", f"{T}/status", b"\xff\xfe not json", "not UTF-8 JSON"),
    ("oversized status", f"{T}/status", b"{" + b" " * 5000 + b"}", "exceeds"),
    ("oversized telemetry", f"{T}/telemetry", b"x" * (65 * 1024), "exceeds"),
    ("unknown version", f"{T}/events", json.dumps({"v": 9, "type": "event"}).encode(), "schema version 9"),
    ("wrong type", f"{T}/events", json.dumps({"v": 1, "type": "status", "state": "online"}).encode(), "type"),
    ("missing field", f"{T}/events", json.dumps({"v": 1, "type": "event", "ts": 1}).encode(), "event"),
    ("bad status", f"{T}/status", json.dumps({"v": 1, "type": "status", "state": "dead"}).encode(), "state"),
    ("errors > requests", f"{T}/telemetry",
     json.dumps({"v": 1, "type": "telemetry", "ts": 1, "window_s": 1, "requests": 1, "errors": 2,
                 "latency": LatencyHistogram().to_dict()}).encode(), "errors"),
    ("other device's report", f"{T}/reported", encode_message(ReportedMessage("dev-2", 1.0)), "dev-2"),
    ("desired is not ingested", f"{T}/desired", SIGNED, "does not ingest"),
    ("block request is not ingested", f"{T}/blocks/request", b"{}", "does not ingest"),
    ("not a device topic", "edgeship/plant/other/dev-1/status", b"{}", "not a device topic"),
    ("foreign prefix", "other/plant/devices/dev-1/status", b"{}", "not a device topic"),
    ("bad device id", "edgeship/plant/devices/-x/status", b"{}", "device id"),
    ("unknown kind", f"{T}/shadow", b"{}", "unknown topic kind"),
    ("array", f"{T}/status", b"[1, 2]", "JSON object"),
    ("deep nesting", f"{T}/reported", b"[" * 100_000, "exceeds"),
]


@pytest.mark.parametrize("case,topic,payload,why", REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_messages_are_refused_with_a_reason(case: str, topic: str, payload: bytes, why: str) -> None:
    with pytest.raises(RejectedMessage) as info:
        route_message(topic, payload, 1.0)
    assert why in info.value.message


TARGET = TargetInfo(name="digits", version="1.1.0", path="digits/digits-1.1.0.bundle", length=4242,
                    sha256="ab" * 32, format="tflite", runtime={}, file=Path("/nonexistent"))


def test_desired_state_carries_the_release_repository_target_and_verifies(tmp_path: Path) -> None:
    generate_director_key(tmp_path / "d.key", tmp_path / "d.pub")
    now = 1_800_000_000.7
    state = build_desired_state(fleet="plant", device="dev-1", target=TARGET, sequence=12, now=now,
                                expires_in_s=3600, action="rollback", rollout="r-1", deployment="r-1")
    envelope = sign_desired_state(state, load_director_private_key(tmp_path / "d.key"))
    checked = verify_desired_state(envelope, load_director_public_key(tmp_path / "d.pub"), device="dev-1",
                                   fleet="plant", last_sequence=11,
                                   now=dt.datetime.fromtimestamp(now + 10, dt.timezone.utc))
    assert (checked.target, checked.length, checked.sha256) == (TARGET.path, 4242, "ab" * 32)
    assert (checked.action, checked.sequence, checked.rollout) == ("rollback", 12, "r-1")
    assert (checked.expires - checked.issued).total_seconds() == 3600
    with pytest.raises(WrongDeviceError):
        verify_desired_state(envelope, load_director_public_key(tmp_path / "d.pub"), device="dev-2", fleet="plant",
                             last_sequence=None, now=dt.datetime.fromtimestamp(now, dt.timezone.utc))


def _status(expires_in: int, validity: int = 86400, expired: bool = False, role: str = "timestamp") -> dict[str, Any]:
    other = {"expires_in_seconds": 7 * 86400, "validity_seconds": 7 * 86400, "expired": False}
    roles = {"timestamp": dict(other, validity_seconds=86400, expires_in_seconds=86400), "snapshot": other}
    roles[role] = {"expires_in_seconds": expires_in, "validity_seconds": validity, "expired": expired}
    return {"roles": roles}


@pytest.mark.parametrize("status,fraction,due", [
    (_status(86000), 0.5, False),
    (_status(43300), 0.5, False),
    (_status(43100), 0.5, True),
    (_status(-5, expired=True), 0.5, True),
    (_status(80000), 0.95, True),
    (_status(3 * 86400, 7 * 86400, role="snapshot"), 0.5, True),
    ({"roles": {}}, 0.5, False),
])
def test_timestamp_refresh_is_due_before_half_the_validity_is_gone(status: dict[str, Any], fraction: float,
                                                                   due: bool) -> None:
    assert timestamp_refresh_due(status, fraction) is due


def _metrics_fixture() -> str:
    histogram = LatencyHistogram()
    for value in [1.0] * 90 + [40.0] * 10:
        histogram.observe(value)
    summary = {"plant": {"devices": 3, "online": 2, "versions": {"digits:1.0.0": 2, "none": 1}, "requests": 100,
                         "errors": 5, "latency": histogram,
                         "by_version": {("digits", "1.0.0"): {"requests": 100, "errors": 5, "latency": histogram,
                                                              "drift_max": 0.25}}},
               "lab": {"devices": 1, "online": 0, "versions": {}, "requests": 0, "errors": 0,
                       "latency": LatencyHistogram(),
                       "by_version": {("", ""): {"requests": 0, "errors": 0, "latency": LatencyHistogram(),
                                                 "drift_max": None}}}}
    rollouts = [{"id": "r-1", "fleet": "plant", "name": "digits", "version": "1.1.0", "state": "RUNNING", "stage": 0,
                 "devices": {"SUCCEEDED": 1, "PENDING": 2}}]
    counters = FleetCounters()
    counters.add("plant", {"name": "digits", "version": "1.0.0"}, 60, 3, histogram)
    counters.add("plant", {"name": "digits", "version": "1.0.0"}, 40, 2, histogram)
    return render_metrics(summary, rollouts, {"received.events": 4, "rejected.other": 2, "ingested": 9,
                                              "ingest_lag_s": 0.25}, 60, counters=counters.snapshot(),
                          rollout_states={("plant", "ABORTED"): 1, ("plant", "RUNNING"): 1})


def test_metrics_page_has_the_fleet_versions_rollouts_and_latency() -> None:
    lines = set(_metrics_fixture().splitlines())
    version = 'fleet="plant",bundle="digits",version="1.0.0"'
    assert 'edgeship_devices{fleet="plant"} 3' in lines
    assert 'edgeship_devices_online{fleet="plant"} 2' in lines
    assert 'edgeship_devices_by_version{fleet="plant",bundle="digits",version="1.0.0"} 2' in lines
    assert 'edgeship_devices_by_version{fleet="plant",bundle="",version=""} 1' in lines
    assert f"edgeship_fleet_window_requests{{{version}}} 100" in lines
    assert f"edgeship_fleet_window_error_ratio{{{version}}} 0.05" in lines
    assert 'edgeship_fleet_window_error_ratio{fleet="lab",bundle="",version=""} NaN' in lines
    assert f"edgeship_fleet_window_drift_max{{{version}}} 0.25" in lines
    p95 = next(line for line in lines if line.startswith(f"edgeship_fleet_window_latency_p95_seconds{{{version}}}"))
    assert 0.030 < float(p95.split()[-1]) <= 0.050  # the slow tenth lies in the (30, 50] ms bucket
    # cumulative: two telemetry windows added up; the histogram in seconds, buckets never falling
    assert f"edgeship_fleet_requests_total{{{version}}} 100" in lines
    assert f"edgeship_fleet_errors_total{{{version}}} 5" in lines
    assert f'edgeship_fleet_latency_seconds_bucket{{{version},le="+Inf"}} 200' in lines
    assert f'edgeship_fleet_latency_seconds_bucket{{{version},le="0.001"}} 180' in lines
    assert f"edgeship_fleet_latency_seconds_count{{{version}}} 200" in lines
    assert ('edgeship_rollout_devices{rollout="r-1",fleet="plant",bundle="digits",version="1.1.0",'
            'state="RUNNING",status="PENDING"} 2') in lines
    assert 'edgeship_rollouts{fleet="plant",state="ABORTED"} 1' in lines
    assert 'edgeship_controller_messages_total{kind="events"} 4' in lines
    assert 'edgeship_controller_messages_rejected_total{kind="other"} 2' in lines
    assert "edgeship_controller_ingest_lag_seconds 0.25" in lines
    # every sample line belongs to a declared family
    declared = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert name in declared or name.rsplit("_", 1)[0] in declared, line


def test_metrics_page_histogram_buckets_are_cumulative_and_never_fall() -> None:
    lines = [line for line in _metrics_fixture().splitlines() if line.startswith("edgeship_fleet_latency_seconds_bucket")]
    values = [float(line.split()[-1]) for line in lines]
    assert len(values) > 10 and values == sorted(values)


def test_fleet_counters_only_grow_and_keep_versions_apart() -> None:
    counters = FleetCounters()
    one = LatencyHistogram()
    one.observe(2.0)
    counters.add("plant", {"name": "digits", "version": "1.0.0"}, 10, 1, one)
    counters.add("plant", {"name": "digits", "version": "1.1.0"}, 5, 0, one)
    counters.add("plant", None, 3, 0, LatencyHistogram())
    counters.add("plant", {"name": "digits", "version": "1.0.0"}, 7, 2, one)
    snap = counters.snapshot()
    assert snap[("plant", "digits", "1.0.0")]["requests"] == 17 and snap[("plant", "digits", "1.0.0")]["errors"] == 3
    assert snap[("plant", "digits", "1.0.0")]["latency"].count == 2
    assert snap[("plant", "digits", "1.1.0")]["requests"] == 5
    assert snap[("plant", "", "")]["requests"] == 3


def test_labels_are_escaped() -> None:
    summary = {'we"ird': {"devices": 1, "online": 1, "versions": {}, "requests": 0, "errors": 0,
                          "latency": LatencyHistogram()}}
    assert 'edgeship_devices{fleet="we\\"ird"} 1' in render_metrics(summary, [], {}, 60)


# -- controller settings that would misbehave (some silently) are refused with one line ---------


@pytest.mark.parametrize("changes", [
    {"tick_s": 0},
    {"batch_max": 0},
    {"replica_id": ""},
    {"desired_renew_s": 10.0, "desired_expires_s": 5.0},
    {"tick_s": float("nan")},       # every wait returns at once: a busy loop
    {"tick_s": float("inf")},       # OverflowError in the reconcile thread
    {"tick_s": 1e12},
    {"shared_group": "a/b"},        # $share/a/b/edgeship/...: group "a", the wrong topic filter
    {"shared_group": "+"},
    {"shared_group": "g#"},
])
def test_controller_config_refuses_settings_that_would_misbehave_silently(changes: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://", **changes)


def test_controller_config_accepts_sane_tick_and_shared_group() -> None:
    config = ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://", tick_s=0.5,
                              shared_group="edgeship-controllers")
    assert config.shared_group == "edgeship-controllers"
    assert ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://",
                            shared_group=None).shared_group is None


@pytest.mark.parametrize("args,why", [(["--tick", "nan"], "tick"), (["--shared-group", "a/b"], "shared")])
def test_controller_command_refuses_bad_tick_or_shared_group_before_connecting(tmp_path: Path, args: list, why: str) -> None:
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["controller", "--broker", "mqtt://127.0.0.1:1", "--repo", str(repo),
                                       "--db", f"sqlite:///{tmp_path / 'f.db'}", *args],
                                env={"EDGESHIP_ROOT_PASSPHRASE": "a long passphrase"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and why in result.stderr
