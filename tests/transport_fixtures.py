"""Helpers for the transport and block-transfer tests: collecting handlers,
waiting on conditions, and small child processes that speak MQTT."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List

from edgeship.ota.transport import ReceivedMessage

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class Collector:
    """A message handler that keeps what it received (thread-safe)."""

    def __init__(self) -> None:
        self.messages: List[ReceivedMessage] = []
        self._lock = threading.Lock()

    def __call__(self, message: ReceivedMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def payloads(self) -> List[bytes]:
        with self._lock:
            return [m.payload for m in self.messages]

    def wait_for(self, predicate: Callable[[List[ReceivedMessage]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(list(self.messages)):
                    return True
            time.sleep(0.02)
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def python_child(code: str, *args: str) -> "subprocess.Popen[str]":
    """Run ``code`` in a fresh interpreter (the venv's), stdout piped, line-buffered text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [PYTHON, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=str(REPO),
    )


def read_line_with(process: "subprocess.Popen[str]", marker: str, timeout: float = 20.0) -> str:
    """Read the child's stdout until a line containing ``marker`` (or fail with its stderr)."""
    assert process.stdout is not None
    result: List[str] = []

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if marker in line:
                result.append(line)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        process.kill()
        _, err = process.communicate(timeout=5)
        raise AssertionError(f"child never printed {marker!r}; stderr:\n{err[-3000:]}")
    return result[0]
