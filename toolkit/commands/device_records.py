"""``edgeship device show`` and ``device tag``: what the fleet store knows of one device.

They read and write the fleet store only (no SSH, no broker), like ``fleet ls``; the ``device``
group (commands/device.py) attaches them.
"""

from __future__ import annotations

__all__ = ["device_show", "device_tag"]

import time
from typing import Any

import click

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import validate_identifier
from edgeship.toolkit.fleet_actions import device_models

from ..output import console, emit_json
from .fleet_options import (
    WINDOW_HELP,
    ago,
    broker_option,
    check_broker_url,
    db_option,
    json_option,
    open_fleet_store,
    parse_window,
)


@click.command("show")
@click.argument("device_id")
@click.option("--window", default="15m", show_default=True, help=WINDOW_HELP)
@click.option("--events", "n_events", type=int, default=10, show_default=True, help="Recent events to show.")
@db_option
@broker_option
@json_option
def device_show(device_id: str, window: str, n_events: int, db_url: str | None, broker_url: str | None,
                as_json: bool) -> None:
    """A device's state, every model it serves (bundle and serving version), tags, desired state,
    telemetry and recent events."""
    from edgeship.ota.telemetry import LatencyHistogram

    check_broker_url(broker_url)
    validate_identifier(device_id, "device id")
    window_s = parse_window(window)
    now = time.time()
    store = open_fleet_store(db_url, existing=True)
    try:
        info = store.get_device(device_id)
        desired = store.desired_for(device_id)
        models = device_models(store, info)
        windows = [w for w in store.telemetry_windows(info.fleet, (), since=now - window_s) if w.device == device_id]
        events = store.recent_events(device_id, limit=max(0, n_events))
    finally:
        store.close()
    per_version: dict[str, dict[str, Any]] = {}
    for w in windows:
        key = f"{w.name}:{w.version}" if w.name else "none"
        slot = per_version.setdefault(key, {"requests": 0, "errors": 0, "latency": LatencyHistogram()})
        slot["requests"] += w.requests
        slot["errors"] += w.errors
        slot["latency"] = slot["latency"].merge(w.latency)
    telemetry = {key: {"requests": s["requests"], "errors": s["errors"],
                       "error_rate": s["errors"] / s["requests"] if s["requests"] else None,
                       "p50_ms": s["latency"].quantile_ms(0.5), "p95_ms": s["latency"].quantile_ms(0.95),
                       "p99_ms": s["latency"].quantile_ms(0.99)} for key, s in sorted(per_version.items())}
    desired_doc = None
    if desired is not None:
        desired_doc = {"sequence": desired.sequence, "name": desired.name, "version": desired.version,
                       "action": desired.action, "rollout": desired.rollout_id, "abtest": desired.abtest_id,
                       "deployment": desired.deployment, "issued_at": desired.issued_at,
                       "expires_at": desired.expires_at}
    doc = {"device": info.to_dict(), "models": models, "desired": desired_doc, "telemetry": telemetry, "window_s": window_s,
           "events": [{k: e[k] for k in ("ts", "seq", "received_at", "event", "deployment", "bundle_name",
                                         "bundle_version", "state", "detail")} for e in events]}
    if as_json:
        emit_json(doc)
        return
    con = console()
    con.print(f"[bold]{info.id}[/bold]  fleet {info.fleet}  " +
              ("[green]online[/green]" if info.online else "[red]offline[/red]") +
              f"  last seen {ago(info.last_seen, now)}  first seen {ago(info.first_seen, now)}")
    con.print(f"  active   {info.active_name or '-'} {info.active_version or ''}   previous "
              f"{info.previous_name or '-'} {info.previous_version or ''}")
    for m in models:
        serving = f" (serving version {m['serving_version']})" if m["serving_version"] is not None else ""
        wanted = (f"  desired {m['desired_version']}"
                  + (f" (#{m['desired_serving_version']})" if m["desired_serving_version"] is not None else "")
                  if m["desired_version"] else "")
        state = f"  {m['update_state']}" + (f" {m['update_version']}" if m["update_version"] else "") \
            if m["update_state"] else ""
        con.print(f"  model    {m['name']} {m['version'] or '-'}{serving}{state}{wanted}")
    con.print(f"  update   {info.update_state or '-'} {info.update_name or ''} {info.update_version or ''}"
              + (f"  ({info.update_detail})" if info.update_detail else ""))
    if desired is not None:
        con.print(f"  desired  {desired.name} {desired.version} ({desired.action}, sequence {desired.sequence}"
                  + (f", rollout {desired.rollout_id}" if desired.rollout_id else "")
                  + (f", A/B test {desired.abtest_id}" if desired.abtest_id else "") + ")")
    con.print(f"  agent    {info.agent_version or '-'}  runtime {info.runtime or '-'}")
    con.print("  tags     " + (", ".join(f"{k}={v}" for k, v in sorted(info.tags.items())) or "-"))
    for key, t in telemetry.items():
        p95 = "-" if t["p95_ms"] is None else f"{t['p95_ms']:.2f} ms"
        rate = "-" if t["error_rate"] is None else f"{t['error_rate']:.1%}"
        con.print(f"  {key}: {t['requests']} requests in the last {window}, p95 {p95}, errors {rate}")
    if info.last_drift is not None:
        con.print(f"  drift    {info.last_drift:.3f}")
    for e in doc["events"]:
        bundle = f" {e['bundle_name']} {e['bundle_version']}" if e["bundle_name"] else ""
        con.print(f"  event {ago(e['received_at'], now):>8}  {e['event']}{bundle}"
                  + (f" [{e['state']}]" if e["state"] else "") + (f": {e['detail']}" if e["detail"] else ""))


@click.command("tag")
@click.argument("device_id")
@click.argument("pairs", nargs=-1, metavar="KEY=VALUE...")
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove this tag (repeatable).")
@db_option
@broker_option
@json_option
def device_tag(device_id: str, pairs: tuple[str, ...], remove: tuple[str, ...], db_url: str | None,
               broker_url: str | None, as_json: bool) -> None:
    """Set (KEY=VALUE) or remove (--remove KEY) a device's tags; rollouts select devices by them."""
    check_broker_url(broker_url)
    validate_identifier(device_id, "device id")
    if not pairs and not remove:
        raise BadInputError("give at least one KEY=VALUE or --remove KEY")
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise BadInputError(f"tag {pair!r}: use KEY=VALUE (e.g. site=berlin)")
        if len(key) > 64 or len(value) > 256:
            raise BadInputError(f"tag {pair[:80]!r}: keys are at most 64 characters, values 256")
        tags[key] = value
    overlap = set(tags) & set(remove)
    if overlap:
        raise BadInputError(f"tag {sorted(overlap)[0]!r} is both set and removed")
    store = open_fleet_store(db_url, existing=True)
    try:
        result = store.set_tags(device_id, tags, remove=remove)
    finally:
        store.close()
    if as_json:
        emit_json({"device": device_id, "tags": result})
        return
    console().print(f"{device_id}: " + (", ".join(f"{k}={v}" for k, v in sorted(result.items())) or "no tags"))

