"""Model bundles: one uncompressed POSIX tar file holding a model and what a device needs
to trust, test and serve it (see docs/bundle-format.md). This module reads, scans and
extracts them (what a device does); :mod:`edgeship.ota.bundle_build` writes them (the host).

One concept over 500 lines: the bundle format, written and read (safe extraction) in one place.

Layout: ``manifest.json`` first, then the model (``model.tflite`` or ``model.onnx``),
then optionally ``golden.npz``, ``labels.txt`` and ``report.json``. The manifest
lists every other member with its size and sha256; extraction refuses anything
the manifest does not list, checks sizes while the bytes stream, and writes into
a temporary folder that is renamed into place only when every check passed.
"""

from __future__ import annotations

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FILES",
    "SCHEMA_VERSION",
    "BundleManifest",
    "BundleScan",
    "ExtractedBundle",
    "ExtractionLimits",
    "UnsafeBundleError",
    "extract_bundle",
    "extract_bundle_stream",
    "read_manifest",
    "scan_bundle",
]

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .archive import (
    CHUNK_SIZE,
    DuplicateMemberError,
    ExtractionLimits,
    ManifestError,
    MemberHashError,
    MemberSizeError,
    MissingMemberError,
    TarStreamReader,
    UnexpectedMemberError,
    UnsafeBundleError,
)
from .atomicfile import fsync_dir
from .errors import BadInputError, EdgeshipError
from .manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    MODEL_FILES,
    REPORT_NAME,
    SCHEMA_VERSION,
    BundleManifest,
)

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExtractedBundle:
    """A bundle extracted and checked member by member against its manifest."""

    root: Path
    manifest: BundleManifest
    model_path: Path
    golden_path: Path | None
    labels_path: Path | None
    report_path: Path | None = None


@dataclass(frozen=True)
class BundleScan:
    """The result of reading a whole bundle without writing it anywhere."""

    manifest: BundleManifest
    length: int
    sha256: str


# -- reading ---------------------------------------------------------------------------------------

