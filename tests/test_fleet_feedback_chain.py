"""Accuracy for A/B tests, traced through every real link: labels posted to the agent's
``:feedback`` endpoint -> the agent's telemetry window -> the agent's outgoing MQTT payload
(fleet_link) -> the controller's routing of that payload -> the store -> ``abtest report``.

Each piece has its own tests; this one fails if a link between them drops the counts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import TFServingClient
from click.testing import CliRunner

from edgeship.agent.fleet_link import _encode
from edgeship.agent.runtimes import open_model
from edgeship.agent.server import ApiServer
from edgeship.agent.serving import LoadedModel, ServingModel, warm_up
from edgeship.agent.telemetry import TelemetryWindow
from edgeship.ota.protocol import ReportedMessage, encode_message
from edgeship.ota.topics import REPORTED, TELEMETRY, device_topic
from edgeship.toolkit.abtest import ABTest, Arm, Metric, assign_arm
from edgeship.toolkit.cli import main
from edgeship.toolkit.controller import route_message
from edgeship.toolkit.store import FleetStore

FLEET = "plant"
TEST_ID = "ab-feedback"


@pytest.fixture
def agents(tmp_path: Path, digits_tflite: Path) -> Iterator[dict[str, Any]]:
    """Two real agent API servers: one device of arm A serving 1.0.0, one of arm B serving 2.0.0."""
    names = {assign_arm(TEST_ID, f"dev-{i}", 50.0): f"dev-{i}" for i in range(64)}
    assert set(names) == {"A", "B"}
    started: dict[str, Any] = {}
    for arm, version in (("A", "1.0.0"), ("B", "2.0.0")):
        runner = open_model(digits_tflite)
        warm_up(runner)
        serving = ServingModel()
        serving.swap(LoadedModel("digits", version, runner))
        folder = tmp_path / arm
        folder.mkdir()
        server = ApiServer(serving, folder, port=0).start()
        started[arm] = {"device": names[arm], "version": version, "server": server,
                        "window": TelemetryWindow(serving, folder)}
    yield started
    for entry in started.values():
        entry["server"].stop()


def _post_feedback(server: ApiServer, labels: list[int], predictions: list[int]) -> None:
    client = TFServingClient(server.host, server.port)
    try:
        status, body = client.request("POST", "/v1/models/digits:feedback",
                                      {"labels": labels, "predictions": predictions})
        assert status == 200, body
    finally:
        client.close()


def test_feedback_labels_reach_the_abtest_report(agents: dict[str, Any], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    truth = [i % 10 for i in range(200)]
    # arm A answers 120 of 200 right, arm B 190 of 200: B is clearly more accurate
    wrong_a = [(c + 1) % 10 if i % 5 < 2 else c for i, c in enumerate(truth)]
    wrong_b = [(c + 1) % 10 if i % 20 == 0 else c for i, c in enumerate(truth)]
    _post_feedback(agents["A"]["server"], truth, wrong_a)
    _post_feedback(agents["B"]["server"], truth, wrong_b)
    test = ABTest(id=TEST_ID, fleet=FLEET, a=Arm("digits", "1.0.0"), b=Arm("digits", "2.0.0"),
                  metric=Metric.ACCURACY, split_pct=50.0, min_samples=30, created_at=time.time() - 1)
    now = time.time()
    with FleetStore(db) as store:
        store.create_abtest(test)
        for entry in agents.values():
            device = entry["device"]
            reported = encode_message(ReportedMessage(device=device, ts=now,
                                                      active={"name": "digits", "version": entry["version"]}))
            payload = _encode(TELEMETRY, entry["window"].take())  # exactly what the agent publishes
            items = [route_message(device_topic(FLEET, device, REPORTED), reported, now),
                     route_message(device_topic(FLEET, device, TELEMETRY), payload, now)]
            assert store.ingest(items) == 2
    result = CliRunner().invoke(main, ["abtest", "report", TEST_ID, "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["arms"]["A"]["successes"], doc["arms"]["A"]["n"]) == (120, 200)
    assert (doc["arms"]["B"]["successes"], doc["arms"]["B"]["n"]) == (190, 200)
    assert doc["winner"] == "B" and doc["significant"] is True
    assert doc["verdict"].startswith("B is more accurate, p")
