"""A bundle compressed with zstd (the ``.bundle.zst`` companion target), read on the device.

One zstd frame whose header names the content size. Reading it streams (one decompression window
in memory, never the bundle) and is bounded: the frame must promise exactly the signed length of
the bundle it carries, and no more bytes than that are ever produced. What comes out is still
checked against the bundle's own signed hash by the caller (``edgeship.ota.fetch_paths``): the
compressed file changes how many bytes travel, never what the device trusts.

Building one is ``edgeship.toolkit.deltas.compress_bundle`` (the host side).
"""

from __future__ import annotations

__all__ = ["CompressedBundleError", "ZstdBoundedReader", "decompress_to"]

from collections.abc import Callable
from typing import Any, BinaryIO

from .errors import SecurityError

CHUNK = 1 << 16
FRAME_HEADER_MAX = 18
"""The longest zstd frame header (magic, descriptor, window, dictionary id, content size)."""


class CompressedBundleError(SecurityError):
    """A compressed bundle that is malformed, names another size, or decompresses to more than it
    may. The caller discards it and fetches the plain bundle."""


class ZstdBoundedReader:
    """``read(n)`` over the decompressed bytes of one zstd frame read from ``raw``.

    Args:
        raw: anything with ``read(n)`` giving the compressed bytes.
        expected: the decompressed length the frame must name in its header and produce, exactly.
    """

    def __init__(self, raw: Any, expected: int) -> None:
        import zstandard

        self._zstd = zstandard
        head = raw.read(FRAME_HEADER_MAX)
        try:
            params = zstandard.get_frame_parameters(head)
        except zstandard.ZstdError as exc:
            raise CompressedBundleError(f"the compressed bundle does not start with a zstd frame ({exc})") from None
        if params.content_size != expected:
            raise CompressedBundleError(f"the compressed bundle's frame names {params.content_size} bytes, the "
                                        f"bundle has {expected}")
        self.expected = expected
        self.produced = 0
        self._raw = raw
        self._reader = zstandard.ZstdDecompressor().stream_reader(_Prefixed(head, raw), read_across_frames=False)

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        try:
            data = self._reader.read(want)
        except self._zstd.ZstdError as exc:
            raise CompressedBundleError(f"the compressed bundle does not decompress ({exc})") from None
        self.produced += len(data)
        if self.produced > self.expected:
            raise CompressedBundleError(f"the compressed bundle decompresses to more than its {self.expected} bytes")
        if not data and self.produced != self.expected:
            raise CompressedBundleError(f"the compressed bundle ends after {self.produced} of {self.expected} bytes")
        return data

    def finish(self) -> None:
        """After the last byte: nothing may follow the frame (a second frame is not part of the bundle)."""
        while self.read(CHUNK):
            pass
        if self._raw.read(1):
            raise CompressedBundleError("the compressed bundle has bytes after its frame")


class _Prefixed:
    """``head`` then the rest of ``raw``: the frame header read to check it goes back in front."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(data):]
            return data
        return bytes(self._raw.read(n))


def decompress_to(source: BinaryIO, sink: Callable[[bytes], Any], expected: int) -> int:
    """Decompress ``source`` (one frame of exactly ``expected`` bytes) into ``sink``; returns the count."""
    reader = ZstdBoundedReader(source, expected)
    while chunk := reader.read(CHUNK):
        sink(chunk)
    reader.finish()
    return reader.produced
