"""``edgeship rollout``: staged rollouts (start, status, pause, resume, abort, rollback, ls).

These commands work on the fleet store. Starting a rollout records it; the
controller's reconcile loop moves the devices. Pause and resume change the
rollout's state; abort and rollback also queue the rollback desired states in
the store's outbox, which the controller signs and publishes. See docs/fleet.md.
"""

from __future__ import annotations

__all__ = ["rollout", "rollout_summary", "rollout_transfers", "transfer_line"]

import math
import time
from typing import Any

import click

from edgeship.ota.errors import BadInputError, GateFailedError
from edgeship.ota.topics import validate_identifier
from edgeship.ota.versions import check_name, parse_version

from ..output import console, emit_json
from .fleet_options import (
    broker_option,
    check_broker_url,
    check_published,
    db_option,
    json_option,
    open_fleet_store,
    policy_from_options,
    policy_options,
    repo_option,
)


def check_interval(interval: float) -> float:
    """A polling interval must be a positive, finite number of seconds (``time.sleep`` would raise)."""
    if not (math.isfinite(interval) and interval > 0):
        raise BadInputError(f"--interval {interval:g}: use a positive number of seconds")
    return interval


def rollout_summary(rollout: Any, health: Any = None, with_devices: bool = False,
                    serving_version: int | None = None, transfers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A rollout as one JSON-ready document (what ``status --json`` prints). ``serving_version``:
    the model's serving version of the rollout's version (signed at publish; None: not known yet).
    ``transfers``: what its updates moved (:meth:`FleetStore.rollout_transfers`)."""
    from edgeship.toolkit.rollouts import stage_progress

    counts: dict[str, int] = {}
    for record in rollout.devices.values():
        counts[record.status.value] = counts.get(record.status.value, 0) + 1
    doc: dict[str, Any] = {
        "id": rollout.id, "fleet": rollout.fleet, "name": rollout.name, "version": rollout.version,
        "serving_version": serving_version, "state": rollout.state.value, "stage": rollout.stage + 1, "stages": list(rollout.policy.stages),
        "reason": rollout.reason, "created_at": rollout.created_at, "updated_at": rollout.updated_at,
        "selection": {k: v for k, v in rollout.selection}, "policy": rollout.policy.to_dict(), "counts": counts,
        # stages are numbered from 1 everywhere in this document, as in "stage 2 of 3"
        "stage_progress": [{**p.to_dict(), "stage": p.stage + 1} for p in stage_progress(rollout)],
        "health": health.to_dict() if health is not None else None,
        "transfers": transfers,
    }
    if with_devices:
        doc["devices"] = [{**r.to_dict(), "stage": None if r.stage is None else r.stage + 1}
                          for _, r in sorted(rollout.devices.items())]
    return doc


def rollout_transfers(store: Any, rollout: Any) -> dict[str, Any]:
    """What the rollout's updates moved over the wire, from the devices' transfer records."""
    return store.rollout_transfers(rollout.id, rollout.name, rollout.version)


def _bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def transfer_line(transfers: dict[str, Any] | None) -> str | None:
    """One line of what a rollout moved (None: no device reported a transfer yet)."""
    if not transfers or not transfers["devices"]:
        return None
    kinds = ", ".join(f"{kind} {e['devices']} device{'s' if e['devices'] != 1 else ''} {_bytes(e['bytes'])}"
                      for kind, e in transfers["by_kind"].items() if e["updates"])
    full = transfers["full_bytes"]
    saved = f"{transfers['bytes_saved'] / full:.0%} of {_bytes(full)}" if full else "-"
    fallbacks = f"; {transfers['fallbacks']} fell back" if transfers["fallbacks"] else ""
    return (f"bytes: {_bytes(transfers['bytes'])} sent ({kinds}); saved {_bytes(transfers['bytes_saved'])} "
            f"({saved} as full bundles){fallbacks}")


def _load_with_health(store: Any, rollout_id: str) -> tuple[Any, Any]:
    from edgeship.toolkit.rollouts import measure_health

    rollout, _ = store.load_rollout(rollout_id)
    snapshot = {s.device: s for s in store.fleet_snapshot(rollout.fleet, rollout.selection,
                                                         telemetry_since=rollout.created_at, model=rollout.name)}
    return rollout, measure_health(rollout, snapshot)


_COLUMNS = [("SUCCEEDED", "ok", "green"), ("ASSIGNED", "sent", ""), ("IN_PROGRESS", "updating", "cyan"),
            ("FAILED", "failed", "red"), ("REJECTED", "rejected", "magenta"), ("TIMED_OUT", "timed out", "yellow"),
            ("ROLLBACK_SENT", "rolled back", "yellow"), ("NO_PREVIOUS", "no previous", "")]


def _render(doc: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    selection = ",".join(f"{k}={v}" for k, v in doc["selection"].items()) or "all devices"
    state_style = {"RUNNING": "cyan", "PAUSED": "yellow", "COMPLETED": "green", "ABORTED": "red",
                   "ROLLED_BACK": "red"}.get(doc["state"], "")
    serving = f" (serving version {doc['serving_version']})" if doc.get("serving_version") is not None else ""
    head = Text.assemble((f"rollout {doc['id']}", "bold"), f"  {doc['name']} {doc['version']}{serving} -> fleet "
                         f"{doc['fleet']} ({selection})  ", (doc["state"], state_style),
                         f"  stage {doc['stage']} of {len(doc['stages'])}")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("stage")
    table.add_column("target", justify="right")
    for _, title, style in _COLUMNS:
        table.add_column(title, justify="right", style=style or None)
    for p in doc["stage_progress"]:
        marker = ">" if p["stage"] == doc["stage"] and doc["state"] in ("RUNNING", "PAUSED") else " "
        table.add_row(f"{marker}{p['stage']} ({p['percent']:g}%)", str(p["target"]),
                      *[str(p["counts"].get(key, 0) or "") for key, _, _ in _COLUMNS])
    counts = doc["counts"]
    foot = Text(f"pending {counts.get('PENDING', 0)}, already on the version {counts.get('ALREADY', 0)}, "
                f"skipped {counts.get('SKIPPED', 0)}, cancelled {counts.get('CANCELLED', 0)}")
    parts: list[Any] = [head, table, foot]
    health = doc.get("health")
    if health and (health["new_requests"] or health["baseline_requests"]):
        rate, ratio, p95 = health["new_error_rate"], health["p95_ratio"], health["new_p95_ms"]
        rate_text = "-" if rate is None else f"{rate:.2%}"
        p95_text = "-" if p95 is None else f"{p95:.2f} ms"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        parts.append(Text(f"health: {health['new_requests']} requests on {doc['version']}, error rate {rate_text}, "
                          f"p95 {p95_text} ({ratio_text} the previous versions')"))
    line = transfer_line(doc.get("transfers"))
    if line:
        parts.append(Text(line))
    if doc.get("reason"):
        parts.append(Text(f"reason: {doc['reason']}"))
    return Group(*parts)


@click.group("rollout")
def rollout() -> None:
    """Staged rollouts with automatic abort and rollback."""


@rollout.command("start")
@click.argument("name")
@click.argument("version")
@click.option("--fleet", required=True, help="The fleet to roll out to.")
@click.option("--select", "select", multiple=True, metavar="TAG=VALUE",
              help="Only devices with this tag (repeatable: all must match).")
@policy_options
@click.option("--wait", is_flag=True,
              help="Follow the rollout until it ends (needs the controller): a live view on a terminal, a line "
                   "per change otherwise; exit 0 COMPLETED, 3 ABORTED or ROLLED_BACK, 1 still running at --timeout.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between polls with --wait.")
@click.option("--timeout", "wait_timeout", default=None, metavar="DURATION",
              help="With --wait: stop waiting after this long (exit 1; the rollout goes on).")
@repo_option
@db_option
@broker_option
@json_option
def start(name: str, version: str, fleet: str, select: tuple[str, ...], stages: str, success_threshold: float,
          max_failures: str, health: str, stage_timeout: str, bake: str, wait: bool, interval: float,
          wait_timeout: str | None, repo_dir: str | None, db_url: str | None, broker_url: str | None, as_json: bool) -> None:
    """Start rolling NAME VERSION out to a fleet in stages; prints the rollout's id."""
    from edgeship.toolkit.rollouts import new_rollout
    from edgeship.toolkit.store import new_id, parse_selection

    check_broker_url(broker_url)
    check_name(name)
    parse_version(version)
    validate_identifier(fleet, "fleet")
    if wait:
        check_interval(interval)
    deadline_s = None
    if wait_timeout is not None:
        from edgeship.toolkit.rollouts import parse_duration

        deadline_s = parse_duration(wait_timeout)
    policy = policy_from_options(stages, success_threshold, max_failures, health, stage_timeout, bake)
    selection = parse_selection(select)
    check_published(repo_dir, (name, version))
    store = open_fleet_store(db_url)
    created = new_rollout(new_id("r"), fleet, name, version, policy, time.time(), selection)
    store.create_rollout(created)
    if not wait:
        if as_json:
            emit_json({"id": created.id, "state": created.state.value, "fleet": fleet, "name": name,
                       "version": version, "policy": policy.to_dict(), "selection": dict(selection)})
        else:
            click.echo(created.id)
        return
    final = follow_rollout(store, created.id, interval, as_json=as_json, timeout_s=deadline_s)
    final_rollout, final_health = _load_with_health(store, final.id)
    doc = rollout_summary(final_rollout, final_health, transfers=rollout_transfers(store, final_rollout))
    if as_json:
        emit_json(doc)
    finish_waiting(final, deadline_s)


def finish_waiting(final: Any, timeout_s: float | None) -> None:
    """The exit status of a followed rollout: 0 COMPLETED, 3 ABORTED or ROLLED_BACK (its gates or
    an operator refused the version), 1 still RUNNING or PAUSED when --timeout ran out."""
    from edgeship.ota.errors import EdgeshipError
    from edgeship.toolkit.rollouts import FINISHED_STATES

    if final.state.value == "COMPLETED":
        return
    if final.state not in FINISHED_STATES:
        raise EdgeshipError(f"rollout {final.id} still {final.state.value} after --timeout {timeout_s:g} s "
                            f"(it goes on; follow it with `edgeship rollout status {final.id} --watch`)")
    raise GateFailedError(f"rollout {final.id} {final.state.value}: {final.reason}")


def change_line(doc: dict[str, Any]) -> str:
    """One line about a rollout's state, for logs and pipes: the current stage's own counts
    against its own size (describe_stages), never a running total beside a stage count."""
    from edgeship.toolkit.rollouts import StageProgress, describe_stages

    progress = [StageProgress(p["stage"] - 1, p["percent"], p["target"], p["assigned"], p["counts"])
                for p in doc["stage_progress"]]
    phrases = describe_stages(progress)
    stage = doc["stage"]
    where = f"{phrases[stage - 1]} [stage {stage} of {len(doc['stages'])}]" if 0 < stage <= len(phrases) \
        else f"stage {stage}"
    line = f"{time.strftime('%H:%M:%S')} rollout {doc['id']} {doc['state']} {where}"
    skipped = doc["counts"].get("SKIPPED", 0)
    if skipped:
        line += f", {skipped} skipped"
    return line + (f"; {doc['reason']}" if doc.get("reason") else "")


def follow_rollout(store: Any, rollout_id: str, interval: float, *, as_json: bool,
                   timeout_s: float | None = None) -> Any:
    """Poll until the rollout is finished (or ``timeout_s`` passes): a live view when stdout is a
    terminal, else one line per change (stderr with --json, which keeps stdout for the document)."""
    import sys

    from edgeship.toolkit.rollouts import FINISHED_STATES

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    live_view = sys.stdout.isatty() and not as_json
    out = console(stderr=as_json)
    last_line = ""

    def poll() -> tuple[Any, dict[str, Any]]:
        current, health = _load_with_health(store, rollout_id)
        return current, rollout_summary(current, health,
                                        serving_version=store.serving_version_of(current.fleet, current.name,
                                                                                 current.version),
                                        transfers=rollout_transfers(store, current))

    current, doc = poll()
    if live_view:
        from rich.live import Live

        with Live(_render(doc), console=out, refresh_per_second=4) as live:
            while current.state not in FINISHED_STATES and (deadline is None or time.monotonic() < deadline):
                time.sleep(interval)
                current, doc = poll()
                live.update(_render(doc))
        out.print(change_line(doc), markup=False, highlight=False, soft_wrap=True)  # the final state, kept
        return current
    while True:
        line = change_line(doc)
        if line.split(" ", 1)[1] != last_line.split(" ", 1)[-1]:
            out.print(line, markup=False, highlight=False, soft_wrap=True)
            last_line = line
        if current.state in FINISHED_STATES or (deadline is not None and time.monotonic() >= deadline):
            return current
        time.sleep(interval)
        current, doc = poll()


@rollout.command("status")
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="A live view, refreshed until the rollout finishes (Ctrl-C leaves).")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--devices", "with_devices", is_flag=True, help="Include every device's record.")
@db_option
@json_option
def status(rollout_id: str, watch: bool, interval: float, with_devices: bool, db_url: str | None,
           as_json: bool) -> None:
    """Show a rollout's stages, device counts and health."""
    from edgeship.toolkit.rollouts import FINISHED_STATES

    if watch:
        check_interval(interval)
    store = open_fleet_store(db_url, existing=True)
    current, health = _load_with_health(store, rollout_id)
    if watch and current.state not in FINISHED_STATES:
        if as_json:
            current = follow_rollout(store, rollout_id, interval, as_json=True)
            current, health = _load_with_health(store, rollout_id)
        else:
            from rich.live import Live

            def view() -> Any:
                return _render(rollout_summary(current, health, transfers=rollout_transfers(store, current)))

            with Live(view(), console=console(), refresh_per_second=4) as live:
                while current.state not in FINISHED_STATES:
                    time.sleep(interval)
                    current, health = _load_with_health(store, rollout_id)
                    live.update(view())
            return
    doc = rollout_summary(current, health, with_devices,
                          store.serving_version_of(current.fleet, current.name, current.version),
                          rollout_transfers(store, current))
    if as_json:
        emit_json(doc)
        return
    out = console()
    out.print(_render(doc))
    if with_devices:
        from rich.table import Table

        table = Table(show_edge=False)
        table.add_column("device", no_wrap=True)
        for title in ("status", "stage", "previous", "detail"):
            table.add_column(title)
        for record in doc["devices"]:
            previous = f"{record['previous_name'] or ''} {record['previous_version'] or ''}".strip()
            table.add_row(record["device"], record["status"], "" if record["stage"] is None else str(record["stage"]),
                          previous, record["detail"] or "")
        out.print(table)


