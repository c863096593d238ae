"""What ships beside the agent's code, checked as an operator would use it: the
systemd unit (hardening, restart policy, keys in the sections systemd reads them
from; ``systemd-analyze verify`` where it is installed) and the example config
(complete: every key ``edgeship-agent init`` writes, each documented in
docs/agent.md, and it loads)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.agent.config import load_config, render_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "device-agent" / "edgeship-agent.service"
EXAMPLE = ROOT / "device-agent" / "agent.example.toml"
DOCS = ROOT / "docs" / "agent.md"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# keys systemd reads only from [Unit] (in [Service] they are ignored: "Unknown key")
UNIT_ONLY = {"StartLimitIntervalSec", "StartLimitBurst", "StartLimitAction", "Description", "Documentation",
             "Wants", "After", "Requires"}


def test_unit_runs_unprivileged_hardened_and_restarts_on_failure() -> None:
    unit = parse_unit(UNIT.read_text())
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["User"] not in ("", "root", "0")
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes"
    data = load_config(EXAMPLE).data_dir
    writable = " ".join(unit["Service"].get("ReadWritePaths", []))
    state_dirs = [f"/var/lib/{d}" for d in " ".join(unit["Service"].get("StateDirectory", [])).split()]
    assert str(data) in writable.split() or str(data) in state_dirs, "the data folder must be writable"
    assert f"--config {Path('/etc/edgeship/agent.toml')}" in service["ExecStart"]
    misplaced = sorted(set(unit["Service"]) & UNIT_ONLY)
    assert not misplaced, f"{misplaced} belong in [Unit]; systemd ignores them in [Service]"
    # a crash loop must reach [probation] max_restarts before systemd gives up
    burst = int(unit["Unit"]["StartLimitBurst"][-1])
    assert burst > load_config(EXAMPLE).max_reentries + 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_no_unknown_keys(tmp_path: Path) -> None:
    copy = tmp_path / "edgeship-agent.service"
    copy.write_text(UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines()
        if "edgeship-agent.service" in line and "is not executable" not in line  # not installed here
    ]
    assert not complaints, "\n".join(complaints)


def _keys(doc: dict) -> set[tuple[str, str]]:
    return {(table, key) for table, values in doc.items() for key in values}


def test_example_config_is_complete_documented_and_loads() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    rendered = tomllib.loads(
        render_config(data="/d", device_id="d", fleet="f", root="/r.json", director_key="/k.pub")
    )
    assert _keys(example) == _keys(rendered), "the example must hold every key `edgeship-agent init` writes"
    config = load_config(EXAMPLE)
    assert config.bind_host == "127.0.0.1" and config.bind_port == 8501
    docs = DOCS.read_text()
    table_rows = [line for line in docs.splitlines() if line.startswith("| `[")]
    documented: set[tuple[str, str]] = set()
    table = ""
    for row in [line for line in docs.splitlines() if line.startswith(("| `[", "| |"))]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0]:
            table = cells[0].strip("`[]")
        documented |= {(table, k) for k in re.findall(r"`([a-z_]+)`", cells[1])}
    assert table_rows
    missing = sorted(_keys(example) - documented)
    assert not missing, f"keys of the example config not in docs/agent.md's table: {missing}"
    for line in EXAMPLE.read_text().splitlines():  # each key says what it means
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"undocumented line in the example: {line}"


def test_init_writes_a_config_the_unprivileged_service_user_can_read(tmp_path: Path) -> None:
    """root runs `edgeship-agent init -o /etc/edgeship/agent.toml`; the unit runs the agent as
    `edgeship`, so the file must be readable by others (it holds no secrets: broker
    credentials come from the environment)."""
    import stat

    from click.testing import CliRunner

    from edgeship.agent.cli import cli

    out = tmp_path / "agent.toml"
    (tmp_path / "root.json").write_text("{}")  # init refuses missing trust anchors
    (tmp_path / "director.pub").write_text("key")
    result = CliRunner().invoke(cli, [
        "init", "--data", str(tmp_path / "data"), "--device-id", "pi-7", "--fleet", "lab",
        "--root", str(tmp_path / "root.json"), "--director-key", str(tmp_path / "director.pub"), "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & 0o044 == 0o044 and mode & 0o022 == 0, oct(mode)
    assert "password" not in out.read_text().lower()


def test_version_json_states_the_agents_capabilities() -> None:
    """What provisioning reads to know what an installed agent speaks (a real process)."""
    import json

    from agent_fixtures import agent_cli

    from edgeship.agent.reporter import agent_version

    done = agent_cli("--version", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["name"] == "edgeship-agent" and doc["version"] == agent_version()
    assert doc["protocol"]["mqtt"] is True and doc["protocol"]["desired_schema"] == [1, 2]
    assert doc["servables"] is True and "tfserving-rest" in doc["api"]
    assert doc["runtimes"] and all(isinstance(v, str) for v in doc["runtimes"].values())
    assert "tensorflow" not in doc["runtimes"]  # asking must not import TensorFlow
    plain = agent_cli("--version")
    assert plain.returncode == 0 and plain.stdout.strip() == f"edgeship-agent, version {agent_version()}"
