"""Deltas in a rollout, with real parts: Mosquitto, a release repository made with the ``edgeship``
CLI (``publish`` adds the compressed bundle and deltas from the last versions), a real BlockServer,
and real ``edgeship-agent run`` processes.

Two devices that run digits 1.0.0 take the delta to 1.1.0 (the head retrained) and one freshly
provisioned device, without a base, takes the compressed bundle; each reports what travelled. Then
a corrupted, a truncated and a mismatched delta (the repository's file damaged after it was signed)
are each refused by a device that goes on to the compressed bundle, while its running model
answers every request made during the update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_e2e_fixtures import FleetAgent, FleetRelease, TestDirector, edgeship_cli, wait_for

from edgeship.ota.golden import GoldenVectors
from edgeship.ota.release import ReleaseRepository, TargetInfo
from edgeship.toolkit.deltas import build_delta

pytestmark = pytest.mark.mosquitto

BASE, HEAD, FAULTS = "1.0.0", "1.1.0", ("1.2.0", "1.3.0", "1.4.0")


@pytest.fixture(scope="module")
def delta_release(digits_tflite: Path, digits_files: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> FleetRelease:
    """digits 1.0.0, 1.1.0 with only its last layer retrained, and 1.2.0-1.4.0 (the same model as
    1.1.0 in new bundles), each published with ``edgeship publish`` (default: compressed, 2 deltas)."""
    import tensorflow as tf

    from edgeship.agent.runtimes import open_model

    base = tmp_path_factory.mktemp("fleet-deltas")
    calib = np.load(digits_files["calib"])
    model = tf.keras.models.load_model(digits_files["model"])
    for layer in model.layers[:-1]:
        layer.trainable = False
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(calib["x"].astype(np.float32), calib["y"], epochs=2, verbose=0)
    head = base / "head.tflite"
    head.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    goldens = {}
    for tag, path in (("base", digits_tflite), ("head", head)):
        with open_model(path) as runner:
            (y,) = runner.run([x])
        goldens[tag] = (path, base / f"{tag}.golden.npz", np.asarray(y, np.float32))
        GoldenVectors(("image",), (x,), ("probs",), (goldens[tag][2],), atol=1e-4).save(goldens[tag][1])
    repo = base / "repo"
    edgeship_cli("keys", "init", "--repo", str(repo))
    bundles = {}
    for version in (BASE, HEAD, *FAULTS):
        model_file, golden, _ = goldens["base" if version == BASE else "head"]
        out = base / f"digits-{version}.bundle"
        edgeship_cli("bundle", "build", str(model_file), "--name", "digits", "--version", version, "--golden",
                     str(golden), "-o", str(out))
        published = edgeship_cli("publish", str(out), "--repo", str(repo))
        assert published["companions"][0]["kind"] == "compressed", published
        bundles[version] = out
    return FleetRelease(repo=repo, eval_x=x, golden_y=goldens["head"][2], bundles=bundles)


@pytest.fixture
def director(mosquitto_broker: Any, delta_release: FleetRelease) -> Iterator[TestDirector]:
    d = TestDirector(mosquitto_broker.url, delta_release)
    try:
        yield d
    finally:
        d.close()


def _companion(release: FleetRelease, version: str, kind: str, base_version: str | None = None) -> TargetInfo:
    return next(c for c in ReleaseRepository(release.repo).companions("digits", version)
                if c.kind == kind and (base_version is None or c.base_version == base_version))


def _transfer(director: TestDirector, device: str, version: str) -> dict[str, Any]:
    update = director.wait_update(device, version, ("COMMITTED", "ROLLED_BACK", "FAILED", "REJECTED"), timeout=120)
    assert update["state"] == "COMMITTED" and isinstance(update.get("transfer"), dict), update
    return dict(update["transfer"])


class Poller:
    """Asks the device's model for predictions, without pause, until stopped; keeps every status
    (-1: no answer at all). A connection per request: an idle keep-alive connection the server
    closed while this busy machine did not schedule the thread is not a refused request."""

    def __init__(self, agent: FleetAgent, x: np.ndarray) -> None:
        self.agent, self.x = agent, x
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            client = self.agent.client()
            try:
                status, _ = client.predict("digits", self.x[:2].tolist())
            except OSError:
                status = -1
            finally:
                client.close()
            self.statuses.append(status)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(30)
        return self.statuses


def _damage(release: FleetRelease, version: str, base_version: str, how: str) -> None:
    """Change a published delta's file after it was signed (what a damaged disk or a hostile mirror
    hands the devices): corrupted, truncated, or a delta made from another base."""
    delta = _companion(release, version, "delta", base_version)
    data = delta.file.read_bytes()
    if how == "corrupted":
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x10
        data = bytes(damaged)
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # mismatched: rebuilds the right bundle, but from 1.0.0, which the device does not run
        repo = ReleaseRepository(release.repo)
        built = build_delta(repo.target_info("digits", BASE).file.read_bytes(),
                            repo.target_info("digits", version).file.read_bytes())
        assert built.data is not None
        data = built.data
    delta.file.write_bytes(data)


@pytest.mark.slow
def test_devices_with_a_base_take_the_delta_and_a_new_device_the_compressed_bundle(
        tmp_path: Path, mosquitto_broker: Any, director: TestDirector, delta_release: FleetRelease) -> None:
    # latency gates loosened: the poller below loads this shared machine, and what is proven here is
    # what travelled and that every request is answered, not the new version's latency
    agents = {d: FleetAgent(tmp_path / d, delta_release, mosquitto_broker.url, d, loosen_latency_gates=True)
              for d in ("dev-1", "dev-2")}
    try:
        for device, agent in agents.items():
            agent.wait_serving()
            wait_for(lambda d=device: "online" in director.status[d], 20, "status online")
            director.assign(device, BASE)
        for device in agents:
            assert _transfer(director, device, BASE)["kind"] == "compressed"  # nothing to apply a delta to yet
        fresh = agents["dev-new"] = FleetAgent(tmp_path / "dev-new", delta_release, mosquitto_broker.url, "dev-new")
        fresh.wait_serving()
        wait_for(lambda: "online" in director.status["dev-new"], 20, "status online")

        for device in agents:
            director.assign(device, HEAD)
        full = ReleaseRepository(delta_release.repo).target_info("digits", HEAD)
        delta = _companion(delta_release, HEAD, "delta", BASE)
        zst = _companion(delta_release, HEAD, "compressed")
        for device in ("dev-1", "dev-2"):
            transfer = _transfer(director, device, HEAD)
            assert transfer == {"kind": "delta", "bytes": delta.length, "full_bytes": full.length,
                                "base_version": BASE}, transfer
            assert transfer["bytes"] < full.length / 10, transfer  # the head alone travelled
        assert _transfer(director, "dev-new", HEAD) == {"kind": "compressed", "bytes": zst.length,
                                                        "full_bytes": full.length}
        assert {e.stream for e in director.blocks.log if "/deltas/" in e.stream} == {"targets/" + delta.path}
        assert not director.served("targets/" + full.path), "no device needed the plain bundle"
        for agent in agents.values():
            status, body = agent.predict(delta_release.eval_x[:2].tolist())
            assert status == 200, body
            np.testing.assert_allclose(np.asarray(body["predictions"], np.float32), delta_release.golden_y[:2],
                                       atol=1e-4)
            models = agent.status()["models"]
            assert [m["update"]["transfer"]["kind"] for m in models] == [
                "compressed" if agent.device == "dev-new" else "delta"]
        assert not director.refused, director.refused

        # a damaged delta is refused, the compressed bundle taken, and the model serves throughout
        agent = agents["dev-1"]
        previous = HEAD
        for version, how in zip(FAULTS, ("corrupted", "truncated", "mismatched")):
            _damage(delta_release, version, previous, how)
            poller = Poller(agent, delta_release.eval_x)
            director.assign("dev-1", version)
            transfer = _transfer(director, "dev-1", version)
            statuses = poller.stop()
            assert transfer["kind"] == "compressed", (how, transfer)
            assert transfer["fallback"].startswith("delta refused: "), (how, transfer)
            assert transfer["bytes"] >= _companion(delta_release, version, "compressed").length
            assert len(statuses) >= 5 and set(statuses) == {200}, (how, statuses[:20])
            previous = version
        assert "Traceback" not in agent.log.read_text()
    finally:
        for agent in agents.values():
            agent.stop()
