"""Review fixes on the fleet CLI: bad polling options are one clear line, never a traceback, and
are refused before anything is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeship.toolkit.cli import main
from edgeship.toolkit.store import FleetStore


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf"])
def test_bad_watch_interval_is_one_line_and_exit_2(db: str, interval: str) -> None:
    rollout_id = _run("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--db", db).stdout.strip()
    for args in (["--watch"], ["--watch", "--json"]):
        result = _run("rollout", "status", rollout_id, *args, "--interval", interval, "--db", db)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.stderr.startswith("error: --interval") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("interval", ["-1", "0", "nan"])
def test_bad_wait_interval_is_refused_before_the_rollout_is_recorded(db: str, interval: str) -> None:
    result = _run("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--wait", "--interval", interval,
                  "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --interval")
    with FleetStore(db) as store:
        assert store.list_rollouts(None, None, 50) == []


@pytest.mark.parametrize("args", [["rollout", "ls", "--limit", "0"], ["rollout", "ls", "--limit", "-1"]])
def test_bad_limit_is_one_line(db: str, args: list[str]) -> None:
    result = _run(*args, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --limit")


# -- controller credentials from options (issue 5: "credentials from options or the environment") --

def test_controller_password_without_username_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESHIP_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGESHIP_MQTT_PASSWORD", raising=False)
    result = _run("controller", "--broker", "mqtt://127.0.0.1:1", "--repo", str(tmp_path), "--password", "pw",
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
    assert _run("keys", "init", "--repo", str(repo)).exit_code == 0
    try:
        # the environment holds the right password; the options' wrong one must be the one used
        monkeypatch.setenv("EDGESHIP_MQTT_USERNAME", "ctl")
        monkeypatch.setenv("EDGESHIP_MQTT_PASSWORD", "right")
        result = _run("controller", "--broker", broker.url, "--repo", str(repo), "--username", "ctl",
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

    return make_release_repo(tmp_path_factory.mktemp("review-repo"), digits_tflite, ["1.0.0"])


def test_rollout_and_abtest_check_the_release_repository(db: str, published_repo: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    repo = str(published_repo)
    refused = _run("rollout", "start", "digits", "9.9.9", "--fleet", "plant", "--repo", repo, "--db", db)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: bundle digits 9.9.9 is not published")
    monkeypatch.setenv("EDGESHIP_REPO", repo)  # the same check from the environment
    refused = _run("abtest", "start", "digits:1.0.0", "digits:9.9.9", "--fleet", "plant", "--metric", "accuracy",
                   "--db", db)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: bundle digits 9.9.9 is not published")
    with FleetStore(db) as store:
        assert store.list_rollouts(None, None, 50) == [] and store.list_abtests() == []
    ok = _run("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--db", db)
    assert ok.exit_code == 0, ok.output
    monkeypatch.delenv("EDGESHIP_REPO")
    assert _run("rollout", "start", "other", "1.0.0", "--fleet", "plant", "--db", db).exit_code == 0  # no repo: no check


def test_deploy_checks_the_release_repository(db: str, published_repo: Path) -> None:
    result = _run("deploy", "digits", "9.9.9", "--device", "cam-1", "--repo", str(published_repo), "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: bundle digits 9.9.9 is not published")


@pytest.mark.parametrize("url", ["mqtt://h:99999", "mqtt://h:0", "mqtts://user:pw@h:8883"])
def test_fleet_commands_check_broker_urls_like_the_controller(db: str, url: str) -> None:
    result = _run("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--broker", url, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: broker URL") and result.stderr.count("\n") == 1


def test_ipv6_broker_urls_are_accepted_like_the_controller(db: str) -> None:
    result = _run("rollout", "start", "digits", "1.0.0", "--fleet", "plant", "--broker", "mqtt://[::1]:1883",
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
        rollout_id = _run("rollout", "start", "digits", "2.0", "--fleet", "plant", "--db", db).stdout.strip()
        sim.tick()
        doc = json.loads(_run("rollout", "status", rollout_id, "--devices", "--json", "--db", db).stdout)
    assert doc["stage"] == 1
    assert [p["stage"] for p in doc["stage_progress"]] == [1, 2, 3]
    current = [p for p in doc["stage_progress"] if p["stage"] == doc["stage"]]
    assert len(current) == 1 and current[0]["assigned"] == 1
    moved = [d for d in doc["devices"] if d["status"] != "PENDING"]
    assert len(moved) == 1 and moved[0]["stage"] == 1
    assert all(d["stage"] is None for d in doc["devices"] if d["status"] == "PENDING")