def _operator_command(name: str, summary: str) -> Any:
    @rollout.command(name, help=summary)
    @click.argument("rollout_id")
    @click.option("--reason", default=None, help="Why (kept in the rollout's log).")
    @db_option
    @broker_option
    @json_option
    def command(rollout_id: str, reason: str | None, db_url: str | None, broker_url: str | None,
                as_json: bool) -> None:
        from edgeship.toolkit.fleet_actions import operate_rollout

        check_broker_url(broker_url)
        store = open_fleet_store(db_url, existing=True)
        result = operate_rollout(store, rollout_id, name, reason)
        if as_json:
            emit_json(result.to_dict())
            return
        line = f"rollout {rollout_id} is {result.state}"
        if name in ("abort", "rollback"):
            line += f"; {len(result.rollbacks)} device(s) queued to roll back (the controller publishes them)"
        click.echo(line)

    return command


pause_command = _operator_command("pause", "Pause a running rollout: no new devices, no next stage.")
resume_command = _operator_command("resume", "Resume a paused rollout.")
abort_command = _operator_command("abort", "Abort a running or paused rollout and roll its devices back.")
rollback_command = _operator_command(
    "rollback", "Roll every device a rollout moved (even a completed one) back to its previous version.")


@rollout.command("ls")
@click.option("--fleet", default=None, help="Only this fleet.")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["RUNNING", "PAUSED", "COMPLETED", "ABORTED", "ROLLED_BACK"], case_sensitive=False),
              help="Only rollouts in this state (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True)
