"""The pure decisions of the converters, table by table: gates, parity metrics,
output alignment, golden tolerance, latency percentiles, preprocessing specs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.agent.runtimes import TensorSpec, match_names
from edgeship.converters.bench import fastest, latency_stats
from edgeship.converters.data import PreprocessingSpec, parse_preprocessing
from edgeship.converters.golden_vectors import golden_sample_count, golden_tolerance
from edgeship.converters.to_onnx import min_onnxruntime_version
from edgeship.converters.to_tflite import unsupported_ops_from_error
from edgeship.converters.validate import (
    GateLimits,
    ParityMetrics,
    align_outputs,
    check_gates,
    classification_output,
    compare_outputs_of,
)
from edgeship.ota.errors import BadInputError


def metrics(ref: float | None, cand: float | None, agreement: float | None) -> ParityMetrics:
    return ParityMetrics(100, ref, cand, agreement, 0.1, 0.01)


@pytest.mark.parametrize(
    "m, limits, expected",
    [
        (metrics(0.95, 0.95, 1.0), GateLimits(), []),
        (metrics(0.95, 0.945, 0.99), GateLimits(1.0, 97.0), []),
        (metrics(0.95, 0.94, 0.99), GateLimits(1.0, 97.0), []),  # exactly 1 point: allowed
        (metrics(0.95, 0.93, 0.99), GateLimits(1.0, None), ["accuracy gate: dropped 2.00 points"]),
        (metrics(0.95, 0.95, 0.96), GateLimits(None, 97.0), ["agreement gate: top-1 agreement 96.00%"]),
        (metrics(0.95, 0.90, 0.90), GateLimits(1.0, 97.0), ["accuracy gate", "agreement gate"]),
        (metrics(None, None, 0.99), GateLimits(1.0, None), ["accuracy gate: the data has no labels"]),
        (metrics(None, None, None), GateLimits(None, 50.0), ["agreement gate: the model has no classification output"]),
        (metrics(0.90, 0.95, 1.0), GateLimits(0.0, 100.0), []),  # improving is never refused
    ],
)
def test_gates(m: ParityMetrics, limits: GateLimits, expected: list[str]) -> None:
    failures = check_gates(m, limits)
    assert len(failures) == len(expected), failures
    for failure, start in zip(failures, expected):
        assert failure.startswith(start), failure


def test_parity_metrics_count_accuracy_agreement_and_error() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    cand = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 1, 1])
    m = compare_outputs_of([ref], [cand], labels, ["p"])
    assert m.agreement == 0.75
    assert m.reference_accuracy == 0.75 and m.candidate_accuracy == 1.0
    assert m.accuracy_drop_pp == pytest.approx(-25.0)
    assert m.max_abs_error == pytest.approx(0.2, abs=1e-6)
    assert m.mean_abs_error == pytest.approx(np.abs(ref - cand).mean(), rel=1e-5)


def test_parity_metrics_of_multi_output_models_take_the_classification_head() -> None:
    box = np.zeros((3, 1), np.float32)
    probs = np.eye(3, dtype=np.float32)
    m = compare_outputs_of([box, probs], [box + 0.5, probs], np.array([0, 1, 2]))
    assert classification_output([box, probs]) == 1
    assert m.agreement == 1.0 and m.candidate_accuracy == 1.0
    assert m.max_abs_error == 0.5
    assert len(m.per_output) == 2


def test_parity_refuses_mismatched_outputs() -> None:
    with pytest.raises(BadInputError, match="shape"):
        compare_outputs_of([np.zeros((2, 3))], [np.zeros((2, 4))], None)


@pytest.mark.parametrize(
    "ref, cand, expected",
    [
        ([("probabilities", (-1, 10))], [("StatefulPartitionedCall_1:0", (-1, 10))], [0]),
        ([("a", (-1, 10)), ("b", (-1, 1))], [("b", (-1, 1)), ("a", (-1, 10))], [1, 0]),  # by name
        ([("a", (-1, 10)), ("b", (-1, 1))], [("x:0", (-1, 1)), ("x:1", (-1, 10))], [1, 0]),  # by shape
        ([("a", (-1, 2)), ("b", (-1, 2))], [("x:1", (-1, 2), "b"), ("x:0", (-1, 2), "a")], [1, 0]),  # by SignatureDef key
        ([("a", (-1, 2)), ("b", (-1, 2))], [("serving_default_b:0", (-1, 2)), ("serving_default_a:0", (-1, 2))], [1, 0]),
    ],
)
def test_align_outputs(ref: list, cand: list, expected: list[int]) -> None:
    def specs(items: list) -> list[TensorSpec]:
        return [TensorSpec(item[0], item[1], "float32", key=item[2] if len(item) > 2 else "") for item in items]

    assert align_outputs(specs(ref), specs(cand)) == expected


def test_same_shaped_outputs_without_common_names_are_refused_not_paired_by_position() -> None:
    ref = [TensorSpec("a", (-1, 2), "float32"), TensorSpec("b", (-1, 2), "float32")]
    cand = [TensorSpec("x:0", (-1, 2), "float32"), TensorSpec("x:1", (-1, 2), "float32")]
    with pytest.raises(BadInputError, match="cannot pair the outputs by name"):
        align_outputs(ref, cand)


@pytest.mark.parametrize(
    "specs, names, expected",
    [
        ([("serving_default_tokens:0", ""), ("serving_default_meta:0", "")], ["meta", "tokens"], [1, 0]),
        ([("x:0", "meta"), ("y:0", "tokens")], ["tokens", "meta"], [1, 0]),
        ([("anything", "")], ["other"], [0]),  # one tensor each side: the only pairing there is
        ([("meta", ""), ("serving_default_meta:0", "")], ["meta"], [0]),  # the exact name wins over an alias
    ],
)
def test_match_names(specs: list, names: list[str], expected: list[int]) -> None:
    tensors = [TensorSpec(n, (-1, 3), "float32", key=k) for n, k in specs]
    assert match_names(tensors, names) == expected


def test_match_names_refuses_unknown_and_duplicate_names() -> None:
    tensors = [TensorSpec("serving_default_a:0", (-1,), "float32"), TensorSpec("serving_default_b:0", (-1,), "float32")]
    with pytest.raises(BadInputError, match="no input named 'c' .*a, b"):
        match_names(tensors, ["a", "c"])
    with pytest.raises(BadInputError, match="same tensor"):
        match_names(tensors, ["a", "serving_default_a:0"])


@pytest.mark.parametrize(
    "spread, quantum, floor, expected",
    [
        (0.0, 0.0, 1e-4, 1e-4),  # nothing observed: the format's floor
        (1e-3, 0.0, 1e-4, 4e-3),  # observed spread, with margin
        (0.0, 1 / 256, 1e-4, 2 / 256),  # int8 output: two steps
        (0.004, 1 / 256, 1e-4, 0.016),
    ],
)
def test_golden_tolerance(spread: float, quantum: float, floor: float, expected: float) -> None:
    assert golden_tolerance(spread, quantum, floor) == pytest.approx(expected)


def test_golden_sample_count_shrinks_for_large_inputs() -> None:
    assert golden_sample_count([(-1, 8, 8, 1)]) == 8
    assert 1 <= golden_sample_count([(-1, 224, 224, 3)]) <= 4


def test_latency_percentiles_and_fastest() -> None:
    stats = latency_stats([0.001] * 90 + [0.010] * 10, threads=1)
    assert stats.p50_ms == pytest.approx(1.0)
    assert stats.p99_ms == pytest.approx(10.0)
    assert stats.throughput_per_s == pytest.approx(1000 / 1.9)
    assert fastest({"a": 2.0, "b": 1.0}) == "b"
    assert fastest({}) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("size=224x224,scale=1/255", PreprocessingSpec(size=(224, 224), scale=1 / 255)),
        ("mean=0.5:0.4:0.3,std=0.2:0.2:0.2,layout=nchw", PreprocessingSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), layout="NCHW")),
        ('{"size": [8, 8], "color": "grayscale"}', PreprocessingSpec(size=(8, 8), color="grayscale")),
        (None, None),
    ],
)
def test_parse_preprocessing(text: str | None, expected: PreprocessingSpec | None) -> None:
    assert parse_preprocessing(text) == expected


@pytest.mark.parametrize(
    "text", ["size", "layout=NWHC", "std=0", "scale=abc", '{"sise": 3}', "{broken", "scale=1/0", "mean=1/0", "missing-spec.json"]
)
def test_bad_preprocessing_is_one_clear_error(text: str) -> None:
    with pytest.raises(BadInputError):
        parse_preprocessing(text)


def test_preprocessing_applies_per_channel_on_the_layout_axis() -> None:
    pixels = np.full((1, 2, 2, 3), 255, np.uint8)
    x = PreprocessingSpec(scale=1 / 255, mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 1.0)).apply(pixels)
    np.testing.assert_allclose(x[0, 0, 0], [1.0, 1.0, 0.0])
    nchw = PreprocessingSpec(scale=1 / 255, mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 1.0), layout="NCHW")
    np.testing.assert_allclose(nchw.apply(np.transpose(pixels, (0, 3, 1, 2)))[0, :, 0, 0], [1.0, 1.0, 0.0])
    assert PreprocessingSpec.from_dict(nchw.to_dict()) == nchw


def test_unsupported_ops_are_named_from_converter_errors() -> None:
    message = (
        "Some ops are not supported by the native TFLite runtime...\n"
        "Flex ops: FlexMatrixDeterminant\nDetails:\n\ttf.MatrixDeterminant(tensor<?x3x3xf32>) -> ..."
    )
    assert unsupported_ops_from_error(message) == ["MatrixDeterminant"]
    assert unsupported_ops_from_error("something else") == []


@pytest.mark.parametrize("opset, version", [(13, "1.7"), (17, "1.12"), (18, "1.14"), (21, "1.18"), (30, "1.20")])
def test_min_onnxruntime_version(opset: int, version: str) -> None:
    assert min_onnxruntime_version(opset) == version


@pytest.mark.parametrize(
    "spec, channels, message",
    [
        (PreprocessingSpec(mean=(0.5, 0.5)), 3, "mean has 2 values"),
        (PreprocessingSpec(std=(0.2, 0.2, 0.2)), 1, "std has 3 values"),
        (PreprocessingSpec(mean=(0.5, 0.4, 0.3), layout="NCHW"), 1, "the data has 1 channel"),
    ],
)
def test_per_channel_values_must_match_the_channels(spec: PreprocessingSpec, channels: int, message: str) -> None:
    """One value per channel, or one for all: never a silent broadcast into more channels."""
    shape = (2, 4, 4, channels) if spec.layout == "NHWC" else (2, channels, 4, 4)
    with pytest.raises(BadInputError, match=message):
        spec.apply(np.zeros(shape, np.uint8))


def test_missing_spec_file_is_named() -> None:
    with pytest.raises(BadInputError, match="no such file"):
        parse_preprocessing("missing-spec.json")
