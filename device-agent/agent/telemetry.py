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

from edgeship.ota.prometheus import Exposition, latency_seconds
from edgeship.ota.protocol import TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram

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
    ``serving_version`` (the number clients address).

    ``extra`` adds one family per key (``edgeship_<key>``): a counter where the key ends in
    ``_total``, else a gauge.
    """
    page = Exposition()
    loaded = [({"model": m.name, "version": m.version, "serving_version": str(m.serving_version)}, m,
               m.stats.snapshot()) for m in _loaded(source)]
    if loaded:
        def each(key: Callable[[dict[str, Any]], float]) -> list[tuple[dict[str, str], float]]:
            return [(base, key(snap)) for base, _, snap in loaded]

        page.counter("edgeship_predict_requests_total", "Predict requests served by the model version.",
                     each(lambda snap: snap["requests"]))
        page.counter("edgeship_predict_examples_total", "Examples (batch rows) predicted.",
                     each(lambda snap: snap["examples"]))
        page.counter("edgeship_predict_errors_total", "Failed predict requests by kind.",
                     [sample for base, _, snap in loaded
                      for sample in ([({**base, "kind": k}, v) for k, v in sorted(snap["errors"].items())]
                                     or [({**base, "kind": "runtime"}, 0)])])
        page.counter("edgeship_predict_nonfinite_total",
                     "Predictions with NaN or Inf outputs from finite inputs (the model's failures).",
                     each(lambda snap: snap["nonfinite"]))
        page.counter("edgeship_predict_nonfinite_input_total",
                     "Predictions with NaN or Inf outputs whose inputs held NaN or Inf (the caller's; never a rollback).",
                     each(lambda snap: snap["nonfinite_input"]))
        page.counter("edgeship_predict_caller_errors_total",
                     "Predict requests refused as the caller's mistake (HTTP 4xx; never a rollback).",
                     each(lambda snap: snap["caller_errors"]))
        page.counter("edgeship_predict_model_failures_total",
                     "Requests the model failed on valid input: runtime errors and non-finite outputs from finite inputs.",
                     each(lambda snap: snap["model_errors"] + snap["nonfinite"]))
        page.histogram("edgeship_predict_latency_seconds", "Predict latency in the model runtime.",
                       [(base, latency_seconds(snap["latency"])) for base, _, snap in loaded])
        page.counter("edgeship_predict_class_total", "Predicted classes (argmax of the first output).",
                     [({**base, "class": c}, n) for base, _, snap in loaded for c, n in sorted(snap["classes"].items())])
        page.counter("edgeship_feedback_total", "Ground-truth labels received.",
                     each(lambda snap: snap["feedback"]["total"]))
        page.counter("edgeship_feedback_correct_total", "Ground-truth labels that matched the prediction.",
                     each(lambda snap: snap["feedback"]["correct"]))
        sampled = [(base, snap["input_sum"] / snap["input_count"]) for base, _, snap in loaded if snap["input_count"]]
        if sampled:
            page.gauge("edgeship_input_mean",
                       "Mean input value per example over sampled requests (drift; docs/agent.md).", sampled)
        page.gauge("edgeship_model_loaded_timestamp_seconds", "When the model version was loaded.",
                   [(base, m.loaded_at) for base, m, _ in loaded])
        footprints = [(base, float(m.footprint_bytes)) for base, m, _ in loaded if m.footprint_bytes]
        if footprints:
            page.gauge("edgeship_model_footprint_bytes",
                       "Resident memory the model version added when it was loaded (the memory budget's measure).",
                       footprints)
    page.counter("edgeship_model_swaps_total", "Hot swaps of the serving models.", [({}, _swaps(source))])
    page.counter("process_cpu_seconds_total", "User and system CPU time of the agent.",
                 [({}, process_cpu_seconds())])
    page.gauge("process_resident_memory_bytes", "Resident memory of the agent.", [({}, process_rss_bytes())])
    page.gauge("edgeship_disk_free_bytes", "Free bytes on the data folder's filesystem.",
               [({}, free_disk_bytes(data_dir))])
    temps = device_temperatures_c()
    if temps:
        page.gauge("edgeship_device_temperature_celsius", "Board thermal zones.",
                   [({"zone": k}, v) for k, v in temps.items()])
    for key, value in sorted((extra or {}).items()):
        kind = "counter" if key.endswith("_total") else "gauge"
        page.family(f"edgeship_{key}", kind, key.replace("_", " ") + ".", [({}, float(value))])
    return page.text()


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
