"""The provisioning plan (pure): which steps a device needs, from what it has; and what the
installed agent says it can do."""

from __future__ import annotations

import hashlib

import pytest

from edgeship.toolkit.provisioning import (
    AgentCapabilities,
    BrokerStanding,
    HostFacts,
    WantedInstall,
    parse_agent_capabilities,
    plan_deprovision,
    plan_provision,
)
from edgeship.toolkit.provisioning.plan import installed_id

WHEELS = {"edgeship-0.1.0-py3-none-any.whl": ("/w/edgeship-0.1.0-py3-none-any.whl", "a" * 64, "c" * 64)}
TRUST = (("etc/trust/root.json", "/r/root.json", "1" * 64), ("etc/trust/director.pub", "/r/director.pub", "2" * 64))


def want(**changes: object) -> WantedInstall:
    base: dict[str, object] = dict(
        target="pi@h", prefix="/opt/edgeship", device_id="d1", fleet="f1", runtime="onnx", wheels=WHEELS,
        wheels_complete=True, trust=TRUST, broker=BrokerStanding(usable=False, active=False),
        unit=None, no_unit_reason="no systemd")
    base.update(changes)
    return WantedInstall(**base)  # type: ignore[arg-type]


def installed_host(**changes: object) -> HostFacts:
    """A device where a previous run installed exactly ``want()``, with cert credentials."""
    connection = {"url": "mqtts://b:8883", "ca": "ca.crt", "cert": "client.crt", "key": "client.key"}
    from edgeship.toolkit.provisioning import render_agent_env

    env = hashlib.sha256(render_agent_env("/opt/edgeship", connection).encode()).hexdigest()
    base: dict[str, object] = dict(
        arch="x86_64", python_version=(3, 11, 2), venv_exists=True, agent_installed=True, agent_running=True,
        files={"wheels/edgeship-0.1.0-py3-none-any.whl": "a" * 64, "etc/trust/root.json": "1" * 64,
               "etc/trust/director.pub": "2" * 64, "etc/broker/client.crt": "f" * 64, "etc/agent.env": env},
        state={"installed": installed_id("onnx", WHEELS), "client_crt_sha256": "f" * 64, "connection": connection})
    base.update(changes)
    return HostFacts(**base)  # type: ignore[arg-type]


def actions(steps: list) -> dict[str, str]:
    return {s.name: s.action for s in steps}


USABLE = BrokerStanding(usable=True, active=True, auth="cert")


@pytest.mark.parametrize("facts,wanted,expected", [
    # a bare host: every step to do
    (HostFacts(arch="x86_64"), want(), {
        "upload wheels": "do", "virtual environment": "do", "install edgeship[onnx]": "do", "trust files": "do",
        "broker credentials": "do", "agent env": "do", "agent config": "do", "systemd unit": "skipped",
        "start agent": "do", "wait online": "do"}),
    # everything in place: nothing but the config check; the agent restarts only if init changes it
    (installed_host(), want(broker=USABLE), {
        "upload wheels": "unchanged", "virtual environment": "unchanged", "install edgeship[onnx]": "unchanged",
        "trust files": "unchanged", "broker credentials": "unchanged", "agent env": "unchanged",
        "agent config": "do", "start agent": "if-changed", "wait online": "do"}),
    # a damaged trust file: repaired, and the running agent restarted to read it
    (installed_host(files={**installed_host().files, "etc/trust/root.json": "9" * 64}), want(broker=USABLE),
     {"trust files": "do", "start agent": "do", "install edgeship[onnx]": "unchanged"}),
    # new wheels: uploaded, installed, agent restarted; the stale one removed
    (installed_host(files={**installed_host().files, "wheels/old.whl": "3" * 64}),
     want(broker=USABLE, wheels={"edgeship-0.2.0-py3-none-any.whl": ("/w/e2.whl", "b" * 64, "d" * 64)}),
     {"upload wheels": "do", "install edgeship[onnx]": "do", "start agent": "do"}),
    # a stopped agent is started even when nothing else changed
    (installed_host(agent_running=False), want(broker=USABLE), {"start agent": "do"}),
    # no broker folder: no credentials, no wait
    (installed_host(), want(broker=None), {"broker credentials": "skipped", "wait online": "skipped"}),
    # --no-wait
    (installed_host(), want(broker=USABLE, wait_online=False), {"wait online": "skipped"}),
    # systemd as root: the unit is written when it differs
    (installed_host(systemd=True, uid=0, unit_sha256="0" * 64), want(broker=USABLE, unit="[Unit]\n"),
     {"systemd unit": "do", "start agent": "do"}),
    (installed_host(systemd=True, uid=0, unit_sha256=hashlib.sha256(b"[Unit]\n").hexdigest()),
     want(broker=USABLE, unit="[Unit]\n"), {"systemd unit": "unchanged", "start agent": "if-changed"}),
    # tags go to the store only with one
    (installed_host(), want(broker=USABLE, tags={"site": "a"}, tags_in_store=True), {"fleet tags": "do"}),
])
def test_the_plan_follows_what_the_device_has(facts: HostFacts, wanted: WantedInstall,
                                              expected: dict[str, str]) -> None:
    got = actions(plan_provision(facts, wanted))
    assert {k: got.get(k) for k in expected} == expected
    if not wanted.tags_in_store:
        assert "fleet tags" not in got


