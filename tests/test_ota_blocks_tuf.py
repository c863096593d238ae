"""The transports under the real TUF client: a release repository (ota.release)
published on the host, a device verifying a bundle through
``ota.updater.fetch_verified_bundle`` with the MQTT block fetcher (through
Mosquitto, the host's BlockServer serving the repository) or the HTTP fetcher.
Tampering on the host side is caught by TUF, whatever the transport."""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("edgeship.ota.updater")

from mqtt_broker import MosquittoBroker
from ota_repo_simulator import make_bundle

from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.blocks import BlockTransferConfig, MqttBlockFetcher
from edgeship.ota.errors import SecurityError
from edgeship.ota.http_fetcher import HttpFetcher
from edgeship.ota.release import ReleaseRepository
from edgeship.ota.transport import MqttConnection, ReconnectPolicy
from edgeship.toolkit.blockserver import BlockServer

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
FAST = ReconnectPolicy(initial_s=0.1, max_s=0.5)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repository = ReleaseRepository(tmp_path / "repo")
    repository.init(root_passphrase="pass phrase", now=NOW)
    repository.publish(make_bundle(tmp_path / "b", "digits", "1.0.0", size=300_000), now=NOW)
    return repository


def _desired(repo: ReleaseRepository, device: str) -> d.DesiredState:
    envelope = repo.sign_desired(fleet="plant", device=device, name="digits", version="1.0.0", now=NOW)
    return d.verify_desired_state(envelope, d.load_director_public_key(repo.director_public_key_path),
                                  device=device, fleet="plant", last_sequence=None, now=NOW)


def _trust(repo: ReleaseRepository, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(repo.metadata_dir / "1.root.json", folder / "root.json")
    return folder


@pytest.fixture
def mqtt_pair(mosquitto_broker: MosquittoBroker, repo: ReleaseRepository) -> Iterator[tuple[MqttConnection, BlockServer]]:
    controller = MqttConnection(mosquitto_broker.url, client_id="controller", reconnect=FAST).connect(5)
    device = MqttConnection(mosquitto_broker.url, client_id="dev-1", reconnect=FAST).connect(5)
    server = BlockServer(controller, repo.path).start()
    yield device, server
    server.stop()
    device.close()
    controller.close()


def test_bundle_verified_through_mqtt_blocks(repo: ReleaseRepository, mqtt_pair: tuple[MqttConnection, BlockServer],
                                             tmp_path: Path) -> None:
    device, server = mqtt_pair
    fetcher = MqttBlockFetcher(device, fleet="plant", device="dev-1", work_dir=tmp_path / "blocks",
                               config=BlockTransferConfig(block_size=16384))
    result = u.fetch_verified_bundle(trust_dir=_trust(repo, tmp_path / "trust"), desired=_desired(repo, "dev-1"),
                                     fetcher=fetcher, work_dir=tmp_path / "work", now=NOW)
    assert result.manifest.name == "digits" and result.manifest.version == "1.0.0"
    assert result.model_path.exists()
    streams = {entry.stream for entry in server.log}
    assert "metadata/2.root.json" in streams  # the TUF client asked for a newer root: a 404 told it none exists
    assert any(s.startswith("targets/") for s in streams)
    assert [e.outcome for e in server.log if e.stream == "metadata/2.root.json"] == ["not-found"]


def test_tampered_bundle_on_the_host_is_refused_through_mqtt(repo: ReleaseRepository,
                                                              mqtt_pair: tuple[MqttConnection, BlockServer],
                                                              tmp_path: Path) -> None:
    device, _ = mqtt_pair
    [target] = [p for p in (repo.path / "targets").rglob("*") if p.is_file()]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    fetcher = MqttBlockFetcher(device, fleet="plant", device="dev-1", work_dir=tmp_path / "blocks")
    with pytest.raises(SecurityError):
        u.fetch_verified_bundle(trust_dir=_trust(repo, tmp_path / "trust"), desired=_desired(repo, "dev-1"),
                                fetcher=fetcher, work_dir=tmp_path / "work", now=NOW)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_bundle_verified_over_http(repo: ReleaseRepository, tmp_path: Path) -> None:
    handler = functools.partial(_Quiet, directory=str(repo.path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fetcher = HttpFetcher(f"http://127.0.0.1:{server.server_address[1]}/", work_dir=tmp_path / "http")
        result = u.fetch_verified_bundle(trust_dir=_trust(repo, tmp_path / "trust"), desired=_desired(repo, "dev-1"),
                                         fetcher=fetcher, work_dir=tmp_path / "work", now=NOW)
        assert result.manifest.version == "1.0.0"
    finally:
        server.shutdown()
        server.server_close()
