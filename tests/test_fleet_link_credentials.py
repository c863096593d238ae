"""A device's credentials in one folder: `edgeship device credentials --repo` writes it,
`edgeship-agent init --credentials` reads it (CA, certificate, key, broker URL, fleet, trust
anchors); init and run refuse missing trust anchors and name which; an agent started that way
connects to a real Mosquitto running the generated configuration, and one given the wrong CA
says why it cannot in its reconnect log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mqtt_broker import free_port, mosquitto_binary

from edgeship.agent.cli import cli as agent_cli
from edgeship.agent.config import load_config
from edgeship.agent.fleet_link import load_link_settings
from edgeship.toolkit.cli import main as edgeship_main


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeship.ota.release import ReleaseRepository

    release = ReleaseRepository(tmp_path_factory.mktemp("creds-repo") / "repo")
    release.init(root_passphrase="correct horse battery staple")
    return release.path


@pytest.fixture
def broker_folder(tmp_path: Path) -> Iterator[Any]:
    from broker_fixtures import start_broker

    if mosquitto_binary() is None:
        from edgeship.toolkit.broker_config import BrokerSettings
        from edgeship.toolkit.identities import BrokerFolder

        folder = BrokerFolder(tmp_path / "broker")
        folder.create_or_update(BrokerSettings(run_as=""))
        yield folder, None
        return
    b = start_broker(tmp_path, auth="cert")
    try:
        yield b.folder, b
    finally:
        b.stop()


def _credentials(folder: Any, repo: Path, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(edgeship_main, ["device", "credentials", "dev-1", "--fleet", "lab", "--broker-dir",
                                              str(folder.path), "--out", str(out), *extra])


def _init(*args: str) -> Any:
    return CliRunner().invoke(agent_cli, ["init", *args])


def test_init_takes_everything_from_the_credentials_folder(broker_folder: Any, repo: Path, tmp_path: Path) -> None:
    folder, _ = broker_folder
    made = _credentials(folder, repo, tmp_path / "dev-1", "--repo", str(repo), "--json")
    assert made.exit_code == 0, made.output
    assert set(json.loads(made.stdout)["trust_anchors"]) == {"root", "director_key"}
    result = _init("--credentials", str(tmp_path / "dev-1"), "--data", str(tmp_path / "data"),
                   "-o", str(tmp_path / "agent.toml"))
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "agent.toml")
    creds = tmp_path / "dev-1"
    assert (config.device_id, config.fleet) == ("dev-1", "lab")
    assert config.root_metadata == (creds / "root.json").resolve()
    assert config.director_key == (creds / "director.pub").resolve()
    assert (creds / "root.json").read_bytes() == (repo / "metadata" / "root.json").read_bytes()
    settings = load_link_settings(config)
    assert settings.url == json.loads((creds / "connection.json").read_text())["url"]
    assert (settings.ca_file, settings.cert_file, settings.key_file) == tuple(
        str((creds / name).resolve()) for name in ("ca.crt", "client.crt", "client.key"))


@pytest.mark.parametrize("extra, fragment", [
    (["--device-id", "dev-2"], "--device-id dev-2 disagrees with --credentials"),
    (["--fleet", "other"], "--fleet other disagrees with --credentials"),
])
def test_init_refuses_options_that_contradict_the_folder(broker_folder: Any, repo: Path, tmp_path: Path,
                                                         extra: list, fragment: str) -> None:
    folder, _ = broker_folder
    assert _credentials(folder, repo, tmp_path / "dev-1", "--repo", str(repo)).exit_code == 0
    result = _init("--credentials", str(tmp_path / "dev-1"), "--data", str(tmp_path / "d"),
                   "-o", str(tmp_path / "a.toml"), *extra)
    assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert not (tmp_path / "a.toml").exists()


def test_init_refuses_a_folder_that_is_not_credentials(tmp_path: Path) -> None:
    result = _init("--credentials", str(tmp_path), "--data", str(tmp_path / "d"), "-o", str(tmp_path / "a.toml"))
    assert result.exit_code == 2 and "no connection.json there" in result.stderr, result.output


def test_credentials_without_trust_anchors_leave_init_asking_for_them(broker_folder: Any, repo: Path,
                                                                      tmp_path: Path) -> None:
    folder, _ = broker_folder
    assert _credentials(folder, repo, tmp_path / "dev-1").exit_code == 0
    result = _init("--credentials", str(tmp_path / "dev-1"), "--data", str(tmp_path / "d"),
                   "-o", str(tmp_path / "a.toml"))
    assert result.exit_code == 2 and "missing --root, --director-key" in result.stderr, result.output


@pytest.mark.parametrize("which, fragment", [
    ("root", "the trusted root metadata (root.json)"),
    ("director", "the director's public key"),
])
@pytest.mark.parametrize("how", ["missing", "folder"])
def test_init_refuses_a_missing_or_unreadable_trust_anchor_and_names_it(repo: Path, tmp_path: Path, which: str,
                                                                        fragment: str, how: str) -> None:
    paths = {"root": repo / "metadata" / "root.json", "director": repo / "director" / "director.pub"}
    bad = tmp_path / ("nothing-here" if how == "missing" else "a-folder")
    if how == "folder":
        bad.mkdir()
    paths[which] = bad
    result = _init("--data", str(tmp_path / "d"), "--device-id", "dev-1", "--fleet", "lab", "--root",
                   str(paths["root"]), "--director-key", str(paths["director"]), "-o", str(tmp_path / "a.toml"))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and fragment in result.stderr and str(bad) in result.stderr
    assert ("does not exist" if how == "missing" else "is a folder") in result.stderr
    assert not (tmp_path / "a.toml").exists()


@pytest.mark.parametrize("which, fragment", [("root_metadata", "root.json"), ("director_key", "director's")])
def test_run_refuses_a_trust_anchor_that_went_missing(repo: Path, tmp_path: Path, which: str, fragment: str) -> None:
    import shutil

    anchors = tmp_path / "anchors"
    anchors.mkdir()
    shutil.copy(repo / "metadata" / "root.json", anchors / "root.json")
    shutil.copy(repo / "director" / "director.pub", anchors / "director.pub")
    assert _init("--data", str(tmp_path / "d"), "--device-id", "dev-1", "--fleet", "lab", "--root",
                 str(anchors / "root.json"), "--director-key", str(anchors / "director.pub"),
                 "-o", str(tmp_path / "a.toml")).exit_code == 0
    getattr(load_config(tmp_path / "a.toml"), which).unlink()
    result = subprocess.run([sys.executable, "-m", "edgeship.agent.cli", "run", "--config", str(tmp_path / "a.toml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config ")
    assert fragment in result.stderr and "does not exist" in result.stderr


def _agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeship.agent.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def _wait_log(log: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the agent's log:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.mosquitto
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_an_agent_initialised_from_the_folder_connects_and_a_wrong_ca_is_named(broker_folder: Any, repo: Path,
                                                                                tmp_path: Path) -> None:
    folder, _ = broker_folder
    assert _credentials(folder, repo, tmp_path / "dev-1", "--repo", str(repo)).exit_code == 0
    bind = f"127.0.0.1:{free_port()}"
    assert _init("--credentials", str(tmp_path / "dev-1"), "--data", str(tmp_path / "d"), "--bind", bind,
                 "-o", str(tmp_path / "a.toml")).exit_code == 0
    # the same device, but trusting another CA: the broker's certificate does not verify
    from edgeship.toolkit.fleet_pki import certificate_pem, create_ca

    _, other_ca = create_ca("not the fleet CA")
    (tmp_path / "other-ca.crt").write_bytes(certificate_pem(other_ca))
    wrong = (tmp_path / "a.toml").read_text().replace(str((tmp_path / "dev-1" / "ca.crt").resolve()),
                                                     str(tmp_path / "other-ca.crt"))
    wrong = wrong.replace(bind, f"127.0.0.1:{free_port()}").replace(f'"{(tmp_path / "d").resolve()}"',
                                                                         f'"{tmp_path / "d2"}"')
    (tmp_path / "wrong.toml").write_text(wrong)
    good = _agent(tmp_path / "a.toml", tmp_path / "good.log")
    bad = _agent(tmp_path / "wrong.toml", tmp_path / "bad.log")
    try:
        _wait_log(tmp_path / "good.log", "connected to mqtts://")
        content = _wait_log(tmp_path / "bad.log", "(attempt 1): TLS verification of the broker failed")
        assert "check the CA file" in content
    finally:
        for process in (good, bad):
            os.killpg(process.pid, 9)
            process.wait(10)


def test_controller_takes_its_credentials_folder_and_refuses_a_device_s(broker_folder: Any, repo: Path,
                                                                        tmp_path: Path) -> None:
    folder, _ = broker_folder
    assert _credentials(folder, repo, tmp_path / "dev-1").exit_code == 0
    refused = CliRunner().invoke(edgeship_main, ["controller", "--credentials", str(tmp_path / "dev-1"), "--repo",
                                                 str(repo), "--db", f"sqlite:///{tmp_path / 'f.db'}"])
    assert refused.exit_code == 2 and "holds a device's credentials, not the controller's" in refused.stderr
    missing = CliRunner().invoke(edgeship_main, ["controller", "--repo", str(repo)], env={"EDGESHIP_BROKER": ""})
    assert missing.exit_code == 2 and "--credentials BROKER_DIR/controller" in missing.stderr, missing.output
