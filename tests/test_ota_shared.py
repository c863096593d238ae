"""Topic tree and latency histograms: pure, table-tested."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import TopicError, device_topic, parse_device_topic


@pytest.mark.parametrize(
    "fleet, device, kind, expected",
    [
        ("lab", "pi-01", "desired", "edgeship/lab/devices/pi-01/desired"),
        ("lab", "pi-01", "blocks/request", "edgeship/lab/devices/pi-01/blocks/request"),
    ],
)
def test_device_topic_round_trips(fleet: str, device: str, kind: str, expected: str) -> None:
    assert device_topic(fleet, device, kind) == expected
    parsed = parse_device_topic(expected)
    assert (parsed.fleet, parsed.device, parsed.kind) == (fleet, device, kind)


@pytest.mark.parametrize(
    "fleet, device, kind",
    [("lab", "pi/01", "desired"), ("lab", "+", "desired"), ("#", "pi", "desired"), ("lab", "pi", "secrets"), ("", "pi", "desired")],
)
def test_bad_topic_parts_are_refused(fleet: str, device: str, kind: str) -> None:
    with pytest.raises(TopicError):
        device_topic(fleet, device, kind)


@pytest.mark.parametrize("topic", ["edgeship/lab/devices/pi", "other/lab/devices/pi/desired", "edgeship/lab/devices/pi/x"])
def test_non_device_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_device_topic(topic)


def test_histogram_quantiles_track_numpy_within_a_bucket() -> None:
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=0.5, sigma=0.6, size=20000)
    histogram = LatencyHistogram()
    for s in samples:
        histogram.observe(float(s))
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(samples, q))
        approx = histogram.quantile_ms(q)
        assert approx is not None and abs(approx - exact) / exact < 0.2, (q, approx, exact)


def test_histograms_merge_exactly_and_survive_serialization() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for v in (0.3, 1.2, 4.0):
        a.observe(v)
    for v in (0.3, 80.0):
        b.observe(v)
    merged = LatencyHistogram.from_dict(a.merge(b).to_dict())
    assert merged.count == 5 and merged.total_ms == pytest.approx(85.8)
    with pytest.raises(ValueError):
        LatencyHistogram.from_dict({"buckets_ms": [1, 2], "counts": [1, 2, 3]})


@pytest.mark.parametrize(
    "first, sum_ms",
    [(1e300, 1.0), (float("inf"), 1.0), (1.5, 1.0), (True, 1.0), (-1, 1.0), (2**63, 1.0),
     (0, float("nan")), (0, float("inf")), (0, -1.0), (0, "1")],
)
def test_a_device_histogram_with_impossible_numbers_is_refused(first: object, sum_ms: object) -> None:
    """Device telemetry feeds the rollout gates: a count of 1e300 or a NaN sum must not
    be merged into the fleet's latency (the protocol turns the ValueError into a refusal)."""
    from edgeship.ota.telemetry import LATENCY_BUCKETS_MS

    counts = [first] + [0] * len(LATENCY_BUCKETS_MS)
    with pytest.raises(ValueError):
        LatencyHistogram.from_dict({"counts": counts, "sum_ms": sum_ms})
    assert LatencyHistogram.from_dict({"counts": [0] * len(counts), "sum_ms": 0}).count == 0


def test_hash_file_streams_any_size_and_reports_progress(tmp_path) -> None:
    import hashlib

    from edgeship.ota.hashing import CHUNK_SIZE, hash_file, sha256_file

    for size in (0, 1, CHUNK_SIZE, 2 * CHUNK_SIZE + 7):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        seen: list = []
        assert hash_file(path, lambda step, done, total, seen=seen: seen.append((step, done, total))) == (
            size, hashlib.sha256(data).hexdigest())
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
        assert not seen or seen[-1] == ("hash", size, size)


def test_first_line_of_an_error() -> None:
    from edgeship.ota.errors import first_line

    assert first_line(ValueError("bad thing\n  at line 3")) == "bad thing"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert len(first_line(ValueError("x" * 1000))) == 300
