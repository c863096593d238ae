"""What provisioning writes on a device: the systemd unit, the agent's environment and broker
keys, the start script where there is no systemd, and the wheels it installs. Pure, except
building this checkout's wheel."""

from __future__ import annotations

__all__ = [
    "broker_table_lines",
    "build_project_wheel",
    "collect_wheels",
    "render_agent_env",
    "render_start_script",
    "render_systemd_unit",
    "wheel_content_id",
]

import hashlib
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.topics import DEFAULT_PREFIX


def render_systemd_unit(prefix: str, user: str) -> str:
    """The system unit that runs the agent (root devices with systemd)."""
    return "\n".join([
        "[Unit]",
        "Description=edgeship device agent",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"EnvironmentFile=-{prefix}/etc/agent.env",
        f"ExecStart={prefix}/venv/bin/edgeship-agent run --config {prefix}/etc/agent.toml",
        "Restart=on-failure",
        "RestartSec=5",
        # the same hardening as device-agent/edgeship-agent.service: the agent may write only
        # its data folder (slots, state, control socket)
        f"ReadWritePaths={prefix}/data",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet=",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def render_agent_env(prefix: str, connection: Mapping[str, Any], password: str | None = None) -> str:
    """The agent's environment (EnvironmentFile syntax, also sh): what edgeship.ota.transport reads
    from the environment, i.e. a password device's user name and password. Certificate devices need
    nothing here (the certificate's CN is the user name)."""
    broker = f"{prefix}/etc/broker"
    lines = ["# written by `edgeship device provision`: the agent's broker credentials (0600)",
             f"EDGESHIP_MQTT_CONNECTION={broker}/connection.json"]
    if "password" in connection:
        lines += [f"EDGESHIP_MQTT_USERNAME={connection['username']}"]
        if password is not None:
            lines += [f"EDGESHIP_MQTT_PASSWORD={password}"]
    return "\n".join(lines) + "\n"


def broker_table_lines(prefix: str, connection: Mapping[str, Any], topic_prefix: str) -> list[str]:
    """Keys appended to the agent config's ``[broker]`` table (edgeship.agent.fleet_link reads them):
    the CA that signs the broker's certificate, and the client certificate and key."""
    broker = f"{prefix}/etc/broker"

    def toml(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["# added by `edgeship device provision`: this device's broker credentials",
             f"ca_file = {toml(broker + '/' + Path(str(connection['ca'])).name)}"]
    if "cert" in connection:
        lines += [f"cert_file = {toml(broker + '/' + Path(str(connection['cert'])).name)}",
                  f"key_file = {toml(broker + '/' + Path(str(connection['key'])).name)}"]
    if topic_prefix != DEFAULT_PREFIX:
        lines.append(f"prefix = {toml(topic_prefix)}")
    return lines


# -- wheels --------------------------------------------------------------------------------------

def wheel_content_id(path: Path) -> str:
    """A hash of what a wheel holds (its RECORD), stable across rebuilds of the same sources.

    Rebuilding a wheel changes its zip timestamps but not its RECORD, so a second
    provisioning run of unchanged sources does not reinstall.
    """
    try:
        with zipfile.ZipFile(path) as z:
            records = sorted(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            if not records:
                raise BadInputError(f"{path.name} is not a wheel (no .dist-info/RECORD)")
            return hashlib.sha256(z.read(records[0])).hexdigest()
    except zipfile.BadZipFile:
        raise BadInputError(f"{path} is not a wheel (not a zip file)") from None


def _source_root() -> Path | None:
    here = Path(__file__).resolve().parents[2]  # toolkit/provisioning/files.py -> the checkout
    return here if (here / "pyproject.toml").is_file() and (here / "toolkit").is_dir() else None


def build_project_wheel(out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of this checkout (no build isolation: works offline)."""
    root = _source_root()
    if root is None:
        raise BadInputError(
            "edgeship is not installed from a source checkout, so no wheel can be built here; "
            "pass --wheelhouse DIR with an edgeship wheel (and its dependencies for offline devices)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out_dir),
         str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgeshipError(f"building the edgeship wheel in {root} failed: {last}")
    wheels = sorted(out_dir.glob("edgeship-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise EdgeshipError(f"pip wheel did not produce an edgeship wheel in {out_dir}")
    return wheels[-1]


def collect_wheels(wheelhouse: Path | None, build_dir: Path) -> tuple[list[Path], bool]:
    """The wheels to upload and whether they are complete (a wheelhouse: install with --no-index)."""
    if wheelhouse is None:
        return [build_project_wheel(build_dir)], False
    if not wheelhouse.is_dir():
        raise BadInputError(f"wheelhouse {wheelhouse} is not a folder")
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not any(w.name.startswith("edgeship-") for w in wheels):
        wheels.append(build_project_wheel(build_dir))
    return wheels, True



def render_start_script(prefix: str) -> str:
    """bin/start-agent: stop a running agent, start it detached (setsid nohup), pid in run/agent.pid."""
    p = shlex.quote(prefix)
    return "\n".join([
        "#!/bin/sh",
        "# written by `edgeship device provision`: starts the agent where there is no systemd",
        f"cd {p} || exit 1",
        "if [ -f run/agent.pid ] && kill -0 $(cat run/agent.pid) 2>/dev/null; then",
        "  kill $(cat run/agent.pid); i=0",
        "  while kill -0 $(cat run/agent.pid) 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done",
        "  kill -9 $(cat run/agent.pid) 2>/dev/null",
        "fi",
        "set -a; [ -f etc/agent.env ] && . ./etc/agent.env; set +a",
        f"setsid nohup {p}/venv/bin/edgeship-agent run --config {p}/etc/agent.toml >> log/agent.log 2>&1 < /dev/null &",
        "echo $! > run/agent.pid",
        "",
    ])
