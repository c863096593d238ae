"""Provisioning a device over SSH (fabric): check it, install the agent, start it.

The decisions are pure and table-tested: parsing what the host reported
(``parse_host_facts``), the refusal rules (``check_host``), the target and
hosts-file syntax, and what each step must do given what is already on the
device (``file_action``). The SSH steps are a thin layer over ``RemoteShell``
(one real implementation, ``FabricShell``), tested against a real sshd.

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

__all__ = [
    "RUNTIMES",
    "RUNTIME_ARCHITECTURES",
    "HostRefusedError",
    "ProvisionError",
    "HostRequirements",
    "HostFacts",
    "SshTarget",
    "HostEntry",
    "StepResult",
    "ProvisionOptions",
    "ProvisionReport",
    "RemoteShell",
    "CommandResult",
    "FabricShell",
    "parse_target",
    "parse_tags",
    "parse_hosts_file",
    "parse_host_facts",
    "check_host",
    "default_prefix",
    "file_action",
    "probe_script",
    "render_systemd_unit",
    "render_agent_env",
    "broker_table_lines",
    "wheel_content_id",
    "build_project_wheel",
    "collect_wheels",
    "provision",
    "deprovision",
    "record_fleet_tags",
]

import base64
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from edgeship.ota.errors import (
    BadInputError,
    EdgeshipError,
    GateFailedError,
    require_module,
)
from edgeship.ota.hashing import sha256_file
from edgeship.ota.topics import (
    DEFAULT_PREFIX,
    STATUS,
    device_topic,
    validate_identifier,
)

RUNTIMES = ("litert", "tflite", "onnx")
RUNTIME_ARCHITECTURES: dict[str, frozenset[str]] = {
    "litert": frozenset({"x86_64", "aarch64"}),
    "tflite": frozenset({"x86_64", "aarch64", "armv7l"}),
    "onnx": frozenset({"x86_64", "aarch64"}),
}
"""Machines each runtime publishes Linux wheels for (ai-edge-litert, tflite-runtime, onnxruntime)."""

AGENT_UNIT = "edgeship-agent.service"
STATE_FILE = "provision.json"


class HostRefusedError(GateFailedError):
    """The host cannot run the agent (exit 3: a gate refused it); nothing was changed."""


class ProvisionError(EdgeshipError):
    """A provisioning step failed on the device (exit 1)."""


# -- pure: targets, tags, hosts files -----------------------------------------------------------

@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})$")


def parse_target(text: str, *, port: int | None = None, default_user: str | None = None) -> SshTarget:
    """``USER@HOST[:PORT]`` (``[v6]:PORT`` for IPv6) -> SshTarget; ``port`` overrides the one in the text."""
    user, sep, rest = text.rpartition("@")
    if not sep:
        user, rest = default_user or "", text
    if not user or not _USER.match(user):
        raise BadInputError(f"target {text!r}: expected USER@HOST[:PORT] with a valid user name")
    host, p = rest, None
    if rest.startswith("["):
        end = rest.find("]")
        host, tail = rest[: end + 1], rest[end + 1:]
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise BadInputError(f"target {text!r}: bad port after the IPv6 address")
            p = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, ptext = rest.partition(":")
        if not ptext.isdigit():
            raise BadInputError(f"target {text!r}: port {ptext!r} is not a number")
        p = int(ptext)
    if not _HOST.match(host):
        raise BadInputError(f"target {text!r}: {host!r} is not a host name or address")
    final = port if port is not None else (p if p is not None else 22)
    if not 1 <= final <= 65535:
        raise BadInputError(f"target {text!r}: port {final} is out of range")
    return SshTarget(user, host.strip("[]"), final)


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` items -> a dict; keys are identifiers, values non-empty."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise BadInputError(f"tag {item!r} must be KEY=VALUE")
        validate_identifier(key, "tag key")
        if len(value) > 128 or any(c in value for c in "\n\r\t"):
            raise BadInputError(f"tag {key}: value must be 1-128 characters on one line")
        tags[key] = value
    return tags


@dataclass(frozen=True)
class HostEntry:
    """One line of a hosts file."""

    target: SshTarget
    device_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    line: int = 0


def parse_hosts_file(text: str, *, where: str = "hosts file") -> list[HostEntry]:
    """One device per line: ``USER@HOST[:PORT] [id=DEVICE_ID] [KEY=VALUE ...]``; ``#`` comments.

    Errors name the line; a device id or a host listed twice is refused.
    """
    entries: list[HostEntry] = []
    seen_hosts: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        first, *rest = line.split()
        try:
            target = parse_target(first)
            device_id: str | None = None
            tags: dict[str, str] = {}
            for item in rest:
                if item.startswith("id="):
                    device_id = validate_identifier(item[3:], "device id")
                else:
                    tags.update(parse_tags([item]))
        except BadInputError as exc:
            raise BadInputError(f"{where} line {n}: {exc.message}") from None
        key = f"{target.host}:{target.port}/{target.user}"
        if key in seen_hosts:
            raise BadInputError(f"{where} line {n}: {target} is already on line {seen_hosts[key]}")
        seen_hosts[key] = n
        if device_id is not None:
            if device_id in seen_ids:
                raise BadInputError(f"{where} line {n}: device id {device_id} is already on line {seen_ids[device_id]}")
            seen_ids[device_id] = n
        entries.append(HostEntry(target, device_id, tags, n))
    if not entries:
        raise BadInputError(f"{where} lists no hosts")
    return entries


# -- pure: host facts and the refusal rules -------------------------------------------------------

@dataclass(frozen=True)
class HostRequirements:
    """What a device needs to run the agent (override per run with options or the environment)."""

    min_python: tuple[int, int] = (3, 9)
    min_disk_mb: int = 300
    min_memory_mb: int = 128

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, min_disk_mb: int | None = None,
                 min_memory_mb: int | None = None) -> HostRequirements:
        """Defaults, then EDGESHIP_PROVISION_MIN_DISK_MB / _MIN_MEMORY_MB, then the explicit values."""
        env = os.environ if environ is None else environ
        base = cls()
        disk, mem = base.min_disk_mb, base.min_memory_mb
        for name, current in (("EDGESHIP_PROVISION_MIN_DISK_MB", "disk"), ("EDGESHIP_PROVISION_MIN_MEMORY_MB", "mem")):
            if env.get(name):
                try:
                    value = int(env[name])
                except ValueError:
                    raise BadInputError(f"{name}={env[name]!r} is not a whole number of MB") from None
                disk, mem = (value, mem) if current == "disk" else (disk, value)
        disk = min_disk_mb if min_disk_mb is not None else disk
        mem = min_memory_mb if min_memory_mb is not None else mem
        if disk < 0 or mem < 0:
            raise BadInputError("minimum disk and memory must be >= 0 MB")
        return cls(base.min_python, disk, mem)


@dataclass(frozen=True)
class HostFacts:
    """What the probe found on the device (None: could not be determined)."""

    arch: str | None = None
    system: str | None = None
    python: str | None = None
    python_version: tuple[int, int, int] | None = None
    venv_module: bool = False
    disk_free_mb: int | None = None
    memory_available_mb: int | None = None
    systemd: bool = False
    user: str | None = None
    uid: int | None = None
    home: str | None = None
    hostname: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # rel path under the prefix -> sha256
    state: dict[str, Any] | None = None
    venv_exists: bool = False
    agent_installed: bool = False
    agent_running: bool = False
    unit_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch, "system": self.system, "python": self.python,
            "python_version": ".".join(map(str, self.python_version)) if self.python_version else None,
            "venv_module": self.venv_module, "disk_free_mb": self.disk_free_mb,
            "memory_available_mb": self.memory_available_mb, "systemd": self.systemd, "user": self.user,
            "uid": self.uid, "home": self.home, "hostname": self.hostname,
            "agent_installed": self.agent_installed, "agent_running": self.agent_running,
        }


def probe_script(prefix: str) -> str:
    """A POSIX sh script that prints ``key=value`` lines about the host and what is under ``prefix``.

    Read-only: safe to run on a host that will be refused, and under --dry-run.
    """
    p = shlex.quote(prefix)
    return "\n".join([
        "echo arch=$(uname -m)",
        "echo system=$(uname -s)",
        "echo user=$(id -un)",
        "echo uid=$(id -u)",
        "echo home=$HOME",
        "echo hostname=$(hostname 2>/dev/null || uname -n)",
        "PY=$(command -v python3 2>/dev/null)",
        "echo python=$PY",
        'if [ -n "$PY" ]; then',
        '  "$PY" -c \'import sys; print("python_version=%d.%d.%d" % sys.version_info[:3])\' 2>/dev/null',
        '  "$PY" -c "import venv, ensurepip" >/dev/null 2>&1 && echo venv=yes || echo venv=no',
        "fi",
        f"D={p}; while [ ! -d \"$D\" ]; do D=$(dirname \"$D\"); done",
        "echo disk_free_kb=$(df -Pk \"$D\" 2>/dev/null | awk 'NR==2 {print $4}')",
        "echo mem_available_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null)",
        "[ -d /run/systemd/system ] && echo systemd=yes || echo systemd=no",
        f"if [ -d {p} ]; then cd {p} && for f in wheels/*.whl etc/agent.toml etc/agent.env etc/trust/* etc/broker/*; do",
        '  [ -f "$f" ] && echo "file=$(sha256sum "$f" | cut -d" " -f1) $f"',
        "done; fi",
        f"[ -f {p}/{STATE_FILE} ] && echo state=$(base64 < {p}/{STATE_FILE} | tr -d '\\n')",
        f"[ -x {p}/venv/bin/python ] && echo venv_exists=yes",
        f"[ -x {p}/venv/bin/edgeship-agent ] && echo agent_installed=yes",
        f"if [ -f {p}/run/agent.pid ] && kill -0 $(cat {p}/run/agent.pid) 2>/dev/null; then echo agent_running=yes; fi",
        f"if [ -d /run/systemd/system ] && systemctl is-active --quiet {AGENT_UNIT} 2>/dev/null; then echo agent_running=yes; fi",
        f"[ -f /etc/systemd/system/{AGENT_UNIT} ] && echo unit=$(sha256sum /etc/systemd/system/{AGENT_UNIT} | cut -d' ' -f1)",
        "true",
    ])


def parse_host_facts(text: str) -> HostFacts:
    """Parse the probe's output (pure); unknown lines are ignored, missing ones stay None."""
    values: dict[str, str] = {}
    files: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        if key == "file":
            digest, _, rel = value.partition(" ")
            if re.fullmatch(r"[0-9a-f]{64}", digest) and rel:
                files[rel] = digest
            continue
        values[key] = value.strip()

    def intval(key: str, scale: int = 1) -> int | None:
        v = values.get(key, "")
        return int(v) // scale if v.isdigit() else None

    version = None
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", values.get("python_version", ""))
    if m:
        version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    state = None
    if values.get("state"):
        try:
            decoded = json.loads(base64.b64decode(values["state"]).decode("utf-8"))
            state = decoded if isinstance(decoded, dict) else None
        except (ValueError, UnicodeDecodeError):
            state = None  # a damaged state file: everything is redone
    return HostFacts(
        arch=values.get("arch") or None, system=values.get("system") or None,
        python=values.get("python") or None, python_version=version, venv_module=values.get("venv") == "yes",
        disk_free_mb=intval("disk_free_kb", 1024), memory_available_mb=intval("mem_available_kb", 1024),
        systemd=values.get("systemd") == "yes", user=values.get("user") or None, uid=intval("uid"),
        home=values.get("home") or None, hostname=values.get("hostname") or None, files=files, state=state,
        venv_exists=values.get("venv_exists") == "yes", agent_installed=values.get("agent_installed") == "yes", agent_running=values.get("agent_running") == "yes",
        unit_sha256=values.get("unit") or None,
    )


