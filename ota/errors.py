"""The error families shared by every part of edgeship.

Each domain error carries the process exit status it maps to; only the CLI
edges (``edgeship`` and ``edgeship-agent``) turn an error into an exit. The
message is one line that names what was wrong, where, and what to do.

Each family also has a ``family`` name: what crosses a process boundary (a child that
verifies an update, a converter stage) is ``(family, message, exit_code)``, and
``error_from_family`` rebuilds the family's class on the other side, so the receiver
maps it the same way (a ``security`` error is still REJECTED) without importing the
module the child raised it from.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILURE",
    "EXIT_BAD_INPUT",
    "EXIT_GATE_FAILED",
    "EXIT_REJECTED",
    "EXIT_MISSING_EXTRA",
    "describe_os_error",
    "EdgeshipError",
    "BadInputError",
    "GateFailedError",
    "SecurityError",
    "MissingExtraError",
    "require_module",
    "first_line",
    "error_from_family",
]

import importlib
from types import ModuleType
from typing import ClassVar

EXIT_FAILURE = 1
"""Something failed that is not the user's input (I/O, a runtime crash)."""
EXIT_BAD_INPUT = 2
"""The input was wrong: a corrupt model, malformed data, a bad option."""
EXIT_GATE_FAILED = 3
"""A quality gate refused the result (accuracy drop, agreement, latency)."""
EXIT_REJECTED = 4
"""Verification refused something: a signature, hash, expiry or rollback check."""
EXIT_MISSING_EXTRA = 5
"""The command needs an optional extra that is not installed."""


class EdgeshipError(Exception):
    """Base of every error edgeship reports to a user.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
    """

    exit_code: int = EXIT_FAILURE
    family: ClassVar[str] = "error"
    """The family's name; a subclass that names a new one registers it (``error_from_family``)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            _FAMILIES.setdefault(cls.family, cls)

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


_FAMILIES: dict[str, type[EdgeshipError]] = {}


class BadInputError(EdgeshipError):
    """The user's input (a file, an option, data) cannot be used."""

    exit_code = EXIT_BAD_INPUT
    family = "bad_input"


class GateFailedError(EdgeshipError):
    """A configured quality gate refused the result."""

    exit_code = EXIT_GATE_FAILED
    family = "gate_failed"


class SecurityError(EdgeshipError):
    """Hostile or untrusted data: bad signature, hash, expiry, rollback, archive."""

    exit_code = EXIT_REJECTED
    family = "security"


class MissingExtraError(EdgeshipError):
    """An optional dependency is missing; the message names the extra to install."""

    exit_code = EXIT_MISSING_EXTRA
    family = "missing_extra"


def error_from_family(family: str, message: str, exit_code: int | None = None) -> EdgeshipError:
    """The error of ``family`` (the base ``EdgeshipError`` for a family not loaded here),
    with ``message`` and ``exit_code`` (None: the family's own)."""
    cls = _FAMILIES.get(family, EdgeshipError)
    return cls(message, exit_code=exit_code)


def require_module(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a MissingExtraError naming ``extra``.

    Heavy dependencies (TensorFlow, ONNX Runtime, SQLAlchemy...) are imported
    lazily through this, so a command whose extra is missing says what to do.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"this needs the Python module '{module}', which is not installed ({exc}); "
            f"install it with: pip install 'edgeship[{extra}]'"
        ) from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its class name if it has none), capped: what a
    third-party error contributes to our one-line messages."""
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:limit]


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device: '/data/x'`` -> ``No space left on device: /data/x``."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}: {where}" if where else what
