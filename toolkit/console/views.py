"""What each console page shows: read from the fleet store (the same reads the CLI makes), shaped
into plain dicts, and rendered with Jinja2 (autoescaped templates in ``templates/``).

A page and its ``live`` part (what the browser re-fetches every few seconds) come from the same
function, so the live view can never show something the page would not.
"""

from __future__ import annotations

__all__ = ["DEFAULT_FLEET_ROWS", "FLEET_PAGE_ROWS", "FleetFilter", "Page", "RolloutDevicesFilter", "RolloutHealth", "RolloutReader", "abtest_page", "abtests_page", "device_page", "fleet_page", "keyset_page", "render",
           "rollout_page", "rollouts_page"]

import bisect
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.fleet_actions import device_models
from edgeship.toolkit.fleet_rules import describe_models
from edgeship.toolkit.rollouts import VersionTelemetry

from . import charts

log = logging.getLogger(__name__)

FLEET_PAGE_ROWS = (50, 100, 200, 500)
"""The page sizes of the fleet table and of a rollout's device table; 100 unless the operator picks
another. Every device is reachable by paging (keyset: next/previous by device id) and the counts
above a table cover every match."""
DEFAULT_FLEET_ROWS = 100


@dataclass(frozen=True)
class Page:
    template: str
    title: str
    context: dict[str, Any]


def _environment() -> Any:
    from edgeship.ota.errors import require_module

    jinja2 = require_module("jinja2", "host")  # a missing extra is one line at start, not a 500 per page
    Environment, PackageLoader = jinja2.Environment, jinja2.PackageLoader
    StrictUndefined, select_autoescape = jinja2.StrictUndefined, jinja2.select_autoescape

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


def load_templates() -> None:
    """Load the template environment now (the server does, so a missing Jinja2 stops it at start)."""
    global _ENV
    if _ENV is None:
        _ENV = _environment()


def render(template: str, context: Mapping[str, Any]) -> str:
    load_templates()
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
    """The fleet page's filters and its place in the table (query parameters); empty strings mean
    'any'. ``after``/``before``: the page after or before that device id; ``rows``: the page size."""

    fleet: str = ""
    tag: str = ""        # KEY=VALUE
    bundle: str = ""
    version: str = ""
    state: str = ""      # an update state, or "none"
    online: str = ""     # "yes" / "no"
    after: str = ""
    before: str = ""
    rows: int = DEFAULT_FLEET_ROWS

    FILTERS = ("fleet", "tag", "bundle", "version", "state", "online")

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FleetFilter:
        fields: dict[str, Any] = {name: query.get(name, "").strip()[:128]
                                  for name in (*cls.FILTERS, "after", "before")}
        if fields["online"] not in ("", "yes", "no"):
            raise BadInputError("online: use yes or no")
        if fields["tag"] and "=" not in fields["tag"]:
            raise BadInputError("tag: use KEY=VALUE")
        if fields["after"] and fields["before"]:
            raise BadInputError("after and before: give one of them")
        rows_text = query.get("rows", "").strip() or str(DEFAULT_FLEET_ROWS)
        if rows_text not in {str(n) for n in FLEET_PAGE_ROWS}:
            raise BadInputError(f"rows: one of {', '.join(str(n) for n in FLEET_PAGE_ROWS)}")
        return cls(**fields, rows=int(rows_text))

    def selection(self) -> tuple[tuple[str, str], ...]:
        if not self.tag:
            return ()
        key, _, value = self.tag.partition("=")
        return ((key.strip(), value.strip()),)

    def url(self, **paging: str) -> str:
        """The fleet page with these filters and page size, at ``after=ID`` / ``before=ID`` (or the first page)."""
        query = {name: getattr(self, name) for name in self.FILTERS if getattr(self, name)}
        if self.rows != DEFAULT_FLEET_ROWS:
            query["rows"] = str(self.rows)
        query.update({k: v for k, v in paging.items() if v})
        return "/" + ("?" + urllib.parse.urlencode(query) if query else "")


def fleet_page(store: Any, flt: FleetFilter) -> Page:
    listing = store.device_listing(flt.fleet or None, flt.selection(), bundle=flt.bundle, version=flt.version,
                                   state=flt.state, online=None if not flt.online else flt.online == "yes",
                                   limit=flt.rows, after=flt.after, before=flt.before)
    versions = sorted(((v or "nothing installed"), n) for v, n in listing["versions"].items())
    states = sorted(((s or "none"), n) for s, n in listing["states"].items())
    shown = listing["devices"]
    multi = [d.id for d in shown if d.models_reported]
    reported = store.device_models_of(multi) if multi else {}
    models = {d.id: describe_models({"name": name, **m, "version": m.get("active_version")}
                                    for name, m in sorted(reported.get(d.id, {}).items()))
              for d in shown if d.id in reported}
    pager = {"first": flt.url() if listing["has_previous"] else "",
             "previous": flt.url(before=shown[0].id) if listing["has_previous"] and shown else "",
             "next": flt.url(after=shown[-1].id) if listing["has_next"] and shown else ""}
    return Page("fleet.html", "Fleet", {
        "filter": flt, "devices": shown, "models": models, "total": listing["total"], "online": listing["online"],
        "offline": listing["total"] - listing["online"], "versions": sorted(versions, key=lambda kv: -kv[1]),
        "states": states, "fleets": listing["fleets"], "shown": len(shown), "pager": pager,
        "page_sizes": FLEET_PAGE_ROWS, "now": time.time()})


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
        "device": info, "models": device_models(store, info), "versions": versions, "events": events,
        "desired": desired, "window_s": window_s,
        "latency_chart": charts.latency_histogram_chart(merged), "requests": merged.count, "now": now})


