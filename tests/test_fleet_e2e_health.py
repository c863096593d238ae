"""The rollout health gates and the A/B verdict, end to end: Mosquitto, the real controller
(in-process: store, block server, reconcile loop, signing), ``edgeship rollout start`` /
``edgeship abtest`` as a user runs them, and real ``edgeship-agent run`` processes serving real
requests, whose own telemetry windows (every second here, instead of every minute) decide.

The slower version is honest about being slower: ``digits`` with a heavy side branch (three
2048-wide dense layers computed from the image on every request) whose result is scaled by 1e-30
and added to the probabilities. Its outputs equal its own golden vectors, so it passes the
device's self-test (the device-side latency gates are loosened in these agents' configs, as a
fleet whose operator gates at 3x in the rollout would have them), and it is really one to two
orders of magnitude slower per request, which only the fleet's telemetry gate sees.

The version that fails more is honest too: ``digits`` whose outputs are multiplied by a factor
gathered from a two-entry table at index ``1000 * (sum of the image > 48)``. The golden images
(sums about 16 to 22) give index 0 and the same answers, so it passes self-test; a bright image
(all ones, sum 64) makes TFLite's GATHER fail at invoke time ("gather index out of bounds"), a
500 that the agent counts as a model error in its telemetry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_e2e_fixtures import (
    FLEET,
    GOOD,
    FleetAgent,
    FleetRelease,
    edgeship_cli,
    fleet_release,
    wait_for,
)

__all__ = ["fleet_release"]

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

HEAVY = "3.0.0"
FLAKY = "3.1.0"


@pytest.fixture(scope="module")
def heavy_release(fleet_release: FleetRelease, digits_files: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> FleetRelease:
    """fleet_release plus digits 3.0.0: the same answers, a much heavier graph."""
    import tensorflow as tf

    from edgeship.agent.runtimes import open_model
    from edgeship.ota.golden import GoldenVectors

    base = tmp_path_factory.mktemp("heavy")
    digits = tf.keras.models.load_model(digits_files["model"])
    image = tf.keras.Input((8, 8, 1), name="image")
    side = tf.keras.layers.Flatten()(image)
    for _ in range(3):
        side = tf.keras.layers.Dense(2048, activation="relu")(side)
    side = tf.keras.layers.Rescaling(1e-30)(tf.keras.layers.Dense(10)(side))
    heavy = tf.keras.Model(image, tf.keras.layers.Add()([digits(image), side]))
    model = base / "digits-heavy.tflite"
    model.write_bytes(tf.lite.TFLiteConverter.from_keras_model(heavy).convert())
    x = fleet_release.eval_x
    with open_model(model) as runner:
        (y,) = runner.run([x])
    np.testing.assert_allclose(np.asarray(y), fleet_release.golden_y, atol=1e-4)  # the same answers
    golden = base / "heavy.golden.npz"
    GoldenVectors(("image",), (x,), ("probs",), (np.asarray(y, dtype=np.float32),), atol=1e-4).save(golden)
    out = base / f"digits-{HEAVY}.bundle"
    edgeship_cli("bundle", "build", str(model), "--name", "digits", "--version", HEAVY, "--golden", str(golden),
                 "-o", str(out))
    edgeship_cli("publish", str(out), "--repo", str(fleet_release.repo))

    class Flaky(tf.keras.layers.Layer):
        """probs x table[1000 * bright]: the gather fails at invoke time for a bright image."""

        def call(self, inputs: Any) -> Any:
            image, probs = inputs
            bright = tf.cast(tf.reduce_sum(image, axis=[1, 2, 3]) > 48.0, tf.int32)
            return probs * tf.gather(tf.constant([1.0, 1.0]), bright * 1000)[:, None]

    image = tf.keras.Input((8, 8, 1), name="image")
    model = base / "digits-flaky.tflite"
    model.write_bytes(tf.lite.TFLiteConverter.from_keras_model(
        tf.keras.Model(image, Flaky()([image, digits(image)]))).convert())
    with open_model(model) as runner:
        (y,) = runner.run([x])
        with pytest.raises(Exception, match="gather index out of bounds"):
            runner.run([np.ones((1, 8, 8, 1), np.float32)])
    np.testing.assert_allclose(np.asarray(y), fleet_release.golden_y, atol=1e-4)
    golden = base / "flaky.golden.npz"
    GoldenVectors(("image",), (x,), ("probs",), (np.asarray(y, dtype=np.float32),), atol=1e-4).save(golden)
    out = base / f"digits-{FLAKY}.bundle"
    edgeship_cli("bundle", "build", str(model), "--name", "digits", "--version", FLAKY, "--golden", str(golden),
                 "-o", str(out))
    edgeship_cli("publish", str(out), "--repo", str(fleet_release.repo))
    return fleet_release


class Traffic:
    """Requests to every agent's REST API, as applications would send them, until stopped."""

    def __init__(self, agents: dict[str, FleetAgent], *requests: list) -> None:
        self._stop = threading.Event()
        self.answers = 0
        self._threads = [threading.Thread(target=self._loop, args=(a, list(requests)), daemon=True)
                         for a in agents.values()]
        for thread in self._threads:
            thread.start()

    def _loop(self, agent: FleetAgent, requests: list) -> None:
        client = None
        turn = 0
        while not self._stop.is_set():
            turn += 1
            try:
                client = client or agent.client()
                status, _ = client.predict("digits", requests[turn % len(requests)])
                self.answers += status == 200
            except Exception:  # noqa: BLE001 - an agent swapping models or restarting: try again
                client = None
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_broker: Any, heavy_release: FleetRelease) -> Iterator[dict[str, Any]]:
    from edgeship.toolkit.controller import Controller, ControllerConfig
    from edgeship.toolkit.store import FleetStore

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    controller = Controller(ControllerConfig(broker=mosquitto_broker.url, repo=heavy_release.repo, db_url=db_url,
                                             replica_id="health", tick_s=0.3)).start()
    store = FleetStore(db_url)
    names = ["h-1", "h-2", "h-3", "h-4"]
    agents: dict[str, FleetAgent] = {}
    traffic = None
    try:
        for name in names:
            agent = FleetAgent(tmp_path / name, heavy_release, mosquitto_broker.url, name, loosen_latency_gates=True)
            agents[name] = agent
        for agent in agents.values():
            agent.wait_serving()
        wait_for(lambda: {d.id for d in store.list_devices(FLEET) if d.online} == set(names), 30, "devices online")
        first = edgeship_cli("rollout", "start", "digits", GOOD, "--fleet", FLEET, "--stages", "100", "--db", db_url,
                             "--wait", "--interval", "0.3", "--timeout", "2m")
        assert first["state"] == "COMPLETED", first["reason"]
        # ordinary digits, and every other request a bright image (all ones)
        traffic = Traffic(agents, heavy_release.eval_x[:1].tolist(), np.ones((1, 8, 8, 1)).tolist())
        yield {"store": store, "db": db_url, "agents": agents, "names": names}
    finally:
        if traffic is not None:
            traffic.stop()
        for agent in agents.values():
            agent.stop()
        store.close()
        controller.stop()


