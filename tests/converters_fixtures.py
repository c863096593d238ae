"""Shared, cached conversions of the digits model for the converter and CLI tests.

Conversions cost seconds each on a 2-core machine, so each (target, quantize,
int8 I/O) combination is converted once per test session and shared: the cache
lives in this module (imported once), the files in a session temp folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_CACHE: dict[tuple[str, str, bool], Any] = {}


def converted(digits_files: dict[str, Path], folder: Path, to: str, quantize: str, int8_io: bool = False) -> Any:
    """The ConversionResult of digits.keras -> (to, quantize, int8_io), converted once."""
    from edgeship.converters.convert import convert_model

    key = (to, quantize, int8_io)
    if key not in _CACHE:
        name = f"digits-{quantize}{'-io' if int8_io else ''}.{to}"
        _CACHE[key] = convert_model(
            digits_files["model"],
            folder / name,
            to=to,
            quantize=quantize,
            int8_io=int8_io,
            calib=digits_files["calib"],
            eval_data=digits_files["eval"],
            latency_runs=5,
        )
    return _CACHE[key]


@pytest.fixture(scope="session")
def conversions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conversions")


@pytest.fixture(scope="session")
def convert_digits(digits_files: dict[str, Path], conversions_dir: Path) -> Any:
    """``convert_digits(to, quantize, int8_io=False) -> ConversionResult`` (cached)."""

    def get(to: str, quantize: str, int8_io: bool = False) -> Any:
        return converted(digits_files, conversions_dir, to, quantize, int8_io)

    return get


def old_toolchain_cnn(path: Path, seed: int = 0) -> Path:
    """A small CNN as an older exporter wrote it: IR version 3, opset 9, every
    weight also listed as a graph input (the ResNet-50 of the ONNX model zoo's
    first releases looks like this), NCHW input 'data' [N, 1, 8, 8] and output
    'prob' [N, 10]. Conv -> BatchNormalization -> Relu -> Conv -> Relu ->
    GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "conv1_w": rng.normal(0, 0.5, (8, 1, 3, 3)),
        "conv1_b": rng.normal(0, 0.1, (8,)),
        "bn_scale": rng.uniform(0.5, 1.5, (8,)),
        "bn_bias": rng.normal(0, 0.1, (8,)),
        "bn_mean": rng.normal(0, 0.1, (8,)),
        "bn_var": rng.uniform(0.5, 1.5, (8,)),
        "conv2_w": rng.normal(0, 0.3, (16, 8, 3, 3)),
        "conv2_b": rng.normal(0, 0.1, (16,)),
        "fc_w": rng.normal(0, 0.5, (10, 16)),
        "fc_b": rng.normal(0, 0.1, (10,)),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax"),
    ]
    graph_inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 8, 8])]
    graph_inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in initializers]
    graph = helper.make_graph(
        nodes, "old_cnn", graph_inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="an-old-exporter")
    model.ir_version = 3
    onnx.save(model, str(path))
    return path


def int8_sensitive_model(folder: Path, outlier: float = 2000.0) -> dict[str, Path]:
    """A digits classifier built to break in int8, and how: a trained MLP
    (pixels -> 'hidden' 32 ReLU -> 'classes' 10) with one layer spliced in
    between, 'outlier', that passes the 32 hidden activations through unchanged
    and adds a 33rd channel of ``outlier`` x their sum, which 'classes' ignores
    (zero weights). The float model is exactly the trained one; in int8 the
    'outlier' output shares one per-tensor scale stretched by that channel
    (thousands), so the 32 real activations (0 to ~10) round to zero and the
    accuracy collapses. Keeping 'outlier' (and what reads it) in float repairs it.

    Writes model.keras, calib.npz and eval.npz (with labels y) into ``folder``.
    """
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    pixels = tf.keras.Input((64,), name="pixels")
    hidden = tf.keras.layers.Dense(32, activation="relu", name="hidden")
    head = tf.keras.layers.Dense(10, activation="softmax", name="classes_trained")
    trained = tf.keras.Model(pixels, head(hidden(pixels)))
    trained.compile("adam", "sparse_categorical_crossentropy")
    trained.fit(x[:1200], y[:1200], epochs=30, batch_size=64, verbose=0)
    spliced_pixels = tf.keras.Input((64,), name="pixels")
    outlier_layer = tf.keras.layers.Dense(33, name="outlier")
    classes = tf.keras.layers.Dense(10, activation="softmax", name="classes")
    model = tf.keras.Model(spliced_pixels, classes(outlier_layer(hidden(spliced_pixels))))
    w, b = head.get_weights()
    outlier_layer.set_weights([np.hstack([np.eye(32), np.full((32, 1), outlier)]).astype(np.float32), np.zeros(33, np.float32)])
    classes.set_weights([np.vstack([w, np.zeros((1, 10), np.float32)]), b])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "sensitive.keras")
    np.savez(folder / "calib.npz", x=x[:1200][:300], y=y[:1200][:300])
    np.savez(folder / "eval.npz", x=x[1200:], y=y[1200:])
    return {"model": folder / "sensitive.keras", "calib": folder / "calib.npz", "eval": folder / "eval.npz"}
