"""The agent's fleet link can fetch bundles over HTTP instead of MQTT blocks (both are fetchers
behind the same verification): ``[broker] repository_url``."""

from __future__ import annotations

import datetime as dt
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from ota_repo_simulator import make_bundle

from edgeship.agent.config import parse_config
from edgeship.agent.fleet_link import FleetLink, FleetLinkSettings, load_link_settings
from edgeship.agent.sources import DirectorSource, HttpFetchPlan
from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.block_transfer import MqttBlockDownloader
from edgeship.ota.errors import BadInputError
from edgeship.ota.http_fetcher import HttpFetcher
from edgeship.ota.release import ReleaseRepository

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


def _config(tmp_path: Path) -> object:
    return parse_config({
        "device": {"id": "dev-1", "fleet": "plant"}, "paths": {"data": str(tmp_path / "data")},
        "trust": {"root": "root.json", "director_key": "director.pub"}, "broker": {"url": "mqtt://127.0.0.1:1"},
    }, source=tmp_path / "agent.toml")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_default_is_mqtt_blocks(tmp_path: Path) -> None:
    link = FleetLink(_config(tmp_path), load_link_settings(_config(tmp_path), {}))  # type: ignore[arg-type]
    # the agent's own downloader, not the TUF client's fetcher: TUF stays out of the agent
    assert isinstance(link.fetcher, MqttBlockDownloader) and not hasattr(link.fetcher, "download_bytes")


@pytest.mark.parametrize("table,needle", [
    ({"repository_url": "ftp://h/repo"}, "repository_url"),
    ({"repository_url": "http://h/?x=1"}, "repository_url"),
    ({"repository_url": 5}, "repository_url"),
    ({"repository_ca_file": "ca.pem"}, "repository_ca_file"),
    ({"keepalive": 5}, r"\[broker\] keepalive is not a known key \(known: url, prefix"),  # a typo: no silent default
])
def test_bad_repository_settings_are_refused(tmp_path: Path, table: dict, needle: str) -> None:
    with pytest.raises(BadInputError, match=needle):
        load_link_settings(_config(tmp_path), table)  # type: ignore[arg-type]


def test_repository_url_makes_the_link_fetch_over_http_through_tuf(tmp_path: Path) -> None:
    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="pass phrase", now=NOW)
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0", size=200_000), now=NOW)
    handler = lambda *a, **k: _Quiet(*a, directory=str(repo.path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = _config(tmp_path)
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        settings = load_link_settings(config, {"repository_url": url})  # type: ignore[arg-type]
        assert settings == FleetLinkSettings(url="mqtt://127.0.0.1:1", repository_url=url)
        link = FleetLink(config, settings)  # type: ignore[arg-type]
        assert isinstance(link.fetcher, HttpFetchPlan)  # the update's child builds the fetcher
        fetcher = DirectorSource({}, link.fetcher)._tuf_fetcher()
        assert isinstance(fetcher, HttpFetcher)
        envelope = repo.sign_desired(fleet="plant", device="dev-1", name="digits", version="1.0.0", now=NOW)
        desired = d.verify_desired_state(envelope, d.load_director_public_key(repo.director_public_key_path),
                                         device="dev-1", fleet="plant", last_sequence=None, now=NOW)
        trust = tmp_path / "trust"
        trust.mkdir()
        shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
        result = u.fetch_verified_bundle(trust_dir=trust, desired=desired, fetcher=fetcher,
                                         work_dir=tmp_path / "work", now=NOW)
        assert result.manifest.version == "1.0.0" and fetcher.requests > 0
    finally:
        server.shutdown()
        server.server_close()


def test_over_http_a_device_with_a_base_fetches_the_delta_and_one_without_the_compressed_bundle(
        tmp_path: Path) -> None:
    """The delta path is transport-blind: the same plan over the HTTP fetcher (a real HTTP server on
    loopback serving the release repository), with the bytes on the wire counted by the fetcher."""
    import os

    from ota_repo_simulator import SIGNATURE

    from edgeship.ota.bundle_build import build_bundle
    from edgeship.toolkit.deltas import build_companions

    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="pass phrase", now=NOW)
    weights = bytearray(b"\x1c\x00\x00\x00TFL3" + os.urandom(300_000))  # incompressible, like trained weights
    for version in ("1.0.0", "1.1.0"):
        if version == "1.1.0":
            weights[-4096:] = os.urandom(4096)  # a retrained head: the last tensor moves
        model = tmp_path / f"model-{version}.tflite"
        model.write_bytes(bytes(weights))
        out = tmp_path / f"{version}.bundle"
        build_bundle(model, name="digits", version=version, out=out, report={"signature": SIGNATURE})
        info = repo.publish(out, now=NOW)
        scratch = tmp_path / f"companions-{version}"
        scratch.mkdir()
        built = build_companions(repo.targets(), info, scratch, bases=2)
        repo.add_companions(info.name, info.version, built.files, now=NOW)
    delta = next(c for c in repo.companions("digits", "1.1.0") if c.kind == "delta")
    full = repo.target_info("digits", "1.1.0")
    handler = lambda *a, **k: _Quiet(*a, directory=str(repo.path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = d.load_director_public_key(repo.director_public_key_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        results = []
        base = None
        for step, version in enumerate(("1.0.0", "1.1.0")):
            trust = tmp_path / f"trust-{step}"
            trust.mkdir()
            shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
            desired = d.verify_desired_state(
                repo.sign_desired(fleet="plant", device="dev-1", name="digits", version=version, now=NOW), key,
                device="dev-1", fleet="plant", last_sequence=None, now=NOW)
            result = u.fetch_verified_bundle(trust_dir=trust, desired=desired, fetcher=HttpFetcher(url),
                                             work_dir=tmp_path / f"work-{step}", now=NOW,
                                             base_bundle=base, base_version="1.0.0" if base else None)
            results.append(result)
            base = result.bundle_file
    finally:
        server.shutdown()
        server.server_close()
    first, second = results
    assert first.transfer is not None and first.transfer["kind"] == "compressed"
    assert second.transfer == {"kind": "delta", "bytes": delta.length, "full_bytes": full.length,
                               "base_version": "1.0.0"}
    assert delta.length < full.length // 10
    assert second.sha256 == full.sha256 and Path(second.bundle_file).read_bytes() == full.file.read_bytes()
