"""Offline (USB) update packages: written by ``edgeship bundle export``, opened on the device.

A package is an uncompressed tar holding ``package.json`` (what is in it),
``desired.json`` (a director envelope for device ``"*"`` of a fleet),
``metadata/*.json`` (the TUF metadata, every root version included) and
``targets/<path>`` (the bundle). Nothing in it is trusted: the device unpacks it
with the same safe streaming reader as bundles, then verifies the desired state
and the bundle exactly as an online update, serving the unpacked folder through
:class:`edgeship.ota.fetchers.LocalFolderFetcher`.
"""

from __future__ import annotations

__all__ = [
    "PACKAGE_FORMAT",
    "OfflinePackage",
    "open_offline_package",
    "write_offline_package",
]

import datetime as _dt
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archive import (
    CHUNK_SIZE,
    DuplicateMemberError,
    ExtractionLimits,
    ManifestError,
    TarStreamReader,
    UnexpectedMemberError,
    UnsafeMemberNameError,
)
from .director import format_utc
from .errors import BadInputError, EdgeshipError
from .fetchers import LocalFolderFetcher

PACKAGE_FORMAT = "edgeship-offline-package"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_MAX_METADATA_BYTES = 5_000_000
_MAX_SMALL_BYTES = 64 * 1024


def write_offline_package(
    out: Path,
    *,
    metadata: list[Path],
    target_path: str | None = None,
    target_file: Path | None = None,
    envelope: dict[str, Any],
    fleet: str,
    now: _dt.datetime,
    targets: list[tuple[str, Path]] | None = None,
) -> dict[str, Any]:
    """Write a package atomically to ``out``; return what it holds (for the CLI).

    One bundle (``target_path``/``target_file``, a schema-1 ``envelope``) or several
    (``targets``: (path, file) pairs, a schema-2 ``envelope`` naming each model)."""
    signed = envelope["signed"]
    targets = list(targets or [])
    if target_path is not None and target_file is not None:
        targets.append((target_path, target_file))
    if not targets:
        raise BadInputError("an offline package needs at least one bundle")
    models = signed.get("models") if isinstance(signed.get("models"), dict) else None
    described: dict[str, Any] = (
        {"models": {n: {"bundle": e["bundle"], "version": e["version"], "target": e["target"]} for n, e in models.items()}}
        if models is not None
        else {"bundle": signed["bundle"], "version": signed["version"], "target": targets[0][0]}
    )
    info = {"format": PACKAGE_FORMAT, "schema": 1, "fleet": fleet, **described, "created": format_utc(now),
            "sequence": signed["sequence"]}
    if not out.parent.is_dir():
        raise BadInputError(f"output folder {out.parent} does not exist")
    with tempfile.NamedTemporaryFile(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent, delete=False) as handle:
        tmp = Path(handle.name)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            _tar_bytes(tar, "package.json", json.dumps(info, indent=2, sort_keys=True).encode(), now)
            _tar_bytes(tar, "desired.json", json.dumps(envelope, indent=2, sort_keys=True).encode(), now)
            for path in metadata:
                _tar_file(tar, f"metadata/{path.name}", path, now)
            for name, file in targets:
                _tar_file(tar, f"targets/{name}", file, now)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"package": str(out), "fleet": fleet, "device": signed["device"], **described,
            "sequence": signed["sequence"], "expires": signed["expires"]}


def _tar_bytes(tar: tarfile.TarFile, name: str, payload: bytes, now: _dt.datetime) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = int(now.timestamp())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def _tar_file(tar: tarfile.TarFile, name: str, path: Path, now: _dt.datetime) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mtime = int(now.timestamp())
    info.mode = 0o644
    with open(path, "rb") as handle:
        tar.addfile(info, handle)



@dataclass(frozen=True)
class OfflinePackage:
    """An offline package unpacked (not yet verified) into ``root``."""

    fetcher: LocalFolderFetcher
    desired_envelope: dict[str, Any]
    root: Path
    info: dict[str, Any] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the unpacked files (after the update, whatever its outcome)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _package_member_allowed(name: str) -> bool:
    if name in ("package.json", "desired.json"):
        return True
    area, _, rest = name.partition("/")
    if area == "metadata":
        return "/" not in rest and rest.endswith(".json") and bool(_SAFE_PATH.fullmatch(rest))
    return area == "targets" and bool(_SAFE_PATH.fullmatch(rest))


def open_offline_package(
    package_path: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
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
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                try:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(destination, flags, 0o644)
                except (FileExistsError, NotADirectoryError, IsADirectoryError):
                    raise UnsafeMemberNameError(
                        f"member {member.name!r} clashes with another member (one name used as a file and as a "
                        "folder, or names that differ only by case)"
                    ) from None
                with os.fdopen(fd, "wb") as out:
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
    except OSError as exc:  # the device's storage (full, read-only): not a verdict on the package
        shutil.rmtree(staging, ignore_errors=True)
        raise EdgeshipError(f"offline package {path} cannot be unpacked into {work}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return OfflinePackage(fetcher=LocalFolderFetcher(staging), desired_envelope=envelope, root=staging, info=info)
