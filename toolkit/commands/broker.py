"""``edgeship broker``: generate a locked-down Mosquitto, or run the embedded broker.

``broker config --out DIR`` writes the fleet CA, the server certificate, the
controller's identity, mosquitto.conf, the ACL, the password file and the CRL
(docs/security.md). Running it again keeps the CA and every identity and only
rewrites what changed.

``broker run`` starts the embedded pure-Python broker (amqtt) for development:
anonymous and without topic rules, or with ``--broker-dir`` the folder's
password identities and the same per-device topic rules
(``edgeship.toolkit.embedded_rules``; no TLS, no certificates: docs/security.md).
"""

from __future__ import annotations

__all__ = ["broker"]

import getpass
import os
import signal
import threading
from typing import Any

import click

from edgeship.ota.errors import BadInputError, EdgeshipError

from ..broker_config import AUTH_MODES, BrokerSettings
from ..identities import BrokerFolder
from ..output import console, emit_json


def _default_run_as() -> str:
    """The account Mosquitto will run as: ``mosquitto`` for a root-started broker, else yourself."""
    if os.geteuid() != 0:
        return getpass.getuser()
    import pwd

    try:
        pwd.getpwnam("mosquitto")
        return "mosquitto"
    except KeyError:
        return "root"


@click.group("broker")
def broker() -> None:
    """Generate a locked-down Mosquitto configuration, or run the embedded broker."""


@broker.command("config")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="The broker folder to write.")
@click.option("--port", type=int, default=None, help="Listener port (default 8883).")
@click.option("--password-port", type=int, default=None, help="Password listener port with --auth both (default 8884).")
@click.option("--auth", type=click.Choice(AUTH_MODES), default=None,
              help="cert: client certificates (default); password: user+password over TLS; both: two listeners.")
@click.option("--bind", default=None, help="Address the listeners bind to (default 127.0.0.1).")
@click.option("--name", "names", multiple=True,
              help="Extra DNS name or IP of the server certificate (repeatable; localhost and 127.0.0.1 are always in).")
