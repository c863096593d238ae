"""``edgeship-agent``: run, init, install, status, rollback.

The one place where the agent's domain errors become ``error: ...`` on stderr and
an exit status (1 failure, 2 bad input, 3 gate refused, 4 verification refused,
5 missing extra). Every command takes ``--config`` (default
``/etc/edgeship/agent.toml``, or ``$EDGESHIP_AGENT_CONFIG``) and ``--json``
(stdout then holds exactly one JSON document; progress goes to stderr).

``install`` and ``rollback`` talk to the running agent over its control socket;
when no agent runs they take the data folder's lock and do the update here, up
to activation (probation then runs when the agent starts).

Longer than the project's usual module: one concept, the command line (each command's
options and its one path through the running agent or the data folder's lock).
"""

from __future__ import annotations

__all__ = ["cli", "main"]

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from edgeship.ota.cli_edge import ErrorReportingGroup
from edgeship.ota.errors import EXIT_FAILURE, EXIT_REJECTED, BadInputError, EdgeshipError

from .config import DEFAULT_CONFIG_PATH, AgentConfig, load_config, render_config

_CONFIG_HELP = "agent config file"


def _config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        default=DEFAULT_CONFIG_PATH,
        envvar="EDGESHIP_AGENT_CONFIG",
        show_default=True,
        type=click.Path(dir_okay=False),
        help=_CONFIG_HELP,
    )(func)


def _json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="print one JSON document on stdout"
    )(func)


