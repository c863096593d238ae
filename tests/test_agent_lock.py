"""The data folder's lock between ``edgeship-agent run`` and the commands: ``run`` waits
for a command-line install to finish and then serves; ``install`` while ``run`` is
starting goes through the agent once it answers; both started at once end well.
Real processes; the lock is the real ``AgentLock`` the commands take."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent_fixtures import AgentProcess, AgentRepo, agent_cli, agent_env, wait_for, write_config

from edgeship.agent.config import load_config
from edgeship.agent.control import AgentLock, ControlServer


def test_run_waits_for_a_command_line_install_then_serves(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo)
    settings = load_config(config)
    lock = AgentLock(settings.lock_file)
    assert lock.acquire(role="install")  # what `edgeship-agent install` holds while no agent runs
    agent = AgentProcess(config)
    try:
        time.sleep(2.0)
        assert agent.proc.poll() is None, agent.log.read_text()  # still there, not "another agent holds"
        assert not settings.control_socket.exists()  # and not serving yet
        wait_for(lambda: "waiting for `edgeship-agent install`" in agent.log.read_text() or None, 10,
                 what="the agent to say what it waits for")
        lock.release()
        doc = agent.wait_serving()
        assert doc["running"] is True
    finally:
        lock.release()
        agent.stop()


def test_a_second_run_still_refuses(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo)
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        result = agent_cli("run", "--config", str(config), timeout=60)
        assert result.returncode != 0 and "holds" in result.stderr
    finally:
        agent.stop()


def test_install_while_run_is_starting_goes_through_the_agent(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo)
    settings = load_config(config)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = AgentLock(settings.lock_file)
    assert lock.acquire(role="run")  # an agent that has the lock but does not answer yet
    requests: list[dict[str, Any]] = []

    def dispatch(request: dict[str, Any]) -> dict[str, Any]:
        requests.append(request)
        return {"ok": True, "update": "u-1", "state": "FETCHING"}

    package = agent_repo.export("1.0.0")
    install = subprocess.Popen(
        [sys.executable, "-m", "edgeship.agent.cli", "install", str(package), "--config", str(config),
         "--no-wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )
    server = None
    try:
        time.sleep(1.5)
        assert install.poll() is None  # waiting, not "holds the lock but does not answer"
        server = ControlServer(settings.control_socket, dispatch).start()  # the agent now answers
        out, err = install.communicate(timeout=30)
        assert install.returncode == 0, err
        assert "waiting for the agent to start" in err
        assert json.loads(out)["update"] == "u-1"
        assert [r["op"] for r in requests] == ["install"] and requests[0]["package"] == str(package.resolve())
    finally:
        if install.poll() is None:
            install.kill()
        if server is not None:
            server.stop()
        lock.release()


def test_run_and_install_started_together_both_succeed(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    agent = AgentProcess(config)
    try:
        result = agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        agent.wait_serving()
        doc = wait_for(lambda: (d := agent.status())["update"] and d["update"]["terminal"] and d or None, 60,
                       what="the install to end")
        assert doc["update"]["state"] == "COMMITTED" and doc["active"]["version"] == "1.0.0"
        client = agent.client()
        status, body = client.predict("digits", agent_repo.eval_x[:1].tolist())
        client.close()
        assert status == 200, body
    finally:
        agent.stop()
