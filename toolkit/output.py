"""Output at the CLI edge: ``--json`` for scripts, rich tables and progress for people.

Progress and human output go to stderr when ``--json`` is given, so stdout holds
exactly one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, Callable

import click

ProgressCallback = Callable[[str, int, int], None]
"""(description, completed, total): what long work reports as it goes."""


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


PIPE_WIDTH = 10_000
"""Columns a console assumes when its stream is not a terminal: wide enough that no table is
cut (``PROBAT…``) or wrapped for a reader that is a pipe, a file or grep."""


def console(stderr: bool = False) -> Any:
    """A rich Console (stderr when stdout is reserved for JSON).

    On a terminal it fits the window; through a pipe it never truncates or wraps (tables keep
    every column whole, one row per line), whatever $COLUMNS says.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if terminal:
        return Console(stderr=stderr, highlight=False, soft_wrap=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=PIPE_WIDTH)


@contextlib.contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[ProgressCallback]:
    """A rich progress display on stderr, exposed as a plain ProgressCallback.

    Each distinct description gets its own bar. Disabled (a no-op callback) when
    stderr is not a terminal and ``enabled`` is False.
    """
    if not enabled:
        yield lambda description, completed, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=not sys.stderr.isatty(),
    ) as progress:

        def report(description: str, completed: int, total: int) -> None:
            task = tasks.get(description)
            if task is None:
                task = tasks[description] = progress.add_task(description, total=total)
            progress.update(task, completed=completed, total=total)

        yield report
