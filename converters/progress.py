"""The progress callback long conversion work reports through.

Same shape as ``edgeship.toolkit.output.ProgressCallback`` (the CLI passes its
rich progress bars in); defined here so the converters do not import the toolkit.
"""

from __future__ import annotations

__all__ = ["ProgressCallback", "no_progress"]

from typing import Callable

ProgressCallback = Callable[[str, int, int], None]
"""(description, completed, total)."""


def no_progress(description: str, completed: int, total: int) -> None:
    """A ProgressCallback that shows nothing."""
