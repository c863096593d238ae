"""Which devices' retained ``reported`` state the controller reads again (pure; docs/fleet.md,
"Lost reports").

A device's report can be lost on its way to the controller while the broker still holds it as
the retained message of the device's ``reported`` topic: the broker dropped it from the
controller's queue when that overflowed (Mosquitto's ``max_queued_messages``), or the controller's
own ingest queue was full. The device reports again only when its state changes, so without a
second look the store would say "update in flight" for ever and the device's rollout stage would
wait for its timeout. The controller's second look is a new subscription to that one topic, which
makes the broker send its retained message again; this module decides who gets one.
"""

from __future__ import annotations

__all__ = ["TERMINAL_UPDATE_STATES", "ReportRereadPolicy", "StaleDevice", "forget_rereads", "rereads_due"]

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgeship.ota.errors import BadInputError

TERMINAL_UPDATE_STATES = frozenset({"IDLE", "COMMITTED", "ROLLED_BACK", "FAILED", "REJECTED"})
"""The agent's update states that end an update (its ``TERMINAL_STATES``); any other reported
state means an update is in flight and another report is due."""


@dataclass(frozen=True)
class ReportRereadPolicy:
    """When and how much to re-read. Times in seconds.

    Attributes:
        stale_after_s: a device whose record says an update is in flight and whose last report
            is older than this is a candidate.
        reread_every_s: at most one re-read of one device per this long (a device that really sits
            in PROBATION for an hour costs one retained message per period, no more).
        max_per_pass: at most this many re-reads per pass, so 10,000 stale devices cost the broker
            a trickle (``max_per_pass / check_every_s`` subscriptions a second), never a flood.
        check_every_s: how often a pass runs.
    """

    stale_after_s: float = 120.0
    reread_every_s: float = 600.0
    max_per_pass: int = 100
    check_every_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("stale_after_s", "reread_every_s", "check_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise BadInputError(f"report re-read {name}: a positive number of seconds, got {value!r}")
        if self.max_per_pass < 0:
            raise BadInputError(f"report re-read max_per_pass: 0 (off) or more, got {self.max_per_pass}")


@dataclass(frozen=True)
class StaleDevice:
    """A device the store says has an update in flight: its fleet and when it last reported (None: never)."""

    device: str
    fleet: str
    reported_at: float | None


def rereads_due(candidates: Iterable[StaleDevice], last_reread: Mapping[str, float], now: float,
                policy: ReportRereadPolicy) -> list[StaleDevice]:
    """The devices to re-read in this pass, at most ``policy.max_per_pass``.

    Due: the last report is at least ``stale_after_s`` old (or there was none) and the device was not
    re-read within ``reread_every_s``. Order: never re-read before first, then the longest silent,
    then by id (a stable order, so a pass that is cut short resumes where it stopped)."""
    due = [c for c in candidates
           if (c.reported_at is None or now - c.reported_at >= policy.stale_after_s)
           and now - last_reread.get(c.device, -math.inf) >= policy.reread_every_s]
    due.sort(key=lambda c: (c.device in last_reread, -math.inf if c.reported_at is None else c.reported_at, c.device))
    return due[:policy.max_per_pass]


def forget_rereads(last_reread: Mapping[str, float], now: float, policy: ReportRereadPolicy) -> dict[str, float]:
    """The re-read times still needed (within ``reread_every_s``): the record stays as small as the
    set of devices re-read in one period."""
    return {device: at for device, at in last_reread.items() if now - at < policy.reread_every_s}
