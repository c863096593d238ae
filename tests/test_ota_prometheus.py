"""The one Prometheus text writer (edgeship.ota.prometheus), read back by what nobody here wrote:
the official Python client's parser (values and hostile label values come back as they went in) and
promtool's linter (every family kind, as Prometheus itself reads it)."""

from __future__ import annotations

import math
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeship.ota.prometheus import (
    Exposition,
    HistogramSample,
    SummarySample,
    escape_help,
    escape_label_value,
    format_labels,
    format_value,
    latency_seconds,
)
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS, LatencyHistogram

HOSTILE = ['back\\slash', 'quote"d', "new\nline", 'all\\"\n three', "ünïcode ✓", "", "{le=\"1\"}"]


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "NaN"), (math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (True, "1"), (False, "0"),
     (3, "3"), (2**63 - 1, "9223372036854775807"), (3.0, "3"), (0.05, "0.05"), (0.00025, "0.00025"),
     (1e-05, "1e-05"), (1e16, "1e+16"), (1733389425.123456, "1733389425.123456"), (-2.5, "-2.5")],
)
def test_values_are_written_as_prometheus_reads_them(value: float | None, text: str) -> None:
    assert format_value(value) == text


def test_label_values_and_help_escape_what_the_format_requires() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'  # HELP keeps quotes as they are
    assert format_labels({}) == ""
    assert format_labels({"b": 1, "a": "x"}) == '{b="1",a="x"}'  # the caller's order


def test_hostile_label_values_and_help_read_back_unchanged_by_the_official_parser() -> None:
    page = Exposition()
    page.gauge("edgeship_test_value", 'Help with a \\ backslash, a "quote"\nand a newline.',
               [({"name": value, "i": i}, i) for i, value in enumerate(HOSTILE)])
    [family] = text_string_to_metric_families(page.text())
    assert family.documentation == 'Help with a \\ backslash, a "quote"\nand a newline.'
    assert [(s.labels["name"], s.value) for s in family.samples] == [(v, float(i)) for i, v in enumerate(HOSTILE)]


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    hist = LatencyHistogram()
    for ms in (0.05, 0.3, 0.3, 40.0, 9000.0):
        hist.observe(ms)
    page = Exposition()
    page.histogram("edgeship_test_latency_seconds", "Latency.", [({"model": "m"}, latency_seconds(hist))])
    [family] = text_string_to_metric_families(page.text())
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1 and buckets[-1] == ("+Inf", 5.0)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert ('0.0001', 1.0) in buckets and ('0.0005', 3.0) in buckets and ('5', 4.0) in buckets
    totals = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert totals == {"edgeship_test_latency_seconds_count": 5.0,
                      "edgeship_test_latency_seconds_sum": pytest.approx((0.05 + 0.6 + 40.0 + 9000.0) / 1000)}


def test_summary_series_carry_quantile_labels_sum_and_count() -> None:
    page = Exposition()
    page.summary("edgeship_test_duration_seconds", "Durations.",
                 [({"job": "a"}, SummarySample(((0.5, 0.1), (0.99, None)), 3.5, 20))])
    [family] = text_string_to_metric_families(page.text())
    assert family.type == "summary"
    got = {(s.name, s.labels.get("quantile")): s.value for s in family.samples}
    assert got[("edgeship_test_duration_seconds", "0.5")] == 0.1
    assert math.isnan(got[("edgeship_test_duration_seconds", "0.99")])
    assert got[("edgeship_test_duration_seconds_count", None)] == 20.0


@pytest.mark.parametrize(
    "write",
    [
        lambda p: (p.gauge("edgeship_a", "A.", []), p.counter("edgeship_a", "A again.", [])),
        lambda p: p.gauge("edgeship-dash", "Bad name.", []),
        lambda p: p.gauge("edgeship_a", "Bad label.", [({"bad-label": 1}, 1)]),
        lambda p: p.gauge("edgeship_a", "Reserved label.", [({"__name__": 1}, 1)]),
        lambda p: p.family("edgeship_a", "histogram", "Wrong method.", []),
    ],
    ids=["written-twice", "bad-metric-name", "bad-label-name", "reserved-label-name", "kind-with-own-method"],
)
def test_a_page_prometheus_would_refuse_is_refused_when_written(write: object) -> None:
    with pytest.raises(ValueError):
        write(Exposition())  # type: ignore[operator]


def test_histogram_sample_refuses_counts_that_do_not_match_its_bounds() -> None:
    with pytest.raises(ValueError, match="needs 3 counts"):
        HistogramSample((0.1, 0.2), (1, 2), 0.3)
    with pytest.raises(ValueError, match="ascend"):
        HistogramSample((0.2, 0.1), (1, 2, 3), 0.3)


@pytest.mark.promtool
def test_every_family_kind_passes_promtool_check_metrics() -> None:
    hist = LatencyHistogram()
    hist.observe(2.0)
    page = Exposition()
    page.counter("edgeship_test_events_total", "Events.", [({"kind": k}, 1) for k in HOSTILE])
    page.gauge("edgeship_test_temperature_celsius", "Temperature.", [({}, 41.5)])
    page.gauge("edgeship_test_ratio", "No data yet is NaN.", [({}, None)])
    page.histogram("edgeship_test_latency_seconds", "Latency.", [({"model": "m"}, latency_seconds(hist))])
    page.summary("edgeship_test_duration_seconds", "Durations.", [({}, SummarySample(((0.5, 0.1),), 1.0, 2))])
    result = subprocess.run(["promtool", "check", "metrics"], input=page.text(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
