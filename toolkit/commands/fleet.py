"""``edgeship controller``, ``edgeship fleet ls`` / ``fleet provision``, ``edgeship deploy``.

The controller is the one long-running process that holds the broker connection and the
director key (toolkit/controller.py). The other commands read and write the fleet store only:
``deploy`` queues desired states in the store's outbox, which the running controller signs and
publishes. They accept ``--broker`` like every fleet command (see fleet_options.py). See
docs/fleet.md, "Controller".
"""

from __future__ import annotations

__all__ = ["controller", "deploy", "device_rows", "fleet", "fleet_ls", "undeploy"]

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import validate_identifier

from ..output import console, emit_json
from .device import fleet_provision
from .fleet_options import (
    WINDOW_HELP,
    ago,
    broker_option,
    check_broker_url,
    check_published,
    db_option,
    device_choice_options,
    json_option,
    open_fleet_store,
    parse_window,
    repo_option,
)

# -- the controller ------------------------------------------------------------------------------

def _setup_logging(json_log: bool, verbose: int) -> None:
    from edgeship.toolkit.controller import JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    if json_log:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        logging.getLogger("edgeship.ota.transport").setLevel(logging.INFO if verbose else logging.WARNING)


@click.command("controller")
@click.option("--broker", "broker_url", envvar="EDGESHIP_BROKER", default=None, metavar="URL",
              help="mqtt://HOST:PORT or mqtts://HOST:PORT (env EDGESHIP_BROKER; credentials from "
                   "EDGESHIP_MQTT_USERNAME/EDGESHIP_MQTT_PASSWORD); default: from --credentials.")
@click.option("--credentials", "credentials_dir", type=click.Path(file_okay=False), default=None,
              help="The controller's credentials folder (BROKER_DIR/controller from `edgeship broker config`): "
                   "the broker URL, CA, certificate and key (or password) in one option.")
@click.option("--repo", "repo_dir", envvar="EDGESHIP_REPO", required=True, type=click.Path(file_okay=False),
              help="The release repository folder (env EDGESHIP_REPO).")
@db_option
@click.option("--replica-id", default=None, metavar="ID",
              help="This replica's name (MQTT client id edgeship-controller-ID); default HOST-PID.")
@click.option("--fleet", "fleet_name", default="+", show_default=True, help="Serve one fleet, or + for all.")
@click.option("--prefix", default="edgeship", show_default=True, help="MQTT topic prefix.")
@click.option("--shared-group", default="edgeship-controllers", show_default=True,
              help="MQTT 5 shared-subscription group for events, telemetry and block requests ('' to disable).")
@click.option("--tick", "tick_s", type=float, default=1.0, show_default=True, help="Seconds between reconciles.")
@click.option("--metrics-port", type=int, default=None, metavar="N", help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics server.")
@click.option("--username", default=None, metavar="NAME",
              help="Broker user name (default: env EDGESHIP_MQTT_USERNAME).")
@click.option("--password", default=None, metavar="SECRET",
              help="Broker password (default: env EDGESHIP_MQTT_PASSWORD, which keeps it out of process lists).")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False), default=None, help="CA file for mqtts://.")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False), default=None, help="Client certificate.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help="Client key.")
