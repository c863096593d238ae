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

Protocol: the parent writes a pickle ``(op, source record, context fields)`` to
the child's stdin; the child writes ``("ok", result)`` or ``("error", class
module, class name, message, exit code, is_security, is_runtime_unavailable)``
as a pickle to its original stdout (its own prints and logs go to stderr). Parent
and child are the same program on the same machine: pickle is not read from
anyone else.
"""

from __future__ import annotations

__all__ = ["run_isolated"]

import os
import pickle
import subprocess
import sys
from typing import Any

from edgeship.ota.errors import EdgeshipError, SecurityError


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


def run_isolated(op: str, record: dict[str, Any], ctx: Any) -> Any:
    """``source.<op>(ctx)`` for the source rebuilt from ``record``, in a child
    interpreter; returns its result or raises its error (see the module doc)."""
    request = pickle.dumps((op, record, _context_fields(ctx)))
    env = dict(os.environ)
    env.pop("PYTHONINSPECT", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeship.agent.isolated"],
            input=request,
            stdout=subprocess.PIPE,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise EdgeshipError(f"cannot start the verification process: {exc}") from None
    try:
        reply = pickle.loads(proc.stdout) if proc.stdout else None
    except Exception:  # noqa: BLE001 - a cut-off reply (child killed mid-write) is reported below
        reply = None
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


def _child() -> int:
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the reply
    from .runtimes import RuntimeUnavailableError
    from .sources import SourceContext, SourceRegistry

    op, record, fields = pickle.loads(sys.stdin.buffer.read())
    try:
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
        reply = ("error", "", "", f"{type(exc).__name__}: {exc}", None, False, False)
    out.write(pickle.dumps(reply))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