def _open_bundle(path: Path) -> BinaryIO:
    try:
        return open(path, "rb", buffering=CHUNK_SIZE)
    except FileNotFoundError:
        raise BadInputError(f"bundle {path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"bundle {path} is a folder, not a bundle file") from None
    except OSError as exc:
        raise EdgeshipError(f"bundle {path} cannot be read: {exc.strerror or exc}") from None


def _read_manifest_member(reader: TarStreamReader) -> BundleManifest:
    member = reader.next_member()
    if member is None:
        raise ManifestError("the bundle is empty: it has no manifest.json")
    if member.name != MANIFEST_NAME:
        raise ManifestError(f"the bundle's first member is {member.name!r}; it must be {MANIFEST_NAME!r}")
    data = reader.read_small(member, reader.limits.max_manifest_bytes)
    return BundleManifest.from_json_bytes(data)


def read_manifest(bundle_path: str | os.PathLike[str], *, limits: ExtractionLimits | None = None) -> BundleManifest:
    """Read only the manifest (the first member) of a bundle. Nothing is verified but its shape."""
    with _open_bundle(Path(bundle_path)) as stream:
        return _read_manifest_member(TarStreamReader(stream, limits))


class _HashingReader:
    """A read-only stream wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO, progress: ProgressCallback | None = None, total: int = 0) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.length = 0
        self._progress = progress
        self._total = total
        self._next_report = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self.digest.update(data)
            self.length += len(data)
            if self._progress is not None and self.length >= self._next_report:
                self._progress("verify", self.length, self._total)
                self._next_report = self.length + 8 * CHUNK_SIZE
        return data


def _walk_members(
    reader: TarStreamReader,
    manifest: BundleManifest,
    sink: Callable[[str], BinaryIO | None],
) -> None:
    """Check every member after the manifest against it; stream each into ``sink(name)``."""
    seen = set()
    limits = reader.limits
    total = 0
    while True:
        member = reader.next_member()
        if member is None:
            break
        if member.name in seen or member.name == MANIFEST_NAME:
            raise DuplicateMemberError(f"member {member.name!r} appears twice in the bundle")
        expected = manifest.files.get(member.name)
        if expected is None:
            raise UnexpectedMemberError(f"member {member.name!r} is not listed in the bundle's manifest")
        seen.add(member.name)
        declared = int(expected["size"])
        if member.size > declared:
            raise MemberSizeError(
                f"member {member.name!r} is {member.size} bytes in the archive, larger than the {declared} bytes "
                "its manifest declares; refused before reading it"
            )
        if member.size < declared:
            raise MemberSizeError(
                f"member {member.name!r} is {member.size} bytes in the archive, the manifest declares {declared}"
            )
        total += member.size
        if total > limits.max_total_bytes:
            raise MemberSizeError(
                f"the bundle's members add up to more than {limits.max_total_bytes} bytes, the configured cap"
            )
        digest = hashlib.sha256()
        target = sink(member.name)
        try:
            for chunk in reader.read_content(member, cap=declared):
                digest.update(chunk)
                if target is not None:
                    target.write(chunk)
        finally:
            if target is not None:
                target.close()
        if digest.hexdigest() != expected["sha256"]:
            raise MemberHashError(
                f"member {member.name!r} does not match its manifest: sha256 {digest.hexdigest()}, "
                f"expected {expected['sha256']}"
            )
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise MissingMemberError(f"the bundle lacks member(s) its manifest lists: {', '.join(missing)}")
    reader.finish()


def scan_bundle(
    bundle_path: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
    progress: ProgressCallback | None = None,
) -> BundleScan:
    """Read a whole bundle once, checking it as extraction would, writing nothing.

    Returns the manifest with the length and sha256 of the whole file (what the
    release repository signs), computed in the same pass.
    """
    path = Path(bundle_path)
    with _open_bundle(path) as raw:
        total = os.fstat(raw.fileno()).st_size
        hashing = _HashingReader(raw, progress, total)
        reader = TarStreamReader(hashing, limits)  # type: ignore[arg-type]
        manifest = _read_manifest_member(reader)
        _walk_members(reader, manifest, lambda name: None)
        if progress is not None:
            progress("verify", hashing.length, total)
        return BundleScan(manifest=manifest, length=hashing.length, sha256=hashing.digest.hexdigest())


def extract_bundle(
    bundle_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
) -> ExtractedBundle:
    """Extract a bundle into ``dest_dir`` (which must not exist, or be empty), safely.

    Every member is checked against the manifest while it streams into a
    temporary folder beside ``dest_dir``; only when all checks pass is that folder
    renamed to ``dest_dir``. On any failure nothing is left behind.

    Raises:
        UnsafeBundleError: (a subclass naming the problem) hostile or corrupt archive.
        BadInputError: ``bundle_path`` is missing or ``dest_dir`` is not empty.
    """
    with _open_bundle(Path(bundle_path)) as stream:
        return extract_bundle_stream(stream, dest_dir, limits=limits)


def extract_bundle_stream(
    stream: BinaryIO,
    dest_dir: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
) -> ExtractedBundle:
    """Like :func:`extract_bundle`, from an open binary stream."""
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInputError(f"extraction folder {dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        reader = TarStreamReader(stream, limits)
        manifest = _read_manifest_member(reader)
        (staging / MANIFEST_NAME).write_bytes(manifest.to_json_bytes())

        def sink(name: str) -> BinaryIO:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(staging / name, flags, 0o644)
            return os.fdopen(fd, "wb")

        _walk_members(reader, manifest, sink)
        for name in manifest.files:
            with open(staging / name, "rb+") as handle:
                os.fsync(handle.fileno())
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _extracted(dest, manifest)


def _extracted(root: Path, manifest: BundleManifest) -> ExtractedBundle:
    golden = root / manifest.golden["file"] if manifest.golden else None
    labels = root / LABELS_NAME if LABELS_NAME in manifest.files else None
    report = root / REPORT_NAME if REPORT_NAME in manifest.files else None
    return ExtractedBundle(
        root=root,
        manifest=manifest,
        model_path=root / manifest.model_file,
        golden_path=golden,
        labels_path=labels,
        report_path=report,
    )
