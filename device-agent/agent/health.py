"""Probation and self-test decisions: pure functions of numbers, tested table by table.

The updater gathers the numbers (serving statistics of the new model and of the
one it replaced, elapsed time, self-test latencies) and asks these functions
what to do; they do no I/O.
"""

from __future__ import annotations

__all__ = [
    "MIN_SAMPLE",
    "ProbationPolicy",
    "ProbationSample",
    "Verdict",
    "latency_gate",
    "probation_elapsed",
    "probation_verdict",
]

from dataclasses import dataclass
from enum import Enum

MIN_SAMPLE = 20
"""Requests a rate or latency comparison needs before it may end probation early."""


class Verdict(str, Enum):
    WAIT = "WAIT"
    COMMIT = "COMMIT"
    ROLL_BACK = "ROLL_BACK"


@dataclass(frozen=True)
class ProbationPolicy:
    window_s: float
    min_requests: int
    max_error_rate: float
    max_nonfinite_rate: float
    max_latency_ratio: float


@dataclass(frozen=True)
class ProbationSample:
    """What the new model did since it was activated, and the old model's p95."""

    elapsed_s: float  # on the monotonic clock (probation_elapsed)
    requests: int  # answered on valid input: not refused requests, nor NaN-in/NaN-out ones
    errors: int  # the model's runtime failures (not the callers' bad requests)
    nonfinite: int  # NaN/Inf outputs from finite inputs
    p95_ms: float | None
    baseline_p95_ms: float | None  # the replaced model's p95 while it served (None: unknown)
    baseline_requests: int = 0


def probation_elapsed(started: float, now: float) -> float:
    """Seconds of probation so far, from two readings of a monotonic clock.

    Never negative: a clock that went backwards (only a wall clock can) would
    otherwise hold probation in WAIT until it caught up again.
    """
    return max(0.0, now - started)


def probation_verdict(sample: ProbationSample, policy: ProbationPolicy) -> tuple[Verdict, str]:
    """WAIT, COMMIT or ROLL_BACK, with the reason.

    A breach rolls back as soon as MIN_SAMPLE requests show it (or at the end of
    the window with whatever was seen); a healthy model commits once the window
    has passed and at least ``min_requests`` were served.
    """
    window_done = sample.elapsed_s >= policy.window_s and sample.requests >= policy.min_requests
    enough = sample.requests >= MIN_SAMPLE or (window_done and sample.requests > 0)
    if enough:
        error_rate = sample.errors / sample.requests
        if error_rate > policy.max_error_rate:
            return Verdict.ROLL_BACK, (
                f"error rate {error_rate:.1%} over {sample.requests} requests exceeds {policy.max_error_rate:.1%}"
            )
        nonfinite_rate = sample.nonfinite / sample.requests
        if nonfinite_rate > policy.max_nonfinite_rate:
            return Verdict.ROLL_BACK, (
                f"NaN/Inf outputs in {nonfinite_rate:.1%} of {sample.requests} requests "
                f"(allowed {policy.max_nonfinite_rate:.1%})"
            )
        if (
            policy.max_latency_ratio > 0
            and sample.p95_ms is not None
            and sample.baseline_p95_ms
            and sample.baseline_requests >= MIN_SAMPLE
            and sample.requests >= MIN_SAMPLE
        ):
            ratio = sample.p95_ms / sample.baseline_p95_ms
            if ratio > policy.max_latency_ratio:
                return Verdict.ROLL_BACK, (
                    f"p95 latency {sample.p95_ms:.2f} ms is {ratio:.2f}x the previous model's "
                    f"{sample.baseline_p95_ms:.2f} ms (allowed {policy.max_latency_ratio:g}x)"
                )
    if window_done:
        return Verdict.COMMIT, (
            f"healthy for {sample.elapsed_s:.1f} s and {sample.requests} requests "
            f"({sample.errors} errors, {sample.nonfinite} non-finite)"
        )
    return Verdict.WAIT, ""


def latency_gate(new_ms: float, running_ms: float | None, max_ratio: float) -> tuple[bool, str]:
    """The self-test's optional speed gate: refuse a model slower than ``max_ratio`` x
    the running one on this device (0 disables the gate)."""
    if running_ms is None or running_ms <= 0:
        return True, f"new model {new_ms:.3f} ms per invoke (no running model to compare)"
    ratio = new_ms / running_ms
    text = f"new model {new_ms:.3f} ms vs running {running_ms:.3f} ms per invoke ({ratio:.2f}x)"
    if max_ratio > 0 and ratio > max_ratio:
        return False, f"too slow on this device: {text}, allowed {max_ratio:g}x"
    return True, text