def test_a_slower_version_is_caught_by_the_p95_gate_and_its_devices_roll_back(fleet: dict[str, Any]) -> None:
    import json
    import os
    import subprocess
    import sys

    store, db = fleet["store"], fleet["db"]

    # the first stage moves one device and bakes; the others keep serving the previous version
    result = subprocess.run(
        [sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", HEAVY, "--fleet", FLEET,
         "--stages", "25,100", "--bake", "2m", "--stage-timeout", "3m", "--max-failures", "50%",
         "--health", "max_p95_ratio=3,min_requests=30", "--db", db, "--wait", "--interval", "0.5",
         "--timeout", "3m", "--json"],
        capture_output=True, text=True, timeout=400, check=False, env=dict(os.environ))
    doc = json.loads(result.stdout)
    assert result.returncode == 3, result.stderr[-3000:]  # aborted: a gate refused the version
    assert doc["state"] == "ABORTED" and "p95 latency" in doc["reason"] and "max_p95_ratio 3" in doc["reason"]
    assert doc["health"]["p95_ratio"] > 3 and doc["health"]["new_requests"] >= 30
    rollout, _ = store.load_rollout(doc["id"])
    moved = [d for d, r in rollout.devices.items() if r.status.value == "ROLLBACK_SENT"]
    assert len(moved) == 1, {d: r.status.value for d, r in rollout.devices.items()}
    # the moved device goes back to the previous version, and serves it
    wait_for(lambda: store.get_device(moved[0]).active_version == GOOD, 90, f"{moved[0]} back on {GOOD}")
    assert {d.id: d.active_version for d in store.list_devices(FLEET)} == {n: GOOD for n in fleet["names"]}
    status, _ = fleet["agents"][moved[0]].predict([[[[0.0]] * 8] * 8])
    assert status == 200


