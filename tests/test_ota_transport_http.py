"""The HTTP fetcher against a real HTTP server (a threading http.server with Range,
ETag and injected connection drops): whole files, 404s for the TUF client,
resume within a fetch and across fetches, servers that ignore ranges."""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exceptions

from edgeship.ota.errors import BadInputError
from edgeship.ota.http_fetcher import HttpFetcher


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    ranges = True
    drop_after: list[int]  # per request, in order: cut the body after this many bytes (-1: don't)
    seen_ranges: list[str | None]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = (self.server.root / urllib.parse.unquote(self.path).lstrip("/")).resolve()
        if self.server.root.resolve() not in path.parents or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        wanted = self.headers.get("Range")
        self.server.seen_ranges.append(wanted)
        start = 0
        if wanted and self.server.ranges and self.headers.get("If-Range") == etag:
            start = int(wanted.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        cut = self.server.drop_after.pop(0) if self.server.drop_after else -1
        if cut >= 0:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_repo(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "sub").mkdir(parents=True)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.root = root
    server.drop_after = []
    server.seen_ranges = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _base(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def _put(server: _Server, name: str, size: int) -> bytes:
    data = (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]
    (server.root / name).write_bytes(data)
    return data


def test_files_arrive_whole_and_missing_ones_are_404(http_repo: _Server, tmp_path: Path) -> None:
    data = _put(http_repo, "targets/sub/model v1.tar", 300_000)
    (http_repo.root / "metadata" / "timestamp.json").write_text('{"signed": {}}')
    fetcher = HttpFetcher(_base(http_repo), work_dir=tmp_path / "w")
    assert fetcher.download_bytes("edgeship://targets/sub/model%20v1.tar", 1_000_000) == data
    assert fetcher.download_bytes("edgeship://metadata/timestamp.json", 100) == b'{"signed": {}}'
    with pytest.raises(tuf_exceptions.DownloadHTTPError) as info:
        fetcher.download_bytes("edgeship://metadata/2.root.json", 100)
    assert info.value.status_code == 404
    with pytest.raises(tuf_exceptions.DownloadError):
        fetcher.download_bytes("edgeship://targets/../../etc/passwd", 100)
    assert not list((tmp_path / "w" / "http-partial").glob("*"))


def test_a_dropped_connection_resumes_with_a_range_request(http_repo: _Server, tmp_path: Path) -> None:
    data = _put(http_repo, "targets/b.tar", 1_000_000)
    http_repo.drop_after = [300_000, 200_000]  # two drops, then a clean answer
    fetcher = HttpFetcher(_base(http_repo), work_dir=tmp_path / "w", retries=3, chunk_size=16384)
    assert b"".join(fetcher.fetch("edgeship://targets/b.tar")) == data
    assert fetcher.requests == 3
    assert fetcher.resumed_from[0] == 300_000 and fetcher.resumed_from[1] == 500_000
    assert http_repo.seen_ranges == [None, "bytes=300000-", "bytes=500000-"]


def test_a_failed_fetch_resumes_on_the_next_one(http_repo: _Server, tmp_path: Path) -> None:
    data = _put(http_repo, "targets/c.tar", 600_000)
    http_repo.drop_after = [250_000]
    first = HttpFetcher(_base(http_repo), work_dir=tmp_path / "w", retries=0)
    with pytest.raises(tuf_exceptions.DownloadError, match="connection lost after 250000 bytes"):
        b"".join(first.fetch("edgeship://targets/c.tar"))
    # a new fetcher (as after a restart) continues from the durable partial file
    second = HttpFetcher(_base(http_repo), work_dir=tmp_path / "w")
    assert b"".join(second.fetch("edgeship://targets/c.tar")) == data
    assert second.resumed_from == [250_000] and http_repo.seen_ranges[-1] == "bytes=250000-"


def test_a_server_without_ranges_or_a_changed_file_starts_over(http_repo: _Server, tmp_path: Path) -> None:
    _put(http_repo, "targets/d.tar", 400_000)
    http_repo.drop_after = [100_000]
    fetcher = HttpFetcher(_base(http_repo), work_dir=tmp_path / "w", retries=0)
    with pytest.raises(tuf_exceptions.DownloadError):
        b"".join(fetcher.fetch("edgeship://targets/d.tar"))
    changed = _put(http_repo, "targets/d.tar", 450_000)[::-1]
    (http_repo.root / "targets" / "d.tar").write_bytes(changed)  # new ETag: If-Range fails, 200 comes back
    assert b"".join(fetcher.fetch("edgeship://targets/d.tar")) == changed
    http_repo.ranges = False
    http_repo.drop_after = [100_000]
    with pytest.raises(tuf_exceptions.DownloadError):
        b"".join(fetcher.fetch("edgeship://targets/d.tar"))
    assert b"".join(fetcher.fetch("edgeship://targets/d.tar")) == changed
    assert fetcher.resumed_from == []


def test_no_server_is_a_download_error(tmp_path: Path) -> None:
    from mqtt_broker import free_port

    fetcher = HttpFetcher(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(tuf_exceptions.DownloadError):
        fetcher.download_bytes("edgeship://metadata/root.json", 10)


@pytest.mark.parametrize("base", ["ftp://h/", "h:80", "http://", "http://h/?x=1"])
def test_bad_base_urls_are_refused(base: str) -> None:
    with pytest.raises(BadInputError):
        HttpFetcher(base)