def test_the_dry_run_is_the_plan_printed() -> None:
    steps = plan_provision(HostFacts(arch="x86_64"), want())
    assert {s.dry_run_status for s in steps} <= {"planned", "unchanged", "skipped"}
    assert [s.name for s in steps][:3] == ["check host", "upload wheels", "virtual environment"]


@pytest.mark.parametrize("running,unit,exists,broker,device,expected", [
    (True, None, True, "active", "d1", {"stop agent": "do", "remove files": "do", "revoke credentials": "do"}),
    (False, "x", True, "revoked", "d1", {"systemd unit": "do", "remove files": "do", "revoke credentials": "unchanged"}),
    (False, None, False, None, None, {"remove files": "unchanged", "revoke credentials": "skipped"}),
    (False, None, False, "none", "d1", {"remove files": "unchanged", "revoke credentials": "unchanged"}),
])
def test_the_deprovision_plan(running: bool, unit: str | None, exists: bool, broker: str | None,
                              device: str | None, expected: dict[str, str]) -> None:
    facts = HostFacts(agent_running=running, unit_sha256=unit)
    got = actions(plan_deprovision(facts, prefix="/opt/edgeship", prefix_exists=exists,
                                   device_id=device, broker=broker))
    assert got == expected


@pytest.mark.parametrize("json_out,plain,expected", [
    ('{"version": "0.2.0", "protocol": {"mqtt": true, "desired_schema": [1, 2]}, "runtimes": ["onnx"]}', "",
     AgentCapabilities("0.2.0", True, (1, 2))),
    ('{"version": "0.2.0", "protocol": {"mqtt": false}}', "", AgentCapabilities("0.2.0", False, (1,))),
    ('{"version": "0.2.0"}', "", AgentCapabilities("0.2.0", None, (1,))),
    ('{"version": "0.2.0", "protocol": {"desired_schema": 2}}', "", AgentCapabilities("0.2.0", None, (2,))),
    # an agent from before --json: the plain line (click prints it even when --json is unknown to it)
    ("", "edgeship-agent, version 0.1.0\n", AgentCapabilities("0.1.0", True, (1,))),
    ("", "Error: No such option: --json\nedgeship-agent, version 0.1.0.dev3\n", AgentCapabilities("0.1.0", True, (1,))),
    ("", "command not found\n", AgentCapabilities(None, None, (1,))),
    ("[1, 2]", "", AgentCapabilities(None, None, (1,))),
])
def test_agent_capabilities_are_read_tolerantly(json_out: str, plain: str, expected: AgentCapabilities) -> None:
    got = parse_agent_capabilities(json_out, plain)
    assert got == expected
    assert got.multi_model == (2 in expected.desired_schemas)
