"""The model slot holder: one loaded model serves, a hot swap replaces it.

A swap never drops a request: the new runner is loaded and warmed *before* it is
published, the switch is a single reference assignment, and a request that
already took the old model finishes on it (the old runner is released only when
the last in-flight request drops its reference). Each loaded model carries its
own statistics, so probation compares the new model with the one it replaced.
"""

from __future__ import annotations

__all__ = [
    "LoadedModel",
    "ModelStats",
    "NoModelError",
    "ServingModel",
    "inputs_finite",
    "model_health",
    "run_in_slices",
    "warm_up",
    "zero_inputs",
]

import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

from .runtimes import ModelRunner, ModelSignature


class NoModelError(EdgeshipError):
    """No model is serving yet (nothing installed, or the active one failed to load)."""


_FLUSH_MAX = 4096
"""Requests folded at most per batch (the fold's fixed cost is shared by this many)."""
_FLUSH_BYTES = 8 << 20
"""...and at most this many bytes of held outputs (a segmentation model folds more often)."""
_CHECK_NS = 10_000_000
"""The request path compares its clock with the next check, at most every 10 ms:
is a fold due, is an input sample due."""
_INPUT_SAMPLE_NS = 100_000_000
"""Input statistics (drift) come from at most one request per 100 ms (and the first
after each fold)."""
_clock_ns = time.perf_counter_ns  # an int: cheaper than perf_counter's float on the request path
_BUCKETS_NS = np.asarray([round(b * 1e6) for b in LATENCY_BUCKETS_MS], dtype=np.int64)


