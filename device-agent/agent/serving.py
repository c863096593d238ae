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
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

from .runtimes import ModelRunner


class NoModelError(EdgeshipError):
    """No model is serving yet (nothing installed, or the active one failed to load)."""


_FLUSH_MAX = 4096
"""Requests folded at most per batch (the fold's fixed cost is shared by this many)."""
_FLUSH_BYTES = 8 << 20
"""...and at most this many bytes of held outputs (a segmentation model folds more often)."""
_SAMPLE_S = 0.01
"""Input statistics (drift) come from at most one request per this many seconds."""
_perf_counter = time.perf_counter
_BUCKETS = np.asarray(LATENCY_BUCKETS_MS)
_NOT_COMPACT = (AttributeError, BufferError, TypeError, ValueError)


@dataclass
class ModelStats:
    """Counters of one loaded model.

    Cumulative (Prometheus counters never go down); reporters take windows by
    subtracting two ``snapshot()`` results.

    What a request pays: its latency goes to an array of doubles and its first
    output's bytes to a byte buffer (no object kept; an output of another size
    than the model's usual one, or of a model with dynamic dimensions after the
    batch, is kept as an array instead). Every so many requests (4,096, fewer
    for large outputs: at most 8 MB held) and on each snapshot the batch is
    folded into the counters with a few vectorized numpy calls. Counts, errors,
    the latency histogram, NaN/Inf outputs and the output class histogram are
    exact (every request). The input statistics for drift are sampled: the first
    request after each 10 ms (so every request while traffic is below 100
    requests/s, and at most ~100 input sums a second above it) and the first
    after each fold; ``input_count`` counts the sampled examples, and ``input_sum /
    input_count`` is the mean input over the sample.
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
    fixed_row_shape: bool = field(default=False, compare=False)
    """Set by LoadedModel: the first output has no dynamic dimension after the
    batch, so outputs of one byte size have one shape (a runner returns one dtype
    per output), and can be kept as bytes."""
    # Per request: its latency (s), then its first output, to _rows (bytes, when it
    # has the learned size _row_nbytes) or to _outputs. Appends, extends and `del
    # x[:n]` are atomic (C code under the GIL); a fold takes from the front what is
    # there, later appends wait for the next fold.
    _latencies: array = field(default_factory=lambda: array("d"), repr=False, compare=False)
    _outputs: list = field(default_factory=list, repr=False, compare=False)
    _rows: bytearray = field(default_factory=bytearray, repr=False, compare=False)
    _row_nbytes: int = field(default=-1, repr=False, compare=False)  # -1: not learned yet
    _row_dtype: Any = field(default=None, repr=False, compare=False)
    _row_shape: tuple[int, ...] = field(default=(), repr=False, compare=False)
    # (examples, sum of their per-example input means) per sampled request
    _samples: list = field(default_factory=list, repr=False, compare=False)
    _next_sample: float = field(default=0.0, repr=False, compare=False)
    _flush_at: int = field(default=1, repr=False, compare=False)  # learns the output size first
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(
        self, latency_ms: float, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
    ) -> None:
        """Record one successful prediction (``ServingModel.predict`` does the same inline)."""
        now = _perf_counter()
        self._latencies.append(latency_ms / 1000.0)
        y: Any = outputs[0] if outputs else None
        try:
            if y.nbytes == self._row_nbytes:
                self._rows.extend(y)  # the buffer's bytes; fails whole, before writing
            else:
                self._outputs.append(y)
        except _NOT_COMPACT:  # None, not an array, not contiguous
            self._outputs.append(y)
        if now >= self._next_sample:
            self._sample(now, inputs)

    def _sample(self, now: float, inputs: Sequence[np.ndarray]) -> None:
        """Off the common path (at most ~100 times a second): take this request's
        input statistics and fold the batch when it is due. Races between threads
        here are benign (at worst two samples in one period)."""
        self._next_sample = now + _SAMPLE_S
        if inputs:
            try:
                x = np.asarray(inputs[0])
                if x.ndim and x.size:
                    rows = len(x)
                    if x.dtype.kind == "f" and x.dtype.itemsize < 4:
                        total = float(x.sum(dtype=np.float32))  # float16 would overflow
                    else:
                        total = float(x.sum())  # pairwise (floats) or int64 sums
                    # sum over rows of each row's mean; rows are equally long
                    self._samples.append((rows, total * rows / x.size))
            except (TypeError, ValueError):  # not numeric: no input statistics
                pass
        if len(self._latencies) >= self._flush_at:
            with self._lock:
                self._flush()

    def _flush(self) -> None:
        """Fold pending observations into the counters (caller holds the lock).

        Vectorized: a handful of numpy calls per batch, whatever its size. A
        request appends its latency before its output: one still between the two
        has its latency counted now and its output at the next fold.
        """
        count = len(self._latencies)
        if count:
            seconds = self._latencies[:count]  # a copy: the live array must stay resizable
            del self._latencies[:count]
            lat = np.frombuffer(seconds, dtype=np.float64) * 1000.0
            counts = np.bincount(
                np.searchsorted(_BUCKETS, lat, side="left"), minlength=len(self.latency.counts)
            )
            self.latency.counts = [a + b for a, b in zip(self.latency.counts, counts.tolist())]
            self.latency.total_ms += float(lat.sum())
            self.requests += count
        size = len(self._rows)  # whole outputs: each extend is atomic
        if size:
            data = self._rows[:size]
            del self._rows[:size]
            per = self._row_shape[0]  # rows (examples) per request
            stacked = np.frombuffer(data, dtype=self._row_dtype)
            self._fold_stacked(stacked.reshape((size // self._row_nbytes * per, *self._row_shape[1:])), per)
        count = len(self._outputs)
        if count:
            outputs = self._outputs[:count]
            del self._outputs[:count]
            self._fold_outputs(outputs)
            first = outputs[0]
            if isinstance(first, np.ndarray):
                if self._row_nbytes < 0 and self.fixed_row_shape and first.ndim and len(first) \
                        and first.flags.c_contiguous and first.dtype.kind in "biuf":
                    self._row_dtype, self._row_shape = first.dtype, first.shape
                    self._row_nbytes = first.nbytes  # last: from now on the request path uses it
                self._flush_at = max(1, min(_FLUSH_MAX, _FLUSH_BYTES // max(first.nbytes, 1)))
        self._next_sample = 0.0  # the next request is sampled: every window with traffic has one
        samples = self._samples
        count = len(samples)
        if count:
            batch = samples[:count]
            del samples[:count]
            for rows, total in batch:
                self.input_count += rows
                self.input_sum += total

    def _fold_outputs(self, outputs: list[Any]) -> None:
        stacked = self._joined(outputs) if self.fixed_row_shape else None
        if stacked is None:
            outputs = [o for o in outputs if isinstance(o, np.ndarray) and o.ndim]
            if not outputs:
                return
            try:
                stacked = np.concatenate(outputs)
            except ValueError:  # outputs of different shapes (a dynamic model): one by one
                for o in outputs:
                    self._fold_stacked(o, [o])
                return
        self._fold_stacked(stacked, outputs)

    @staticmethod
    def _joined(outputs: list[Any]) -> np.ndarray | None:
        """``np.concatenate(outputs)`` for a model whose output rows have one fixed
        shape, at a quarter of the cost (one ``bytes.join``, no per-array checks),
        or None where that cannot be shown: the bytes must be exactly the rows
        times the first output's row size, else the careful way decides."""
        first = outputs[0]
        try:
            rows = sum(map(len, outputs))  # TypeError for None or a 0-d array
            joined = b"".join(outputs)  # TypeError for a non-contiguous array
            rowbytes = first.nbytes // len(first)  # ZeroDivisionError for an empty batch
        except (TypeError, ValueError, BufferError, ZeroDivisionError, AttributeError):
            return None
        if len(joined) != rows * rowbytes or not first.flags.c_contiguous:
            return None
        return np.frombuffer(joined, dtype=first.dtype).reshape((rows, *first.shape[1:]))

    def _fold_stacked(self, stacked: np.ndarray, sizes: int | list[np.ndarray]) -> None:
        """Fold rows of outputs; ``sizes``: rows per request (one number for all),
        or the requests' outputs (to tell which request a row came from)."""
        self.examples += len(stacked)
        if stacked.dtype.kind == "f" and not np.isfinite(stacked).all():
            rows_ok = np.isfinite(stacked.reshape(len(stacked), -1)).all(axis=1)
            bad = np.flatnonzero(~rows_ok)  # count requests with at least one non-finite row
            if isinstance(sizes, int):
                owners = bad // max(sizes, 1)
            else:
                ends = np.cumsum([len(o) for o in sizes])
                owners = np.searchsorted(ends, bad, side="right")
            self.nonfinite += int(np.unique(owners).size)
            stacked = stacked[rows_ok]
        if stacked.ndim == 2 and stacked.shape[1] > 1 and len(stacked):
            classes = np.bincount(np.argmax(stacked, axis=1))
            for c in np.flatnonzero(classes).tolist():
                self.classes[c] = self.classes.get(c, 0) + int(classes[c])

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
    run: Callable[[Sequence[np.ndarray]], list[np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.run = self.runner.run  # bound once: the request path calls it directly
        try:  # no dynamic dimension after the batch: outputs join as bytes
            shape = self.runner.signature.outputs[0].shape
            self.stats.fixed_row_shape = len(shape) >= 1 and all(d >= 0 for d in shape[1:])
        except (AttributeError, IndexError, TypeError):
            self.stats.fixed_row_shape = False

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
            outputs = model.run(inputs)
        except BadInputError:
            model.stats.error("bad_request")
            raise
        except Exception:
            model.stats.error("runtime")
            raise
        end = _perf_counter()
        stats = model.stats  # ModelStats.observe, inlined: this is the per-request cost
        stats._latencies.append(end - start)
        y: Any = outputs[0] if outputs else None
        try:
            if y.nbytes == stats._row_nbytes:
                stats._rows.extend(y)  # a copy of its bytes: no reference kept
            else:
                stats._outputs.append(y)
        except _NOT_COMPACT:  # None, not an array, not contiguous
            stats._outputs.append(y)
        if end >= stats._next_sample:  # at most every 10 ms
            stats._sample(end, inputs)
        return model, outputs
