"""A/B statistics: assignment, the tests against scipy and by hand, power, verdicts, and the
false-positive rate under no difference (a simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram
from edgeship.toolkit.abtest import (
    ABTest,
    Arm,
    Metric,
    TelemetryWindow,
    assign_arm,
    format_p,
    plan_assignments,
    report,
    samples_needed_continuous,
    samples_needed_proportions,
    two_proportion_test,
    welch_test,
)
from edgeship.toolkit.rollouts import DeviceSnapshot

A, B = Arm("digits", "1.0"), Arm("digits", "2.0")


def ab(metric: str = "latency_p95", **kw: object) -> ABTest:
    return ABTest(id="ab-1", fleet="f", a=A, b=B, metric=Metric(metric), **kw)  # type: ignore[arg-type]


def histogram_of(latencies: np.ndarray) -> LatencyHistogram:
    """Exactly what LatencyHistogram.observe would build, vectorised."""
    index = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS), latencies, side="left")
    counts = np.bincount(index, minlength=len(LATENCY_BUCKETS_MS) + 1)
    return LatencyHistogram([int(c) for c in counts], float(latencies.sum()))


# -- assignment ----------------------------------------------------------------------------------

def test_assignment_is_deterministic_and_follows_the_split() -> None:
    devices = [f"dev-{i}" for i in range(4000)]
    arms = [assign_arm("ab-1", d, 20.0) for d in devices]
    assert arms == [assign_arm("ab-1", d, 20.0) for d in devices]
    share_b = arms.count("B") / len(arms)
    assert abs(share_b - 0.20) < 0.03
    # Raising the split only moves devices from A to B, never the other way.
    wider = [assign_arm("ab-1", d, 50.0) for d in devices]
    assert all(w == "B" for a, w in zip(arms, wider) if a == "B")
    # Another test shuffles the devices differently.
    other = [assign_arm("ab-2", d, 20.0) for d in devices]
    assert other != arms


def test_plan_assignments_skips_devices_already_there() -> None:
    test = ab(split_pct=50)
    devices = [DeviceSnapshot(f"d{i}", True, "digits", "1.0") for i in range(40)]
    actions = plan_assignments(test, devices)
    assert {a.version for a in actions} == {"2.0"}  # arm A devices already run 1.0
    assert len(actions) == sum(assign_arm("ab-1", d.device, 50) == "B" for d in devices)
    desired = {a.device: (a.name, a.version) for a in actions}
    assert plan_assignments(test, devices, desired) == []


@pytest.mark.parametrize("kwargs", [dict(split_pct=0), dict(split_pct=100), dict(min_samples=1), dict(alpha=0.7),
                                    dict(power=1.0)])
def test_abtest_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(BadInputError):
        ab(**kwargs)


def test_arm_parse() -> None:
    assert Arm.parse("digits:1.2.0") == Arm("digits", "1.2.0")
    for bad in ["digits", ":1.0", "digits:"]:
        with pytest.raises(BadInputError):
            Arm.parse(bad)
    with pytest.raises(BadInputError):
        ABTest(id="x", fleet="f", a=A, b=A, metric=Metric.ERROR_RATE)


# -- the tests against scipy and by hand ---------------------------------------------------------

KNOWN_A = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
KNOWN_B = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_matches_scipy_and_the_formula() -> None:
    result = welch_test(KNOWN_A, KNOWN_B)
    reference = stats.ttest_ind(KNOWN_B, KNOWN_A, equal_var=False)
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    va, vb = np.var(KNOWN_A, ddof=1), np.var(KNOWN_B, ddof=1)
    df = (va / 15 + vb / 15) ** 2 / ((va / 15) ** 2 / 14 + (vb / 15) ** 2 / 14)
    assert result.df == pytest.approx(df)
    ci = reference.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert result.effect_size == pytest.approx((np.mean(KNOWN_B) - np.mean(KNOWN_A)) / math.sqrt((va + vb) / 2))
    assert 0.01 < result.p_value < 0.05  # the well-known example is significant at 5%, not at 1%


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_scipy_on_random_unequal_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(10, 1, 12).tolist(), rng.normal(10.5, 3, 40).tolist()
    reference = stats.ttest_ind(b, a, equal_var=False)
    result = welch_test(a, b)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)


@pytest.mark.parametrize("sa, na, sb, nb", [(45, 500, 70, 500), (3, 40, 9, 50), (900, 1000, 880, 1000),
                                            (0, 100, 5, 100)])
def test_two_proportion_matches_chi_square_and_the_formula(sa: int, na: int, sb: int, nb: int) -> None:
    result = two_proportion_test(sa, na, sb, nb)
    table = [[sa, na - sa], [sb, nb - sb]]
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert result.statistic ** 2 == pytest.approx(chi2, rel=1e-9)
    pa, pb = sa / na, sb / nb
    half = 1.959963984540054 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    assert (result.ci_low, result.ci_high) == (pytest.approx(pb - pa - half), pytest.approx(pb - pa + half))
    assert result.effect_size == pytest.approx(2 * math.asin(math.sqrt(pb)) - 2 * math.asin(math.sqrt(pa)))


def test_degenerate_inputs() -> None:
    same = welch_test([5.0, 5.0, 5.0], [5.0, 5.0])
    assert same.p_value == 1.0
    apart = welch_test([5.0, 5.0], [6.0, 6.0])
    assert apart.p_value == 0.0 and apart.difference == 1.0
    assert two_proportion_test(0, 10, 0, 20).p_value == 1.0
    with pytest.raises(BadInputError):
        welch_test([1.0], [1.0, 2.0])
    with pytest.raises(BadInputError):
        two_proportion_test(5, 4, 1, 4)


def test_power_calculations_against_textbook_and_simulation() -> None:
    # Two-sample, d = 0.5, alpha 0.05, power 0.8: the normal approximation gives 63 per arm
    # (the exact t-based answer is 64).
    assert samples_needed_continuous(1.0, 1.0, 0.5) == 63
    # Fleiss without continuity correction, 0.10 vs 0.15: 686 per arm (the usual table value).
    assert samples_needed_proportions(0.10, 0.15) == 686
    assert samples_needed_continuous(1, 1, 0.0) is None and samples_needed_proportions(0.2, 0.2) is None
    # The promised power, checked by simulation: ~80% of tests of that size detect the difference.
    rng = np.random.default_rng(7)
    n = samples_needed_proportions(0.10, 0.15)
    assert n is not None
    hits = sum(two_proportion_test(int(rng.binomial(n, 0.10)), n, int(rng.binomial(n, 0.15)), n).p_value < 0.05
               for _ in range(1000))
    assert 0.75 < hits / 1000 < 0.85


def test_format_p() -> None:
    assert format_p(0.0031) == "p = 0.003"
    assert format_p(0.0004) == "p < 0.001"
    assert format_p(0.5) == "p = 0.500"


# -- reports and verdicts ------------------------------------------------------------------------

def _latency_windows(test: ABTest, rng: np.random.Generator, devices: int, windows: int, scale_a: float,
                     scale_b: float, per_window: int = 200) -> list[TelemetryWindow]:
    out = []
    for i in range(devices):
        device = f"dev-{i:03d}"
        label = assign_arm(test.id, device, test.split_pct)
        arm = test.arm(label)
        scale = scale_b if label == "B" else scale_a
        for _ in range(windows):
            latencies = rng.lognormal(math.log(scale), 0.4, per_window)
            out.append(TelemetryWindow(device, arm.name, arm.version, per_window, 0, histogram_of(latencies)))
    return out


def test_report_says_b_is_faster_when_it_is() -> None:
    test = ab(min_samples=20)
    windows = _latency_windows(test, np.random.default_rng(1), devices=20, windows=5, scale_a=12.0, scale_b=8.0)
    result = report(test, windows)
    assert result.significant and result.winner == "B"
    assert result.verdict.startswith("B is faster, p ")
    assert result.a.mean is not None and result.b.mean is not None and result.b.mean < result.a.mean
    assert result.a.ci_low < result.a.mean < result.a.ci_high  # type: ignore[operator]
    assert result.result is not None and result.result.difference < 0 and result.result.ci_high < 0


def test_report_ignores_windows_of_the_wrong_version() -> None:
    test = ab(min_samples=2)
    rng = np.random.default_rng(2)
    windows = _latency_windows(test, rng, devices=10, windows=3, scale_a=10.0, scale_b=10.0)
    # A device of arm B still on the old version (not converged yet) must not count for either arm.
    stale = next(w for w in windows if assign_arm(test.id, w.device, 50) == "B")
    extra = TelemetryWindow(stale.device, A.name, A.version, 100, 0, histogram_of(np.full(100, 500.0)))
    assert report(test, windows + [extra]).a == report(test, windows).a


def test_report_asks_for_more_samples_when_undecided() -> None:
    test = ab("error_rate", min_samples=100)
    windows = [TelemetryWindow("x", A.name, A.version, 1000, 50)]
    b_device = next(f"d{i}" for i in range(100) if assign_arm(test.id, f"d{i}", 50) == "B")
    a_device = next(f"d{i}" for i in range(100) if assign_arm(test.id, f"d{i}", 50) == "A")
    windows = [TelemetryWindow(a_device, A.name, A.version, 1000, 50),
               TelemetryWindow(b_device, B.name, B.version, 1000, 65)]
    result = report(test, windows)
    assert not result.significant and result.winner is None
    needed = samples_needed_proportions(0.05, 0.065)
    assert result.samples_needed_per_arm == needed and needed is not None
    assert result.more_samples_needed == needed - 1000
    assert result.verdict.startswith("no significant difference yet (p = ")
    assert f"about {needed - 1000:,} more requests per arm needed" in result.verdict
    assert result.a.ci_low < 0.05 < result.a.ci_high  # type: ignore[operator]


@pytest.mark.parametrize("metric, a_counts, b_counts, verdict", [
    ("error_rate", (40, 2000), (90, 2000), "A is less error-prone, p < 0.001"),
    ("error_rate", (90, 2000), (40, 2000), "B is less error-prone, p < 0.001"),
    ("accuracy", (1800, 2000), (1880, 2000), "B is more accurate, p < 0.001"),
    ("accuracy", (1880, 2000), (1800, 2000), "A is more accurate, p < 0.001"),
])
def test_proportion_verdicts(metric: str, a_counts: tuple, b_counts: tuple, verdict: str) -> None:
    test = ab(metric, min_samples=50)
    a_device = next(f"d{i}" for i in range(100) if assign_arm(test.id, f"d{i}", 50) == "A")
    b_device = next(f"d{i}" for i in range(100) if assign_arm(test.id, f"d{i}", 50) == "B")

    def window(device: str, arm: Arm, counts: tuple) -> TelemetryWindow:
        if metric == "error_rate":
            return TelemetryWindow(device, arm.name, arm.version, counts[1], counts[0])
        return TelemetryWindow(device, arm.name, arm.version, counts[1], 0, feedback_correct=counts[0],
                               feedback_total=counts[1])

    result = report(test, [window(a_device, A, a_counts), window(b_device, B, b_counts)])
    assert result.verdict == verdict


def test_too_few_samples_is_never_significant() -> None:
    test = ab(min_samples=50)
    windows = _latency_windows(test, np.random.default_rng(3), devices=6, windows=2, scale_a=20.0, scale_b=5.0)
    result = report(test, windows)
    assert not result.significant
    assert result.verdict.startswith("not enough data yet")


def test_empty_report() -> None:
    result = report(ab(), [])
    assert result.result is None and result.a.n == 0 and "not enough data yet" in result.verdict


# -- false positives under no difference ---------------------------------------------------------

def _fpr(pvalues: list[float], alpha: float = 0.05) -> float:
    return sum(p < alpha for p in pvalues) / len(pvalues)


def test_false_positive_rate_near_alpha_for_welch_on_histogram_p95() -> None:
    """The whole path (histograms -> per-window p95 -> Welch) under H0 rejects about alpha of the time."""
    rng = np.random.default_rng(11)
    test = ab(min_samples=10)
    labels = {f"dev-{i:03d}": assign_arm(test.id, f"dev-{i:03d}", 50) for i in range(30)}
    pvalues: list[float] = []
    for _ in range(600):
        windows = []
        for device, label in labels.items():
            arm = test.arm(label)
            latencies = rng.lognormal(math.log(10.0), 0.5, 150)
            windows.append(TelemetryWindow(device, arm.name, arm.version, 150, 0, histogram_of(latencies)))
        result = report(test, windows).result
        assert result is not None
        pvalues.append(result.p_value)
    # 600 tests at alpha 0.05: the binomial's 3-sigma band is about 0.023-0.077.
    assert 0.023 < _fpr(pvalues) < 0.077


def test_false_positive_rate_near_alpha_for_two_proportions() -> None:
    rng = np.random.default_rng(12)
    pvalues = [two_proportion_test(int(rng.binomial(800, 0.08)), 800, int(rng.binomial(700, 0.08)), 700).p_value
               for _ in range(3000)]
    # 3000 tests: 3-sigma band 0.038-0.062.
    assert 0.038 < _fpr(pvalues) < 0.062


def test_power_under_a_real_difference_is_high() -> None:
    rng = np.random.default_rng(13)
    pvalues = [welch_test(rng.normal(10, 2, 60).tolist(), rng.normal(11.5, 2, 60).tolist()).p_value
               for _ in range(500)]
    assert _fpr(pvalues) > 0.9
