"""The running agent in-process, as the fleet link plugs into it: the reporter
receives valid ReportedMessage / EventMessage / TelemetryMessage documents, and a
desired state with a TUF fetcher takes the same path as an offline package."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import (
    FLEET,
    AgentRepo,
    TFServingClient,
    agent_config,
    wait_for,
)

from edgeship.agent.daemon import Agent
from edgeship.agent.sources import OfflinePackageSource
from edgeship.ota.protocol import EventMessage, ReportedMessage, TelemetryMessage


class Capture:
    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []

    def report_state(self, state: dict[str, Any]) -> None:
        self.states.append(state)

    def report_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        self.telemetry.append(telemetry)


def test_reporter_gets_protocol_documents_and_desired_state_installs(tmp_path: Path, agent_repo: AgentRepo) -> None:
    from edgeship.ota.updater import LocalFolderFetcher

    config = dataclasses.replace(
        agent_config(tmp_path, agent_repo), probation_window_s=0.2, telemetry_interval_s=0.3
    )
    capture = Capture()
    agent = Agent(config, reporter=capture).start()
    try:
        agent.submit(OfflinePackageSource(agent_repo.export("1.0.0")))
        wait_for(lambda: not agent.driver.in_progress, 30, what="install")
        client = TFServingClient(agent.api.host, agent.api.port)
        for _ in range(5):
            assert client.predict("digits", agent_repo.eval_x[:2].tolist())[0] == 200

        # the fleet's path: a director envelope and a TUF fetcher over the release repository
        envelope = agent_repo.repo.sign_desired(fleet=FLEET, device=config.device_id, name="digits", version="2.0.0")
        assert not agent.is_redelivery(envelope)
        agent.submit_desired(envelope, LocalFolderFetcher(agent_repo.path))
        wait_for(lambda: not agent.driver.in_progress, 30, what="desired-state update")
        assert agent.driver.state.update.state == "COMMITTED", agent.driver.state.update.reason
        assert agent.serving.current.version == "2.0.0"
        assert agent.is_redelivery(envelope)  # the same document again: already acted on
        assert client.request("GET", "/healthz") == (
            200, {"status": "ok", "update": "COMMITTED", "model": {"name": "digits", "version": "2.0.0"}})
        assert client.predict("digits", agent_repo.eval_x[:1].tolist())[0] == 200
        time.sleep(0.8)
        client.close()
    finally:
        agent.stop()
    events = [EventMessage.from_dict(e) for e in capture.events]
    assert [e.state for e in events if e.bundle and e.bundle["version"] == "2.0.0"][-2:] == ["PROBATION", "COMMITTED"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    reported = [ReportedMessage.from_dict(s) for s in capture.states]
    assert reported[-1].active == {"name": "digits", "version": "2.0.0"} and reported[-1].device == config.device_id
    assert reported[-1].update["state"] == "COMMITTED"
    windows = [TelemetryMessage.from_dict(t) for t in capture.telemetry]
    assert sum(w.requests for w in windows) >= 1 and all(w.window_s > 0 for w in windows)
    assert json.dumps(capture.telemetry[-1])  # plain JSON for any transport


def test_install_of_a_path_the_agent_cannot_see_says_why(tmp_path: Path) -> None:
    """``install`` sends the path: under systemd (PrivateTmp, ProtectHome) a package in
    /tmp or /home exists for the operator but not for the agent; the refusal says so."""
    from edgeship.agent.config import parse_config
    from edgeship.ota.errors import BadInputError

    config = parse_config({
        "device": {"id": "d", "fleet": "f"},
        "paths": {"data": str(tmp_path / "data")},
        "trust": {"root": str(tmp_path / "root.json"), "director_key": str(tmp_path / "k.pub")},
    })
    with pytest.raises(BadInputError) as caught:
        Agent(config).dispatch({"op": "install", "package": str(tmp_path / "gone.package")})
    assert "no such file" in caught.value.message and "PrivateTmp" in caught.value.message


def test_a_control_socket_that_cannot_be_opened_is_one_clear_error(tmp_path: Path) -> None:
    """connect() failing otherwise than "nobody listens" (a user without access to the
    0700 data folder gets EACCES; here ENOTDIR) is one line naming the socket, not a traceback."""
    from edgeship.agent.control import AgentNotRunning, ControlClient
    from edgeship.ota.errors import EdgeshipError

    (tmp_path / "file").write_text("")
    with pytest.raises(EdgeshipError, match=r"cannot use the agent's control socket .*file/agent\.sock") as caught:
        ControlClient(tmp_path / "file" / "agent.sock").call("status")
    assert not isinstance(caught.value, AgentNotRunning)


def test_a_data_folder_that_cannot_be_made_is_one_line_and_a_failure_exit(tmp_path: Path) -> None:
    """`run` with `[paths] data` under a regular file: the operating system's words in one
    line on stderr, exit 1, no traceback (the CLI edge turns an OSError into that)."""
    from agent_fixtures import agent_cli

    (tmp_path / "file").write_text("")
    (tmp_path / "root.json").write_text("{}")  # init and run refuse missing trust anchors first
    (tmp_path / "k.pub").write_text("key")
    config = tmp_path / "agent.toml"
    made = agent_cli("init", "--data", str(tmp_path / "file" / "data"), "--device-id", "d", "--fleet", "f",
                     "--root", str(tmp_path / "root.json"), "--director-key", str(tmp_path / "k.pub"),
                     "-o", str(config))
    assert made.returncode == 0, made.stderr
    result = agent_cli("run", "--config", str(config), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: Not a directory: {tmp_path / 'file' / 'data'}"], result.stderr
