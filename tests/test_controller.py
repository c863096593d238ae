"""The controller with real parts: Mosquitto, a SQLite store, a release repository built with the
CLI from the digits model, and simulated devices speaking the real protocol, each over its own
MQTT connection."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from controller_fixtures import (  # noqa: F401 - fixtures
    SimDevice,
    cli,
    cli_json,
    db_url,
    devices_factory,
    digits_repo_template,
    release_repo,
    start_controller,
    wait_for,
)
from fleet_fixtures import postgres_server  # noqa: F401 - fixture

from edgeship.ota import updater
from edgeship.ota.blocks import BlockTransferConfig, MqttBlockFetcher
from edgeship.ota.director import load_director_public_key, verify_desired_state
from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import DesiredMessage, parse_message
from edgeship.ota.release import ReleaseRepository
from edgeship.ota.topics import DESIRED
from edgeship.ota.transport import MqttConnection
from edgeship.toolkit.store import FleetStore

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]  # a real broker and a trained model


@pytest.fixture
def store(db_url: str) -> Any:
    opened = FleetStore(db_url)
    yield opened
    opened.close()


@pytest.mark.promtool
def test_controller_ingests_status_reported_events_and_telemetry(mosquitto_broker: Any, release_repo: Path,
                                                                 db_url: str, store: FleetStore,
                                                                 devices_factory: Callable[..., SimDevice]) -> None:
    controller = start_controller(mosquitto_broker.url, release_repo, db_url, metrics_port=0)
    try:
        a = devices_factory("dev-a", active={"name": "digits", "version": "1.0.0"})
        b = devices_factory("dev-b")
        a.event("started")
        a.telemetry(requests=200, errors=10, latency_ms=4.0, drift=0.12)
        b.telemetry(requests=50, errors=0, latency_ms=1.0)
        wait_for(lambda: len(store.list_devices("plant")) == 2 and store.get_device("dev-a").telemetry_at
                 and store.get_device("dev-b").telemetry_at, what="both devices ingested")
        info = store.get_device("dev-a")
        assert info.online and (info.active_name, info.active_version) == ("digits", "1.0.0")
        assert info.last_requests == 200 and info.last_errors == 10 and info.last_drift == pytest.approx(0.12)
        assert [e["event"] for e in store.recent_events("dev-a")] == ["started"]
        # a device that goes away: its last will (retained offline) is ingested
        b.close(send_will=True)  # MQTT 5 disconnect with will: the broker publishes the retained offline
        wait_for(lambda: not store.get_device("dev-b").online, timeout=20, what="dev-b offline by its last will")
        body = urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics", timeout=5).read().decode()
        assert 'edgeship_devices{fleet="plant"} 2' in body
        assert 'edgeship_devices_online{fleet="plant"} 1' in body
        assert 'edgeship_devices_by_version{fleet="plant",bundle="digits",version="1.0.0"} 1' in body
        assert 'edgeship_fleet_window_requests{fleet="plant",bundle="digits",version="1.0.0"} 200' in body
        assert 'edgeship_fleet_requests_total{fleet="plant",bundle="digits",version="1.0.0"} 200' in body
        assert 'edgeship_fleet_requests_total{fleet="plant",bundle="",version=""} 50' in body
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
        assert controller.stats.get("ingested") >= 6 and controller.stats.get("rejected.other") == 0
    finally:
        controller.stop()


def test_rollout_reaches_devices_as_signed_desired_states_and_blocks_are_served(
        mosquitto_broker: Any, release_repo: Path, db_url: str, store: FleetStore, tmp_path: Path,
        devices_factory: Callable[..., SimDevice]) -> None:
    v1 = {"name": "digits", "version": "1.0.0"}
    sims = [devices_factory(f"dev-{i}", active=dict(v1), auto_commit=i != 0) for i in range(4)]
    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        wait_for(lambda: len(store.list_devices("plant")) == 4, what="devices known")
        rollout_id = cli(["rollout", "start", "digits", "1.1.0", "--fleet", "plant", "--stages", "25,100",
                          "--db", db_url, "--broker", mosquitto_broker.url]).stdout.strip()
        # the first stage: one device; it gets a desired state that verifies with the director key
        first = wait_for(lambda: [s for s in sims if s.last_sequence is not None], what="the canary's desired state")
        rollout = store.load_rollout(rollout_id)[0]
        assert len([r for r in rollout.devices.values() if r.stage == 0]) == 1  # 25 % of 4: one canary
        target = ReleaseRepository(release_repo).target_info("digits", "1.1.0")
        # dev-0 does not answer by itself: it installs through the real block transfer and the TUF client
        dev0 = sims[0]
        state = wait_for(lambda: not dev0.desired.empty() and dev0.desired.get_nowait(), timeout=30,
                         what="dev-0's desired state")
        assert (state.bundle, state.version, state.action, state.rollout) == ("digits", "1.1.0", "install", rollout_id)
        assert (state.target, state.length, state.sha256) == (target.path, target.length, target.sha256)
        trust = tmp_path / "trust"
        trust.mkdir()
        shutil.copy(release_repo / "metadata" / "1.root.json", trust / "root.json")
        fetcher = MqttBlockFetcher(dev0.connection, fleet="plant", device="dev-0", work_dir=tmp_path / "blocks",
                                   config=BlockTransferConfig(block_size=4096))
        verified = updater.fetch_verified_bundle(trust_dir=trust, desired=state, fetcher=fetcher,
                                                 work_dir=tmp_path / "work", now=dt.datetime.now(dt.timezone.utc))
        assert verified.manifest.version == "1.1.0" and verified.sha256 == target.sha256
        # `edgeship publish` put the zstd copy beside the bundle: that is what travelled (no base given)
        assert verified.transfer is not None and verified.transfer["kind"] == "compressed", verified.transfer
        assert verified.transfer["bytes"] < target.length == verified.transfer["full_bytes"]
        assert fetcher.blocks_received >= -(-verified.transfer["bytes"] // 4096)
        assert any(e.outcome == "blocks" and e.device == "dev-0" for e in controller.block_server.log)
        dev0.commit(state, verified.transfer)
        wait_for(lambda: store.load_rollout(rollout_id)[0].state.value == "COMPLETED", timeout=30,
                 what="the rollout completes")
        assert first and all(store.get_device(s.device).active_version == "1.1.0" for s in sims)
        recorded = wait_for(lambda: store.last_transfers(["dev-0"]).get("dev-0"), what="dev-0's transfer stored")
        assert recorded["digits"]["kind"] == "compressed"
        assert recorded["digits"]["bytes"] == verified.transfer["bytes"]
        assert all(not s.refused for s in sims)
        record = wait_for(lambda: store.desired_for("dev-1"), what="dev-1's desired state recorded")
        assert record.rollout_id == rollout_id and record.envelope["signatures"]
        # retained: a device that connects later still finds its signed desired state
        late = MqttConnection(mosquitto_broker.url, client_id="reader").connect(5)
        got: list[Any] = []
        late.subscribe(f"edgeship/plant/devices/dev-1/{DESIRED}", lambda m: got.append(m), qos=1)
        wait_for(lambda: got, what="retained desired state")
        message = parse_message(DESIRED, got[0].payload)
        assert isinstance(message, DesiredMessage) and got[0].retain
        verify_desired_state(message.envelope, load_director_public_key(release_repo / "director" / "director.pub"),
                             device="dev-1", fleet="plant", last_sequence=None, now=dt.datetime.now(dt.timezone.utc))
        late.close()
    finally:
        controller.stop()


def test_deploy_to_one_device_is_signed_and_published(mosquitto_broker: Any, release_repo: Path, db_url: str,
                                                       store: FleetStore,
                                                       devices_factory: Callable[..., SimDevice]) -> None:
    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        sim = devices_factory("dev-x")
        other = devices_factory("dev-y")
        wait_for(lambda: len(store.list_devices("plant")) == 2, what="devices known")
        doc = cli_json(["deploy", "digits", "1.0.0", "--device", "dev-x", "--db", db_url, "--repo", str(release_repo)])
        assert doc["queued"] == [{"device": "dev-x", "fleet": "plant"}]
        state = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), what="desired state")
        assert (state.version, state.action, state.deployment) == ("1.0.0", "install", state.deployment)
        assert state.deployment and state.deployment.startswith("deploy-")
        time.sleep(0.5)
        assert other.desired.empty()
        # a version that is not published: refused before anything is queued
        cli(["deploy", "digits", "9.9.9", "--device", "dev-x", "--db", db_url, "--repo", str(release_repo)], code=2)
        # queued anyway without --repo: the controller records why it could not carry it out
        cli(["deploy", "digits", "9.9.9", "--device", "dev-y", "--db", db_url])
        wait_for(lambda: controller.stats.get("action_errors") == 1, what="the action error")
        assert other.desired.empty() and store.pending_actions() == []
    finally:
        controller.stop()


def _hostile_payloads(prefix: str) -> list[Any]:
    big = b"{" + b'"x":"' + b"a" * 70_000 + b'"}'
    unsigned = json.dumps({"v": 1, "type": "desired", "envelope": {"signed": {"device": "dev-h"},
                                                                   "signatures": []}}).encode()
    forged_report = json.dumps({"v": 1, "type": "reported", "device": "dev-victim", "ts": 1.0,
                                "active": {"name": "evil", "version": "6.6.6"}}).encode()
    cases = []
    for kind in ("status", "reported", "events", "telemetry", "blocks/request", "desired", "blocks/data"):
        topic = f"{prefix}/{kind}"
        cases += [(topic, b"not json at all"), (topic, big), (topic, b""), (topic, b"[]"),
                  (topic, json.dumps({"v": 2, "type": kind}).encode()), (topic, unsigned), (topic, b"\x00\xff" * 50)]
    cases.append((f"{prefix}/reported", forged_report))
    return cases


def test_malformed_oversized_and_unsigned_messages_on_every_topic_are_ignored(
        mosquitto_broker: Any, release_repo: Path, db_url: str, store: FleetStore,
        devices_factory: Callable[..., SimDevice]) -> None:
    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        prefix = "edgeship/plant/devices/dev-h"
        attacker = MqttConnection(mosquitto_broker.url, client_id="attacker").connect(5)
        for topic, payload in _hostile_payloads(prefix):
            attacker.publish(topic, payload, qos=1)
        attacker.publish("edgeship/plant/devices/not valid/status", b"{}", qos=1)
        attacker.close()
        # the same through the mosquitto command-line client, as an operator would
        pub = shutil.which("mosquitto_pub")
        if pub:
            for kind, payload in (("status", "{\"v\":1,\"type\":\"status\",\"state\":\"zombie\"}"),
                                  ("telemetry", "{broken"), ("events", "x" * 20_000)):
                subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto_broker.port), "-q", "1", "-t",
                                f"{prefix}/{kind}", "-m", payload], check=True, timeout=10)
            subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto_broker.port), "-q", "1", "-t",
                            f"{prefix}/reported", "-f", "/dev/null"], check=True, timeout=10)
        wait_for(lambda: controller.stats.get("rejected.status") >= 8 and controller.stats.get("rejected.events") >= 8,
                 what="the hostile messages counted as rejected")
        assert controller.connection.is_connected and controller._threads and all(
            t.is_alive() for t in controller._threads)
        # nothing of it reached the store; the victim's state was not overwritten through dev-h's topic
        with pytest.raises(BadInputError):
            store.get_device("dev-victim")
        # and the controller still works: a real device is ingested after all that
        sim = devices_factory("dev-ok")
        sim.event("hello")
        wait_for(lambda: store.recent_events("dev-ok"), what="the real device's event")
        assert store.list_devices("plant")[0].id == "dev-ok" and len(store.list_devices("plant")) == 1
    finally:
        controller.stop()


def test_two_replicas_split_events_and_both_see_every_state(mosquitto_broker: Any, release_repo: Path, db_url: str,
                                                           store: FleetStore,
                                                           devices_factory: Callable[..., SimDevice]) -> None:
    one = start_controller(mosquitto_broker.url, release_repo, db_url, replica_id="one")
    two = start_controller(mosquitto_broker.url, release_repo, db_url, replica_id="two")
    try:
        assert one.shared and two.shared
        sims = [devices_factory(f"dev-{i}") for i in range(5)]
        for round_ in range(20):
            for sim in sims:
                sim.event("tick", detail=str(round_))
        wait_for(lambda: sum(len(store.recent_events(s.device, limit=100)) for s in sims) == 100, timeout=20,
                 what="all 100 events stored once")
        got_one, got_two = one.stats.get("received.events"), two.stats.get("received.events")
        assert got_one + got_two == 100 and got_one > 0 and got_two > 0, (got_one, got_two)
        # reported and status are retained and reach both replicas (plain subscriptions)
        assert one.stats.get("received.status") >= 5 and two.stats.get("received.status") >= 5
        assert one.stats.get("received.reported") >= 5 and two.stats.get("received.reported") >= 5
        # both reconcile; a deploy is carried out exactly once
        cli(["deploy", "digits", "1.0.0", "--select", "x=y", "--db", db_url], code=2)  # no device has the tag
        for sim in sims:
            store.set_tags(sim.device, {"line": "a"})
        cli(["deploy", "digits", "1.0.0", "--select", "line=a", "--fleet", "plant", "--db", db_url])
        wait_for(lambda: all(not s.desired.empty() for s in sims), what="every device's desired state")
        time.sleep(1.0)
        assert one.stats.get("desired_published") + two.stats.get("desired_published") == 5
        assert all(s.desired.qsize() == 1 for s in sims)
    finally:
        one.stop()
        two.stop()


def test_timestamp_is_resigned_and_desired_states_renewed_before_they_expire(
        mosquitto_broker: Any, release_repo: Path, db_url: str, store: FleetStore,
        devices_factory: Callable[..., SimDevice]) -> None:
    repo = ReleaseRepository(release_repo)
    version_before = repo.status()["roles"]["timestamp"]["version"]
    clock = {"now": time.time()}
    from edgeship.toolkit.controller import Controller, ControllerConfig

    config = ControllerConfig(broker=mosquitto_broker.url, repo=release_repo, db_url=db_url, tick_s=3600,
                              desired_expires_s=7200, desired_renew_s=3600)
    controller = Controller(config, clock=lambda: clock["now"]).start()
    try:
        sim = devices_factory("dev-t")
        wait_for(lambda: store.list_devices("plant"), what="device known")
        cli(["deploy", "digits", "1.0.0", "--device", "dev-t", "--db", db_url])
        controller.tick()
        first = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), what="first desired state")
        assert repo.status()["roles"]["timestamp"]["version"] == version_before  # fresh: nothing to re-sign
        clock["now"] += 13 * 3600  # past half of the one-day timestamp; the desired state expired long ago
        controller.tick()
        status = repo.status()
        assert status["roles"]["timestamp"]["version"] == version_before + 1
        assert status["roles"]["timestamp"]["expires_in_seconds"] > 23 * 3600 + 12 * 3600 - 60
        renewed = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), what="renewed desired")
        record = store.desired_for("dev-t")
        assert record is not None and record.sequence > first.sequence and record.version == "1.0.0"
        assert record.expires_at == pytest.approx(clock["now"] + 7200)
        assert controller.stats.get("desired_renewed") == 1
        assert (renewed.sequence, renewed.version) == (record.sequence, "1.0.0")
    finally:
        controller.stop()


def test_controller_process_stops_cleanly_on_sigterm(mosquitto_broker: Any, release_repo: Path, db_url: str,
                                                     tmp_path: Path, store: FleetStore,
                                                     devices_factory: Callable[..., SimDevice]) -> None:
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "controller", "--broker",
                                    mosquitto_broker.url, "--repo", str(release_repo), "--db", db_url,
                                    "--replica-id", "proc", "--json-log"], stdout=subprocess.PIPE, stderr=log_file)
    try:
        wait_for(lambda: b"controller proc started" in log_path.read_bytes(), timeout=60, what="controller started")
        sim = devices_factory("dev-p")
        sim.event("before-stop")
        wait_for(lambda: store.recent_events("dev-p"), what="event ingested by the process")
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        messages = [line["msg"] for line in lines]
        assert any("SIGTERM" in m for m in messages) and any("controller proc stopped" in m for m in messages)
        assert process.stdout is not None and process.stdout.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_controller_on_the_embedded_broker_uses_plain_subscriptions(release_repo: Path, db_url: str,
                                                                    store: FleetStore) -> None:
    """The demo's path: amqtt speaks MQTT 3.1.1 only, so no shared subscriptions, one replica."""
    from edgeship.toolkit.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker("127.0.0.1", 0).start()
    controller = start_controller(broker.url, release_repo, db_url)
    sim = None
    try:
        assert controller.connection.protocol == "3.1.1" and not controller.shared
        sim = SimDevice(broker.url, "plant", "dev-e", release_repo / "director" / "director.pub").connect()
        sim.event("hello")
        sim.telemetry(requests=10)
        wait_for(lambda: store.recent_events("dev-e") and store.get_device("dev-e").telemetry_at,
                 what="event and telemetry through the embedded broker")
        cli(["deploy", "digits", "1.0.0", "--device", "dev-e", "--db", db_url])
        state = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), what="desired state")
        assert state.version == "1.0.0"
    finally:
        if sim is not None:
            sim.close(send_will=False)
        controller.stop()
        broker.stop()