@click.option("--prefix", default=None, help="MQTT topic prefix (default edgeship).")
@click.option("--controller", default=None, help="The controller's identity (default edgeship-controller).")
@click.option("--run-as", default=None, help="Account Mosquitto runs as (default: mosquitto when root, else you).")
@click.option("--persistence/--no-persistence", default=None, help="Keep retained messages across restarts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def config(out: str, port: int | None, password_port: int | None, auth: str | None, bind: str | None,
           names: tuple[str, ...], prefix: str | None, controller: str | None, run_as: str | None,
           persistence: bool | None, as_json: bool) -> None:
    """Write (or update) a broker folder: CA, certificates, mosquitto.conf, ACL, passwords, CRL.

    Options not given keep the folder's saved value (or the default for a new folder).
    """
    folder = BrokerFolder(out)
    base = folder.settings() if folder.exists() else BrokerSettings(run_as=_default_run_as())
    if controller is not None and folder.exists() and controller != base.controller:
        raise BadInputError(
            f"the broker in {folder.path} already has controller identity {base.controller!r}; "
            "changing it is not supported (make a new broker folder)"
        )
    settings = BrokerSettings(
        prefix=prefix if prefix is not None else base.prefix,
        bind=bind if bind is not None else base.bind,
        port=port if port is not None else base.port,
        password_port=password_port if password_port is not None else base.password_port,
        auth=auth if auth is not None else base.auth,
        names=tuple(names) if names else base.names,
        controller=controller if controller is not None else base.controller,
        persistence=persistence if persistence is not None else base.persistence,
        run_as=run_as if run_as is not None else base.run_as,
    )
    result = folder.create_or_update(settings)
    if as_json:
        emit_json(result)
        return
    con = console()
    if result["changed"]:
        for line in result["changed"]:
            con.print(f"[green]✓[/green] {line}")
    else:
        con.print("nothing changed: the broker folder is up to date")
    con.print(f"broker folder: {folder.path}")
    con.print(f"controller credentials: {folder.controller_dir}")
    con.print(f"run it with: {result['run']}")
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@broker.command("replica")
@click.argument("name")
@click.option("--dir", "folder_path", required=True, envvar="EDGESHIP_BROKER_DIR",
              type=click.Path(file_okay=False), help="The broker folder (env EDGESHIP_BROKER_DIR).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write them to.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def replica(name: str, folder_path: str, out: str, as_json: bool) -> None:
    """Issue credentials for one more controller replica (an identity of its own, NAME).

    The broker names every client by its identity, so each replica needs its own;
    run it with `edgeship controller --credentials OUT`.
    """
    issued = BrokerFolder(folder_path).issue_controller(name, out)
    if as_json:
        emit_json(issued.to_dict())
        return
    con = console()
    con.print(f"[green]✓[/green] controller replica {name}: credentials written to {issued.out}")
    con.print(f"  run it with: edgeship controller --credentials {issued.out} --repo REPO")


@broker.command("status")
@click.option("--dir", "folder_path", required=True, envvar="EDGESHIP_BROKER_DIR",
              type=click.Path(file_okay=False), help="The broker folder (env EDGESHIP_BROKER_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def status(folder_path: str, as_json: bool) -> None:
    """List the identities issued by a broker folder and whether its Mosquitto runs."""
    folder = BrokerFolder(folder_path).require()
    info = folder.status()
    if as_json:
        emit_json(info)
        return
    from rich.table import Table

    table = Table("identity", "kind", "fleet", "auth", "issued", "revoked")
    for r in info["identities"]:
        table.add_row(r["name"], r["kind"], r["fleet"], r["auth"], r["issued"], r["revoked"] or "")
    con = console()
    con.print(table)
    pid = info["broker_pid"]
    con.print(f"mosquitto: {'running, pid ' + str(pid) if pid else 'not running from this folder'}")


@broker.command("run")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=1883, show_default=True, type=int, help="Port to listen on.")
@click.option("--broker-dir", type=click.Path(file_okay=False), default=None,
              help="Enforce this broker folder's password identities and topic rules (made with --auth password).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document once listening.")
@click.option("-v", "--verbose", is_flag=True, help="Show amqtt's own warnings (refused sessions, dropped messages).")
def run(host: str, port: int, broker_dir: str | None, as_json: bool, verbose: bool) -> None:
    """Run the embedded broker (amqtt) for development, until interrupted.

    Without --broker-dir it accepts anonymous clients and enforces no topic
    rules. With it, clients log in with the folder's password identities and
    the same per-device topic rules apply (no TLS, no certificates: loopback
    only). A fleet on a network uses Mosquitto from `broker config`.
    """
    from edgeship.ota.errors import require_module

    require_module("amqtt.broker", "host")
    if not verbose:
        # amqtt warns about every client that probes MQTT 5 first (our agents and controller do, then
        # use 3.1.1) and about queued messages at shutdown: noise for a development broker
        import logging

        logging.getLogger("amqtt").setLevel(logging.ERROR)
    try:
        from ..embedded_broker import EmbeddedBroker
    except ImportError:
        raise EdgeshipError(
            "the embedded broker (edgeship.toolkit.embedded_broker) is not part of this build; "
            "run Mosquitto from `edgeship broker config` instead"
        ) from None
    embedded: Any
    if broker_dir:
        from ..embedded_rules import RuledEmbeddedBroker

        embedded = RuledEmbeddedBroker(host, port, broker_dir)
    else:
        embedded = EmbeddedBroker(host, port)
    embedded.start()
    ruled = broker_dir is not None
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = str(getattr(embedded, "url", f"mqtt://{host}:{port}"))
        if as_json:
            emit_json({"url": url, "acl": ruled, "anonymous": not ruled})
        elif ruled:
            click.echo(f"embedded broker listening on {url} with the password identities and topic rules of "
                       f"{broker_dir} (no TLS: development only); Ctrl-C stops it", err=True)
        else:
            click.echo(f"embedded broker listening on {url} "
                       "(anonymous, no topic rules: development only); Ctrl-C stops it", err=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        embedded.stop()
