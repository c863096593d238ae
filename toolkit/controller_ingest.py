"""The controller's ingest: what a received MQTT message becomes (``route_message``, pure), and
the writer that batches parsed messages into the store (one transaction per batch, so the store's
cost is paid once per batch, not per message)."""

from __future__ import annotations

__all__ = ["ControllerStats", "IngestWriter", "RateLimitedLog", "RejectedMessage", "route_message"]

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import ReportedMessage, TelemetryMessage, parse_message
from edgeship.ota.topics import DEFAULT_PREFIX, parse_device_topic
from edgeship.toolkit.controller_metrics import INGESTED_KINDS, FleetCounters
from edgeship.toolkit.store import FleetStore, IngestItem

log = logging.getLogger("edgeship.toolkit.controller")

class RejectedMessage(BadInputError):
    """A message the controller does not ingest (why is in the message)."""


def route_message(topic: str, payload: bytes, received_at: float, prefix: str = DEFAULT_PREFIX) -> IngestItem:
    """Turn one received MQTT message into what the store ingests.

    Pure. The topic names the fleet, the device and the kind; the payload must be a valid
    message of that kind (size cap, JSON, schema version, fields). A ``reported`` message names
    its device: it must be the topic's device, or a device could overwrite another's state
    through a topic it is allowed to publish on.

    Raises:
        RejectedMessage: with the reason (the topic or the payload is not acceptable).
    """
    try:
        where = parse_device_topic(topic, prefix)
    except EdgeshipError as exc:
        raise RejectedMessage(f"topic {topic[:120]!r}: {exc.message}") from None
    if where.kind not in INGESTED_KINDS:
        raise RejectedMessage(f"topic {topic[:120]!r}: the controller does not ingest {where.kind!r} messages")
    try:
        message = parse_message(where.kind, payload)
    except EdgeshipError as exc:
        raise RejectedMessage(f"{where.fleet}/{where.device} {where.kind}: {exc.message}") from None
    if isinstance(message, ReportedMessage) and message.device != where.device:
        raise RejectedMessage(f"{where.fleet}/{where.device} reported: the message names device "
                              f"{message.device[:64]!r}, not the topic's {where.device!r}")
    return IngestItem(where.fleet, where.device, message, received_at)


class ControllerStats:
    """Thread-safe counters and gauges the metrics and the tests read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def add(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, key: str, value: float) -> None:
        with self._lock:
            self._values[key] = value

    def max(self, key: str, value: float) -> None:
        with self._lock:
            self._values[key] = max(self._values.get(key, value), value)

    def get(self, key: str, default: float = 0) -> float:
        with self._lock:
            return self._values.get(key, default)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class RateLimitedLog:
    """At most ``burst`` warnings per ``period_s`` per key; the rest only counted (a hostile
    publisher must not be able to fill the disk with our logs)."""

    def __init__(self, burst: int = 10, period_s: float = 10.0) -> None:
        self.burst, self.period_s = burst, period_s
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, text: str) -> None:
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start > self.period_s:
                if count > self.burst:
                    log.warning("%d more %s messages were dropped in the last %.0f s", count - self.burst, key,
                                self.period_s)
                start, count = now, 0
            count += 1
            self._windows[key] = (start, count)
        if count <= self.burst:
            log.warning("dropped %s message: %s", key, text)


STOP = object()


class IngestWriter:
    """A bounded queue of parsed messages and the thread that writes them to the store in batches.

    A batch holds at most ``batch_max`` messages and waits at most ``batch_wait_s`` for more after
    its first one; with ``queue_max`` that bounds the lag."""

    def __init__(self, store: FleetStore, stats: ControllerStats, counters: FleetCounters,
                 clock: Callable[[], float], *, batch_max: int, batch_wait_s: float, queue_max: int) -> None:
        self.store, self.stats, self.fleet_counters, self.clock = store, stats, counters, clock
        self.batch_max, self.batch_wait_s = batch_max, batch_wait_s
        self._queue: queue.Queue[Any] = queue.Queue(queue_max)

    def qsize(self) -> int:
        return self._queue.qsize()

    def put(self, item: IngestItem, *, shed: bool) -> None:
        """Queue ``item``; ``shed``: drop it at once when the queue is full (else wait up to 5 s).

        Raises:
            queue.Full: it was not queued.
        """
        if shed:
            self._queue.put_nowait(item)
        else:
            self._queue.put(item, timeout=5.0)

    def request_stop(self, timeout: float) -> None:
        """After what is queued now is written, the loop returns."""
        try:
            self._queue.put(STOP, timeout=timeout)
        except queue.Full:
            log.error("ingest queue still full at shutdown; %d messages are not written", self._queue.qsize())

    def run(self) -> None:
        while True:
            first = self._queue.get()
            if first is STOP:
                self._queue.task_done()
                return
            batch: list[IngestItem] = [first]
            deadline = time.monotonic() + self.batch_wait_s
            stop_after = False
            while len(batch) < self.batch_max:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is STOP:
                    stop_after = True
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
            self.stats.set("queue_depth", self._queue.qsize())
            if stop_after:
                self._drain_rest()
                return

    def _drain_rest(self) -> None:
        rest: list[IngestItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is not STOP:
                rest.append(item)
        for start in range(0, len(rest), self.batch_max):
            self._write(rest[start:start + self.batch_max])

    def _write(self, batch: list[IngestItem]) -> None:
        """One transaction for the batch; if the store refuses it, retry once, then item by item so
        one poison message (say, a value a PostgreSQL column cannot hold) costs only itself."""
        for attempt in range(2):
            try:
                self.store.ingest(batch)
                self._ingested(batch)
                return
            except Exception as exc:  # noqa: BLE001 - the store's driver errors have no common base worth naming
                if attempt == 0:
                    log.warning("ingest of %d messages failed (%s); retrying", len(batch), str(exc)[:200])
                    time.sleep(0.2)
        written: list[IngestItem] = []
        for item in batch:
            try:
                self.store.ingest([item])
                written.append(item)
            except Exception as exc:  # noqa: BLE001 - as above: one poison message costs only itself
                self.stats.add("ingest_dropped")
                log.error("store refused a %s message of %s/%s: %s", type(item.message).__name__, item.fleet,
                          item.device, str(exc)[:300])
        self._ingested(written)

    def _ingested(self, batch: Sequence[IngestItem]) -> None:
        if not batch:
            return
        lag = self.clock() - min(item.received_at for item in batch)
        self.stats.add("ingested", len(batch))
        for item in batch:
            if isinstance(item.message, TelemetryMessage):
                for m in item.message.models:  # a multi-model device: each model's window
                    self.fleet_counters.add(item.fleet, {"name": m.name, "version": m.version or ""}, m.requests,
                                            m.errors, m.latency)
                if not item.message.models:
                    self.fleet_counters.add(item.fleet, item.message.bundle, item.message.requests,
                                            item.message.errors, item.message.latency)
        self.stats.add("batches")
        self.stats.set("ingest_lag_s", lag)
        self.stats.max("ingest_lag_max_s", lag)
