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


# ---- the model zoo: small models of the kinds that broke the converter ----------------------


def zoo_model(kind: str, folder: Path) -> dict[str, Path]:
    """A small model of ``kind`` (random weights: conversion parity does not need
    training) and calibration data for it, saved in ``folder``:

    - normalization: a Normalization layer adapted to data (its mean and
      variance were captured constants that became extra ONNX graph inputs);
    - encoder: LayerNormalization and a Dense layer with exact GELU (the Erfc
      ONNX lacks, the float NEG island TFLite int8 leaves);
    - lstm / gru: a recurrent layer over 12 steps (tensor-list ops);
    - lstm-dynamic: an LSTM over a sequence of any length (a fixed batch, a WHILE
      loop, and a TFLite int8 converter that segfaults).
    """
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "normalization":
        x = rng.normal(5, 3, (160, 8)).astype(np.float32)
        inputs = tf.keras.Input((8,), name="features")
        norm = tf.keras.layers.Normalization()
        norm.adapt(x)
        hidden = tf.keras.layers.Dense(16, activation="relu")(norm(inputs))
        outputs = tf.keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
    elif kind == "encoder":
        x = rng.normal(0, 1, (160, 6, 16)).astype(np.float32)
        inputs = tf.keras.Input((6, 16), name="embedded")
        hidden = tf.keras.layers.LayerNormalization()(inputs)
        hidden = tf.keras.layers.Dense(32, activation="gelu")(hidden)  # Keras' gelu is exact (erf)
        hidden = tf.keras.layers.GlobalAveragePooling1D()(tf.keras.layers.Dense(16)(hidden))
        outputs = tf.keras.layers.Dense(4, activation="softmax", name="probs")(hidden)
    elif kind in ("lstm", "gru", "lstm-dynamic"):
        steps = None if kind == "lstm-dynamic" else 12
        x = rng.normal(0, 1, (160, 12, 6)).astype(np.float32)
        inputs = tf.keras.Input((steps, 6), name="sequence")
        layer = tf.keras.layers.GRU(16) if kind == "gru" else tf.keras.layers.LSTM(16)
        outputs = tf.keras.layers.Dense(3, activation="softmax", name="probs")(layer(inputs))
    else:
        raise ValueError(kind)
    model = tf.keras.Model(inputs, outputs)
    model.save(folder / f"{kind}.keras")
    np.savez(folder / f"{kind}.npz", x=x)
    return {"model": folder / f"{kind}.keras", "calib": folder / f"{kind}.npz"}


def sklearn_models(folder: Path) -> dict[str, Path]:
    """scikit-learn models trained in a second on scikit-learn's own data, saved with
    joblib, and their evaluation data (x, y): classifiers on digits, regressors on
    diabetes."""
    import joblib
    import numpy as np
    from sklearn.datasets import load_diabetes, load_digits
    from sklearn.ensemble import (
        GradientBoostingRegressor,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder.mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    xr, yr = load_diabetes(return_X_y=True)
    xr = xr.astype(np.float32)
    np.savez(folder / "digits-eval.npz", x=x[1400:], y=y[1400:])
    np.savez(folder / "diabetes-eval.npz", x=xr[350:], y=yr[350:])
    models = {
        "logistic-pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x[:1400], y[:1400]),
        "random-forest": RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0).fit(x[:1400], y[:1400]),
        "ridge-pipeline": make_pipeline(StandardScaler(), Ridge()).fit(xr[:350], yr[:350]),
        "boosted-regressor": GradientBoostingRegressor(n_estimators=40, random_state=0).fit(xr[:350], yr[:350]),
        "hist-boosting": HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x[:1400], y[:1400]),
        "hist-boosting-regressor": HistGradientBoostingRegressor(max_iter=40, random_state=0).fit(xr[:350], yr[:350]),
    }
    paths = {"digits-eval": folder / "digits-eval.npz", "diabetes-eval": folder / "diabetes-eval.npz"}
    for name, model in models.items():
        paths[name] = folder / f"{name}.joblib"
        joblib.dump(model, paths[name])
    return paths


def serve_with_agent(result: Any, folder: Path, name: str, instances: Any) -> tuple[Any, str]:
    """Bundle a ConversionResult (model, golden vectors, report), publish it in a
    real release repository, install it with the agent's UpdateDriver (signature
    and golden vectors checked, self-test replayed by name: COMMITTED means the
    golden vectors matched) and answer one TF Serving predict request through the
    agent's HTTP server. Returns (the JSON answer, the update's final state)."""
    import http.client
    import json

    from edgeship.agent.config import load_config, render_config
    from edgeship.agent.server import ApiServer
    from edgeship.agent.serving import ServingModel
    from edgeship.agent.sources import OfflinePackageSource
    from edgeship.agent.updater import UpdateDriver
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.release import ReleaseRepository

    folder.mkdir(parents=True, exist_ok=True)
    repo = ReleaseRepository(folder / "repo")
    repo.init(root_passphrase="converter-zoo-tests")
    build_bundle(result.out, name=name, version="1.0.0", out=folder / "m.bundle", golden=result.golden_path,
                 report=result.report_path)
    repo.publish(folder / "m.bundle")
    config_path = folder / "agent.toml"
    config_path.write_text(render_config(
        data=str(folder / "data"), device_id="zoo", fleet="lab", root=str(repo.root_metadata_path),
        director_key=str(repo.director_public_key_path), bind="127.0.0.1:0",
    ).replace("window_s = 60.0", "window_s = 0.2"))  # a short health window: the test is about serving
    config = load_config(config_path)
    serving = ServingModel()
    driver = UpdateDriver(config, serving=serving)
    server = ApiServer(serving, config.data_dir, port=0).start()
    try:
        repo.export(name, "1.0.0", folder / "m.package", fleet="lab")
        driver.begin(OfflinePackageSource(folder / "m.package"))
        record = driver.run()
        assert record.state == "COMMITTED", record.reason
        if instances is None:
            return None, str(record.state)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", f"/v1/models/{name}:predict", json.dumps({"instances": instances}))
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        return body, str(record.state)
    finally:
        server.stop()


def fine_tuned_digits(digits_files: dict[str, Path]) -> tuple[Any, Any, Any]:
    """(the digits Keras model, the same model fine-tuned one more epoch so every weight moves,
    the calibration inputs): the old and new version a delta is built between."""
    import numpy as np
    import tensorflow as tf

    data = np.load(digits_files["calib"])
    x, y = data["x"].astype(np.float32), data["y"]
    old = tf.keras.models.load_model(digits_files["model"])
    new = tf.keras.models.clone_model(old)
    new.set_weights(old.get_weights())
    new.compile(optimizer=tf.keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    new.fit(x, y, epochs=1, verbose=0)
    return old, new, x
