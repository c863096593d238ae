"""Telemetry: process and device readings, the Prometheus ``/metrics`` page and
the windowed snapshot handed to the reporter (``TelemetryMessage`` shape).

Request counters live on each loaded model (``serving.ModelStats``); this module
only reads them. Readings come from ``/proc`` and ``/sys`` directly (no psutil
needed): process CPU seconds and RSS, the board's thermal zones where it has
them, free disk on the data folder.
"""

from __future__ import annotations

__all__ = [
    "TelemetryWindow",
    "device_temperatures_c",
    "drift_score",
    "free_disk_bytes",
    "process_cpu_seconds",
    "process_rss_bytes",
    "render_prometheus",
]

import glob
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeship.ota.protocol import TelemetryMessage
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

from .servables import Servables
from .serving import LoadedModel, ServingModel, model_health
from .slots import free_bytes

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def process_rss_bytes() -> int:
    """Resident set size now (``/proc/self/statm``), or the peak where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):  # pragma: no cover - non-Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_temperatures_c(root: str = "/sys/class/thermal") -> dict[str, float]:
    """Thermal zone type -> degrees Celsius, where the board exposes them (Pi, Jetson)."""
    found: dict[str, float] = {}
    for zone in sorted(glob.glob(os.path.join(root, "thermal_zone*"))):
        try:
            raw = Path(zone, "temp").read_text().strip()
            kind = Path(zone, "type").read_text().strip() or os.path.basename(zone)
            found[kind] = int(raw) / 1000.0
        except (OSError, ValueError):
            continue
    return found


def free_disk_bytes(folder: Path) -> int:
    """slots.free_bytes, or 0 where the folder cannot be looked at (a gauge never fails)."""
    try:
        return free_bytes(folder)
    except OSError:
        return 0


def drift_score(
    input_mean: float, golden_mean: float | None, golden_std: float | None
) -> float | None:
    """How far the window's mean input lies from the bundle's golden inputs, in
    golden standard deviations (None without golden vectors or traffic)."""
    if golden_mean is None or not golden_std or not math.isfinite(input_mean):
        return None
    return abs(input_mean - golden_mean) / golden_std


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _loaded(source: ServingModel | Servables) -> list[LoadedModel]:
    """Every loaded model version: one ServingModel's, or every model's (default first)."""
    if isinstance(source, ServingModel):
        return [source.current] if source.current is not None else []
    return [m for versions in source for m in versions.loaded()]


def _swaps(source: ServingModel | Servables) -> int:
    if isinstance(source, ServingModel):
        return source.swaps
    return sum(versions.serving.swaps for versions in source)


def render_prometheus(
    source: ServingModel | Servables, data_dir: Path, extra: dict[str, Any] | None = None
) -> str:
    """The Prometheus text exposition (version 0.0.4) of every loaded model version and the
    process. Every per-model series is labelled ``model``, ``version`` (the bundle's) and
    ``serving_version`` (the number clients address)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:.10g}")

    loaded = [(m, m.stats.snapshot()) for m in _loaded(source)]
    bases = [
        (f'model="{_escape(m.name)}",version="{_escape(m.version)}",serving_version="{m.serving_version}"', m, snap)
        for m, snap in loaded
    ]
    if bases:
        def each(key: Callable[[dict[str, Any]], float]) -> list[tuple[str, float]]:
            return [(f"{{{base}}}", key(snap)) for base, _, snap in bases]

        metric("edgeship_predict_requests_total", "counter", "Predict requests served by the model version.",
               each(lambda snap: snap["requests"]))
        metric("edgeship_predict_examples_total", "counter", "Examples (batch rows) predicted.",
               each(lambda snap: snap["examples"]))
        metric(
            "edgeship_predict_errors_total",
            "counter",
            "Failed predict requests by kind.",
            [
                sample
                for base, _, snap in bases
                for sample in (
                    [(f'{{{base},kind="{_escape(k)}"}}', v) for k, v in sorted(snap["errors"].items())]
                    or [(f'{{{base},kind="runtime"}}', 0)]
                )
            ],
        )
        metric("edgeship_predict_nonfinite_total", "counter",
               "Predictions with NaN or Inf outputs from finite inputs (the model's failures).",
               each(lambda snap: snap["nonfinite"]))
        metric("edgeship_predict_nonfinite_input_total", "counter",
               "Predictions with NaN or Inf outputs whose inputs held NaN or Inf (the caller's; never a rollback).",
               each(lambda snap: snap["nonfinite_input"]))
        metric("edgeship_predict_caller_errors_total", "counter",
               "Predict requests refused as the caller's mistake (HTTP 4xx; never a rollback).",
               each(lambda snap: snap["caller_errors"]))
        metric("edgeship_predict_model_failures_total", "counter",
               "Requests the model failed on valid input: runtime errors and non-finite outputs from finite inputs.",
               each(lambda snap: snap["model_errors"] + snap["nonfinite"]))
        lines.append("# HELP edgeship_predict_latency_seconds Predict latency in the model runtime.")
        lines.append("# TYPE edgeship_predict_latency_seconds histogram")
        for base, _, snap in bases:
            hist: LatencyHistogram = snap["latency"]
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS_MS, hist.counts):
                cumulative += count
                lines.append(f'edgeship_predict_latency_seconds_bucket{{{base},le="{bound / 1000.0:g}"}} {cumulative}')
            lines.append(f'edgeship_predict_latency_seconds_bucket{{{base},le="+Inf"}} {hist.count}')
            lines.append(f"edgeship_predict_latency_seconds_sum{{{base}}} {hist.total_ms / 1000.0:.10g}")
            lines.append(f"edgeship_predict_latency_seconds_count{{{base}}} {hist.count}")
        metric("edgeship_predict_class_total", "counter", "Predicted classes (argmax of the first output).",
               [(f'{{{base},class="{c}"}}', n) for base, _, snap in bases for c, n in sorted(snap["classes"].items())])
        metric("edgeship_feedback_total", "counter", "Ground-truth labels received.",
               each(lambda snap: snap["feedback"]["total"]))
        metric("edgeship_feedback_correct_total", "counter", "Ground-truth labels that matched the prediction.",
               each(lambda snap: snap["feedback"]["correct"]))
        sampled = [(f"{{{base}}}", snap["input_sum"] / snap["input_count"]) for base, _, snap in bases
                   if snap["input_count"]]
        if sampled:
            metric("edgeship_input_mean", "gauge",
                   "Mean input value per example over sampled requests (drift; docs/agent.md).", sampled)
        metric("edgeship_model_loaded_timestamp_seconds", "gauge", "When the model version was loaded.",
               [(f"{{{base}}}", m.loaded_at) for base, m, _ in bases])
        footprints = [(f"{{{base}}}", float(m.footprint_bytes)) for base, m, _ in bases if m.footprint_bytes]
        if footprints:
            metric("edgeship_model_footprint_bytes", "gauge",
                   "Resident memory the model version added when it was loaded (the memory budget's measure).",
                   footprints)
    metric(
        "edgeship_model_swaps_total",
        "counter",
        "Hot swaps of the serving model.",
        [("", _swaps(source))],
    )
    metric(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time of the agent.",
        [("", process_cpu_seconds())],
    )
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the agent.",
        [("", process_rss_bytes())],
    )
    metric(
        "edgeship_disk_free_bytes",
        "gauge",
        "Free bytes on the data folder's filesystem.",
        [("", free_disk_bytes(data_dir))],
    )
    temps = device_temperatures_c()
    if temps:
        metric(
            "edgeship_device_temperature_celsius",
            "gauge",
            "Board thermal zones.",
            [(f'{{zone="{_escape(k)}"}}', v) for k, v in temps.items()],
        )
    for key, value in sorted((extra or {}).items()):
        metric(f"edgeship_{key}", "gauge", key.replace("_", " ") + ".", [("", float(value))])
    return "\n".join(lines) + "\n"