def rollouts_page(store: Any, fleet: str = "") -> Page:
    rows = store.list_rollouts(fleet or None, None, 200)
    return Page("rollouts.html", "Rollouts", {"rollouts": rows, "fleet": fleet, "now": time.time()})


class RolloutReader:
    """Rollouts as the console reads them: a loaded rollout is kept until its stored revision moves
    (every change to a rollout or its devices' records bumps it), so a page re-fetched every 2 s
    does not rebuild 10,000 device records that did not change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, Any]] = {}
        self._sorted: dict[tuple[int, str], tuple[Any, list[str]]] = {}

    def load(self, store: Any, rollout_id: str) -> Any:
        revision = store.rollout_revision(rollout_id)
        with self._lock:
            cached = self._loaded.get(rollout_id)
        if cached is not None and revision is not None and cached[0] == revision:
            return cached[1]
        rollout, loaded_revision = store.load_rollout(rollout_id)  # unknown id: BadInputError
        with self._lock:
            self._loaded[rollout_id] = (loaded_revision, rollout)
            while len(self._loaded) > 32:
                self._loaded.pop(next(iter(self._loaded)))
        return rollout

    def sorted_ids(self, rollout: Any, status: str = "") -> list[str]:
        """The rollout's device ids in order (those of ``status`` only, if given), kept with the
        loaded rollout: a page re-fetched every 2 s does not sort 10,000 ids each time."""
        key = (id(rollout), status)
        with self._lock:
            found = self._sorted.get(key)
        if found is not None and found[0] is rollout:
            return found[1]
        ids = sorted(d for d, r in rollout.devices.items() if not status or r.status.value == status)
        with self._lock:
            self._sorted[key] = (rollout, ids)
            while len(self._sorted) > 64:
                self._sorted.pop(next(iter(self._sorted)))
        return ids


@dataclass
class _HealthTally:
    """One rollout's telemetry merged per (bundle, version) over the windows received before ``upto``."""

    upto: float
    per_version: dict[tuple[str, str], VersionTelemetry]


