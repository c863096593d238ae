"""MobileNetV2 (random weights, 224x224) through every path that matters on a
real-sized network: TFLite fp32 and full-integer int8, ONNX fp32 and static QDQ
int8. Slow (tens of seconds per conversion on 2 cores): run by `make test`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.agent.runtimes import open_model
from edgeship.converters.convert import convert_model
from edgeship.ota.golden import GoldenVectors, compare_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("mobilenet")
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    paths = {"model": folder / "mobilenet_v2.keras", "calib": folder / "calib.npz", "eval": folder / "eval.npz"}
    model.save(paths["model"])
    rng = np.random.default_rng(0)
    np.savez(paths["calib"], x=rng.uniform(-1, 1, (32, 224, 224, 3)).astype(np.float32))
    np.savez(paths["eval"], x=rng.uniform(-1, 1, (8, 224, 224, 3)).astype(np.float32))
    return paths


def _convert(mobilenet: dict[str, Path], to: str, quantize: str) -> Any:
    out = mobilenet["model"].parent / f"mobilenet-{quantize}.{to}"
    return convert_model(mobilenet["model"], out, to=to, quantize=quantize, calib=mobilenet["calib"],
                         eval_data=mobilenet["eval"], latency_runs=3)


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_mobilenet_int8_is_small_valid_and_self_tests(mobilenet: dict[str, Path], to: str) -> None:
    fp32 = _convert(mobilenet, to, "none")
    int8 = _convert(mobilenet, to, "int8")
    ratio = int8.report["model"]["size_bytes"] / fp32.report["model"]["size_bytes"]
    assert ratio <= 0.30, ratio  # the size target (TFLite); ONNX QDQ keeps int8 weights too
    for result in (fp32, int8):
        report = result.report
        assert report["signature"]["inputs"][0]["shape"] == [-1, 224, 224, 3]
        assert report["signature"]["outputs"][0]["shape"] == [-1, 1000]
        assert report["quality"]["samples"] == 8 and report["quality"]["accuracy"] is None
        assert np.isfinite(report["quality"]["max_abs_error"])
        golden = GoldenVectors.load(result.golden_path)
        assert 1 <= len(golden.inputs[0]) <= 4  # large inputs: fewer golden samples
        with open_model(result.out) as runner:
            check = compare_outputs(golden, runner.run(list(golden.inputs)))
        assert check.passed, check.reason
    if to == "tflite":
        assert int8.report["operators"]["fully_integer"] is True, int8.report["operators"]["float_operators"]
