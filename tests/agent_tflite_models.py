"""Write the digits models for the ``tflite_runtime`` environment (``make test-tflite``).

That environment (numpy < 2, tflite-runtime 2.14) has no TensorFlow to convert
models, so the main environment writes them first::

    .venv/bin/python tests/agent_tflite_models.py OUT_DIR

OUT_DIR gets digits.tflite, digits-int8.tflite, eval.npz (x) and reference.npz
(LiteRT's outputs for eval x, to compare the two runtimes).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def full_integer_tflite(model: Any, calib: np.ndarray) -> bytes:
    """A Keras model as full-integer TFLite with int8 inputs and outputs (100 calibration samples)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(100))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def write_models(out: Path) -> None:
    import tensorflow as tf

    sys.path.insert(0, str(REPO / "examples" / "digits"))
    from model import save_digits_model

    from edgeship.agent.runtimes import open_model

    out.mkdir(parents=True, exist_ok=True)
    files = save_digits_model(out / "train", epochs=8)
    model = tf.keras.models.load_model(files["model"])
    (out / "digits.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    (out / "digits-int8.tflite").write_bytes(full_integer_tflite(model, np.load(files["calib"])["x"]))
    x = np.load(files["eval"])["x"][:64].astype(np.float32)
    np.savez(out / "eval.npz", x=x)
    with (
        open_model(out / "digits.tflite", prefer=["litert"]) as fp32,
        open_model(out / "digits-int8.tflite", prefer=["litert"]) as int8,
    ):
        np.savez(out / "reference.npz", fp32=fp32.run([x])[0], int8=int8.run([x])[0])


if __name__ == "__main__":
    write_models(Path(sys.argv[1]))
