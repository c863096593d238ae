"""The runtime layer against real LiteRT and real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.agent.runtimes import ModelLoadError, detect_model_format, open_model


def test_fp32_tflite_runs_on_litert_and_matches_keras(digits_files: dict[str, Path], digits_tflite: Path) -> None:
    import tensorflow as tf

    x = np.load(digits_files["eval"])["x"][:16]
    expected = tf.keras.models.load_model(digits_files["model"]).predict(x, verbose=0)
    with open_model(digits_tflite, prefer=["litert"]) as runner:
        assert runner.runtime == "litert"
        (got,) = runner.run([x])  # a batch of 16 resizes the batch-1 interpreter
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_io_is_quantized_and_dequantized_for_the_caller(digits_tflite: Path, digits_int8_tflite: Path, digits_files: dict[str, Path]) -> None:
    x = np.load(digits_files["eval"])["x"][:64]
    with open_model(digits_int8_tflite) as int8, open_model(digits_tflite) as fp32:
        assert int8.signature.inputs[0].dtype == "int8" and int8.signature.inputs[0].quantized
        (q,) = int8.run([x])
        (f,) = fp32.run([x])
    assert q.dtype == np.float32
    agreement = float(np.mean(q.argmax(1) == f.argmax(1)))
    assert agreement >= 0.95, agreement


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not a TFLite model"),
        (b"\x00" * 64, "not a TFLite model"),
    ],
)
def test_garbage_tflite_is_refused_with_one_line(tmp_path: Path, payload: bytes, message: str) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(payload)
    with pytest.raises(ModelLoadError, match=message):
        open_model(bad)


def test_truncated_tflite_is_refused(tmp_path: Path, digits_tflite: Path) -> None:
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(digits_tflite.read_bytes()[:2000])
    assert detect_model_format(bad) == "tflite"
    with pytest.raises(ModelLoadError):
        open_model(bad)


def test_tensorflow_lite_is_a_working_fallback_runtime(digits_files: dict[str, Path], digits_tflite: Path) -> None:
    """Where TensorFlow is the only TFLite runtime (a workstation, a Jetson image), it serves."""
    x = np.load(digits_files["eval"])["x"][:8]
    with open_model(digits_tflite, prefer=["tensorflow"]) as tf_runner, open_model(digits_tflite, prefer=["litert"]) as litert:
        assert tf_runner.runtime == "tensorflow" and tf_runner.runtime_version != "unknown"
        (a,) = tf_runner.run([x])
        (b,) = litert.run([x])
    np.testing.assert_allclose(a, b, atol=1e-5)
