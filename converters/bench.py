"""Host latency measurement: p50/p95/p99, throughput and memory of a loaded model.

Batch-1 latency, the way a device serves requests. Memory is the growth of this
process's resident set from before the model was opened to the highest value
sampled while it ran (``rss_growth_mib``): what loading and running the model
cost, not the interpreter's own accounting.
"""

from __future__ import annotations

__all__ = ["LatencyStats", "fastest", "latency_stats", "measure_latency", "rss_mib", "sample_inputs"]

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelRunner, TensorSpec
from edgeship.ota.errors import BadInputError

from .progress import ProgressCallback, no_progress


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    threads: int | None
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    rss_growth_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(seconds: Sequence[float], threads: int | None, rss_growth_mib: float | None = None) -> LatencyStats:
    """Percentiles of per-call times (pure)."""
    if not len(seconds):
        raise ValueError("no timings")
    ms = np.asarray(seconds, np.float64) * 1000.0
    mean = float(ms.mean())
    return LatencyStats(
        runs=len(ms),
        threads=threads,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=mean,
        throughput_per_s=1000.0 / mean if mean > 0 else float("inf"),
        rss_growth_mib=rss_growth_mib,
    )


def rss_mib() -> float | None:
    """This process's resident set size in MiB (None without psutil)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in every extra that benches
        return None
    return float(psutil.Process().memory_info().rss) / (1 << 20)


def sample_inputs(signature_inputs: Sequence[TensorSpec], seed: int = 0) -> list[np.ndarray]:
    """One batch-1 input per model input (standard normal floats, zero ids), for timing only."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in signature_inputs:
        shape = list(spec.shape)
        if shape and shape[0] == -1:
            shape[0] = 1
        if any(d < 0 for d in shape):
            raise BadInputError(
                f"input '{spec.name}' has dynamic dimensions {list(spec.shape)}; give --data so the shape is known"
            )
        if spec.dtype in ("float32", "float16", "float64") or spec.quantized:
            arrays.append(rng.standard_normal(shape).astype(np.float32))
        else:  # ids and masks: zeros are valid for any embedding or category table
            arrays.append(np.zeros(shape, dtype=np.dtype(spec.dtype)))
    return arrays


def measure_latency(
    runner: ModelRunner,
    inputs: Sequence[np.ndarray],
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    rss_before_mib: float | None = None,
    progress: ProgressCallback | None = None,
    label: str = "benchmarking",
) -> LatencyStats:
    """Time ``runs`` calls of ``runner.run(inputs)`` after ``warmup`` untimed calls."""
    if runs < 1:
        raise BadInputError("--runs must be at least 1")
    report = progress or no_progress
    for _ in range(max(0, warmup)):
        runner.run(inputs)
    peak = rss_mib()
    timings: list[float] = []
    for i in range(runs):
        start = time.perf_counter()
        runner.run(inputs)
        timings.append(time.perf_counter() - start)
        if i % 10 == 0 or i == runs - 1:
            now = rss_mib()
            if now is not None and (peak is None or now > peak):
                peak = now
            report(label, i + 1, runs)
    growth = None if rss_before_mib is None or peak is None else max(0.0, peak - rss_before_mib)
    return latency_stats(timings, threads, growth)


def fastest(p50_by_name: dict[str, float]) -> str | None:
    """The name with the lowest p50 (pure; None when empty)."""
    if not p50_by_name:
        return None
    return min(p50_by_name, key=lambda name: p50_by_name[name])
