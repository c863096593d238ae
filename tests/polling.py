"""Waiting for something to become true in a test, with a deadline and a message that says
what never happened (one helper for every part's fixtures)."""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["wait_for"]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
