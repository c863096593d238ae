"""Provisioning as a plan: the steps one device needs, computed as data from what it has (pure).

``plan_provision(facts, wanted)`` compares what the probe found on the device (:class:`HostFacts`)
with what this run wants there (:class:`WantedInstall`: wheels, trust files, credentials, unit,
...) and returns the list of :class:`PlannedStep`; each says what it will do (``do``), or why
nothing needs doing (``unchanged``, ``skipped``). ``--dry-run`` prints exactly this list; the
runner (runner.py) carries out the ``do`` steps, in order, by their ``kind``. There is no second
code path for a dry run: the plan is the dry run.

``plan_deprovision`` does the same for removing a device.
"""

from __future__ import annotations

__all__ = [
    "BrokerStanding",
    "PlannedStep",
    "WantedInstall",
    "installed_id",
    "plan_deprovision",
    "plan_provision",
    "wheels_to_change",
]

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .files import render_agent_env
from .hosts import AGENT_UNIT, HostFacts, file_action

DO, UNCHANGED, SKIPPED = "do", "unchanged", "skipped"
IF_CHANGED = "if-changed"
"""Only when an earlier step changed something the agent reads (``start agent`` of a running agent)."""


@dataclass(frozen=True)
class PlannedStep:
    """One step of a plan.

    Attributes:
        name: what the report shows ("upload wheels").
        kind: what the runner does for it (its executor).
        action: ``do``, ``unchanged``, ``skipped`` or ``if-changed``.
        detail: what it will do, or why not.
        params: what its executor needs (plain data).
        agent_reads: a change made by this step needs the agent restarted.
    """

    name: str
    kind: str
    action: str
    detail: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    agent_reads: bool = False

    @property
    def dry_run_status(self) -> str:
        """What ``--dry-run`` reports for it."""
        return {DO: "planned", IF_CHANGED: "unchanged"}.get(self.action, self.action)


@dataclass(frozen=True)
class BrokerStanding:
    """The device's credentials at the broker folder, as the folder's records say."""

    usable: bool
    """Active, of this fleet, and the device holds exactly the ones issued (fingerprint in its record)."""
    active: bool
    """Active credentials exist (issuing new ones replaces them)."""
    auth: str | None = None
    topic_prefix: str = "edgeship"


@dataclass(frozen=True)
class WantedInstall:
    """What this run wants on the device (everything but the device's own facts)."""

    target: str
    prefix: str
    device_id: str
    fleet: str
    runtime: str
    wheels: Mapping[str, tuple[str, str, str]]
    """wheel file name -> (local path, sha256 of the file, content id)."""
    wheels_complete: bool
    trust: tuple[tuple[str, str, str], ...]
    """(rel path under the prefix, local path, sha256)."""
    broker: BrokerStanding | None = None
    broker_url: str | None = None
    bind: str = "127.0.0.1:8501"
    unit: str | None = None
    """The systemd unit text (None: no systemd, or not root: the nohup fallback)."""
    no_unit_reason: str = ""
    wait_online: bool = True
    online_timeout: float = 60.0
    tags: Mapping[str, str] = field(default_factory=dict)
    tags_in_store: bool = False


def installed_id(runtime: str, wheels: Mapping[str, tuple[str, str, str]]) -> str:
    """What is installed, as one hash: the runtime and the wheels' contents (not their zip dates)."""
    return hashlib.sha256(json.dumps([runtime, sorted(v[2] for v in wheels.values())]).encode()).hexdigest()


