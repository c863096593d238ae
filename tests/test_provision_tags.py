"""Provisioning's `--tags` reach the fleet store (with --db), so `rollout start --select TAG=VALUE`
finds the device: recorded once the device is known, never onto a device of another fleet."""

from __future__ import annotations

from pathlib import Path


def _store_with(db: str, device: str, fleet: str) -> None:
    from edgeship.ota.protocol import ReportedMessage
    from edgeship.toolkit.store import FleetStore, IngestItem

    with FleetStore(db) as store:
        store.ingest([IngestItem(fleet, device, ReportedMessage(device, 1.0), 5.0)])


def test_tags_are_recorded_once_the_device_is_known(tmp_path: Path) -> None:
    from edgeship.toolkit.provisioning import record_fleet_tags
    from edgeship.toolkit.store import FleetStore

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _store_with(db, "dev-1", "plant")
    status, _ = record_fleet_tags(db, "plant", "dev-1", {"site": "p3", "line": "2"}, timeout_s=1)
    assert status == "changed"
    with FleetStore(db) as store:
        assert store.get_device("dev-1").tags == {"site": "p3", "line": "2"}
        assert [d.id for d in store.list_devices("plant", (("site", "p3"),))] == ["dev-1"]
    assert record_fleet_tags(db, "plant", "dev-1", {"site": "p3"}, timeout_s=1)[0] == "unchanged"


def test_tags_wait_for_an_unknown_device_then_say_how(tmp_path: Path) -> None:
    from edgeship.toolkit.provisioning import record_fleet_tags

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    status, detail = record_fleet_tags(db, "plant", "dev-9", {"site": "p3"}, timeout_s=0.3)
    assert status == "skipped" and "edgeship device tag dev-9 site=p3" in detail


def test_tags_of_a_device_in_another_fleet_are_not_written(tmp_path: Path) -> None:
    from edgeship.toolkit.provisioning import record_fleet_tags
    from edgeship.toolkit.store import FleetStore

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _store_with(db, "dev-1", "lab")
    status, detail = record_fleet_tags(db, "plant", "dev-1", {"site": "p3"}, timeout_s=0.3)
    assert status == "skipped" and "fleet lab" in detail
    with FleetStore(db) as store:
        assert store.get_device("dev-1").tags == {}
