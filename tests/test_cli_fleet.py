"""``edgeship rollout`` and ``edgeship abtest`` on a real store, with the controller's reconcile
loop and the devices simulated over the same store (tests/fleet_fixtures.py:SimulatedFleet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fleet_fixtures import SimulatedFleet

from edgeship.ota.protocol import TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.abtest import assign_arm
from edgeship.toolkit.cli import main
from edgeship.toolkit.rollouts import RollbackDevice, RolloutState
from edgeship.toolkit.store import FleetStore, IngestItem

FLEET = "plant1"


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def store(db: str) -> Iterator[FleetStore]:
    with FleetStore(db) as opened:
        yield opened


def run(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.stderr if hasattr(result, "stderr") else "")
    return result


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


# -- rollout -----------------------------------------------------------------------------------

def test_start_prints_the_id_and_records_the_rollout(db: str, store: FleetStore) -> None:
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db).stdout.strip()
    assert rollout_id.startswith("r-")
    loaded, _ = store.load_rollout(rollout_id)
    assert (loaded.name, loaded.version, loaded.state) == ("digits", "2.0", RolloutState.RUNNING)
    doc = run_json("rollout", "start", "other", "1.0", "--fleet", FLEET, "--db", db, "--select", "site=x",
                   "--stages", "10,100", "--max-failures", "2", "--health", "max_error_rate=5%",
                   "--stage-timeout", "5m", "--bake", "30s")
    loaded, _ = store.load_rollout(doc["id"])
    assert loaded.selection == (("site", "x"),)
    policy = loaded.policy
    assert (policy.stages, str(policy.max_failures), policy.health.max_error_rate, policy.stage_timeout_s,
            policy.bake_s) == ((10.0, 100.0), "2", 0.05, 300.0, 30.0)


def test_the_store_comes_from_the_environment(db: str, store: FleetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_DB", db)
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET).stdout.strip()
    assert store.load_rollout(rollout_id)[0].fleet == FLEET


@pytest.mark.parametrize("args, fragment", [
    (["--stages", "5,25"], "last stage must be 100"),
    (["--max-failures", "lots"], "--max-failures"),
    (["--health", "max_latency=3"], "unknown gate"),
    (["--stage-timeout", "soon"], "duration"),
    (["--success-threshold", "0"], "success threshold"),
    (["--select", "site"], "TAG=VALUE"),
    (["--broker", "http://x:1"], "mqtt://HOST:PORT"),
])
def test_bad_rollout_options_are_one_line_and_exit_2(db: str, args: list[str], fragment: str) -> None:
    result = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db, *args, code=2)
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize("name, version, fleet", [("Digits", "2.0", FLEET), ("digits", "two", FLEET),
                                                  ("digits", "2.0", "bad/fleet")])
def test_bad_names_exit_2(db: str, name: str, version: str, fleet: str) -> None:
    run("rollout", "start", name, version, "--fleet", fleet, "--db", db, code=2)


def test_a_second_rollout_of_the_same_bundle_is_refused(db: str) -> None:
    first = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db).stdout.strip()
    result = run("rollout", "start", "digits", "3.0", "--fleet", FLEET, "--db", db, code=2)
    assert first in result.stderr


def test_status_ls_and_operator_commands(db: str, store: FleetStore) -> None:
    sim = SimulatedFleet(store, FLEET, 20)
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db).stdout.strip()
    sim.tick()  # the controller assigns the canary; the device answers (the store has not stepped yet)
    doc = run_json("rollout", "status", rollout_id, "--db", db)
    assert doc["state"] == "RUNNING" and doc["counts"] == {"ASSIGNED": 1, "PENDING": 19}
    assert [p["target"] for p in doc["stage_progress"]] == [1, 5, 20]
    human = run("rollout", "status", rollout_id, "--db", db, "--devices").stdout
    assert rollout_id in human and "RUNNING" in human and "dev-" in human

    assert run_json("rollout", "pause", rollout_id, "--db", db)["state"] == "PAUSED"
    sim.tick()
    doc = run_json("rollout", "status", rollout_id, "--db", db)
    assert doc["counts"] == {"SUCCEEDED": 1, "PENDING": 19}  # statuses follow; nothing new moved
    run("rollout", "pause", rollout_id, "--db", db, code=2)  # already paused
    assert "RUNNING" in run("rollout", "resume", rollout_id, "--db", db).stdout
    sim.tick()
    doc = run_json("rollout", "status", rollout_id, "--db", db)
    assert doc["counts"] == {"SUCCEEDED": 1, "ASSIGNED": 4, "PENDING": 15} and doc["stage"] == 2

    aborted = run_json("rollout", "abort", rollout_id, "--db", db, "--reason", "operator saw a bad canary")
    assert aborted["state"] == "ABORTED" and aborted["rollbacks_queued"] == 5
    assert {a["version"] for a in aborted["rollbacks"]} == {"1.0"}
    queued = [p.action for p in store.pending_actions() if isinstance(p.action, RollbackDevice)]
    assert len(queued) == 5
    sim.tick()
    assert {store.get_device(a.device).active_version for a in queued} == {"1.0"}
    run("rollout", "abort", rollout_id, "--db", db, code=2)
    run("rollout", "rollback", rollout_id, "--db", db, code=2)

    listed = run_json("rollout", "ls", "--db", db)
    assert [r["id"] for r in listed] == [rollout_id] and listed[0]["state"] == "ABORTED"
    assert run_json("rollout", "ls", "--db", db, "--state", "running") == []
    assert rollout_id in run("rollout", "ls", "--db", db).stdout
    assert run("rollout", "status", "r-nope", "--db", db, code=2).stderr.startswith("error: unknown rollout")


def test_rollback_of_a_completed_rollout(db: str, store: FleetStore) -> None:
    sim = SimulatedFleet(store, FLEET, 6)
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db).stdout.strip()
    for _ in range(4):
        sim.tick()
    doc = run_json("rollout", "status", rollout_id, "--db", db)
    assert doc["state"] == "COMPLETED" and doc["counts"] == {"SUCCEEDED": 6}
    done = run_json("rollout", "rollback", rollout_id, "--db", db)
    assert done["state"] == "ROLLED_BACK" and done["rollbacks_queued"] == 6


def test_watch_follows_until_the_rollout_finishes(db: str, store: FleetStore) -> None:
    sim = SimulatedFleet(store, FLEET, 10)
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db).stdout.strip()
    stop = threading.Event()

    def controller() -> None:
        while not stop.is_set():
            sim.tick()
            time.sleep(0.05)

    thread = threading.Thread(target=controller)
    thread.start()
    try:
        doc = run_json("rollout", "status", rollout_id, "--db", db, "--watch", "--interval", "0.05")
    finally:
        stop.set()
        thread.join()
    assert doc["state"] == "COMPLETED" and doc["counts"] == {"SUCCEEDED": 10}
    # A finished rollout: --watch returns at once, human output too.
    assert "COMPLETED" in run("rollout", "status", rollout_id, "--db", db, "--watch").stdout


def _controller_thread(sim: SimulatedFleet, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            sim.tick()
            time.sleep(0.05)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


@pytest.mark.parametrize("failing, code, state", [(False, 0, "COMPLETED"), (True, 3, "ABORTED")])
def test_start_wait_in_a_real_process(db: str, store: FleetStore, failing: bool, code: int, state: str) -> None:
    sim = SimulatedFleet(store, FLEET, 12, fail={f"dev-{i:03d}" for i in range(12)} if failing else None)
    stop = threading.Event()
    thread = _controller_thread(sim, stop)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", "2.0", "--fleet", FLEET,
             "--wait", "--interval", "0.1", "--json"],
            env={**os.environ, "EDGESHIP_DB": db}, capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop.set()
        thread.join()
    assert process.returncode == code, process.stderr
    doc = json.loads(process.stdout)
    assert doc["state"] == state
    if failing:
        assert process.stderr.strip().splitlines()[-1].startswith(f"error: rollout {doc['id']} ABORTED")
        assert doc["counts"]["ROLLBACK_SENT"] == 1  # stopped at its first stage (5% of 12 = 1 device)


@pytest.mark.parametrize("devices, failing, code, state, reason", [
    (12, False, 0, "COMPLETED", "every selected device has the version"),
    (12, True, 3, "ABORTED", "above the failure threshold"),
    (0, False, 3, "ABORTED", "no device matched the selection within the stage timeout (5 s)"),
])
def test_start_wait_through_a_pipe_prints_each_change_and_ends_with_the_state(
        db: str, store: FleetStore, devices: int, failing: bool, code: int, state: str, reason: str) -> None:
    sim = SimulatedFleet(store, FLEET, devices, fail=set(sim_ids(devices)) if failing else None)
    stop = threading.Event()
    thread = _controller_thread(sim, stop)
    try:  # stdout and stderr are pipes, as in `edgeship rollout start ... --wait | tee log`
        process = subprocess.run(
            [sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", "2.0", "--fleet", FLEET,
             "--wait", "--interval", "0.1", "--stage-timeout", "5s"],
            env={**os.environ, "EDGESHIP_DB": db}, capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop.set()
        thread.join()
    assert process.returncode == code, (process.stdout, process.stderr)
    lines = process.stdout.strip().splitlines()
    # a line per change, not one silent wait; with no device the simulated clock (2 s a tick) can end
    # the stage before the first poll, and the one line is then the final state
    assert len(lines) >= (2 if devices else 1), lines
    assert all(" rollout r-" in line for line in lines), lines
    assert f" {state} " in lines[-1] and reason in lines[-1], lines[-1]
    assert len(set(line.split(" ", 1)[1] for line in lines)) == len(lines)  # only changes are printed
    if code:
        assert process.stderr.strip().splitlines()[-1].startswith("error: rollout r-")


def sim_ids(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


def test_start_wait_timeout_leaves_the_rollout_running_and_exits_1(db: str, store: FleetStore) -> None:
    SimulatedFleet(store, FLEET, 3)  # devices that never answer: no controller runs
    result = subprocess.run(
        [sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", "2.0", "--fleet", FLEET,
         "--wait", "--interval", "0.1", "--timeout", "1s"],
        env={**os.environ, "EDGESHIP_DB": db}, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "still RUNNING after --timeout 1 s" in result.stderr
    assert " RUNNING " in result.stdout.strip().splitlines()[-1]


# -- abtest ------------------------------------------------------------------------------------

def _latency_window(rng: np.random.Generator, scale: float, version: str) -> TelemetryMessage:
    histogram = LatencyHistogram()
    for value in rng.lognormal(np.log(scale), 0.3, 100):
        histogram.observe(float(value))
    return TelemetryMessage(ts=1.0, window_s=10.0, requests=100, errors=0, latency=histogram,
                            bundle={"name": "digits", "version": version})


def test_abtest_start_report_promote(db: str, store: FleetStore) -> None:
    test_id = run("abtest", "start", "digits:1.0", "digits:2.0", "--fleet", FLEET, "--metric", "latency_p95",
                  "--min-samples", "20", "--db", db).stdout.strip()
    assert test_id.startswith("ab-")
    run("abtest", "start", "digits:1.0", "digits:2.0", "--fleet", FLEET, "--metric", "latency_p95", "--db", db,
        code=2)  # one running test per fleet and selection
    report = run_json("abtest", "report", test_id, "--db", db)
    assert report["significant"] is False and "not enough data yet" in report["verdict"]
    run("abtest", "promote", test_id, "--db", db, code=3)  # no winner yet

    rng = np.random.default_rng(5)
    devices = [f"dev-{i:02d}" for i in range(24)]
    items = []
    for device in devices:
        b = assign_arm(test_id, device, 50.0) == "B"
        for _ in range(4):
            message = _latency_window(rng, 6.0 if b else 12.0, "2.0" if b else "1.0")
            items.append(IngestItem(FLEET, device, message, time.time()))
    store.ingest(items)
    report = run_json("abtest", "report", test_id, "--db", db)
    assert report["winner"] == "B" and report["verdict"].startswith("B is faster, p ")
    assert report["arms"]["A"]["n"] + report["arms"]["B"]["n"] == 96
    human = run("abtest", "report", test_id, "--db", db).stdout
    assert "B is faster" in human and "welch_t" in human

    promoted = run_json("abtest", "promote", test_id, "--db", db, "--stages", "50,100")
    assert (promoted["arm"], promoted["version"]) == ("B", "2.0")
    rollout, _ = store.load_rollout(promoted["id"])
    assert rollout.version == "2.0" and rollout.policy.stages == (50.0, 100.0)
    assert store.get_abtest(test_id) == (store.get_abtest(test_id)[0], promoted["id"])
    run("abtest", "promote", test_id, "--db", db, code=2)  # already promoted
    assert [t["state"] for t in run_json("abtest", "ls", "--db", db)] == ["PROMOTED"]


def test_abtest_promote_a_chosen_arm_and_stop(db: str, store: FleetStore) -> None:
    test_id = run("abtest", "start", "digits:1.0", "digits:2.0", "--fleet", FLEET, "--metric", "accuracy",
                  "--db", db).stdout.strip()
    rollout_id = run("abtest", "promote", test_id, "--arm", "A", "--db", db).stdout.strip()
    assert store.load_rollout(rollout_id)[0].version == "1.0"
    # The promoted rollout of digits runs: no new A/B test of digits until it finishes.
    run("abtest", "start", "digits:1.0", "digits:3.0", "--fleet", FLEET, "--metric", "error_rate", "--db", db,
        code=2)
    other = run("abtest", "start", "other:1.0", "other:3.0", "--fleet", FLEET, "--metric", "error_rate",
                "--split", "10", "--db", db).stdout.strip()
    assert run_json("abtest", "stop", other, "--db", db)["state"] == "STOPPED"
    run("abtest", "stop", other, "--db", db, code=2)


@pytest.mark.parametrize("args", [["digits", "digits:2.0"], ["digits:1.0", "digits:1.0"],
                                  ["digits:1.0", "digits:2.0", "--split", "100"],
                                  ["digits:1.0", "digits:2.0", "--min-samples", "1"]])
def test_abtest_bad_input(db: str, args: list[str]) -> None:
    result = run("abtest", "start", *args, "--fleet", FLEET, "--metric", "accuracy", "--db", db, code=2)
    assert result.stderr.startswith("error: ")


def _window(version: str, latency_ms: float, requests: int, errors: int = 0) -> TelemetryMessage:
    histogram = LatencyHistogram()
    for i in range(requests):
        histogram.observe(latency_ms * (0.9 + 0.2 * i / requests))
    return TelemetryMessage(ts=time.time(), window_s=10.0, requests=requests, errors=errors, latency=histogram,
                            bundle={"name": "digits", "version": version})


@pytest.mark.parametrize("gate, new_latency, new_errors, fragment", [
    ("max_p95_ratio=1.5,min_requests=100", 20.0, 0, "p95 latency"),
    ("max_error_rate=0.05,min_requests=100", 5.0, 30, "error rate 15.00%"),
])
def test_health_gates_abort_from_the_devices_own_telemetry(db: str, store: FleetStore, gate: str,
                                                           new_latency: float, new_errors: int,
                                                           fragment: str) -> None:
    sim = SimulatedFleet(store, FLEET, 20)
    rollout_id = run("rollout", "start", "digits", "2.0", "--fleet", FLEET, "--db", db, "--health", gate,
                     "--bake", "1h").stdout.strip()  # the bake keeps stage 1 open while telemetry arrives
    store.ingest([IngestItem(FLEET, d, _window("1.0", 5.0, 50), time.time()) for d in sim.devices])
    sim.tick()
    [canary] = [d for d, r in store.load_rollout(rollout_id)[0].devices.items() if r.status.value == "ASSIGNED"]
    sim.tick()
    assert run_json("rollout", "status", rollout_id, "--db", db)["state"] == "RUNNING"  # no data on 2.0 yet
    store.ingest([IngestItem(FLEET, canary, _window("2.0", new_latency, 200, new_errors), time.time())])
    sim.tick()
    doc = run_json("rollout", "status", rollout_id, "--db", db)
    assert doc["state"] == "ABORTED" and fragment in doc["reason"], doc["reason"]
    assert doc["health"]["new_requests"] == 200 and doc["health"]["baseline_requests"] == 1000
    assert store.get_device(canary).active_version == "1.0"  # rolled back by the simulated controller


def test_a_store_of_another_shape_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A database the fleet store did not make (or an older layout): SQLAlchemy's error
    becomes one line and exit 1 at the CLI edge."""
    import sqlite3

    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table rollouts(id text)")
    result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "ls", "--db", f"sqlite:///{db}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: fleet store: OperationalError: no such column: rollouts.fleet"], result.stderr


