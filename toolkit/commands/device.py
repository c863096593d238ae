"""``edgeship device``: device identities and provisioning.

``device`` is a plain click group: other parts add their own subcommands
(``show``, ``tag``) with ``@device.command(...)`` or ``device.add_command(...)``.
``fleet_provision`` is attached to the ``fleet`` group as ``edgeship fleet provision``.
"""

from __future__ import annotations

__all__ = ["device", "credentials", "revoke", "provision_cmd", "deprovision_cmd", "fleet_provision"]

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..identities import BrokerFolder
from ..output import console, emit_json
from ..provisioning import (
    RUNTIMES,
    FabricShell,
    HostEntry,
    HostRequirements,
    ProvisionOptions,
    ProvisionReport,
    SshTarget,
    StepResult,
    deprovision,
    parse_hosts_file,
    parse_tags,
    parse_target,
    provision,
)
from .device_records import device_show, device_tag

BROKER_DIR_HELP = "The broker folder made by `edgeship broker config` (env EDGESHIP_BROKER_DIR)."


@click.group("device")
def device() -> None:
    """Device identities, details and provisioning."""


@device.command("credentials")
@click.argument("device_id")
@click.option("--fleet", required=True, help="The fleet the device belongs to.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write the credentials to.")
@click.option("--broker-dir", required=True, envvar="EDGESHIP_BROKER_DIR", type=click.Path(file_okay=False),
              help=BROKER_DIR_HELP)
@click.option("--auth", type=click.Choice(["cert", "password"]), default=None,
              help="A client certificate (default) or a password entry (the broker's mode decides the default).")
@click.option("--reissue", is_flag=True, help="Replace active credentials (the old ones are revoked).")
@click.option("--repo", "repo", type=click.Path(file_okay=False), default=None, envvar="EDGESHIP_REPO",
              help="Also copy this release repository's trust anchors (root.json, director.pub) into the folder "
                   "(env EDGESHIP_REPO): then `edgeship-agent init --credentials OUT` needs nothing else.")
@click.option("--root", "root", type=click.Path(dir_okay=False), default=None,
              help="Trusted root metadata (root.json) to copy, instead of --repo.")
@click.option("--director-key", type=click.Path(dir_okay=False), default=None,
              help="The director's public key to copy, instead of --repo.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def credentials(device_id: str, fleet: str, out: str, broker_dir: str, auth: str | None, reissue: bool,
                repo: str | None, root: str | None, director_key: str | None, as_json: bool) -> None:
    """Issue DEVICE_ID's broker credentials and the files it needs to trust the broker
    (and, with --repo, the release repository): one folder for `edgeship-agent init --credentials`."""
    from edgeship.ota.errors import BadInputError

    from ..identities import add_trust_anchors

    if repo:
        from edgeship.ota.release import ReleaseRepository

        release = ReleaseRepository(repo)
        root = root or str(release.root_metadata_path)
        director_key = director_key or str(release.director_public_key_path)
    if bool(root) != bool(director_key):
        raise BadInputError("pass --repo RELEASE_REPO, or both --root ROOT.json and --director-key KEY.pub")
    for what, path in (("--root", root), ("--director-key", director_key)):
        if path and not Path(path).is_file():
            raise BadInputError(f"{what} {path}: no such file")  # refused before any identity is issued
    issued = BrokerFolder(broker_dir).issue_device(device_id, fleet, out, auth=auth, reissue=reissue)
    anchors: dict[str, str] = {}
    if root and director_key:
        anchors = add_trust_anchors(issued.out, root=root, director_key=director_key)
    if as_json:
        emit_json({**issued.to_dict(), "trust_anchors": anchors})
        return
    con = console()
    what = f"certificate (serial {issued.record.serial})" if issued.record.auth == "cert" else "password"
    con.print(f"[green]✓[/green] {device_id} of fleet {fleet}: {what} written to {issued.out}")
    if issued.replaced_serial:
        con.print(f"  the previous credentials ({issued.replaced_serial}) are revoked")
    con.print(f"  connects to {issued.url} as {device_id}")
    if anchors:
        con.print("  with the release repository's trust anchors (root.json, director.pub)")
    con.print(f"  on the device: edgeship-agent init --credentials {issued.out} --data DATA_DIR")
    _say_reload(issued.broker_reloaded)


