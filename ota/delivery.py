"""How a verified bundle file reaches the device: as a delta, compressed, or in full.

The release repository may list companions of a bundle (docs/deltas.md): the bundle compressed
with zstd (``NAME/NAME-VERSION.bundle.zst``) and deltas from older bundles
(``NAME/deltas/VERSION/<base sha256>.delta``), each a TUF target with its own signed length and
hash. :func:`deliver_bundle` tries, in order:

1. a delta from the bundle this device runs (``base``, its sha256 computed here, never taken from a
   record): downloaded against the delta's signed length and hash, applied to a file (streaming,
   one tensor at a time), and the result checked against the *bundle's* signed length and sha256;
2. the compressed bundle: downloaded against its signed length and hash while it is decompressed
   (streaming, never more than the bundle's signed length), the result checked the same way;
3. the plain bundle, as before companions existed.

Whatever path is taken, the file it leaves is the bundle the targets role signed, bit for bit, so
trust is unchanged. A failure of 1 or 2 (nothing listed, base gone or different, corrupt,
truncated, apply error, hash mismatch, transport error) never fails the update: the next path is
tried and the reason recorded in the :class:`TransferRecord`. Only the plain bundle's own failure
is the update's (with the same exceptions as before companions existed).

The choice of paths is pure (:func:`plan_deliveries`, :func:`companion_refusal`); the I/O is the
thin part below them.
"""

from __future__ import annotations

__all__ = [
    "BASE_BUNDLE_NAME",
    "FALLBACK_LIMIT",
    "TransferRecord",
    "companion_path",
    "companion_refusal",
    "deliver_bundle",
    "iter_file",
    "plan_deliveries",
]

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgeshipError, first_line
from .hashing import hash_file

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

OpenTarget = Callable[["TargetFile"], Any]
"""target -> a stream over its download (``read``, ``received``, ``close``) that raises when the
bytes pass the target's signed length or end without its signed hashes (the updater's)."""

BASE_BUNDLE_NAME = ".edgeship-bundle"
"""The verified bundle file, kept inside its extraction folder (and so in its slot): the base the
next update's delta is applied to. A bundle whose manifest lists a member of this name is not kept."""

FALLBACK_LIMIT = 200
"""Characters of the one-line reason a delta or compressed try was abandoned."""

DISK_MARGIN = 1 << 20


@dataclass
class TransferRecord:
    """What travelled for one update (the reported ``transfer`` object, docs/protocol.md)."""

    kind: str            # delta | compressed | full
    bytes: int           # bytes the transport delivered for this update, every try counted
    full_bytes: int      # the bundle's signed length
    base_version: str | None = None   # delta only
    fallback: str | None = None       # why a delta or compressed try was abandoned (one line)
    tries: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "bytes": self.bytes, "full_bytes": self.full_bytes}
        if self.base_version is not None:
            doc["base_version"] = self.base_version
        if self.fallback:
            doc["fallback"] = self.fallback[:FALLBACK_LIMIT]
        return doc


# -- the pure part --------------------------------------------------------------------------------

def companion_refusal(kind: str, custom: Mapping[str, Any] | None, length: int, hashes: Mapping[str, str], *,
                      bundle_target: str, bundle_length: int, name: str, version: str,
                      base_sha256: str | None = None) -> str | None:
    """Why a listed companion target must not be used (None: use it). Pure.

    Its signed custom fields must name this bundle (and for a delta this base), and it must be
    smaller than the bundle: a companion that is not is a misconfigured or hostile repository, and
    the plain bundle costs less.
    """
    custom = custom if isinstance(custom, Mapping) else {}
    if custom.get("kind") != kind:
        return f"its signed kind is {custom.get('kind')!r}, not {kind!r}"
    if custom.get("of") != bundle_target or custom.get("name") != name or custom.get("version") != version:
        return f"it is signed as a companion of {custom.get('of')!r}, not of {bundle_target!r}"
    if kind == "compressed" and custom.get("encoding", "zstd") != "zstd":
        return f"its encoding {custom.get('encoding')!r} is not zstd"
    if kind == "delta" and custom.get("base_sha256") != base_sha256:
        return "it is signed for another base than the bundle this device holds"
    if "sha256" not in hashes:
        return "it is listed without a sha256 hash"
    if length >= bundle_length:
        return f"it is {length} bytes, no smaller than the bundle's {bundle_length}"
    return None


def plan_deliveries(*, have_base: bool, can_decompress: bool) -> tuple[str, ...]:
    """The paths to try, in order (pure): a delta needs a base and zstd, the compressed bundle zstd."""
    paths: list[str] = []
    if can_decompress and have_base:
        paths.append("delta")
    if can_decompress:
        paths.append("compressed")
    paths.append("full")
    return tuple(paths)


# -- the I/O --------------------------------------------------------------------------------------

class _Abandon(Exception):
    """A delta or compressed try that cannot go on; its message is the recorded reason."""


def _check_companion(kind: str, info: Any, **bundle: Any) -> None:
    """Abandon the try where :func:`companion_refusal` refuses the listed companion ``info``."""
    refusal = companion_refusal(kind, info.custom, info.length, info.hashes, **bundle)
    if refusal is not None:
        raise _Abandon(f"{info.path}: {refusal}")


def companion_path(name: str, version: str, kind: str, base_sha256: str | None = None) -> str:
    """The TUF target path of a bundle's companion (the release repository writes the same path)."""
    if kind == "compressed":
        return f"{name}/{name}-{version}.bundle.zst"
    if kind == "delta" and base_sha256:
        return f"{name}/deltas/{version}/{base_sha256}.delta"
    raise ValueError(f"no companion target of kind {kind!r}" + (" without a base hash" if kind == "delta" else ""))


