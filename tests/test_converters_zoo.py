"""The model zoo: models of the kinds the converter broke on, each through the
variants its operators allow, validated against the original, golden vectors
replayed by name; the slow zoo adds Keras applications with random weights.

Fast by default: small models, a few variants each. ``-m slow`` runs the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from converters_fixtures import old_toolchain_cnn, zoo_model

from edgeship.agent.runtimes import open_model
from edgeship.converters.convert import QuantizationChoices, convert_model
from edgeship.ota.errors import BadInputError
from edgeship.ota.golden import GoldenVectors, compare_outputs

_MODELS: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("zoo")

    def get(kind: str) -> dict[str, Path]:
        if kind not in _MODELS:
            _MODELS[kind] = zoo_model(kind, folder)
        return _MODELS[kind]

    return get


def _check(result: Any, quantize: str) -> dict[str, Any]:
    quality = result.report["quality"]
    if quantize in ("none",):
        assert quality["max_abs_error"] < 1e-4, quality
    else:
        assert quality["agreement"] >= 0.85, quality
    golden = GoldenVectors.load(result.golden_path)
    with open_model(result.out) as runner:
        check = compare_outputs(golden, runner.run_named(dict(zip(golden.input_names, golden.inputs))))
    assert check.passed, check.reason
    return dict(result.report)


FAST = [
    ("normalization", "onnx", "none"),
    ("normalization", "onnx", "int8"),
    ("encoder", "onnx", "none"),
    ("encoder", "tflite", "int8"),
    ("lstm", "tflite", "int8"),
    ("gru", "tflite", "none"),
    ("lstm", "onnx", "none"),
]
SLOW = [
    (kind, to, quantize)
    for kind in ("normalization", "encoder", "lstm", "gru")
    for to, quantize in (("tflite", "none"), ("tflite", "dynamic"), ("tflite", "float16"), ("tflite", "int8"),
                         ("onnx", "none"), ("onnx", "dynamic"), ("onnx", "int8"))
    if (kind, to, quantize) not in FAST
]


def _convert(zoo: Any, tmp_path: Path, kind: str, to: str, quantize: str, **kwargs: Any) -> Any:
    files = zoo(kind)
    return convert_model(files["model"], tmp_path / f"{kind}-{quantize}.{to}", to=to, quantize=quantize,
                         calib=files["calib"], latency_runs=2, **kwargs)


@pytest.mark.parametrize("kind, to, quantize", FAST)
def test_zoo_model_converts_validates_and_replays(zoo: Any, tmp_path: Path, kind: str, to: str, quantize: str) -> None:
    report = _check(_convert(zoo, tmp_path, kind, to, quantize), quantize)
    notes = " ".join(report["conversion"]["notes"])
    if kind in ("lstm", "gru") and to == "tflite":
        assert "unrolled" in notes  # builtin operators, no tensor-list ops, no Select TF ops
        assert not report["runtime"]["select_tf_ops"]
    if kind == "encoder" and to == "onnx":
        assert "Erfc" in notes and "Erf" in report["operators"]["counts"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, to, quantize", SLOW)
def test_zoo_model_every_variant(zoo: Any, tmp_path: Path, kind: str, to: str, quantize: str) -> None:
    _check(_convert(zoo, tmp_path, kind, to, quantize), quantize)


def test_normalization_exports_to_onnx_with_one_input(zoo: Any, tmp_path: Path) -> None:
    """The adapted mean and variance are constants in the graph, not graph inputs."""
    import onnx

    result = _convert(zoo, tmp_path, "normalization", "onnx", "none")
    graph = onnx.load(str(result.out)).graph
    initializers = {i.name for i in graph.initializer}
    assert [i.name for i in graph.input if i.name not in initializers] == ["features"]
    assert result.report["conversion"]["opset"] == 17


def test_strict_int8_refuses_the_float_neg_island_by_name(zoo: Any, tmp_path: Path) -> None:
    relaxed = _convert(zoo, tmp_path, "encoder", "tflite", "int8")
    assert "NEG" in relaxed.report["operators"]["float_operators"]
    out = tmp_path / "strict.tflite"
    with pytest.raises(BadInputError, match=r"--strict: .*NEG"):
        convert_model(zoo("encoder")["model"], out, quantize="int8", calib=zoo("encoder")["calib"],
                      choices=QuantizationChoices(strict=True), latency_runs=2)
    assert not out.exists()


def test_int16_activations_and_per_tensor_weights(zoo: Any, tmp_path: Path) -> None:
    result = _convert(zoo, tmp_path, "normalization", "tflite", "int8",
                      choices=QuantizationChoices(activations="int16", per_channel=False, samples=40))
    _check(result, "int8")
    conversion = result.report["conversion"]
    assert conversion["calibration"]["samples"] == 40 and conversion["choices"]["activations"] == "int16"
    from edgeship.converters.tflite_flatbuffer import read_tflite_graph

    assert any("int16" in o.output_dtypes for o in read_tflite_graph(result.out).operators)  # 16x8: int16 activations


@pytest.mark.parametrize("method, activations", [("entropy", "uint8"), ("percentile", "int8")])
def test_onnx_calibration_methods(zoo: Any, tmp_path: Path, method: str, activations: str) -> None:
    result = _convert(zoo, tmp_path, "normalization", "onnx", "int8",
                      choices=QuantizationChoices(method=method, activations=activations))
    _check(result, "int8")
    assert result.report["conversion"]["choices"]["method"] == method


def test_report_names_peak_memory_time_and_an_honest_reference(zoo: Any, tmp_path: Path) -> None:
    report = _convert(zoo, tmp_path, "gru", "tflite", "none").report
    peak = report["conversion"]["peak_rss_mib"]
    assert 50 < peak["edgeship"] < 4096 and 50 < peak["converter"] < 4096
    assert report["conversion"]["seconds"] > 0
    assert "tf.function" in report["validation"]["reference"]["timed_as"]


# ---- ONNX from elsewhere -------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("old-onnx")
    digits = load_digits()
    np.savez(folder / "calib.npz", x=(digits.images / 16.0).astype(np.float32)[:300, None], y=digits.target[:300])
    return {"model": old_toolchain_cnn(folder / "old.onnx"), "calib": folder / "calib.npz"}


@pytest.mark.parametrize("quantize", ["int8", "dynamic", "float16"])
def test_old_toolchain_onnx_is_upgraded_and_quantizes(old_onnx: dict[str, Path], tmp_path: Path, quantize: str) -> None:
    result = convert_model(old_onnx["model"], tmp_path / f"old-{quantize}.onnx", quantize=quantize,
                           calib=old_onnx["calib"], latency_runs=2)
    _check(result, quantize)
    notes = " ".join(result.report["conversion"]["notes"])
    assert "opset 9 upgraded to 13" in notes and "10 initializer(s) removed from the graph inputs" in notes
    if quantize == "int8":
        counts = result.report["operators"]["counts"]
        assert counts.get("QuantizeLinear") and counts.get("DequantizeLinear")
        assert result.report["runtime"]["opset"] == 13


def test_old_onnx_fp32_is_passed_through_untouched(old_onnx: dict[str, Path], tmp_path: Path) -> None:
    result = convert_model(old_onnx["model"], tmp_path / "old.onnx", calib=old_onnx["calib"], latency_runs=2)
    assert result.out.read_bytes() == old_onnx["model"].read_bytes()


# ---- Keras applications (random weights, small inputs: the operators are what matter) ------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["EfficientNetB0", "ConvNeXtTiny"])
def test_keras_applications_export_to_onnx_that_loads(tmp_path: Path, name: str) -> None:
    """EfficientNetB0's rescaling/normalization constants stay constants (one graph
    input); ConvNeXtTiny's no-inline XLA convolutions are inlined (no
    StatefulPartitionedCall) and its exact GELU becomes Erf."""
    import onnx
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = getattr(tf.keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    model.save(tmp_path / f"{name}.keras")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32))
    result = convert_model(tmp_path / f"{name}.keras", tmp_path / f"{name}.onnx", calib=tmp_path / "calib.npz", latency_runs=2)
    graph = onnx.load(str(result.out)).graph
    initializers = {i.name for i in graph.initializer}
    assert len([i for i in graph.input if i.name not in initializers]) == 1
    assert not {n.op_type for n in graph.node} & {"StatefulPartitionedCall", "PartitionedCall", "Erfc"}
    assert result.report["quality"]["max_abs_error"] < 1e-3


def test_an_operator_onnx_lacks_is_named(tmp_path: Path) -> None:
    import tensorflow as tf

    from edgeship.ota.errors import EdgeshipError

    class Bessel(tf.keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return tf.math.special.bessel_i0e(x)

    inputs = tf.keras.Input((4,), name="x")
    tf.keras.Model(inputs, Bessel()(inputs)).export(tmp_path / "bessel")
    with pytest.raises(EdgeshipError, match=r"tf2onnx cannot express operator\(s\) BesselI0e of bessel in ONNX opset 17"):
        convert_model(tmp_path / "bessel", tmp_path / "b.onnx", latency_runs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bessel"]
