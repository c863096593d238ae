"""The thin SSH layer: what provisioning needs from a device (run a sh command, upload a file),
with one real implementation over fabric, tested against a real sshd on loopback."""

from __future__ import annotations

__all__ = ["CommandResult", "FabricShell", "RemoteShell", "one_line", "quiet_paramiko"]

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeship.ota.errors import BadInputError, require_module

from .hosts import ProvisionError, SshTarget


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
            raise ProvisionError(f"cannot reach {target} over SSH: {one_line(exc)}") from None

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        try:
            r = self._conn.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - invoke, paramiko and socket errors share no base
            raise ProvisionError(f"{self.target}: command failed to run: {one_line(exc)}") from None
        return CommandResult(int(r.exited), str(r.stdout), str(r.stderr))

    def put(self, local: Path, remote: str) -> None:
        try:
            self._conn.put(str(local), remote=remote)
        except Exception as exc:  # noqa: BLE001 - sftp (paramiko), OSError and socket errors alike
            raise ProvisionError(f"{self.target}: uploading {local.name} to {remote} failed: {one_line(exc)}") from None

    def close(self) -> None:
        self._conn.close()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]

