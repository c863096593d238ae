"""Many models on one agent: each model its own driver, slots, serving versions and labels;
the one-model layout moved on first start; the memory budget; schema-1 and schema-2
desired states. Real packages from a real release repository, real LiteRT, a real
agent (in this process, or as its own process where a kill or a load matters)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from agent_fixtures import (
    FLEET,
    SECOND_MODEL,
    AgentProcess,
    AgentRepo,
    TFServingClient,
    agent_cli,
    agent_config,
    agent_env,
    write_config,
)
from polling import wait_for

from edgeship.agent.daemon import Agent
from edgeship.agent.models import memory_refusal, migrate_single_model, peek_package_model
from edgeship.agent.serving import ServingModel
from edgeship.agent.sources import OfflinePackageSource
from edgeship.agent.updater import UpdateDriver
from edgeship.ota.errors import BadInputError

MB = 1 << 20


# -- pure decisions -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "used", "need", "words"),
    [
        (0, 10 * MB, 10 * MB, None),  # no budget
        (64 * MB, 20 * MB, 44 * MB, None),  # fits exactly
        (64 * MB, 44 * MB, 48 * MB, "needs 48.0 MB, 20.0 MB of 64.0 MB budget left"),
        (64 * MB, 70 * MB, 1 * MB, "needs 1.0 MB, 0.0 MB of 64.0 MB budget left"),  # over already
    ],
)
def test_memory_refusal_names_the_numbers(budget: int, used: int, need: int, words: str | None) -> None:
    refusal = memory_refusal("wake", budget, used, need)
    if words is None:
        assert refusal is None
    else:
        assert refusal is not None and words in refusal and "wake" in refusal and "memory_budget_mb" in refusal


def test_a_package_names_its_model_before_it_is_verified(tmp_path: Path, agent_repo: AgentRepo) -> None:
    assert peek_package_model(agent_repo.export("1.0.0")) == "digits"
    assert peek_package_model(agent_repo.export("1.0.0", name=SECOND_MODEL)) == SECOND_MODEL
    junk = tmp_path / "junk.package"
    junk.write_bytes(b"\x00" * 100 + b"not a tar" * 100)
    with pytest.raises(BadInputError, match="junk.package"):
        peek_package_model(junk)


# -- helpers -------------------------------------------------------------------------------------------
def _install(agent: Agent, package: Path, timeout: float = 60) -> dict[str, Any]:
    reply = agent.submit(OfflinePackageSource(package))
    driver = agent.models.driver(reply["model"])
    wait_for(lambda: not driver.in_progress, timeout, what=f"update of {reply['model']}")
    update = driver.state.update
    assert update is not None
    return {"state": update.state, "reason": update.reason, "model": reply["model"]}


def _client(agent: Agent) -> TFServingClient:
    assert agent.api is not None
    return TFServingClient(agent.api.host, agent.api.port)


# -- the one-model layout ------------------------------------------------------------------------------
def test_one_model_layout_moves_under_models_on_first_start(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.1)
    legacy = UpdateDriver(config, serving=ServingModel())  # what an agent before servables wrote
    for version in ("1.0.0", "2.0.0"):
        legacy.begin(OfflinePackageSource(agent_repo.export(version)))
        assert legacy.run().state == "COMMITTED"
    slots = sorted(p.name for p in config.slots_dir.iterdir())
    assert config.state_file.exists() and len(slots) == 2

    agent = Agent(config).start()
    try:
        home = config.data_dir / "models" / "digits"
        assert not config.state_file.exists() and (home / "state.json").exists()
        assert sorted(p.name for p in (home / "slots").iterdir()) == slots and not any(config.slots_dir.iterdir())
        state = json.loads((home / "state.json").read_text())
        # numbered oldest first: the kept 1.0.0 is version 1, the active 2.0.0 version 2
        assert (state["active"]["version"], state["active"]["serving_version"]) == ("2.0.0", 2)
        assert [(b["version"], b["serving_version"]) for b in state["previous"]] == [("1.0.0", 1)]
        client = _client(agent)
        status, body = client.request("GET", "/v1/models/digits/versions/2")
        assert status == 200 and body["model_version_status"][0]["version"] == "2"  # serving version of 2.0.0
        assert client.request("GET", "/v1/models/digits/labels/stable")[0] == 200
        assert client.predict("digits", agent_repo.eval_x[:2].tolist())[0] == 200
        assert migrate_single_model(config) is None  # done once
        assert _install(agent, agent_repo.export("3.0.0"))["state"] == "COMMITTED"
        assert agent.servables.resolve("digits").serving_version == 3  # the next number, persisted
        assert [m["name"] for m in agent.status()["models"]] == ["digits"]
    finally:
        agent.stop()
    restarted = Agent(config).start()  # the numbers survive a restart
    try:
        assert restarted.servables.resolve("digits", "3").version == "3.0.0"
    finally:
        restarted.stop()


# -- two models in one agent ---------------------------------------------------------------------------
def test_two_models_serve_at_once_each_with_its_versions_and_labels(tmp_path: Path, agent_repo: AgentRepo) -> None:
    # probation waits for requests that never come: the test decides when it ends
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.1)
    agent = Agent(config).start()
    try:
        assert _install(agent, agent_repo.export("1.0.0"))["state"] == "COMMITTED"
        assert _install(agent, agent_repo.export("1.0.0", name=SECOND_MODEL))["state"] == "COMMITTED"
        client = _client(agent)
        for name in ("digits", SECOND_MODEL):
            assert client.predict(name, agent_repo.eval_x[:2].tolist())[0] == 200
            assert client.request("GET", f"/v1/models/{name}/labels/stable")[0] == 200
        assert client.request("GET", "/v1/models/nothing")[0] == 404
        status, text = client.request("GET", "/metrics")
        assert f'model="{SECOND_MODEL}",version="1.0.0",serving_version="1"' in text
        assert 'model="digits",version="1.0.0",serving_version="1"' in text

        digits = agent.models.driver("digits")
        digits.config = dataclasses.replace(config, probation_window_s=0.1, probation_min_requests=10**9)
        agent.submit(OfflinePackageSource(agent_repo.export("2.0.0")))
        wait_for(lambda: digits.state.update.state == "PROBATION", 60, what="probation")
        versions = agent.servables.get("digits")
        assert versions.labels() == {"stable": 1, "candidate": 2}  # the stable one stays loaded
        assert [m.serving_version for m in versions.loaded()] == [2, 1]
        # TF Serving's status names versions by their number (1.0.0 is serving version 1, 2.0.0 is 2)
        assert client.request("GET", "/v1/models/digits/versions/1")[1]["model_version_status"][0]["version"] == "1"
        assert client.request("GET", "/v1/models/digits/labels/candidate")[1]["model_version_status"][0]["version"] == "2"
        assert client.request("GET", "/v1/models/digits/versions/1.0.0")[1]["model_version_status"][0]["version"] == "1"
        assert client.request("POST", "/v1/models/digits/labels/stable:predict",
                              {"instances": agent_repo.eval_x[:1].tolist()})[0] == 200
        kept = versions.resolve("1")
        agent.rollback("digits")
        wait_for(lambda: not digits.in_progress, 60, what="rollback")
        assert digits.state.update.state == "ROLLED_BACK"
        assert versions.serving.current is kept  # swapped back, not loaded again
        assert versions.labels() == {"stable": 1} and len(versions.loaded()) == 1
        assert agent.servables.resolve(SECOND_MODEL).version == "1.0.0"  # the other one untouched

        digits.config = config
        assert _install(agent, agent_repo.export("2.0.0"))["state"] == "COMMITTED"
        assert versions.labels() == {"stable": 3} and [m.version for m in versions.loaded()] == ["2.0.0"]
        models = {m["name"]: m for m in agent.status()["models"]}
        assert (models["digits"]["version"], models["digits"]["serving_version"]) == ("2.0.0", 3)
        assert models[SECOND_MODEL]["labels"] == {"stable": 1}
        assert set(agent.reported_document()["models"]) == {"digits", SECOND_MODEL}
    finally:
        agent.stop()


def test_memory_budget_refuses_a_model_that_does_not_fit(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.1)
    agent = Agent(config).start()
    try:
        assert _install(agent, agent_repo.export("1.0.0"))["state"] == "COMMITTED"
        used = agent.models.memory_used()
        assert used > 0  # measured when it was self-tested
        agent.models.config = dataclasses.replace(config, memory_budget_mb=(used + 1000) / MB)
        result = _install(agent, agent_repo.export("1.0.0", name=SECOND_MODEL))
        assert result["state"] == "REJECTED", result
        assert f"memory budget: {SECOND_MODEL} needs " in result["reason"]
        assert "MB budget left" in result["reason"]
        client = _client(agent)
        assert client.predict(SECOND_MODEL, agent_repo.eval_x[:1].tolist())[0] == 404
        assert client.predict("digits", agent_repo.eval_x[:1].tolist())[0] == 200
        slots = config.data_dir / "models" / SECOND_MODEL / "slots"
        wait_for(lambda: not any(slots.iterdir()), 10, what="the refused bundle's slot to go")
    finally:
        agent.stop()


def _desired2(agent_repo: AgentRepo, models: dict[str, str], device: str, fleet: str = FLEET) -> dict[str, Any]:
    """A schema-2 document signed by the repository's director key."""
    from edgeship.ota.director import (
        DesiredState,
        ModelEntry,
        load_director_private_key,
        sign_desired_state,
    )

    repo = agent_repo.repo
    entries = {}
    for name, version in models.items():
        target = repo.target_info(name, version)
        entries[name] = ModelEntry(bundle=name, version=version, target=target.path, length=target.length,
                                   hashes=dict(target.hashes))
    now = dt.datetime.now(dt.timezone.utc)
    state = DesiredState.for_models(fleet=fleet, device=device, models=entries, sequence=repo.next_sequence(fleet),
                                    expires=now + dt.timedelta(hours=1), issued=now)
    return sign_desired_state(state, load_director_private_key(repo.director_dir / "director.key"))


