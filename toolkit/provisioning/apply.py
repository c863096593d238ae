"""``provision`` and ``deprovision``: probe the device, plan (plan.py), run the plan (runner.py).

A dry run stops after the plan and reports it; it never takes a path of its own.
"""

from __future__ import annotations

__all__ = ["deprovision", "probe", "provision"]

import json
import shlex
import tempfile
import time
from pathlib import Path

from edgeship.ota.errors import BadInputError
from edgeship.ota.hashing import sha256_file
from edgeship.ota.topics import DEFAULT_PREFIX, validate_identifier

from .files import collect_wheels, render_systemd_unit, wheel_content_id
from .hosts import (
    AGENT_UNIT,
    STATE_FILE,
    HostFacts,
    HostRefusedError,
    check_host,
    default_prefix,
    device_id_from_hostname,
    parse_host_facts,
    probe_script,
)
from .plan import DO, IF_CHANGED, BrokerStanding, WantedInstall, plan_deprovision, plan_provision
from .runner import (
    EXECUTORS,
    Execution,
    ProvisionOptions,
    ProvisionReport,
    StepCallback,
    StepResult,
)
from .shell import RemoteShell


def probe(shell: RemoteShell, prefix: str) -> HostFacts:
    r = shell.run(probe_script(prefix), timeout=60)
    return parse_host_facts(r.stdout)


def _resolve_prefix(shell: RemoteShell, options: ProvisionOptions) -> tuple[str, HostFacts]:
    prefix = default_prefix(probe(shell, "/")) if options.prefix is None else options.prefix
    if not prefix.startswith("/"):
        raise BadInputError(f"--prefix {prefix!r} must be an absolute path on the device")
    if prefix.rstrip("/") in ("", "/usr", "/etc", "/opt", "/home", "/root", "/var", "/tmp", "/bin", "/lib"):
        raise BadInputError(f"--prefix {prefix!r} is a system folder; use a folder of its own (e.g. /opt/edgeship)")
    return prefix, probe(shell, prefix)


def _broker_standing(options: ProvisionOptions, device_id: str, facts: HostFacts) -> BrokerStanding | None:
    if options.broker_dir is None:
        return None
    from ..identities import BrokerFolder

    folder = BrokerFolder(options.broker_dir).require()
    record = folder.record(device_id)
    state = facts.state or {}
    remote_fp = facts.files.get("etc/broker/client.crt")
    usable = (record is not None and record.active and record.fleet == options.fleet and record.kind == "device"
              and ((record.auth == "cert" and remote_fp is not None
                    and remote_fp == (state.get("client_crt_sha256") or ""))
                   or (record.auth == "password" and "etc/broker/password" in facts.files
                       and facts.files["etc/broker/password"] == state.get("password_sha256"))))
    return BrokerStanding(usable=bool(usable), active=bool(record and record.active),
                          auth=record.auth if record else None,
                          topic_prefix=folder.settings().prefix if options.broker_dir else DEFAULT_PREFIX)


def _wanted(options: ProvisionOptions, facts: HostFacts, target: str, prefix: str, device_id: str,
            wheels: list[Path], complete: bool) -> WantedInstall:
    assert options.root_metadata is not None and options.director_key is not None
    use_systemd = facts.systemd and facts.uid == 0
    return WantedInstall(
        target=target, prefix=prefix, device_id=device_id, fleet=options.fleet, runtime=options.runtime,
        wheels={w.name: (str(w), sha256_file(w), wheel_content_id(w)) for w in wheels}, wheels_complete=complete,
        trust=tuple((rel, str(local), sha256_file(local)) for local, rel in (
            (options.root_metadata, "etc/trust/root.json"), (options.director_key, "etc/trust/director.pub"))),
        broker=_broker_standing(options, device_id, facts), broker_url=options.broker_url, bind=options.bind,
        unit=render_systemd_unit(prefix, facts.user or "root") if use_systemd else None,
        no_unit_reason=(("no systemd on this host" if not facts.systemd else f"{facts.user} is not root")
                        + f": the agent is started with setsid/nohup, pid in {prefix}/run/agent.pid "
                        f"(start it at boot yourself, e.g. `@reboot {prefix}/bin/start-agent` in crontab)"),
        wait_online=options.wait_online, online_timeout=options.online_timeout, tags=options.tags,
        tags_in_store=options.db_url is not None)


