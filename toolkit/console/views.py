"""What each console page shows: read from the fleet store (the same reads the CLI makes), shaped
into plain dicts, and rendered with Jinja2 (autoescaped templates in ``templates/``).

A page and its ``live`` part (what the browser re-fetches every few seconds) come from the same
function, so the live view can never show something the page would not.
"""

from __future__ import annotations

__all__ = ["FleetFilter", "Page", "abtest_page", "abtests_page", "device_page", "fleet_page", "render",
           "rollout_page", "rollouts_page"]

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram

from . import charts

MAX_DEVICE_ROWS = 500
"""Rows the fleet table shows (the counts above it cover every match): a 10,000-device page would
be megabytes of HTML that nobody reads; filters narrow it."""


@dataclass(frozen=True)
class Page:
    template: str
    title: str
    context: dict[str, Any]


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("edgeship.toolkit.console", "templates"),
                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["ago"] = ago
    env.filters["ms"] = lambda v: "-" if v is None else f"{v:.2f} ms"
    env.filters["pct"] = lambda v: "-" if v is None else f"{v:.2%}"
    env.filters["num"] = lambda v, digits=3: "-" if v is None else f"{v:.{digits}g}"
    env.filters["when"] = lambda v: "-" if not v else datetime.fromtimestamp(v, timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
    return env


_ENV: Any = None


def render(template: str, context: Mapping[str, Any]) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return str(_ENV.get_template(template).render(**context))


def ago(ts: float | None, now: float | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago``; ``never`` for none."""
    if not ts:
        return "never"
    delta = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{int(delta // size)} {unit} ago"
    return f"{int(delta)} s ago"


@dataclass(frozen=True)
class FleetFilter:
    """The fleet page's filters (query parameters); empty strings mean 'any'."""

    fleet: str = ""
    tag: str = ""        # KEY=VALUE
    bundle: str = ""
    version: str = ""
    state: str = ""      # an update state, or "none"
    online: str = ""     # "yes" / "no"

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FleetFilter:
        fields = {name: query.get(name, "").strip()[:128] for name in cls.__dataclass_fields__}
        if fields["online"] not in ("", "yes", "no"):
            raise BadInputError("online: use yes or no")
        if fields["tag"] and "=" not in fields["tag"]:
            raise BadInputError("tag: use KEY=VALUE")
        return cls(**fields)

    def selection(self) -> tuple[tuple[str, str], ...]:
        if not self.tag:
            return ()
        key, _, value = self.tag.partition("=")
        return ((key.strip(), value.strip()),)

    def keeps(self, device: Any) -> bool:
        if self.bundle and device.active_name != self.bundle:
            return False
        if self.version and device.active_version != self.version:
            return False
        if self.state and (device.update_state or "none").upper() != self.state.upper():
            return False
        return not self.online or device.online == (self.online == "yes")

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


def fleet_page(store: Any, flt: FleetFilter) -> Page:
    devices = [d for d in store.list_devices(flt.fleet or None, flt.selection()) if flt.keeps(d)]
    devices.sort(key=lambda d: (d.fleet, d.id))
    versions: dict[str, int] = {}
    states: dict[str, int] = {}
    for d in devices:
        key = f"{d.active_name} {d.active_version}" if d.active_name else "nothing installed"
        versions[key] = versions.get(key, 0) + 1
        state = d.update_state or "none"
        states[state] = states.get(state, 0) + 1
    online = sum(1 for d in devices if d.online)
    return Page("fleet.html", "Fleet", {
        "filter": flt, "devices": devices[:MAX_DEVICE_ROWS], "total": len(devices), "online": online,
        "offline": len(devices) - online, "versions": sorted(versions.items(), key=lambda kv: -kv[1]),
        "states": sorted(states.items()), "fleets": sorted({d.fleet for d in store.list_devices()}),
        "shown": min(len(devices), MAX_DEVICE_ROWS), "now": time.time()})


def device_page(store: Any, device_id: str, window_s: float = 900.0) -> Page:
    info = store.get_device(device_id)  # BadInputError (404) when unknown
    now = time.time()
    per_version = store.device_telemetry(device_id, now - window_s)
    merged = LatencyHistogram.merged(t["latency"] for t in per_version.values())
    versions = [{"name": name, "version": version, "requests": t["requests"], "errors": t["errors"],
                 "error_rate": t["errors"] / t["requests"] if t["requests"] else None,
                 "p95_ms": t["latency"].quantile_ms(0.95), "p50_ms": t["latency"].quantile_ms(0.5)}
                for (name, version), t in sorted(per_version.items())]
    events = store.recent_events(device_id, limit=30)
    desired = store.desired_for(device_id)
    return Page("device.html", f"Device {info.id}", {
        "device": info, "versions": versions, "events": events, "desired": desired, "window_s": window_s,
        "latency_chart": charts.latency_histogram_chart(merged), "requests": merged.count, "now": now})


def rollouts_page(store: Any, fleet: str = "") -> Page:
    rows = store.list_rollouts(fleet or None, None, 200)
    return Page("rollouts.html", "Rollouts", {"rollouts": rows, "fleet": fleet, "now": time.time()})


def rollout_page(store: Any, rollout_id: str) -> Page:
    from edgeship.toolkit.commands.rollout import _load_with_health, rollout_summary

    rollout, health = _load_with_health(store, rollout_id)
    doc = rollout_summary(rollout, health, with_devices=True)
    state = doc["state"]
    operations = {"pause": state == "RUNNING", "resume": state == "PAUSED", "abort": state in ("RUNNING", "PAUSED"),
                  "rollback": state in ("RUNNING", "PAUSED", "COMPLETED", "ABORTED")}
    return Page("rollout.html", f"Rollout {rollout_id}", {
        "r": doc, "stage_chart": charts.stage_bars(doc["stage_progress"]), "operations": operations,
        "devices": doc["devices"][:MAX_DEVICE_ROWS], "device_total": len(doc["devices"]),
        "log": store.rollout_log_entries(rollout_id, limit=30), "now": time.time(),
        "colours": charts.STATUS_COLOURS})


def abtests_page(store: Any) -> Page:
    return Page("abtests.html", "A/B tests", {"tests": store.list_abtests(None), "now": time.time()})


def abtest_page(store: Any, test_id: str) -> Page:
    from edgeship.toolkit.abtest import arm_stats, report

    test, promoted = store.get_abtest(test_id)
    windows = store.telemetry_windows(test.fleet, test.selection, since=test.created_at)
    result = report(test, windows)
    unit = "ms (p95 per telemetry window)" if test.metric.value == "latency_p95" else test.metric.value
    arms = []
    for label, stats in (("A", result.a), ("B", result.b)):
        _, samples, _ = arm_stats(test, label, windows)
        arms.append({"label": label, "arm": stats.arm, "mean": stats.mean, "ci_low": stats.ci_low,
                     "ci_high": stats.ci_high, "samples": samples[-2000:], "n": stats.n, "devices": stats.devices})
    return Page("abtest.html", f"A/B test {test_id}", {
        "test": test, "result": result, "promoted": promoted, "arms": arms,
        "chart": charts.abtest_chart(arms, unit), "unit": unit, "now": time.time()})
