"""What a device is and has: SSH targets, hosts files, tags, the probe and its facts, the refusal
rules. Pure (the probe is a script, its output parsed here); table-tested in
tests/test_provision_rules.py."""

from __future__ import annotations

__all__ = [
    "AGENT_UNIT",
    "RUNTIMES",
    "RUNTIME_ARCHITECTURES",
    "STATE_FILE",
    "AgentCapabilities",
    "HostEntry",
    "HostFacts",
    "HostRefusedError",
    "HostRequirements",
    "ProvisionError",
    "SshTarget",
    "check_host",
    "default_prefix",
    "device_id_from_hostname",
    "file_action",
    "parse_agent_capabilities",
    "parse_host_facts",
    "parse_hosts_file",
    "parse_tags",
    "parse_target",
    "probe_script",
]

import base64
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError, GateFailedError
from edgeship.ota.topics import validate_identifier

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


def device_id_from_hostname(facts: HostFacts) -> str:
    """The device id when none is given: the short host name, made an identifier."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", (facts.hostname or "").split(".")[0])[:64].strip("-._")
    if not name:
        raise BadInputError("the device reported no usable host name; pass --device-id")
    return name


@dataclass(frozen=True)
class AgentCapabilities:
    """What the installed agent says it can do (``edgeship-agent --version --json``)."""

    version: str | None = None
    mqtt: bool | None = None
    """None: could not be told (the wait for it to come online is skipped with a note)."""
    desired_schemas: tuple[int, ...] = (1,)

    @property
    def multi_model(self) -> bool:
        return 2 in self.desired_schemas


_PLAIN_VERSION = re.compile(r"(?:^|\s)version\s+(\d+)\.(\d+)\.(\d+)\S*\s*$")


def parse_agent_capabilities(json_output: str, plain_output: str) -> AgentCapabilities:
    """Read ``edgeship-agent --version --json`` tolerantly (pure).

    A JSON object: ``version`` and ``protocol`` (``mqtt``: bool, ``desired_schema``: list of
    ints). Anything else is an agent from before ``--json``: its plain ``--version`` line
    (``edgeship-agent, version 0.1.0``) gives the version; every published agent (0.1.0 on)
    has the MQTT fleet link, and none of them reads more than desired-state schema 1. No
    version at all: MQTT unknown.
    """
    try:
        doc = json.loads(json_output)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        found = doc.get("protocol")
        protocol: dict[str, Any] = found if isinstance(found, dict) else {}
        schemas = protocol.get("desired_schema", [1])
        if not isinstance(schemas, list):
            schemas = [schemas]
        mqtt = protocol.get("mqtt")
        return AgentCapabilities(
            version=str(doc["version"]) if doc.get("version") is not None else None,
            mqtt=mqtt if isinstance(mqtt, bool) else None,
            desired_schemas=tuple(sorted({int(s) for s in schemas
                                          if isinstance(s, int) and not isinstance(s, bool)})) or (1,))
    for line in reversed(plain_output.strip().splitlines()):
        m = _PLAIN_VERSION.search(line)
        if m:
            version = ".".join(m.groups())
            return AgentCapabilities(version=version, mqtt=(int(m.group(1)), int(m.group(2))) >= (0, 1))
    return AgentCapabilities()