@pytest.mark.parametrize("args", [["rollout", "ls"], ["fleet", "ls"], ["abtest", "ls"], ["rollout", "status", "r-1"],
                                  ["device", "show", "dev-1"]])
def test_a_mistyped_store_is_refused_not_created(tmp_path: Path, args: list[str]) -> None:
    """Commands that read what is there refuse a SQLite store that does not exist, instead
    of showing an empty fleet and leaving a new file behind."""
    db = tmp_path / "typo.db"
    result = CliRunner().invoke(main, [*args, "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2 and f"no fleet store at {db}" in result.output, result.output
    assert not db.exists()


def test_tables_through_a_pipe_are_never_cut(db: str, store: FleetStore) -> None:
    sim = SimulatedFleet(store, "a-fleet-with-a-rather-long-name", 3, fail={"dev-000"})
    run("rollout", "start", "digits", "2.0", "--fleet", sim.fleet, "--stages", "100", "--max-failures", "5",
        "--db", db)
    for _ in range(5):
        sim.tick()
    env = {**os.environ, "EDGESHIP_DB": db, "COLUMNS": "40"}  # a narrow $COLUMNS must not matter in a pipe
    for args, whole in ((["fleet", "ls"], ["a-fleet-with-a-rather-long-name", "COMMITTED", "last seen",
                                           "p95 (15m)"]),
                        (["rollout", "ls"], ["a-fleet-with-a-rather-long-name", "digits 2.0", "ABORTED",
                                             "started (UTC)"])):
        out = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", *args], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert "…" not in out, out
        for text in whole:
            assert text in out, (text, out)
        as_json = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", *args, "--json"], env=env,
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        json.loads(as_json)  # --json unchanged: one document


# -- bad options: one clear line, never a traceback, and refused before anything is recorded -----


def invoke(*args: str) -> Any:
    """The CLI's result, whatever its exit status (the tests below assert it)."""
    return CliRunner().invoke(main, list(args))




@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf"])
def test_bad_watch_interval_is_one_line_and_exit_2(db: str, interval: str) -> None:
    rollout_id = invoke("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--db", db).stdout.strip()
    for args in (["--watch"], ["--watch", "--json"]):
        result = invoke("rollout", "status", rollout_id, *args, "--interval", interval, "--db", db)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.stderr.startswith("error: --interval") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("interval", ["-1", "0", "nan"])
def test_bad_wait_interval_is_refused_before_the_rollout_is_recorded(db: str, interval: str) -> None:
    result = invoke("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--wait", "--interval", interval,
                  "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --interval")
    with FleetStore(db) as store:
        assert store.list_rollouts(None, None, 50) == []


@pytest.mark.parametrize("args", [["rollout", "ls", "--limit", "0"], ["rollout", "ls", "--limit", "-1"]])
def test_bad_limit_is_one_line(db: str, args: list[str]) -> None:
    result = invoke(*args, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --limit")


# -- controller credentials from options or the environment; the options win -----------------------

def test_controller_password_without_username_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESHIP_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGESHIP_MQTT_PASSWORD", raising=False)
    result = invoke("controller", "--broker", "mqtt://127.0.0.1:1", "--repo", str(tmp_path), "--password", "pw",
                  "--db", f"sqlite:///{tmp_path / 'f.db'}")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: a broker password was given without a username")


@pytest.mark.mosquitto
def test_controller_username_and_password_options_beat_the_environment(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from mqtt_broker import MosquittoBroker

    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "ctl", "right"], check=True, capture_output=True)
    broker = MosquittoBroker(
        tmp_path / "m", f"listener {{port}} 127.0.0.1\nuser root\nallow_anonymous false\npassword_file {passwd}\n"
    ).start()
    monkeypatch.setenv("EDGESHIP_ROOT_PASSPHRASE", "a long passphrase")
    repo = tmp_path / "repo"
    assert invoke("keys", "init", "--repo", str(repo)).exit_code == 0
    try:
        # the environment holds the right password; the options' wrong one must be the one used
        monkeypatch.setenv("EDGESHIP_MQTT_USERNAME", "ctl")
        monkeypatch.setenv("EDGESHIP_MQTT_PASSWORD", "right")
        result = invoke("controller", "--broker", broker.url, "--repo", str(repo), "--username", "ctl",
                      "--password", "wrong", "--db", f"sqlite:///{tmp_path / 'f.db'}")
        assert result.exit_code != 0
        assert "refused the connection" in result.stderr and "Traceback" not in result.output
    finally:
        broker.stop()


# -- a rollout or A/B test of a version that is not published is refused when --repo is known --
# (without the check, the controller cannot sign it: every device of the first stage times out)

@pytest.fixture(scope="module")
def published_repo(digits_tflite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from controller_fixtures import make_release_repo

    return make_release_repo(tmp_path_factory.mktemp("published-repo"), digits_tflite, ["1.0.0"])


def test_rollout_and_abtest_check_the_release_repository(db: str, published_repo: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    repo = str(published_repo)
    refused = invoke("rollout", "start", "digits", "9.9.9", "--fleet", "plant", "--repo", repo, "--db", db)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: bundle digits 9.9.9 is not published")
    monkeypatch.setenv("EDGESHIP_REPO", repo)  # the same check from the environment
    refused = invoke("abtest", "start", "digits:1.0.0", "digits:9.9.9", "--fleet", "plant", "--metric", "accuracy",
                   "--db", db)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: bundle digits 9.9.9 is not published")
    with FleetStore(db) as store:
        assert store.list_rollouts(None, None, 50) == [] and store.list_abtests() == []
    ok = invoke("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--db", db)
    assert ok.exit_code == 0, ok.output
    monkeypatch.delenv("EDGESHIP_REPO")
    assert invoke("rollout", "start", "other", "1.0.0", "--fleet", "plant", "--db", db).exit_code == 0  # no repo: no check


def test_deploy_checks_the_release_repository(db: str, published_repo: Path) -> None:
    result = invoke("deploy", "digits", "9.9.9", "--device", "cam-1", "--repo", str(published_repo), "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: bundle digits 9.9.9 is not published")


@pytest.mark.parametrize("url", ["mqtt://h:99999", "mqtt://h:0", "mqtts://user:pw@h:8883"])
def test_fleet_commands_check_broker_urls_like_the_controller(db: str, url: str) -> None:
    result = invoke("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--broker", url, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: broker URL") and result.stderr.count("\n") == 1


def test_ipv6_broker_urls_are_accepted_like_the_controller(db: str) -> None:
    result = invoke("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--broker", "mqtt://[::1]:1883",
                  "--db", db)
    assert result.exit_code == 0, result.output


def test_port_zero_is_refused_not_silently_the_default() -> None:
    from edgeship.ota.errors import BadInputError
    from edgeship.ota.transport import parse_broker_url

    with pytest.raises(BadInputError, match="port 0"):
        parse_broker_url("mqtt://127.0.0.1:0", environ={})
    assert parse_broker_url("mqtt://127.0.0.1", environ={}).port == 1883


def test_status_json_numbers_stages_from_1_everywhere(db: str) -> None:
    """``stage`` is 1-based at the top of ``rollout status --json``; the per-stage rows and the device
    records must use the same numbering, or a script matching them is off by one."""
    import json

    from fleet_fixtures import SimulatedFleet

    from edgeship.toolkit.store import FleetStore

    with FleetStore(db) as store:
        sim = SimulatedFleet(store, "plant", 20)
        rollout_id = invoke("rollout", "start", "digits", "2.0", "--fleet", "plant", "--db", db).stdout.strip()
        sim.tick()
        doc = json.loads(invoke("rollout", "status", rollout_id, "--devices", "--json", "--db", db).stdout)
    assert doc["stage"] == 1
    assert [p["stage"] for p in doc["stage_progress"]] == [1, 2, 3]
    current = [p for p in doc["stage_progress"] if p["stage"] == doc["stage"]]
    assert len(current) == 1 and current[0]["assigned"] == 1
    moved = [d for d in doc["devices"] if d["status"] != "PENDING"]
    assert len(moved) == 1 and moved[0]["stage"] == 1
    assert all(d["stage"] is None for d in doc["devices"] if d["status"] == "PENDING")
