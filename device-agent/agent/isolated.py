"""Run an update source's ``admit`` or ``fetch`` in a short-lived child interpreter.

Why: verifying an update imports TUF, securesystemslib, cryptography (a 7 MB Rust
extension), urllib3 and tarfile, and a Python process never gives an imported
module back. Done in the serving process, one offline update left the idle agent
about 15 MB bigger for the rest of its life (docs/agent.md, "Memory after an
update"). The child does the work and exits; its imports and its heap go with it.

``IsolatedSource(inner)`` wraps any source: the same interface, its two steps run in
the child, which rebuilds ``inner`` from its record and runs the plain class there
(sources.py knows nothing of this module). Only the step's computation moves: the
update driver in the parent still enters and persists every state, maps errors onto
events and owns the state machine. The child writes only where the in-process step
would (the update's work folder). It dies with its parent (``PR_SET_PDEATHSIG``), so
an agent killed mid-step leaves no writer behind when the restarted agent resumes.

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
and ends with ``("ok", result)`` or ``("error", family, message, exit code)``: an
error crosses as its family (``EdgeshipError.family``), rebuilt in the parent as that
family's class, so ``security`` still means REJECTED. The child's own prints and logs
go to stderr. Parent and child are the same program on the same machine: pickle is
not read from anyone else.
"""

from __future__ import annotations

__all__ = [
    "VERIFY_IN_PROCESS_ENV",
    "IsolatedSource",
    "error_payload",
    "isolate_verification",
    "rebuild_error",
    "run_call",
    "verify_in_child",
]

import os
import pickle
import struct
import subprocess
import sys
from typing import Any

from edgeship.ota.errors import EdgeshipError, error_from_family, first_line

from .runtimes import RuntimeUnavailableError  # registers its error family for rebuild_error
from .sources import (
    Admission,
    BundleSource,
    DirectorSource,
    HttpFetchPlan,
    OfflinePackageSource,
    SourceContext,
    StagedBundle,
)

VERIFY_IN_PROCESS_ENV = "EDGESHIP_AGENT_VERIFY_IN_PROCESS"
"""Set to ``1``: updates are verified in the agent's own process (diagnostics, the
benchmark's comparison; costs ~15 MB of idle RSS for good)."""

_REBUILT_FAMILIES = (RuntimeUnavailableError,)
"""Families defined in the agent (the others come with edgeship.ota.errors): imported
here so that a child's ``runtime_unavailable`` is rebuilt as itself."""


def verify_in_child() -> bool:
    """Whether update verification runs in a short-lived child (the default), or in
    the agent's own process (``EDGESHIP_AGENT_VERIFY_IN_PROCESS=1``)."""
    return os.environ.get(VERIFY_IN_PROCESS_ENV) != "1"


def isolate_verification(source: BundleSource) -> BundleSource:
    """``source`` wrapped so that its verification runs in a child, where it verifies
    anything (a package or a director document) and unless ``EDGESHIP_AGENT_VERIFY_IN_PROCESS=1``;
    a kept slot is only re-hashed: it stays in process."""
    if isinstance(source, (OfflinePackageSource, DirectorSource)) and verify_in_child():
        return IsolatedSource(source)
    return source


class IsolatedSource(BundleSource):
    """``inner``'s admit and fetch, each in a short-lived child (see the module doc)."""

    def __init__(self, inner: BundleSource) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]

    def to_record(self) -> dict[str, Any]:
        return self.inner.to_record()

    def describe(self) -> str:
        return self.inner.describe()

    def precheck(self, ctx: SourceContext) -> None:
        self.inner.precheck(ctx)

    def cleanup(self, ctx: SourceContext) -> None:
        self.inner.cleanup(ctx)

    def _run(self, op: str, ctx: SourceContext) -> Any:
        self.inner.precheck(ctx)  # here: no child is started for a package that cannot fit
        plan: dict[str, Any] = {}
        fetcher = None
        if isinstance(self.inner, DirectorSource):
            fetcher = self.inner.fetcher
            plan = {"director": True, "http": None}
            if isinstance(fetcher, HttpFetchPlan):
                plan["http"] = (fetcher.url, fetcher.work_dir, fetcher.ca_file)
        return _run_child((op, self.to_record(), _context_fields(ctx), plan), fetcher)

    def admit(self, ctx: SourceContext) -> Admission:
        result: Admission = self._run("admit", ctx)
        return result

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        staged: StagedBundle = self._run("fetch", ctx)
        return staged


def _context_fields(ctx: SourceContext) -> dict[str, Any]:
    return {
        "config": ctx.config,
        "last_sequence": ctx.last_sequence,
        "now": ctx.now,
        "work_dir": ctx.work_dir,
        "trust_dir": ctx.trust_dir,
        "base_bundle": ctx.base_bundle,
        "base_version": ctx.base_version,
    }


def error_payload(exc: BaseException) -> tuple[Any, ...]:
    """The child's reply for ``exc``: its family, message and exit code (a bug that is
    no EdgeshipError: the base family, with the reason the in-process step would give)."""
    if isinstance(exc, EdgeshipError):
        return ("error", exc.family, exc.message, exc.exit_code)
    return ("error", EdgeshipError.family, f"{type(exc).__name__}: {first_line(exc)}", None)


def rebuild_error(payload: tuple[Any, ...]) -> EdgeshipError:
    """The child's error in the parent: its family's class, message and exit code."""
    _, family, message, exit_code = payload
    return error_from_family(str(family), str(message), exit_code)


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
    raise rebuild_error(reply)


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
    op, record, fields, plan = _recv(sys.stdin.buffer)
    try:
        if op == "call":
            import importlib

            module, _, name = str(record["function"]).partition(":")
            result = getattr(importlib.import_module(module), name)(*fields["args"])
        else:
            from .sources import SourceRegistry

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
                source = SourceRegistry().rebuild(record)  # the plain source: the work happens here
            result = getattr(source, op)(SourceContext(**fields))
        reply: tuple[Any, ...] = ("ok", result)
    except Exception as exc:  # noqa: BLE001 - every error goes back to the parent by its family
        if not isinstance(exc, EdgeshipError):
            import traceback

            traceback.print_exc()
        reply = error_payload(exc)
    _send(out, reply)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
