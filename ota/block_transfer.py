"""Block transfer over MQTT, device side (after AWS IoT's MQTT-based file streams),
without the TUF client: what the agent's serving process needs to move a file.

One concept over 500 lines: the device side of the block exchange (request, resume, verify).

:class:`MqttBlockDownloader` fetches ``edgeship://metadata/<file>`` and
``edgeship://targets/<path>`` in blocks that it requests on the device's
``blocks/request`` topic and receives on ``blocks/data`` (docs/protocol.md,
"Block transfer"):

1. describe: a request without a bitmap; the server answers a ``block_info``
   (size, block size, etag) or a ``block_error`` (404: no such file).
2. blocks: requests carry a bitmap of the wanted blocks (a window of them at
   a time); each answer is one block. A bitmap of the blocks still missing is
   kept; what did not arrive within ``request_timeout_s`` is asked for again.
3. resume: blocks are written into an on-disk partial file
   (:class:`~edgeship.ota.partial_file.PartialFile`), with a sidecar
   (``<key>.json``) recording which blocks it holds. The sidecar is written
   atomically and only after the data it names is fsynced, so after a dropped
   connection *or* a process restart the downloader asks only for blocks it does
   not have. A changed etag (the file changed on the server) starts over.

The transport is untrusted: nothing here is verified beyond the framing; the
TUF client checks lengths, hashes and signatures of what this yields. That
client lives in ``edgeship.ota.blocks`` (``MqttBlockFetcher``, the same
downloader as a ``tuf.ngclient.FetcherInterface``): this module imports no TUF,
securesystemslib or cryptography, so the agent can move blocks for a verifier
in another process (``edgeship.agent.isolated``) and stay small.
"""

from __future__ import annotations

__all__ = [
    "METADATA_URL",
    "TARGETS_URL",
    "URL_PREFIX",
    "BlockTransferConfig",
    "BlockTransferFailed",
    "MqttBlockDownloader",
    "stream_for_url",
]

import collections
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib import parse

from .errors import BadInputError
from .partial_file import PartialFile
from .protocol import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS_PER_STREAM,
    MIN_BLOCK_SIZE,
    BlockData,
    BlockError,
    BlockInfo,
    BlockReply,
    BlockRequest,
    bitmap_from_indexes,
    encode_message,
    parse_block_reply,
)
from .topics import BLOCK_DATA, BLOCK_REQUEST, DEFAULT_PREFIX, device_topic
from .transport import MqttConnection, ReceivedMessage, TransportError

log = logging.getLogger(__name__)

URL_PREFIX = "edgeship://"
METADATA_URL = URL_PREFIX + "metadata/"
TARGETS_URL = URL_PREFIX + "targets/"

ProgressCallback = Callable[[str, int, int], None]
"""(stream, blocks held, blocks total)."""


