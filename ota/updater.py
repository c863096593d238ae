"""The device side of verification: TUF refresh, director check, bounded download, safe extraction.

:func:`fetch_verified_bundle` is the one entry point. Its steps, each with its own
exception (docs/trust.md has the table):

1. The clock is fixed at ``now`` for the whole update. python-tuf's
   ``TrustedMetadataSet`` reads the wall clock once, when the ``Updater`` is built,
   into ``reference_time``; we overwrite that attribute with ``now`` right after
   construction (before any metadata but the trusted root is loaded), and after
   the refresh check every role's expiry against ``now`` ourselves as well, so the
   result does not depend on that private attribute staying put.
2. ``Updater.refresh()`` through the given fetcher: root rotations followed,
   signatures, versions (rollback), expiries (freeze) checked by python-tuf.
3. The director's document and the release repository must name the same target
   with the same length and hashes (Uptane's two-repository check).
4. The bundle file is delivered (``edgeship.ota.delivery``: a delta from the bundle the
   device runs, the compressed bundle, or the plain one; every download cut as soon as
   it passes its signed length and checked against its signed hashes), and the file it
   leaves must be the bundle the targets role signed, bit for bit. It then streams into
   the safe extractor: the archive rules judge each header before its bytes are
   written, and the length and every signed hash are checked again *before* the
   extraction folder is renamed into place. A bundle altered in transit is reported as
   TargetHashError, a signed hostile bundle as its archive error. The bundle file is
   kept in the extraction folder as the next update's delta base (docs/deltas.md).
5. The manifest must name the bundle and version the director asked for.

On any failure the extraction folder is removed; nothing is left in ``work_dir``.
"""

from __future__ import annotations

__all__ = [
    "BadMetadataError",
    "BundleIdentityError",
    "FetchError",
    "LocalFolderFetcher",
    "MetadataExpiredError",
    "MetadataRollbackError",
    "MetadataTooLargeError",
    "MixedMetadataError",
    "OfflinePackage",
    "TargetHashError",
    "TargetMismatchError",
    "TargetNotFoundError",
    "TargetTooLongError",
    "TargetTruncatedError",
    "TrustError",
    "UntrustedMetadataError",
    "VerifiedBundle",
    "fetch_verified_bundle",
    "map_tuf_error",
    "open_offline_package",
]

import contextlib
import datetime as _dt
import hashlib
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from .archive import ExtractionLimits, MemberSizeError, UnsafeBundleError
from .bundle import BundleManifest, ExtractedBundle, extract_bundle_stream
from .delivery import BASE_BUNDLE_NAME, deliver_bundle, iter_file
from .director import DesiredState, ExpiredDesiredStateError, format_utc
from .errors import EdgeshipError, SecurityError
from .fetchers import METADATA_URL, TARGETS_URL, LocalFolderFetcher
from .offline import OfflinePackage, open_offline_package

# python-tuf >= 6 requires ``bootstrap``; None: the device's trust anchor is the newest
# root it has verified (root.json in its trust folder, as provisioned or updated since).
_BOOTSTRAP = {"bootstrap": None} if "bootstrap" in inspect.signature(Updater.__init__).parameters else {}


class TrustError(SecurityError):
    """The release repository's metadata or the bundle failed verification (REJECTED)."""


class UntrustedMetadataError(TrustError):
    """Metadata is not signed by the keys the device's trusted root names (wrong root, revoked key, forgery)."""


class MetadataExpiredError(TrustError):
    """Metadata expired at the update's fixed time (a freeze attack, or a repository not refreshed)."""


class MetadataRollbackError(TrustError):
    """Metadata is older than what the device already trusts (a rollback attack)."""


class MixedMetadataError(TrustError):
    """Metadata files of different repository versions were served together."""


class BadMetadataError(TrustError):
    """Metadata is malformed or inconsistent in another way."""


class MetadataTooLargeError(TrustError):
    """A metadata file is longer than the client's cap (an endless or bloated response)."""


class TargetNotFoundError(TrustError):
    """The release repository does not list the target the director names."""


class TargetMismatchError(TrustError):
    """The director and the release repository disagree about the target (hashes, length, name)."""


class TargetTooLongError(TrustError):
    """The bundle stream went past its signed length; it was cut there."""


class TargetTruncatedError(TrustError):
    """The bundle stream ended before its signed length."""


class TargetHashError(TrustError):
    """The downloaded bundle's hash differs from the signed one."""


class BundleIdentityError(TrustError):
    """The bundle's manifest names another bundle or version than the director ordered."""