class RolloutHealth:
    """A rollout's health (its version against the others, from the telemetry since it started),
    measured in the background and at most ``max_age_s`` old.

    The page shows the latest reading and its age and never waits for a measurement; a stale one
    starts one new measurement (never two at a time for one rollout).

    A measurement reads only the windows received since the last one and adds them to a running
    tally per (bundle, version); the reading is :func:`~edgeship.toolkit.rollouts.measure_health`
    of that tally, the same verdict as over every window at once. Re-reading every window since the
    rollout started, as before, grew with the rollout (at 10,000 devices reporting every 10 s,
    180,000 windows after 3 minutes: seconds of pure Python every 15 s, holding the interpreter
    lock that every page of the console needs). A window counts once its ``received_at`` is
    ``settle_s`` old, so one committed late by a busy ingest writer is still in the range that the
    next read covers; the reading therefore lags the newest telemetry by ``settle_s``."""

    def __init__(self, max_age_s: float = 15.0, settle_s: float = 15.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_age_s, self.settle_s, self.clock = max_age_s, settle_s, clock
        self._lock = threading.Lock()
        self._readings: dict[str, tuple[float, Any]] = {}
        self._tallies: dict[str, _HealthTally] = {}
        self._running: set[str] = set()

    def reading(self, store: Any, rollout: Any) -> tuple[Any, float | None]:
        """(the latest reading or None, its age in seconds or None)."""
        now = time.monotonic()
        with self._lock:
            at, value = self._readings.get(rollout.id, (None, None))
            stale = at is None or now - at > self.max_age_s
            if stale and rollout.id not in self._running:
                self._running.add(rollout.id)
                threading.Thread(target=self._measure, args=(store, rollout), daemon=True,
                                 name=f"health-{rollout.id}").start()
        return value, (None if at is None else now - at)

    def measure(self, store: Any, rollout: Any) -> Any:
        """Add the windows received since the last measurement; return the reading (also kept)."""
        from edgeship.toolkit.rollouts import DeviceSnapshot, measure_health

        with self._lock:
            tally = self._tallies.get(rollout.id) or _HealthTally(rollout.created_at, {})
        until = self.clock() - self.settle_s
        merged = dict(tally.per_version)
        if until > tally.upto:
            for window in store.telemetry_windows(rollout.fleet, rollout.selection, since=tally.upto, until=until):
                if window.name is None or window.version is None:
                    continue
                key = (window.name, window.version)
                have = merged.get(key)
                merged[key] = VersionTelemetry(key[0], key[1], window.requests, window.errors, window.latency) \
                    if have is None else VersionTelemetry(key[0], key[1], have.requests + window.requests,
                                                          have.errors + window.errors, have.latency.merge(window.latency))
            tally = _HealthTally(until, merged)
        reading = measure_health(rollout, {"": DeviceSnapshot(device="", telemetry=tuple(merged.values()))})
        with self._lock:
            self._tallies[rollout.id] = tally
            self._readings[rollout.id] = (time.monotonic(), reading)
            while len(self._tallies) > 32:
                self._tallies.pop(next(iter(self._tallies)))
        return reading

    def _measure(self, store: Any, rollout: Any) -> None:
        try:
            self.measure(store, rollout)
        except Exception:  # a failed measurement (logged) leaves the last reading; the next request retries
            log.exception("rollout %s: health not measured", rollout.id)
        finally:
            with self._lock:
                self._running.discard(rollout.id)


def keyset_page(ids: Sequence[str], rows: int, after: str = "", before: str = "") -> tuple[list[str], bool, bool]:
    """One page of the sorted ``ids``: ``rows`` of them after ``after``, before ``before``, or the
    first; with whether ids lie before and after the page. The fleet table's paging (there in SQL)
    for lists the console already holds."""
    if before:
        end = bisect.bisect_left(ids, before)
        start = max(0, end - rows)
        return list(ids[start:end]), start > 0, True
    start = bisect.bisect_right(ids, after) if after else 0
    return list(ids[start:start + rows]), start > 0, start + rows < len(ids)


@dataclass(frozen=True)
class RolloutDevicesFilter:
    """The rollout page's device table: a device status (empty: every one) and its page (as the fleet's)."""

    status: str = ""
    paging: FleetFilter = FleetFilter()

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> RolloutDevicesFilter:
        from edgeship.toolkit.rollouts import DeviceStatus

        status = query.get("status", "").strip().upper()
        if status and status not in DeviceStatus.__members__:
            raise BadInputError(f"status: one of {', '.join(DeviceStatus.__members__)}")
        return cls(status, FleetFilter.from_query({k: query.get(k, "") for k in ("rows", "after", "before")}))


def rollout_page(store: Any, rollout_id: str, reader: RolloutReader, health: RolloutHealth,
                 flt: RolloutDevicesFilter | None = None) -> Page:
    """A rollout; its device table pages as the fleet's does (``rows``, ``after``, ``before``) and
    filters by ``status``; the counts and stage bars cover every device."""
    from edgeship.toolkit.commands.rollout import rollout_summary, rollout_transfers, transfer_line
    from edgeship.toolkit.rollouts import DeviceStatus

    flt = flt or RolloutDevicesFilter()
    status, paging = flt.status, flt.paging
    rollout = reader.load(store, rollout_id)
    reading, age = health.reading(store, rollout)
    doc = rollout_summary(rollout, reading, transfers=rollout_transfers(store, rollout))
    doc["transfer_line"] = transfer_line(doc["transfers"])
    ids = reader.sorted_ids(rollout, status)
    shown, has_previous, has_next = keyset_page(ids, paging.rows, paging.after, paging.before)
    records = rollout.devices
    devices = [{"device": i, "status": records[i].status.value,
                "stage": None if records[i].stage is None else records[i].stage + 1,
                "previous_name": records[i].previous_name, "previous_version": records[i].previous_version,
                "detail": records[i].detail} for i in shown]

    def url(**more: str) -> str:
        params = {"status": status, "rows": "" if paging.rows == DEFAULT_FLEET_ROWS else str(paging.rows), **more}
        kept = {k: v for k, v in params.items() if v}
        return f"/rollouts/{urllib.parse.quote(rollout_id)}" + ("?" + urllib.parse.urlencode(kept) if kept else "")

    pager = {"first": url() if has_previous else "", "previous": url(before=shown[0]) if has_previous and shown else "",
             "next": url(after=shown[-1]) if has_next and shown else ""}
    state = doc["state"]
    operations = {"pause": state == "RUNNING", "resume": state == "PAUSED", "abort": state in ("RUNNING", "PAUSED"),
                  "rollback": state in ("RUNNING", "PAUSED", "COMPLETED", "ABORTED")}
    return Page("rollout.html", f"Rollout {rollout_id}", {
        "r": doc, "stage_chart": charts.stage_bars(doc["stage_progress"]), "operations": operations,
        "devices": devices, "device_total": len(records), "matching": len(ids), "status_filter": status,
        "statuses": list(DeviceStatus.__members__), "pager": pager, "rows": paging.rows, "page_sizes": FLEET_PAGE_ROWS,
        "health_age": age, "log": store.rollout_log_entries(rollout_id, limit=30), "now": time.time(),
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
