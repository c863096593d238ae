"""The demo path: the embedded broker (amqtt) with real agent processes, and
``examples/digits/fleet_demo.py`` (the fleet half of ``make demo``) run as a user
runs it, to its end and interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleet_e2e_fixtures import GOOD, FleetAgent, FleetRelease, TestDirector, fleet_release, wait_for

__all__ = ["fleet_release"]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "digits" / "fleet_demo.py"


def _gone(pid: int) -> bool:
    """No such process (a zombie whose parent exited counts as gone: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.mark.slow
def test_embedded_broker_carries_an_install_and_the_last_will(tmp_path: Path, fleet_release: FleetRelease) -> None:
    """What the demo relies on from amqtt: retained desired state, blocks at QoS 1, and the last will."""
    from edgeship.toolkit.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker("127.0.0.1", 0).start()
    director = TestDirector(broker.url, fleet_release)
    agent = FleetAgent(tmp_path / "emb", fleet_release, broker.url, "dev-emb")
    try:
        agent.wait_serving()
        wait_for(lambda: "online" in director.status["dev-emb"], 30, "online over amqtt")
        director.assign("dev-emb", GOOD)
        director.wait_update("dev-emb", GOOD, ("COMMITTED",))
        agent.kill()  # SIGKILL: only the broker's last will can say offline
        wait_for(lambda: director.status["dev-emb"][-1:] == ["offline"], 30, "the last will over amqtt")
    finally:
        agent.stop()
        director.close()
        broker.stop()


@pytest.mark.slow
def test_fleet_demo_end_to_end(tmp_path: Path) -> None:
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path / "out"), "--json"],  # a long path
                            capture_output=True, text=True, timeout=400, check=False,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-4000:]
    doc = json.loads(result.stdout)
    assert doc["rollout_good"]["state"] == "COMPLETED"
    assert set(doc["rollout_good"]["devices"].values()) == {"SUCCEEDED"}
    assert len(doc["rollout_good"]["devices"]) == 5
    bad = doc["rollout_bad"]
    assert bad["state"] == "ABORTED"
    moved = [d for d, s in bad["devices"].items() if s != "CANCELLED"]
    assert len(moved) == 1, bad  # aborted at its first stage (20% of 5 devices)
    failed = doc["bad_version_failed_on"]
    assert list(failed) == moved and "golden" in (failed[moved[0]]["reason"] or "").lower(), failed
    assert all(row["version"] == "1.0.0" for row in doc["fleet"]) and len(doc["fleet"]) == 5
    prediction = doc["prediction"]
    assert sum(p == y for p, y in zip(prediction["predicted"], prediction["labels"])) >= 3, prediction
    assert len(doc["processes"]) == 7  # broker, controller, five agents: all stopped
    assert all(_gone(pid) for pid in doc["processes"].values())
    assert "dev-5" in result.stderr and "ABORTED" in result.stderr
    assert seconds < 180, f"the fleet demo took {seconds:.0f} s"


@pytest.mark.slow
def test_fleet_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(DEMO), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pids_file = out / "fleet" / "logs" / "pids.json"
    try:
        wait_for(lambda: pids_file.exists() and len(json.loads(pids_file.read_text() or "{}")) == 7, 200,
                 "the demo's seven processes", interval=0.5)
        pids = json.loads(pids_file.read_text())
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    alive = {name: pid for name, pid in pids.items() if not _gone(pid)}
    assert not alive, {n: Path(f"/proc/{p}/status").read_text().splitlines()[:3] for n, p in alive.items()}