def test_controller_survives_a_broker_restart(mosquitto_broker: Any, release_repo: Path, db_url: str,
                                              store: FleetStore, devices_factory: Callable[..., SimDevice]) -> None:
    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        sim = devices_factory("dev-r")
        wait_for(lambda: store.list_devices("plant"), what="device known")
        mosquitto_broker.restart(down_for=1.0)
        wait_for(lambda: controller.connection.is_connected and sim.connection.is_connected, timeout=30,
                 what="both reconnected")
        sim.event("after-restart")
        wait_for(lambda: store.recent_events("dev-r"), timeout=20, what="event after the restart")
        cli(["deploy", "digits", "1.0.0", "--device", "dev-r", "--db", db_url])
        state = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), timeout=20,
                         what="desired state after the restart")
        assert state.version == "1.0.0" and controller.connection.connects >= 2
    finally:
        controller.stop()


def test_controller_on_postgresql(mosquitto_broker: Any, release_repo: Path, postgres_server: Any,
                                  devices_factory: Callable[..., SimDevice]) -> None:
    """The same controller over PostgreSQL: batched ingest, outbox claims, desired states."""
    url = postgres_server.new_database()
    controller = start_controller(mosquitto_broker.url, release_repo, url)
    pg = FleetStore(url)
    try:
        sims = [devices_factory(f"pg-{i}", active={"name": "digits", "version": "1.0.0"}) for i in range(3)]
        for sim in sims:
            sim.event("hello")
            sim.telemetry(requests=20, errors=1)
        wait_for(lambda: len(pg.list_devices("plant")) == 3 and all(pg.get_device(s.device).telemetry_at for s in sims)
                 and all(pg.recent_events(s.device) for s in sims), what="ingest into PostgreSQL")
        cli(["deploy", "digits", "1.1.0", "--select", "x=y", "--db", url], code=2)
        cli(["deploy", "digits", "1.1.0", "--device", "pg-1", "--db", url])
        state = wait_for(lambda: not sims[1].desired.empty() and sims[1].desired.get_nowait(), what="desired state")
        assert state.version == "1.1.0"
        record = wait_for(lambda: pg.desired_for("pg-1"), what="desired state recorded")
        assert record.sequence == state.sequence and record.envelope["signed"]["device"] == "pg-1"
    finally:
        controller.stop()
        pg.close()