def _emit(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _say(text: str) -> None:
    click.echo(text, err=True)


def capabilities() -> dict[str, Any]:
    """What this agent can do, for whoever installs or manages it (``--version --json``):
    provisioning reads this instead of guessing from the installed files."""
    from edgeship.ota.director import DESIRED_STATE_SCHEMAS

    from .reporter import agent_version
    from .runtimes import available_runtimes

    return {
        "name": "edgeship-agent",
        "version": agent_version(),
        "protocol": {"mqtt": True, "desired_schema": list(DESIRED_STATE_SCHEMAS), "reported_models": True},
        "runtimes": available_runtimes(include_tensorflow=False),
        "formats": ["tflite", "onnx"],
        "servables": True,
        "api": ["tfserving-rest"],
    }


@click.group(
    cls=ErrorReportingGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--version", "show_version", is_flag=True, help="print the version and exit (with --json: capabilities)")
@click.option("--json", "as_json", is_flag=True, help="with --version: one JSON document of the agent's capabilities")
@click.pass_context
def cli(ctx: click.Context, show_version: bool, as_json: bool) -> None:
    """edgeship-agent: verify, install, self-test, swap, serve, watch and roll back models."""
    if show_version:
        if as_json:
            _emit(capabilities())
        else:
            from .reporter import agent_version

            click.echo(f"edgeship-agent, version {agent_version()}")
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(0)


# -- init ----------------------------------------------------------------------------------------
@cli.command()
@click.option("--data", required=True, help="data folder (slots, state, control socket)")
@click.option(
    "--credentials",
    "credentials",
    default=None,
    type=click.Path(file_okay=False),
    help="the folder `edgeship device credentials ... --repo REPO --out FOLDER` wrote: broker URL, CA, "
    "certificate and key (or password), device id, fleet and trust anchors, all from one option",
)
@click.option("--device-id", default=None, help="this device's id (default: from --credentials)")
@click.option("--fleet", default=None, help="its fleet (default: from --credentials)")
@click.option(
    "--root",
    "root",
    default=None,
    help="trusted root metadata (root.json) of the release repository (default: from --credentials)",
)
@click.option("--director-key", default=None, help="the director's public key, PEM (default: from --credentials)")
@click.option(
    "--bind", default="127.0.0.1:8501", show_default=True, help="HTTP API address HOST:PORT"
)
@click.option(
    "--broker",
    default=None,
    help="MQTT broker URL (mqtt://host:port or mqtts://...); empty: none (default: from --credentials)",
)
@click.option("--threads", default=1, show_default=True, type=int, help="interpreter threads")
@click.option(
    "-o", "--output", "output", default=None, help="where to write the config (default: --config)"
)
@click.option("--force", is_flag=True, help="overwrite an existing file")
@_config_option
@_json_option
def init(
    data: str,
    credentials: str | None,
    device_id: str | None,
    fleet: str | None,
    root: str | None,
    director_key: str | None,
    bind: str,
    broker: str | None,
    threads: int,
    output: str | None,
    force: bool,
    config_path: str,
    as_json: bool,
) -> None:
    """Write a complete, commented agent config.

    With --credentials FOLDER the broker URL, TLS files, device id, fleet and trust
    anchors come from that folder; an option given as well must agree with it.
    """
    from edgeship.ota.atomicfile import atomic_write_text

    from .config import check_trust_anchors, read_credentials

    target = Path(output or config_path)
    if target.exists() and not force:
        raise BadInputError(f"{target} exists; pass --force to overwrite it")
    if threads < 1:
        raise BadInputError("--threads must be >= 1")
    broker_keys: dict[str, str] = {}
    if credentials is not None:
        creds = read_credentials(credentials)
        for option, given, held in (("--device-id", device_id, creds.device_id), ("--fleet", fleet, creds.fleet)):
            if given is not None and given != held:
                raise BadInputError(f"{option} {given} disagrees with --credentials {credentials} ({held})")
        device_id, fleet = creds.device_id, creds.fleet
        root = root or (str(creds.root) if creds.root else None)
        director_key = director_key or (str(creds.director_key) if creds.director_key else None)
        broker = creds.url if broker is None else broker
        broker_keys = creds.broker_keys()
    missing = [name for name, value in (("--device-id", device_id), ("--fleet", fleet), ("--root", root),
                                        ("--director-key", director_key)) if not value]
    if missing:
        raise BadInputError(
            f"missing {', '.join(missing)}: pass them, or --credentials FOLDER made by "
            "`edgeship device credentials ... --repo REPO`"
        )
    assert device_id and fleet and root and director_key
    check_trust_anchors(root, director_key)
    absolute = {
        k: str(Path(v).expanduser().resolve())
        for k, v in (("data", data), ("root", root), ("director_key", director_key))
    }
    text = render_config(
        data=absolute["data"],
        device_id=device_id,
        fleet=fleet,
        root=absolute["root"],
        director_key=absolute["director_key"],
        bind=bind,
        broker=broker or "",
        threads=threads,
        broker_keys=broker_keys,
    )
    if not target.parent.is_dir():
        raise BadInputError(f"folder {target.parent} does not exist")
    # 0644: the service runs as an unprivileged user; the file holds no secrets (broker
    # credentials come from the environment, key files are referenced by path)
    atomic_write_text(target, text, mode=0o644)
    config = load_config(target)
    if as_json:
        _emit(
            {
                "config": str(target),
                "device": config.device_id,
                "fleet": config.fleet,
                "data": str(config.data_dir),
                "broker": config.broker_url,
            }
        )
    else:
        _say(f"wrote {target}" + (f" (device {device_id} of fleet {fleet}, broker {broker})" if broker else ""))


# -- run -----------------------------------------------------------------------------------------
@cli.command()
@_config_option
@_json_option
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("--bind", default=None, help="HTTP API address HOST:PORT (overrides [server] bind)")
@click.option(
    "--token-file", default=None, type=click.Path(dir_okay=False),
    help="bearer token file for the API (overrides [server] token_file; mode 0600)",
)
@click.option(
    "--trusted-network", is_flag=True,
    help="serve a non-loopback --bind without a token or client certificates (you vouch for the network)",
)
def run(
    config_path: str, as_json: bool, log_level: str, bind: str | None, token_file: str | None,
    trusted_network: bool,
) -> None:
    """Serve the active model and carry out updates (the daemon; systemd runs this)."""
    import dataclasses

    from .config import parse_bind
    from .daemon import Agent
    from .reporter import LogReporter

    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(config_path)
    from .config import check_trust_anchors

    check_trust_anchors(config.root_metadata, config.director_key, where=f"config {config.source}: ")
    overrides: dict[str, Any] = {}
    if bind is not None:
        overrides["bind_host"], overrides["bind_port"] = parse_bind(bind, "--bind")
    if token_file is not None:
        overrides["api_token_file"] = Path(token_file).resolve()
    if trusted_network:
        overrides["trusted_network"] = True
    if overrides:
        config = dataclasses.replace(config, **overrides)
    from .fleet_link import open_fleet_link  # MQTT when [broker] url is set

    link = open_fleet_link(config)  # None without a broker: no MQTT at all
    agent = Agent(
        config, reporter=link.reporter if link else LogReporter(), registry=link.registry if link else None,
        hooks=_fault_hooks(config.data_dir),
    ).start()
    if link is not None:
        link.attach(agent)
    model = agent.serving.current
    assert agent.api is not None
    host = agent.api.host
    where = f"{agent.api.scheme}://{f'[{host}]' if ':' in host else host}:{agent.api.port}"
    if as_json:  # one line, printed once the API listens (a supervisor or test can wait for it)
        doc = {"serving": {"name": model.name, "version": model.version} if model else None, "server": where}
        click.echo(json.dumps(doc, sort_keys=True))
        sys.stdout.flush()
    _say(
        f"edgeship-agent {config.device_id}: serving {model.label if model else 'nothing yet'} on {where}"
    )
    try:
        agent.run_forever()
    finally:
        if link is not None:
            link.close()  # status "offline" (a crash leaves that to the last will)


FAULT_ENV = ("EDGESHIP_AGENT_TEST_PAUSE_IN", "EDGESHIP_AGENT_TEST_KILL_IN")
"""Test-only (docs/agent.md, "Crash tests"): comma-separated update states in which the
agent pauses (writing ``<data>/test-paused-in-STATE``) or SIGKILLs itself."""


def _fault_hooks(data_dir: Path) -> Any:
    """Fault injection for crash tests, only when one of FAULT_ENV is set (else None)."""
    import os

    def states(name: str) -> frozenset[str]:
        return frozenset(s.strip().upper() for s in os.environ.get(name, "").split(",") if s.strip())

    pause, kill = (states(name) for name in FAULT_ENV)
    if not pause and not kill:
        return None
    from .faults import FaultHooks

    return FaultHooks(pause_in=pause, kill_in=kill, marker_dir=data_dir)


# -- status --------------------------------------------------------------------------------------
def _status(config: AgentConfig) -> dict[str, Any]:
    from .control import AgentNotRunning, ControlClient
    from .daemon import status_document
    from .models import latest, model_status, stored_states
    from .persistence import AgentState

    try:
        return dict(ControlClient(config.control_socket, timeout=10).call("status")["status"])
    except AgentNotRunning:
        states = stored_states(config)
        primary = latest(states)
        state = states[primary] if primary is not None else AgentState()
        models = [model_status(name, s, None) for name, s in sorted(states.items())]
        return status_document(config, state, running=False, models=models)


@cli.command()
@_config_option
@_json_option
def status(config_path: str, as_json: bool) -> None:
    """Show the active bundle, the last update and, while running, serving figures."""
    config = load_config(config_path)
    doc = _status(config)
    if as_json:
        _emit(doc)
        return
    active = doc["active"]
    click.echo(
        f"device   {doc['device']} (fleet {doc['fleet']}), agent {'running' if doc['running'] else 'stopped'}"
    )
    click.echo(f"active   {active['name'] + ' ' + active['version'] if active else '-'}")
    kept = ", ".join(f"{b['name']} {b['version']}" for b in doc["previous"]) or "-"
    click.echo(f"kept     {kept}")
    for entry in doc.get("models") or []:
        labels = ", ".join(f"{k}={v}" for k, v in sorted((entry.get("labels") or {}).items())) or "-"
        state = (entry.get("update") or {}).get("state") or "-"
        what = "removed" if entry.get("removed") else f"{entry.get('version') or '-'} (serving version {entry.get('serving_version')})"
        click.echo(f"model    {entry['name']}: {what}, labels {labels}, update {state}")
    update = doc["update"]
    if update:
        click.echo(
            f"update   {update['kind']} {update['id']}: {update['state']} - {update['reason']}"
        )
        if update.get("transfer"):
            from .reporter import transfer_summary

            click.echo(f"transfer {transfer_summary(update['transfer'])}")
    serving = doc.get("serving")
    if serving:
        click.echo(
            f"serving  {serving['runtime']} {serving['runtime_version']}, {serving['requests']} requests "
            f"on {doc['server']}"
        )


# -- install / rollback ------------------------------------------------------------------------------
_EXIT_FOR_STATE = {
    "COMMITTED": 0,
    "PROBATION": 0,
    "REJECTED": EXIT_REJECTED,
    "FAILED": EXIT_FAILURE,
}


def _finish(doc: dict[str, Any], kind: str, as_json: bool) -> None:
    update = doc.get("update") or {}
    state = str(update.get("state"))
    if kind == "rollback" or update.get("kind") == "rollback":
        code = 0 if state in ("COMMITTED", "ROLLED_BACK", "PROBATION") else EXIT_FAILURE
    else:
        code = _EXIT_FOR_STATE.get(state, EXIT_FAILURE)
    if as_json:
        _emit(doc)
    active = doc.get("active")
    text = f"update {update.get('id')} ended {state}: {update.get('reason')}"
    if state == "PROBATION":
        text = f"update {update.get('id')} activated; probation runs when the agent starts ({update.get('reason')})"
    if code:
        _say(f"error: {text}")
    else:
        _say(text)
        _say(f"active: {active['name']} {active['version']}" if active else "active: none")
    sys.exit(code)


def _follow(config: AgentConfig, update_id: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the running agent until ``update_id`` ends, printing each state reached."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        doc = _status(config)
        update = doc.get("update") or {}
        for entry in doc.get("models") or []:  # another model may have changed since: find ours
            if (entry.get("update") or {}).get("id") == update_id and update.get("id") != update_id:
                update = entry["update"]
                doc = {**doc, "update": update, "active": entry.get("active")}
        if update.get("id") != update_id:
            raise EdgeshipError(f"update {update_id} is no longer the agent's current update")
        history = update.get("history") or []
        for step in history[seen:]:
            if not quiet:
                _say(f"  {step['state']:<13} {step['reason']}")
        seen = len(history)
        if update.get("terminal"):
            return doc
        if time.monotonic() > deadline:
            raise EdgeshipError(
                f"update {update_id} still in {update.get('state')} after {timeout:g} s "
                "(it goes on in the agent; see `edgeship-agent status`)"
            )
        time.sleep(0.2)


AGENT_ANSWER_WAIT_S = 120.0
"""How long a command waits for an agent that holds the lock to answer on its
control socket (it is starting: loading and warming its model)."""


def _through_agent_or_locked(
    config: AgentConfig, op: str, role: str, **args: Any
) -> tuple[dict[str, Any] | None, Any]:
    """Send ``op`` to the running agent, or take the data folder's lock when none runs.

    Returns (the agent's reply, None) or (None, the held lock). An agent that holds
    the lock but does not answer yet is starting: wait for it to answer and go
    through it. Another command holding the lock (an install or rollback run
    without an agent) is waited for.
    """
    from .control import AgentLock, AgentNotRunning, ControlClient

    deadline = time.monotonic() + AGENT_ANSWER_WAIT_S
    told = False
    while True:
        try:
            return ControlClient(config.control_socket).call(op, **args), None
        except AgentNotRunning:
            pass
        lock = AgentLock(config.lock_file)
        if lock.acquire(role=role):
            return None, lock
        pid, holder = lock.holder()
        if holder in (None, "run") and time.monotonic() > deadline:
            raise EdgeshipError(
                f"an agent (pid {pid}) holds {config.lock_file} but has not answered on "
                f"{config.control_socket} for {AGENT_ANSWER_WAIT_S:g} s; try again, or restart it"
            )
        if not told:  # progress: on stderr, with --json too
            what = "the agent to start" if holder in (None, "run") else f"`edgeship-agent {holder}`"
            _say(f"waiting for {what} (pid {pid}) ...")
            told = True
        time.sleep(0.1)


def _offline(config: AgentConfig, start: Callable[[Any], Any], quiet: bool, lock: Any) -> dict[str, Any]:
    """No agent runs: with the lock held, drive the update here (up to PROBATION).
    ``start(models)`` begins it and returns the driver that runs it."""
    from .daemon import status_document
    from .isolated import isolate_verification
    from .models import ModelSet, model_status
    from .servables import Servables
    from .sources import SourceRegistry

    try:
        models = ModelSet(
            config, Servables(), reporter=_ProgressReporter(quiet),
            registry=SourceRegistry(wrap=isolate_verification), serving=False,
        )
        models.open(resume=False)
        for driver in models.drivers():
            update = driver.state.update
            # an update interrupted before activation is finished here first; one waiting in
            # PROBATION (deferred to the running agent) is left alone: no restart is counted
            if driver.in_progress and update is not None and update.state != "PROBATION":
                driver.prepare_resume()
                driver.run(stop_at_probation=True)
        driver = start(models)
        driver.run(stop_at_probation=True)
        listed = [model_status(d.name, d.snapshot(), None) for d in models.drivers()]
        return status_document(config, driver.snapshot(), running=False, models=listed)
    finally:
        lock.release()


class _ProgressReporter:
    """Prints each update state as it is entered (unless quiet); nothing else. (Not a
    reporter.NullReporter subclass: importing that module costs every command ~40 ms.)"""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def report_event(self, event: dict[str, Any]) -> None:
        if not self.quiet:
            _say(f"  {event.get('state', ''):<13} {event.get('detail', '')}")

    def report_state(self, state: dict[str, Any]) -> None:
        pass

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        pass


@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@_config_option
@_json_option
@click.option("--no-wait", is_flag=True, help="return once the running agent accepted the update")
@click.option(
    "--timeout", default=3600.0, show_default=True, help="seconds to wait for the update to end"
)
def install(package: str, config_path: str, as_json: bool, no_wait: bool, timeout: float) -> None:
    """Install an offline update package (from `edgeship bundle export`)."""
    from .isolated import isolate_verification
    from .sources import OfflinePackageSource

    config = load_config(config_path)
    path = Path(package).resolve()
    if not path.is_file():
        raise BadInputError(f"offline package {package}: no such file")
    reply, lock = _through_agent_or_locked(config, "install", "install", package=str(path))
    if reply is None:

        def begin(models: Any) -> Any:
            from .models import peek_package_models, read_index

            names = peek_package_models(path)
            drivers = []
            for name in names:  # a package of several models: one update each, in turn
                models.unremove(name)
                driver = models.driver(name)
                base = int(read_index(config).get("last_sequence", 0))
                source = OfflinePackageSource(path, model=name if len(names) > 1 else None)
                driver.begin(isolate_verification(source), base_sequence=base)
                if name != names[-1]:
                    driver.run(stop_at_probation=True)
                drivers.append(driver)
            failed = [d for d in drivers[:-1] if d.state.update is not None
                      and d.state.update.state not in ("PROBATION", "COMMITTED")]
            return failed[0] if failed else drivers[-1]

        _finish(_offline(config, begin, as_json, lock), "install", as_json)
        return
    others = [u for u in reply.get("updates") or [] if u.get("update") != reply["update"]]
    if others and not no_wait:  # a package of several models: follow each, report the first that failed
        docs = [_follow(config, u["update"], timeout, as_json) for u in [reply, *others]]
        codes = [_EXIT_FOR_STATE.get(str((d.get("update") or {}).get("state")), EXIT_FAILURE) for d in docs]
        _finish(next((d for d, c in zip(docs, codes) if c), docs[-1]), "install", as_json)
        return
    _accepted(config, reply, f"update {reply['update']} accepted by the running agent", "install",
              no_wait=no_wait, timeout=timeout, as_json=as_json)


def _accepted(config: Any, reply: dict[str, Any], message: str, what: str, *, no_wait: bool,
              timeout: float, as_json: bool) -> None:
    """The running agent accepted ``what``: say so (``--no-wait``), or follow it to its end."""
    if no_wait:
        if as_json:
            _emit(reply)
        else:
            _say(message)
        return
    _finish(_follow(config, reply["update"], timeout, as_json), what, as_json)


@cli.command()
@_config_option
@_json_option
@click.option("--no-wait", is_flag=True, help="return once the running agent accepted the rollback")
@click.option(
    "--timeout", default=3600.0, show_default=True, help="seconds to wait for the rollback to end"
)
@click.option("--model", "model", default=None, help="which model (needed when the device serves several)")
def rollback(config_path: str, as_json: bool, no_wait: bool, timeout: float, model: str | None) -> None:
    """Roll back: abort the update in progress, or go back to the previous kept bundle."""
    config = load_config(config_path)
    reply, lock = _through_agent_or_locked(config, "rollback", "rollback", **({"model": model} if model else {}))
    if reply is None:

        def start(models: Any) -> Any:
            names = [model] if model else models.names()
            busy = [n for n in names if models.get(n) is not None and models.get(n).in_progress]
            if model and models.get(model) is None:
                raise BadInputError(f"no model {model!r} on this device (models: {', '.join(models.names()) or 'none'})")
            if not names:
                raise BadInputError("nothing to roll back to: no model is installed on this device")
            if len(busy) != 1 and len(names) != 1:
                raise BadInputError(f"name the model (--model): this device serves {', '.join(names)}")
            driver = models.driver(busy[0] if len(busy) == 1 else names[0])
            source = driver.rollback_request()
            if source is not None:
                driver.begin(source, kind="rollback")
            return driver

        _finish(_offline(config, start, as_json, lock), "rollback", as_json)
        return
    _accepted(config, reply, f"rollback accepted by the running agent (update {reply.get('update')})",
              "rollback", no_wait=no_wait, timeout=timeout, as_json=as_json)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``edgeship-agent``."""
    cli.main(args=argv, prog_name="edgeship-agent")


if __name__ == "__main__":  # pragma: no cover
    main()