def check_host(facts: HostFacts, requirements: HostRequirements, runtime: str) -> list[str]:
    """Why this host cannot run the agent with ``runtime`` (empty: it can). Pure."""
    reasons: list[str] = []
    if runtime not in RUNTIMES:
        return [f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}"]
    if facts.system is not None and facts.system != "Linux":
        reasons.append(f"the agent runs on Linux, this host runs {facts.system}")
    if facts.arch is None:
        reasons.append("could not determine the architecture (uname -m)")
    elif facts.arch not in RUNTIME_ARCHITECTURES[runtime]:
        fits = [r for r in RUNTIMES if facts.arch in RUNTIME_ARCHITECTURES[r]]
        reasons.append(
            f"runtime {runtime} has no wheels for {facts.arch}"
            + (f"; choose --runtime {' or '.join(fits)}" if fits else "; no runtime supports it")
        )
    want = ".".join(map(str, requirements.min_python))
    if facts.python is None:
        reasons.append(f"no python3 on the PATH (the agent needs Python {want}+)")
    elif facts.python_version is None:
        reasons.append(f"could not run {facts.python} to read its version")
    elif facts.python_version[:2] < requirements.min_python:
        got = ".".join(map(str, facts.python_version))
        reasons.append(f"Python {got} is too old: the agent needs {want}+")
    elif not facts.venv_module:
        reasons.append(f"{facts.python} has no venv/ensurepip module (Debian: apt install python3-venv)")
    if facts.disk_free_mb is None:
        reasons.append("could not determine the free disk space (df)")
    elif facts.disk_free_mb < requirements.min_disk_mb:
        reasons.append(f"only {facts.disk_free_mb} MB free disk, the agent needs {requirements.min_disk_mb} MB")
    if facts.memory_available_mb is None:
        reasons.append("could not determine the available memory (/proc/meminfo)")
    elif facts.memory_available_mb < requirements.min_memory_mb:
        reasons.append(
            f"only {facts.memory_available_mb} MB memory available, the agent needs {requirements.min_memory_mb} MB")
    return reasons