class TelemetryWindow:
    """Turns the cumulative counters into windows for the reporter.

    With several models the document's ``models`` list holds one window per model (its
    serving version); the top-level fields stay those of the first model by name, so a
    controller that reads one model keeps reading something sensible."""

    def __init__(self, source: ServingModel | Servables, data_dir: Path) -> None:
        self.source = source
        self.data_dir = data_dir
        self._last: dict[str, tuple[LoadedModel, dict[str, Any]]] = {}
        self._last_tick = time.monotonic()  # window lengths and rates: never a wall-clock step
        self._last_cpu = process_cpu_seconds()

    def _serving(self) -> list[LoadedModel]:
        if isinstance(self.source, ServingModel):
            return [self.source.current] if self.source.current is not None else []
        return [v.serving.current for v in self.source if v.serving.current is not None]

    def _window(self, model: LoadedModel | None) -> dict[str, Any]:
        """One model's window since the last take (zeros without a model)."""
        snap = model.stats.snapshot() if model is not None else None
        last = self._last.get(model.name) if model is not None else None
        prev = last[1] if last is not None and last[0] is model else None
        if snap is None:
            return {"requests": 0, "errors": 0, "caller_errors": 0, "nonfinite_input": 0,
                    "latency": LatencyHistogram(), "classes": {}, "feedback": {"correct": 0, "total": 0},
                    "mean": float("nan")}
        assert model is not None
        self._last[model.name] = (model, snap)
        # the fleet's error rate is the model's own: failures on valid inputs over
        # the requests it answered on valid inputs (docs/agent.md)
        health = model_health(snap)
        before = model_health(prev) if prev else {"requests": 0, "errors": 0, "nonfinite": 0}
        base = prev["latency"].counts if prev else [0] * len(snap["latency"].counts)
        classes = {c: n - (prev["classes"].get(c, 0) if prev else 0) for c, n in snap["classes"].items()}
        count = snap["input_count"] - (prev["input_count"] if prev else 0)
        total = snap["input_sum"] - (prev["input_sum"] if prev else 0.0)
        return {
            "requests": health["requests"] - before["requests"],
            "errors": (health["errors"] + health["nonfinite"]) - (before["errors"] + before["nonfinite"]),
            "caller_errors": snap["caller_errors"] - (prev["caller_errors"] if prev else 0),
            "nonfinite_input": snap["nonfinite_input"] - (prev["nonfinite_input"] if prev else 0),
            "latency": LatencyHistogram(
                [a - b for a, b in zip(snap["latency"].counts, base)],
                snap["latency"].total_ms - (prev["latency"].total_ms if prev else 0.0),
            ),
            "classes": {c: n for c, n in classes.items() if n},
            "feedback": {k: snap["feedback"][k] - (prev["feedback"][k] if prev else 0) for k in ("correct", "total")},
            "mean": total / count if count else float("nan"),
        }

    @staticmethod
    def _message(now: float, window: float, model: LoadedModel | None, stats: dict[str, Any]) -> dict[str, Any]:
        feedback, mean = stats["feedback"], stats["mean"]
        return TelemetryMessage(
            ts=now,
            window_s=window,
            requests=stats["requests"],
            errors=min(stats["errors"], stats["requests"]),
            latency=stats["latency"],
            bundle={"name": model.name, "version": model.version} if model else None,
            feedback=feedback if feedback["total"] else None,
            drift=drift_score(mean, model.golden_input_mean, model.golden_input_std) if model else None,
        ).to_dict()

    def take(self) -> dict[str, Any]:
        """One window's telemetry: a valid ``TelemetryMessage`` dict plus device readings,
        and ``models``: each serving model's window."""
        now = time.time()  # the report's timestamp
        tick = time.monotonic()
        window = max(tick - self._last_tick, 1e-3)
        serving = self._serving()
        windows = [(m, self._window(m)) for m in serving]
        first, stats = windows[0] if windows else (None, self._window(None))
        document = self._message(now, window, first, stats)
        cpu = process_cpu_seconds()
        mean = stats["mean"]
        document["device_stats"] = {
            "cpu_percent": 100.0 * (cpu - self._last_cpu) / window,
            "rss_bytes": process_rss_bytes(),
            "disk_free_bytes": free_disk_bytes(self.data_dir),
            "temperature_c": device_temperatures_c(),
            "classes": {str(c): n for c, n in sorted(stats["classes"].items())},
            "input_mean": None if math.isnan(mean) else mean,
            "caller_errors": stats["caller_errors"],
            "nonfinite_from_input": stats["nonfinite_input"],
        }
        if not isinstance(self.source, ServingModel):
            document["models"] = [
                {
                    **{k: v for k, v in self._message(now, window, m, w).items() if k not in ("v", "type", "ts")},
                    "name": m.name,
                    "version": m.version,
                    "serving_version": m.serving_version,
                    "caller_errors": w["caller_errors"],
                    "nonfinite_from_input": w["nonfinite_input"],
                }
                for m, w in windows
            ]
        self._last_tick, self._last_cpu = tick, cpu
        return document