def wheels_to_change(facts: HostFacts, wanted: Mapping[str, tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """(wheels to upload, stale wheels to remove). A rebuilt wheel of the same contents whose file
    the device already holds (recorded in its state) is not uploaded again."""
    state = facts.state or {}
    old = state.get("wheels", {}) if isinstance(state.get("wheels"), dict) else {}
    upload = []
    for name, (_path, sha, content) in wanted.items():
        have = facts.files.get(f"wheels/{name}")
        known = old.get(name) if isinstance(old.get(name), dict) else None
        if have != sha and not (known and known.get("content") == content and have == known.get("sha256")):
            upload.append(name)
    stale = sorted(rel[len("wheels/"):] for rel in facts.files
                   if rel.startswith("wheels/") and rel[len("wheels/"):] not in wanted)
    return upload, stale


def _broker_steps(facts: HostFacts, want: WantedInstall) -> list[PlannedStep]:
    if want.broker is None:
        return [PlannedStep("broker credentials", "credentials", SKIPPED,
                            "no --broker-dir: the agent runs without a broker")]
    state = facts.state or {}
    standing = want.broker
    if standing.usable:
        creds = PlannedStep("broker credentials", "credentials", UNCHANGED,
                            f"{standing.auth} credentials of {want.device_id} still valid")
        connection = state.get("connection")
        if isinstance(connection, dict) and "password" not in connection:
            text = render_agent_env(want.prefix, connection)
            action = file_action("etc/agent.env", hashlib.sha256(text.encode()).hexdigest(), facts)
            env = PlannedStep("agent env", "agent_env", UNCHANGED if action == "unchanged" else DO,
                              f"{want.prefix}/etc/agent.env", {"connection": connection}, agent_reads=True)
        else:
            # a password device's env file holds the password, which only the device knows now
            env = PlannedStep("agent env", "agent_env", UNCHANGED, f"{want.prefix}/etc/agent.env")
        return [creds, env]
    creds = PlannedStep("broker credentials", "credentials", DO,
                        f"issue {'(replacing the active ones) ' if standing.active else ''}for {want.device_id}",
                        {"reissue": standing.active}, agent_reads=True)
    env = PlannedStep("agent env", "agent_env", DO, f"{want.prefix}/etc/agent.env", {"connection": None},
                      agent_reads=True)
    return [creds, env]


def plan_provision(facts: HostFacts, want: WantedInstall) -> list[PlannedStep]:
    """Every step of provisioning ``want`` onto a device with ``facts``; pure.

    The host's refusal rules (``check_host``) come first and are not part of the plan: a
    refused host gets no plan at all.
    """
    state = facts.state or {}
    steps: list[PlannedStep] = []
    py = ".".join(map(str, facts.python_version or ()))
    steps.append(PlannedStep("check host", "check_host", UNCHANGED,
                             f"{facts.arch}, Python {py}, {facts.disk_free_mb} MB disk, "
                             f"{facts.memory_available_mb} MB memory, systemd {'yes' if facts.systemd else 'no'}"))
    upload, stale = wheels_to_change(facts, want.wheels)
    if upload or stale:
        steps.append(PlannedStep(
            "upload wheels", "upload_wheels", DO,
            f"{len(upload)} of {len(want.wheels)} wheels to upload" + (f", {len(stale)} stale removed" if stale else ""),
            {"upload": [want.wheels[n][0] for n in upload], "stale": stale}))
    else:
        steps.append(PlannedStep("upload wheels", "upload_wheels", UNCHANGED,
                                 f"{len(want.wheels)} wheels already there"))
    steps.append(PlannedStep("virtual environment", "venv", UNCHANGED if facts.venv_exists else DO,
                             f"{want.prefix}/venv" if facts.venv_exists else f"python3 -m venv {want.prefix}/venv"))
    spec = f"edgeship[{want.runtime}]"
    wanted_id = installed_id(want.runtime, want.wheels)
    if facts.agent_installed and state.get("installed") == wanted_id:
        steps.append(PlannedStep(f"install {spec}", "install", UNCHANGED, str(state.get("edgeship_version", ""))))
    else:
        steps.append(PlannedStep(f"install {spec}", "install", DO,
                                 "offline from the wheelhouse" if want.wheels_complete else "from the device's index",
                                 {"spec": spec, "complete": want.wheels_complete, "installed_id": wanted_id},
                                 agent_reads=True))
    trust = [(rel, local) for rel, local, sha in want.trust if file_action(rel, sha, facts) != "unchanged"]
    steps.append(PlannedStep(
        "trust files", "trust", DO if trust else UNCHANGED,
        ", ".join(f"{rel} ({file_action(rel, sha, facts)})" for rel, _l, sha in want.trust
                  if file_action(rel, sha, facts) != "unchanged") or "root.json and director.pub up to date",
        {"files": trust}, agent_reads=True))
    steps.extend(_broker_steps(facts, want))
    # the device's own `edgeship-agent init` writes the config; whether it changed is known only then
    steps.append(PlannedStep("agent config", "agent_config", DO, f"edgeship-agent init ... -o {want.prefix}/etc/agent.toml",
                             {"bind": want.bind, "broker_url": want.broker_url}, agent_reads=True))
    if want.unit is not None:
        unit_sha = hashlib.sha256(want.unit.encode()).hexdigest()
        steps.append(PlannedStep("systemd unit", "systemd_unit", UNCHANGED if facts.unit_sha256 == unit_sha else DO,
                                 f"/etc/systemd/system/{AGENT_UNIT}", {"unit": want.unit}, agent_reads=True))
    else:
        steps.append(PlannedStep("systemd unit", "systemd_unit", SKIPPED, want.no_unit_reason))
    systemd = want.unit is not None
    if not facts.agent_running:
        steps.append(PlannedStep("start agent", "start_agent", DO, "start", {"systemd": systemd}))
    elif any(s.action == DO and s.agent_reads and s.kind != "agent_config" for s in steps):
        steps.append(PlannedStep("start agent", "start_agent", DO, "restart", {"systemd": systemd}))
    else:
        steps.append(PlannedStep("start agent", "start_agent", IF_CHANGED, "already running",
                                 {"systemd": systemd}))
    if want.broker is None or not want.wait_online:
        steps.append(PlannedStep("wait online", "wait_online", SKIPPED,
                                 "no broker" if want.broker is None else "--no-wait"))
    else:
        steps.append(PlannedStep("wait online", "wait_online", DO,
                                 f"the device's status topic says online within {want.online_timeout:g} s",
                                 {"timeout": want.online_timeout, "topic_prefix": want.broker.topic_prefix}))
    if want.tags_in_store and want.tags:
        steps.append(PlannedStep("fleet tags", "fleet_tags", DO,
                                 ", ".join(f"{k}={v}" for k, v in sorted(want.tags.items())),
                                 {"tags": dict(want.tags)}))
    return steps


def plan_deprovision(facts: HostFacts, *, prefix: str, prefix_exists: bool,
                     device_id: str | None, broker: str | None) -> list[PlannedStep]:
    """Removing the agent: the unit, the running agent, the files, the credentials; pure.

    ``broker``: None (no broker folder), ``"none"`` (no record), ``"revoked"`` or ``"active"``.
    """
    steps: list[PlannedStep] = []
    if facts.unit_sha256:
        steps.append(PlannedStep("systemd unit", "remove_unit", DO, f"/etc/systemd/system/{AGENT_UNIT} removed"))
    if facts.agent_running and not facts.unit_sha256:
        steps.append(PlannedStep("stop agent", "stop_agent", DO, "agent stopped"))
    if prefix_exists:
        steps.append(PlannedStep("remove files", "remove_files", DO, prefix))
    else:
        steps.append(PlannedStep("remove files", "remove_files", UNCHANGED, f"{prefix} is not there"))
    if broker is None:
        steps.append(PlannedStep("revoke credentials", "revoke", SKIPPED, "no --broker-dir"))
    elif not device_id:
        steps.append(PlannedStep("revoke credentials", "revoke", SKIPPED, "device id unknown (pass --device-id)"))
    elif broker == "none":
        steps.append(PlannedStep("revoke credentials", "revoke", UNCHANGED,
                                 f"{device_id} has no credentials at this broker"))
    elif broker == "revoked":
        steps.append(PlannedStep("revoke credentials", "revoke", UNCHANGED, f"{device_id} already revoked"))
    else:
        steps.append(PlannedStep("revoke credentials", "revoke", DO, device_id))
    return steps