def test_a_version_that_fails_more_in_service_is_caught_by_the_error_rate_gate(fleet: dict[str, Any]) -> None:
    store, db = fleet["store"], fleet["db"]
    doc = edgeship_cli_status(
        "rollout", "start", "digits", FLAKY, "--fleet", FLEET, "--stages", "25,100", "--bake", "2m",
        "--stage-timeout", "3m", "--max-failures", "50%", "--health", "max_error_rate=0.1,min_requests=30",
        "--db", db, "--wait", "--interval", "0.5", "--timeout", "3m", code=3)
    assert doc["state"] == "ABORTED" and "error rate" in doc["reason"] and "max_error_rate 10.00%" in doc["reason"]
    assert doc["health"]["new_error_rate"] > 0.1
    rollout, _ = store.load_rollout(doc["id"])
    moved = [d for d, r in rollout.devices.items() if r.status.value == "ROLLBACK_SENT"]
    assert len(moved) == 1
    wait_for(lambda: store.get_device(moved[0]).active_version == GOOD, 90, f"{moved[0]} back on {GOOD}")
    assert {d.id: d.active_version for d in store.list_devices(FLEET)} == {n: GOOD for n in fleet["names"]}


def edgeship_cli_status(*args: str, code: int) -> dict[str, Any]:
    """``edgeship ... --json`` that must exit with ``code``; its JSON document."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", *args, "--json"], capture_output=True,
                            text=True, timeout=400, check=False, env=dict(os.environ))
    assert result.returncode == code, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


def test_an_ab_test_reaches_a_verdict_from_the_devices_telemetry(fleet: dict[str, Any]) -> None:
    from edgeship.toolkit.abtest import assign_arm

    db = fleet["db"]
    for _ in range(20):  # a test whose hash puts devices in both arms (4 devices: usually the first)
        test = edgeship_cli("abtest", "start", f"digits:{GOOD}", f"digits:{HEAVY}", "--fleet", FLEET,
                            "--metric", "latency_p95", "--min-samples", "8", "--db", db)
        arms = {assign_arm(test["id"], name, 50.0) for name in fleet["names"]}
        if arms == {"A", "B"}:
            break
        edgeship_cli("abtest", "stop", test["id"], "--db", db)
    else:
        pytest.fail("no A/B test split four devices into two arms in 20 tries")

    def verdict() -> Any:
        report = edgeship_cli("abtest", "report", test["id"], "--db", db)
        return report if report.get("significant") else None

    report = wait_for(verdict, 120, "the A/B report to reach a verdict")
    assert report["winner"] == "A", report  # the lighter version answers faster
    assert "A is" in report["verdict"] and report["arms"]["A"]["n"] >= 8 and report["arms"]["B"]["n"] >= 8
