"""The step runner: one executor per kind of planned step, and the report it fills in.

An executor holds no decision of its own beyond what only doing it can tell: whether
``edgeship-agent init`` wrote a different config, and what the installed agent says it can do
(``edgeship-agent --version --json``). SQL goes through the fleet store
(``FleetStore.tag_reported_device``), MQTT through ``edgeship.toolkit.device_presence``.
"""

from __future__ import annotations

__all__ = [
    "ProvisionOptions",
    "ProvisionReport",
    "StepCallback",
    "StepResult",
    "EXECUTORS",
    "Execution",
    "read_agent_capabilities",
    "record_fleet_tags",
]

import hashlib
import json
import math
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.ota.errors import BadInputError

from .files import (
    broker_table_lines,
    render_agent_env,
    render_start_script,
)
from .hosts import (
    AGENT_UNIT,
    AgentCapabilities,
    HostFacts,
    HostRequirements,
    ProvisionError,
    parse_agent_capabilities,
)
from .plan import (
    IF_CHANGED,
    PlannedStep,
    WantedInstall,
)
from .shell import RemoteShell


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str  # "unchanged" | "changed" | "skipped" | "planned" | "failed"
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"step": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class ProvisionOptions:
    fleet: str
    runtime: str = "onnx"
    device_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    wheelhouse: Path | None = None
    prefix: str | None = None
    broker_dir: Path | None = None
    broker_url: str | None = None
    root_metadata: Path | None = None
    director_key: Path | None = None
    requirements: HostRequirements = field(default_factory=HostRequirements)
    wait_online: bool = True
    online_timeout: float = 60.0
    dry_run: bool = False
    bind: str = "127.0.0.1:8501"
    wheels: tuple[tuple[Path, ...], bool] | None = None
    """Wheels collected once for many devices (``collect_wheels``' result); None: collect per run."""
    db_url: str | None = None
    """The fleet store: ``tags`` are recorded there once the device has reported (``--select`` finds it)."""
    tags_timeout: float = 20.0
    """How long to wait for the controller to know the device before giving up on recording its tags."""

    def __post_init__(self) -> None:
        # refused here, before any host is touched: a bad value would otherwise surface only after
        # the whole install, when waiting for the device
        if not (math.isfinite(self.online_timeout) and self.online_timeout > 0):
            raise BadInputError(f"--online-timeout {self.online_timeout:g}: use a positive number of seconds")


@dataclass
class ProvisionReport:
    target: str
    device_id: str = ""
    prefix: str = ""
    steps: list[StepResult] = field(default_factory=list)
    facts: HostFacts | None = None
    notes: list[str] = field(default_factory=list)
    agent: AgentCapabilities | None = None

    @property
    def changed(self) -> bool:
        return any(s.status == "changed" for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "target": self.target, "device_id": self.device_id, "prefix": self.prefix,
            "changed": self.changed, "steps": [s.to_dict() for s in self.steps],
            "host": self.facts.to_dict() if self.facts else None, "notes": self.notes}
        if self.agent is not None:
            doc["agent"] = {"version": self.agent.version, "mqtt": self.agent.mqtt,
                            "desired_schema": list(self.agent.desired_schemas)}
        return doc


StepCallback = Callable[[StepResult], None]


def read_agent_capabilities(shell: RemoteShell, prefix: str) -> AgentCapabilities:
    """Ask the installed agent what it can do (``--version --json``, or the plain ``--version``)."""
    agent = f"{shlex.quote(prefix)}/venv/bin/edgeship-agent"
    as_json = shell.run(f"{agent} --version --json", timeout=60)
    answer = as_json.stdout if as_json.exit_code == 0 else ""
    if answer.strip().startswith("{"):
        return parse_agent_capabilities(answer, "")
    # an agent from before --json: it printed its plain version line, or refused the option
    return parse_agent_capabilities("", answer + "\n" + shell.run(f"{agent} --version", timeout=60).stdout)


