"""Provisioning over a real sshd on loopback, onto a "device" that is a dedicated
user of this machine, with the agent really started and a real Mosquitto from
`broker config`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import connect, creds, start_broker
from click.testing import CliRunner
from mqtt_broker import free_port, mosquitto_binary
from provision_fixtures import (
    Sshd,
    build_offline_wheelhouse,
    make_device_account,
    make_user_key,
    sshd_binary,
    world_readable_tempdir,
)

from edgeship.toolkit.cli import main

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.mosquitto,
    pytest.mark.skipif(sshd_binary() is None or shutil.which("ssh-keygen") is None,
                       reason="openssh-server is not installed (.ci/run installs it)"),
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_offline_wheelhouse(tmp_path_factory.mktemp("wheelhouse"), "onnx")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from edgeship.ota.release import ReleaseRepository

    base = world_readable_tempdir("edgeship-provision-")
    account = make_device_account(base)
    key, pub = make_user_key(tmp_path_factory.mktemp("sshkey"))
    (base / "sshd").mkdir()
    sshd = Sshd(base / "sshd", pub).start()
    repo = ReleaseRepository(tmp_path_factory.mktemp("repo") / "repo")
    repo.init(root_passphrase="correct horse battery staple")
    broker = start_broker(tmp_path_factory.mktemp("prov-broker"), auth="cert")
    lab = {"base": base, "account": account, "key": key, "sshd": sshd, "repo": repo.path, "broker": broker,
           "target": f"{account.user}@127.0.0.1", "prefix": account.home / "edgeship" if account.created
           else base / "device-prefix", "bind": f"127.0.0.1:{free_port()}"}
    try:
        yield lab
    finally:
        pidfile = Path(lab["prefix"]) / "run" / "agent.pid"
        if pidfile.exists():  # the agent this module started, by its pid
            try:
                os.kill(int(pidfile.read_text().strip()), 9)
            except (ProcessLookupError, ValueError):
                pass
        sshd.stop()
        broker.stop()
        account.remove()
        shutil.rmtree(base, ignore_errors=True)


def cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def common(lab: dict[str, Any], *extra: str) -> list[str]:
    args = [lab["target"], "--port", str(lab["sshd"].port), "--identity", str(lab["key"]), "--fleet", "f1"]
    if not lab["account"].created:
        args += ["--prefix", str(lab["prefix"])]
    return args + list(extra)


def steps(doc: dict[str, Any]) -> dict[str, str]:
    return {s["step"]: s["status"] for s in doc["steps"]}


def agent_pid(lab: dict[str, Any]) -> int:
    return int((Path(lab["prefix"]) / "run" / "agent.pid").read_text().strip())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and b"edgeship-agent" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_host_that_is_too_small_is_refused_before_anything_changes(lab: dict[str, Any]) -> None:
    r = cli(["device", "provision", *common(lab, "--repo", str(lab["repo"]), "--min-memory-mb", "100000000",
                                           "--min-disk-mb", "900000000")])
    assert r.exit_code == 3, r.output
    error = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "refused, nothing was changed" in error[0]
    assert "MB memory available, the agent needs 100000000 MB" in error[0] and "MB free disk" in error[0]
    assert not Path(lab["prefix"]).exists()


def test_dry_run_prints_every_step_and_changes_nothing(lab: dict[str, Any], wheelhouse: Path) -> None:
    r = cli(["device", "provision", *common(lab, "--repo", str(lab["repo"]), "--wheelhouse", str(wheelhouse),
                                           "--broker-dir", str(lab["broker"].folder.path), "--device-id", "dev-ssh",
                                           "--dry-run", "--json")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    got = steps(doc)
    assert got["check host"] == "unchanged"
    for name in ("upload wheels", "virtual environment", "install edgeship[onnx]", "trust files",
                 "broker credentials", "agent config", "start agent", "wait online"):
        assert got[name] == "planned", (name, got)
    assert not Path(lab["prefix"]).exists()
    assert lab["broker"].folder.record("dev-ssh") is None  # no credentials issued by a dry run


@pytest.mark.slow
def test_provision_is_idempotent_repairs_and_deprovisions(lab: dict[str, Any], wheelhouse: Path, tmp_path: Path) -> None:
    broker = lab["broker"]
    args = common(lab, "--repo", str(lab["repo"]), "--wheelhouse", str(wheelhouse), "--broker-dir",
                  str(broker.folder.path), "--device-id", "dev-ssh", "--tags", "site=lab", "--bind", lab["bind"],
                  "--online-timeout", "30", "--json")
    t0 = time.monotonic()
    first = cli(["device", "provision", *args])
    first_s = time.monotonic() - t0
    assert first.exit_code == 0, first.output
    doc = json.loads(first.output[first.output.index("{"):])
    assert doc["changed"] and doc["device_id"] == "dev-ssh"
    got = steps(doc)
    for name in ("upload wheels", "virtual environment", "install edgeship[onnx]", "trust files",
                 "broker credentials", "agent config", "start agent"):
        assert got[name] == "changed", (name, got)
    assert got["systemd unit"] == "skipped"  # no systemd here: the setsid/nohup fallback
    prefix = Path(lab["prefix"])
    pid = agent_pid(lab)
    assert alive(pid), (prefix / "log" / "agent.log").read_text()[-2000:]
    if lab["account"].created:  # the agent runs as the device's own user
        assert os.stat(f"/proc/{pid}").st_uid == os.stat(prefix).st_uid != 0
    host, port = lab["bind"].split(":")
    deadline = time.monotonic() + 20
    while True:  # the agent's HTTP API answers
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, (prefix / "log" / "agent.log").read_text()[-2000:]
            time.sleep(0.2)
    # the agent connected to Mosquitto with the credentials provisioning gave it, and said so
    assert got["wait online"] == "changed", (got, doc["notes"])
    # the device's credentials work at the broker, with the broker's rules
    device_creds = creds(prefix / "etc" / "broker")
    client, outcome = connect(broker.settings.port, ca=device_creds["ca"], cert=device_creds["cert"],
                              key=device_creds["key"])
    assert client is not None, outcome
    client.close()
    kept = tmp_path / "kept-creds"
    shutil.copytree(prefix / "etc" / "broker", kept)
    state = json.loads((prefix / "provision.json").read_text())
    assert state["tags"] == {"site": "lab"} and state["device_id"] == "dev-ssh"
    assert (prefix / "etc" / "broker" / "client.key").stat().st_mode & 0o077 == 0

    # run again: nothing changes, the agent is not restarted
    t0 = time.monotonic()
    second = cli(["device", "provision", *args])
    second_s = time.monotonic() - t0
    assert second.exit_code == 0, second.output
    doc2 = json.loads(second.output[second.output.index("{"):])
    assert not doc2["changed"], steps(doc2)
    assert set(steps(doc2).values()) <= {"unchanged", "skipped"}
    assert agent_pid(lab) == pid and alive(pid)
    assert json.loads((prefix / "provision.json").read_text()) == state
    print(f"\nprovision: first run {first_s:.1f} s, second (no change) {second_s:.1f} s")

    # a damaged trust file is repaired, and the agent restarted to read it
    (prefix / "etc" / "trust" / "root.json").write_text("{}")
    third = cli(["device", "provision", *args])
    assert third.exit_code == 0, third.output
    got3 = steps(json.loads(third.output[third.output.index("{"):]))
    assert got3["trust files"] == "changed" and got3["start agent"] == "changed"
    assert got3["install edgeship[onnx]"] == "unchanged" and got3["broker credentials"] == "unchanged"
    assert (prefix / "etc" / "trust" / "root.json").read_bytes() == (Path(lab["repo"]) / "metadata" / "root.json").read_bytes()
    new_pid = agent_pid(lab)
    assert new_pid != pid and alive(new_pid) and not alive(pid)

    # deprovision: agent stopped, files removed, credentials revoked at the running broker
    gone = cli(["device", "deprovision", lab["target"], "--port", str(lab["sshd"].port), "--identity",
                str(lab["key"]), "--broker-dir", str(broker.folder.path), "--json",
                *([] if lab["account"].created else ["--prefix", str(prefix)])])
    assert gone.exit_code == 0, gone.output
    got4 = steps(json.loads(gone.output[gone.output.index("{"):]))
    assert got4["stop agent"] == "changed" and got4["remove files"] == "changed"
    assert got4["revoke credentials"] == "changed"
    assert not prefix.exists()
    time.sleep(0.3)
    assert not alive(new_pid)
    assert not broker.folder.record("dev-ssh").active  # type: ignore[union-attr]
    time.sleep(0.5)
    client, outcome = connect(broker.settings.port, ca=kept / "ca.crt", cert=kept / "client.crt", key=kept / "client.key")
    assert client is None, "a deprovisioned device still got into the broker"
    again = cli(["device", "deprovision", lab["target"], "--port", str(lab["sshd"].port), "--identity",
                 str(lab["key"]), "--broker-dir", str(broker.folder.path), "--device-id", "dev-ssh", "--json",
                 *([] if lab["account"].created else ["--prefix", str(prefix)])])
    assert again.exit_code == 0 and not json.loads(again.output[again.output.index("{"):])["changed"]


def test_fleet_provision_reports_failures_without_stopping_the_others(lab: dict[str, Any], tmp_path: Path) -> None:
    """Two hosts refused for size, one unreachable: all three are tried, the summary names each."""
    closed = free_port()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(
        f"# lab devices\n{lab['target']}:{lab['sshd'].port} id=dev-f1 site=a\n"
        f"{lab['account'].user}@localhost:{lab['sshd'].port} id=dev-f2\n"
        f"nobody@127.0.0.1:{closed} id=dev-f3   # nothing listens here\n"
    )
    from edgeship.toolkit.commands.device import (
        fleet_provision,  # the lead attaches it as `fleet provision`
    )

    result = CliRunner().invoke(fleet_provision, [
        str(hosts), "--parallel", "3", "--identity", str(lab["key"]), "--fleet", "f1", "--repo", str(lab["repo"]),
        "--min-memory-mb", "100000000", "--json", *([] if lab["account"].created else ["--prefix", str(lab["prefix"])]),
    ], catch_exceptions=False)
    assert result.exit_code == 1, result.output  # one unreachable host: a failure, not only refusals
    doc = json.loads(result.output[result.output.index("{\n"):])
    assert doc["failed"] == 3
    by_target = {h["target"]: h for h in doc["hosts"]}
    assert "refused" in by_target[f"{lab['target']}:{lab['sshd'].port}"]["error"]
    assert by_target[f"{lab['target']}:{lab['sshd'].port}"]["exit_code"] == 3
    assert "cannot reach" in by_target[f"nobody@127.0.0.1:{closed}"]["error"]


@pytest.mark.slow
def test_a_password_device_comes_online_through_its_env_file(lab: dict[str, Any], wheelhouse: Path,
                                                            tmp_path: Path) -> None:
    """Password credentials reach the agent through etc/agent.env (0600), which edgeship.ota.transport reads."""
    broker = start_broker(tmp_path, auth="password")
    prefix = Path(lab["prefix"])
    base = common(lab, "--repo", str(lab["repo"]), "--wheelhouse", str(wheelhouse), "--broker-dir",
                  str(broker.folder.path), "--device-id", "dev-pw", "--bind", f"127.0.0.1:{free_port()}",
                  "--online-timeout", "30", "--json")
    try:
        r = cli(["device", "provision", *base])
        assert r.exit_code == 0, r.output
        got = steps(json.loads(r.output[r.output.index("{"):]))
        assert got["wait online"] == "changed" and got["broker credentials"] == "changed"
        env = prefix / "etc" / "agent.env"
        assert env.stat().st_mode & 0o077 == 0 and "EDGESHIP_MQTT_USERNAME=dev-pw" in env.read_text()
        assert not (prefix / "etc" / "broker" / "client.key").exists()
    finally:
        gone = cli(["device", "deprovision", lab["target"], "--port", str(lab["sshd"].port), "--identity",
                    str(lab["key"]), "--broker-dir", str(broker.folder.path), "--json",
                    *([] if lab["account"].created else ["--prefix", str(prefix)])])
        broker.stop()
    assert gone.exit_code == 0, gone.output
    assert not prefix.exists()


def test_dry_run_plans_the_fleet_tags_when_a_store_is_given(lab: dict[str, Any], wheelhouse: Path,
                                                           tmp_path: Path) -> None:
    base = common(lab, "--repo", str(lab["repo"]), "--wheelhouse", str(wheelhouse), "--device-id", "dev-ssh",
                  "--tags", "site=p3", "--dry-run", "--json")
    with_db = cli(["device", "provision", *base, "--db", f"sqlite:///{tmp_path / 'fleet.db'}"])
    assert with_db.exit_code == 0, with_db.output
    assert steps(json.loads(with_db.output[with_db.output.index("{"):]))["fleet tags"] == "planned"
    without = cli(["device", "provision", *base])
    assert without.exit_code == 0, without.output
    assert "fleet tags" not in steps(json.loads(without.output[without.output.index("{"):]))
    assert not Path(lab["prefix"]).exists()
