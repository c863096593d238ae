"""Quiet conversion: what TensorFlow, absl, XNNPACK, ONNX Runtime and tf2onnx
print while they work is hidden unless the user asks for it (``--verbose``).

Their chatter comes from C++ (written straight to file descriptors 1 and 2),
from Python ``warnings`` and from ``logging``; ``quiet_output`` silences all
three for the duration of a block and keeps a handle on the real stderr, where
``stage_lines`` writes one progress line per stage. Errors are exceptions, so
nothing a user needs is lost: the CLI edge prints them after the block.
"""

from __future__ import annotations

__all__ = ["QUIET_ENV", "is_verbose", "quiet_active", "quiet_output", "stage_lines", "user_stderr"]

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import TextIO

from .progress import ProgressCallback

QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ INFO/WARNING/ERROR lines
    "GLOG_minloglevel": "3",
    "ABSL_MIN_LOG_LEVEL": "3",
    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1"),
}
"""Environment a quiet child conversion runs with."""

_CHATTY_LOGGERS = ("tensorflow", "absl", "tf2onnx", "onnxruntime", "root", "h5py", "keras", "skl2onnx")
_active: list[TextIO] = []
_verbose: list[bool] = []


def is_verbose() -> bool:
    """Whether the user asked to see the converters' own output (``--verbose``,
    or EDGESHIP_VERBOSE=1 in the environment)."""
    return bool(_verbose) or os.environ.get("EDGESHIP_VERBOSE", "") not in ("", "0")


def quiet_active() -> bool:
    return bool(_active)


def user_stderr() -> TextIO:
    """The user's stderr, also inside ``quiet_output`` (where fd 2 goes nowhere)."""
    return _active[-1] if _active else sys.stderr


@contextlib.contextmanager
def quiet_output(enabled: bool = True) -> Iterator[None]:
    """Silence native and Python chatter on stdout and stderr inside the block.

    Nested blocks are no-ops; ``enabled=False`` (``--verbose``) changes nothing.
    """
    if not enabled:
        _verbose.append(True)  # child converters inherit the choice
        try:
            yield
        finally:
            _verbose.pop()
        return
    if _active or is_verbose():
        yield
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {}
    try:
        for fd in (1, 2):
            saved[fd] = os.dup(fd)
    except OSError:  # pragma: no cover - no standard streams at all
        for fd in saved.values():
            os.close(fd)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    original = io.TextIOWrapper(os.fdopen(os.dup(saved[2]), "wb", buffering=0), write_through=True)
    levels = {name: logging.getLogger(None if name == "root" else name).level for name in _CHATTY_LOGGERS}
    python_out, python_err = sys.stdout, sys.stderr
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        # Python-level stderr (progress bars, click) still reaches the user; the
        # libraries' prints to stdout and everything native goes nowhere
        sys.stdout = open(os.devnull, "w")  # closed below
        sys.stderr = original
        for name in _CHATTY_LOGGERS:
            logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
        _active.append(original)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _active.pop()
        try:
            sys.stdout.close()
        except OSError:  # pragma: no cover - closing os.devnull
            pass
        sys.stdout, sys.stderr = python_out, python_err
        for name, level in levels.items():
            logging.getLogger(None if name == "root" else name).setLevel(level)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        original.close()


def stage_lines(stream: TextIO | None = None, prefix: str = "edgeship") -> ProgressCallback:
    """A ProgressCallback that prints one line as each stage finishes, with the
    time it took (for logs; terminals also get bars). A stage that fails prints
    nothing: the error line is the whole story."""
    started: dict[str, float] = {}
    done: set[str] = set()

    def report(description: str, completed: int, total: int) -> None:
        now = time.perf_counter()
        started.setdefault(description, now)
        if completed < total or description in done:
            return
        done.add(description)
        out = stream or user_stderr()
        try:
            out.write(f"{prefix}: {description} done ({now - started[description]:.1f} s)\n")
            out.flush()
        except (OSError, ValueError):  # a closed stream must not stop the conversion
            pass

    return report
