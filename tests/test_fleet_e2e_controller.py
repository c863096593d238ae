"""The whole loop with the real controller: Mosquitto, ``Controller`` (store, block
server, reconcile loop, director signing), ``edgeship rollout start`` and real agent
processes. A device that is offline while its stage is assigned converges when it
returns (its retained desired state waits on the broker); a bad version aborts at
the first stage and the moved device is sent back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fleet_e2e_fixtures import (
    BAD,
    FLEET,
    GOOD,
    FleetAgent,
    FleetRelease,
    edgeship_cli,
    fleet_release,
    wait_for,
)

__all__ = ["fleet_release"]

pytestmark = pytest.mark.mosquitto


def _finished(store: Any, rollout_id: str) -> Any:
    from edgeship.toolkit.rollouts import FINISHED_STATES

    current, _ = store.load_rollout(rollout_id)
    return current if current.state in FINISHED_STATES else None


def _rollout(db_url: str, version: str, *extra: str) -> str:
    doc = edgeship_cli("rollout", "start", "digits", version, "--fleet", FLEET, "--db", db_url, *extra)
    return str(doc["id"])


@pytest.mark.slow
def test_controller_rollout_reaches_a_device_that_was_offline_and_aborts_a_bad_version(
        tmp_path: Path, mosquitto_broker: Any, fleet_release: FleetRelease) -> None:
    from edgeship.toolkit.controller import Controller, ControllerConfig
    from edgeship.toolkit.store import FleetStore

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    controller = Controller(ControllerConfig(broker=mosquitto_broker.url, repo=fleet_release.repo, db_url=db_url,
                                             replica_id="e2e", tick_s=0.3)).start()
    store = FleetStore(db_url)
    names = ["c-1", "c-2", "c-3"]
    agents = {n: FleetAgent(tmp_path / n, fleet_release, mosquitto_broker.url, n) for n in names}
    try:
        for agent in agents.values():
            agent.wait_serving()

        def online() -> set[str]:
            return {d.id for d in store.list_devices(FLEET) if d.online}

        wait_for(lambda: online() == set(names), 30, "three devices online in the store")
        agents["c-3"].stop()  # clean stop: "offline" retained
        wait_for(lambda: online() == {"c-1", "c-2"}, 30, "c-3 offline in the store")

        rollout_id = _rollout(db_url, GOOD, "--stages", "50,100", "--stage-timeout", "3m")

        def record(device: str) -> str:
            current, _ = store.load_rollout(rollout_id)
            return current.devices[device].status.value if device in current.devices else "-"

        # the online devices go first; c-3 gets its (retained) desired state in the last stage
        wait_for(lambda: record("c-3") == "ASSIGNED", 90, "c-3 assigned while offline")
        assert {record("c-1"), record("c-2")} == {"SUCCEEDED"}
        time.sleep(1.0)
        current, _ = store.load_rollout(rollout_id)
        assert current.state.value == "RUNNING"
        agents["c-3"] = FleetAgent(tmp_path / "c-3", fleet_release, mosquitto_broker.url, "c-3")
        final = wait_for(lambda: _finished(store, rollout_id), 90, "the rollout to finish once c-3 is back")
        assert final.state.value == "COMPLETED", final.reason
        assert {d.id: d.active_version for d in store.list_devices(FLEET)} == {n: GOOD for n in names}
        # the real agents' transfer records reached the store through the controller: every one took
        # the full bundle (this release publishes no companion), every byte of it counted
        from edgeship.ota.release import ReleaseRepository

        length = ReleaseRepository(fleet_release.repo).target_info("digits", GOOD).length
        moved_bytes = wait_for(lambda: (t := store.rollout_transfers(rollout_id, "digits", GOOD, names))["devices"] == 3
                               and t, 30, "three transfer records")
        assert moved_bytes["by_kind"]["full"]["devices"] == 3 and moved_bytes["full_bytes"] == 3 * length
        assert moved_bytes["bytes"] >= 3 * length and moved_bytes["fallbacks"] == 0, moved_bytes

        # a version whose golden vectors do not match: the first stage's device fails, the rollout aborts
        bad_id = _rollout(db_url, BAD, "--stages", "20,100", "--max-failures", "0")
        bad = wait_for(lambda: _finished(store, bad_id), 90, "the bad rollout to finish")
        assert bad.state.value == "ABORTED", bad.reason
        moved = [d for d, r in bad.devices.items() if r.status.value != "CANCELLED"]
        assert len(moved) == 1 and bad.devices[moved[0]].status.value == "ROLLBACK_SENT"
        info = store.get_device(moved[0])
        assert info.update_state == "FAILED" and "golden" in (info.update_detail or "").lower()
        time.sleep(1.0)
        assert {d.id: d.active_version for d in store.list_devices(FLEET)} == {n: GOOD for n in names}
        for name, agent in agents.items():
            status, _ = agent.predict(fleet_release.eval_x[:1].tolist())
            assert status == 200, name
    finally:
        for agent in agents.values():
            agent.stop()
        store.close()
        controller.stop()
