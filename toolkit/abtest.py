"""A/B tests between two bundle versions: arm assignment, per-arm statistics and a verdict.

Pure: telemetry windows in, a report out (see docs/fleet.md, "A/B statistics").

- Assignment: a device's arm is a hash of the test id and the device id, so it
  is stable across restarts and replicas, needs no stored table, and a device
  that joins the fleet later falls into an arm at once.
- Metrics: ``latency_p95`` is continuous (one sample = the p95 of one device's
  telemetry window, from its fixed-bucket histogram), compared with Welch's
  t-test; ``error_rate`` (errors per request) and ``accuracy`` (correct per
  labelled answer, from the agents' feedback counts) are proportions, compared
  with a two-proportion z-test.
- The verdict names the better arm when p < alpha; otherwise it estimates, from
  the observed effect and a power calculation, how many more samples per arm a
  test of the chosen power would need.
"""

from __future__ import annotations

__all__ = [
    "ABReport",
    "ABTest",
    "Arm",
    "ArmStats",
    "Metric",
    "TelemetryWindow",
    "TestResult",
    "arm_stats",
    "assign_arm",
    "format_p",
    "plan_assignments",
    "report",
    "samples_needed_continuous",
    "samples_needed_proportions",
    "two_proportion_test",
    "welch_test",
]

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.rollouts import AssignVersion


class Metric(str, Enum):
    LATENCY_P95 = "latency_p95"
    ERROR_RATE = "error_rate"
    ACCURACY = "accuracy"

    @property
    def continuous(self) -> bool:
        return self is Metric.LATENCY_P95

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.ACCURACY


@dataclass(frozen=True)
class Arm:
    name: str
    version: str

    @classmethod
    def parse(cls, text: str) -> Arm:
        """``NAME:VERSION``."""
        name, sep, version = str(text).partition(":")
        if not sep or not name or not version:
            raise BadInputError(f"arm {text!r}: use NAME:VERSION (e.g. digits:1.2.0)")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ABTest:
    """An A/B test. ``split_pct`` is the share of devices in arm B (the rest run A)."""

    id: str
    fleet: str
    a: Arm
    b: Arm
    metric: Metric
    split_pct: float = 50.0
    min_samples: int = 30
    alpha: float = 0.05
    power: float = 0.8
    created_at: float = 0.0
    selection: tuple[tuple[str, str], ...] = ()
    state: str = "RUNNING"

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric(self.metric))
        if not 0.0 < self.split_pct < 100.0:
            raise BadInputError(f"--split {self.split_pct:g}: the share of arm B must be within (0, 100)")
        if self.min_samples < 2:
            raise BadInputError(f"--min-samples {self.min_samples}: at least 2 per arm")
        if not 0.0 < self.alpha < 0.5:
            raise BadInputError(f"alpha {self.alpha} must be within (0, 0.5)")
        if not 0.0 < self.power < 1.0:
            raise BadInputError(f"power {self.power} must be within (0, 1)")
        if (self.a.name, self.a.version) == (self.b.name, self.b.version):
            raise BadInputError(f"both arms are {self.a}; an A/B test needs two different versions")

    def arm(self, label: str) -> Arm:
        return self.a if label == "A" else self.b


@dataclass(frozen=True)
class TelemetryWindow:
    """One device's telemetry message, as the store keeps it."""

    device: str
    name: str | None
    version: str | None
    requests: int
    errors: int
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    feedback_correct: int = 0
    feedback_total: int = 0


