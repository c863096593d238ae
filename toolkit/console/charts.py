"""The console's charts as inline SVG, drawn by pure functions (numbers in, markup out): no
JavaScript chart library, nothing fetched by the browser, and each chart testable as text.

Every number and label put into the markup is escaped or formatted here; callers pass data only.
"""

from __future__ import annotations

__all__ = ["abtest_chart", "latency_histogram_chart", "stage_bars"]

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

# Status colours shared by the stage bars and the legend (also in console.css).
STATUS_COLOURS = {"SUCCEEDED": "#2e7d32", "ALREADY": "#66bb6a", "IN_PROGRESS": "#0288d1", "ASSIGNED": "#4fc3f7",
                  "FAILED": "#c62828", "REJECTED": "#ad1457", "TIMED_OUT": "#f9a825", "ROLLBACK_SENT": "#ef6c00",
                  "NO_PREVIOUS": "#8d6e63", "PENDING": "#cfd8dc", "SKIPPED": "#b0bec5", "CANCELLED": "#90a4ae"}


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(label)}">' + "".join(body) + "</svg>")


def stage_bars(stages: Sequence[dict[str, Any]], width: int = 640) -> str:
    """One bar per stage, filled by its devices' statuses against the stage's target.

    ``stages``: ``rollout_summary(...)["stage_progress"]`` (stage, percent, target, counts).
    """
    row, height = 26, 26 * max(1, len(stages)) + 4
    body: list[str] = []
    label_w, bar_w = 120, width - 120 - 70
    for i, stage in enumerate(stages):
        y = 2 + i * row
        target = max(int(stage.get("target") or 0), 1)
        body.append(f'<text x="0" y="{y + 16}" class="axis">stage {int(stage["stage"])} '
                    f'({escape(format(float(stage["percent"]), "g"))}%)</text>')
        body.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="{row - 8}" fill="#eceff1" />')
        x = float(label_w)
        done = 0
        for status, colour in STATUS_COLOURS.items():
            count = int((stage.get("counts") or {}).get(status, 0))
            if count <= 0:
                continue
            w = bar_w * min(count, target) / target
            body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="{colour}">'
                        f"<title>{escape(status)}: {count}</title></rect>")
            x += w
            done += count
        body.append(f'<text x="{label_w + bar_w + 6}" y="{y + 16}" class="axis">{done}/{int(stage.get("target") or 0)}'
                    "</text>")
    return _svg(width, height, body, "devices per status in each stage")


def latency_histogram_chart(histogram: LatencyHistogram, width: int = 640, height: int = 160) -> str:
    """Requests per fixed latency bucket (the devices' own buckets), as bars."""
    counts = histogram.counts
    top = max(counts) if any(counts) else 1
    n = len(counts)
    bar = (width - 40) / n
    body = [f'<line x1="30" y1="{height - 20}" x2="{width}" y2="{height - 20}" class="axis-line" />']
    for i, count in enumerate(counts):
        h = (height - 30) * count / top
        x = 30 + i * bar
        upper = f"≤ {LATENCY_BUCKETS_MS[i]:g} ms" if i < len(LATENCY_BUCKETS_MS) else f"> {LATENCY_BUCKETS_MS[-1]:g} ms"
        body.append(f'<rect x="{x:.1f}" y="{height - 20 - h:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}" '
                    f'class="bar"><title>{escape(upper)}: {count}</title></rect>')
        if i % 4 == 0 and i < len(LATENCY_BUCKETS_MS):
            body.append(f'<text x="{x:.1f}" y="{height - 5}" class="axis">{LATENCY_BUCKETS_MS[i]:g}</text>')
    body.append(f'<text x="{width - 30}" y="{height - 5}" class="axis">ms</text>')
    return _svg(width, height, body, f"latency histogram of {histogram.count} requests")


def _scale(low: float, high: float, x0: float, x1: float) -> Any:
    span = (high - low) or 1.0
    return lambda v: x0 + (v - low) / span * (x1 - x0)


def abtest_chart(arms: Sequence[dict[str, Any]], unit: str, width: int = 900) -> str:
    """Each arm's samples (dots, for a continuous metric) and mean with its confidence interval.

    ``arms``: dicts with ``label``, ``mean``, ``ci_low``, ``ci_high`` and ``samples`` (may be empty).
    """
    values = [v for arm in arms for v in (arm.get("samples") or []) if v is not None and math.isfinite(v)]
    values += [arm[k] for arm in arms for k in ("mean", "ci_low", "ci_high") if arm.get(k) is not None]
    height = 60 + 50 * len(arms)
    if not values:
        return _svg(width, 40, ['<text x="0" y="24" class="axis">no samples yet</text>'], "no samples yet")
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, abs(high) * 0.05, 1e-9)  # one value, or values a rounding apart, still spread
    x = _scale(low - pad, high + pad, 60, width - 20)
    colours = {"A": "#5c6bc0", "B": "#ef6c00"}
    body: list[str] = []
    for i, arm in enumerate(arms):
        y = 30 + i * 50
        colour = colours.get(str(arm["label"]), "#607d8b")
        body.append(f'<text x="0" y="{y + 4}" class="axis">{escape(str(arm["label"]))}</text>')
        for j, v in enumerate(arm.get("samples") or []):
            if v is None or not math.isfinite(v):
                continue
            jitter = ((j * 7919) % 17 - 8) * 1.2
            body.append(f'<circle cx="{x(v):.1f}" cy="{y + jitter:.1f}" r="2" fill="{colour}" fill-opacity="0.35" />')
        if arm.get("ci_low") is not None and arm.get("ci_high") is not None:
            lo, hi = x(arm["ci_low"]), x(arm["ci_high"])
            body.append(f'<line x1="{lo:.1f}" y1="{y + 16}" x2="{hi:.1f}" y2="{y + 16}" stroke="{colour}" '
                        'stroke-width="3" />')
            for end in (lo, hi):
                body.append(f'<line x1="{end:.1f}" y1="{y + 10}" x2="{end:.1f}" y2="{y + 22}" stroke="{colour}" '
                            'stroke-width="2" />')
        if arm.get("mean") is not None:
            body.append(f'<circle cx="{x(arm["mean"]):.1f}" cy="{y + 16}" r="5" fill="{colour}">'
                        f'<title>{escape(str(arm["label"]))} mean {arm["mean"]:.4g} {escape(unit)}</title></circle>')
    axis_y = height - 18
    body.append(f'<line x1="60" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" class="axis-line" />')
    for k in range(5):
        v = low - pad + (high - low + 2 * pad) * k / 4
        body.append(f'<text x="{x(v) - 10:.1f}" y="{height - 4}" class="axis">{v:.3g}</text>')
    return _svg(width, height, body, "each arm's samples, mean and confidence interval")