def _link(agent: Agent, fetcher: Any) -> Any:
    """The fleet link's decisions (real code) over this agent, without a broker."""
    from edgeship.agent.fleet_link import FleetLink

    link = SimpleNamespace(agent=agent, fetcher=fetcher, reporter=SimpleNamespace(report_state=lambda doc: None),
                           decisions=[], _taken={}, _aborted_for={})
    link._consider_model = lambda *args: FleetLink._consider_model(link, *args)  # type: ignore[attr-defined]
    return lambda sequence, envelope: FleetLink._consider(link, sequence, envelope)


def test_schema1_leaves_other_models_alone_schema2_removes_and_restores(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    from edgeship.ota.updater import LocalFolderFetcher

    config = agent_config(tmp_path, agent_repo, probation_window_s=0.1)
    agent = Agent(config).start()
    consider = _link(agent, LocalFolderFetcher(agent_repo.path))
    try:
        both = _desired2(agent_repo, {"digits": "1.0.0", SECOND_MODEL: "1.0.0"}, config.device_id)
        assert consider(both["signed"]["sequence"], both) is True
        for name in ("digits", SECOND_MODEL):
            wait_for(lambda n=name: agent.models.get(n) is not None and not agent.models.get(n).in_progress,
                     60, what=name)
            assert agent.models.get(name).state.update.state == "COMMITTED"
        # schema 1 (an old controller): one model's entry; the other model is left as it is
        one = agent_repo.repo.sign_desired(fleet=FLEET, device=config.device_id, name="digits", version="2.0.0")
        assert consider(one["signed"]["sequence"], one) is True
        wait_for(lambda: not agent.models.get("digits").in_progress, 60, what="digits 2.0.0")
        assert agent.servables.resolve("digits").version == "2.0.0"
        assert agent.servables.resolve(SECOND_MODEL).version == "1.0.0"
        # schema 2 without the second model: it is unloaded, its slots kept
        only = _desired2(agent_repo, {"digits": "2.0.0"}, config.device_id)
        assert consider(only["signed"]["sequence"], only) is True
        client = _client(agent)
        assert client.predict(SECOND_MODEL, agent_repo.eval_x[:1].tolist())[0] == 404
        assert client.predict("digits", agent_repo.eval_x[:1].tolist())[0] == 200
        assert any((config.data_dir / "models" / SECOND_MODEL / "slots").iterdir())
        assert {m["name"]: m["removed"] for m in agent.status()["models"]} == {"digits": False, SECOND_MODEL: True}
        assert agent.is_redelivery(only) and agent.is_redelivery(both)
    finally:
        agent.stop()
    agent = Agent(config).start()  # a removed model stays unloaded after a restart
    consider = _link(agent, LocalFolderFetcher(agent_repo.path))
    try:
        assert agent.servables.names() == ["digits"]
        # named again at the version it kept: served again, no update
        again = _desired2(agent_repo, {"digits": "2.0.0", SECOND_MODEL: "1.0.0"}, config.device_id)
        assert consider(again["signed"]["sequence"], again) is True
        assert agent.servables.resolve(SECOND_MODEL).version == "1.0.0"
        assert agent.models.get(SECOND_MODEL).state.update.state == "COMMITTED"  # the old update, not a new one
    finally:
        agent.stop()


# -- real agent processes ------------------------------------------------------------------------------
class _Load:
    """Requests to one model from a thread, counting failures, until stopped."""

    def __init__(self, agent: AgentProcess, name: str, x: Any) -> None:
        self.agent, self.name, self.x = agent, name, x
        self.ok = 0
        self.failed: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = self.agent.client()
        while not self._stop.is_set():
            try:
                status, body = client.predict(self.name, self.x)
            except OSError as exc:
                self.failed.append(repr(exc))
                client = self.agent.client()
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failed.append((status, body))

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)