def default_prefix(facts: HostFacts) -> str:
    """``/opt/edgeship`` for root, else ``~/edgeship`` of the SSH user."""
    if facts.uid == 0:
        return "/opt/edgeship"
    if not facts.home:
        raise ProvisionError("the device did not report a home folder; pass --prefix")
    return f"{facts.home.rstrip('/')}/edgeship"


def file_action(rel: str, want_sha256: str, facts: HostFacts) -> str:
    """``create``, ``update`` or ``unchanged`` for one managed file. Pure."""
    have = facts.files.get(rel)
    if have is None:
        return "create"
    return "unchanged" if have == want_sha256 else "update"


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
    here = Path(__file__).resolve().parents[1]
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


# -- the thin SSH layer --------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class RemoteShell(Protocol):
    """What provisioning needs from a device: run a sh command, upload a file."""

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult: ...
    def put(self, local: Path, remote: str) -> None: ...
    def close(self) -> None: ...


def quiet_paramiko() -> None:
    """Keep paramiko's own log (a 20-line traceback for an unreachable host, from its transport
    thread) off the terminal: every failure it logs also reaches us as an exception, which the
    command turns into one line. ``EDGESHIP_SSH_DEBUG=1`` lets it through again."""
    import logging
    import os

    logger = logging.getLogger("paramiko")
    if os.environ.get("EDGESHIP_SSH_DEBUG"):
        return
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


