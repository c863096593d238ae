"""Hashing files as they stream: one reader for every part (bundles, slots, wheels, reports).

A 1 MiB buffer read with ``readinto`` into one reused buffer: hashlib (OpenSSL) then runs
at the disk's speed and memory stays flat however large the file (docs/benchmarks.md, verify).
"""

from __future__ import annotations

__all__ = ["CHUNK_SIZE", "hash_file", "sha256_file"]

import hashlib
import os
from typing import Callable

CHUNK_SIZE = 1 << 20
"""Bytes read at a time (1 MiB)."""


def hash_file(
    path: str | os.PathLike[str], progress: Callable[[str, int, int], None] | None = None
) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file; ``progress("hash", done, total)`` as it goes."""
    digest = hashlib.sha256()
    size = 0
    total = os.stat(path).st_size if progress is not None else 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
            if progress is not None:
                progress("hash", size, total)
    return size, digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file."""
    return hash_file(path)[1]