class FetchError(EdgeshipError):
    """The transport failed (not a verification failure: the agent reports FAILED and may retry)."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, extracted under ``root``."""

    manifest: BundleManifest
    root: Path
    model_path: Path
    golden_path: Path | None
    labels_path: Path | None
    target: str
    length: int
    sha256: str
    bundle_file: Path | None = None
    """The verified bundle file, kept beside the extracted files (the next update's delta base)."""
    transfer: dict[str, Any] | None = None
    """What travelled (``delivery.TransferRecord.to_dict()``: kind, bytes, full_bytes, ...)."""


_ROLLBACK_MESSAGE = re.compile(r"must be >=|^Expected \S+\.json version")


def map_tuf_error(exc: BaseException, what: str = "release metadata") -> EdgeshipError:
    """Translate a python-tuf exception into edgeship's own, with a one-line message."""
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, tuf_exceptions.UnsignedMetadataError):
        return UntrustedMetadataError(
            f"{what} refused: {text} (not signed by keys the device's trusted root names: wrong root, revoked "
            "key or forgery)"
        )
    if isinstance(exc, tuf_exceptions.ExpiredMetadataError):
        return MetadataExpiredError(f"{what} refused: {text} at the update's fixed time (freeze attack, or the "
                                    "repository needs `edgeship repo refresh`)")
    if isinstance(exc, tuf_exceptions.BadVersionNumberError):
        if _ROLLBACK_MESSAGE.search(text):
            return MetadataRollbackError(f"{what} refused: {text} (rollback to older metadata)")
        return MixedMetadataError(f"{what} refused: {text} (metadata of different versions served together)")
    if isinstance(exc, tuf_exceptions.RepositoryError):
        return BadMetadataError(f"{what} refused: {text}")
    if isinstance(exc, tuf_exceptions.DownloadLengthMismatchError):
        return MetadataTooLargeError(f"{what} refused: {text}")
    if isinstance(exc, tuf_exceptions.DownloadHTTPError) and exc.status_code == 404:
        return FetchError(f"{what}: the repository has no such file ({text})")
    if isinstance(exc, tuf_exceptions.DownloadError):
        cause = exc.__cause__
        detail = f"{text}: {cause}" if cause else text
        return FetchError(f"{what}: download failed: {detail}")
    return FetchError(f"{what}: {text}")


def _pin_clock(updater: Updater, now: _dt.datetime) -> None:
    trusted = getattr(updater, "_trusted_set", None)
    if trusted is None or not hasattr(trusted, "reference_time"):  # pragma: no cover - python-tuf changed
        raise RuntimeError("this python-tuf keeps no TrustedMetadataSet.reference_time; edgeship cannot fix "
                           "the update's clock (pin tuf<8)")
    trusted.reference_time = now


def _check_expiry(updater: Updater, now: _dt.datetime) -> None:
    trusted = updater._trusted_set  # the verified metadata; read-only use
    for role in ("root", "timestamp", "snapshot", "targets"):
        signed = trusted[role]
        if signed.is_expired(now):
            raise MetadataExpiredError(
                f"release metadata refused: {role}.json expired at {format_utc(signed.expires)}, before the "
                f"update's fixed time {format_utc(now)}"
            )


def _refresh(trust_dir: Path, fetcher: FetcherInterface, now: _dt.datetime) -> Updater:
    if not (trust_dir / "root.json").exists():
        raise EdgeshipError(f"trust folder {trust_dir} has no root.json: the device is not provisioned")
    try:
        updater = Updater(
            metadata_dir=str(trust_dir),
            metadata_base_url=METADATA_URL,
            target_base_url=TARGETS_URL,
            fetcher=fetcher,
            config=UpdaterConfig(prefix_targets_with_hash=False),
            **_BOOTSTRAP,
        )
        _pin_clock(updater, now)
        updater.refresh()
    except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
        raise map_tuf_error(exc) from None
    except OSError as exc:
        raise EdgeshipError(f"trust folder {trust_dir}: {exc.strerror or exc}") from None
    _check_expiry(updater, now)
    return updater