class FabricShell:
    """A RemoteShell over SSH with fabric (key authentication only)."""

    def __init__(self, target: SshTarget, *, identity: str | None = None, known_hosts: str | None = None,
                 connect_timeout: float = 15.0) -> None:
        fabric = require_module("fabric", "host")
        paramiko = require_module("paramiko", "host")
        quiet_paramiko()
        kwargs: dict[str, Any] = {"allow_agent": identity is None, "look_for_keys": identity is None}
        if identity:
            if not Path(identity).is_file():
                raise BadInputError(f"SSH identity {identity} does not exist")
            kwargs["key_filename"] = identity
        self.target = target
        self._conn = fabric.Connection(host=target.host, user=target.user, port=target.port,
                                       connect_timeout=connect_timeout, connect_kwargs=kwargs)
        if known_hosts:
            # strict: only hosts already in known_hosts are accepted
            self._conn.client.load_host_keys(known_hosts)
            self._conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self._conn.open()
        except Exception as exc:  # noqa: BLE001 - paramiko/socket errors of every kind
            raise ProvisionError(f"cannot reach {target} over SSH: {_one_line(exc)}") from None

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        try:
            r = self._conn.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            raise ProvisionError(f"{self.target}: command failed to run: {_one_line(exc)}") from None
        return CommandResult(int(r.exited), str(r.stdout), str(r.stderr))

    def put(self, local: Path, remote: str) -> None:
        try:
            self._conn.put(str(local), remote=remote)
        except Exception as exc:  # noqa: BLE001
            raise ProvisionError(f"{self.target}: uploading {local.name} to {remote} failed: {_one_line(exc)}") from None

    def close(self) -> None:
        self._conn.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# -- the steps -----------------------------------------------------------------------------------

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

    @property
    def changed(self) -> bool:
        return any(s.status == "changed" for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "device_id": self.device_id, "prefix": self.prefix,
                "changed": self.changed, "steps": [s.to_dict() for s in self.steps],
                "host": self.facts.to_dict() if self.facts else None, "notes": self.notes}


StepCallback = Callable[[StepResult], None]


class _Run:
    """One provisioning run: the facts, the options, and the step log."""

    def __init__(self, shell: RemoteShell, options: ProvisionOptions, report: ProvisionReport,
                 on_step: StepCallback | None) -> None:
        self.shell, self.opt, self.report, self.on_step = shell, options, report, on_step

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
            raise ProvisionError(f"{self.report.target}: {what} failed: {last[:300]}")
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


def probe(shell: RemoteShell, prefix: str) -> HostFacts:
    r = shell.run(probe_script(prefix), timeout=60)
    return parse_host_facts(r.stdout)


def _resolve_prefix(shell: RemoteShell, options: ProvisionOptions) -> tuple[str, HostFacts]:
    if options.prefix is None:
        prefix = default_prefix(probe(shell, "/"))
    else:
        prefix = options.prefix
    if not prefix.startswith("/"):
        raise BadInputError(f"--prefix {prefix!r} must be an absolute path on the device")
    if prefix.rstrip("/") in ("", "/usr", "/etc", "/opt", "/home", "/root", "/var", "/tmp", "/bin", "/lib"):
        raise BadInputError(f"--prefix {prefix!r} is a system folder; use a folder of its own (e.g. /opt/edgeship)")
    return prefix, probe(shell, prefix)