@device.command("revoke")
@click.argument("device_id")
@click.option("--broker-dir", required=True, envvar="EDGESHIP_BROKER_DIR", type=click.Path(file_okay=False),
              help=BROKER_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def revoke(device_id: str, broker_dir: str, as_json: bool) -> None:
    """Revoke DEVICE_ID's broker credentials (CRL, password file and ACL), and reload the broker."""
    result = BrokerFolder(broker_dir).revoke(device_id)
    if as_json:
        emit_json(result.to_dict())
        return
    con = console()
    if result.changed:
        con.print(f"[green]✓[/green] {device_id}: credentials revoked")
    else:
        con.print(f"{device_id}: already revoked; nothing changed")
    _say_reload(result.broker_reloaded)


def _say_reload(pid: int | None) -> None:
    con = console()
    if pid:
        con.print(f"  the running broker (pid {pid}) reloaded its ACL, passwords and CRL")
    else:
        con.print("  no Mosquitto runs from this broker folder: the change applies when it starts "
                  "(or copy acl, passwd and ca/crl.pem to your broker and send it SIGHUP)")


# -- provisioning over SSH -------------------------------------------------------------------------

def _provision_options(func: Any) -> Any:
    """The options `device provision` and `fleet provision` share."""
    options = [
        click.option("--fleet", required=True, help="The fleet the device joins."),
        click.option("--identity", "identity", type=click.Path(dir_okay=False), default=None,
                     help="SSH private key (default: your agent and ~/.ssh keys)."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
                     help="Accept only host keys listed in this file (default: accept a new host's key)."),
        click.option("--runtime", type=click.Choice(RUNTIMES), default="onnx", show_default=True,
                     help="The model runtime installed on the device."),
        click.option("--wheelhouse", type=click.Path(file_okay=False, exists=True), default=None,
                     help="Install offline from these wheels (else: build edgeship here, the device's index for the rest)."),
        click.option("--prefix", default=None, help="Install folder on the device (default /opt/edgeship for root, else ~/edgeship)."),
        click.option("--broker-dir", envvar="EDGESHIP_BROKER_DIR", type=click.Path(file_okay=False), default=None,
                     help=BROKER_DIR_HELP + " Without it the agent runs with no broker."),
        click.option("--broker-url", default=None, help="The broker URL as the device reaches it (default: from the broker folder)."),
        click.option("--repo", "repo", type=click.Path(file_okay=False), default=None,
                     help="The release repository: its root metadata and director key are installed."),
        click.option("--root", "root", type=click.Path(dir_okay=False), default=None,
                     help="Trusted root metadata (root.json), instead of --repo."),
        click.option("--director-key", type=click.Path(dir_okay=False), default=None,
                     help="The director's public key, instead of --repo."),
        click.option("--bind", default="127.0.0.1:8501", show_default=True, help="The agent's HTTP API address."),
        click.option("--min-disk-mb", type=int, default=None,
                     help="Refuse hosts with less free disk (default 300, env EDGESHIP_PROVISION_MIN_DISK_MB)."),
        click.option("--min-memory-mb", type=int, default=None,
                     help="Refuse hosts with less available memory (default 128, env EDGESHIP_PROVISION_MIN_MEMORY_MB)."),
        click.option("--no-wait", is_flag=True, help="Do not wait for the device to report online over MQTT."),
        click.option("--online-timeout", type=float, default=60.0, show_default=True,
                     help="Seconds to wait for the device to report online."),
        click.option("--db", "db_url", envvar="EDGESHIP_DB", default=None, metavar="URL",
                     help="The fleet store (env EDGESHIP_DB): the device's tags are recorded there once the "
                          "controller knows it, so --select TAG=VALUE finds it."),
        click.option("--dry-run", is_flag=True, help="Print every step; change nothing (the host is only probed)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _build_options(kw: dict[str, Any], *, device_id: str | None, tags: dict[str, str]) -> ProvisionOptions:
    from edgeship.ota.errors import BadInputError

    root, director = kw["root"], kw["director_key"]
    if kw["repo"]:
        from edgeship.ota.release import ReleaseRepository

        repo = ReleaseRepository(kw["repo"])
        root = root or str(repo.root_metadata_path)
        director = director or str(repo.director_public_key_path)
    if not root or not director:
        raise BadInputError("pass --repo RELEASE_REPO, or --root ROOT.json and --director-key KEY.pub")
    if kw["db_url"]:
        from edgeship.toolkit.store import check_store_url

        check_store_url(kw["db_url"])  # refused before any host is touched
    return ProvisionOptions(
        fleet=kw["fleet"], runtime=kw["runtime"], device_id=device_id, tags=tags,
        wheelhouse=Path(kw["wheelhouse"]) if kw["wheelhouse"] else None, prefix=kw["prefix"],
        broker_dir=Path(kw["broker_dir"]) if kw["broker_dir"] else None, broker_url=kw["broker_url"],
        root_metadata=Path(root), director_key=Path(director),
        requirements=HostRequirements.from_env(min_disk_mb=kw["min_disk_mb"], min_memory_mb=kw["min_memory_mb"]),
        wait_online=not kw["no_wait"], online_timeout=kw["online_timeout"], dry_run=kw["dry_run"], bind=kw["bind"],
        db_url=kw["db_url"],
    )


_MARK = {"changed": "[green]✓[/green]", "unchanged": "[dim]=[/dim]", "skipped": "[yellow]-[/yellow]",
         "planned": "[cyan]→[/cyan]", "failed": "[red]✗[/red]"}


def _print_step(con: Any, step: StepResult, prefix: str = "") -> None:
    from rich.markup import escape

    detail = f": {step.detail}" if step.detail else ""
    con.print(f"{prefix}{_MARK.get(step.status, '?')} " + escape(f"{step.name} [{step.status}]{detail}"),
              highlight=False)


@device.command("provision")
@click.argument("target")
@click.option("--port", type=int, default=None, help="SSH port (default 22, or the one in TARGET).")
@click.option("--device-id", default=None, help="The device id (default: its host name, or the one it was given).")
@click.option("--tags", "tags", multiple=True, help="KEY=VALUE tag (repeatable).")
@_provision_options
def provision_cmd(target: str, port: int | None, device_id: str | None, tags: tuple[str, ...], **kw: Any) -> None:
    """Install the agent on USER@HOST over SSH, give it its credentials, start it, wait until it is online.

    Idempotent: a second run repairs what differs and otherwise changes nothing.
    """
    ssh_target = parse_target(target, port=port)
    options = _build_options(kw, device_id=device_id, tags=parse_tags(tags))
    con = console(stderr=kw["as_json"])
    with _shell(ssh_target, kw) as shell:
        report = provision(shell, str(ssh_target), options, on_step=lambda s: _print_step(con, s))
    _finish_report(con, report, kw["as_json"], dry_run=options.dry_run, verb="provisioned")


@device.command("deprovision")
@click.argument("target")
@click.option("--port", type=int, default=None, help="SSH port (default 22, or the one in TARGET).")
@click.option("--device-id", default=None, help="The device id whose credentials to revoke (default: what the device says).")
@click.option("--identity", type=click.Path(dir_okay=False), default=None, help="SSH private key.")
@click.option("--known-hosts", type=click.Path(dir_okay=False), default=None, help="Accept only these host keys.")
@click.option("--prefix", default=None, help="Install folder on the device (default as for provision).")
@click.option("--broker-dir", envvar="EDGESHIP_BROKER_DIR", type=click.Path(file_okay=False), default=None,
              help=BROKER_DIR_HELP)
@click.option("--dry-run", is_flag=True, help="Print every step; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def deprovision_cmd(target: str, port: int | None, device_id: str | None, identity: str | None,
                    known_hosts: str | None, prefix: str | None, broker_dir: str | None, dry_run: bool,
                    as_json: bool) -> None:
    """Stop and remove the agent from USER@HOST, and revoke its broker credentials."""
    ssh_target = parse_target(target, port=port)
    con = console(stderr=as_json)
    with _shell(ssh_target, {"identity": identity, "known_hosts": known_hosts}) as shell:
        report = deprovision(shell, str(ssh_target), prefix=prefix, broker_dir=Path(broker_dir) if broker_dir else None,
                             device_id=device_id, dry_run=dry_run, on_step=lambda s: _print_step(con, s))
    _finish_report(con, report, as_json, dry_run=dry_run, verb="deprovisioned")


@contextlib.contextmanager
def _shell(target: SshTarget, kw: dict[str, Any]) -> Iterator[FabricShell]:
    shell = FabricShell(target, identity=kw.get("identity"), known_hosts=kw.get("known_hosts"))
    try:
        yield shell
    finally:
        shell.close()


def _finish_report(con: Any, report: ProvisionReport, as_json: bool, *, dry_run: bool, verb: str) -> None:
    if as_json:
        emit_json({**report.to_dict(), "dry_run": dry_run})
        return
    for note in report.notes:
        con.print("[yellow]note:[/yellow] " + _escape(note))
    if dry_run:
        con.print(f"dry run: nothing was changed on {report.target}")
    elif report.changed:
        con.print(_escape(f"{report.target}: {verb} ({report.device_id or 'device'} in {report.prefix})"))
    else:
        con.print(_escape(f"{report.target}: nothing changed, already {verb}"))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@click.command("provision")
@click.argument("hosts_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True, help="Devices at once.")
@_provision_options
def fleet_provision(hosts_file: str, parallel: int, **kw: Any) -> None:
    """Provision every device of HOSTS_FILE, N at a time; one failure does not stop the others.

    HOSTS_FILE: one device per line, `USER@HOST[:PORT] [id=DEVICE_ID] [KEY=VALUE ...]`, `#` comments.
    Exit status: 0 all done, 3 some hosts were refused (and nothing else failed), 1 some failed.
    """
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from edgeship.ota.errors import EXIT_FAILURE, EXIT_GATE_FAILED, EdgeshipError, first_line

    from ..provisioning import collect_wheels

    entries = parse_hosts_file(Path(hosts_file).read_text(), where=hosts_file)
    base = _build_options(kw, device_id=None, tags={})
    build_dir = tempfile.TemporaryDirectory(prefix="edgeship-wheels-")
    # one wheel build for every device (parallel builds would share the source tree's build/)
    wheels, complete = collect_wheels(base.wheelhouse, Path(build_dir.name))
    base = replace(base, wheels=(tuple(wheels), complete))
    con = console(stderr=kw["as_json"])
    rows: dict[str, dict[str, str]] = {str(e.target): {"device": e.device_id or "", "step": "waiting", "status": ""}
                                       for e in entries}
    lock = threading.Lock()
    results: dict[str, dict[str, Any]] = {}

    def one(entry: HostEntry) -> None:
        name = str(entry.target)

        def on_step(step: StepResult) -> None:
            with lock:
                rows[name].update(step=step.name, status=step.status)

        options = replace(base, device_id=entry.device_id, tags={**entry.tags})
        with lock:
            rows[name]["step"] = "connect"
        try:
            with _shell(entry.target, kw) as shell:
                report = provision(shell, name, options, on_step=on_step)
            with lock:
                rows[name].update(device=report.device_id, step="done",
                                  status="changed" if report.changed else "unchanged")
                results[name] = {"ok": True, **report.to_dict()}
        except EdgeshipError as exc:
            with lock:
                rows[name].update(status="refused" if exc.exit_code == EXIT_GATE_FAILED else "failed")
                results[name] = {"ok": False, "target": name, "error": exc.message, "exit_code": exc.exit_code}
        except Exception as exc:  # noqa: BLE001 - one host's surprise must not stop the others
            with lock:
                rows[name].update(status="failed")
                results[name] = {"ok": False, "target": name, "error": f"{type(exc).__name__}: {first_line(exc)}",
                                 "exit_code": EXIT_FAILURE}

    def table() -> Any:
        from rich.table import Table

        t = Table("host", "device", "step", "status", title=f"provisioning {len(entries)} devices")
        with lock:
            for host, row in rows.items():
                t.add_row(*(_escape(x) for x in (host, row["device"], row["step"], row["status"])))
        return t

    from rich.live import Live

    with Live(table(), console=con, refresh_per_second=4, transient=False) as live:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(one, e) for e in entries]
            while not all(f.done() for f in futures):
                live.update(table())
                time.sleep(0.25)
        live.update(table())
    con.print()
    build_dir.cleanup()
    failed = [r for r in results.values() if not r["ok"]]
    if kw["as_json"]:
        emit_json({"hosts": [results[str(e.target)] for e in entries], "failed": len(failed),
                   "dry_run": base.dry_run})
    elif failed:
        con.print(f"[red]{len(failed)} of {len(entries)} devices failed:[/red]")
        for r in failed:
            con.print("  " + _escape(f"{r['target']}: {r['error']}"))
    else:
        con.print(f"all {len(entries)} devices provisioned")
    if failed:
        code = EXIT_GATE_FAILED if all(r["exit_code"] == EXIT_GATE_FAILED for r in failed) else EXIT_FAILURE
        sys.exit(code)


device.add_command(device_show)
device.add_command(device_tag)
