"""A file being assembled from blocks that arrive in any order, and that survives a dropped
connection or a killed process: the data at each block's offset in ``<key>.part``, and a sidecar
``<key>.json`` of the blocks it holds, written atomically and only after the data it names is
fsynced (so a resumed transfer asks only for what is missing). Used by the block downloader
(:mod:`edgeship.ota.block_transfer`); it knows nothing of MQTT.
"""

from __future__ import annotations

__all__ = ["PartialFile"]

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from .atomicfile import atomic_write_json
from .protocol import bitmap_from_indexes, blocks_in, indexes_from_bitmap

log = logging.getLogger(__name__)


class PartialFile:
    """A file being assembled from blocks, plus its sidecar of held blocks.

    ``<key>.part`` holds the data at each block's offset; ``<key>.json`` says
    which blocks are there. The sidecar never names a block whose data is not
    yet fsynced.
    """

    FORMAT = "edgeship-partial-file"

    def __init__(self, folder: Path, stream: str, file_size: int, block_size: int, etag: str | None) -> None:
        self.folder = folder
        self.stream = stream
        self.file_size = file_size
        self.block_size = block_size
        self.etag = etag
        self.total = blocks_in(file_size, block_size)
        key = hashlib.sha256(stream.encode("utf-8")).hexdigest()[:40]
        self.data_path = folder / f"{key}.part"
        self.sidecar_path = folder / f"{key}.json"
        self.have: set[int] = set()
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._syncer: threading.Thread | None = None
        self._discarded = False
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        resumed = self._load_sidecar()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self._fd = os.open(self.data_path, flags, 0o600)
        if not resumed:
            os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, file_size)
        if not resumed:
            self._write_sidecar()

    def _remove_stale_temporaries(self) -> None:
        """Temp files of sidecar writes a killed process left behind (atomic writes are temp + rename)."""
        for stale in self.folder.glob(f".{self.sidecar_path.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass

    def _load_sidecar(self) -> bool:
        try:
            doc = json.loads(self.sidecar_path.read_text())
            same = (doc.get("format") == self.FORMAT and doc.get("stream") == self.stream
                    and doc.get("file_size") == self.file_size and doc.get("block_size") == self.block_size
                    and doc.get("etag") == self.etag and self.data_path.exists())
            if not same:
                return False
            have = indexes_from_bitmap(str(doc.get("have", "")))
        except (OSError, ValueError, TypeError, AttributeError):
            return False
        self.have = {i for i in have if 0 <= i < self.total}
        return True

    def _write_sidecar(self, have: list[int] | None = None) -> None:
        held = sorted(self.have) if have is None else have
        atomic_write_json(self.sidecar_path, {
            "format": self.FORMAT, "stream": self.stream, "file_size": self.file_size,
            "block_size": self.block_size, "etag": self.etag, "have": bitmap_from_indexes(held),
        })

    @property
    def complete(self) -> bool:
        return len(self.have) == self.total

    def missing(self) -> list[int]:
        return [i for i in range(self.total) if i not in self.have]

    def write(self, index: int, data: bytes) -> None:
        os.pwrite(self._fd, data, index * self.block_size)
        self.have.add(index)
        self._unsynced += 1

    def read(self, index: int) -> bytes:
        length = min(self.block_size, self.file_size - index * self.block_size)
        return os.pread(self._fd, length, index * self.block_size) if length > 0 else b""

    def sync(self, *, force: bool = False, every_blocks: int = 64, every_s: float = 1.0) -> None:
        """Make the blocks written so far durable and record them in the sidecar (when due, or ``force``).

        A due sync runs on a background thread so the transfer does not wait on the
        disk: it records the blocks written *before* it started, fsyncs the data, and
        only then rewrites the sidecar, so the sidecar never names a block that is
        not on disk. ``force`` waits for that and then syncs the rest in place.
        """
        if self._discarded:
            return
        if force:
            self._join_syncer()
            if self._unsynced:
                self._sync_now(sorted(self.have))
            return
        if not self._unsynced:
            return
        if self._unsynced < every_blocks and time.monotonic() - self._last_sync < every_s:
            return
        if self._syncer is not None and self._syncer.is_alive():
            return  # one at a time; the next due check catches up
        snapshot = sorted(self.have)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._syncer = threading.Thread(target=self._sync_in_background, args=(snapshot,), daemon=True,
                                        name="partial-file-sync")
        self._syncer.start()

    def _sync_now(self, have: list[int]) -> None:
        os.fsync(self._fd)
        self._write_sidecar(have)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _sync_in_background(self, have: list[int]) -> None:
        try:
            os.fsync(self._fd)
            self._write_sidecar(have)
        except OSError as exc:  # the next sync (or close) tries again; nothing is claimed meanwhile
            self._unsynced += 1
            log.warning("could not record progress of %s: %s", self.stream, exc)

    def _join_syncer(self) -> None:
        syncer, self._syncer = self._syncer, None
        if syncer is not None:
            syncer.join()

    def close(self) -> None:
        try:
            self.sync(force=True)
        finally:
            os.close(self._fd)

    def discard(self) -> None:
        self._discarded = True
        self._join_syncer()  # a sidecar written after this would resurrect the stream
        self._remove_stale_temporaries()
        for path in (self.sidecar_path, self.data_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