def provision(shell: RemoteShell, target: str, options: ProvisionOptions, *,
              on_step: StepCallback | None = None) -> ProvisionReport:
    """Provision one device through ``shell``; idempotent; ``options.dry_run`` changes nothing."""
    from .identities import BrokerFolder, read_connection

    report = ProvisionReport(target)
    run = _Run(shell, options, report, on_step)
    prefix, facts = _resolve_prefix(shell, options)
    report.prefix, report.facts = prefix, facts
    q = shlex.quote

    # 1. the host
    reasons = check_host(facts, options.requirements, options.runtime)
    if reasons:
        run.step("check host", "failed", "; ".join(reasons))
        raise HostRefusedError(f"{target} refused, nothing was changed: " + "; ".join(reasons))
    py = ".".join(map(str, facts.python_version or ()))
    run.step("check host", "unchanged",
             f"{facts.arch}, Python {py}, {facts.disk_free_mb} MB disk, {facts.memory_available_mb} MB memory, "
             f"systemd {'yes' if facts.systemd else 'no'}")
    device_id = options.device_id or (facts.state or {}).get("device_id") or _device_id_from_hostname(facts)
    validate_identifier(device_id, "device id")
    validate_identifier(options.fleet, "fleet")
    report.device_id = device_id
    state = facts.state or {}
    if state.get("device_id") not in (None, device_id) or state.get("fleet") not in (None, options.fleet):
        raise BadInputError(
            f"{target} is already provisioned as {state.get('device_id')} of fleet {state.get('fleet')}; "
            f"deprovision it first (`edgeship device deprovision {target}`)"
        )
    if options.root_metadata is None or options.director_key is None:
        raise BadInputError("provisioning needs the trusted root metadata and the director's public key "
                             "(--root ROOT.json --director-key KEY.pub, from the release repository)")
    for p, what in ((options.root_metadata, "root metadata"), (options.director_key, "director key")):
        if not p.is_file():
            raise BadInputError(f"{what} {p} does not exist")
    dry = options.dry_run
    changed_for_agent = False

    # 2. the wheels
    with tempfile.TemporaryDirectory(prefix="edgeship-wheels-") as build:
        if options.wheels is not None:
            wheels, complete = list(options.wheels[0]), options.wheels[1]
        else:
            wheels, complete = collect_wheels(options.wheelhouse, Path(build))
        wanted = {w.name: (sha256_file(w), wheel_content_id(w)) for w in wheels}
        old_wheels = state.get("wheels", {}) if isinstance(state.get("wheels"), dict) else {}
        to_upload = [w for w in wheels
                     if facts.files.get(f"wheels/{w.name}") != wanted[w.name][0]
                     and not (isinstance(old_wheels.get(w.name), dict)
                              and old_wheels[w.name].get("content") == wanted[w.name][1]
                              and facts.files.get(f"wheels/{w.name}") == old_wheels[w.name].get("sha256"))]
        stale = sorted(rel[len("wheels/"):] for rel in facts.files if rel.startswith("wheels/")
                       and rel[len("wheels/"):] not in wanted)
        if not dry:
            run.sh(f"mkdir -p {q(prefix)}/wheels {q(prefix)}/etc/trust {q(prefix)}/etc/broker {q(prefix)}/data "
                   f"{q(prefix)}/run {q(prefix)}/log && chmod 700 {q(prefix)}/etc/broker", "creating the folders")
        if to_upload or stale:
            detail = f"{len(to_upload)} of {len(wheels)} wheels to upload" + (f", {len(stale)} stale removed" if stale else "")
            if dry:
                run.step("upload wheels", "planned", detail)
            else:
                for w in to_upload:
                    run.put_file(w, f"{prefix}/wheels/{w.name}", 0o644)
                for name in stale:
                    run.sh(f"rm -f {q(prefix)}/wheels/{q(name)}", "removing a stale wheel")
                run.step("upload wheels", "changed", detail)
        else:
            run.step("upload wheels", "unchanged", f"{len(wheels)} wheels already there")
        installed_id = hashlib.sha256(json.dumps(
            [options.runtime, sorted(v[1] for v in wanted.values())]).encode()).hexdigest()

    # 3. the virtual environment
    if facts.venv_exists:
        run.step("virtual environment", "unchanged", f"{prefix}/venv")
    elif dry:
        run.step("virtual environment", "planned", f"python3 -m venv {prefix}/venv")
    else:
        run.sh(f"python3 -m venv {q(prefix)}/venv", "creating the virtual environment", timeout=300)
        run.step("virtual environment", "changed", f"{prefix}/venv")

    # 4. edgeship[RUNTIME]
    spec = f"edgeship[{options.runtime}]"
    if facts.agent_installed and state.get("installed") == installed_id:
        run.step(f"install {spec}", "unchanged", state.get("edgeship_version", ""))
    elif dry:
        run.step(f"install {spec}", "planned", "offline from the wheelhouse" if complete else "from the device's index")
    else:
        pip = f"{q(prefix)}/venv/bin/python -m pip install --disable-pip-version-check --quiet"
        index = "--no-index " if complete else ""
        run.sh(f"{pip} {index}--find-links {q(prefix)}/wheels {q(spec)}", f"pip install {spec}", timeout=900)
        # same version, new build (a development upgrade): pip would keep the old one
        run.sh(f"{pip} --no-index --no-deps --force-reinstall {q(prefix)}/wheels/edgeship-*.whl",
               "installing the edgeship wheel", timeout=300)
        version = run.sh(f"{q(prefix)}/venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"edgeship\"))'",
                         "reading the installed version").strip()
        state = {**state, "installed": installed_id, "edgeship_version": version}
        changed_for_agent = True
        run.step(f"install {spec}", "changed", f"edgeship {version}")

    # 5. trust: root metadata and the director key
    trust_changed = []
    for local, rel in ((options.root_metadata, "etc/trust/root.json"), (options.director_key, "etc/trust/director.pub")):
        action = file_action(rel, sha256_file(local), facts)
        if action != "unchanged":
            trust_changed.append(f"{rel} ({action})")
            if not dry:
                run.put_bytes(local.read_bytes(), f"{prefix}/{rel}", 0o644)
    run.step("trust files", "unchanged" if not trust_changed else ("planned" if dry else "changed"),
             ", ".join(trust_changed) or "root.json and director.pub up to date")
    changed_for_agent |= bool(trust_changed) and not dry

    # 6. broker credentials
    broker_url = options.broker_url
    connection: dict[str, Any] | None = None
    password: str | None = None
    if options.broker_dir is None:
        run.step("broker credentials", "skipped", "no --broker-dir: the agent runs without a broker")
    else:
        folder = BrokerFolder(options.broker_dir).require()
        record = folder.record(device_id)
        remote_fp = facts.files.get("etc/broker/client.crt")
        usable = (record is not None and record.active and record.fleet == options.fleet and record.kind == "device"
                  and ((record.auth == "cert" and remote_fp is not None
                        and remote_fp == (state.get("client_crt_sha256") or ""))
                       or (record.auth == "password" and "etc/broker/password" in facts.files
                           and facts.files["etc/broker/password"] == state.get("password_sha256"))))
        if usable:
            run.step("broker credentials", "unchanged", f"{record.auth} credentials of {device_id} still valid")  # type: ignore[union-attr]
            connection = state.get("connection")
        elif dry:
            run.step("broker credentials", "planned",
                     f"issue {'(replacing the active ones) ' if record and record.active else ''}for {device_id}")
        else:
            with tempfile.TemporaryDirectory(prefix="edgeship-creds-") as d:
                issued = folder.issue_device(device_id, options.fleet, Path(d) / "creds",
                                             reissue=bool(record and record.active))
                connection = read_connection(issued.out)
                if broker_url:
                    connection["url"] = broker_url
                for f in sorted(issued.out.iterdir()):
                    data = f.read_bytes()
                    if f.name == "connection.json":
                        data = (json.dumps({**json.loads(data), **({"url": broker_url} if broker_url else {})},
                                           indent=2, sort_keys=True) + "\n").encode()
                    run.put_bytes(data, f"{prefix}/etc/broker/{f.name}",
                                  0o600 if f.name in ("client.key", "password") else 0o644)
                    if f.name == "client.crt":
                        state["client_crt_sha256"] = hashlib.sha256(data).hexdigest()
                    if f.name == "password":
                        state["password_sha256"] = hashlib.sha256(data).hexdigest()
                        password = data.decode().strip()
            connection = {k: (Path(v).name if k in ("ca", "cert", "key", "password") else v)
                          for k, v in connection.items()}
            state["connection"] = connection
            changed_for_agent = True
            run.step("broker credentials", "changed",
                     f"{issued.record.auth} credentials issued for {device_id}"
                     + (f" (replaced {issued.replaced_serial})" if issued.replaced_serial else ""))
        if connection and (password is not None or "password" not in connection):
            # (an unchanged password device keeps its env file: the password is not known here)
            env_text = render_agent_env(prefix, connection, password).encode()
            action = file_action("etc/agent.env", hashlib.sha256(env_text).hexdigest(), facts)
            if action != "unchanged" and not dry:
                run.put_bytes(env_text, f"{prefix}/etc/agent.env", 0o600)
                changed_for_agent = True

    # 7. the agent config, written by the device's own edgeship-agent init
    url = (connection or {}).get("url", "") if connection else ""
    init = (f"{q(prefix)}/venv/bin/edgeship-agent init --data {q(prefix)}/data --device-id {q(device_id)} "
            f"--fleet {q(options.fleet)} --root {q(prefix)}/etc/trust/root.json "
            f"--director-key {q(prefix)}/etc/trust/director.pub --bind {q(options.bind)}"
            + (f" --broker {q(url)}" if url else ""))
    if dry:
        run.step("agent config", "planned", f"edgeship-agent init ... -o {prefix}/etc/agent.toml")
    else:
        cfg = f"{q(prefix)}/etc/agent.toml"
        append = ""
        if connection:
            # init writes [broker] last; the credentials' keys go into that table
            lines = broker_table_lines(prefix, connection, BrokerFolder(options.broker_dir).settings().prefix
                                       if options.broker_dir else DEFAULT_PREFIX)
            append = (f" && [ \"$(grep '^\\[' {cfg}.new | tail -n 1)\" = '[broker]' ]"
                      f" && printf '%s\\n' {' '.join(q(x) for x in lines)} >> {cfg}.new")
        out = run.sh(f"rm -f {cfg}.new && {init} -o {cfg}.new{append} && if cmp -s {cfg}.new {cfg}; then rm -f {cfg}.new; echo same; "
                     f"else mv -f {cfg}.new {cfg}; echo new; fi", "edgeship-agent init")
        if out.strip().endswith("new"):
            changed_for_agent = True
            run.step("agent config", "changed", f"{prefix}/etc/agent.toml")
        else:
            run.step("agent config", "unchanged", f"{prefix}/etc/agent.toml")

    # 8. the service, and the agent running
    use_systemd = facts.systemd and facts.uid == 0
    if use_systemd:
        unit = render_systemd_unit(prefix, facts.user or "root").encode()
        unit_new = facts.unit_sha256 != hashlib.sha256(unit).hexdigest()
        if dry:
            run.step("systemd unit", "planned" if unit_new else "unchanged", f"/etc/systemd/system/{AGENT_UNIT}")
        elif unit_new:
            run.put_bytes(unit, f"/etc/systemd/system/{AGENT_UNIT}", 0o644)
            run.sh(f"systemctl daemon-reload && systemctl enable {AGENT_UNIT}", "enabling the unit")
            changed_for_agent = True
            run.step("systemd unit", "changed", f"/etc/systemd/system/{AGENT_UNIT} enabled")
        else:
            run.step("systemd unit", "unchanged", f"/etc/systemd/system/{AGENT_UNIT}")
    else:
        run.step("systemd unit", "skipped",
                 ("no systemd on this host" if not facts.systemd else f"{facts.user} is not root")
                 + f": the agent is started with setsid/nohup, pid in {prefix}/run/agent.pid "
                 f"(start it at boot yourself, e.g. `@reboot {prefix}/bin/start-agent` in crontab)")
    restart = changed_for_agent or not facts.agent_running
    if not restart:
        run.step("start agent", "unchanged", "already running")
    elif dry:
        run.step("start agent", "planned", "restart" if facts.agent_running else "start")
    else:
        if use_systemd:
            run.sh(f"systemctl restart {AGENT_UNIT}", "starting the agent")
        else:
            _install_start_script(run, prefix)
            run.sh(f"{q(prefix)}/bin/start-agent", "starting the agent")
        time.sleep(1.0)
        alive = shell.run(_agent_alive_command(prefix, use_systemd))
        if alive.exit_code != 0:
            tail = shell.run(f"tail -n 5 {q(prefix)}/log/agent.log 2>/dev/null").stdout.strip().splitlines()
            raise ProvisionError(f"{target}: the agent exited right after it started: "
                                 + (tail[-1] if tail else f"see {prefix}/log/agent.log"))
        run.step("start agent", "changed", "restarted" if facts.agent_running else "started")

    # 9. online over MQTT
    if dry:
        run.step("wait online", "planned" if options.broker_dir and options.wait_online else "skipped")
    elif options.broker_dir is None or not options.wait_online:
        run.step("wait online", "skipped", "no broker" if options.broker_dir is None else "--no-wait")
    else:
        # An agent speaks MQTT once some module of edgeship.agent uses edgeship.ota.transport.
        support = shell.run(f"grep -lE 'ota.transport|ota import transport|MqttConnection' "
                            f"{q(prefix)}/venv/lib/python3*/site-packages/edgeship/agent/*.py")
        if support.exit_code != 0 or not support.stdout.strip():
            report.notes.append("the installed agent has no MQTT support yet, so it cannot report online; "
                                "the wait was skipped")
            run.step("wait online", "skipped", "the installed agent does not use edgeship.ota.transport yet")
        else:
            waited = wait_online(BrokerFolder(options.broker_dir), options.fleet, device_id, options.online_timeout)
            run.step("wait online", "unchanged" if not restart else "changed", f"online after {waited:.1f} s")

    # 10. the tags in the fleet store, where `rollout start --select TAG=VALUE` looks for them
    if options.db_url and options.tags:
        if dry:
            run.step("fleet tags", "planned", ", ".join(f"{k}={v}" for k, v in sorted(options.tags.items())))
        else:
            status, detail = record_fleet_tags(options.db_url, options.fleet, device_id, options.tags,
                                               timeout_s=options.tags_timeout)
            if status == "skipped":
                report.notes.append(detail)
            run.step("fleet tags", status, detail)

    # 11. the record of what is there
    if not dry:
        state.update({
            "schema": 1, "device_id": device_id, "fleet": options.fleet, "runtime": options.runtime,
            "tags": options.tags, "prefix": prefix, "service": "systemd" if use_systemd else "nohup",
            "wheels": {name: {"sha256": v[0], "content": v[1]} for name, v in wanted.items()},
        })
        text = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        old = facts.state or {}
        if {k: v for k, v in old.items() if k != "provisioned"} != {k: v for k, v in state.items() if k != "provisioned"}:
            state["provisioned"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            text = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
            run.put_bytes(text, f"{prefix}/{STATE_FILE}", 0o644)
    return report


def _device_id_from_hostname(facts: HostFacts) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", (facts.hostname or "").split(".")[0])[:64].strip("-._")
    if not name:
        raise BadInputError("the device reported no usable host name; pass --device-id")
    return name


def _agent_alive_command(prefix: str, use_systemd: bool) -> str:
    if use_systemd:
        return f"systemctl is-active --quiet {AGENT_UNIT}"
    p = shlex.quote(prefix)
    return f"[ -f {p}/run/agent.pid ] && kill -0 $(cat {p}/run/agent.pid)"


def _install_start_script(run: _Run, prefix: str) -> None:
    """bin/start-agent: stop a running agent, start it detached (setsid nohup), pid in run/agent.pid."""
    p = shlex.quote(prefix)
    script = "\n".join([
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
    run.sh(f"mkdir -p {p}/bin", "creating bin/")
    run.put_bytes(script.encode(), f"{prefix}/bin/start-agent", 0o755)


def record_fleet_tags(db_url: str, fleet: str, device_id: str, tags: Mapping[str, str], *,
                      timeout_s: float = 20.0, poll_s: float = 0.25) -> tuple[str, str]:
    """Set ``tags`` on the device in the fleet store; ("changed" | "unchanged" | "skipped", detail).

    The store learns of a device from its reports, through the controller: wait up to
    ``timeout_s`` for it to appear rather than invent a row for it. A device of another
    fleet is left alone. "skipped" says how to set the tags later.
    """
    from .store import FleetStore

    later = f"`edgeship device tag {device_id} " + " ".join(f"{k}={v}" for k, v in sorted(tags.items())) + "`"
    deadline = time.monotonic() + timeout_s
    with FleetStore(db_url) as store:
        while True:
            try:
                info = store.get_device(device_id)
                break
            except BadInputError:
                if time.monotonic() >= deadline:
                    return "skipped", (f"tags not recorded: the fleet store does not know {device_id} yet "
                                       f"(is the controller running?); set them later with {later}")
                time.sleep(poll_s)
        if info.fleet != fleet:
            return "skipped", (f"tags not recorded: {device_id} is in fleet {info.fleet} in the fleet store, "
                               f"not {fleet}")
        if all(info.tags.get(k) == v for k, v in tags.items()):
            return "unchanged", ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))
        store.set_tags(device_id, dict(tags))
        return "changed", ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


class _StatusWatcher:
    """One MQTT connection per broker folder and process, shared by every device a provisioning
    run waits for (``fleet provision`` waits for several at once): the broker names each client by
    its identity, so two connections with the provisioner's identity would take turns."""

    _lock = threading.Lock()
    _open: dict[str, tuple[Any, int]] = {}

    @classmethod
    def acquire(cls, folder: Any) -> Any:
        from edgeship.ota.transport import MqttConnection, parse_broker_url

        key = str(Path(folder.path).resolve())
        with cls._lock:
            if key in cls._open:
                conn, users = cls._open[key]
                cls._open[key] = (conn, users + 1)
                return conn
            creds = folder.provisioner_credentials()
            url = parse_broker_url(
                creds["url"], username=creds.get("username") if "password" in creds else None,
                password=Path(creds["password"]).read_text().strip() if "password" in creds else None,
                ca_file=creds.get("ca"), cert_file=creds.get("cert"), key_file=creds.get("key"))
            conn = MqttConnection(url, client_id=f"{creds['identity']}-{os.getpid()}"[:128])
            conn.connect(timeout=15.0)
            cls._open[key] = (conn, 1)
            return conn

    @classmethod
    def release(cls, folder: Any) -> None:
        key = str(Path(folder.path).resolve())
        with cls._lock:
            conn, users = cls._open[key]
            if users > 1:
                cls._open[key] = (conn, users - 1)
                return
            del cls._open[key]
        conn.close()


def wait_online(folder: Any, fleet: str, device_id: str, timeout: float) -> float:
    """Subscribe to the device's status topic until it says ``online``; seconds waited.

    With the broker folder's provisioner identity (a controller's rights, its own client id), never
    the controller's: that would take the running controller's session away.
    """
    from edgeship.ota.protocol import ProtocolError, parse_message

    online = threading.Event()

    def handler(message: Any) -> None:
        try:
            if getattr(parse_message(STATUS, message.payload), "state", None) == "online":
                online.set()
        except ProtocolError:
            pass

    start = time.monotonic()
    topic = device_topic(fleet, device_id, STATUS, folder.settings().prefix)
    mqtt = _StatusWatcher.acquire(folder)
    try:
        mqtt.subscribe(topic, handler)
        try:
            if not online.wait(max(0.0, timeout - (time.monotonic() - start))):
                raise ProvisionError(f"device {device_id} did not report online on {topic} within {timeout:.1f} s; "
                                     "see the agent's log on the device")
        finally:
            mqtt.unsubscribe(topic)
    finally:
        _StatusWatcher.release(folder)
    return time.monotonic() - start


def deprovision(shell: RemoteShell, target: str, *, prefix: str | None = None, broker_dir: Path | None = None,
                device_id: str | None = None, dry_run: bool = False,
                on_step: StepCallback | None = None) -> ProvisionReport:
    """Stop the agent, remove the unit and the prefix, revoke the device's broker credentials."""
    from .identities import BrokerFolder

    report = ProvisionReport(target)
    run = _Run(shell, ProvisionOptions(fleet="-"), report, on_step)
    facts = probe(shell, prefix or "/")
    prefix = prefix or default_prefix(facts)
    facts = probe(shell, prefix)
    report.prefix, report.facts = prefix, facts
    state = facts.state or {}
    device_id = device_id or state.get("device_id")
    report.device_id = device_id or ""
    q = shlex.quote
    verb = "planned" if dry_run else "changed"
    if facts.unit_sha256:
        if not dry_run:
            run.sh(f"systemctl disable --now {AGENT_UNIT}; rm -f /etc/systemd/system/{AGENT_UNIT} && "
                   "systemctl daemon-reload", "removing the unit")
        run.step("systemd unit", verb, f"/etc/systemd/system/{AGENT_UNIT} removed")
    if facts.agent_running and not facts.unit_sha256:
        if not dry_run:
            run.sh(f"kill $(cat {q(prefix)}/run/agent.pid); i=0; while kill -0 $(cat {q(prefix)}/run/agent.pid) "
                   f"2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; "
                   f"kill -9 $(cat {q(prefix)}/run/agent.pid) 2>/dev/null; true", "stopping the agent")
        run.step("stop agent", verb, "agent stopped")
    exists = shell.run(f"[ -d {q(prefix)} ]").exit_code == 0
    if exists:
        if not (state or facts.agent_installed or shell.run(f"[ -d {q(prefix)}/venv ]").exit_code == 0):
            raise BadInputError(f"{prefix} on {target} was not made by edgeship provisioning; refusing to remove it")
        if not dry_run:
            run.sh(f"rm -rf {q(prefix)}", f"removing {prefix}")
        run.step("remove files", verb, prefix)
    else:
        run.step("remove files", "unchanged", f"{prefix} is not there")
    if broker_dir is None:
        run.step("revoke credentials", "skipped", "no --broker-dir")
    elif not device_id:
        run.step("revoke credentials", "skipped", "device id unknown (pass --device-id)")
    else:
        folder = BrokerFolder(broker_dir).require()
        record = folder.record(device_id)
        if record is None:
            run.step("revoke credentials", "unchanged", f"{device_id} has no credentials at this broker")
        elif not record.active:
            run.step("revoke credentials", "unchanged", f"{device_id} already revoked")
        elif dry_run:
            run.step("revoke credentials", "planned", device_id)
        else:
            res = folder.revoke(device_id)
            run.step("revoke credentials", "changed",
                     device_id + (f" (broker pid {res.broker_reloaded} reloaded)" if res.broker_reloaded else ""))
    return report

