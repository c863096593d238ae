"""The model slot holder: one loaded model serves, a hot swap replaces it.

A swap never drops a request: the new runner is loaded and warmed *before* it is
published, the switch is a single reference assignment, and a request that
already took the old model finishes on it (the old runner is released only when
the last in-flight request drops its reference). Each loaded model carries its
own statistics, so probation compares the new model with the one it replaced.
"""

from __future__ import annotations

__all__ = ["LoadedModel", "ModelStats", "NoModelError", "ServingModel", "warm_up"]

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

from .runtimes import ModelRunner


class NoModelError(EdgeshipError):
    """No model is serving yet (nothing installed, or the active one failed to load)."""


_FLUSH_EVERY = 256
_perf_counter = time.perf_counter
_BUCKETS = np.asarray(LATENCY_BUCKETS_MS)


@dataclass
class ModelStats:
    """Counters of one loaded model.

    Cumulative (Prometheus counters never go down); reporters take windows by
    subtracting two ``snapshot()`` results. The request path only appends
    ``(latency, input, output)`` to a short list; every 256 requests (and on each
    snapshot) the list is folded into the counters with a few vectorized numpy
    calls: the latency histogram, NaN/Inf outputs, the output class histogram and
    the input mean, at a fraction of the per-request cost of doing it one by one.
    """

    requests: int = 0
    examples: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    nonfinite: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    classes: dict[int, int] = field(default_factory=dict)
    input_count: int = 0
    input_sum: float = 0.0
    feedback_total: int = 0
    feedback_correct: int = 0
    _pending: deque = field(
        default_factory=deque, repr=False, compare=False
    )  # append/popleft: thread-safe
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(
        self, latency_ms: float, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
    ) -> None:
        """Record one successful prediction (cheap: folded in batches)."""
        pending = self._pending
        pending.append((latency_ms, inputs[0] if inputs else None, outputs[0] if outputs else None))
        if len(pending) >= _FLUSH_EVERY:
            with self._lock:
                self._flush()

    def _flush(self) -> None:
        """Fold pending observations into the counters (caller holds the lock).

        Vectorized: a handful of numpy calls per batch, whatever its size; per-item
        Python work is limited to unzipping the tuples.
        """
        queue = self._pending
        count = len(queue)  # later appends wait for the next flush
        if not count:
            return
        latencies, inputs, outputs = zip(*[queue.popleft() for _ in range(count)])
        lat = np.array(latencies, dtype=np.float64)
        counts = np.bincount(np.searchsorted(_BUCKETS, lat, side="left"), minlength=len(self.latency.counts))
        self.latency.counts = [a + b for a, b in zip(self.latency.counts, counts.tolist())]
        self.latency.total_ms += float(lat.sum())
        self.requests += count
        self._fold_outputs([o for o in outputs if o is not None and o.ndim])
        self._fold_inputs([x for x in inputs if x is not None and x.ndim and x.size])

    def _fold_outputs(self, outputs: list[np.ndarray]) -> None:
        if not outputs:
            return
        try:
            stacked = np.concatenate(outputs)
        except ValueError:  # outputs of different shapes (a dynamic model): one by one
            for o in outputs:
                self._fold_outputs_same([o], o)
            return
        self._fold_outputs_same(outputs, stacked)

    def _fold_outputs_same(self, outputs: list[np.ndarray], stacked: np.ndarray) -> None:
        self.examples += len(stacked)
        if stacked.dtype.kind == "f":
            rows_ok = np.isfinite(stacked.reshape(len(stacked), -1)).all(axis=1)
            if not rows_ok.all():  # count requests with at least one non-finite row
                sizes = np.array([len(o) for o in outputs])
                owners = np.searchsorted(np.cumsum(sizes), np.flatnonzero(~rows_ok), side="right")
                self.nonfinite += int(np.unique(owners).size)
                stacked = stacked[rows_ok]
        if stacked.ndim == 2 and stacked.shape[1] > 1 and len(stacked):
            classes = np.bincount(np.argmax(stacked, axis=1))
            for c in np.flatnonzero(classes).tolist():
                self.classes[c] = self.classes.get(c, 0) + int(classes[c])

    def _fold_inputs(self, inputs: list[np.ndarray]) -> None:
        """Per example (batch row): the mean of its values, summed (drift)."""
        if not inputs:
            return
        try:
            rows = np.concatenate(inputs)
        except ValueError:
            for x in inputs:
                self._fold_rows(x)
            return
        self._fold_rows(rows)

    def _fold_rows(self, rows: np.ndarray) -> None:
        self.input_count += len(rows)
        self.input_sum += float(rows.reshape(len(rows), -1).mean(axis=1, dtype=np.float64).sum())

    def error(self, kind: str) -> None:
        with self._lock:
            self.requests += 1
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def feedback(self, correct: int, total: int) -> None:
        with self._lock:
            self.feedback_correct += correct
            self.feedback_total += total

    @property
    def model_errors(self) -> int:
        """Failures that count against the model (not the caller's bad requests)."""
        return sum(v for k, v in self.errors.items() if k != "bad_request")

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counters (plain data)."""
        with self._lock:
            self._flush()
            return {
                "requests": self.requests,
                "examples": self.examples,
                "errors": dict(self.errors),
                "model_errors": self.model_errors,
                "nonfinite": self.nonfinite,
                "latency": LatencyHistogram(list(self.latency.counts), self.latency.total_ms),
                "classes": dict(self.classes),
                "input_count": self.input_count,
                "input_sum": self.input_sum,
                "feedback": {"correct": self.feedback_correct, "total": self.feedback_total},
            }


@dataclass
class LoadedModel:
    """A runner with the bundle it came from and its own statistics."""

    name: str
    version: str
    runner: ModelRunner
    slot: str = ""
    loaded_at: float = field(default_factory=time.time)
    stats: ModelStats = field(default_factory=ModelStats)
    golden_input_mean: float | None = None
    golden_input_std: float | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def warm_up(runner: ModelRunner, inputs: Sequence[np.ndarray] | None = None, runs: int = 3) -> None:
    """Run the model a few times so the first real request pays no first-invoke cost."""
    if inputs is None:
        inputs = [
            np.zeros(
                [1 if d in (-1, 0) or i == 0 else d for i, d in enumerate(spec.shape)],
                dtype=np.float32,
            )
            for spec in runner.signature.inputs
        ]
    for _ in range(runs):
        runner.run(inputs)


class ServingModel:
    """Holds the model that serves; ``predict`` is safe from many threads."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        self.swaps = 0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        """Publish ``new`` (already loaded and warmed) and return the model it replaced.

        Requests that already hold the old model finish on it; it is freed when
        the last of them returns (reference counting), never closed under them.
        """
        with self._swap_lock:
            old, self._current = self._current, new
            self.swaps += 1
        return old

    def predict(
        self, inputs: Sequence[np.ndarray], model: LoadedModel | None = None
    ) -> tuple[LoadedModel, list[np.ndarray]]:
        """Run the serving model (or ``model``, the one a request already resolved);
        errors are counted by kind and re-raised."""
        if model is None:
            model = self._current  # one atomic read: this request finishes on this model
        if model is None:
            raise NoModelError(
                "no model is serving (install one with `edgeship-agent install PACKAGE`)"
            )
        start = _perf_counter()
        try:
            outputs = model.runner.run(inputs)
        except BadInputError:
            model.stats.error("bad_request")
            raise
        except Exception:
            model.stats.error("runtime")
            raise
        latency_ms = (_perf_counter() - start) * 1000.0
        stats = model.stats  # ModelStats.observe, inlined: this is the per-request cost
        pending = stats._pending
        pending.append((latency_ms, inputs[0] if inputs else None, outputs[0] if outputs else None))
        if len(pending) >= _FLUSH_EVERY:
            with stats._lock:
                stats._flush()
        return model, outputs