@db_option
@json_option
def ls(fleet: str | None, states: tuple[str, ...], limit: int, db_url: str | None, as_json: bool) -> None:
    """List rollouts, newest first."""
    if limit < 1:
        raise BadInputError(f"--limit {limit}: show at least 1 rollout")
    store = open_fleet_store(db_url, existing=True)
    rows = store.list_rollouts(fleet, [s.upper() for s in states] or None, limit)
    docs = [{"id": r["id"], "fleet": r["fleet"], "name": r["name"], "version": r["version"], "state": r["state"],
             "stage": r["stage"] + 1, "stages": r["policy"]["stages"] if isinstance(r["policy"], dict) else None,
             "created_at": r["created_at"], "updated_at": r["updated_at"], "reason": r["reason"],
             "superseded_by": r["superseded_by"], "devices": r["devices"]} for r in rows]
    if as_json:
        emit_json(docs)
        return
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("id", no_wrap=True)
    for title in ("fleet", "bundle", "state", "stage", "ok", "failed", "pending", "started (UTC)"):
        table.add_column(title, no_wrap=title == "state")
    for d in docs:
        started = time.strftime("%m-%d %H:%M", time.gmtime(d["created_at"]))
        table.add_row(d["id"], d["fleet"], f"{d['name']} {d['version']}", d["state"],
                      f"{d['stage']}/{len(d['stages'] or [])}", str(d["devices"].get("SUCCEEDED", 0)),
                      str(d["devices"].get("FAILED", 0) + d["devices"].get("REJECTED", 0)),
                      str(d["devices"].get("PENDING", 0)), started)
    console().print(table)
