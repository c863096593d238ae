"""Waiting for something to become true in a test, with a deadline and a message that says
what never happened (one helper for every part's fixtures)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

__all__ = ["time_scale", "wait_for"]


def time_scale() -> float:
    """How much longer than on this machine's own CPU the agent may take: 1 normally; the
    ARM stage (an emulated CPU, several times slower) sets EDGESHIP_TEST_TIME_SCALE."""
    return max(1.0, float(os.environ.get("EDGESHIP_TEST_TIME_SCALE", "1") or 1))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout`` s (times ``time_scale()``)."""
    timeout *= time_scale()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