class BlockTransferFailed(TransportError):
    """A block transfer failed (timeout, server error, changed file); ``status_code``
    is the server's HTTP-like answer where it gave one (404: no such file, 400: a
    refused URL), else None."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        Exception.__init__(self, message)
        self.status_code = status_code


@dataclass(frozen=True)
class BlockTransferConfig:
    """Tuning of one device's block transfers.

    Attributes:
        block_size: bytes per block (256 B - 1 MiB); larger is faster, smaller wastes less on a flaky link.
        window: blocks requested and not yet received at most (keep <= the server's per-request cap).
        request_timeout_s: without any new block for this long, the missing ones are asked for again.
        total_timeout_s: one file must arrive within this (the partial file stays for the next try).
        max_file_size: a server describing a larger file is refused before anything is fetched (bytes).
        sync_every_blocks / sync_every_s: how often data is fsynced and the sidecar rewritten.
        qos: QoS of the requests and of the blocks subscription.
    """

    block_size: int = 64 * 1024
    window: int = 128
    request_timeout_s: float = 3.0
    total_timeout_s: float = 900.0
    max_file_size: int = 2 * 1024 ** 3
    sync_every_blocks: int = 64
    sync_every_s: float = 1.0
    qos: int = 1

    def __post_init__(self) -> None:
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            raise BadInputError(f"block size must be {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE} bytes, got {self.block_size}")
        if self.window < 1 or self.request_timeout_s <= 0 or self.total_timeout_s <= 0:
            raise BadInputError("block transfer window, request timeout and total timeout must be positive")
        if self.qos not in (0, 1):
            raise BadInputError(f"block transfer QoS must be 0 or 1, got {self.qos}")


def stream_for_url(url: str) -> str:
    """``edgeship://metadata/1.root.json`` -> ``metadata/1.root.json`` (percent-decoded, checked).

    Raises:
        BlockTransferFailed: (status 400) a URL outside ``metadata/`` and ``targets/``, or with
            ``..``, empty or absolute segments.
    """
    if not url.startswith(URL_PREFIX):
        raise BlockTransferFailed(f"unsupported URL {url!r}: expected {METADATA_URL}... or {TARGETS_URL}...", 400)
    stream = parse.unquote(url[len(URL_PREFIX):])
    area, _, rest = stream.partition("/")
    parts = rest.split("/")
    if (area not in ("metadata", "targets") or not rest or "\\" in stream or "\x00" in stream
            or any(p in ("", ".", "..") for p in parts)):
        raise BlockTransferFailed(f"refused URL {url!r}: not a plain path under metadata/ or targets/", 400)
    return stream


REASK_BACKOFF_LIMIT = 8
"""A device waits at most this many request timeouts between two re-asks without progress."""


def next_reask_s(current: float, config: BlockTransferConfig) -> float:
    """How long to wait before the next re-ask after one went unanswered: twice the last wait, up
    to ``REASK_BACKOFF_LIMIT`` request timeouts. Pure. A block server that answers nothing is
    overloaded more often than it is gone, and a fleet re-asking at a fixed pace would keep it so;
    the first block that arrives resets the wait to one request timeout."""
    return min(current * 2, config.request_timeout_s * REASK_BACKOFF_LIMIT)


def _retry_after(reply: BlockError, config: BlockTransferConfig) -> float:
    """The server's ``retry_after_s`` (0 is a valid answer), bounded; the request timeout without one."""
    if reply.retry_after_s is None:
        return config.request_timeout_s
    return min(max(reply.retry_after_s, 0.0), config.request_timeout_s * 10)


# -- the downloader ----------------------------------------------------------------------------------

class MqttBlockDownloader:
    """Fetch files in blocks over MQTT, resumable across reconnects and restarts.

    ``chunks(url)`` yields a file's bytes in order; ``fetch_to_file`` writes one.
    Failures raise ``transfer_error(message)`` or, with the server's status,
    ``not_found_error(message, status)``: ``BlockTransferFailed`` here, the TUF
    client's download errors in ``edgeship.ota.blocks.MqttBlockFetcher``.

    Args:
        connection: the device's connected MqttConnection.
        fleet, device: whose ``blocks/request`` and ``blocks/data`` topics to use.
        work_dir: where partial files and their sidecars live (keep it across restarts).
        config: block size, window, timeouts.
        progress: called with (stream, blocks held, blocks total) as blocks arrive.
    """

    transfer_error: Callable[[str], Exception] = BlockTransferFailed
    not_found_error: Callable[[str, int], Exception] = BlockTransferFailed

    def __init__(
        self,
        connection: MqttConnection,
        *,
        fleet: str,
        device: str,
        work_dir: str | os.PathLike[str],
        prefix: str = DEFAULT_PREFIX,
        config: BlockTransferConfig | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.connection = connection
        self.config = config or BlockTransferConfig()
        self.request_topic = device_topic(fleet, device, BLOCK_REQUEST, prefix)
        self.data_topic = device_topic(fleet, device, BLOCK_DATA, prefix)
        self.work_dir = Path(work_dir)
        self.progress = progress
        # bounded: a flood on the data topic (or late replies between fetches) costs at most this
        self._replies: queue.Queue[BlockReply] = queue.Queue(maxsize=2 * self.config.window + 16)
        self.dropped_replies = 0
        self._subscribed = False
        self._lock = threading.Lock()
        self.requests_sent: collections.deque[tuple[float, BlockRequest]] = collections.deque(maxlen=20_000)
        """The last requests this fetcher sent, with their time.monotonic() (for diagnostics and tests)."""
        self.current: PartialFile | None = None
        """The partial file being fetched now, if any."""
        self.blocks_received = 0
        self.duplicate_blocks = 0

    # -- plumbing --
    def _on_data(self, message: ReceivedMessage) -> None:
        reply = parse_block_reply(message.payload)  # ProtocolError: logged and dropped by the transport
        try:
            self._replies.put_nowait(reply)
        except queue.Full:  # nobody is consuming this fast: the request timeout asks again
            self.dropped_replies += 1

    def _ensure_subscribed(self) -> None:
        with self._lock:
            if not self._subscribed:
                self.connection.subscribe(self.data_topic, self._on_data, qos=self.config.qos)
                self._subscribed = True

    def _send(self, request: BlockRequest) -> None:
        self.requests_sent.append((time.monotonic(), request))
        try:
            self.connection.publish(self.request_topic, encode_message(request), qos=self.config.qos, wait=False)
        except TransportError as exc:  # dropped on the floor: the request timeout asks again
            log.info("block request not sent (%s); will retry", exc)

    def _drain(self) -> None:
        while True:
            try:
                self._replies.get_nowait()
            except queue.Empty:
                return

    def chunks(self, url: str) -> Iterator[bytes]:
        """The file at ``url``, block by block (resuming from the partial file)."""
        if self.connection.on_network_thread():
            raise RuntimeError("MqttBlockFetcher cannot fetch inside a message handler: the blocks arrive on "
                               "that same thread; fetch from another thread")
        try:
            stream = stream_for_url(url)
        except BlockTransferFailed as exc:
            raise self.not_found_error(str(exc), exc.status_code or 400) from None
        self._ensure_subscribed()
        deadline = time.monotonic() + self.config.total_timeout_s
        info = self._describe(stream, deadline)
        if info.file_size > self.config.max_file_size:
            raise self.transfer_error(
                f"{stream} is {info.file_size} bytes, more than this device accepts ({self.config.max_file_size})"
            )
        if info.blocks_total > MAX_BLOCKS_PER_STREAM:
            raise self.transfer_error(f"{stream} needs {info.blocks_total} blocks; use a larger block size")
        partial = PartialFile(self.work_dir / "partial", stream, info.file_size, info.block_size, info.etag)
        self.current = partial
        if partial.have:
            log.info("resuming %s: %d of %d blocks already on disk", stream, len(partial.have), partial.total)
        return self._blocks(partial, deadline)

    def fetch_to_file(self, url: str, destination: str | os.PathLike[str]) -> int:
        """Fetch ``url`` into ``destination`` (outside the TUF client); returns the byte count."""
        count = 0
        try:
            with open(destination, "wb") as out:
                for chunk in self.chunks(url):
                    out.write(chunk)
                    count += len(chunk)
        except BaseException:
            Path(destination).unlink(missing_ok=True)  # the partial file, not this one, is what resumes
            raise
        return count

    def _describe(self, stream: str, deadline: float) -> BlockInfo:
        self._drain()
        request_id = uuid.uuid4().hex
        next_send = 0.0
        interval = self.config.request_timeout_s
        while True:
            now = time.monotonic()
            if now > deadline:
                raise self.transfer_error(f"no description of {stream} within {self.config.total_timeout_s:g} s")
            if now >= next_send and self.connection.is_connected:
                self._send(BlockRequest(request_id, stream, self.config.block_size))
                next_send = now + interval
                interval = next_reask_s(interval, self.config)
            try:
                reply = self._replies.get(timeout=0.1)
            except queue.Empty:
                continue
            if reply.stream != stream or reply.request_id != request_id:
                continue
            if isinstance(reply, BlockInfo):
                return reply
            if isinstance(reply, BlockError):
                if reply.code == 429:
                    next_send = time.monotonic() + _retry_after(reply, self.config)
                    continue
                if reply.code == 404:
                    raise self.not_found_error(f"{stream} not found on the block server: {reply.message}", 404)
                raise self.transfer_error(f"block server refused {stream}: {reply.code} {reply.message}")

    def _blocks(self, partial: PartialFile, deadline: float) -> Iterator[bytes]:
        config = self.config
        stream = partial.stream
        next_yield = 0
        pending: collections.deque[int] = collections.deque(partial.missing())
        inflight: dict[int, float] = {}
        fresh: dict[int, bytes] = {}
        not_before = 0.0
        last_progress = time.monotonic()
        stall_s = config.request_timeout_s
        was_connected = True
        finished = False
        try:
            while True:
                while next_yield < partial.total and next_yield in partial.have:
                    # the block that just arrived is usually the next one: no need to read it back
                    chunk = fresh.pop(next_yield, None)
                    if chunk is None:
                        chunk = partial.read(next_yield)
                    next_yield += 1
                    if chunk:
                        yield chunk
                fresh.clear()
                if next_yield >= partial.total:
                    break
                now = time.monotonic()
                if now > deadline:
                    raise self.transfer_error(
                        f"{stream}: {len(partial.have)} of {partial.total} blocks after "
                        f"{config.total_timeout_s:g} s; the partial file is kept for the next try"
                    )
                connected = self.connection.is_connected
                if not connected:
                    if inflight:  # whatever was still on the wire is lost; ask again once back
                        pending = collections.deque(sorted(set(pending) | set(inflight)))
                        inflight.clear()
                    was_connected = False
                elif not was_connected:
                    was_connected = True
                    last_progress = now
                if connected and now - last_progress > stall_s and inflight:
                    log.info("%s: %d blocks did not arrive within %.1f s; asking again",
                             stream, len(inflight), stall_s)
                    pending = collections.deque(sorted(set(pending) | set(inflight)))
                    inflight.clear()
                    last_progress = now
                    stall_s = next_reask_s(stall_s, config)
                room = config.window - len(inflight)
                if connected and pending and now >= not_before \
                        and (room >= max(1, config.window // 4) or not inflight):
                    batch: list[int] = []
                    while pending and len(batch) < room:
                        index = pending.popleft()
                        if index not in partial.have:
                            batch.append(index)
                    if batch:
                        self._send(BlockRequest(uuid.uuid4().hex, stream, partial.block_size,
                                                bitmap_from_indexes(batch, min(batch)), min(batch)))
                        for index in batch:
                            inflight[index] = now
                wait = 0.05
                if pending and now < not_before:
                    wait = min(wait, max(0.001, not_before - now))
                try:
                    reply = self._replies.get(timeout=wait)
                except queue.Empty:
                    continue
                if reply.stream != stream:
                    continue
                if isinstance(reply, BlockData):
                    if reply.etag != partial.etag or reply.block_size != partial.block_size \
                            or reply.file_size != partial.file_size:
                        partial.discard()
                        raise self.transfer_error(f"{stream} changed on the server during the transfer; try again")
                    inflight.pop(reply.index, None)
                    if reply.index in partial.have:
                        self.duplicate_blocks += 1
                        continue
                    partial.write(reply.index, reply.data)
                    if reply.index == next_yield:
                        fresh[reply.index] = reply.data
                    self.blocks_received += 1
                    last_progress = time.monotonic()
                    stall_s = config.request_timeout_s
                    partial.sync(every_blocks=config.sync_every_blocks, every_s=config.sync_every_s)
                    if self.progress is not None:
                        self.progress(stream, len(partial.have), partial.total)
                elif isinstance(reply, BlockError):
                    if reply.code == 429:
                        not_before = time.monotonic() + _retry_after(reply, config)
                        pending = collections.deque(sorted(set(pending) | set(inflight)))
                        inflight.clear()
                        last_progress = not_before
                    elif reply.code == 404:
                        partial.discard()
                        raise self.not_found_error(f"{stream} disappeared from the block server: {reply.message}", 404)
                    else:
                        raise self.transfer_error(f"block server refused {stream}: {reply.code} {reply.message}")
            finished = True
        except GeneratorExit:  # the consumer refused the stream (too long, bad hash): start over next time
            finished = True
            raise
        finally:
            try:
                partial.close()
            finally:
                if finished:
                    partial.discard()
