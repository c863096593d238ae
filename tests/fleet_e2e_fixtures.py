"""Fixtures of the fleet end-to-end tests: a release repository made with the real
``edgeship`` CLI (keys init, bundle build, publish) on the digits model, a small
test "director" that signs desired states with the repository's director key and
publishes them retained over MQTT while a real BlockServer serves the blocks, and
real ``edgeship-agent run`` processes configured with a broker.

Until toolkit/controller.py exists the director here stands in for it; it uses the
same public APIs the controller does (ReleaseRepository.sign_desired, BlockServer,
MqttConnection, ota.protocol).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_fixtures import AgentProcess, agent_env
from polling import wait_for  # also re-exported for the tests

from edgeship.agent.config import render_config
from edgeship.ota.errors import EdgeshipError
from edgeship.ota.golden import GoldenVectors
from edgeship.ota.protocol import DesiredMessage, encode_message, parse_message
from edgeship.ota.topics import DESIRED, EVENTS, REPORTED, STATUS, device_topic, device_wildcard
from edgeship.ota.transport import MqttConnection, ReceivedMessage

__all__ = ["FLEET", "PASSPHRASE", "FleetAgent", "FleetRelease", "TestDirector", "edgeship_cli", "wait_for"]

FLEET = "e2e"
PASSPHRASE = "fleet-e2e-root-passphrase"
GOOD, NEXT, BAD = "1.0.0", "2.0.0", "2.1.0"


def edgeship_cli(*args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``edgeship ... --json`` as a user would; returns its JSON document."""
    env = dict(os.environ, EDGESHIP_ROOT_PASSPHRASE=PASSPHRASE, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", *args, "--json"], capture_output=True,
                            text=True, env=env, timeout=timeout, check=False)
    assert result.returncode == 0, f"edgeship {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return dict(json.loads(result.stdout))


@dataclass
class FleetRelease:
    repo: Path
    eval_x: np.ndarray
    golden_y: np.ndarray
    bundles: dict[str, Path]

    @property
    def root_json(self) -> Path:
        return self.repo / "metadata" / "root.json"

    @property
    def director_pub(self) -> Path:
        from edgeship.ota.release import ReleaseRepository

        return ReleaseRepository(self.repo).director_public_key_path

    def sign(self, device: str, version: str, **kwargs: Any) -> dict[str, Any]:
        from edgeship.ota.release import ReleaseRepository

        return ReleaseRepository(self.repo).sign_desired(fleet=FLEET, device=device, name="digits", version=version,
                                                         **kwargs)

    def target_length(self, version: str) -> int:
        from edgeship.ota.release import ReleaseRepository

        return int(ReleaseRepository(self.repo).target_info("digits", version).length)

    def target_stream(self, version: str) -> str:
        from edgeship.ota.release import ReleaseRepository

        return "targets/" + ReleaseRepository(self.repo).target_info("digits", version).path


