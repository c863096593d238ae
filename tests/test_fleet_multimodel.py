"""Two model names rolled out independently through a real Mosquitto: the controller, a SQLite
store, a release repository built with the CLI, multi-model devices (simulated agents that read
desired-state schema 2 and report their ``models``) and a device of the single-model form."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from controller_fixtures import (  # noqa: F401 - fixtures
    PASS,
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

from edgeship.toolkit.store import FleetStore

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]  # a real broker and a trained model


@pytest.fixture
def two_model_repo(release_repo: Path, digits_tflite: Path, tmp_path: Path) -> Path:
    """The digits repository plus a second model name, ``kws`` 1.0.0 and 1.1.0."""
    env = {"EDGESHIP_ROOT_PASSPHRASE": PASS}
    for version in ("1.0.0", "1.1.0"):
        bundle = tmp_path / f"kws-{version}.bundle"
        cli(["bundle", "build", str(digits_tflite), "--name", "kws", "--version", version, "-o", str(bundle)],
            env=env)
        cli(["publish", str(bundle), "--repo", str(release_repo)], env=env)
    return release_repo


def _rollout(name: str, version: str, db: str, broker: str, *extra: str) -> str:
    rollout_id: str = cli(["rollout", "start", name, version, "--fleet", "plant", "--stages", "100", "--db", db,
                           "--broker", broker, *extra]).stdout.strip()
    return rollout_id


def _finished(store: FleetStore, rollout_id: str) -> Any:
    rollout = store.load_rollout(rollout_id)[0]
    return rollout if rollout.state.value in ("COMPLETED", "ABORTED") and all(
        r.status.value not in ("PENDING", "ASSIGNED", "IN_PROGRESS") for r in rollout.devices.values()) else None


def test_two_model_names_roll_out_independently(mosquitto_broker: Any, two_model_repo: Path, db_url: str,
                                               devices_factory: Callable[..., SimDevice], tmp_path: Path) -> None:
    multi = [devices_factory(f"m-{i}", multi_model=True, auto_commit=True) for i in range(2)]
    single = devices_factory("s-0", auto_commit=True)
    controller = start_controller(mosquitto_broker.url, two_model_repo, db_url)
    store = FleetStore(db_url)
    try:
        wait_for(lambda: len(store.list_devices("plant")) == 3, what="devices known")
        # 1. digits to everyone: the multi-model devices get schema 2, the single-model one schema 1
        first = _rollout("digits", "1.0.0", db_url, mosquitto_broker.url)
        done = wait_for(lambda: _finished(store, first), timeout=60, what="digits 1.0.0 rolled out")
        assert {d: r.status.value for d, r in done.devices.items()} == {"m-0": "SUCCEEDED", "m-1": "SUCCEEDED",
                                                                        "s-0": "SUCCEEDED"}
        assert multi[0].documents[-1]["models"]["digits"]["version"] == "1.0.0"
        assert multi[0].documents[-1]["models"]["digits"]["serving_version"] == 1
        assert single.active == {"name": "digits", "version": "1.0.0"} and not single.refused

        # 2. a second model name: added beside digits on the multi-model devices; refused for the
        # single-model agent with the reason, which rollout status shows (one failure in three is
        # within this rollout's threshold; at the default it would abort and roll the others back)
        second = _rollout("kws", "1.0.0", db_url, mosquitto_broker.url, "--max-failures", "50%",
                          "--success-threshold", "60")
        done = wait_for(lambda: _finished(store, second), timeout=60, what="kws 1.0.0 rolled out")
        statuses = {d: (r.status.value, r.detail) for d, r in done.devices.items()}
        assert statuses["m-0"][0] == statuses["m-1"][0] == "SUCCEEDED", (done.state, done.reason, statuses,
                                                                          store.rollout_log_entries(second))
        assert statuses["s-0"] == ("FAILED", "agent sim serves one model; upgrade the agent")
        doc = multi[1].documents[-1]
        assert sorted(doc["models"]) == ["digits", "kws"]
        assert (doc["models"]["digits"]["version"], doc["models"]["kws"]["version"]) == ("1.0.0", "1.0.0")
        assert single.active == {"name": "digits", "version": "1.0.0"}  # never told to drop digits
        status = cli_json(["rollout", "status", second, "--db", db_url, "--devices"])
        assert status["serving_version"] == 1
        assert {d["device"]: d["detail"] for d in status["devices"]}["s-0"] == \
            "agent sim serves one model; upgrade the agent"

        # 3. a new digits version moves digits only: kws stays as it was, on every device
        before = {m.device: dict(m.models["kws"]) for m in multi}
        third = _rollout("digits", "1.1.0", db_url, mosquitto_broker.url)
        done = wait_for(lambda: _finished(store, third), timeout=60, what="digits 1.1.0 rolled out")
        assert {r.status.value for r in done.devices.values()} == {"SUCCEEDED"}
        for m in multi:
            latest = m.documents[-1]["models"]
            assert latest["digits"]["version"] == "1.1.0" and latest["digits"]["serving_version"] == 2
            assert latest["kws"]["version"] == "1.0.0" and latest["kws"]["serving_version"] == 1
            assert m.models["kws"] == before[m.device]  # not reinstalled
            assert not m.refused
        assert single.active == {"name": "digits", "version": "1.1.0"}  # schema 1 while it holds one model

        # 4. kws alone moves next (the single-model device is refused again); digits 1.1.0 stays
        fourth = _rollout("kws", "1.1.0", db_url, mosquitto_broker.url, "--max-failures", "50%",
                          "--success-threshold", "60")
        wait_for(lambda: _finished(store, fourth), timeout=60, what="kws 1.1.0 rolled out")
        for m in multi:
            assert {n: e["version"] for n, e in m.documents[-1]["models"].items()} == {"digits": "1.1.0",
                                                                                     "kws": "1.1.0"}

        # every model of every device, with bundle and serving version, in `fleet ls --json`
        for m in multi:
            m.telemetry(requests=20)
        wait_for(lambda: len({w.name for w in store.telemetry_windows("plant", since=0.0)}) == 2,
                 what="per-model telemetry ingested")
        listing = {d["device"]: d for d in cli_json(["fleet", "ls", "--db", db_url])["devices"]}
        assert [(m["name"], m["version"], m["serving_version"]) for m in listing["m-0"]["models"]] == \
            [("digits", "1.1.0", 2), ("kws", "1.1.0", 2)]
        assert [(m["name"], m["version"]) for m in listing["s-0"]["models"]] == [("digits", "1.1.0")]
        shown = cli_json(["device", "show", "m-1", "--db", db_url])
        assert {m["name"]: m["desired_version"] for m in shown["models"]} == {"digits": "1.1.0", "kws": "1.1.0"}
        assert set(shown["telemetry"]) == {"digits:1.1.0", "kws:1.1.0"}

        # taking kws off m-0 leaves digits as it was; the single-model agent cannot be told to serve
        # nothing and is refused with the reason (the outbox entry keeps it)
        sequence = multi[0].last_sequence
        cli(["undeploy", "kws", "--device", "m-0", "--device", "s-0", "--db", db_url])
        wait_for(lambda: multi[0].last_sequence != sequence and "kws" not in multi[0].models,
                 what="kws removed from m-0")
        assert {n: e["version"] for n, e in multi[0].documents[-1]["models"].items()} == {"digits": "1.1.0"}
        assert multi[0].models["digits"]["active"] == {"name": "digits", "version": "1.1.0"}
        assert set(multi[1].documents[-1]["models"]) == {"digits", "kws"}  # m-1 untouched
        wait_for(lambda: set(store.device_models_of(["m-0"])["m-0"]) == {"digits"}, what="m-0 reports digits only")
        assert store.desired_set("m-0").keys() == {"digits"}
        assert store.desired_set("s-0").keys() == {"digits"} and single.active["name"] == "digits"
    finally:
        store.close()
        controller.stop()
