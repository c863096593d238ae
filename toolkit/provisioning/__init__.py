"""Provisioning a device over SSH (fabric): check it, install the agent, start it.

Plan, then execute. The parts, one job each:

- ``hosts``: targets, hosts files, tags, the probe and the facts it finds, the refusal rules,
  the installed agent's capabilities (``edgeship-agent --version --json``); pure.
- ``files``: what is written on the device (unit, environment, broker keys, start script) and
  the wheels; pure but for building this checkout's wheel.
- ``plan``: the steps one device needs, as data, from what it has (pure, table-tested);
  ``--dry-run`` prints this plan and nothing else.
- ``runner``: one executor per kind of step over ``shell``; SQL through the fleet store, the
  online wait through ``edgeship.toolkit.device_presence`` (MQTT).
- ``apply``: ``provision``/``deprovision``: probe, plan, run the plan (or print it: ``--dry-run``).
- ``shell``: the thin SSH layer (``RemoteShell``; one real implementation, ``FabricShell``),
  tested against a real sshd on loopback.

Layout on the device (``--prefix``, default ``/opt/edgeship`` for root, else
``~/edgeship``)::

    venv/                    the virtual environment with edgeship[RUNTIME]
    wheels/                  the uploaded wheels (pip installs from here)
    etc/agent.toml           written by ``edgeship-agent init`` on the device
    etc/agent.env  (0600)    the broker credentials' locations, for the agent's environment
    etc/trust/root.json  etc/trust/director.pub
    etc/broker/              ca.crt, client.crt + client.key (0600) or password, connection.json
    data/                    the agent's data folder
    run/agent.pid  log/agent.log     (when there is no systemd)
    provision.json           what was installed (the next run compares against it)

A second run compares hashes and changes nothing that is already right: it
repairs a file that differs, upgrades when the wheels changed, and restarts the
agent only when something it reads changed.
"""

from __future__ import annotations

from .apply import deprovision, probe, provision
from .files import (
    broker_table_lines,
    build_project_wheel,
    collect_wheels,
    render_agent_env,
    render_start_script,
    render_systemd_unit,
    wheel_content_id,
)
from .hosts import (
    AGENT_UNIT,
    RUNTIME_ARCHITECTURES,
    RUNTIMES,
    STATE_FILE,
    AgentCapabilities,
    HostEntry,
    HostFacts,
    HostRefusedError,
    HostRequirements,
    ProvisionError,
    SshTarget,
    check_host,
    default_prefix,
    device_id_from_hostname,
    file_action,
    parse_agent_capabilities,
    parse_host_facts,
    parse_hosts_file,
    parse_tags,
    parse_target,
    probe_script,
)
from .plan import (
    BrokerStanding,
    PlannedStep,
    WantedInstall,
    plan_deprovision,
    plan_provision,
    wheels_to_change,
)
from .runner import (
    ProvisionOptions,
    ProvisionReport,
    StepCallback,
    StepResult,
    read_agent_capabilities,
    record_fleet_tags,
)
from .shell import CommandResult, FabricShell, RemoteShell, quiet_paramiko

__all__ = [
    "AGENT_UNIT", "RUNTIMES", "RUNTIME_ARCHITECTURES", "STATE_FILE", "AgentCapabilities", "BrokerStanding",
    "CommandResult", "FabricShell", "HostEntry", "HostFacts", "HostRefusedError", "HostRequirements",
    "PlannedStep", "ProvisionError", "ProvisionOptions", "ProvisionReport", "RemoteShell", "SshTarget",
    "StepCallback", "StepResult", "WantedInstall", "broker_table_lines", "build_project_wheel", "check_host",
    "collect_wheels", "default_prefix", "deprovision", "device_id_from_hostname", "file_action",
    "parse_agent_capabilities", "parse_host_facts", "parse_hosts_file", "parse_tags", "parse_target",
    "plan_deprovision", "plan_provision", "probe", "probe_script", "provision", "quiet_paramiko",
    "read_agent_capabilities", "record_fleet_tags", "render_agent_env", "render_start_script",
    "render_systemd_unit", "wait_online", "wheel_content_id", "wheels_to_change",
]


def __getattr__(name: str) -> object:
    # ``wait_online`` lives with the MQTT presence watch, which imports this package's errors:
    # re-exported on first use, so neither module imports the other at import time
    if name == "wait_online":
        from edgeship.toolkit.device_presence import wait_online

        return wait_online
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