class _Received:
    """Bytes the transport delivered for one update, every try counted (the record's ``bytes``)."""

    def __init__(self) -> None:
        self.total = 0


def _download(open_target: OpenTarget, info: TargetFile, out: Path, received: _Received) -> None:
    """``info``'s bytes into ``out``, checked against its signed length and hashes."""
    stream = open_target(info)
    try:
        with open(out, "wb") as handle:
            while chunk := stream.read(1 << 20):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        received.total += int(stream.received)
        stream.close()


def _check_bundle_file(path: Path, bundle: TargetFile) -> None:
    size, digest = hash_file(path)
    if size != bundle.length or digest != bundle.hashes.get("sha256"):
        raise _Abandon(f"the result is not the signed bundle ({size} bytes, sha256 {digest[:16]}...)")


def _lookup(updater: Any, path: str) -> TargetFile | None:
    from tuf.api import exceptions as tuf_exceptions
    from tuf.api.metadata import TargetFile

    try:
        info = updater.get_targetinfo(path)
    except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
        raise _Abandon(f"{path} cannot be looked up: {first_line(exc)}") from None
    return info if isinstance(info, TargetFile) else None


def _reason(kind: str, exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, _Abandon) else f"{type(exc).__name__}: {first_line(exc)}"
    if isinstance(exc, EdgeshipError):
        text = exc.message
    return f"{kind} refused: {' '.join(text.split())}"


def deliver_bundle(
    *,
    updater: Any,
    open_target: OpenTarget,
    bundle: TargetFile,
    name: str,
    version: str,
    out: Path,
    base: Path | None = None,
    base_version: str | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> TransferRecord:
    """Leave the signed bundle ``bundle`` in ``out``, by the cheapest path that works.

    Args:
        updater: the refreshed TUF client (``get_targetinfo``).
        open_target: opens a target's verified download over the transport (see OpenTarget).
        bundle: the bundle's signed target (length and sha256 are what ``out`` must have).
        name, version: the bundle the director ordered (what companions must be signed for).
        base: the bundle file this device runs (None: no delta is tried).
        base_version: its version, for the record.
        free_bytes: free space on a folder (the delta path checks there is room to rebuild).

    Raises: what the plain bundle's download raises (TrustError subclasses, FetchError).
    """
    from .delta import apply_delta, zstd_available

    work = out.parent
    received = _Received()
    reasons: list[str] = []
    base_sha256: str | None = None
    if base is not None:
        try:
            if base.is_file():
                base_sha256 = hash_file(base)[1]
        except OSError as exc:  # an unreadable base is no base
            reasons.append(f"delta refused: the base bundle {base} cannot be read ({exc.strerror or exc})")
    plan = plan_deliveries(have_base=base_sha256 is not None, can_decompress=zstd_available())

    def record(kind: str) -> TransferRecord:
        return TransferRecord(kind, received.total, bundle.length, base_version if kind == "delta" else None,
                              "; ".join(reasons)[:FALLBACK_LIMIT] or None, list(plan))

    common: dict[str, Any] = {"bundle_target": bundle.path, "bundle_length": bundle.length, "name": name, "version": version}
    if "delta" in plan:
        delta_file = work / f".{out.name}.delta"
        try:
            info = _lookup(updater, companion_path(name, version, "delta", base_sha256))
            if info is None:
                reasons.append(f"no delta is published from this base (sha256 {str(base_sha256)[:16]}...)")
            else:
                _check_companion("delta", info, base_sha256=base_sha256, **common)
                room = free_bytes(work) if free_bytes is not None else None
                if room is not None and room < info.length + bundle.length + DISK_MARGIN:
                    raise _Abandon(f"{room} bytes free, not enough to rebuild {bundle.length} bytes from a delta")
                _download(open_target, info, delta_file, received)
                apply_delta(delta_file, base, out, expected_target_sha256=bundle.hashes.get("sha256"))  # type: ignore[arg-type]
                _check_bundle_file(out, bundle)
                return record("delta")
        except Exception as exc:  # noqa: BLE001 - any failure of the delta path: the next path is tried
            reasons.append(_reason("delta", exc))
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                delta_file.unlink()
    if "compressed" in plan:
        from .compressed import ZstdBoundedReader

        try:
            info = _lookup(updater, companion_path(name, version, "compressed"))
            if info is not None:
                _check_companion("compressed", info, **common)
                stream = open_target(info)
                try:
                    reader = ZstdBoundedReader(stream, bundle.length)
                    with open(out, "wb") as handle:
                        while chunk := reader.read(1 << 20):
                            handle.write(chunk)
                        reader.finish()  # reads the .zst to its end: its signed length and hash are checked
                        handle.flush()
                        os.fsync(handle.fileno())
                finally:
                    received.total += int(stream.received)
                    stream.close()
                _check_bundle_file(out, bundle)
                return record("compressed")
        except Exception as exc:  # noqa: BLE001 - any failure of the compressed path: the plain bundle is fetched
            reasons.append(_reason("compressed", exc))
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
    try:
        _download(open_target, bundle, out, received)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise
    return record("full")


def iter_file(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A file's bytes in chunks (what the extraction's verifying stream reads a kept bundle from)."""
    with open(path, "rb", buffering=0) as handle:
        while data := handle.read(chunk):
            yield data
