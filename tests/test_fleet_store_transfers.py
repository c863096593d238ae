"""The record of bytes in the fleet store: each update's transfer written once (a retained report
repeats it), the last one per device and model, the sums per rollout and per kind; the sums
themselves table-tested (``toolkit.transfers.summarize``, pure)."""

from __future__ import annotations

from typing import Any

import pytest
from fleet_fixtures import postgres_server, store  # noqa: F401  (fixtures)

from edgeship.ota.protocol import ReportedMessage
from edgeship.toolkit.store import FleetStore, IngestItem
from edgeship.toolkit.transfers import summarize

FLEET = "plant1"


def transfer(kind: str, sent: int, full: int = 100_000, base: str | None = None,
             fallback: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": kind, "bytes": sent, "full_bytes": full}
    if base:
        doc["base_version"] = base
    if fallback:
        doc["fallback"] = fallback
    return doc


def update(version: str, moved: dict[str, Any] | None, update_id: str = "u-1", deployment: str | None = "r-1",
           name: str = "digits") -> dict[str, Any]:
    doc: dict[str, Any] = {"id": update_id, "state": "COMMITTED", "bundle": {"name": name, "version": version}}
    if deployment:
        doc["deployment"] = deployment
    if moved is not None:
        doc["transfer"] = moved
    return doc


def one_model(device: str, upd: dict[str, Any], at: float = 100.0) -> IngestItem:
    """An agent of one model: the top-level update carries the transfer."""
    return IngestItem(FLEET, device, ReportedMessage(device, at, upd["bundle"], update=upd), at)


def many_models(device: str, updates: dict[str, dict[str, Any]], at: float = 100.0) -> IngestItem:
    """A multi-model agent: each model's update carries its own transfer; the top level repeats one."""
    models = {name: {"active": u["bundle"], "update": u} for name, u in updates.items()}
    first = next(iter(updates.values()))
    return IngestItem(FLEET, device, ReportedMessage(device, at, first["bundle"], update=first, models=models), at)


# -- summarize (pure) -----------------------------------------------------------------------------

ROW = {"device_id": "d1", "kind": "delta", "bytes": 5_000, "full_bytes": 100_000, "fallback": None, "reported_at": 1.0}


@pytest.mark.parametrize("rows,expected", [
    ([], {"devices": 0, "bytes": 0, "full_bytes": 0, "bytes_saved": 0, "fallbacks": 0}),
    ([ROW], {"devices": 1, "bytes": 5_000, "full_bytes": 100_000, "bytes_saved": 95_000, "fallbacks": 0}),
    ([ROW, {**ROW, "device_id": "d2"}, {**ROW, "device_id": "d3", "kind": "compressed", "bytes": 80_000,
                                        "fallback": "no base"}],
     {"devices": 3, "bytes": 90_000, "full_bytes": 300_000, "bytes_saved": 210_000, "fallbacks": 1}),
    # a failed delta, then the full bundle, for one device: both tries' bytes count, the device once
    # (as what it ended with), and the record may show a loss
    ([{**ROW, "bytes": 30_000, "reported_at": 1.0}, {**ROW, "kind": "full", "bytes": 100_000, "reported_at": 2.0,
                                                    "fallback": "delta refused"}],
     {"devices": 1, "bytes": 130_000, "full_bytes": 200_000, "bytes_saved": 70_000, "fallbacks": 1}),
], ids=["none", "one delta", "deltas and a compressed fallback", "two tries of one device"])
def test_summarize(rows: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    got = summarize(rows)
    assert {k: got[k] for k in expected} == expected
    assert set(got["by_kind"]) >= {"delta", "compressed", "full"}
    assert sum(e["devices"] for e in got["by_kind"].values()) == expected["devices"]
    assert sum(e["bytes"] for e in got["by_kind"].values()) == expected["bytes"]


def test_summarize_counts_devices_by_the_kind_of_their_last_transfer() -> None:
    got = summarize([{**ROW, "reported_at": 1.0}, {**ROW, "kind": "full", "bytes": 100_000, "reported_at": 2.0}])
    assert got["by_kind"]["delta"] == {"devices": 0, "updates": 1, "bytes": 5_000, "full_bytes": 100_000}
    assert got["by_kind"]["full"] == {"devices": 1, "updates": 1, "bytes": 100_000, "full_bytes": 100_000}


# -- the store ------------------------------------------------------------------------------------

def test_a_retained_report_repeated_is_recorded_once(store: FleetStore) -> None:
    upd = update("1.1.0", transfer("delta", 5_000, base="1.0.0"))
    store.ingest([one_model("d1", upd, 100.0), one_model("d1", upd, 101.0)])
    store.ingest([one_model("d1", upd, 200.0)])  # the controller restarted and read the retained report
    assert store.transfer_totals() == {(FLEET, "delta"): (1, 5_000)}
    last = store.last_transfers(["d1"])["d1"]["digits"]
    assert last == {"kind": "delta", "bytes": 5_000, "full_bytes": 100_000, "base_version": "1.0.0",
                    "fallback": None, "version": "1.1.0", "reported_at": 100.0}


def test_reports_without_a_transfer_record_nothing(store: FleetStore) -> None:
    store.ingest([one_model("d1", update("1.1.0", None)),
                  IngestItem(FLEET, "d2", ReportedMessage("d2", 1.0, {"name": "digits", "version": "1.0.0"}), 1.0)])
    assert store.transfer_totals() == {}
    assert store.last_transfers(["d1", "d2"]) == {}


def test_a_multi_model_agent_records_each_model_from_its_own_update(store: FleetStore) -> None:
    store.ingest([many_models("d1", {
        "digits": update("1.1.0", transfer("delta", 5_000, base="1.0.0"), "u-1"),
        "kws": update("2.0.0", transfer("compressed", 40_000, 90_000), "u-2", name="kws")})])
    last = store.last_transfers(["d1"])["d1"]
    assert {name: (t["kind"], t["bytes"], t["version"]) for name, t in last.items()} == {
        "digits": ("delta", 5_000, "1.1.0"), "kws": ("compressed", 40_000, "2.0.0")}
    # the top level repeats digits' update: not counted a second time
    assert store.transfer_totals() == {(FLEET, "delta"): (1, 5_000), (FLEET, "compressed"): (1, 40_000)}


def test_the_last_transfer_of_a_model_is_its_latest_update(store: FleetStore) -> None:
    store.ingest([one_model("d1", update("1.1.0", transfer("delta", 5_000, base="1.0.0"), "u-1"), 100.0)])
    store.ingest([one_model("d1", update("1.2.0", transfer("full", 100_000, fallback="delta refused: bad hash"),
                                         "u-2", "r-2"), 200.0)])
    last = store.last_transfers(["d1"])["d1"]["digits"]
    assert (last["kind"], last["version"], last["fallback"]) == ("full", "1.2.0", "delta refused: bad hash")
    assert store.transfer_totals() == {(FLEET, "delta"): (1, 5_000), (FLEET, "full"): (1, 100_000)}


def test_a_rollout_sums_its_own_devices_model_and_version(store: FleetStore) -> None:
    store.ingest([
        one_model("d1", update("1.1.0", transfer("delta", 5_000, base="1.0.0"))),
        one_model("d2", update("1.1.0", transfer("delta", 7_000, base="1.0.0"))),
        one_model("d3", update("1.1.0", transfer("compressed", 60_000, fallback="no base"))),
        one_model("d4", update("1.1.0", transfer("full", 100_000), deployment=None)),  # no deployment named: counted
        one_model("d5", update("1.1.0", transfer("full", 100_000), deployment="deploy-9")),  # another deployment
        one_model("d6", update("1.1.0", transfer("full", 100_000))),  # not in the rollout
        one_model("d7", update("1.0.9", transfer("full", 100_000))),  # another version
    ])
    got = store.rollout_transfers("r-1", "digits", "1.1.0", ["d1", "d2", "d3", "d4", "d5", "d7"])
    assert (got["devices"], got["bytes"], got["full_bytes"], got["bytes_saved"], got["fallbacks"]) == \
        (4, 172_000, 400_000, 228_000, 1)
    assert {k: (e["devices"], e["bytes"]) for k, e in got["by_kind"].items()} == {
        "delta": (2, 12_000), "compressed": (1, 60_000), "full": (1, 100_000)}
