"""The agent's fleet link without processes: the pure desired-state decision (a
table), its settings, and the reporter against a real Mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgeship.agent.config import parse_config
from edgeship.agent.fleet_link import (
    DesiredAction,
    FleetLinkSettings,
    MqttReporter,
    decide_desired,
    load_link_settings,
)
from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import EventMessage, ReportedMessage, parse_message
from edgeship.ota.transport import MqttConnection

A1 = ("digits", "1.0.0")
A2 = ("digits", "2.0.0")

# sequence, bundle, last_sequence, taken, active, running, in_progress -> action
DECISIONS = [
    (5, A2, 7, 0, A1, None, False, DesiredAction.IGNORE_REPLAY),       # lower than accepted: a replay
    (5, A2, 0, 6, A1, None, False, DesiredAction.IGNORE_REPLAY),       # lower than taken here
    (7, A2, 7, 0, A1, None, False, DesiredAction.IGNORE_SAME),         # retained redelivery after reconnect
    (7, A2, 3, 7, A1, A2, True, DesiredAction.IGNORE_SAME),            # the one being installed, again
    (8, A2, 7, 0, A1, None, False, DesiredAction.SUBMIT),              # new version
    (8, A2, 7, 0, None, None, False, DesiredAction.SUBMIT),            # first install
    (8, A1, 7, 0, A1, None, False, DesiredAction.ALREADY_ACTIVE),      # rollback to what still runs
    (8, A2, 7, 0, A1, A2, True, DesiredAction.WAIT),                   # re-signed same version: let it finish
    (8, A2, 7, 0, A1, None, True, DesiredAction.WAIT),                 # an offline-package update runs
    (8, A1, 7, 0, A1, A2, True, DesiredAction.ABORT_AND_WAIT),         # abort: back to A1 while A2 installs
]


@pytest.mark.parametrize("sequence,bundle,last,taken,active,running,in_progress,expected", DECISIONS)
def test_decide_desired_table(sequence: int, bundle: tuple[str, str], last: int, taken: int,
                              active: tuple[str, str] | None, running: tuple[str, str] | None, in_progress: bool,
                              expected: DesiredAction) -> None:
    decision = decide_desired(sequence=sequence, bundle=bundle, last_sequence=last, taken_sequence=taken,
                              active=active, running=running, in_progress=in_progress)
    assert decision.action is expected, decision.reason
    assert decision.reason


def _config(tmp_path: Path, broker: str = "mqtt://127.0.0.1:1883") -> object:
    return parse_config({
        "device": {"id": "dev-1", "fleet": "lab"}, "paths": {"data": str(tmp_path / "data")},
        "trust": {"root": "root.json", "director_key": "director.pub"}, "broker": {"url": broker},
    }, source=tmp_path / "agent.toml")


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    config = _config(tmp_path)
    defaults = load_link_settings(config, {})  # type: ignore[arg-type]
    assert defaults == FleetLinkSettings(url="mqtt://127.0.0.1:1883")
    custom = load_link_settings(config, {"block_size": 1024, "block_window": 8, "prefix": "acme",  # type: ignore[arg-type]
                                         "reconnect_max_s": 2, "telemetry_qos": 1})
    assert (custom.block_size, custom.block_window, custom.prefix, custom.reconnect_max_s, custom.telemetry_qos) \
        == (1024, 8, "acme", 2, 1)


@pytest.mark.parametrize("table,needle", [
    ({"block_size": "big"}, "block_size"),
    ({"block_window": 0}, "positive"),
    ({"telemetry_qos": 2}, "telemetry_qos"),
    ({"protocol": "4"}, "protocol"),
    ({"prefix": "a/b"}, "prefix"),
    ({"keepalive_s": True}, "keepalive_s"),
])
def test_settings_refuse_bad_values(tmp_path: Path, table: dict, needle: str) -> None:
    with pytest.raises(BadInputError, match=needle):
        load_link_settings(_config(tmp_path), table)  # type: ignore[arg-type]


def test_reporter_keeps_reports_while_offline_and_sends_them_on_connect(tmp_path: Path, mosquitto_broker) -> None:
    """State (retained) and events (QoS 1, seq growing and persisted) wait for the broker."""
    config = _config(tmp_path, mosquitto_broker.url)
    settings = load_link_settings(config, {})  # type: ignore[arg-type]
    device = MqttConnection(mosquitto_broker.url, client_id="dev-1")
    seq_file = tmp_path / "events.json"
    reporter = MqttReporter(device, config, settings, seq_file)  # type: ignore[arg-type]
    device.add_connect_listener(reporter.on_connect)
    state = ReportedMessage(device="dev-1", ts=time.time(), active={"name": "digits", "version": "1.0.0"}).to_dict()
    reporter.report_state(state)  # not connected yet: kept
    for i in range(3):
        reporter.report_event(EventMessage(event="update.fetching", ts=time.time(), seq=0, detail=f"e{i}").to_dict())
    reporter.report_telemetry({"nonsense": True})  # refused by the schema, logged, never raises
    watcher = MqttConnection(mosquitto_broker.url, client_id="watcher").connect(10)
    got: list = []
    watcher.subscribe("edgeship/lab/devices/dev-1/#", lambda m: got.append(m), qos=1)
    try:
        device.connect(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got) < 4:
            time.sleep(0.05)
        kinds = [m.topic.rsplit("/", 1)[1] for m in got]
        assert kinds.count("events") == 3 and kinds.count("reported") == 1, kinds
        seqs = [parse_message("events", m.payload).seq for m in got if m.topic.endswith("events")]
        assert seqs == [1, 2, 3]
        assert json.loads(seq_file.read_text())["event_seq"] == 3
        # a new reporter (agent restart) goes on from the persisted sequence
        again = MqttReporter(device, config, settings, seq_file)  # type: ignore[arg-type]
        again.on_connect(True)
        again.report_event(EventMessage(event="update.idle", ts=time.time(), seq=1).to_dict())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(m.topic.endswith("events") for m in got) < 4:
            time.sleep(0.05)
        assert parse_message("events", got[-1].payload).seq == 4
        # the retained state is what a controller that starts later reads
        late: list = []
        reader = MqttConnection(mosquitto_broker.url, client_id="late-reader").connect(10)
        reader.subscribe("edgeship/lab/devices/dev-1/reported", lambda m: late.append(m), qos=1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not late:
            time.sleep(0.05)
        assert late and late[0].retain and parse_message("reported", late[0].payload).active == state["active"]
        reader.close()
    finally:
        device.close()
        watcher.close()
