"""Fleet end to end with real parts: Mosquitto, a release repository made with the
``edgeship`` CLI on the digits model, a real BlockServer, and real
``edgeship-agent run`` processes (killed with SIGKILL where a test says so)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fleet_e2e_fixtures import (
    BAD,
    FLEET,
    GOOD,
    NEXT,
    FleetAgent,
    FleetRelease,
    TestDirector,
    fleet_release,
    wait_for,
)

from edgeship.ota.protocol import DesiredMessage, encode_message
from edgeship.ota.topics import DESIRED, device_topic

__all__ = ["fleet_release"]  # the session fixture, re-exported for pytest

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def director(mosquitto_broker, fleet_release: FleetRelease) -> Iterator[TestDirector]:  # type: ignore[no-untyped-def]
    d = TestDirector(mosquitto_broker.url, fleet_release)
    try:
        yield d
    finally:
        d.close()


def _stop(*agents: FleetAgent) -> None:
    for agent in agents:
        agent.stop()


def _check_prediction(agent: FleetAgent, release: FleetRelease) -> None:
    status, body = agent.predict(release.eval_x[:2].tolist())
    assert status == 200, body
    predictions = np.asarray(body["predictions"], dtype=np.float32)
    np.testing.assert_allclose(predictions, release.golden_y[:2], atol=1e-4)


@pytest.mark.slow
def test_install_over_mqtt_then_bad_version_fails_and_garbage_is_ignored(
        tmp_path: Path, mosquitto_broker, director: TestDirector, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    device = "dev-a"
    agent = FleetAgent(tmp_path / "a", fleet_release, mosquitto_broker.url, device)
    try:
        agent.wait_serving()
        wait_for(lambda: "online" in director.status[device], 20, "status online")
        first = director.assign(device, GOOD)
        director.wait_update(device, GOOD, ("COMMITTED",))
        assert director.active_of(device) == {"name": "digits", "version": GOOD}
        _check_prediction(agent, fleet_release)
        # the whole bundle travelled as MQTT blocks
        stream = fleet_release.target_stream(GOOD)
        served = {i for entry in director.served(stream) for i in entry.served}
        block = 64 * 1024
        assert served == set(range(-(-fleet_release.target_length(GOOD) // block)))

        # a bad version (golden outputs perturbed) fails the self-test on the device: FAILED with the reason
        director.assign(device, BAD)
        update = director.wait_update(device, BAD, ("FAILED", "REJECTED", "COMMITTED"))
        assert update["state"] == "FAILED", update
        assert "golden" in update["reason"].lower() or "self-test" in update["reason"].lower(), update["reason"]
        assert director.active_of(device) == {"name": "digits", "version": GOOD}
        _check_prediction(agent, fleet_release)
        events = [e for e in director.events[device]]
        assert [e.seq for e in events] == sorted(e.seq for e in events) and len({e.seq for e in events}) == len(events)
        assert any(e.state == "SELF_TEST" for e in events) and any(e.state == "FAILED" for e in events)

        # garbage on the device's desired topic: logged and ignored, the agent keeps serving
        failed_id = director.update_of(device)["id"]
        topic = device_topic(FLEET, device, DESIRED)
        forged = json.loads(json.dumps(first))
        forged["signed"]["version"] = NEXT
        forged["signed"]["sequence"] = 10_000
        unsigned = {"signed": first["signed"], "signatures": []}
        garbage = [
            b"not json at all",
            b"\xff\xfe\x00binary",
            b'{"v": 99, "type": "desired", "envelope": {}}',
            b'{"v": 1, "type": "reported"}',
            json.dumps({"v": 1, "type": "desired", "envelope": unsigned}).encode(),
            encode_message(DesiredMessage(forged)),          # signature no longer matches
            encode_message(DesiredMessage(first)),           # a replay of an older, genuine document
            b"[" * 100_000,                                  # oversized and deeply nested
        ]
        pub = shutil.which("mosquitto_pub")
        for payload in garbage:
            if pub:
                subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto_broker.port), "-t", topic, "-q", "1",
                                "-s"], input=payload, check=True, timeout=10)
            else:  # pragma: no cover - .ci/run installs mosquitto-clients
                director.publish_desired(device, payload)
        subprocess.run([pub or "true", "-h", "127.0.0.1", "-p", str(mosquitto_broker.port), "-t", topic, "-r", "-n"],
                       check=True, timeout=10)  # an empty retained message clears the topic
        wait_for(lambda: any(e.event == "desired.refused" for e in director.events[device]), 20,
                 "the forged document to be refused")
        time.sleep(1.0)
        assert agent.proc.poll() is None
        status = agent.status()
        assert status["update"]["id"] == failed_id, "garbage must not start an update"
        assert status["active"]["version"] == GOOD
        _check_prediction(agent, fleet_release)
        assert not director.refused, director.refused  # everything the agent published parsed
        assert "Traceback" not in agent.log.read_text()

        # and the link is not wedged: a genuine newer document still installs
        director.assign(device, NEXT)
        director.wait_update(device, NEXT, ("COMMITTED",))
    finally:
        _stop(agent)
    # a clean stop says offline (retained)
    wait_for(lambda: director.status[device][-1:] == ["offline"], 15, "status offline")


def _rate_limited_director(mosquitto_broker, release: FleetRelease, rate: float) -> TestDirector:  # type: ignore[no-untyped-def]
    return TestDirector(mosquitto_broker.url, release, rate_bytes_per_s=rate)


@pytest.mark.slow
def test_broker_restart_mid_transfer_resumes_without_refetching(
        tmp_path: Path, mosquitto_broker, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    device, window, block = "dev-b", 8, 1024
    director = _rate_limited_director(mosquitto_broker, fleet_release, rate=48 * 1024)
    agent = FleetAgent(tmp_path / "b", fleet_release, mosquitto_broker.url, device, block_size=block,
                       block_window=window)
    try:
        agent.wait_serving()
        wait_for(lambda: "online" in director.status[device], 20, "status online")
        stream = fleet_release.target_stream(GOOD)
        total = -(-fleet_release.target_length(GOOD) // block)
        assert total > 60, f"the bundle must span many blocks for this test ({total})"
        director.assign(device, GOOD)
        wait_for(lambda: sum(len(e.served) for e in director.served(stream)) >= total // 3, 60, "a third served")
        before = {i for e in director.served(stream) for i in e.served}
        restart_at = time.time()
        mosquitto_broker.restart(down_for=1.0)
        director.connection.wait_connected(20)
        blocks_topic = device_topic(FLEET, device, "blocks/data")
        for junk in (b"junk", b'{"v": 1, "type": "block"}\nxx', b'{"v": 7, "type": "block_info"}\n', b"\n" * 10):
            director.connection.publish(blocks_topic, junk, qos=1)  # dropped by the fetcher, nothing breaks
        director.wait_update(device, GOOD, ("COMMITTED",), timeout=120)
        entries = director.served(stream)
        after_wanted = [i for e in entries if e.at > restart_at for i in e.wanted]
        again = before & set(after_wanted)
        assert {i for e in entries for i in e.served} == set(range(total))
        # only blocks that were on the wire when the broker went down are asked for again
        assert len(again) <= window, f"{len(again)} finished blocks fetched again: {sorted(again)[:20]}"
        assert len(before) > 3 * window
        print(f"broker restarted after {len(before)} of {total} blocks; {len(again)} asked for again")
        _check_prediction(agent, fleet_release)
    finally:
        _stop(agent)
        director.close()


@pytest.mark.slow
def test_agent_killed_mid_transfer_resumes_from_disk(
        tmp_path: Path, mosquitto_broker, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    device, window, block = "dev-c", 8, 1024
    director = _rate_limited_director(mosquitto_broker, fleet_release, rate=16 * 1024)
    agent = FleetAgent(tmp_path / "c", fleet_release, mosquitto_broker.url, device, block_size=block,
                       block_window=window)
    try:
        agent.wait_serving()
        stream = fleet_release.target_stream(GOOD)
        total = -(-fleet_release.target_length(GOOD) // block)
        director.assign(device, GOOD)
        wait_for(lambda: sum(len(e.served) for e in director.served(stream)) >= total // 3, 60, "a third served")
        time.sleep(1.2)  # the fetcher fsyncs what it holds at least every second
        agent.kill()  # SIGKILL: no clean shutdown, the last will says offline
        wait_for(lambda: director.status[device][-1:] == ["offline"], 30, "last will: offline")
        before = {i for e in director.served(stream) for i in e.served}
        restart_at = time.time()
        agent = FleetAgent(tmp_path / "c", fleet_release, mosquitto_broker.url, device, block_size=block,
                           block_window=window)
        director.wait_update(device, GOOD, ("COMMITTED",), timeout=120)
        after_wanted = {i for e in director.served(stream) if e.at > restart_at for i in e.wanted}
        again = before & after_wanted
        # blocks received and synced before the kill are not fetched again (the last second's may be)
        assert len(again) < len(before) // 2, f"{len(again)} of {len(before)} blocks fetched again"
        assert len(before) < total, "the kill must come before the end of the transfer"
        assert after_wanted, "the resumed download asked for the missing blocks"
        assert "blocks already on disk" in agent.log.read_text(), "the fetcher resumed from its partial file"
        print(f"killed after {len(before)} of {total} blocks; {len(again)} fetched again after the restart")
        _check_prediction(agent, fleet_release)
    finally:
        _stop(agent)
        director.close()


@pytest.mark.slow
def test_device_offline_during_rollout_converges_when_it_returns(
        tmp_path: Path, mosquitto_broker, director: TestDirector, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    online = FleetAgent(tmp_path / "on", fleet_release, mosquitto_broker.url, "dev-on")
    offline = FleetAgent(tmp_path / "off", fleet_release, mosquitto_broker.url, "dev-off")
    try:
        online.wait_serving()
        offline.wait_serving()
        wait_for(lambda: "online" in director.status["dev-off"], 20, "dev-off online")
        offline.stop()
        wait_for(lambda: director.status["dev-off"][-1:] == ["offline"], 20, "dev-off offline")
        for device in ("dev-on", "dev-off"):  # the rollout's stage: retained desired states
            director.assign(device, GOOD)
        director.wait_update("dev-on", GOOD, ("COMMITTED",))
        time.sleep(1.0)
        assert director.update_of("dev-off") == {} or director.update_of("dev-off").get("bundle") is None
        offline = FleetAgent(tmp_path / "off", fleet_release, mosquitto_broker.url, "dev-off")
        director.wait_update("dev-off", GOOD, ("COMMITTED",))
        assert director.status["dev-off"][-1] == "online"
        _check_prediction(offline, fleet_release)
    finally:
        _stop(online, offline)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _mapped(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".so" in line}


@pytest.mark.slow
def test_fleet_update_keeps_the_verification_out_of_the_agent(
        tmp_path: Path, mosquitto_broker, director: TestDirector, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    """The desired state's signature, the TUF refresh and the download's checks run in
    children (isolated.py); the agent only moves the blocks. Its process never maps
    cryptography's or bcrypt's extension. Prints the agent's idle RSS after the update
    (docs/agent.md, "Memory after an update")."""
    device = "dev-rss"
    agent = FleetAgent(tmp_path / "a", fleet_release, mosquitto_broker.url, device)
    try:
        agent.wait_serving()
        wait_for(lambda: "online" in director.status[device], 20, "status online")
        pid = agent.proc.pid
        before = _rss_mb(pid)
        director.assign(device, GOOD)
        director.wait_update(device, GOOD, ("COMMITTED",))
        _check_prediction(agent, fleet_release)
        time.sleep(3.0)  # idle
        after = _rss_mb(pid)
        mapped = _mapped(pid)
        heavy = sorted(m for m in mapped if any(  # the Python packages' extensions (not OpenSSL's libcrypto)
            part in m for part in ("/cryptography/", "/bcrypt/", "_cffi_backend")))
        assert not heavy, heavy
        assert any("litert" in m.lower() for m in mapped)  # and it serves the model itself
        print(f"\nfleet agent idle RSS: {before:.1f} MB connected without a model, {after:.1f} MB "
              f"serving digits after an update over MQTT")
    finally:
        _stop(agent)


def test_agent_without_broker_runs_as_before(tmp_path: Path, fleet_release: FleetRelease) -> None:
    """No [broker] url: no MQTT at all, the agent starts and serves its API."""
    from agent_fixtures import AgentProcess

    from edgeship.agent.config import render_config

    folder = tmp_path / "nb"
    folder.mkdir()
    config = folder / "agent.toml"
    config.write_text(render_config(data=str(folder / "data"), device_id="dev-nb", fleet=FLEET,
                                    root=str(fleet_release.root_json), director_key=str(fleet_release.director_pub),
                                    bind="127.0.0.1:0"))
    agent = AgentProcess(config)
    try:
        status = agent.wait_serving()
        assert status["device"] == "dev-nb"
        assert not (folder / "data" / "fleet").exists()
    finally:
        agent.stop()


@pytest.mark.slow
def test_agent_keeps_serving_while_the_broker_is_down_and_reconnects(
        tmp_path: Path, mosquitto_broker, director: TestDirector, fleet_release: FleetRelease) -> None:  # type: ignore[no-untyped-def]
    device = "dev-d"
    agent = FleetAgent(tmp_path / "d", fleet_release, mosquitto_broker.url, device)
    try:
        agent.wait_serving()
        director.assign(device, GOOD)
        director.wait_update(device, GOOD, ("COMMITTED",))
        seen = len(director.status[device])
        mosquitto_broker.stop()
        for _ in range(5):
            _check_prediction(agent, fleet_release)
            time.sleep(0.5)
        mosquitto_broker.start()
        # the agent comes back by itself (backoff), says online again, and takes a new desired state
        director.connection.wait_connected(30)
        wait_for(lambda: len(director.status[device]) > seen and director.status[device][-1] == "online", 30,
                 "online again")
        director.assign(device, NEXT)
        director.wait_update(device, NEXT, ("COMMITTED",))
    finally:
        _stop(agent)


@pytest.mark.slow
def test_agent_starts_before_its_broker_and_connects_when_it_appears(
        tmp_path: Path, fleet_release: FleetRelease) -> None:
    from mqtt_broker import MosquittoBroker, free_port, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agent = FleetAgent(tmp_path / "e", fleet_release, url, "dev-e")
    broker = MosquittoBroker(tmp_path / "mosq", port=port)
    director = None
    try:
        status = agent.wait_serving()  # serves (its API answers) with no broker at all
        assert status["device"] == "dev-e"
        time.sleep(2.0)
        assert agent.proc.poll() is None
        broker.start()
        director = TestDirector(url, fleet_release)
        wait_for(lambda: "online" in director.status["dev-e"], 30, "the agent to connect once the broker is up")
        director.assign("dev-e", GOOD)
        director.wait_update("dev-e", GOOD, ("COMMITTED",))
    finally:
        agent.stop()
        if director is not None:
            director.close()
        broker.stop()


def test_bad_broker_url_is_one_clear_line(tmp_path: Path, fleet_release: FleetRelease) -> None:
    from agent_fixtures import agent_cli

    from edgeship.agent.config import render_config

    config = tmp_path / "agent.toml"
    config.write_text(render_config(data=str(tmp_path / "data"), device_id="dev-x", fleet=FLEET,
                                    root=str(fleet_release.root_json), director_key=str(fleet_release.director_pub),
                                    bind="127.0.0.1:0", broker="http://127.0.0.1:1883"))
    result = agent_cli("run", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: broker URL")
    assert "Traceback" not in result.stderr
