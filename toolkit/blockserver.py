"""Block transfer over MQTT, host side: answer the devices' block requests from
the release repository's ``metadata/`` and ``targets/`` (docs/protocol.md).

Requests arrive on ``<prefix>/<fleet>/devices/+/blocks/request`` (optionally
through an MQTT 5 shared subscription, so controller replicas split them) and
are answered on the requesting device's ``blocks/data``:

- a request without a bitmap gets a ``block_info`` (size, block size, etag);
- a request with a bitmap gets one ``block`` message per wanted block, at most
  ``max_blocks_per_request`` of them, while the device's token bucket (bytes per
  second, with a burst) allows; the rest gets a ``block_error`` 429 with
  ``retry_after_s``;
- unknown, unreadable or out-of-tree streams get a ``block_error`` 404 (400 for
  malformed requests). Paths are resolved (symlinks included) and must stay
  inside ``metadata/`` or ``targets/``: traversal is impossible by construction.

The message handler only parses and queues; a worker thread reads files and
publishes, so the MQTT network thread never blocks on disk or on the broker.
"""

from __future__ import annotations

__all__ = ["STREAM_KINDS", "TokenBucket", "BlockServer", "ServedRequest", "resolve_stream", "stream_kind"]

import collections
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import (
    BlockData,
    BlockError,
    BlockInfo,
    BlockReply,
    BlockRequest,
    blocks_in,
    encode_block_reply,
    parse_message,
)
from edgeship.ota.topics import (
    BLOCK_DATA,
    BLOCK_REQUEST,
    DEFAULT_PREFIX,
    device_topic,
    device_wildcard,
    parse_device_topic,
)
from edgeship.ota.transport import MqttConnection, PendingPublish, ReceivedMessage, TransportError

log = logging.getLogger(__name__)

_AREAS = ("metadata", "targets")


# -- pure pieces -----------------------------------------------------------------------------------