def test_failing_rollout_is_aborted_and_the_moved_device_rolled_back(
        mosquitto_broker: Any, release_repo: Path, db_url: str, store: FleetStore,
        devices_factory: Callable[..., SimDevice]) -> None:
    """The demo's second act: the canary fails the new version, the rollout aborts at its first stage
    and the controller publishes a signed rollback desired state to the previous version."""
    v1 = {"name": "digits", "version": "1.0.0"}
    sims = [devices_factory(f"dev-{i}", active=dict(v1)) for i in range(4)]
    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        wait_for(lambda: len(store.list_devices("plant")) == 4, what="devices known")
        rollout_id = cli(["rollout", "start", "digits", "1.1.0", "--fleet", "plant", "--stages", "25,100",
                          "--max-failures", "0", "--db", db_url]).stdout.strip()
        canary = wait_for(lambda: next((s for s in sims if not s.desired.empty()), None), what="the canary")
        state = canary.desired.get_nowait()
        assert state.action == "install" and state.version == "1.1.0"
        bundle = {"name": "digits", "version": "1.1.0"}
        canary.event("update_failed", bundle=bundle, state="FAILED", detail="golden vectors do not match")
        canary.report(update={"state": "FAILED", "bundle": bundle, "detail": "golden vectors do not match"})
        rollback = wait_for(lambda: not canary.desired.empty() and canary.desired.get_nowait(), timeout=20,
                            what="the rollback desired state")
        assert (rollback.action, rollback.version, rollback.rollout) == ("rollback", "1.0.0", rollout_id)
        assert rollback.sequence > state.sequence
        assert store.load_rollout(rollout_id)[0].state.value in ("ABORTED", "ROLLED_BACK")
        time.sleep(1.0)
        assert all(s.desired.empty() for s in sims if s is not canary)  # nobody else was moved
    finally:
        controller.stop()