def provision(shell: RemoteShell, target: str, options: ProvisionOptions, *,
              on_step: StepCallback | None = None) -> ProvisionReport:
    """Provision one device through ``shell``: probe, plan, run the plan; idempotent.
    ``options.dry_run`` reports the plan and changes nothing."""
    report = ProvisionReport(target)
    prefix, facts = _resolve_prefix(shell, options)
    report.prefix, report.facts = prefix, facts
    reasons = check_host(facts, options.requirements, options.runtime)
    if reasons:
        report.steps.append(StepResult("check host", "failed", "; ".join(reasons)))
        raise HostRefusedError(f"{target} refused, nothing was changed: " + "; ".join(reasons))
    state = dict(facts.state or {})
    device_id = options.device_id or state.get("device_id") or device_id_from_hostname(facts)
    validate_identifier(device_id, "device id")
    validate_identifier(options.fleet, "fleet")
    report.device_id = device_id
    if state.get("device_id") not in (None, device_id) or state.get("fleet") not in (None, options.fleet):
        raise BadInputError(
            f"{target} is already provisioned as {state.get('device_id')} of fleet {state.get('fleet')}; "
            f"deprovision it first (`edgeship device deprovision {target}`)")
    if options.root_metadata is None or options.director_key is None:
        raise BadInputError("provisioning needs the trusted root metadata and the director's public key "
                            "(--root ROOT.json --director-key KEY.pub, from the release repository)")
    for p, what in ((options.root_metadata, "root metadata"), (options.director_key, "director key")):
        if not p.is_file():
            raise BadInputError(f"{what} {p} does not exist")
    run = Execution(shell, target, report, on_step, state)
    with tempfile.TemporaryDirectory(prefix="edgeship-wheels-") as build:
        if options.wheels is not None:
            wheels, complete = list(options.wheels[0]), options.wheels[1]
        else:
            wheels, complete = collect_wheels(options.wheelhouse, Path(build))
        want = _wanted(options, facts, target, prefix, device_id, wheels, complete)
        plan = plan_provision(facts, want)
        if options.dry_run:
            for step in plan:
                run.step(step.name, step.dry_run_status, step.detail)
            return report
        q = shlex.quote
        run.sh(f"mkdir -p {q(prefix)}/wheels {q(prefix)}/etc/trust {q(prefix)}/etc/broker {q(prefix)}/data "
               f"{q(prefix)}/run {q(prefix)}/log && chmod 700 {q(prefix)}/etc/broker", "creating the folders")
        if want.broker is not None and want.broker.usable:
            run.connection = state.get("connection")
        for step in plan:
            if step.action not in (DO, IF_CHANGED):
                run.step(step.name, step.action, step.detail)
                continue
            status, detail = EXECUTORS[step.kind](run, step, want, options)
            run.agent_changed |= status == "changed" and step.agent_reads
            run.step(step.name, status, detail)
    _record_state(run, options, want, facts)
    return report


def _record_state(run: Execution, options: ProvisionOptions, want: WantedInstall, facts: HostFacts) -> None:
    """provision.json: what is installed, so the next run changes only what differs."""
    state = run.state
    state.update({
        "schema": 1, "device_id": want.device_id, "fleet": options.fleet, "runtime": options.runtime,
        "tags": options.tags, "prefix": want.prefix, "service": "systemd" if want.unit is not None else "nohup",
        "wheels": {name: {"sha256": v[1], "content": v[2]} for name, v in want.wheels.items()},
    })
    old = facts.state or {}
    if {k: v for k, v in old.items() if k != "provisioned"} != {k: v for k, v in state.items() if k != "provisioned"}:
        state["provisioned"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        run.put_bytes(text, f"{want.prefix}/{STATE_FILE}", 0o644)


def deprovision(shell: RemoteShell, target: str, *, prefix: str | None = None, broker_dir: Path | None = None,
                device_id: str | None = None, dry_run: bool = False,
                on_step: StepCallback | None = None) -> ProvisionReport:
    """Stop the agent, remove the unit and the prefix, revoke the device's broker credentials."""
    from ..identities import BrokerFolder

    report = ProvisionReport(target)
    facts = probe(shell, prefix or "/")
    prefix = prefix or default_prefix(facts)
    facts = probe(shell, prefix)
    report.prefix, report.facts = prefix, facts
    state = facts.state or {}
    device_id = device_id or state.get("device_id")
    report.device_id = device_id or ""
    q = shlex.quote
    exists = shell.run(f"[ -d {q(prefix)} ]").exit_code == 0
    if exists and not (state or facts.agent_installed or shell.run(f"[ -d {q(prefix)}/venv ]").exit_code == 0):
        raise BadInputError(f"{prefix} on {target} was not made by edgeship provisioning; refusing to remove it")
    folder = BrokerFolder(broker_dir).require() if broker_dir is not None else None
    record = folder.record(device_id) if folder is not None and device_id else None
    standing = None if folder is None else ("none" if record is None else "active" if record.active else "revoked")
    plan = plan_deprovision(facts, prefix=prefix, prefix_exists=exists, device_id=device_id,
                            broker=standing)
    run = Execution(shell, target, report, on_step, {})
    for step in plan:
        if step.action != DO:
            run.step(step.name, step.action, step.detail)
        elif dry_run:
            run.step(step.name, step.dry_run_status, step.detail)
        elif step.kind == "remove_unit":
            run.sh(f"systemctl disable --now {AGENT_UNIT}; rm -f /etc/systemd/system/{AGENT_UNIT} && "
                   "systemctl daemon-reload", "removing the unit")
            run.step(step.name, "changed", step.detail)
        elif step.kind == "stop_agent":
            pid = f"$(cat {q(prefix)}/run/agent.pid)"
            run.sh(f"kill {pid}; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); "
                   f"done; kill -9 {pid} 2>/dev/null; true", "stopping the agent")
            run.step(step.name, "changed", step.detail)
        elif step.kind == "remove_files":
            run.sh(f"rm -rf {q(prefix)}", f"removing {prefix}")
            run.step(step.name, "changed", step.detail)
        elif step.kind == "revoke":
            assert folder is not None and device_id
            res = folder.revoke(device_id)
            run.step(step.name, "changed",
                     device_id + (f" (broker pid {res.broker_reloaded} reloaded)" if res.broker_reloaded else ""))
    return report
