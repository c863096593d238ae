"""Run one source step (``admit`` or ``fetch``) in a short-lived child interpreter.

Why: verifying an update imports TUF, securesystemslib, cryptography (a 7 MB Rust
extension), urllib3 and tarfile, and a Python process never gives an imported
module back. Done in the serving process, one offline update left the idle agent
about 15 MB bigger for the rest of its life (docs/agent.md, "Memory after an
update"). The child does the work and exits; its imports and its heap go with it.

Only the step's computation moves: the update driver in the parent still enters
and persists every state, maps errors onto events (the child's exception comes
back with the same message and exit code, as a class the driver maps the same
way: ``SecurityError`` still means REJECTED) and owns the state machine. The child writes only where the in-process
step would (the update's work folder). It dies with its parent
(``PR_SET_PDEATHSIG``), so an agent killed mid-step leaves no writer behind when
the restarted agent resumes the step.

Fleet updates too: a ``DirectorSource`` (admit: the director's signature; fetch:
TUF refresh, download, extraction) runs here, its bytes fetched *through the
parent*: the child's TUF client uses a proxy fetcher that asks the parent for each
URL and then for one chunk at a time, and the parent answers from its own
transfer (the MQTT block downloader on the agent's live connection, which keeps
its resumable partial files), so nothing the verification imports enters the
serving process. A fleet link with an HTTPS repository lets the child fetch
itself. ``run_call`` runs one function in a child (the fleet link verifies a
desired state's signature that way before it acts on it).

Protocol: length-prefixed pickles both ways over the child's stdin and its
original stdout. The parent sends ``(op, source record, context fields, plan)``;
the child may then ask ``("fetch", url)`` (answer ``("open",)`` or ``("fail",
message, status)``), ``("next",)`` (``("chunk", bytes)``, ``("end",)`` or
``("fail", ...)``) and ``("close",)`` (no answer: the parent drops the transfer),
and ends with ``("ok", result)`` or ``("error", class module, class name,
message, exit code, is_security, is_runtime_unavailable)``. The child's own prints
and logs go to stderr. Parent and child are the same program on the same machine:
pickle is not read from anyone else.
"""

from __future__ import annotations

__all__ = ["run_call", "run_isolated"]

import os
import pickle
import struct
import subprocess
import sys
from typing import Any

from edgeship.ota.errors import EdgeshipError, SecurityError, first_line


def _context_fields(ctx: Any) -> dict[str, Any]:
    return {
        "config": ctx.config,
        "last_sequence": ctx.last_sequence,
        "now": ctx.now,
        "work_dir": ctx.work_dir,
        "trust_dir": ctx.trust_dir,
    }


def _rebuild_error(payload: tuple[Any, ...]) -> BaseException:
    """The child's exception as the same class when the agent has its module loaded,
    else as the base that keeps the driver's error mapping and exit code
    (RuntimeUnavailableError, SecurityError, EdgeshipError), with the same message."""
    from .runtimes import RuntimeUnavailableError

    _, module, name, message, exit_code, is_security, is_runtime = payload
    # only a class whose module the agent already has: importing e.g. edgeship.ota.director
    # here would pull cryptography into the serving process, which is what the child avoids
    cls: Any = getattr(sys.modules.get(module), name, None) if module else None
    if isinstance(cls, type) and issubclass(cls, EdgeshipError):
        try:
            return cls(message, exit_code=exit_code)
        except TypeError:  # a subclass with another constructor: the base below
            cls = None
    if is_runtime:
        return RuntimeUnavailableError(message, exit_code=exit_code)
    if is_security:
        return SecurityError(message, exit_code=exit_code)
    return EdgeshipError(message, exit_code=exit_code)


_FRAME = struct.Struct(">I")