def test_abtest_assignments_reach_both_arms(mosquitto_broker: Any, release_repo: Path, db_url: str,
                                           store: FleetStore, devices_factory: Callable[..., SimDevice]) -> None:
    from edgeship.toolkit.abtest import assign_arm

    controller = start_controller(mosquitto_broker.url, release_repo, db_url)
    try:
        test_id = cli(["abtest", "start", "digits:1.0.0", "digits:1.1.0", "--fleet", "plant", "--metric",
                       "latency_p95", "--db", db_url]).stdout.strip()
        # devices that join after the start: three hashing to each arm (the test id is random)
        names = {"A": [], "B": []}  # type: dict
        for i in range(200):
            arm = assign_arm(test_id, f"ab-{i}", 50.0)
            if len(names[arm]) < 3:
                names[arm].append(f"ab-{i}")
        v1 = {"name": "digits", "version": "1.0.0"}
        sims = {arm: [devices_factory(n, active=dict(v1)) for n in names[arm]] for arm in ("A", "B")}
        for sim in sims["B"]:  # arm B devices get 1.1.0, signed, tagged with the test
            state = wait_for(lambda sim=sim: not sim.desired.empty() and sim.desired.get_nowait(), what="desired state")
            assert (state.version, state.deployment) == ("1.1.0", test_id)
            record = wait_for(lambda sim=sim: store.desired_for(sim.device), what="desired state recorded")
            assert record.abtest_id == test_id  # recorded once the broker acknowledged the publish
        time.sleep(1.0)  # arm A devices already run 1.0.0: nothing is sent to them
        assert all(s.desired.empty() and store.desired_for(s.device) is None for s in sims["A"])
    finally:
        controller.stop()


