"""The Prometheus text exposition format (version 0.0.4), written once for both sides: the agent's
``/metrics`` and the controller's metrics page.

No client library: the format is a few lines of text, both pages are computed at scrape time from
figures the caller already holds, and the agent must stay light. What the format asks, and this
module does so that no caller has to remember it:

- each family once, ``# HELP`` then ``# TYPE`` then its samples (a name written twice is refused);
- label values escape backslash, double quote and newline; HELP text escapes backslash and newline;
- numbers as Prometheus' own Go code writes them: integers exactly, floats in the shortest form
  that reads back to the same value (``1`` not ``1.0``), ``NaN``, ``+Inf``, ``-Inf``;
- histograms as cumulative ``_bucket`` series with a ``+Inf`` bucket, then ``_sum`` and ``_count``;
  summaries as ``quantile`` series, then ``_sum`` and ``_count``.

Names follow Prometheus' conventions (base units, ``_total`` on counters only), which the tests
check with ``promtool check metrics`` over both pages.
"""

from __future__ import annotations

__all__ = [
    "CONTENT_TYPE",
    "Exposition",
    "HistogramSample",
    "SummarySample",
    "escape_help",
    "escape_label_value",
    "format_labels",
    "format_value",
    "latency_seconds",
]

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of a page in this format."""

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_KINDS = ("counter", "gauge", "untyped")

Labels = Mapping[str, object]


def escape_label_value(value: object) -> str:
    """A label value as the format quotes it (``\\``, ``"`` and newline escaped)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text as the format reads it (``\\`` and newline escaped; quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float | None) -> str:
    """A sample value: integers exactly, floats shortest round-trip, ``NaN`` for None (no data)."""
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    text = repr(number)
    return text[:-2] if text.endswith(".0") else text


def format_labels(labels: Labels) -> str:
    """``{a="1",b="x"}`` in the order given, or the empty string without labels."""
    if not labels:
        return ""
    for name in labels:
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"invalid Prometheus label name {name!r}")
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels.items()) + "}"


@dataclass(frozen=True)
class HistogramSample:
    """One histogram series: per-bucket counts (not cumulative), one more than ``bounds`` (the last
    counts what lies above every bound), and the sum of the observed values."""

    bounds: Sequence[float]
    counts: Sequence[int]
    total: float

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"a histogram with {len(self.bounds)} bounds needs {len(self.bounds) + 1} counts")
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError("histogram bounds must ascend")


@dataclass(frozen=True)
class SummarySample:
    """One summary series: (quantile, value) pairs, the sum and the count of the observations."""

    quantiles: Sequence[tuple[float, float | None]]
    total: float
    count: int


def latency_seconds(histogram: LatencyHistogram) -> HistogramSample:
    """The fleet's fixed latency buckets (milliseconds) as a histogram in seconds, the base unit."""
    return HistogramSample(
        tuple(bound / 1000.0 for bound in LATENCY_BUCKETS_MS), tuple(histogram.counts), histogram.total_ms / 1000.0
    )


class Exposition:
    """One page of the text format, written family by family; :meth:`text` is the page."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def _header(self, name: str, kind: str, help_text: str) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid Prometheus metric name {name!r}")
        if name in self._names:
            raise ValueError(f"metric family {name} written twice on one page")
        self._names.add(name)
        self._lines.append(f"# HELP {name} {escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float | None]]) -> None:
        """A counter, gauge or untyped family: one line per (labels, value)."""
        if kind not in _KINDS:
            raise ValueError(f"family kind {kind!r}: histograms and summaries have their own methods")
        self._header(name, kind, help_text)
        self._lines.extend(f"{name}{format_labels(labels)} {format_value(value)}" for labels, value in samples)

    def counter(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float | None]]) -> None:
        self.family(name, "counter", help_text, samples)

    def gauge(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float | None]]) -> None:
        self.family(name, "gauge", help_text, samples)

    def histogram(self, name: str, help_text: str, series: Iterable[tuple[Labels, HistogramSample]]) -> None:
        """Cumulative ``le`` buckets (``+Inf`` last), ``_sum`` and ``_count`` per series."""
        self._header(name, "histogram", help_text)
        for labels, sample in series:
            running = 0
            for bound, count in zip([*sample.bounds, math.inf], sample.counts):
                running += count
                bucket = format_labels({**labels, "le": format_value(bound)})
                self._lines.append(f"{name}_bucket{bucket} {running}")
            self._lines.append(f"{name}_sum{format_labels(labels)} {format_value(sample.total)}")
            self._lines.append(f"{name}_count{format_labels(labels)} {running}")

    def summary(self, name: str, help_text: str, series: Iterable[tuple[Labels, SummarySample]]) -> None:
        """``quantile`` series, ``_sum`` and ``_count`` per series."""
        self._header(name, "summary", help_text)
        for labels, sample in series:
            for quantile, value in sample.quantiles:
                labelled = format_labels({**labels, "quantile": format_value(quantile)})
                self._lines.append(f"{name}{labelled} {format_value(value)}")
            self._lines.append(f"{name}_sum{format_labels(labels)} {format_value(sample.total)}")
            self._lines.append(f"{name}_count{format_labels(labels)} {sample.count}")

    def text(self) -> str:
        """The page: one line per header or sample, newline-terminated."""
        return "\n".join(self._lines) + "\n" if self._lines else ""