def assign_arm(test_id: str, device: str, split_pct: float) -> str:
    """``"A"`` or ``"B"``: the first 64 bits of sha256(test id ":" device id) as a fraction, below split -> B."""
    digest = hashlib.sha256(f"{test_id}:{device}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    return "B" if fraction * 100.0 < split_pct else "A"


def plan_assignments(test: ABTest, devices: Iterable[Any],
                     desired: Mapping[str, tuple[str, str]] | None = None) -> list[AssignVersion]:
    """The desired states the controller must still write for a running test.

    Args:
        devices: objects with ``device``, ``active_name``, ``active_version``
            (rollouts.DeviceSnapshot, or the store's device rows).
        desired: each device's current desired (name, version); devices whose
            desired state or active model already is their arm's are left alone.
    """
    desired = desired or {}
    actions: list[AssignVersion] = []
    for device in sorted(devices, key=lambda d: d.device):
        label = assign_arm(test.id, device.device, test.split_pct)
        arm = test.arm(label)
        target = (arm.name, arm.version)
        if desired.get(device.device) == target or (device.active_name, device.active_version) == target:
            continue
        actions.append(AssignVersion(device.device, arm.name, arm.version, f"A/B test {test.id}: arm {label}"))
    return actions


# -- statistics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArmStats:
    """One arm: ``n`` samples (windows, requests or labelled answers), the mean and its CI."""

    label: str
    arm: str
    devices: int
    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    std: float | None = None
    successes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TestResult:
    """B minus A: the difference, its CI, the test statistic, p-value and a standardized effect size."""

    test: str
    difference: float
    ci_low: float
    ci_high: float
    statistic: float
    p_value: float
    effect_size: float
    effect_size_name: str
    df: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scipy_stats() -> Any:
    from edgeship.ota.errors import require_module

    return require_module("scipy.stats", "host")


def welch_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> TestResult:
    """Welch's unequal-variance t-test of mean(b) - mean(a), two-sided, with a Welch-Satterthwaite CI."""
    stats = _scipy_stats()
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        raise BadInputError(f"Welch's t-test needs at least 2 samples per arm (A has {n_a}, B has {n_b})")
    mean_a, mean_b = math.fsum(a) / n_a, math.fsum(b) / n_b
    var_a = math.fsum((x - mean_a) ** 2 for x in a) / (n_a - 1)
    var_b = math.fsum((x - mean_b) ** 2 for x in b) / (n_b - 1)
    diff = mean_b - mean_a
    se2 = var_a / n_a + var_b / n_b
    pooled_sd = math.sqrt((var_a + var_b) / 2.0)
    if se2 == 0.0:
        # Both arms constant: the difference is exact.
        p = 1.0 if diff == 0.0 else 0.0
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        return TestResult("welch_t", diff, diff, diff, t, p, 0.0 if diff == 0 else math.copysign(math.inf, diff),
                          "cohen_d", float(n_a + n_b - 2))
    se = math.sqrt(se2)
    df = se2 ** 2 / ((var_a / n_a) ** 2 / (n_a - 1) + (var_b / n_b) ** 2 / (n_b - 1))
    t = diff / se
    p = float(2.0 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    effect = diff / pooled_sd if pooled_sd > 0 else 0.0
    return TestResult("welch_t", diff, diff - half, diff + half, t, min(p, 1.0), effect, "cohen_d", df)


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float = 0.05) -> TestResult:
    """Two-sided z-test of p_b - p_a with the pooled standard error; the CI uses the unpooled one."""
    stats = _scipy_stats()
    if n_a < 1 or n_b < 1:
        raise BadInputError(f"a two-proportion test needs samples in both arms (A has {n_a}, B has {n_b})")
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b):
        raise BadInputError("successes must be within 0..n in each arm")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    diff = p_b - p_a
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
    if se_pooled == 0.0:
        z, p = 0.0, 1.0  # both arms all-success or all-failure: nothing tells them apart
    else:
        z = diff / se_pooled
        p = float(2.0 * stats.norm.sf(abs(z)))
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = float(stats.norm.ppf(1.0 - alpha / 2.0)) * se
    h = 2.0 * math.asin(math.sqrt(p_b)) - 2.0 * math.asin(math.sqrt(p_a))
    return TestResult("two_proportion_z", diff, diff - half, diff + half, z, min(p, 1.0), h, "cohen_h")


def samples_needed_continuous(sd_a: float, sd_b: float, difference: float, alpha: float = 0.05,
                              power: float = 0.8) -> int | None:
    """Samples per arm for a two-sided test to detect ``difference`` (normal approximation); None if 0."""
    if difference == 0.0 or not math.isfinite(difference):
        return None
    stats = _scipy_stats()
    z = float(stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power))
    return max(2, math.ceil(z * z * (sd_a ** 2 + sd_b ** 2) / difference ** 2))


