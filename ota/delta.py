"""Model-aware deltas between two bundles: the format, and applying one on the device.

A delta rebuilds the *whole* new bundle (an uncompressed tar: docs/bundle-format.md) from the
bundle the device already runs, bit for bit: the result must hash to the new bundle's signed
hash, so the trust model does not change (docs/deltas.md). It is a sequence of regions of the new
bundle, in order:

- ``literal``: bytes taken from one zstd stream, compressed with the *base's non-tensor bytes* as
  a raw-content dictionary (headers, the manifest, the flatbuffer or protobuf around the weights);
- ``xor``: a weight tensor, XORed with the same tensor of the base and split into byte planes
  (after a fine-tune every float moves a little: sign, exponent and top mantissa bits stay, and
  those planes compress to almost nothing);
- ``sub``: an integer tensor (int8 weights, int32 biases), minus the base's, modulo 2^bits, in
  byte planes (an int8 fine-tune moves most weights by -1, 0 or +1).

Applying streams region by region: it holds the dictionary (the base's non-tensor bytes, small)
and one tensor at a time, never two models. The file::

    b"ESDELTA1" | u32 header length | header (JSON) | literal stream | payload 1 | payload 2 | ...

This module is the device side: it reads the format and applies it (numpy and zstandard only).
Building one needs the model parsers: ``edgeship.toolkit.deltas``.
"""

from __future__ import annotations

__all__ = ["DeltaError", "DeltaHeader", "Region", "apply_delta", "decode_region", "delta_summary", "encode_region",
           "read_header", "write_delta", "zstd_available"]

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import SecurityError

MAGIC = b"ESDELTA1"
SCHEMA = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_REGIONS = 1_000_000
KINDS = ("literal", "xor", "sub")
WIDTHS = (1, 2, 4, 8)
CHUNK = 1 << 20


class DeltaError(SecurityError):
    """A delta that cannot be used: malformed, for another base, or not rebuilding its target. The
    caller discards it and fetches the full bundle."""


