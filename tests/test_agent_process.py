"""The agent as a real process: ``edgeship-agent init/run/install/status/rollback``,
SIGKILL in each state of an update, a crash loop, and an environment without
TensorFlow. Packages come from a real release repository (``ReleaseRepository``
init/publish/export: what ``edgeship keys init``/``publish``/``bundle export`` run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_fixtures import (
    AgentProcess,
    AgentRepo,
    agent_cli,
    agent_env,
    status,
    wait_for,
    write_config,
)

from edgeship.agent.config import load_config


def settle(agent: AgentProcess, timeout: float = 60) -> dict:
    """Wait until no update is in progress; returns the status document."""

    def done() -> dict | None:
        doc = agent.status()
        update = doc["update"]
        return doc if update is None or update["terminal"] else None

    return wait_for(done, timeout, what="the update to end")


def served_version(agent: AgentProcess, x: np.ndarray) -> str:
    client = agent.client()
    try:
        status_code, body = client.request("GET", "/v1/models/digits")
        assert status_code == 200, body
        code, pred = client.predict("digits", x[:2].tolist())
        assert code == 200 and np.array(pred["predictions"]).shape == (2, 10)
        number = int(body["model_version_status"][0]["version"])  # TF Serving names versions by number
    finally:
        client.close()
    # the bundle version behind that number, as the agent's status lists what it has loaded
    digits = next(m for m in agent.status()["models"] if m["name"] == "digits")
    return next(str(m["version"]) for m in digits["loaded"] if m["serving_version"] == number)


def test_cli_init_install_offline_then_run_install_rollback_status(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    config = tmp_path / "agent.toml"
    result = agent_cli(
        "init",
        "--data",
        str(tmp_path / "data"),
        "--device-id",
        "dev-1",
        "--fleet",
        "lab",
        "--root",
        str(agent_repo.root_json),
        "--director-key",
        str(agent_repo.director_pub),
        "--bind",
        "127.0.0.1:0",
        "-o",
        str(config),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == "dev-1"
    assert (
        agent_cli(
            "init",
            "--data",
            "d",
            "--device-id",
            "x",
            "--fleet",
            "f",
            "--root",
            "r",
            "--director-key",
            "k",
            "-o",
            str(config),
        ).returncode
        == 2
    )  # refuses to overwrite
    config.write_text(config.read_text().replace("window_s = 60.0", "window_s = 0.5"))
    doc = status(config)
    assert doc["running"] is False and doc["active"] is None and doc["update"] is None

    # no agent runs: install drives the update here, up to activation
    result = agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["update"]["state"] == "PROBATION" and doc["active"]["version"] == "1.0.0"

    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        doc = settle(agent)
        assert doc["update"]["state"] == "COMMITTED"  # probation finished in the running agent
        x = np.zeros((2, 8, 8, 1), np.float32)
        assert served_version(agent, x) == "1.0.0"

        # while run runs: install goes through the running agent (hot swap)
        result = agent_cli("install", agent_repo.export("2.0.0"), "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["active"]["name"] == "digits" and doc["active"]["version"] == "2.0.0"
        assert doc["update"]["state"] == "COMMITTED" and doc["update"]["reason"]
        assert served_version(agent, x) == "2.0.0"

        result = agent_cli("status", "--json", "--config", str(config))
        doc = json.loads(result.stdout)
        assert (
            doc["running"]
            and doc["serving"]["version"] == "2.0.0"
            and doc["serving"]["requests"] >= 1
        )
        assert [b["version"] for b in doc["previous"]] == ["1.0.0"]
        text = agent_cli("status", "--config", str(config)).stdout
        assert "active   digits 2.0.0" in text

        # a bad bundle through the CLI: exit 4 (REJECTED), the running model keeps serving
        result = agent_cli("install", agent_repo.export("2.3.0"), "--config", str(config))
        assert result.returncode == 4 and "REJECTED" in result.stderr and "riscv64" in result.stderr
        assert served_version(agent, x) == "2.0.0"

        result = agent_cli("rollback", "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["update"]["kind"] == "rollback" and doc["active"]["version"] == "1.0.0"
        assert served_version(agent, x) == "1.0.0"
        assert (
            agent_cli(
                "install", str(tmp_path / "missing.package"), "--config", str(config)
            ).returncode
            == 2
        )
    finally:
        agent.stop()
    assert agent.proc.returncode == 0  # SIGTERM: clean exit


def test_second_agent_on_the_same_data_folder_is_refused(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    config = write_config(tmp_path, agent_repo)
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        result = agent_cli("run", "--config", str(config))
        assert result.returncode == 1 and "holds" in result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
    finally:
        agent.stop()


KILL_STATES = [
    "DISK_CHECK",
    "FETCHING",
    "VERIFYING",
    "INSTALLING",
    "SELF_TEST",
    "ACTIVATING",
    "PROBATION",
    "COMMITTED",
    "ROLLING_BACK",
]


def kill_states() -> list[str]:
    """Every state; EDGESHIP_TEST_KILL_STATES (comma-separated) picks some, where each costs
    minutes (the ARM stage's emulated CPUs)."""
    chosen = [s for s in os.environ.get("EDGESHIP_TEST_KILL_STATES", "").split(",") if s]
    unknown = set(chosen) - set(KILL_STATES)
    assert not unknown, f"EDGESHIP_TEST_KILL_STATES names no state: {sorted(unknown)}"
    return [s for s in KILL_STATES if s in chosen] if chosen else KILL_STATES


@pytest.mark.slow
def test_sigkill_in_each_state_then_restart_ends_consistent(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """For each state: pause the agent on entering it (test hook), SIGKILL it, restart
    it; the update must end with the old model or the new one committed, serving."""
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    x = agent_repo.eval_x
    agent = AgentProcess(config)
    agent.wait_serving()
    result = agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    agent.stop()
    data = load_config(config).data_dir
    outcomes = {}
    for state in kill_states():
        active = status(config)["active"]["version"]
        new = "2.0.0" if active == "1.0.0" else "1.0.0"
        if state == "ROLLING_BACK":  # reached by an operator rollback during a long probation
            config.write_text(config.read_text().replace("window_s = 0.3", "window_s = 60.0"))
        env = {**agent_env(), "EDGESHIP_AGENT_TEST_PAUSE_IN": state}
        agent = AgentProcess(config, env=env)
        agent.wait_serving()
        marker = data / f"test-paused-in-{state}"
        marker.unlink(missing_ok=True)
        result = agent_cli("install", agent_repo.export(new), "--config", str(config), "--no-wait")
        assert result.returncode == 0, result.stderr
        if state == "ROLLING_BACK":
            wait_for(lambda a=agent: a.status()["update"]["state"] == "PROBATION", 30, what="probation")
            assert agent_cli("rollback", "--config", str(config), "--no-wait").returncode == 0
        wait_for(marker.exists, 60, what=f"the agent to pause in {state}")
        agent.kill()  # SIGKILL, mid-update
        on_disk = json.loads((data / "models" / "digits" / "state.json").read_text())
        assert on_disk["update"]["state"] == state
        if state == "ROLLING_BACK":
            config.write_text(config.read_text().replace("window_s = 60.0", "window_s = 0.3"))

        agent = AgentProcess(config)  # restarted without the hook
        try:
            agent.wait_serving()
            doc = settle(agent)
            final = doc["update"]["state"]
            version = doc["active"]["version"]
            assert version in (active, new)  # never neither
            assert served_version(agent, x) == version
            outcomes[state] = (final, version == new)
            slots = {p.name for p in (data / "models" / "digits" / "slots").iterdir()}
            assert doc["active"]["slot"] in slots
            assert slots <= {
                doc["active"]["slot"],
                *(b["slot"] for b in doc["previous"]),
            }  # no orphans
            work = data / "models" / "digits" / "work"
            assert not work.exists() or not any(work.iterdir())
            resumed = any("resumed" in h["reason"] for h in doc["update"]["history"])
            assert resumed is (state != "COMMITTED"), (
                state
            )  # a terminal state has nothing to resume
        finally:
            agent.stop()
    # pre-activation states resume and finish; after activation the new model is committed;
    # a rollback in progress finishes rolling back
    for state, outcome in outcomes.items():
        expected = ("ROLLED_BACK", False) if state == "ROLLING_BACK" else ("COMMITTED", True)
        assert outcome == expected, (state, outcome)
    assert list(outcomes) == kill_states()


def test_model_that_kills_the_agent_in_probation_is_rolled_back_after_max_restarts(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """Every start with the new model dies (SIGKILL on entering PROBATION, as a model
    that crashes the process would); a supervisor restarts it; past max_restarts the
    agent rolls back before loading the new model again."""
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    config.write_text(config.read_text().replace("max_restarts = 3", "max_restarts = 2"))
    agent = AgentProcess(config)
    agent.wait_serving()
    result = agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    agent.stop()
    config.write_text(config.read_text().replace("window_s = 0.3", "window_s = 30.0"))
    killer = {**agent_env(), "EDGESHIP_AGENT_TEST_KILL_IN": "PROBATION"}
    agent = AgentProcess(config, env=killer)
    agent.wait_serving()
    result = agent_cli("install", agent_repo.export("2.0.0"), "--config", str(config), "--no-wait")
    assert result.returncode == 0, result.stderr
    starts = 1
    while True:  # the supervisor (systemd Restart=on-failure)
        try:
            agent.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"agent did not die in PROBATION:\n{agent.log.read_text()[-3000:]}"
            ) from None
        agent._log_handle.close()
        if agent.proc.returncode != -9:
            break
        state = json.loads((load_config(config).data_dir / "models" / "digits" / "state.json").read_text())["update"][
            "state"
        ]
        if state != "PROBATION":
            break
        assert starts <= 5, "crash loop not detected"
        agent = AgentProcess(config, env=killer)
        starts += 1
        try:
            doc = agent.wait_serving(timeout=20)
        except AssertionError:
            continue  # it died again while starting
        if doc["update"]["terminal"] or doc["update"]["state"] == "ROLLING_BACK":
            break
    try:
        doc = settle(agent)
        assert doc["update"]["state"] == "ROLLED_BACK", doc["update"]
        assert "interrupted" in " ".join(h["reason"] for h in doc["update"]["history"])
        assert doc["active"]["version"] == "1.0.0"
        assert served_version(agent, agent_repo.eval_x) == "1.0.0"
        # died on the first entry and after each of the max_restarts (2) tolerated restarts; the
        # next start detected the loop and rolled back without loading the new model
        assert starts == 2 + 2
    finally:
        agent.stop()


_NO_TF = r"""
import importlib.abc, json, sys, time
BLOCKED = ("tensorflow", "keras", "tf_keras", "tf2onnx", "edgeship.converters", "edgeship.toolkit")
attempts = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a device without TensorFlow)")
        return None
sys.meta_path.insert(0, Blocker())
try:
    import tensorflow  # noqa
    raise SystemExit("tensorflow imported despite the blocker")
except ImportError:
    pass
attempts.clear()
start = time.perf_counter()
from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.agent.sources import OfflinePackageSource
agent = Agent(load_config(sys.argv[1])).start()
agent.submit(OfflinePackageSource(sys.argv[2]))
while agent.driver.in_progress:
    time.sleep(0.05)
import http.client
host, port = agent.api.host, agent.api.port
conn = http.client.HTTPConnection(host, port)
conn.request("POST", "/v1/models/digits:predict", json.dumps({"instances": [[[[0.5]] * 8] * 8]}))
response = conn.getresponse()
body = json.loads(response.read())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "torch")
               or m.startswith(("edgeship.converters", "edgeship.toolkit")))
print(json.dumps({"status": response.status, "classes": len(body["predictions"][0]), "heavy": heavy,
                  "attempts": attempts, "state": agent.driver.state.update.state,
                  "runtime": agent.serving.current.runner.runtime}))
agent.stop()
"""


def test_agent_runs_without_tensorflow(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo, window_s=0.2)
    package = agent_repo.export("2.0.0")
    result = subprocess.run(
        [sys.executable, "-c", _NO_TF, str(config), str(package)],
        capture_output=True,
        text=True,
        env=agent_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc == {
        "status": 200,
        "classes": 10,
        "heavy": [],
        "attempts": [],
        "state": "COMMITTED",
        "runtime": doc["runtime"],
    }
    assert doc["runtime"] in ("litert", "tflite_runtime")
    assert "tensorflow" not in os.environ.get("EDGESHIP_AGENT_TEST_PAUSE_IN", "")


def test_updates_of_the_running_agent_under_load_fail_no_request(tmp_path: Path, agent_repo: AgentRepo) -> None:
    """A TF Serving client keeps predicting over keep-alive connections while the real
    agent process installs a new version and rolls it back: every request succeeds."""
    import threading

    config = write_config(tmp_path, agent_repo, window_s=0.5)
    # int8 on x86 can be slower than fp32, and on this shared machine a burst of CPU
    # contention during the window has given p95 93x the old model's: probation's latency
    # rule (tested in test_agent_state_machine/test_agent_updates) would roll the update
    # back; this test is about failed requests, so the rule is off (0)
    config.write_text(config.read_text().replace("max_latency_ratio = 2.0", "max_latency_ratio = 0.0"))
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        assert agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config)).returncode == 0
        stop = threading.Event()
        seen: list[tuple[int, str]] = []

        def client_loop() -> None:
            client = agent.client()
            body = agent_repo.eval_x[:1].tolist()
            while not stop.is_set():
                code, reply = client.predict("digits", body)
                status_code, info = client.request("GET", "/v1/models/digits")
                seen.append((code if status_code == 200 else status_code,
                             info["model_version_status"][0]["version"] if status_code == 200 else "?"))
            client.close()

        threads = [threading.Thread(target=client_loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            result = agent_cli("install", agent_repo.export("2.0.0"), "--config", str(config))
            assert result.returncode == 0, result.stderr
            result = agent_cli("rollback", "--config", str(config))
            assert result.returncode == 0, result.stderr
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert seen and all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:5]
        assert {"1", "2"} <= {version for _, version in seen}  # serving versions of 1.0.0 and 2.0.0
        assert agent.status()["active"]["version"] == "1.0.0"
    finally:
        agent.stop()


def test_offline_rollback_aborts_a_deferred_probation(tmp_path: Path, agent_repo: AgentRepo) -> None:
    """No agent runs: install stops in PROBATION; rollback then aborts it (ROLLED_BACK to
    what ran before: here nothing) without counting restarts."""
    config = write_config(tmp_path, agent_repo)
    result = agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["update"]["state"] == "PROBATION"
    result = agent_cli("install", agent_repo.export("2.0.0"), "--config", str(config))
    assert result.returncode == 1 and "in progress (PROBATION)" in result.stderr
    result = agent_cli("rollback", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["update"]["state"] == "ROLLED_BACK" and doc["active"] is None
    states = [h["state"] for h in doc["update"]["history"]]
    assert states[-3:] == ["PROBATION", "ROLLING_BACK", "ROLLED_BACK"]
    assert states.count("PROBATION") == 1  # no restart counted by the CLI commands
    result = agent_cli("rollback", "--config", str(config))
    assert result.returncode == 2 and "nothing to roll back to" in result.stderr
