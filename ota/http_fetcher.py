"""HTTP(S) transport for the device's TUF client, for devices that can reach an HTTP server.

:class:`HttpFetcher` maps ``edgeship://metadata/<file>`` to ``<base>/metadata/<file>``
and ``edgeship://targets/<path>`` to ``<base>/targets/<path>`` (the release
repository folder served as it is, by any static file server). It uses only the
standard library (urllib), so a device needs nothing more.

Resume: with a ``work_dir``, the bytes received are kept in a partial file with
a sidecar naming the URL, the server's validator (ETag or Last-Modified) and
how many bytes are durable. A dropped connection is resumed within the same
fetch (``Range: bytes=N-`` with ``If-Range``, up to ``retries`` times); a fetch
that failed, or a process that was killed, resumes on the next fetch. A server
that ignores ranges, or whose file changed, answers 200 and the download
starts over. Like every transport it is untrusted: TUF verifies what it yields.
"""

from __future__ import annotations

__all__ = ["HttpFetcher"]

import hashlib
import json
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from .atomicfile import atomic_write_json
from .blocks import stream_for_url
from .repository_urls import check_http_base_url

log = logging.getLogger(__name__)

_SYNC_EVERY_BYTES = 4 * 1024 * 1024


def _end_of(response: Any, offset: int) -> int | None:
    """The byte offset the body should end at (offset + Content-Length), when the server said."""
    length = response.headers.get("Content-Length")
    try:
        return offset + int(length) if length is not None else None
    except ValueError:
        return None


def _expected_end(response: Any, count: int) -> int:
    end = getattr(response, "edgeship_end", None)
    return count if end is None else end


