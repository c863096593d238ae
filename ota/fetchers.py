"""Transports for the device's TUF client, and offline (USB) update packages.

Every transport is a ``tuf.ngclient.FetcherInterface``: it is asked for
``edgeship://metadata/<file>`` and ``edgeship://targets/<path>`` and returns the
bytes in chunks. It is untrusted by construction: what it returns is verified by
:func:`edgeship.ota.updater.fetch_verified_bundle`.

Offline package (``edgeship bundle export``): an uncompressed tar holding
``package.json`` (what is in it), ``desired.json`` (a director envelope for device
``"*"`` of a fleet), ``metadata/*.json`` (the TUF metadata, every root version
included) and ``targets/<path>`` (the bundle). It is read with the same safe
streaming reader as bundles.
"""

from __future__ import annotations

__all__ = [
    "URL_PREFIX",
    "METADATA_URL",
    "TARGETS_URL",
    "PACKAGE_FORMAT",
    "LocalFolderFetcher",
    "OfflinePackage",
    "open_offline_package",
]

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional
from urllib import parse

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from .archive import (
    CHUNK_SIZE,
    DuplicateMemberError,
    ExtractionLimits,
    ManifestError,
    TarStreamReader,
    UnexpectedMemberError,
)
from .errors import BadInputError, EdgeshipError

URL_PREFIX = "edgeship://"
METADATA_URL = URL_PREFIX + "metadata/"
TARGETS_URL = URL_PREFIX + "targets/"
PACKAGE_FORMAT = "edgeship-offline-package"

_SAFE_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_MAX_METADATA_BYTES = 5_000_000
_MAX_SMALL_BYTES = 64 * 1024


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
        if area not in ("metadata", "targets") or not _SAFE_PATH.match(relative):
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


@dataclass(frozen=True)
class OfflinePackage:
    """An offline package unpacked (not yet verified) into ``root``."""

    fetcher: LocalFolderFetcher
    desired_envelope: Dict[str, Any]
    root: Path
    info: Dict[str, Any] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the unpacked files (after the update, whatever its outcome)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _package_member_allowed(name: str) -> bool:
    if name in ("package.json", "desired.json"):
        return True
    area, _, rest = name.partition("/")
    if area == "metadata":
        return "/" not in rest and rest.endswith(".json") and bool(_SAFE_PATH.match(rest))
    return area == "targets" and bool(_SAFE_PATH.match(rest))


def open_offline_package(
    package_path: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    limits: Optional[ExtractionLimits] = None,
) -> OfflinePackage:
    """Unpack an ``edgeship bundle export`` package safely into a new folder of ``work_dir``.

    Nothing in it is trusted yet: pass ``desired_envelope`` to
    ``verify_desired_state`` and ``fetcher`` to ``fetch_verified_bundle``.

    Raises:
        UnsafeBundleError: a hostile or corrupt package (nothing is left behind).
        BadInputError: the file is missing.
    """
    path = Path(package_path)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        stream = open(path, "rb", buffering=CHUNK_SIZE)
    except FileNotFoundError:
        raise BadInputError(f"offline package {path}: no such file") from None
    except OSError as exc:
        raise EdgeshipError(f"offline package {path} cannot be read: {exc.strerror or exc}") from None
    staging = Path(tempfile.mkdtemp(prefix="offline-", dir=work))
    try:
        with stream:
            limits = limits or ExtractionLimits()
            reader = TarStreamReader(stream, ExtractionLimits(
                max_member_bytes=limits.max_member_bytes,
                max_total_bytes=limits.max_total_bytes,
                max_manifest_bytes=limits.max_manifest_bytes,
                max_members=max(limits.max_members, 300),  # every root version travels with the package
                max_name_bytes=255,
            ), nested=True, what="offline package")
            seen = set()
            while (member := reader.next_member()) is not None:
                if member.name in seen:
                    raise DuplicateMemberError(f"member {member.name!r} appears twice in the offline package")
                seen.add(member.name)
                if not _package_member_allowed(member.name):
                    raise UnexpectedMemberError(
                        f"member {member.name!r} does not belong in an offline package "
                        "(package.json, desired.json, metadata/*.json, targets/...)"
                    )
                cap = member.size
                if member.name.startswith("metadata/"):
                    cap = _MAX_METADATA_BYTES
                elif not member.name.startswith("targets/"):
                    cap = _MAX_SMALL_BYTES
                if member.size > cap:
                    raise ManifestError(f"member {member.name!r} is {member.size} bytes, more than {cap} allowed")
                destination = staging / member.name
                destination.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                with os.fdopen(os.open(destination, flags, 0o644), "wb") as out:
                    for chunk in reader.read_content(member, cap=cap):
                        out.write(chunk)
            reader.finish()
        for required in ("package.json", "desired.json", "metadata/timestamp.json"):
            if required not in seen:
                raise ManifestError(f"the offline package has no {required}")
        try:
            info = json.loads((staging / "package.json").read_text(encoding="utf-8"))
            envelope = json.loads((staging / "desired.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"the offline package's package.json or desired.json is not JSON: {exc}") from None
        if not isinstance(info, dict) or info.get("format") != PACKAGE_FORMAT:
            raise ManifestError(f"{path} is not an edgeship offline package (package.json format is not "
                                f"{PACKAGE_FORMAT!r})")
        if not isinstance(envelope, dict):
            raise ManifestError("the offline package's desired.json is not a JSON object")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return OfflinePackage(fetcher=LocalFolderFetcher(staging), desired_envelope=envelope, root=staging, info=info)
