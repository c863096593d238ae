"""Transports for the device's TUF client, and offline (USB) update packages.

Every transport is a ``tuf.ngclient.FetcherInterface``: it is asked for
``edgeship://metadata/<file>`` and ``edgeship://targets/<path>`` and returns the
bytes in chunks. It is untrusted by construction: what it returns is verified by
:func:`edgeship.ota.updater.fetch_verified_bundle`.

Offline (USB) packages, which are served through ``LocalFolderFetcher`` once
unpacked, live in :mod:`edgeship.ota.offline`.
"""

from __future__ import annotations

__all__ = [
    "METADATA_URL",
    "TARGETS_URL",
    "URL_PREFIX",
    "LocalFolderFetcher",
]

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from .archive import (
    CHUNK_SIZE,
)

URL_PREFIX = "edgeship://"
METADATA_URL = URL_PREFIX + "metadata/"
TARGETS_URL = URL_PREFIX + "targets/"

_SAFE_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class LocalFolderFetcher(FetcherInterface):
    """Serve ``metadata/`` and ``targets/`` from a folder: the release repository
    itself, or an unpacked offline package.

    A missing file answers HTTP 404 (``DownloadHTTPError``), which is how the TUF
    client learns that no newer root exists.
    """

    def __init__(self, folder: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> None:
        self.folder = Path(folder)
        self.chunk_size = chunk_size

    def _path_for(self, url: str) -> Path:
        if not url.startswith(URL_PREFIX):
            raise tuf_exceptions.DownloadHTTPError(f"unsupported URL {url!r}", 400)
        rest = parse.unquote(url[len(URL_PREFIX):])
        area, _, relative = rest.partition("/")
        if area not in ("metadata", "targets") or not _SAFE_PATH.fullmatch(relative):
            raise tuf_exceptions.DownloadHTTPError(f"refused URL {url!r}", 400)
        return self.folder / area / relative

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self._path_for(url)
        try:
            handle = open(path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise tuf_exceptions.DownloadHTTPError(f"{url} not found", 404) from None
        return self._chunks(handle)

    def _chunks(self, handle: Any) -> Iterator[bytes]:
        with handle:
            while True:
                chunk = handle.read(self.chunk_size)
                if not chunk:
                    return
                yield chunk