@click.option("--json-log", is_flag=True, help="Log one JSON object per line on stderr.")
@click.option("-v", "--verbose", count=True, help="More log (-vv: debug).")
def controller(broker_url: str | None, credentials_dir: str | None, repo_dir: str, db_url: str | None, replica_id: str | None, fleet_name: str,
               prefix: str, shared_group: str, tick_s: float, metrics_port: int | None, metrics_host: str,
               username: str | None, password: str | None, ca_file: str | None, cert_file: str | None,
               key_file: str | None, json_log: bool, verbose: int) -> None:
    """Run the fleet controller until SIGTERM or SIGINT: ingest, serve blocks, reconcile, publish."""
    from edgeship.ota.transport import parse_broker_url
    from edgeship.toolkit.controller import Controller, ControllerConfig, default_replica_id
    from edgeship.toolkit.store import DEFAULT_DB_URL

    if credentials_dir is not None:
        from edgeship.toolkit.identities import read_connection

        conn = read_connection(credentials_dir)
        if conn.get("kind") != "controller":
            raise BadInputError(f"--credentials {credentials_dir} holds a {conn.get('kind')}'s credentials, "
                                "not the controller's (BROKER_DIR/controller)")
        broker_url = broker_url or conn["url"]
        ca_file, cert_file, key_file = (ca_file or conn.get("ca"), cert_file or conn.get("cert"),
                                        key_file or conn.get("key"))
        if conn.get("password") and password is None:
            username = username or conn.get("username")
            password = Path(conn["password"]).read_text().strip()
    if not broker_url:
        raise BadInputError("pass --broker URL (or $EDGESHIP_BROKER), or --credentials BROKER_DIR/controller")
    for option, path in (("--ca", ca_file), ("--cert", cert_file), ("--key", key_file)):
        if path and not Path(path).is_file():
            raise BadInputError(f"{option} {path}: no such file")
    broker = parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file,
                              cert_file=cert_file, key_file=key_file)
    if fleet_name != "+":
        validate_identifier(fleet_name, "fleet")
    validate_identifier(prefix, "topic prefix")
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise BadInputError(f"--metrics-port {metrics_port} must be 0-65535")
    config = ControllerConfig(broker=broker, repo=repo_dir, db_url=db_url or DEFAULT_DB_URL,
                              replica_id=replica_id or default_replica_id(), prefix=prefix, fleet=fleet_name,
                              shared_group=shared_group or None, tick_s=tick_s, metrics_port=metrics_port,
                              metrics_host=metrics_host)
    instance = Controller(config)  # checks the repository and opens the store before any logging is set up
    _setup_logging(json_log, verbose)

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("received %s; shutting down", signal.Signals(signum).name)
        instance.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    instance.run()


# -- fleet ls ------------------------------------------------------------------------------------

def device_rows(store: Any, fleet: str | None, selection: tuple[tuple[str, str], ...], window_s: float,
                now: float) -> list[dict[str, Any]]:
    """One row per selected device: its state and its active version's telemetry over the window
    (p95 from the merged fixed-bucket histograms, errors per request)."""
    from edgeship.ota.telemetry import LatencyHistogram
    from edgeship.toolkit.fleet_rules import model_listing

    devices = store.list_devices(fleet, selection)
    ids = [d.id for d in devices]
    reported = store.device_models_of([d.id for d in devices if d.models_reported])
    desired = store.desired_sets(ids)
    transfers = store.last_transfers(ids)
    merged: dict[tuple[str, str | None, str | None], list[Any]] = {}
    for fleet_name in sorted({d.fleet for d in devices}):
        for window in store.telemetry_windows(fleet_name, selection, since=now - window_s):
            acc = merged.setdefault((window.device, window.name, window.version), [0, 0, LatencyHistogram()])
            acc[0] += window.requests
            acc[1] += window.errors
            acc[2] = acc[2].merge(window.latency)
    rows = []
    for info in devices:
        slot: list[Any] | None = merged.get((info.id, info.active_name, info.active_version))
        if slot is None:  # telemetry without a bundle, or of another version: use what there is
            slots = [v for (d, _n, _v), v in merged.items() if d == info.id]
            if slots:
                slot = [sum(s[0] for s in slots), sum(s[1] for s in slots),
                        LatencyHistogram.merged(s[2] for s in slots)]
        requests, errors, histogram = slot if slot is not None else (0, 0, LatencyHistogram())
        models = model_listing(
            active_name=info.active_name, active_version=info.active_version, update_state=info.update_state,
            update_name=info.update_name, update_version=info.update_version,
            models_reported=info.models_reported, reported=reported.get(info.id, {}),
            desired=desired.get(info.id, {}))
        for entry in models:  # how its last update travelled: kind, bytes, full_bytes, base_version, fallback
            entry["transfer"] = transfers.get(info.id, {}).get(entry["name"])
        rows.append({
            "device": info.id, "fleet": info.fleet, "online": info.online,
            "bundle": info.active_name, "version": info.active_version,
            "update_state": info.update_state, "update_bundle": info.update_name,
            "update_version": info.update_version, "update_detail": info.update_detail,
            "last_seen": info.last_seen, "requests": requests, "errors": errors,
            "p95_ms": histogram.quantile_ms(0.95), "error_rate": (errors / requests) if requests else None,
            "drift": info.last_drift, "tags": info.tags,
            "models": models,
        })
    return rows


