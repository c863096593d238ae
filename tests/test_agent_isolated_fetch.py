"""A fleet update's verification in a child process that downloads through the agent.

``IsolatedSource(DirectorSource(...))`` runs admit (the director's signature) and fetch
(TUF refresh, bounded download, hashes, extraction) in ``edgeship.agent.isolated``;
the child's TUF client asks this process for every byte (the proxy fetcher), and
this process answers from its own downloader: here a folder-backed one with the
``MqttBlockDownloader`` interface (``chunks(url)``, ``BlockTransferFailed`` with a
status), so the real TUF client in the child meets real repository files, and the
test controls what "the network" returns. The MQTT downloader itself goes the
same way in tests/test_fleet_e2e.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ota_repo_simulator import make_bundle

from edgeship.agent.config import parse_config
from edgeship.agent.isolated import IsolatedSource
from edgeship.agent.sources import Admission, DirectorSource, SourceContext, StagedBundle
from edgeship.ota.block_transfer import BlockTransferFailed
from edgeship.ota.errors import EdgeshipError, SecurityError
from edgeship.ota.release import ReleaseRepository

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


class FolderDownloader:
    """The MqttBlockDownloader interface over a repository folder, with faults."""

    def __init__(self, root: Path, chunk: int = 4096) -> None:
        self.root = root
        self.chunk = chunk
        self.extra = b""  # appended to every target: a stream longer than its signed length
        self.missing_targets = False
        self.opened: list[str] = []
        self.closed_early = 0

    def chunks(self, url: str) -> Iterator[bytes]:
        area, _, rest = url.removeprefix("edgeship://").partition("/")
        path = self.root / area / rest
        if not path.is_file() or (area == "targets" and self.missing_targets):
            raise BlockTransferFailed(f"{area}/{rest} not found on the block server", 404)
        self.opened.append(f"{area}/{rest}")
        return self._read(path, self.extra if area == "targets" else b"")

    def _read(self, path: Path, extra: bytes) -> Iterator[bytes]:
        finished = False
        try:
            data = path.read_bytes() + extra
            for start in range(0, len(data), self.chunk):
                yield data[start : start + self.chunk]
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


@pytest.fixture
def release(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="isolated fetch passphrase", now=NOW)
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0", size=150_000), now=NOW)
    return repo


def _context(tmp_path: Path, repo: ReleaseRepository) -> SourceContext:
    config = parse_config(
        {
            "device": {"id": "dev-1", "fleet": "plant"},
            "paths": {"data": str(tmp_path / "data")},
            "trust": {"root": str(repo.metadata_dir / "1.root.json"),
                      "director_key": str(repo.director_public_key_path)},
        },
        source=tmp_path / "agent.toml",
    )
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    return SourceContext(config=config, last_sequence=0, now=NOW, work_dir=work, trust_dir=tmp_path / "trust")


def _source(repo: ReleaseRepository, downloader: Any, isolate: bool,
            envelope: dict[str, Any] | None = None) -> Any:
    if envelope is None:
        envelope = repo.sign_desired(fleet="plant", device="dev-1", name="digits", version="1.0.0", now=NOW)
    source = DirectorSource(envelope, downloader, {"kind": "mqtt", "envelope": envelope})
    return IsolatedSource(source) if isolate else source


def test_the_child_verifies_what_this_process_downloads(tmp_path: Path, release: ReleaseRepository) -> None:
    downloader = FolderDownloader(release.path)
    source = _source(release, downloader, isolate=True)
    ctx = _context(tmp_path, release)
    admission = source.admit(ctx)
    assert isinstance(admission, Admission)
    assert (admission.name, admission.version) == ("digits", "1.0.0")
    assert not downloader.opened  # admit checks the director's signature only
    staged = source.fetch(ctx)
    assert isinstance(staged, StagedBundle) and staged.manifest["version"] == "1.0.0"
    assert (Path(staged.root) / "manifest.json").is_file() and (Path(staged.root) / "model.tflite").is_file()
    # every byte came through this process: metadata and the bundle
    assert any(p.startswith("metadata/") for p in downloader.opened)
    assert any(p.startswith("targets/") for p in downloader.opened)
    # the same answer as the verification in this process
    again = _source(release, FolderDownloader(release.path), isolate=False, envelope=source.inner.envelope)
    ctx2 = _context(tmp_path / "in-process", release)
    assert again.admit(ctx2) == admission
    assert again.fetch(ctx2).manifest == staged.manifest


def test_a_stream_longer_than_signed_is_rejected_and_the_transfer_closed(
    tmp_path: Path, release: ReleaseRepository
) -> None:
    downloader = FolderDownloader(release.path)
    downloader.extra = b"\0" * 100_000
    source = _source(release, downloader, isolate=True)
    ctx = _context(tmp_path, release)
    source.admit(ctx)
    with pytest.raises(SecurityError, match="(?i)length|long"):
        source.fetch(ctx)
    assert downloader.closed_early >= 1  # the child stopped reading: this process dropped the transfer


def test_a_missing_target_fails_with_its_reason(tmp_path: Path, release: ReleaseRepository) -> None:
    downloader = FolderDownloader(release.path)
    downloader.missing_targets = True
    source = _source(release, downloader, isolate=True)
    ctx = _context(tmp_path, release)
    source.admit(ctx)
    with pytest.raises(EdgeshipError, match="not found") as info:
        source.fetch(ctx)
    assert "\n" not in info.value.message


def test_a_forged_desired_state_is_refused_in_the_child(tmp_path: Path, release: ReleaseRepository) -> None:
    envelope = release.sign_desired(fleet="plant", device="dev-1", name="digits", version="1.0.0", now=NOW)
    envelope["signed"]["version"] = "9.9.9"  # the signature no longer matches
    source = _source(release, FolderDownloader(release.path), isolate=True, envelope=envelope)
    with pytest.raises(SecurityError, match="(?i)signature"):
        source.admit(_context(tmp_path, release))


def test_an_https_repository_is_fetched_by_the_child_itself(tmp_path: Path, release: ReleaseRepository) -> None:
    """A fleet link with ``repository_url``: the child builds the HTTP fetcher from
    the plan and downloads by itself; nothing goes through this process."""
    import http.server
    import threading

    from edgeship.agent.sources import HttpFetchPlan

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: Quiet(*a, directory=str(release.path), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plan = HttpFetchPlan(f"http://127.0.0.1:{server.server_address[1]}/", str(tmp_path / "http"))
        source = _source(release, plan, isolate=True)
        ctx = _context(tmp_path, release)
        assert source.admit(ctx).version == "1.0.0"
        assert source.fetch(ctx).manifest["version"] == "1.0.0"
    finally:
        server.shutdown()
        server.server_close()