@dataclass
class ModelStats:
    """Counters of one loaded model.

    Cumulative (Prometheus counters never go down); reporters take windows by
    subtracting two ``snapshot()`` results.

    What a request pays: two appends, its latency (integer nanoseconds) to an
    array and a reference to its first output to a list. Every so many requests
    (4,096, fewer for large outputs: at most 8 MB held) and on each snapshot the
    batch is folded into the counters with a few vectorized numpy calls, and the
    references are dropped. The statistics count the output arrays as they are at
    the fold: a caller that changes a returned array in place before then (the
    HTTP API never does) changes what is counted. Copying each output's bytes
    instead costs a buffer export per request, about 3% of a digits prediction
    (docs/agent.md). Counts, errors,
    the latency histogram, NaN/Inf outputs and the output class histogram are
    exact (every request). The input statistics for drift are sampled: the first
    request after each 100 ms (so every request while traffic is below 10
    requests/s, and about 10 input sums a second above it) and the first
    after each fold; ``input_count`` counts the sampled examples, and ``input_sum /
    input_count`` is the mean input over the sample.
    """

    requests: int = 0
    examples: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    nonfinite: int = 0
    """Requests whose outputs held NaN/Inf although their inputs were finite: the model's."""
    nonfinite_input: int = 0
    """Requests whose outputs held NaN/Inf and whose inputs did too: the caller's, counted apart."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    classes: dict[int, int] = field(default_factory=dict)
    input_count: int = 0
    input_sum: float = 0.0
    feedback_total: int = 0
    feedback_correct: int = 0
    fixed_row_shape: bool = field(default=False, compare=False)
    """Set by LoadedModel: the first output has no dynamic dimension after the
    batch, so outputs of one byte size have one shape (a runner returns one dtype
    per output), and a fold can join them as bytes."""
    # Per request: its latency (ns), then its first output and its inputs, side by
    # side in one list by one `extend` (atomic: the two stay together under
    # concurrent requests, and a fold splits them with two C-speed slices); the
    # inputs decide, for an output that is not finite, whose fault it was. Appends,
    # extends and `del x[:n]` are atomic (C code under the GIL); a fold takes from
    # the front what is there, later ones wait for the next fold.
    _latencies: array = field(default_factory=lambda: array("q"), repr=False, compare=False)
    _outputs: list = field(default_factory=list, repr=False, compare=False)
    # (examples, sum of their per-example input means) per sampled request
    _samples: list = field(default_factory=list, repr=False, compare=False)
    _next_sample: int = field(default=0, repr=False, compare=False)  # clock_ns of the next check
    _next_input: int = field(default=0, repr=False, compare=False)  # clock_ns of the next input sample
    _flush_at: int = field(default=1, repr=False, compare=False)  # learns the output size first
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(
        self, latency_ms: float, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
    ) -> None:
        """Record one successful prediction."""
        now = _clock_ns()
        self.record(round(latency_ms * 1e6), now, inputs, outputs)

    def record(
        self, latency_ns: int, now: int, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
    ) -> None:
        """Record one successful prediction that ended at ``now`` (clock_ns);
        ``ServingModel.predict``'s inline path does the same without the call."""
        self._latencies.append(latency_ns)
        self._outputs.extend((outputs[0] if outputs else None, inputs))
        if now >= self._next_sample:
            self._sample(now, inputs)

    def _sample(self, now: int, inputs: Sequence[np.ndarray]) -> None:
        """Off the common path (at most ~100 times a second): take this request's
        input statistics and fold the batch when they are due. Races between
        threads here are benign (at worst two samples in one period)."""
        self._next_sample = now + _CHECK_NS
        try:  # the fold's bound follows the sizes seen now: held inputs and outputs stay ~8 MB
            held = sum(x.nbytes for x in inputs if isinstance(x, np.ndarray))
            self._flush_at = max(1, min(self._flush_at, _FLUSH_BYTES // max(held, 1)))
        except TypeError:
            pass
        if inputs and now >= self._next_input:
            self._next_input = now + _INPUT_SAMPLE_NS
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
            nanoseconds = self._latencies[:count]  # a copy: the live array must stay resizable
            del self._latencies[:count]
            lat = np.frombuffer(nanoseconds, dtype=np.int64)
            counts = np.bincount(  # bucket i: latency <= its bound (Prometheus' "le")
                np.searchsorted(_BUCKETS_NS, lat, side="left"), minlength=len(self.latency.counts)
            )
            self.latency.counts = [a + b for a, b in zip(self.latency.counts, counts.tolist())]
            self.latency.total_ms += int(lat.sum()) / 1e6
            self.requests += count
        count = len(self._outputs) & ~1  # whole (output, inputs) pairs
        if count:
            pairs = self._outputs[:count]
            del self._outputs[:count]
            outputs = pairs[0::2]
            inputs = pairs[1::2]
            self._fold_outputs(outputs, inputs)
            first = outputs[0]
            if isinstance(first, np.ndarray):
                held = first.nbytes + sum(x.nbytes for x in inputs[0] if isinstance(x, np.ndarray))
                self._flush_at = max(1, min(_FLUSH_MAX, _FLUSH_BYTES // max(held, 1)))
        self._next_sample = self._next_input = 0  # the next request is sampled: every window with traffic has one
        samples = self._samples
        count = len(samples)
        if count:
            batch = samples[:count]
            del samples[:count]
            for rows, total in batch:
                self.input_count += rows
                self.input_sum += total

    def _fold_outputs(self, outputs: list[Any], inputs: list[Any]) -> None:
        stacked = self._joined(outputs) if self.fixed_row_shape else None
        if stacked is None:
            kept = [(o, i) for o, i in zip(outputs, inputs) if isinstance(o, np.ndarray) and o.ndim]
            if not kept:
                return
            outputs = [o for o, _ in kept]
            inputs = [i for _, i in kept]
            try:
                stacked = np.concatenate(outputs)
            except ValueError:  # outputs of different shapes (a dynamic model): one by one
                for o, i in kept:
                    self._fold_stacked(o, [o], [i])
                return
        self._fold_stacked(stacked, outputs, inputs)

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

    def _fold_stacked(
        self, stacked: np.ndarray, sizes: int | list[np.ndarray], inputs: list[Any] | None = None
    ) -> None:
        """Fold rows of outputs; ``sizes``: rows per request (one number for all),
        or the requests' outputs (to tell which request a row came from);
        ``inputs``: each request's inputs (a non-finite output of a non-finite
        input is the caller's, not the model's)."""
        self.examples += len(stacked)
        if stacked.dtype.kind == "f" and not np.isfinite(stacked).all():
            rows_ok = np.isfinite(stacked.reshape(len(stacked), -1)).all(axis=1)
            bad = np.flatnonzero(~rows_ok)  # count requests with at least one non-finite row
            if isinstance(sizes, int):
                owners = bad // max(sizes, 1)
            else:
                ends = np.cumsum([len(o) for o in sizes])
                owners = np.searchsorted(ends, bad, side="right")
            for owner in np.unique(owners).tolist():
                if inputs is not None and owner < len(inputs) and not inputs_finite(inputs[owner]):
                    self.nonfinite_input += 1
                else:
                    self.nonfinite += 1
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

    @property
    def caller_errors(self) -> int:
        """Requests refused as the caller's mistake (HTTP 4xx)."""
        return self.errors.get("bad_request", 0)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counters (plain data)."""
        with self._lock:
            self._flush()
            return {
                "requests": self.requests,
                "examples": self.examples,
                "errors": dict(self.errors),
                "model_errors": self.model_errors,
                "caller_errors": self.caller_errors,
                "nonfinite": self.nonfinite,
                "nonfinite_input": self.nonfinite_input,
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
    serving_version: int = 0
    """The int64 that only grows per model: what TF Serving and OIP clients address as
    ``/versions/N`` (the bundle's own ``version`` string is still accepted)."""
    loaded_at: float = field(default_factory=time.time)
    footprint_bytes: int | None = None
    """What loading and running it added to the resident set (the memory budget's measure)."""
    stats: ModelStats = field(default_factory=ModelStats)
    golden_input_mean: float | None = None
    golden_input_std: float | None = None
    run: Callable[[Sequence[np.ndarray]], list[np.ndarray]] = field(init=False, repr=False, compare=False)
    hot: tuple[Any, ...] | None = field(init=False, repr=False, compare=False)
    """What ``ServingModel.predict`` needs for a single float tensor in and out,
    bound once: the stats, the runner's ``HotCalls``, and the appends of the
    stats' per-request buffers; None for other models (they go through ``run``).
    It holds nothing that refers back to this object, so an old model is freed
    as soon as its last request returns."""

    def __post_init__(self) -> None:
        self.run = self.runner.run  # bound once: the request path calls it directly
        calls = self.runner.hot_calls()
        stats = self.stats
        self.hot = None if calls is None else (
            stats, *calls, stats._latencies.append, stats._outputs.extend
        )
        try:  # no dynamic dimension after the batch: outputs join as bytes
            shape = self.runner.signature.outputs[0].shape
            self.stats.fixed_row_shape = len(shape) >= 1 and all(d >= 0 for d in shape[1:])
        except (AttributeError, IndexError, TypeError):
            self.stats.fixed_row_shape = False

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def inputs_finite(inputs: Any) -> bool:
    """Whether every float value of a request's inputs is finite (integer and bool
    inputs always are; something that is not an array counts as finite)."""
    try:
        for x in inputs:
            if isinstance(x, np.ndarray) and x.dtype.kind in "fc" and not np.isfinite(x).all():
                return False
    except TypeError:
        return True
    return True


def model_health(snapshot: dict[str, Any]) -> dict[str, int]:
    """What counts against the model, from a ``ModelStats.snapshot()`` (docs/agent.md,
    "What counts against a model"): ``requests`` it answered on valid inputs (not the
    callers' refused requests, nor those whose non-finite output came from a
    non-finite input), its ``errors`` (runtime failures) and its ``nonfinite``
    outputs from finite inputs."""
    valid = snapshot["requests"] - snapshot["caller_errors"] - snapshot["nonfinite_input"]
    return {"requests": max(valid, 0), "errors": snapshot["model_errors"], "nonfinite": snapshot["nonfinite"]}


def zero_inputs(signature: ModelSignature) -> list[np.ndarray]:
    """One example of zeros per input (batch 1, a dynamic dimension as 1), in float32:
    what the runner takes for every model, int8 ones included."""
    return [
        np.zeros([1, *(d if d > 0 else 1 for d in spec.shape[1:])], dtype=np.float32)
        for spec in signature.inputs
    ]


def warm_up(runner: ModelRunner, inputs: Sequence[np.ndarray] | None = None, runs: int = 3) -> None:
    """Run the model a few times so the first real request pays no first-invoke cost."""
    if inputs is None:
        inputs = zero_inputs(runner.signature)
    for _ in range(runs):
        runner.run(inputs)


INVOKE_ROWS = 64
"""Rows per invoke at most: a larger batch runs in slices. A TFLite interpreter
keeps the memory arena of the largest batch it was resized to for good (a
1,024-row digits request held 15 MB after it), so one large request would leave
the agent larger for the rest of its life; slices bound that to INVOKE_ROWS rows."""


def run_in_slices(
    run: Callable[[Sequence[np.ndarray]], list[np.ndarray]], inputs: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """``run(inputs)``, a batch over INVOKE_ROWS as slices of rows joined again. A
    model whose outputs are not one row per input row (rare: a reduction over
    the batch) is run on the whole batch instead."""
    first = inputs[0] if inputs else None
    rows = len(first) if isinstance(first, np.ndarray) and first.ndim else 0
    if rows <= INVOKE_ROWS or any(not isinstance(x, np.ndarray) or x.ndim == 0 or len(x) != rows for x in inputs):
        return run(inputs)
    parts = []
    for begin in range(0, rows, INVOKE_ROWS):
        piece = [x[begin : begin + INVOKE_ROWS] for x in inputs]
        outputs = run(piece)
        if any(getattr(y, "ndim", 0) == 0 or len(y) != len(piece[0]) for y in outputs):
            return run(inputs)
        parts.append(outputs)
    return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]


_CALLER_INDEX_ERRORS = ("index out of bounds", "out of range", "indices")
"""What a runtime says when an index the caller sent is outside a table (TFLite:
"gather index out of bounds"); TF Serving answers such a request 400."""


def _counted_failure(model: LoadedModel, exc: Exception) -> Exception:
    """Count a failed invoke and return what to raise: the caller's fault (400) when
    the model takes integer inputs (token ids, indexes) and the runtime refused an
    index, else the model's runtime error."""
    text = str(exc)
    integer_inputs = any(
        np.dtype(s.dtype).kind in "iu" and not s.quantized for s in model.runner.signature.inputs
    )
    if integer_inputs and any(words in text for words in _CALLER_INDEX_ERRORS):
        model.stats.error("bad_request")
        return BadInputError(f"an input index is out of range for the model ({text.splitlines()[0][:200]})")
    model.stats.error("runtime")
    return exc


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
        errors are counted by kind and re-raised.

        This is the per-request cost, so the common case (one float tensor in and
        out, see ``LoadedModel.hot``) runs the interpreter's calls and
        ``ModelStats.observe`` inline in this one frame; anything else goes through
        the runner's ``run``.
        """
        if model is None:
            model = self._current  # one atomic read: this request finishes on this model
            if model is None:
                raise NoModelError(
                    "no model is serving (install one with `edgeship-agent install PACKAGE`)"
                )
        hot = model.hot
        if hot is not None and len(inputs) == 1:
            (stats, acquire, release, set_tensor, invoke, get_tensor, index, out_index,
             add_latency, add_output) = hot
            start = _clock_ns()
            try:
                acquire()
                try:
                    try:
                        set_tensor(index, inputs[0])
                    except ValueError:
                        y = None  # another dtype or batch size: run() converts or resizes
                    else:
                        invoke()
                        y = get_tensor(out_index)  # a copy: safe to hand out after the lock
                finally:
                    release()
            except Exception as exc:  # noqa: BLE001 - counted by kind, then raised again
                raise _counted_failure(model, exc) from None
            if y is not None:
                end = _clock_ns()
                add_latency(end - start)
                add_output((y, inputs))
                if end >= stats._next_sample:  # at most every 10 ms
                    stats._sample(end, inputs)
                return model, [y]
        start = _clock_ns()
        try:
            outputs = run_in_slices(model.run, inputs)
        except BadInputError:
            model.stats.error("bad_request")
            raise
        except Exception as exc:  # noqa: BLE001 - counted by kind, then raised again
            raise _counted_failure(model, exc) from None
        end = _clock_ns()
        model.stats.record(end - start, end, inputs, outputs)
        return model, outputs