def _cli_install(config: Path, package: Path) -> dict[str, Any]:
    result = agent_cli("install", str(package), "--config", str(config), "--json")
    assert result.returncode in (0, 1, 4), result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_one_model_updated_and_rolled_back_while_the_other_serves_under_load(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    config = write_config(tmp_path, agent_repo, window_s=0.5)
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        assert _cli_install(config, agent_repo.export("1.0.0"))["update"]["state"] == "COMMITTED"
        assert _cli_install(config, agent_repo.export("1.0.0", name=SECOND_MODEL))["update"]["state"] == "COMMITTED"
        x = agent_repo.eval_x[:1].tolist()
        with _Load(agent, SECOND_MODEL, x) as load:
            done = _cli_install(config, agent_repo.export("2.0.0"))
            assert done["update"]["state"] == "COMMITTED", done["update"]
            result = agent_cli("rollback", "--model", "digits", "--config", str(config), "--json")
            assert result.returncode == 0, result.stderr
            time.sleep(0.5)
        assert load.ok > 20 and load.failed == []  # not one request to the other model failed
        models = {m["name"]: m for m in agent.status()["models"]}
        assert models["digits"]["version"] == "1.0.0" and models[SECOND_MODEL]["version"] == "1.0.0"
        assert models[SECOND_MODEL]["update"]["state"] == "COMMITTED"
        listed = json.loads(agent_cli("status", "--json", "--config", str(config)).stdout)["models"]
        assert {m["name"] for m in listed} == {"digits", SECOND_MODEL}
    finally:
        agent.stop()


KILL_STATES = ["DISK_CHECK", "FETCHING", "VERIFYING", "INSTALLING", "SELF_TEST", "ACTIVATING", "PROBATION"]


@pytest.mark.slow
def test_sigkill_in_each_state_of_one_models_update_leaves_the_other_served(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    agent = AgentProcess(config)
    agent.wait_serving()
    assert _cli_install(config, agent_repo.export("1.0.0"))["update"]["state"] == "COMMITTED"
    assert _cli_install(config, agent_repo.export("1.0.0", name=SECOND_MODEL))["update"]["state"] == "COMMITTED"
    agent.stop()
    data = json.loads(agent_cli("status", "--json", "--config", str(config)).stdout)
    assert {m["name"] for m in data["models"]} == {"digits", SECOND_MODEL}
    from edgeship.agent.config import load_config

    folder = load_config(config).data_dir
    x = agent_repo.eval_x[:1].tolist()
    for state in KILL_STATES:
        before = {m["name"]: m["version"] for m in json.loads(
            agent_cli("status", "--json", "--config", str(config)).stdout)["models"]}
        new = "2.0.0" if before["digits"] == "1.0.0" else "1.0.0"
        agent = AgentProcess(config, env={**agent_env(), "EDGESHIP_AGENT_TEST_PAUSE_IN": state})
        agent.wait_serving()
        marker = folder / f"test-paused-in-{state}"
        marker.unlink(missing_ok=True)
        result = agent_cli("install", str(agent_repo.export(new)), "--config", str(config), "--no-wait")
        assert result.returncode == 0, result.stderr
        wait_for(marker.exists, 60, what=f"the agent to pause in {state}")
        client = agent.client()
        assert client.predict(SECOND_MODEL, x)[0] == 200  # paused mid-update: the other one serves
        agent.kill()
        agent = AgentProcess(config)
        try:
            agent.wait_serving()
            wait_for(lambda a=agent: not any(
                (m["update"] or {}).get("terminal") is False for m in a.status()["models"]), 60, what="the end")
            models = {m["name"]: m for m in agent.status()["models"]}
            assert models["digits"]["version"] in (before["digits"], new)  # old or new, never neither
            assert models[SECOND_MODEL]["version"] == "1.0.0"
            client = agent.client()
            assert client.predict(SECOND_MODEL, x)[0] == 200
            status, body = client.request("GET", "/v1/models/digits")
            assert status == 200 and body["model_version_status"][0]["version"] == str(models["digits"]["serving_version"])
        finally:
            agent.stop()


@pytest.mark.slow
@pytest.mark.mosquitto
def test_two_models_through_a_real_broker_with_schema_2_documents(
    tmp_path: Path, agent_repo: AgentRepo, mosquitto_broker: Any
) -> None:
    """The fleet link over a real Mosquitto: a schema-2 document installs two models, the
    next one moves one of them and leaves the other, the last removes one. What the agent
    publishes (reported state with ``models``, events with ``model``, telemetry with
    ``models``) still parses as the controller parses it."""
    from fleet_e2e_fixtures import FLEET as E2E_FLEET
    from fleet_e2e_fixtures import FleetAgent, FleetRelease, TestDirector

    from edgeship.ota.protocol import DesiredMessage, encode_message

    release = FleetRelease(repo=agent_repo.path, eval_x=agent_repo.eval_x, golden_y=agent_repo.eval_x, bundles={})
    director = TestDirector(mosquitto_broker.url, release)
    device = "dev-multi"
    agent = FleetAgent(tmp_path / "m", release, mosquitto_broker.url, device)

    def publish(models: dict[str, str]) -> None:
        envelope = _desired2(agent_repo, models, device, fleet=E2E_FLEET)
        director.publish_desired(device, encode_message(DesiredMessage(envelope)))

    def settled(expected: dict[str, str]) -> bool:
        models = {m["name"]: m for m in agent.status()["models"] if not m["removed"]}
        return {n: m["version"] for n, m in models.items()} == expected and all(
            (m["update"] or {}).get("terminal") for m in models.values())

    try:
        agent.wait_serving()
        publish({"digits": "1.0.0", SECOND_MODEL: "1.0.0"})
        wait_for(lambda: settled({"digits": "1.0.0", SECOND_MODEL: "1.0.0"}), 120, what="both models")
        first = {m["name"]: m["update"]["id"] for m in agent.status()["models"]}
        publish({"digits": "2.0.0", SECOND_MODEL: "1.0.0"})
        wait_for(lambda: settled({"digits": "2.0.0", SECOND_MODEL: "1.0.0"}), 120, what="digits 2.0.0")
        after = {m["name"]: m["update"]["id"] for m in agent.status()["models"]}
        assert after[SECOND_MODEL] == first[SECOND_MODEL] and after["digits"] != first["digits"]
        publish({"digits": "2.0.0"})
        wait_for(lambda: settled({"digits": "2.0.0"}), 60, what=f"{SECOND_MODEL} removed")
        client = agent.client()
        assert client.predict(SECOND_MODEL, agent_repo.eval_x[:1].tolist())[0] == 404
        assert client.predict("digits", agent_repo.eval_x[:1].tolist())[0] == 200
        wait_for(lambda: device in director.reported, 30, what="a reported state")
        assert not director.refused, director.refused  # everything the agent published parsed
        assert any(getattr(e, "state", None) == "COMMITTED" for e in director.events[device])
    finally:
        agent.stop()
        director.close()


@pytest.mark.slow
def test_a_restart_in_probation_loads_the_stable_version_again(tmp_path: Path, agent_repo: AgentRepo) -> None:
    """Killed in PROBATION: the restarted agent serves the candidate and keeps the previous
    version loaded under ``stable`` again; a rollback then ends with it."""
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    agent = AgentProcess(config)
    agent.wait_serving()
    assert _cli_install(config, agent_repo.export("1.0.0"))["update"]["state"] == "COMMITTED"
    agent.stop()
    config.write_text(config.read_text().replace("window_s = 0.3", "window_s = 600.0"))
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        assert agent_cli("install", str(agent_repo.export("2.0.0")), "--config", str(config), "--no-wait").returncode == 0
        wait_for(lambda: agent.status()["update"]["state"] == "PROBATION", 60, what="probation")
    finally:
        agent.kill()
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        (digits,) = agent.status()["models"]
        assert digits["labels"] == {"stable": 1, "candidate": 2}
        assert [v["serving_version"] for v in digits["loaded"]] == [2, 1]
        client = agent.client()
        status, body = client.request("GET", "/v1/models/digits/labels/stable")
        assert status == 200 and body["model_version_status"][0]["version"] == "1"  # serving version of 1.0.0
        result = agent_cli("rollback", "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        (digits,) = agent.status()["models"]
        assert digits["version"] == "1.0.0" and digits["labels"] == {"stable": 1} and len(digits["loaded"]) == 1
    finally:
        agent.stop()


def _two_model_package(agent_repo: AgentRepo, out: Path, versions: dict[str, str]) -> Path:
    """An offline package carrying several models: one schema-2 document for device "*"."""
    from edgeship.ota.offline import write_offline_package

    repo = agent_repo.repo
    envelope = _desired2(agent_repo, versions, "*")
    roots = sorted(repo.metadata_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))
    metadata = roots + [repo.metadata_dir / f"{role}.json" for role in ("timestamp", "snapshot", "targets")]
    targets = [(repo.target_info(n, v).path, repo.target_info(n, v).file) for n, v in versions.items()]
    write_offline_package(out, metadata=metadata, targets=targets, envelope=envelope, fleet=FLEET,
                          now=dt.datetime.now(dt.timezone.utc))
    return out


def test_a_package_of_several_models_installs_each(tmp_path: Path, agent_repo: AgentRepo) -> None:
    from edgeship.agent.models import peek_package_models

    package = _two_model_package(agent_repo, tmp_path / "both.package", {"digits": "2.0.0", SECOND_MODEL: "2.0.0"})
    assert peek_package_models(package) == ["digits", SECOND_MODEL]
    # without a running agent: the command line installs each, up to PROBATION
    config = write_config(tmp_path / "offline", agent_repo)
    result = agent_cli("install", str(package), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    listed = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert {n: (m["version"], m["update"]["state"]) for n, m in listed.items()} == {
        "digits": ("2.0.0", "PROBATION"), SECOND_MODEL: ("2.0.0", "PROBATION")}
    # through a running agent: both updates, to the end
    agent = Agent(agent_config(tmp_path / "running", agent_repo, probation_window_s=0.1)).start()
    try:
        reply = agent.dispatch({"op": "install", "package": str(package)})
        assert sorted(u["model"] for u in reply["updates"]) == ["digits", SECOND_MODEL]
        for name in ("digits", SECOND_MODEL):
            driver = agent.models.driver(name)
            wait_for(lambda d=driver: not d.in_progress, 60, what=name)
            assert driver.state.update.state == "COMMITTED", driver.state.update.reason
            assert agent.servables.resolve(name).version == "2.0.0"
    finally:
        agent.stop()
