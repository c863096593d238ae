"""The local control channel between ``edgeship-agent run`` and the other commands.

``run`` holds an exclusive ``flock`` on ``<data>/agent.lock`` for its lifetime and
listens on the Unix socket ``<data>/agent.sock`` (mode 0600: only the agent's
user, and root, may use it). ``install``, ``rollback`` and ``status`` send one
JSON line and read one JSON line back; the running agent performs the update
itself (it owns the serving model, so the swap is hot). When no agent runs,
those commands take the lock and work on the data folder directly.
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "AgentLock", "AgentNotRunning", "ControlClient", "ControlServer"]

import fcntl
import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable

from edgeship.ota.errors import BadInputError, EdgeshipError, first_line

MAX_LINE = 1 << 20

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AgentNotRunning(EdgeshipError):
    """No agent answers on the control socket."""


class AgentLock:
    """The agent's exclusive lock on its data folder (one writer of the state file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, blocking: bool = False, role: str = "run") -> bool:
        """Take the lock (``role``: the command holding it, ``run`` for the daemon,
        written beside the pid so a starting daemon knows whether to wait)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {role}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder_pid(self) -> int | None:
        return self.holder()[0]

    def holder(self) -> tuple[int | None, str | None]:
        """(pid, role) of the process that holds the lock, as it wrote them."""
        try:
            fields = self.path.read_text().split()
            return (int(fields[0]) or None if fields else None), (fields[1] if len(fields) > 1 else None)
        except (OSError, ValueError):
            return None, None


class _StreamHandler(socketserver.StreamRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE)
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("request must be a JSON object with 'op'")
            reply = self.server.dispatch(request)
        except EdgeshipError as exc:
            reply = {"ok": False, "error": exc.message, "exit_code": exc.exit_code}
        except ValueError as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}", "exit_code": 2}
        except Exception as exc:  # noqa: BLE001 - pragma: no cover - a bug must answer the caller, not kill the agent
            reply = {
                "ok": False,
                "error": f"internal error: {type(exc).__name__}: {first_line(exc)}",
                "exit_code": 1,
            }
        self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    dispatch: Handler


class ControlServer:
    def __init__(self, path: Path, dispatch: Handler) -> None:
        self.path = path
        if len(str(path).encode()) > 100:  # sun_path holds 108 bytes on Linux
            raise BadInputError(
                f"control socket path {path} is too long for a Unix socket; use a shorter [paths] data folder"
            )
        if path.exists() or path.is_symlink():
            path.unlink()  # a stale socket of a killed agent (we hold the lock, so it is ours)
        old = os.umask(0o177)
        try:
            self._server = _UnixServer(str(path), _StreamHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._server.dispatch = dispatch
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edgeship-control",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            self.path.unlink()
        except OSError:
            pass


class ControlClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; raises AgentNotRunning when nobody listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentNotRunning(
                    f"no agent answers on {self.path} ({exc.strerror or exc})"
                ) from None
            except PermissionError as exc:
                raise EdgeshipError(
                    f"cannot use the agent's control socket {self.path} ({exc.strerror or exc}): "
                    "run the command as the agent's user or root (e.g. sudo -u edgeship edgeship-agent ...)"
                ) from None
            except OSError as exc:
                raise EdgeshipError(
                    f"cannot use the agent's control socket {self.path} ({exc.strerror or exc})"
                ) from None
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_LINE)
        except socket.timeout:
            raise EdgeshipError(
                f"the agent on {self.path} did not answer within {self.timeout:g} s"
            ) from None
        finally:
            sock.close()
        if not line:
            raise EdgeshipError(f"the agent on {self.path} closed the connection without an answer")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise EdgeshipError(str(reply.get("error")), exit_code=int(reply.get("exit_code", 1)))
        return dict(reply)