def samples_needed_proportions(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Samples per arm to detect p_a vs p_b with a two-sided two-proportion test (Fleiss, no correction)."""
    if p_a == p_b:
        return None
    stats = _scipy_stats()
    z_a, z_b = float(stats.norm.ppf(1.0 - alpha / 2.0)), float(stats.norm.ppf(power))
    mean = (p_a + p_b) / 2.0
    numerator = z_a * math.sqrt(2.0 * mean * (1 - mean)) + z_b * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    return max(2, math.ceil(numerator ** 2 / (p_a - p_b) ** 2))


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _wilson(successes: int, n: int, alpha: float) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    z = float(_scipy_stats().norm.ppf(1.0 - alpha / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _arm_windows(test: ABTest, label: str, windows: Iterable[TelemetryWindow]) -> list[TelemetryWindow]:
    """Windows that belong to an arm: from a device of that arm, served by that arm's version."""
    arm = test.arm(label)
    return [w for w in windows if assign_arm(test.id, w.device, test.split_pct) == label
            and (w.name, w.version) == (arm.name, arm.version)]


def arm_stats(test: ABTest, label: str, windows: Iterable[TelemetryWindow]) -> tuple[ArmStats, list[float], int]:
    """(stats, continuous samples, successes) of one arm for the test's metric."""
    mine = _arm_windows(test, label, windows)
    devices = len({w.device for w in mine})
    arm = str(test.arm(label))
    if test.metric is Metric.LATENCY_P95:
        samples = [q for q in (w.latency.quantile_ms(0.95) for w in mine) if q is not None]
        n = len(samples)
        if n == 0:
            return ArmStats(label, arm, devices, 0, None, None, None), samples, 0
        mean = math.fsum(samples) / n
        if n < 2:
            return ArmStats(label, arm, devices, n, mean, None, None), samples, 0
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in samples) / (n - 1))
        half = float(_scipy_stats().t.ppf(1.0 - test.alpha / 2.0, n - 1)) * std / math.sqrt(n)
        return ArmStats(label, arm, devices, n, mean, mean - half, mean + half, std), samples, 0
    if test.metric is Metric.ERROR_RATE:
        successes, n = sum(w.errors for w in mine), sum(w.requests for w in mine)
    else:
        successes, n = sum(w.feedback_correct for w in mine), sum(w.feedback_total for w in mine)
    low, high = _wilson(successes, n, test.alpha)
    return ArmStats(label, arm, devices, n, successes / n if n else None, low, high, successes=successes), [], successes


@dataclass(frozen=True)
class ABReport:
    test_id: str
    metric: str
    a: ArmStats
    b: ArmStats
    result: TestResult | None
    significant: bool
    winner: str | None
    samples_needed_per_arm: int | None
    more_samples_needed: int | None
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {"test_id": self.test_id, "metric": self.metric, "arms": {"A": self.a.to_dict(), "B": self.b.to_dict()},
                "result": self.result.to_dict() if self.result else None, "significant": self.significant,
                "winner": self.winner, "samples_needed_per_arm": self.samples_needed_per_arm,
                "more_samples_needed": self.more_samples_needed, "verdict": self.verdict}


_BETTER = {Metric.LATENCY_P95: "faster", Metric.ERROR_RATE: "less error-prone", Metric.ACCURACY: "more accurate"}
_UNIT = {Metric.LATENCY_P95: "telemetry windows", Metric.ERROR_RATE: "requests", Metric.ACCURACY: "labelled answers"}


def report(test: ABTest, windows: Iterable[TelemetryWindow]) -> ABReport:
    """Per-arm statistics, the test, and the verdict in words."""
    windows = list(windows)
    stats_a, samples_a, succ_a = arm_stats(test, "A", windows)
    stats_b, samples_b, succ_b = arm_stats(test, "B", windows)
    metric, unit = test.metric, _UNIT[test.metric]
    result: TestResult | None = None
    needed: int | None = None
    if metric.continuous:
        if stats_a.n >= 2 and stats_b.n >= 2:
            result = welch_test(samples_a, samples_b, test.alpha)
            needed = samples_needed_continuous(stats_a.std or 0.0, stats_b.std or 0.0, result.difference,
                                               test.alpha, test.power)
    elif stats_a.n >= 1 and stats_b.n >= 1:
        result = two_proportion_test(succ_a, stats_a.n, succ_b, stats_b.n, test.alpha)
        needed = samples_needed_proportions(succ_a / stats_a.n, succ_b / stats_b.n, test.alpha, test.power)
    have = min(stats_a.n, stats_b.n)
    enough = have >= test.min_samples
    significant = bool(result is not None and enough and result.p_value < test.alpha)
    winner: str | None = None
    more: int | None = None
    if significant:
        assert result is not None
        b_higher = result.difference > 0
        winner = "B" if b_higher == metric.higher_is_better else "A"
        verdict = f"{winner} is {_BETTER[metric]}, {format_p(result.p_value)}"
    else:
        target = max(test.min_samples, needed or 0)
        more = max(0, target - have) if (needed is not None or not enough) else None
        p_text = f" ({format_p(result.p_value)})" if result is not None else ""
        if not enough:
            verdict = (f"not enough data yet{p_text}: {stats_a.n} and {stats_b.n} {unit} in A and B, "
                       f"at least {test.min_samples} each needed")
            if needed is not None and needed > test.min_samples:
                verdict += f"; about {more:,} more per arm would detect the difference seen so far"
        elif needed is None:
            verdict = f"no significant difference{p_text}: the arms look the same so far"
        elif more:
            verdict = f"no significant difference yet{p_text}; about {more:,} more {unit} per arm needed"
        else:
            verdict = (f"no significant difference{p_text}; there are enough {unit} to see a difference of the "
                       f"size observed, so it is likely noise")
    return ABReport(test.id, metric.value, stats_a, stats_b, result, significant, winner, needed, more, verdict)
