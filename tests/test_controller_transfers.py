"""The record of bytes with real parts: a release repository published with its companions by the
CLI (`edgeship publish`: a zstd copy and a delta), the controller over Mosquitto, and devices that
fetch through the real block protocol (`MqttBlockDownloader`): two apply the delta from the bundle
they hold with the real `apply_delta`, one without a base takes the compressed bundle, each checks
the bundle's signed sha256 and reports its transfer. `rollout status`, `fleet ls --json` and the
controller's `/metrics` (checked by promtool) then show what travelled, and what the block server
sent per stream kind."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard
from controller_fixtures import (  # noqa: F401 - fixtures
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

from edgeship.ota.block_transfer import MqttBlockDownloader
from edgeship.ota.blocks import BlockTransferConfig
from edgeship.ota.delta import apply_delta
from edgeship.ota.release import ReleaseRepository
from edgeship.toolkit.store import FleetStore

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]  # a real broker and a trained model


def fetch(sim: SimDevice, path: str, work: Path) -> bytes:
    """A target through the block protocol, as the agent's transport fetches it."""
    downloader = MqttBlockDownloader(sim.connection, fleet=sim.fleet, device=sim.device, work_dir=work,
                                     config=BlockTransferConfig(block_size=4096))
    return b"".join(downloader.chunks(f"edgeship://targets/{path}"))


def install(sim: SimDevice, repo: ReleaseRepository, base: Path | None, work: Path) -> None:
    """What the agent does for one update (docs/deltas.md): the delta from the active bundle when it
    holds one, else the compressed bundle; each file checked against its signed length and sha256,
    the rebuilt bundle against the bundle's; then COMMITTED with the transfer record."""
    state = wait_for(lambda: not sim.desired.empty() and sim.desired.get_nowait(), timeout=30,
                     what=f"{sim.device}'s desired state")
    companions = {t.kind: t for t in repo.companions(state.bundle, state.version)}
    bundle = work / "new.bundle"
    if base is not None:
        delta = companions["delta"]
        assert delta.base_sha256 == hashlib.sha256(base.read_bytes()).hexdigest()
        data = fetch(sim, delta.path, work)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (delta.length, delta.sha256)
        (work / "d.delta").write_bytes(data)
        apply_delta(work / "d.delta", base, bundle, expected_target_sha256=state.sha256)
        transfer: dict[str, Any] = {"kind": "delta", "bytes": len(data), "full_bytes": state.length,
                                    "base_version": delta.base_version}
    else:
        compressed = companions["compressed"]
        data = fetch(sim, compressed.path, work)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (compressed.length, compressed.sha256)
        bundle.write_bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=state.length))
        transfer = {"kind": "compressed", "bytes": len(data), "full_bytes": state.length,
                    "fallback": "no base: the active slot's bundle is not kept"}
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == state.sha256
    sim.commit(state, transfer)


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.promtool
def test_a_rollout_by_delta_and_compressed_bundle_is_on_the_record(
        mosquitto_broker: Any, release_repo: Path, db_url: str, tmp_path: Path,
        devices_factory: Callable[..., SimDevice]) -> None:
    repo = ReleaseRepository(release_repo)
    kinds = {t.kind for t in repo.companions("digits", "1.1.0")}
    assert kinds == {"delta", "compressed"}, "edgeship publish made no delta or no compressed copy"
    base = repo.target_info("digits", "1.0.0").file
    full = repo.target_info("digits", "1.1.0").length
    delta_len = next(t.length for t in repo.companions("digits", "1.1.0") if t.kind == "delta")
    zst_len = next(t.length for t in repo.companions("digits", "1.1.0") if t.kind == "compressed")
    v1 = {"name": "digits", "version": "1.0.0"}
    sims = [devices_factory(f"dev-{i}", active=dict(v1)) for i in range(4)]
    controller = start_controller(mosquitto_broker.url, release_repo, db_url, metrics_port=0)
    store = FleetStore(db_url)
    try:
        wait_for(lambda: len(store.list_devices("plant")) == 4, what="devices known")
        rollout_id = cli(["rollout", "start", "digits", "1.1.0", "--fleet", "plant", "--stages", "100",
                          "--db", db_url]).stdout.strip()
        failures: list[BaseException] = []

        def run(sim: SimDevice, base: Path | None) -> None:
            try:
                work = tmp_path / sim.device
                work.mkdir()
                install(sim, repo, base, work)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread below
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(sim, base if i < 2 else None)) for i, sim in enumerate(sims[:3])]
        for thread in threads:
            thread.start()
        # dev-3's agent sends a malformed record: the record is dropped, its update still counts
        state = wait_for(lambda: not sims[3].desired.empty() and sims[3].desired.get_nowait(), timeout=30,
                         what="dev-3's desired state")
        sims[3].commit(state, {"kind": "bsdiff", "bytes": -1, "full_bytes": full})
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        wait_for(lambda: store.load_rollout(rollout_id)[0].state.value == "COMPLETED", timeout=30,
                 what="the rollout completes")
        wait_for(lambda: len(store.last_transfers([s.device for s in sims])) == 3, what="three transfers stored")

        doc = cli_json(["rollout", "status", rollout_id, "--db", db_url])
        moved = doc["transfers"]
        assert (moved["devices"], moved["bytes"], moved["full_bytes"], moved["fallbacks"]) == \
            (3, 2 * delta_len + zst_len, 3 * full, 1)
        assert moved["bytes_saved"] == 3 * full - (2 * delta_len + zst_len) > 0
        assert {k: (e["devices"], e["bytes"]) for k, e in moved["by_kind"].items()} == {
            "delta": (2, 2 * delta_len), "compressed": (1, zst_len), "full": (0, 0)}
        human = cli(["rollout", "status", rollout_id, "--db", db_url]).stdout
        assert "bytes:" in human and "delta 2 devices" in human and "1 fell back" in human, human

        listed = {d["device"]: d for d in cli_json(["fleet", "ls", "--fleet", "plant", "--db", db_url])["devices"]}
        models = {device: {m["name"]: m for m in row["models"]} for device, row in listed.items()}
        assert {k: models["dev-0"]["digits"]["transfer"][k] for k in ("kind", "bytes", "full_bytes", "base_version",
                                                                     "version")} == \
            {"kind": "delta", "bytes": delta_len, "full_bytes": full, "base_version": "1.0.0", "version": "1.1.0"}
        assert models["dev-2"]["digits"]["transfer"]["kind"] == "compressed"
        assert models["dev-2"]["digits"]["transfer"]["fallback"].startswith("no base")
        assert models["dev-3"]["digits"]["transfer"] is None  # its record was malformed
        assert listed["dev-3"]["version"] == "1.1.0"  # and its update was still accepted

        assert controller.metrics_port is not None
        page = metrics(controller.metrics_port)
        assert page['edgeship_fleet_transfer_bytes_total{fleet="plant",kind="delta"}'] == 2 * delta_len
        assert page['edgeship_fleet_transfers_total{fleet="plant",kind="compressed"}'] == 1
        assert page['edgeship_fleet_transfers_total{fleet="plant",kind="full"}'] == 0
        assert page["edgeship_controller_transfer_records_dropped_total"] == 1
        # what left the controller: at least what arrived (a block asked for twice is sent twice)
        assert page['edgeship_controller_block_bytes_sent_total{kind="delta"}'] >= 2 * delta_len
        assert page['edgeship_controller_block_bytes_sent_total{kind="compressed"}'] >= zst_len
        assert page['edgeship_controller_block_bytes_sent_total{kind="full"}'] == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics", timeout=10).read()
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        store.close()
        controller.stop()