@click.group("fleet")
def fleet() -> None:
    """List the fleet's devices, their models and health; provision many devices."""


@fleet.command("ls")
@click.option("--fleet", "fleet_name", default=None, help="Only this fleet (default: every fleet).")
@click.option("--select", "select", multiple=True, metavar="TAG=VALUE", help="Only devices with this tag (AND).")
@click.option("--window", default="15m", show_default=True, help=WINDOW_HELP)
@db_option
@broker_option
@json_option
def fleet_ls(fleet_name: str | None, select: tuple[str, ...], window: str, db_url: str | None,
             broker_url: str | None, as_json: bool) -> None:
    """Devices: online, every model with its bundle and serving version, update status, last seen, p95,
    error rate, drift."""
    from edgeship.toolkit.store import parse_selection

    check_broker_url(broker_url)
    if fleet_name is not None:
        validate_identifier(fleet_name, "fleet")
    selection = parse_selection(select)
    window_s = parse_window(window)
    now = time.time()
    store = open_fleet_store(db_url, existing=True)
    try:
        rows = device_rows(store, fleet_name, selection, window_s, now)
    finally:
        store.close()
    if as_json:
        emit_json({"devices": rows, "window_s": window_s, "at": now,
                   "online": sum(1 for r in rows if r["online"]), "total": len(rows)})
        return
    from rich.table import Table

    con = console()
    if not rows:
        con.print("no devices" + (f" in fleet {fleet_name}" if fleet_name else "") +
                  (" match the selection" if selection else "") + " (devices appear once they report)")
        return
    table = Table(show_edge=False, pad_edge=False)
    from edgeship.toolkit.fleet_rules import describe_models

    for title, justify in (("device", "left"), ("fleet", "left"), ("online", "left"), ("models", "left"),
                           ("update", "left"), ("last seen", "right"), (f"p95 ({window})", "right"),
                           ("errors", "right"), ("drift", "right")):
        table.add_column(title, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        update = r["update_state"] or "-"
        if r["update_state"] and r["update_version"] and r["update_version"] != r["version"]:
            update += f" {r['update_version']}"
        update_style = {"FAILED": "red", "REJECTED": "magenta", "ROLLED_BACK": "yellow",
                        "COMMITTED": "green"}.get(r["update_state"] or "", "")
        table.add_row(r["device"], r["fleet"], "[green]yes[/green]" if r["online"] else "[red]no[/red]",
                      describe_models(r["models"]),
                      f"[{update_style}]{update}[/{update_style}]" if update_style else update,
                      ago(r["last_seen"], now),
                      "-" if r["p95_ms"] is None else f"{r['p95_ms']:.2f} ms",
                      "-" if r["error_rate"] is None else f"{r['error_rate']:.1%}",
                      "-" if r["drift"] is None else f"{r['drift']:.3f}")
    con.print(table)
    con.print(f"{sum(1 for r in rows if r['online'])} of {len(rows)} online")


# -- deploy --------------------------------------------------------------------------------------

@click.command("deploy")
@click.argument("name")
@click.argument("version")
@device_choice_options
@repo_option
@db_option
@broker_option
@json_option
def deploy(name: str, version: str, device_ids: tuple[str, ...], select: tuple[str, ...], fleet_name: str | None,
           repo_dir: str | None, db_url: str | None, broker_url: str | None, as_json: bool) -> None:
    """Assign NAME VERSION to devices directly (no stages, no thresholds); the controller publishes it."""
    from edgeship.ota.versions import check_name, parse_version
    from edgeship.toolkit.rollouts import AssignVersion

    check_broker_url(broker_url)
    check_name(name)
    parse_version(version)
    _check_choice("deploy", device_ids, select, fleet_name)
    check_published(repo_dir, (name, version))
    store = open_fleet_store(db_url)
    try:
        targets = _chosen_devices(store, device_ids, select, fleet_name)
        now = time.time()
        by_fleet: dict[str, list[Any]] = {}
        for target in targets:
            by_fleet.setdefault(target.fleet, []).append(target)
        for fleet_id, members in sorted(by_fleet.items()):
            store.enqueue_actions(fleet_id, [AssignVersion(m.id, name, version, reason=f"deploy {name} {version}")
                                             for m in members], now)
    finally:
        store.close()
    doc = {"name": name, "version": version, "queued": [{"device": t.id, "fleet": t.fleet} for t in targets]}
    if as_json:
        emit_json(doc)
        return
    con = console()
    con.print(f"queued {name} {version} for {len(targets)} device(s): " + ", ".join(t.id for t in targets[:20])
              + (" ..." if len(targets) > 20 else ""))
    con.print("the running controller signs and publishes the desired states (see `edgeship fleet ls`)")


def _check_choice(command: str, device_ids: tuple[str, ...], select: tuple[str, ...], fleet_name: str | None) -> None:
    if bool(device_ids) == bool(select):
        raise BadInputError(f"{command} needs either --device ID (repeatable) or --select TAG=VALUE, not both")
    if fleet_name is not None:
        validate_identifier(fleet_name, "fleet")


def _chosen_devices(store: Any, device_ids: tuple[str, ...], select: tuple[str, ...],
                    fleet_name: str | None) -> list[Any]:
    """The devices ``--device`` names (each must be in ``--fleet`` when given), or ``--select`` matches."""
    from edgeship.toolkit.store import parse_selection

    if device_ids:
        targets = [store.get_device(validate_identifier(d, "device id")) for d in dict.fromkeys(device_ids)]
        wrong = [t.id for t in targets if fleet_name is not None and t.fleet != fleet_name]
        if wrong:
            raise BadInputError(f"device {wrong[0]} is not in fleet {fleet_name}")
        return targets
    selection = parse_selection(select)
    targets = store.list_devices(fleet_name, selection)
    if not targets:
        raise BadInputError("no device matches " + ",".join(f"{k}={v}" for k, v in selection) +
                            (f" in fleet {fleet_name}" if fleet_name else ""))
    return targets


@click.command("undeploy")
@click.argument("name")
@device_choice_options
@db_option
@broker_option
@json_option
def undeploy(name: str, device_ids: tuple[str, ...], select: tuple[str, ...], fleet_name: str | None,
             db_url: str | None, broker_url: str | None, as_json: bool) -> None:
    """Take model NAME off devices: the controller publishes their desired set without it (the agent
    unloads it and keeps its slots); their other models stay. Needs multi-model agents: an agent of
    one model cannot be told to serve nothing, and is refused with the reason."""
    from edgeship.ota.versions import check_name
    from edgeship.toolkit.rollouts import RemoveModel

    check_broker_url(broker_url)
    check_name(name)
    _check_choice("undeploy", device_ids, select, fleet_name)
    store = open_fleet_store(db_url)
    try:
        targets = _chosen_devices(store, device_ids, select, fleet_name)
        now = time.time()
        by_fleet: dict[str, list[Any]] = {}
        for target in targets:
            by_fleet.setdefault(target.fleet, []).append(target)
        for fleet_id, members in sorted(by_fleet.items()):
            store.enqueue_actions(fleet_id, [RemoveModel(m.id, name, reason=f"undeploy {name}") for m in members], now)
    finally:
        store.close()
    doc = {"name": name, "queued": [{"device": t.id, "fleet": t.fleet} for t in targets]}
    if as_json:
        emit_json(doc)
        return
    console().print(f"queued the removal of {name} from {len(targets)} device(s): "
                    + ", ".join(t.id for t in targets[:20]) + (" ..." if len(targets) > 20 else ""))


fleet.add_command(fleet_provision)