@dataclass
class TokenBucket:
    """A token bucket in bytes: ``rate`` per second, holding at most ``capacity``.

    Pure arithmetic on a clock value the caller passes in (table-tested).
    """

    rate: float
    capacity: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.capacity <= 0:
            raise BadInputError(f"rate limit needs a positive rate and burst, got {self.rate}/s, {self.capacity}")
        if self.tokens < 0:
            self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` if the bucket holds it (a request larger than ``capacity`` needs a full bucket)."""
        self._refill(now)
        need = min(amount, self.capacity)
        if self.tokens >= need:
            self.tokens -= need
            return True
        return False

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``take(amount)`` would succeed."""
        self._refill(now)
        need = min(amount, self.capacity)
        return max(0.0, (need - self.tokens) / self.rate)


def resolve_stream(root: Path, stream: str) -> Path | None:
    """The regular file for ``stream`` under ``root/metadata`` or ``root/targets``, or None.

    Symlinks are resolved before the containment check, so no name leads outside.
    """
    area, _, rest = stream.partition("/")
    if area not in _AREAS or not rest:
        return None
    base = (root / area).resolve()
    try:
        path = (base / rest).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if base != path and base not in path.parents:
        return None
    return path if path.is_file() else None


STREAM_KINDS = ("delta", "compressed", "full", "metadata")
"""What a served stream is, for the count of bytes that left the controller per kind."""


def stream_kind(stream: str) -> str:
    """``metadata`` (TUF metadata), ``delta`` (``targets/NAME/deltas/VERSION/BASE.delta``),
    ``compressed`` (``targets/...bundle.zst``) or ``full`` (any other target: a bundle). Pure:
    the release repository's layout (docs/deltas.md) names what a file is."""
    area, _, rest = stream.partition("/")
    if area == "metadata":
        return "metadata"
    parts = rest.split("/")
    if len(parts) >= 4 and parts[-3] == "deltas" and parts[-1].endswith(".delta"):
        return "delta"
    if rest.endswith(".zst"):
        return "compressed"
    return "full"


@dataclass(frozen=True)
class ServedRequest:
    """One request as the server handled it (kept for diagnostics and tests)."""

    at: float
    fleet: str
    device: str
    stream: str
    wanted: tuple[int, ...]
    served: tuple[int, ...]
    outcome: str  # "info", "blocks", "rate-limited", "not-found", "bad-request"


# -- the server ------------------------------------------------------------------------------------

class BlockServer:
    """Serve block requests from a release repository folder.

    Args:
        connection: a connected MqttConnection of the controller.
        root: the folder holding ``metadata/`` and ``targets/``.
        fleet: serve one fleet, or ``"+"`` for all.
        shared_group: subscribe as ``$share/<group>/...`` so replicas split the requests.
        rate_bytes_per_s, burst_bytes: each device's token bucket.
        max_blocks_per_request: blocks answered per request at most.
        qos: QoS of the blocks published.
        max_unacked_bytes: blocks published and not yet acknowledged by the broker, at most (QoS 1).
        publisher: a second connection to publish blocks on (default: ``connection``). Requests
            then arrive on a connection that carries no stream of acks, so a broker with
            Nagle's algorithm on does not hold them back behind one (docs/protocol.md).
    """

    def __init__(
        self,
        connection: MqttConnection,
        root: str | os.PathLike[str],
        *,
        fleet: str = "+",
        prefix: str = DEFAULT_PREFIX,
        shared_group: str | None = None,
        rate_bytes_per_s: float = 8 * 1024 * 1024,
        burst_bytes: float = 4 * 1024 * 1024,
        max_blocks_per_request: int = 256,
        qos: int = 1,
        queue_size: int = 1000,
        max_unacked_bytes: int = 16 * 1024 * 1024,
        history: int = 2000,
        publisher: MqttConnection | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection = connection
        self.publisher = publisher or connection
        self.root = Path(root)
        if not all((self.root / area).is_dir() for area in _AREAS):
            raise BadInputError(f"{self.root} is not a release repository: it needs metadata/ and targets/ folders")
        if max_blocks_per_request < 1:
            raise BadInputError("max_blocks_per_request must be at least 1")
        self.prefix = prefix
        topic_filter = device_wildcard(BLOCK_REQUEST, fleet, prefix)
        self.topic_filter = f"$share/{shared_group}/{topic_filter}" if shared_group else topic_filter
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        TokenBucket(self.rate, self.burst)  # validates the numbers
        self.max_blocks = max_blocks_per_request
        self.qos = qos
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue(queue_size)
        # The newest request of each (fleet, device, stream) not yet served. A device that asks again
        # while its earlier request still waits replaces it instead of queueing a second one: under
        # load every device re-asks on its timeout, and serving each copy of the same window would
        # multiply the bytes sent by the very congestion that caused the re-ask.
        self._waiting: dict[tuple[str, str, str], BlockRequest] = {}
        self._waiting_lock = threading.Lock()
        self.coalesced_requests = 0
        self._drops_unlogged = 0
        self._drop_logged_at = -1e9
        self._worker: threading.Thread | None = None
        self._etags: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self.log: collections.deque[ServedRequest] = collections.deque(maxlen=history)
        """The last ``history`` requests handled (diagnostics, tests)."""
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.bytes_by_kind: dict[str, int] = dict.fromkeys(STREAM_KINDS, 0)
        """Block bytes served per :func:`stream_kind` (only this worker thread writes it)."""
        self.dropped_requests = 0
        self.max_unacked_bytes = max_unacked_bytes
        self._unacked: collections.deque[tuple[PendingPublish, int]] = collections.deque()
        self._unacked_bytes = 0

    # -- lifecycle --
    def start(self) -> BlockServer:
        if self._worker is not None:
            return self
        self._worker = threading.Thread(target=self._work, name="block-server", daemon=True)
        self._worker.start()
        self.connection.subscribe(self.topic_filter, self._on_request, qos=1)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._worker is None:
            return
        self.connection.unsubscribe(self.topic_filter)
        self._queue.put(None)
        self._worker.join(timeout)
        self._worker = None

    def __enter__(self) -> BlockServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- network thread: parse and queue only --
    def _on_request(self, message: ReceivedMessage) -> None:
        where = parse_device_topic(message.topic, self.prefix)
        request = parse_message(BLOCK_REQUEST, message.payload)
        assert isinstance(request, BlockRequest)
        key = (where.fleet, where.device, request.stream)
        with self._waiting_lock:
            if key in self._waiting:
                self._waiting[key] = request
                self.coalesced_requests += 1
                return
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                self._dropped(where.fleet, where.device)
                return
            self._waiting[key] = request

    def _dropped(self, fleet: str, device: str) -> None:
        """Count a request refused for a full queue; say so at most once per 10 s (one line per drop
        would cost the network thread most of its time exactly when it has none to spare)."""
        self.dropped_requests += 1
        self._drops_unlogged += 1
        now = self.clock()
        if now - self._drop_logged_at >= 10.0:
            log.warning("block server busy: dropped %d request(s) since the last such line, the last from %s/%s "
                        "(devices ask again)", self._drops_unlogged, fleet, device)
            self._drops_unlogged = 0
            self._drop_logged_at = now

    # -- worker --
    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._waiting_lock:
                request = self._waiting.pop(key)
            try:
                self.serve(key[0], key[1], request)
            except Exception:  # one bad request must not end the block server's worker (logged)
                log.exception("block server failed on a request from %s/%s", key[0], key[1])

    def _etag(self, path: Path, stat: os.stat_result) -> str:
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = self._etags.get(path)
        if known is None or known[0] != key:
            digest = hashlib.sha256(f"{path}:{key}".encode()).hexdigest()[:24]
            self._etags[path] = (key, digest)
            return digest
        return known[1]

    def serve(self, fleet: str, device: str, request: BlockRequest) -> ServedRequest:
        """Answer one request (called on the worker thread; public for tests and benchmarks)."""
        reply_topic = device_topic(fleet, device, BLOCK_DATA, self.prefix)
        now = self.clock()
        wanted = tuple(request.wanted())

        def record(served: tuple[int, ...], outcome: str) -> ServedRequest:
            entry = ServedRequest(time.time(), fleet, device, request.stream, wanted, served, outcome)
            self.log.append(entry)
            return entry

        path = resolve_stream(self.root, request.stream)
        if path is None:
            self._reply(reply_topic, BlockError(request.request_id, request.stream, 404, "no such file"))
            return record((), "not-found")
        try:
            handle = open(path, "rb")
        except OSError as exc:
            self._reply(reply_topic, BlockError(request.request_id, request.stream, 404, f"unreadable: {exc.strerror}"))
            return record((), "not-found")
        with handle:
            stat = os.fstat(handle.fileno())
            etag = self._etag(path, stat)
            size, block_size = stat.st_size, request.block_size
            if request.bitmap is None:
                self._reply(reply_topic, BlockInfo(request.request_id, request.stream, size, block_size, etag))
                return record((), "info")
            total = blocks_in(size, block_size)
            indexes = [i for i in wanted if i < total][: self.max_blocks]
            bucket = self._buckets.get((fleet, device))
            if bucket is None:
                bucket = self._buckets[(fleet, device)] = TokenBucket(self.rate, self.burst, updated=now)
            served: list[int] = []
            kind = stream_kind(request.stream)
            for index in indexes:
                length = min(block_size, size - index * block_size)
                if not bucket.take(max(length, 1), self.clock()):
                    retry = bucket.wait_s(block_size, self.clock())
                    self._reply(reply_topic, BlockError(
                        request.request_id, request.stream, 429,
                        f"rate limited after {len(served)} of {len(indexes)} blocks", round(retry + 0.0005, 3)))
                    return record(tuple(served), "rate-limited")
                handle.seek(index * block_size)
                data = handle.read(length) if length > 0 else b""
                if len(data) != max(length, 0):  # the file shrank under us
                    self._reply(reply_topic, BlockError(request.request_id, request.stream, 404, "file changed"))
                    return record(tuple(served), "not-found")
                self._throttle()
                pending = self._reply(reply_topic, BlockData(request.request_id, request.stream, index,
                                                             block_size, size, data, etag))
                if pending is not None:
                    self._unacked.append((pending, len(data)))
                    self._unacked_bytes += len(data)
                served.append(index)
                self.blocks_sent += 1
                self.bytes_sent += len(data)
                self.bytes_by_kind[kind] += len(data)
            return record(tuple(served), "blocks")

    def _throttle(self) -> None:
        """Back-pressure: at most ``max_unacked_bytes`` of blocks the broker has not acknowledged.

        Waiting on the oldest unacknowledged block (acks come back in order) keeps the
        pipe full; waiting on every request instead would cost one broker round trip per
        request, and a broker with Nagle's algorithm on delays small acks by tens of ms.
        """
        while self._unacked and (self._unacked[0][0].done() or self._unacked_bytes > self.max_unacked_bytes):
            pending, length = self._unacked.popleft()
            self._unacked_bytes -= length
            if pending.acknowledged:
                continue
            try:
                if not self.publisher.is_connected:
                    raise TransportError("connection to the broker is down")
                pending.wait(30.0)
            except TransportError as exc:
                # the broker is gone or stuck: stop waiting on any of it (paho re-sends what it
                # holds after a reconnect, and devices ask again for what they miss)
                log.warning("block server: %s; not waiting for %d unacknowledged blocks", exc, len(self._unacked))
                self._unacked.clear()
                self._unacked_bytes = 0

    def _reply(self, topic: str, reply: BlockReply) -> PendingPublish | None:
        try:
            return self.publisher.publish(topic, encode_block_reply(reply), qos=self.qos, wait=False)
        except TransportError as exc:
            log.warning("block reply to %s not delivered: %s (the device will ask again)", topic, exc)
            return None