def test_one_rollout_that_cannot_be_reconciled_does_not_stop_the_tick(
        release_repo: Path, db_url: str, store: FleetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row the engine trips over (a bug, a value another version wrote) is logged and
    counted; the other rollouts, the A/B tests and the outbox still run this tick."""
    from edgeship.toolkit.controller import Controller, ControllerConfig

    controller = Controller(ControllerConfig(broker="mqtt://127.0.0.1:1", repo=release_repo, db_url=db_url),
                            store=store)
    reconciled: list[str] = []

    def reconcile(rollout_id: str, now: float) -> None:
        if rollout_id == "r-bad":
            raise KeyError("stages")
        reconciled.append(rollout_id)

    monkeypatch.setattr(store, "live_rollout_ids", lambda: ["r-bad", "r-good"])
    monkeypatch.setattr(store, "reconcile_rollout", reconcile)
    done = controller.tick(now=time.time())
    assert reconciled == ["r-good"] and done["rollouts"] == 1 and done["errors"] == 1


def test_an_assignment_the_controller_cannot_sign_fails_at_once_with_the_reason(
        release_repo: Path, db_url: str, store: FleetStore) -> None:
    """A rollout of a version the repository does not hold (started without --repo): the device
    is FAILED with the reason in the same tick, and the rollout aborts on it, not after 30 minutes."""
    from fleet_fixtures import SimulatedFleet

    from edgeship.toolkit.controller import Controller, ControllerConfig
    from edgeship.toolkit.rollouts import DeviceStatus, RolloutPolicy, RolloutState, new_rollout

    SimulatedFleet(store, "plant", 2, version="1.0.0")
    now = time.time()
    store.create_rollout(new_rollout("r-unsigned", "plant", "digits", "7.7.7", RolloutPolicy(stages=(50, 100)), now))
    controller = Controller(ControllerConfig(broker="mqtt://127.0.0.1:1", repo=release_repo, db_url=db_url),
                            store=store)
    done = controller.tick(now=now + 1)
    assert done["errors"] == 1
    rollout, _ = store.load_rollout("r-unsigned")
    failed = [r for r in rollout.devices.values() if r.status is DeviceStatus.FAILED]
    assert len(failed) == 1 and "cannot sign it" in (failed[0].detail or "") and "7.7.7" in failed[0].detail
    store.reconcile_rollout("r-unsigned", now + 2)  # the next tick's reconcile (no broker to publish to here)
    rollout, _ = store.load_rollout("r-unsigned")
    assert rollout.state is RolloutState.ABORTED and "failed" in (rollout.reason or "")
