"""Fault injection for tests: stop or kill the agent on entering an update state.

A crash test needs the agent to die at a known point of an update (a power cut, a model
that takes the process down). The command line builds ``FaultHooks`` from
``EDGESHIP_AGENT_TEST_PAUSE_IN`` / ``EDGESHIP_AGENT_TEST_KILL_IN`` (comma-separated
state names) only when one is set, and hands them to the daemon; the update driver only
calls ``on_enter`` and never reads the environment. Off by default: with no hooks the
driver calls nothing.

- pause: right after the driver persisted its entry into the state, write
  ``<data>/test-paused-in-STATE`` (holding the pid) and sleep for good, so a test can
  SIGKILL the process there;
- kill: the process SIGKILLs itself there.
- ``inject`` (in-process tests only): a function called before each state's step; what
  it raises is that step's failure.
"""

from __future__ import annotations

__all__ = ["FaultHooks"]

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .state_machine import State

log = logging.getLogger("edgeship.agent.faults")


@dataclass
class FaultHooks:
    """Where to pause or SIGKILL the process, and an in-process failure injector."""

    pause_in: frozenset[str] = frozenset()
    kill_in: frozenset[str] = frozenset()
    marker_dir: Path | None = None
    inject: Callable[[State], None] | None = None

    def on_enter(self, state: State) -> None:
        """Called once the entry into ``state`` is on disk."""
        if state.value in self.kill_in:
            log.warning("test hook: SIGKILL on entering %s", state.value)
            os.kill(os.getpid(), signal.SIGKILL)
        if state.value in self.pause_in:
            if self.marker_dir is not None:
                (self.marker_dir / f"test-paused-in-{state.value}").write_text(str(os.getpid()))
            log.warning("test hook: paused on entering %s", state.value)
            while True:
                time.sleep(3600)

    def before_step(self, state: State) -> None:
        """Raise the injected failure for ``state``, if any."""
        if self.inject is not None:
            self.inject(state)