class Execution:
    """One run's I/O: the shell, the report and the device state record it builds up."""

    def __init__(self, shell: RemoteShell, target: str, report: ProvisionReport, on_step: StepCallback | None,
                 state: dict[str, Any]) -> None:
        self.shell, self.target, self.report, self.on_step = shell, target, report, on_step
        self.state = state
        self.connection: dict[str, Any] | None = None
        self.password: str | None = None
        self.agent_changed = False

    def step(self, name: str, status: str, detail: str = "") -> StepResult:
        result = StepResult(name, status, detail)
        self.report.steps.append(result)
        if self.on_step:
            self.on_step(result)
        return result

    def sh(self, command: str, what: str, timeout: float | None = None) -> str:
        r = self.shell.run(command, timeout=timeout)
        if r.exit_code != 0:
            last = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.exit_code}").splitlines()[-1]
            raise ProvisionError(f"{self.target}: {what} failed: {last[:300]}")
        return r.stdout

    def put_file(self, local: Path, remote: str, mode: int) -> None:
        self.shell.put(local, remote)
        self.sh(f"chmod {mode:o} {shlex.quote(remote)}", f"chmod {remote}")

    def put_bytes(self, data: bytes, remote: str, mode: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(remote).name
            p.write_bytes(data)
            # upload beside, then rename: a reader never sees half a file
            self.shell.put(p, remote + ".tmp")
            q = shlex.quote(remote)
            self.sh(f"chmod {mode:o} {q}.tmp && mv -f {q}.tmp {q}", f"writing {remote}")


# -- the executors: one per step kind ----------------------------------------------------------------

Executor = Callable[[Execution, PlannedStep, WantedInstall, ProvisionOptions], tuple[str, str]]
"""Carries out one ``do`` step; returns (status, detail) for the report."""


def _upload_wheels(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    q = shlex.quote
    for local in step.params["upload"]:
        run.put_file(Path(local), f"{want.prefix}/wheels/{Path(local).name}", 0o644)
    for name in step.params["stale"]:
        run.sh(f"rm -f {q(want.prefix)}/wheels/{q(name)}", "removing a stale wheel")
    return "changed", step.detail


def _venv(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    run.sh(f"python3 -m venv {shlex.quote(want.prefix)}/venv", "creating the virtual environment", timeout=300)
    return "changed", f"{want.prefix}/venv"


def _install(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    q, spec = shlex.quote, step.params["spec"]
    pip = f"{q(want.prefix)}/venv/bin/python -m pip install --disable-pip-version-check --quiet"
    index = "--no-index " if step.params["complete"] else ""
    run.sh(f"{pip} {index}--find-links {q(want.prefix)}/wheels {q(spec)}", f"pip install {spec}", timeout=900)
    # same version, new build (a development upgrade): pip would keep the old one
    run.sh(f"{pip} --no-index --no-deps --force-reinstall {q(want.prefix)}/wheels/edgeship-*.whl",
           "installing the edgeship wheel", timeout=300)
    version = run.sh(f"{q(want.prefix)}/venv/bin/python -c "
                     "'import importlib.metadata as m; print(m.version(\"edgeship\"))'",
                     "reading the installed version").strip()
    run.state.update({"installed": step.params["installed_id"], "edgeship_version": version})
    return "changed", f"edgeship {version}"


def _trust(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    for rel, local in step.params["files"]:
        run.put_bytes(Path(local).read_bytes(), f"{want.prefix}/{rel}", 0o644)
    return "changed", step.detail


def _credentials(run: Execution, step: PlannedStep, want: WantedInstall, options: ProvisionOptions) -> tuple[str, str]:
    from ..identities import BrokerFolder, read_connection

    assert options.broker_dir is not None  # planned only with a broker folder
    folder = BrokerFolder(options.broker_dir).require()
    url = want.broker_url
    with tempfile.TemporaryDirectory(prefix="edgeship-creds-") as d:
        issued = folder.issue_device(want.device_id, want.fleet, Path(d) / "creds", reissue=step.params["reissue"])
        connection = read_connection(issued.out)
        if url:
            connection["url"] = url
        for f in sorted(issued.out.iterdir()):
            data = f.read_bytes()
            if f.name == "connection.json":
                data = (json.dumps({**json.loads(data), **({"url": url} if url else {})},
                                   indent=2, sort_keys=True) + "\n").encode()
            run.put_bytes(data, f"{want.prefix}/etc/broker/{f.name}",
                          0o600 if f.name in ("client.key", "password") else 0o644)
            if f.name == "client.crt":
                run.state["client_crt_sha256"] = hashlib.sha256(data).hexdigest()
            if f.name == "password":
                run.state["password_sha256"] = hashlib.sha256(data).hexdigest()
                run.password = data.decode().strip()
    run.connection = {k: (Path(v).name if k in ("ca", "cert", "key", "password") else v)
                      for k, v in connection.items()}
    run.state["connection"] = run.connection
    return "changed", (f"{issued.record.auth} credentials issued for {want.device_id}"
                       + (f" (replaced {issued.replaced_serial})" if issued.replaced_serial else ""))


def _agent_env(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    connection = run.connection or step.params.get("connection")
    if not connection:
        return "skipped", "no credentials"
    text = render_agent_env(want.prefix, connection, run.password).encode()
    run.put_bytes(text, f"{want.prefix}/etc/agent.env", 0o600)
    return "changed", step.detail


def _agent_config(run: Execution, step: PlannedStep, want: WantedInstall, options: ProvisionOptions) -> tuple[str, str]:
    q, prefix = shlex.quote, want.prefix
    connection = run.connection
    url = (connection or {}).get("url", "")
    init = (f"{q(prefix)}/venv/bin/edgeship-agent init --data {q(prefix)}/data --device-id {q(want.device_id)} "
            f"--fleet {q(want.fleet)} --root {q(prefix)}/etc/trust/root.json "
            f"--director-key {q(prefix)}/etc/trust/director.pub --bind {q(want.bind)}"
            + (f" --broker {q(url)}" if url else ""))
    cfg = f"{q(prefix)}/etc/agent.toml"
    append = ""
    if connection and want.broker is not None:
        # init writes [broker] last; the credentials' keys go into that table
        lines = broker_table_lines(prefix, connection, want.broker.topic_prefix)
        append = (f" && [ \"$(grep '^\\[' {cfg}.new | tail -n 1)\" = '[broker]' ]"
                  f" && printf '%s\\n' {' '.join(q(x) for x in lines)} >> {cfg}.new")
    out = run.sh(f"rm -f {cfg}.new && {init} -o {cfg}.new{append} && if cmp -s {cfg}.new {cfg}; then rm -f {cfg}.new; "
                 f"echo same; else mv -f {cfg}.new {cfg}; echo new; fi", "edgeship-agent init")
    return ("changed" if out.strip().endswith("new") else "unchanged"), f"{prefix}/etc/agent.toml"


def _systemd_unit(run: Execution, step: PlannedStep, _w: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    run.put_bytes(step.params["unit"].encode(), f"/etc/systemd/system/{AGENT_UNIT}", 0o644)
    run.sh(f"systemctl daemon-reload && systemctl enable {AGENT_UNIT}", "enabling the unit")
    return "changed", f"/etc/systemd/system/{AGENT_UNIT} enabled"


def _alive_command(prefix: str, systemd: bool) -> str:
    if systemd:
        return f"systemctl is-active --quiet {AGENT_UNIT}"
    p = shlex.quote(prefix)
    return f"[ -f {p}/run/agent.pid ] && kill -0 $(cat {p}/run/agent.pid)"


def _start_agent(run: Execution, step: PlannedStep, want: WantedInstall, _o: ProvisionOptions) -> tuple[str, str]:
    q, prefix, systemd = shlex.quote, want.prefix, step.params["systemd"]
    if step.action == IF_CHANGED and not run.agent_changed:
        return "unchanged", "already running"
    if systemd:
        run.sh(f"systemctl restart {AGENT_UNIT}", "starting the agent")
    else:
        run.sh(f"mkdir -p {q(prefix)}/bin", "creating bin/")
        run.put_bytes(render_start_script(prefix).encode(), f"{prefix}/bin/start-agent", 0o755)
        run.sh(f"{q(prefix)}/bin/start-agent", "starting the agent")
    time.sleep(1.0)
    if run.shell.run(_alive_command(prefix, systemd)).exit_code != 0:
        tail = run.shell.run(f"tail -n 5 {q(prefix)}/log/agent.log 2>/dev/null").stdout.strip().splitlines()
        raise ProvisionError(f"{run.target}: the agent exited right after it started: "
                             + (tail[-1] if tail else f"see {prefix}/log/agent.log"))
    return "changed", "restarted" if step.detail == "restart" or step.action == IF_CHANGED else "started"


def _wait_online(run: Execution, step: PlannedStep, want: WantedInstall, options: ProvisionOptions) -> tuple[str, str]:
    from ..device_presence import wait_online
    from ..identities import BrokerFolder

    assert options.broker_dir is not None  # planned only with a broker folder
    agent = read_agent_capabilities(run.shell, want.prefix)
    run.report.agent = agent
    if agent.mqtt is not True:
        why = ("the installed agent has no MQTT support" if agent.mqtt is False
               else "the installed agent did not say whether it speaks MQTT (edgeship-agent --version)")
        run.report.notes.append(f"{why}, so it cannot report online; the wait was skipped")
        return "skipped", why
    waited = wait_online(BrokerFolder(options.broker_dir), want.fleet, want.device_id, step.params["timeout"])
    started = any(s.name == "start agent" and s.status == "changed" for s in run.report.steps)
    return ("changed" if started else "unchanged"), f"online after {waited:.1f} s"


def _fleet_tags(run: Execution, step: PlannedStep, want: WantedInstall, options: ProvisionOptions) -> tuple[str, str]:
    assert options.db_url is not None  # planned only with a store
    status, detail = record_fleet_tags(options.db_url, want.fleet, want.device_id, step.params["tags"],
                                       timeout_s=options.tags_timeout)
    if status == "skipped":
        run.report.notes.append(detail)
    return status, detail


EXECUTORS: dict[str, Executor] = {
    "upload_wheels": _upload_wheels, "venv": _venv, "install": _install, "trust": _trust,
    "credentials": _credentials, "agent_env": _agent_env, "agent_config": _agent_config,
    "systemd_unit": _systemd_unit, "start_agent": _start_agent, "wait_online": _wait_online,
    "fleet_tags": _fleet_tags,
}


def record_fleet_tags(db_url: str, fleet: str, device_id: str, tags: Mapping[str, str], *,
                      timeout_s: float = 20.0, poll_s: float = 0.25) -> tuple[str, str]:
    """Set ``tags`` on the device in the fleet store; ("changed" | "unchanged" | "skipped", detail).

    The store learns of a device from its reports, through the controller: wait up to
    ``timeout_s`` for it to appear rather than invent a row for it. A device of another
    fleet is left alone. "skipped" says how to set the tags later.
    """
    from ..store import FleetStore

    listed = ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))
    later = f"`edgeship device tag {device_id} " + " ".join(f"{k}={v}" for k, v in sorted(tags.items())) + "`"
    deadline = time.monotonic() + timeout_s
    with FleetStore(db_url) as store:
        while True:
            outcome = store.tag_reported_device(device_id, fleet, tags)
            if outcome != "unknown" or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    if outcome == "unknown":
        return "skipped", (f"tags not recorded: the fleet store does not know {device_id} yet "
                           f"(is the controller running?); set them later with {later}")
    if outcome.startswith("fleet "):
        return "skipped", f"tags not recorded: {device_id} is in {outcome} in the fleet store, not {fleet}"
    return outcome, listed