def zstd_available() -> bool:
    """Deltas need python-zstandard (``edgeship[litert]``/``[onnx]``; Debian's python3-zstandard on
    armhf); a device without it fetches full bundles."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Region:
    at: int                # offset in the new bundle
    length: int            # bytes of the new bundle it makes
    kind: str = "literal"  # literal | xor | sub
    width: int = 1         # element size in bytes (xor and sub)
    base_at: int = 0       # where the same tensor lies in the base (xor and sub)
    payload: int = 0       # compressed bytes in the delta file (xor and sub)


@dataclass(frozen=True)
class DeltaHeader:
    base_sha256: str
    base_size: int
    target_sha256: str
    target_size: int
    dictionary: tuple[tuple[int, int], ...]  # (base offset, length) ranges: the literal stream's dictionary
    literal_payload: int                     # compressed bytes of the literal stream
    regions: tuple[Region, ...]
    method: str = "tensor"                   # tensor | binary (no region but literals: a plain binary delta)

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["schema"] = SCHEMA
        doc["regions"] = [[r.at, r.length, r.kind, r.width, r.base_at, r.payload] for r in self.regions]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DeltaHeader:
        try:
            doc = json.loads(data)
            if doc.get("schema") != SCHEMA:
                raise DeltaError(f"delta schema {doc.get('schema')!r} is not {SCHEMA}")
            regions = tuple(Region(int(a), int(n), str(k), int(w), int(b), int(p)) for a, n, k, w, b, p in doc["regions"])
            header = cls(str(doc["base_sha256"]), int(doc["base_size"]), str(doc["target_sha256"]),
                         int(doc["target_size"]), tuple((int(a), int(n)) for a, n in doc["dictionary"]),
                         int(doc["literal_payload"]), regions, str(doc.get("method", "tensor")))
        except DeltaError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise DeltaError(f"malformed delta header ({type(exc).__name__}: {str(exc)[:120]})") from None
        header.check()
        return header

    def check(self) -> None:
        """The header's promises, before any byte is written: regions cover the target exactly and
        in order, every base range lies inside the base, sizes are sane. Pure."""
        if len(self.regions) > MAX_REGIONS:
            raise DeltaError(f"delta has {len(self.regions)} regions (at most {MAX_REGIONS})")
        if min(self.base_size, self.target_size, self.literal_payload) < 0:
            raise DeltaError("delta header has a negative size")
        for text in (self.base_sha256, self.target_sha256):
            if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
                raise DeltaError("delta header names a hash that is not 64 hex digits")
        cursor = 0
        for region in self.regions:
            if region.at != cursor or region.length <= 0:
                raise DeltaError(f"delta regions do not cover the target in order (a region at {region.at}, expected {cursor})")
            if region.kind not in KINDS:
                raise DeltaError(f"delta region kind {region.kind!r} is unknown")
            if region.kind != "literal":
                if region.width not in WIDTHS or region.length % region.width:
                    raise DeltaError(f"delta region at {region.at}: width {region.width} does not divide {region.length}")
                if region.base_at < 0 or region.base_at + region.length > self.base_size:
                    raise DeltaError(f"delta region at {region.at} reads past the end of the base")
                if region.payload <= 0:
                    raise DeltaError(f"delta region at {region.at} has no payload")
            cursor += region.length
        if cursor != self.target_size:
            raise DeltaError(f"delta regions make {cursor} bytes, the target has {self.target_size}")
        for start, length in self.dictionary:
            if start < 0 or length < 0 or start + length > self.base_size:
                raise DeltaError("delta dictionary range lies outside the base")


# -- the transforms (pure) ------------------------------------------------------------------------

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _planes(values: np.ndarray, width: int) -> bytes:
    """Byte planes: all first bytes, then all second bytes, ... (what compresses)."""
    return values.view(np.uint8).reshape(-1, width).T.tobytes()


def _unplanes(data: bytes, width: int, dtype: Any) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.copy().view(dtype).reshape(-1)


def encode_region(kind: str, width: int, new: bytes, old: bytes) -> bytes:
    """The transformed bytes of a tensor region (before compression)."""
    dtype = np.dtype(_UINT[width]).newbyteorder("<")
    a, b = np.frombuffer(new, dtype), np.frombuffer(old, dtype)
    if kind == "xor":
        return _planes(np.bitwise_xor(a, b), width)
    if kind == "sub":
        return _planes(a - b, width)  # unsigned: wraps modulo 2^bits, exactly invertible
    raise ValueError(f"no transform {kind!r}")


def decode_region(kind: str, width: int, transformed: bytes, old: bytes) -> bytes:
    """The inverse of :func:`encode_region`: the new tensor's bytes."""
    dtype = np.dtype(_UINT[width]).newbyteorder("<")
    delta, base = _unplanes(transformed, width, dtype), np.frombuffer(old, dtype)
    if delta.shape != base.shape:
        raise DeltaError("a delta payload does not match its base tensor's size")
    if kind == "xor":
        return np.bitwise_xor(delta, base).tobytes()
    if kind == "sub":
        return (base + delta).tobytes()
    raise DeltaError(f"no transform {kind!r}")


# -- the file -------------------------------------------------------------------------------------

def write_delta(out: BinaryIO, header: DeltaHeader, literal: bytes, payloads: Iterable[bytes]) -> int:
    """Write a delta file; returns its size."""
    blob = header.to_json()
    out.write(MAGIC + struct.pack("<I", len(blob)) + blob + literal)
    size = len(MAGIC) + 4 + len(blob) + len(literal)
    for payload in payloads:
        out.write(payload)
        size += len(payload)
    return size


def read_header(stream: BinaryIO) -> tuple[DeltaHeader, int]:
    """(header, offset of the literal stream)."""
    head = stream.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
        raise DeltaError("not an edgeship delta (bad magic)")
    (length,) = struct.unpack("<I", head[len(MAGIC):])
    if length > MAX_HEADER_BYTES:
        raise DeltaError(f"delta header of {length} bytes (at most {MAX_HEADER_BYTES})")
    blob = stream.read(length)
    if len(blob) != length:
        raise DeltaError("the delta is truncated inside its header")
    return DeltaHeader.from_json(blob), len(MAGIC) + 4 + length