class HttpFetcher(FetcherInterface):
    """Fetch ``edgeship://`` URLs from an HTTP(S) server, resuming with Range requests.

    Args:
        base_url: ``http://host:port/path`` or ``https://...`` holding ``metadata/`` and ``targets/``.
        work_dir: where partial downloads live (None: no resume across fetches).
        timeout_s: socket timeout per read (seconds).
        retries: how many times one fetch resumes after a dropped connection.
        ca_file: CA bundle for https (default: the system's).
        headers: extra request headers (an Authorization token, for example).
    """

    def __init__(
        self,
        base_url: str,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        chunk_size: int = 64 * 1024,
        ca_file: str | None = None,
        headers: dict[str, str] | None = None,
        sync_every_bytes: int = _SYNC_EVERY_BYTES,  # how often the partial file is made durable
    ) -> None:
        parts = check_http_base_url(base_url)
        self.base_url = base_url.rstrip("/") + "/"
        self.work_dir = Path(work_dir) / "http-partial" if work_dir is not None else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.chunk_size = chunk_size
        self.headers = dict(headers or {})
        self.sync_every_bytes = sync_every_bytes
        context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        handlers = [urllib.request.HTTPSHandler(context=context)] if context is not None else []
        self._opener = urllib.request.build_opener(*handlers)
        self.requests = 0
        """HTTP requests made (for diagnostics and tests)."""
        self.resumed_from: list = []
        """Byte offsets that Range requests resumed from (for diagnostics and tests)."""

    def url_for(self, url: str) -> str:
        """The HTTP URL for an ``edgeship://`` URL (path segments percent-encoded)."""
        stream = stream_for_url(url)
        return self.base_url + urllib.parse.quote(stream, safe="/")

    # -- the partial file --
    def _paths(self, http_url: str) -> tuple | None:
        if self.work_dir is None:
            return None
        key = hashlib.sha256(http_url.encode("utf-8")).hexdigest()[:40]
        return self.work_dir / f"{key}.part", self.work_dir / f"{key}.json"

    def _load(self, http_url: str) -> dict[str, Any]:
        paths = self._paths(http_url)
        if paths is None:
            return {}
        data_path, sidecar = paths
        try:
            doc = json.loads(sidecar.read_text())
            if doc.get("url") != http_url or not doc.get("validator"):
                return {}
            durable = min(int(doc.get("bytes", 0)), data_path.stat().st_size)
            return {"validator": str(doc["validator"]), "bytes": durable}
        except (OSError, ValueError, TypeError):
            return {}

    def _save(self, http_url: str, validator: str | None, count: int) -> None:
        paths = self._paths(http_url)
        if paths is None or not validator:
            return
        atomic_write_json(paths[1], {"url": http_url, "validator": validator, "bytes": count})

    def _discard(self, http_url: str) -> None:
        paths = self._paths(http_url)
        if paths is not None:  # temp files of sidecar writes a killed process left behind
            for stale in paths[1].parent.glob(f".{paths[1].name}.*.tmp"):
                stale.unlink(missing_ok=True)
        for path in paths or ():
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # -- FetcherInterface --
    def _fetch(self, url: str) -> Iterator[bytes]:
        http_url = self.url_for(url)
        state = self._load(http_url)
        response, offset, validator = self._open(http_url, state)
        response.edgeship_end = _end_of(response, offset)
        return self._stream(http_url, response, offset, validator)

    def _open(self, http_url: str, state: dict[str, Any]) -> tuple:
        """Send the request (a Range one when resuming); return (response, start offset, validator)."""
        headers = dict(self.headers)
        offset = int(state.get("bytes", 0))
        if offset and state.get("validator"):
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = state["validator"]
        request = urllib.request.Request(http_url, headers=headers)
        self.requests += 1
        try:
            response = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our partial is as long as (or longer than) the file: start over
                self._discard(http_url)
                return self._open(http_url, {})
            raise tuf_exceptions.DownloadHTTPError(f"{http_url}: HTTP {exc.code} {exc.reason}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise tuf_exceptions.DownloadError(f"{http_url}: {reason}") from None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if response.status == 206 and offset:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                response.close()
                self._discard(http_url)
                return self._open(http_url, {})
            self.resumed_from.append(offset)
            log.info("resuming %s from byte %d", http_url, offset)
            return response, offset, validator or state.get("validator")
        if offset:
            log.info("%s changed or ignores ranges; downloading it again", http_url)
        return response, 0, validator

    def _stream(self, http_url: str, response: Any, offset: int, validator: str | None) -> Iterator[bytes]:
        paths = self._paths(http_url)
        handle = None
        if paths is not None:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            handle = open(paths[0], "r+b" if offset else "wb")
            handle.truncate(offset)
            handle.seek(offset)
        count, unsynced, failures = offset, 0, 0
        finished = False
        try:
            if offset and paths is not None:  # what we already have comes first
                with open(paths[0], "rb") as have:
                    left = offset
                    while left:
                        held = have.read(min(self.chunk_size, left))
                        if not held:
                            raise tuf_exceptions.DownloadError(f"{http_url}: partial file shrank")
                        left -= len(held)
                        yield held
            while True:
                chunk: bytes | None
                try:
                    chunk = response.read(self.chunk_size)
                except (OSError, ValueError) as exc:  # connection dropped mid-body (http.client raises these)
                    chunk = None
                    error: Exception = exc
                if chunk == b"" and count < _expected_end(response, count):
                    # http.client returns b"" on a connection closed before Content-Length: a drop, not the end
                    chunk, error = None, ConnectionError("connection closed before the end of the body")
                if chunk is None:
                    response.close()
                    failures += 1
                    if handle is not None:
                        handle.flush()
                        os.fsync(handle.fileno())
                        self._save(http_url, validator, count)
                    if handle is None or not validator or failures > self.retries:
                        raise tuf_exceptions.DownloadError(f"{http_url}: connection lost after {count} bytes "
                                                           f"({error})")
                    response, new_offset, validator = self._open(http_url, {"bytes": count, "validator": validator})
                    response.edgeship_end = _end_of(response, new_offset)
                    if new_offset != count:  # the server restarted the file: this stream cannot continue
                        response.close()
                        raise tuf_exceptions.DownloadError(f"{http_url} changed on the server during the download")
                    continue
                if not chunk:
                    break
                if handle is not None:
                    handle.write(chunk)
                    unsynced += len(chunk)
                    if unsynced >= self.sync_every_bytes:
                        handle.flush()
                        os.fsync(handle.fileno())
                        self._save(http_url, validator, count + len(chunk))
                        unsynced = 0
                count += len(chunk)
                yield chunk
            finished = True
        except GeneratorExit:  # the consumer refused the stream: nothing worth resuming
            finished = True
            raise
        finally:
            response.close()
            if handle is not None:
                handle.close()
                if finished:
                    self._discard(http_url)