def _send(stream: Any, message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = stream.read(size - len(data))
        if not part:
            raise EOFError("the other side closed the pipe")
        data += part
    return data


def _recv(stream: Any) -> Any:
    (size,) = _FRAME.unpack(_read_exactly(stream, _FRAME.size))
    return pickle.loads(_read_exactly(stream, size))


class _FetchServer:
    """The parent's side of the proxy fetcher: one open transfer at a time."""

    def __init__(self, fetcher: Any) -> None:
        self.fetcher = fetcher
        self.chunks: Any = None

    def handle(self, message: tuple[Any, ...]) -> tuple[Any, ...] | None:
        kind = message[0]
        if kind == "close":
            self.close()
            return None
        if kind == "fetch":
            self.close()
            try:
                if hasattr(self.fetcher, "chunks"):  # MqttBlockDownloader: no TUF in this process
                    self.chunks = iter(self.fetcher.chunks(str(message[1])))
                elif hasattr(self.fetcher, "fetch"):  # any tuf FetcherInterface (tests, tools)
                    self.chunks = iter(self.fetcher.fetch(str(message[1])))
                else:
                    return ("fail", "this update has no fetcher to download with", None)
            except Exception as exc:  # noqa: BLE001 - goes to the child as a download error
                return self._fail(exc)
            return ("open",)
        if kind == "next":
            if self.chunks is None:
                return ("fail", "no download is open", None)
            try:
                return ("chunk", bytes(next(self.chunks)))
            except StopIteration:
                self.chunks = None
                return ("end",)
            except Exception as exc:  # noqa: BLE001 - goes to the child as a download error
                self.chunks = None
                return self._fail(exc)
        return ("fail", f"unknown request {kind!r}", None)

    @staticmethod
    def _fail(exc: BaseException) -> tuple[Any, ...]:
        status = getattr(exc, "status_code", None)
        return ("fail", str(exc) or type(exc).__name__, status if isinstance(status, int) else None)

    def close(self) -> None:
        chunks, self.chunks = self.chunks, None
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # the downloader's generator: a refused stream starts over next time


def run_isolated(
    op: str, record: dict[str, Any], ctx: Any, *, fetcher: Any = None, plan: dict[str, Any] | None = None
) -> Any:
    """``source.<op>(ctx)`` for the source rebuilt from ``record``, in a child
    interpreter; returns its result or raises its error (see the module doc).
    ``fetcher``: what the child's downloads go through (a ``DirectorSource``'s);
    ``plan``: how the child rebuilds a fleet source (``{"director": True,
    "http": None or (url, work folder, CA file)}``)."""
    return _run_child((op, record, _context_fields(ctx), plan or {}), fetcher)


def run_call(function: str, *args: Any) -> Any:
    """``module:function(*args)`` in a child interpreter (plain data in and out)."""
    return _run_child(("call", {"function": function}, {"args": args}, {}), None)


def _run_child(request: tuple[Any, ...], fetcher: Any) -> Any:
    env = dict(os.environ)
    env.pop("PYTHONINSPECT", None)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeship.agent.isolated"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise EdgeshipError(f"cannot start the verification process: {exc}") from None
    server = _FetchServer(fetcher)
    reply: Any = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        _send(proc.stdin, request)
        while True:
            message = _recv(proc.stdout)
            if isinstance(message, tuple) and message and message[0] in ("fetch", "next", "close"):
                answer = server.handle(message)
                if answer is not None:
                    _send(proc.stdin, answer)
                continue
            reply = message
            break
    except (EOFError, OSError, pickle.UnpicklingError, ValueError, struct.error):
        reply = None  # a child killed mid-step, or a cut-off reply: reported below
    finally:
        server.close()
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not isinstance(reply, tuple) or not reply:
        raise EdgeshipError(
            f"the verification process ended with status {proc.returncode} and no result "
            "(killed, or out of memory?)"
        )
    if reply[0] == "ok":
        return reply[1]
    raise _rebuild_error(reply)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the agent that started it dies."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the step just finishes
        return


class _Channel:
    """The child's side of the pipes to the parent."""

    def __init__(self, incoming: Any, outgoing: Any) -> None:
        self.incoming = incoming
        self.outgoing = outgoing

    def ask(self, message: tuple[Any, ...]) -> Any:
        _send(self.outgoing, message)
        return _recv(self.incoming)

    def tell(self, message: tuple[Any, ...]) -> None:
        _send(self.outgoing, message)


def _proxy_fetcher(channel: _Channel) -> Any:
    """A TUF fetcher whose bytes come from the parent (see the module doc)."""
    from tuf.api import exceptions as tuf_exceptions
    from tuf.ngclient import FetcherInterface

    def failure(reply: tuple[Any, ...]) -> Exception:
        _, message, status = reply
        if status is not None:
            return tuf_exceptions.DownloadHTTPError(str(message), int(status))
        return tuf_exceptions.DownloadError(str(message))

    class ProxyFetcher(FetcherInterface):
        def _fetch(self, url: str) -> Any:
            reply = channel.ask(("fetch", url))
            if reply[0] != "open":
                raise failure(reply)
            return self._chunks()

        @staticmethod
        def _chunks() -> Any:
            done = False
            try:
                while True:
                    reply = channel.ask(("next",))
                    if reply[0] == "chunk":
                        yield reply[1]
                    elif reply[0] == "end":
                        done = True
                        return
                    else:
                        done = True
                        raise failure(reply)
            finally:
                if not done:  # the consumer stopped early (too long, bad hash)
                    channel.tell(("close",))

    return ProxyFetcher()


def _child() -> int:
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the reply
    channel = _Channel(sys.stdin.buffer, out)
    from .runtimes import RuntimeUnavailableError

    op, record, fields, plan = _recv(sys.stdin.buffer)
    try:
        if op == "call":
            import importlib

            module, _, name = str(record["function"]).partition(":")
            result = getattr(importlib.import_module(module), name)(*fields["args"])
        else:
            from .sources import DirectorSource, SourceContext, SourceRegistry

            source: Any
            if plan.get("director"):
                fetcher: Any
                if plan.get("http"):
                    from edgeship.ota.http_fetcher import HttpFetcher

                    url, work_dir, ca_file = plan["http"]
                    fetcher = HttpFetcher(url, work_dir=work_dir, ca_file=ca_file)
                else:
                    fetcher = _proxy_fetcher(channel)
                source = DirectorSource(record["envelope"], fetcher, record)
            else:
                source = SourceRegistry().rebuild(record)
                setattr(source, "isolate", False)  # noqa: B010 - do the work here, not in another child
            result = getattr(source, op)(SourceContext(**fields))
        reply: tuple[Any, ...] = ("ok", result)
    except EdgeshipError as exc:
        reply = (
            "error",
            type(exc).__module__,
            type(exc).__qualname__,
            exc.message,
            exc.exit_code,
            isinstance(exc, SecurityError),
            isinstance(exc, RuntimeUnavailableError),
        )
    except Exception as exc:  # noqa: BLE001 - a bug: FAILED with the reason the in-process step gives
        import traceback

        traceback.print_exc()
        reply = ("error", "", "", f"{type(exc).__name__}: {first_line(exc)}", None, False, False)
    _send(out, reply)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