class _Slice:
    """``size`` bytes of a file from its current position, as a readable stream (the literal stream)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream, self._left = stream, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(n)
        self._left -= len(data)
        return data


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_ranges(base: BinaryIO, ranges: Sequence[tuple[int, int]]) -> bytes:
    parts = []
    for start, length in ranges:
        base.seek(start)
        parts.append(base.read(length))
    return b"".join(parts)


def apply_delta(delta_path: str | os.PathLike[str], base_path: str | os.PathLike[str],
                out_path: str | os.PathLike[str], *, expected_target_sha256: str | None = None) -> str:
    """Rebuild the target bundle from ``base_path`` into ``out_path``; returns its sha256.

    Checks, in order: the header (:meth:`DeltaHeader.check`), the base's hash against the header's
    (a device whose active slot is not the delta's base must not try), every payload's size, and at
    the end the result's hash against the header's and ``expected_target_sha256`` (the signed one).
    On any failure ``out_path`` is removed and :class:`DeltaError` raised: fetch the full bundle.
    """
    import zstandard

    out = Path(out_path)
    base_file = Path(base_path)
    try:
        with open(delta_path, "rb") as delta:
            header, literal_at = read_header(delta)
            if expected_target_sha256 is not None and header.target_sha256 != expected_target_sha256:
                raise DeltaError("the delta rebuilds another bundle than the one signed")
            if base_file.stat().st_size != header.base_size or _sha256_file(base_file) != header.base_sha256:
                raise DeltaError("the delta is for another base than the bundle this device holds")
            payload_at = literal_at + header.literal_payload
            digest = hashlib.sha256()
            with open(base_file, "rb") as base, open(out, "wb") as target:
                dictionary = _read_ranges(base, header.dictionary)
                zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT) \
                    if dictionary else None
                source: Any = _Slice(delta, header.literal_payload)  # read()-able: all stream_reader needs
                literal_stream = zstandard.ZstdDecompressor(dict_data=zdict).stream_reader(source,
                                                                                        read_across_frames=False)
                literal_pos = literal_at
                for region in header.regions:
                    if region.kind == "literal":
                        delta.seek(literal_pos)
                        left = region.length
                        while left:
                            chunk = literal_stream.read(min(left, CHUNK))
                            if not chunk:
                                raise DeltaError("the delta's literal stream ends early")
                            target.write(chunk)
                            digest.update(chunk)
                            left -= len(chunk)
                        literal_pos = delta.tell()
                        continue
                    delta.seek(payload_at)
                    compressed = delta.read(region.payload)
                    if len(compressed) != region.payload:
                        raise DeltaError("the delta is truncated inside a tensor payload")
                    payload_at += region.payload
                    try:
                        transformed = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=region.length)
                    except zstandard.ZstdError as exc:
                        raise DeltaError(f"a tensor payload does not decompress ({exc})") from None
                    if len(transformed) != region.length:
                        raise DeltaError("a tensor payload decompresses to the wrong size")
                    base.seek(region.base_at)
                    rebuilt = decode_region(region.kind, region.width, transformed, base.read(region.length))
                    target.write(rebuilt)
                    digest.update(rebuilt)
                target.flush()
                os.fsync(target.fileno())
        result = digest.hexdigest()
        if result != header.target_sha256:
            raise DeltaError("the rebuilt bundle's hash is not the delta's target hash")
        return result
    except DeltaError:
        out.unlink(missing_ok=True)
        raise
    except (OSError, zstandard.ZstdError, ValueError) as exc:
        out.unlink(missing_ok=True)
        raise DeltaError(f"the delta cannot be applied: {type(exc).__name__}: {str(exc)[:160]}") from None


def delta_summary(header: DeltaHeader) -> dict[str, Any]:
    """What a person reads about a delta (``edgeship delta inspect``)."""
    tensors = [r for r in header.regions if r.kind != "literal"]
    return {"method": header.method, "base_sha256": header.base_sha256, "target_sha256": header.target_sha256,
            "base_size": header.base_size, "target_size": header.target_size, "regions": len(header.regions),
            "tensor_regions": len(tensors), "tensor_bytes": sum(r.length for r in tensors),
            "literal_bytes": header.target_size - sum(r.length for r in tensors)}

