"""The model slot holder: one loaded model serves, a hot swap replaces it.

A swap never drops a request: the new runner is loaded and warmed *before* it is
published, the switch is a single reference assignment, and a request that
already took the old model finishes on it (the old runner is released only when
the last in-flight request drops its reference). Each loaded model carries its
own statistics, so probation compares the new model with the one it replaced.
"""

from __future__ import annotations

__all__ = ["ModelStats", "LoadedModel", "ServingModel", "NoModelError", "warm_up"]

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.telemetry import LatencyHistogram

from .runtimes import ModelRunner


class NoModelError(EdgeshipError):
    """No model is serving yet (nothing installed, or the active one failed to load)."""


@dataclass
class ModelStats:
    """Counters of one loaded model, updated on the request path under one lock.

    Cumulative (Prometheus counters never go down); reporters take windows by
    subtracting two ``snapshot()`` results.
    """

    requests: int = 0
    examples: int = 0
    errors: dict[str, int] = field(default_factory=dict)   # kind -> count
    nonfinite: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    classes: dict[int, int] = field(default_factory=dict)
    input_count: int = 0
    input_sum: float = 0.0
    input_sumsq: float = 0.0
    feedback_total: int = 0
    feedback_correct: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(self, latency_ms: float, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> bool:
        """Record one successful prediction; returns False if an output is NaN/Inf."""
        first = outputs[0] if outputs else None
        finite = all(bool(np.isfinite(o).all()) for o in outputs if o.dtype.kind == "f")
        batch = int(first.shape[0]) if first is not None and first.ndim else 1
        classes: Any = None
        if first is not None and first.ndim == 2 and first.shape[1] > 1 and finite:
            classes = np.argmax(first, axis=1)
        x = inputs[0] if inputs else None
        mean = float(x.mean()) if x is not None and x.size else 0.0
        meansq = float(np.square(x, dtype=np.float64).mean()) if x is not None and x.size else 0.0
        with self._lock:
            self.requests += 1
            self.examples += batch
            self.latency.observe(latency_ms)
            if not finite:
                self.nonfinite += 1
            if classes is not None:
                for c in classes.tolist():
                    self.classes[c] = self.classes.get(c, 0) + 1
            self.input_count += 1
            self.input_sum += mean
            self.input_sumsq += meansq
        return finite

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
                "input_sumsq": self.input_sumsq,
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
            np.zeros([1 if d in (-1, 0) or i == 0 else d for i, d in enumerate(spec.shape)], dtype=np.float32)
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
            raise NoModelError("no model is serving (install one with `edgeship-agent install PACKAGE`)")
        start = time.perf_counter()
        try:
            outputs = model.runner.run(inputs)
        except BadInputError:
            model.stats.error("bad_request")
            raise
        except Exception:
            model.stats.error("runtime")
            raise
        model.stats.observe((time.perf_counter() - start) * 1000.0, inputs, outputs)
        return model, outputs