@pytest.fixture(scope="session")
def fleet_release(digits_tflite: Path, digits_files: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> FleetRelease:
    """digits 1.0.0 and 2.0.0 (good golden vectors) and 2.1.0 (golden outputs perturbed: fails self-test)."""
    from edgeship.agent.runtimes import open_model

    base = tmp_path_factory.mktemp("fleet-e2e")
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    with open_model(digits_tflite) as runner:
        (y,) = runner.run([x])
    y = np.asarray(y, dtype=np.float32)
    good = base / "good.golden.npz"
    GoldenVectors(("image",), (x,), ("probs",), (y,), atol=1e-4).save(good)
    perturbed = y.copy()
    perturbed[:, 0] += 0.25  # far outside atol: the device's self-test must refuse it
    bad = base / "bad.golden.npz"
    GoldenVectors(("image",), (x,), ("probs",), (perturbed,), atol=1e-4).save(bad)
    repo = base / "repo"
    edgeship_cli("keys", "init", "--repo", str(repo))
    bundles: dict[str, Path] = {}
    for version, golden in ((GOOD, good), (NEXT, good), (BAD, bad)):
        out = base / f"digits-{version}.bundle"
        edgeship_cli("bundle", "build", str(digits_tflite), "--name", "digits", "--version", version,
                     "--golden", str(golden), "-o", str(out))
        # plain bundles only: these tests prove the block transport of a whole bundle (resume, rate
        # limits); deltas and compressed bundles have their own (tests/test_fleet_e2e_deltas.py)
        edgeship_cli("publish", str(out), "--repo", str(repo), "--deltas", "0", "--no-compress")
        bundles[version] = out
    return FleetRelease(repo=repo, eval_x=x, golden_y=y, bundles=bundles)


class TestDirector:
    """The fleet side of the tests: signs and publishes desired states, serves blocks,
    and keeps what the devices report (parsed with ota.protocol, as the controller does)."""

    __test__ = False

    def __init__(self, broker_url: str, release: FleetRelease, *, rate_bytes_per_s: float = 8 * 1024 * 1024) -> None:
        from edgeship.toolkit.blockserver import BlockServer

        self.release = release
        self.connection = MqttConnection(broker_url, client_id=f"test-director-{os.getpid()}").connect(10)
        self.blocks = BlockServer(self.connection, release.repo, fleet=FLEET, rate_bytes_per_s=rate_bytes_per_s,
                                  burst_bytes=min(rate_bytes_per_s, 4 * 1024 * 1024)).start()
        self._lock = threading.Lock()
        self.reported: dict[str, Any] = {}
        self.status: dict[str, list[str]] = defaultdict(list)
        self.events: dict[str, list[Any]] = defaultdict(list)
        self.refused: list[str] = []
        for kind in (REPORTED, STATUS, EVENTS):
            self.connection.subscribe(device_wildcard(kind, FLEET), self._on_message, qos=1)

    def _on_message(self, message: ReceivedMessage) -> None:
        parts = message.topic.split("/")
        device, kind = parts[3], "/".join(parts[4:])
        try:
            parsed = parse_message(kind, message.payload)
        except EdgeshipError as exc:  # a device must never publish what the controller refuses
            with self._lock:
                self.refused.append(f"{message.topic}: {exc}")
            return
        with self._lock:
            if kind == REPORTED:
                self.reported[device] = parsed
            elif kind == STATUS:
                self.status[device].append(parsed.state)  # type: ignore[union-attr]
            else:
                self.events[device].append(parsed)

    def assign(self, device: str, version: str, **kwargs: Any) -> dict[str, Any]:
        """Sign the desired state and publish it retained (what the controller does)."""
        envelope = self.release.sign(device, version, **kwargs)
        self.publish_desired(device, encode_message(DesiredMessage(envelope)))
        return envelope

    def publish_desired(self, device: str, payload: bytes) -> None:
        self.connection.publish(device_topic(FLEET, device, DESIRED), payload, qos=1, retain=True)

    def update_of(self, device: str) -> dict[str, Any]:
        with self._lock:
            reported = self.reported.get(device)
        return dict(reported.update or {}) if reported is not None else {}

    def active_of(self, device: str) -> dict[str, str] | None:
        with self._lock:
            reported = self.reported.get(device)
        return reported.active if reported is not None else None

    def wait_update(self, device: str, version: str, states: tuple[str, ...], timeout: float = 90.0) -> dict[str, Any]:
        """Wait until the device reports an update of ``version`` in one of ``states``."""
        def reached() -> dict[str, Any] | None:
            update = self.update_of(device)
            bundle = update.get("bundle") or {}
            return update if bundle.get("version") == version and update.get("state") in states else None
        return dict(wait_for(reached, timeout, f"{device} to report {version} in {states}"))

    def served(self, stream: str) -> list[Any]:
        return [entry for entry in list(self.blocks.log) if entry.stream == stream]

    def close(self) -> None:
        self.blocks.stop()
        self.connection.close()


class FleetAgent(AgentProcess):
    """``edgeship-agent run`` with a broker in its config, in its own data folder."""

    def __init__(self, folder: Path, release: FleetRelease, broker_url: str, device: str, *,
                 block_size: int = 64 * 1024, block_window: int = 64, loosen_latency_gates: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = render_config(data=str(folder / "data"), device_id=device, fleet=FLEET, root=str(release.root_json),
                             director_key=str(release.director_pub), bind="127.0.0.1:0", broker=broker_url)
        text = text.replace("window_s = 60.0", "window_s = 0.5")
        text = text.replace("interval_s = 60.0", "interval_s = 1.0")
        if loosen_latency_gates:  # leave latency and errors to the fleet's telemetry gates (their tests)
            text = text.replace("max_latency_ratio = 2.0", "max_latency_ratio = 1000.0")
            text = text.replace("max_error_rate = 0.05", "max_error_rate = 1.0")
        text = text.replace("[broker]\n", f"[broker]\nblock_size = {block_size}\nblock_window = {block_window}\n"
                                          "reconnect_max_s = 2.0\nkeepalive_s = 5\n")
        config = folder / "agent.toml"
        config.write_text(text)
        self.device = device
        self.folder = folder
        super().__init__(config, env=agent_env())

    def predict(self, instances: Any) -> tuple[int, Any]:
        client = self.client()
        try:
            return client.predict("digits", instances)
        finally:
            client.close()