def _check_director_against_tuf(desired: DesiredState, info: TargetFile) -> None:
    length = info.length
    hashes = dict(info.hashes)
    if "sha256" not in hashes:
        raise TargetMismatchError(f"release repository lists {desired.target!r} without a sha256 hash")
    if length != desired.length:
        raise TargetMismatchError(
            f"director and release repository disagree on {desired.target!r}: length {desired.length} vs {length}"
        )
    for algorithm, value in desired.hashes.items():
        if algorithm in hashes and hashes[algorithm] != value:
            raise TargetMismatchError(
                f"director and release repository disagree on {desired.target!r}: the director names "
                f"{algorithm} {value[:16]}..., the release repository signed {hashes[algorithm][:16]}..."
            )
    custom = info.custom if isinstance(info.custom, dict) else {}
    for key, want in (("name", desired.bundle), ("version", desired.version)):
        if key in custom and custom[key] != want:
            raise TargetMismatchError(
                f"director and release repository disagree on {desired.target!r}: {key} {want!r} vs {custom[key]!r}"
            )


class _VerifyingStream:
    """A read-only stream over a fetcher's chunks that enforces the signed length and hashes.

    It is cut the moment more than ``length`` bytes arrive (TargetTooLongError); when the
    chunks end it checks the length (TargetTruncatedError) and every hash
    (TargetHashError) *before* returning end-of-file, so whoever reads to the end (the
    extractor's ``finish``) has read verified bytes or an exception.
    """

    def __init__(self, chunks: Iterator[bytes], target: str, length: int, hashes: dict[str, str]) -> None:
        self._chunks = iter(chunks)
        self._source = chunks
        self.target = target
        self.length = length
        self.hashes = hashes
        self.digests = {}
        for algorithm in hashes:
            try:
                self.digests[algorithm] = hashlib.new(algorithm)
            except ValueError:  # an algorithm this Python lacks: sha256 is required below
                continue
        if "sha256" not in self.digests:
            raise TargetMismatchError(f"target {target!r} has no sha256 hash to verify")
        self.received = 0
        self._buffer = b""
        self._pos = 0
        self._eof = False

    def _pull(self) -> bool:
        """Fetch the next chunk into the buffer; False at the (verified) end."""
        while True:
            try:
                chunk: bytes | None = next(self._chunks)
            except StopIteration:
                chunk = None
            except tuf_exceptions.DownloadError as exc:
                raise map_tuf_error(exc, f"bundle {self.target}") from None
            except Exception as exc:  # noqa: BLE001 - any transport: a failure to fetch, not a verification failure
                raise FetchError(f"bundle {self.target}: download failed: {exc}") from None
            if chunk is None:
                self._eof = True
                self._verify()
                return False
            if not chunk:
                continue
            self.received += len(chunk)
            if self.received > self.length:
                raise TargetTooLongError(
                    f"bundle {self.target} stream went past its signed length of {self.length} bytes; cut at "
                    f"{self.received}"
                )
            for digest in self.digests.values():
                digest.update(chunk)
            self._buffer, self._pos = bytes(chunk), 0
            return True

    def _verify(self) -> None:
        if self.received < self.length:
            raise TargetTruncatedError(
                f"bundle {self.target} is truncated: {self.received} of its signed {self.length} bytes arrived"
            )
        for algorithm, digest in self.digests.items():
            if digest.hexdigest() != self.hashes[algorithm]:
                raise TargetHashError(
                    f"bundle {self.target} does not match its signed {algorithm}: got {digest.hexdigest()[:16]}..., "
                    f"signed {self.hashes[algorithm][:16]}..."
                )

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buffer):
            if self._eof or not self._pull():
                return b""
        if n < 0 or (self._pos == 0 and n >= len(self._buffer)):
            data = self._buffer[self._pos:] if self._pos else self._buffer
        else:
            data = self._buffer[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (still bounded by the signed length), verifying the whole file."""
        while not self._eof:
            self._pos = len(self._buffer)
            self._pull()

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def _open_verified(fetcher: FetcherInterface, info: TargetFile) -> _VerifyingStream:
    """A target's download, cut past its signed length and checked against its signed hashes."""
    try:
        chunks = fetcher.fetch(TARGETS_URL + info.path)
    except tuf_exceptions.DownloadError as exc:
        raise map_tuf_error(exc, f"target {info.path}") from None
    return _VerifyingStream(chunks, info.path, info.length, dict(info.hashes))


def _extract_verified_file(bundle_file: Path, info: TargetFile, dest: Path, limits: ExtractionLimits) -> ExtractedBundle:
    """Extract the bundle file the delivery left, judged again as it streams: by the archive rules
    (before anything is written) and by the signed length and hashes (before the extraction folder
    is renamed into place), so a file changed on disk since it was delivered is refused too."""
    stream = _VerifyingStream(iter_file(bundle_file), info.path, info.length, dict(info.hashes))
    try:
        try:
            return extract_bundle_stream(stream, dest, limits=limits)  # type: ignore[arg-type]
        except UnsafeBundleError:
            stream.drain()  # raises if the bytes are not the signed ones
            raise
    finally:
        stream.close()


def fetch_verified_bundle(
    *,
    trust_dir: str | os.PathLike[str],
    desired: DesiredState,
    fetcher: FetcherInterface,
    work_dir: str | os.PathLike[str],
    now: _dt.datetime,
    limits: ExtractionLimits | None = None,
    base_bundle: str | os.PathLike[str] | None = None,
    base_version: str | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> VerifiedBundle:
    """Refresh TUF metadata, check it against the director, download, verify and extract.

    The bundle arrives as a delta from ``base_bundle``, compressed, or in full, whichever the
    release repository lists and works first (``edgeship.ota.delivery``); the result is the signed
    bundle either way, and ``VerifiedBundle.transfer`` says what travelled. The verified bundle file
    is kept in the extraction folder (``delivery.BASE_BUNDLE_NAME``): the next update's base.

    Args:
        trust_dir: the device's TUF metadata folder, provisioned with the trusted ``root.json``;
            python-tuf keeps the metadata it verified there (root history included).
        desired: a DesiredState already checked with ``verify_desired_state``.
        fetcher: any ``FetcherInterface``; it is asked for ``edgeship://metadata/<file>``
            and ``edgeship://targets/<path>``.
        work_dir: where the bundle is downloaded and extracted (``<name>-<version>/``);
            an earlier extraction of the same bundle there is replaced.
        now: the update's fixed time (timezone-aware).
        limits: extraction caps (defaults: :class:`ExtractionLimits`).
        base_bundle: the bundle file this device runs (its sha256 is computed, never trusted):
            a delta from it is tried first. None: no delta.
        base_version: that bundle's version (for the transfer record).
        free_bytes: free space of a folder (the delta path checks it can rebuild the bundle).

    Raises:
        SecurityError: a subclass naming what failed verification (the agent reports REJECTED).
        EdgeshipError: I/O or transport failures (FAILED; may be retried).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    limits = limits or ExtractionLimits()
    if desired.expires <= now:
        raise ExpiredDesiredStateError(
            f"desired state (sequence {desired.sequence}) expired at {format_utc(desired.expires)}, before the "
            f"update's fixed time {format_utc(now)}"
        )
    if desired.length > limits.max_total_bytes + limits.max_manifest_bytes + 64 * 1024:
        raise MemberSizeError(
            f"bundle {desired.target} is {desired.length} bytes, more than this device accepts "
            f"({limits.max_total_bytes})"
        )
    trust = Path(trust_dir)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    updater = _refresh(trust, fetcher, now)
    try:
        info = updater.get_targetinfo(desired.target)
    except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
        raise map_tuf_error(exc) from None
    if info is None:
        raise TargetNotFoundError(
            f"the release repository does not list {desired.target!r}, which the director names: not published, "
            "or the director's document is forged"
        )
    _check_director_against_tuf(desired, info)

    dest = work / f"{desired.bundle}-{desired.version}"
    bundle_file = work / f".{desired.bundle}-{desired.version}.bundle"
    try:
        if dest.exists():
            shutil.rmtree(dest)
        transfer = deliver_bundle(updater=updater, open_target=lambda target: _open_verified(fetcher, target),
                                  bundle=info, name=desired.bundle,
                                  version=desired.version, out=bundle_file,
                                  base=Path(base_bundle) if base_bundle is not None else None,
                                  base_version=base_version, free_bytes=free_bytes)
        extracted = _extract_verified_file(bundle_file, info, dest, limits)
        manifest = extracted.manifest
        if manifest.name != desired.bundle or manifest.version != desired.version:
            shutil.rmtree(dest, ignore_errors=True)
            raise BundleIdentityError(
                f"bundle {info.path} holds {manifest.name} {manifest.version}, but the director ordered "
                f"{desired.bundle} {desired.version}"
            )
        kept: Path | None = None
        if BASE_BUNDLE_NAME not in manifest.files:  # else a member has the name: no base is kept
            kept = dest / BASE_BUNDLE_NAME
            os.replace(bundle_file, kept)
    except OSError as exc:
        raise EdgeshipError(f"work folder {work}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            bundle_file.unlink()
    return VerifiedBundle(
        manifest=manifest,
        root=extracted.root,
        model_path=extracted.model_path,
        golden_path=extracted.golden_path,
        labels_path=extracted.labels_path,
        target=info.path,
        length=info.length,
        sha256=info.hashes["sha256"],
        bundle_file=kept,
        transfer=transfer.to_dict(),
    )

