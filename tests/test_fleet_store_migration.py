"""A store made by the previous release (one model per device) opens under this one: the new tables
and columns are added in place, each device's desired state becomes its desired set, nothing is
lost, and a second open changes nothing. SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fleet_store_v1_schema as v1
import fleet_store_v2_schema as v2
import pytest
import sqlalchemy as sa
from fleet_fixtures import postgres_server  # noqa: F401  (fixture)

from edgeship.ota.protocol import ReportedMessage
from edgeship.toolkit.fleet_rules import DesiredModel
from edgeship.toolkit.store import FleetStore, IngestItem
from edgeship.toolkit.store_migration import SCHEMA_VERSION


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def old_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    url: str = request.getfixturevalue("postgres_server").new_database()
    return url


def _driver_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def _fill_v1(url: str) -> None:
    """What a fleet of one-model agents left in the previous release's store."""
    engine = sa.create_engine(_driver_url(url))
    v1.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(v1.devices), [
            {"id": "d1", "fleet": "f", "online": True, "first_seen": 1.0, "last_seen": 2.0,
             "active_name": "digits", "active_version": "1.0.0", "agent_version": "0.1.0"},
            {"id": "d2", "fleet": "f", "online": False, "first_seen": 1.0, "last_seen": 2.0, "active_name": None,
             "active_version": None, "agent_version": None}])
        conn.execute(sa.insert(v1.desired_states), [
            {"device_id": "d1", "fleet": "f", "sequence": 3, "name": "digits", "version": "1.0.0",
             "action": "install", "issued_at": 10.0, "rollout_id": None, "deployment": "deploy-1"},
            {"device_id": "d1", "fleet": "f", "sequence": 5, "name": "digits", "version": "1.1.0",
             "action": "install", "issued_at": 20.0, "rollout_id": "ro-1", "deployment": "ro-1"}])
        conn.execute(sa.insert(v1.telemetry), [
            {"device_id": "d1", "fleet": "f", "ts": 1.0, "received_at": 1.0, "window_s": 10.0, "requests": 5,
             "errors": 0, "latency": {"counts": [0] * 20, "sum_ms": 0.0}, "bundle_name": "digits",
             "bundle_version": "1.0.0"}])
    engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(_driver_url(url))
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_a_store_of_the_previous_release_is_migrated_in_place(old_store_url: str) -> None:
    _fill_v1(old_store_url)
    assert "models_reported" not in _columns(old_store_url, "devices")
    with FleetStore(old_store_url) as store:
        assert "devices.models_reported" in store.migrations and "telemetry.serving_version" in store.migrations
        assert f"schema 1 -> {SCHEMA_VERSION}" in store.migrations
        # the latest desired state of each device is its desired set of one model
        assert store.desired_set("d1") == {"digits": DesiredModel("digits", "1.1.0", None, "install", "ro-1", None,
                                                                  "ro-1")}
        assert store.desired_set("d2") == {}
        # nothing that was there is lost
        d1 = store.get_device("d1")
        assert (d1.active_name, d1.active_version, d1.agent_version, d1.models_reported) == \
            ("digits", "1.0.0", "0.1.0", None)
        assert store.desired_for("d1").sequence == 5  # type: ignore[union-attr]
        windows = store.telemetry_windows("f", since=0.0)
        assert [(w.device, w.name, w.version, w.requests) for w in windows] == [("d1", "digits", "1.0.0", 5)]
        # the migrated store takes what a multi-model agent reports
        store.ingest([IngestItem("f", "d2", ReportedMessage(
            "d2", 30.0, active={"name": "kws", "version": "2.0.0"}, agent_version="0.2.0",
            models={"kws": {"active": {"name": "kws", "version": "2.0.0"}, "serving_version": 4}}), 30.0)])
        assert store.get_device("d2").models_reported is True
        assert store.device_models_of(["d2"])["d2"]["kws"]["serving_version"] == 4
    with FleetStore(old_store_url) as again:
        assert again.migrations == []  # nothing left to do
        assert again.desired_set("d1")["digits"].version == "1.1.0"


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(_driver_url(url))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _fill_v2(url: str) -> None:
    """What the previous release (many models, no record of bytes) left: a device, a rollout of one
    model to it, and the schema recorded as 2."""
    engine = sa.create_engine(_driver_url(url))
    v2.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(v2.store_meta).values(key="schema", value="2"))
        conn.execute(sa.insert(v2.devices).values(
            id="d1", fleet="f", online=True, first_seen=1.0, last_seen=2.0, active_name="digits",
            active_version="1.0.0", agent_version="0.2.0", models_reported=True))
        conn.execute(sa.insert(v2.device_models).values(device_id="d1", model="digits", active_version="1.0.0",
                                                        serving_version=1, reported_at=2.0))
    engine.dispose()


def test_a_store_of_schema_2_gains_the_record_of_bytes_in_place(old_store_url: str) -> None:
    """The transfers table is added, nothing else changes, and the migrated store records what the
    next report says travelled; a second open has nothing to do."""
    _fill_v2(old_store_url)
    assert "transfers" not in _tables(old_store_url)
    with FleetStore(old_store_url) as store:
        assert store.migrations == [f"schema 2 -> {SCHEMA_VERSION}"]
        assert store.device_models_of(["d1"])["d1"]["digits"]["serving_version"] == 1
        assert store.last_transfers(["d1"]) == {}
        update = {"id": "u-7", "state": "COMMITTED", "bundle": {"name": "digits", "version": "1.1.0"},
                  "deployment": "r-1", "transfer": {"kind": "delta", "bytes": 4000, "full_bytes": 90000,
                                                    "base_version": "1.0.0"}}
        store.ingest([IngestItem("f", "d1", ReportedMessage(
            "d1", 30.0, active={"name": "digits", "version": "1.1.0"}, update=update, agent_version="0.3.0",
            models={"digits": {"active": {"name": "digits", "version": "1.1.0"}, "update": update}}), 30.0)])
        last = store.last_transfers(["d1"])["d1"]["digits"]
        assert (last["kind"], last["bytes"], last["full_bytes"], last["base_version"], last["version"]) == \
            ("delta", 4000, 90000, "1.0.0", "1.1.0")
        assert store.transfer_totals() == {("f", "delta"): (1, 4000)}
    assert "transfers" in _tables(old_store_url)
    with FleetStore(old_store_url) as again:
        assert again.migrations == []


def test_a_new_store_is_created_at_the_current_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with FleetStore(url) as store:
        assert store.migrations == ["created"]
    assert {"models_reported"} <= _columns(url, "devices")
    with FleetStore(url) as store:
        assert store.migrations == []


def test_two_processes_opening_an_old_store_at_once_both_succeed(tmp_path: Path) -> None:
    import threading

    url = f"sqlite:///{tmp_path / 'old.db'}"
    _fill_v1(url)
    errors: list[Any] = []

    def open_it() -> None:
        try:
            FleetStore(url).close()
        except Exception as exc:  # noqa: BLE001 - the test reports whatever either opener raised
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with FleetStore(url) as store:
        assert store.desired_set("d1")["digits"].version == "1.1.0"
