"""Latency histograms with fixed buckets, the same on every device, so the
controller can merge them across a fleet and read fleet-wide quantiles.

Pure data: the agent observes into one on the request path (an index lookup and
an increment), reports it, and the controller merges and compares them.
"""

from __future__ import annotations

__all__ = ["LATENCY_BUCKETS_MS", "LatencyHistogram"]

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0,
    75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0,
)
"""Upper bounds (ms, inclusive) of the buckets; a last, open bucket holds the rest."""


@dataclass
class LatencyHistogram:
    """Counts per fixed bucket (len(LATENCY_BUCKETS_MS) + 1 counts), plus sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    total_ms: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, latency_ms: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self.total_ms += latency_ms

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """A new histogram holding both (bucket bounds are fixed, so this is exact)."""
        return LatencyHistogram([a + b for a, b in zip(self.counts, other.counts)], self.total_ms + other.total_ms)

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        result = cls()
        for histogram in histograms:
            result = result.merge(histogram)
        return result

    def mean_ms(self) -> float | None:
        return self.total_ms / self.count if self.count else None

    def quantile_ms(self, q: float) -> float | None:
        """The q-quantile (0..1), linearly interpolated inside its bucket; None if empty.

        Resolution is the bucket width: good enough to compare versions, which is
        what rollout health gates do.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index, bucket_count in enumerate(self.counts):
            if bucket_count and seen + bucket_count >= rank:
                lower = LATENCY_BUCKETS_MS[index - 1] if index > 0 else 0.0
                upper = LATENCY_BUCKETS_MS[index] if index < len(LATENCY_BUCKETS_MS) else LATENCY_BUCKETS_MS[-1] * 2
                return lower + (upper - lower) * max(0.0, rank - seen) / bucket_count
            seen += bucket_count
        return LATENCY_BUCKETS_MS[-1] * 2  # pragma: no cover - unreachable

    def to_dict(self) -> dict[str, Any]:
        return {"buckets_ms": list(LATENCY_BUCKETS_MS), "counts": list(self.counts), "sum_ms": self.total_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyHistogram:
        """Rebuild from to_dict(); refuses histograms with other buckets (ValueError)."""
        buckets = [float(b) for b in data.get("buckets_ms", LATENCY_BUCKETS_MS)]
        counts = list(data["counts"])
        if tuple(buckets) != LATENCY_BUCKETS_MS or len(counts) != len(LATENCY_BUCKETS_MS) + 1:
            raise ValueError("latency histogram with unknown bucket bounds")
        # counts arrive from devices: whole numbers a counter can hold, no 1.5, true or 1e300
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 2**63 for c in counts):
            raise ValueError("latency histogram counts must be whole numbers in [0, 2^63)")
        total = data.get("sum_ms", 0.0)
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total < math.inf:
            raise ValueError("latency histogram sum_ms must be a finite number >= 0")
        return cls(counts, float(total))
