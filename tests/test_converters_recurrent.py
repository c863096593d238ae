"""Recurrent Keras models to TFLite: LSTMs through TFLite's fused
UNIDIRECTIONAL_SEQUENCE_LSTM kernel (fixed batch, stateless between calls), the
rest unrolled into builtin operators, with the reason in the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.converters.convert import convert_model
from edgeship.converters.recurrent import FUSED_LSTM_OPERATOR, lstm_fusion_refusal
from edgeship.converters.tflite_flatbuffer import read_tflite_graph

_DEFAULT = {"activation": "tanh", "recurrent_activation": "sigmoid", "return_state": False, "stateful": False}


@pytest.mark.parametrize("kind, changes, masking, quantize, refused", [
    ("LSTM", {}, False, "none", None),
    ("LSTM", {"go_backwards": True, "return_sequences": True}, False, "float16", None),
    ("LSTM", {}, False, "dynamic", None),
    ("LSTM", {}, False, "int8", "int8"),
    ("LSTM", {"activation": "relu"}, False, "none", "activation 'relu'"),
    ("LSTM", {"recurrent_activation": "hard_sigmoid"}, False, "none", "recurrent activation 'hard_sigmoid'"),
    ("LSTM", {"return_state": True}, False, "none", "return_state"),
    ("LSTM", {"stateful": True}, False, "none", "stateful"),
    ("LSTM", {}, True, "none", "masks"),
    ("GRU", {}, False, "none", "GRU has no fused TFLite kernel"),
    ("SimpleRNN", {}, False, "none", "SimpleRNN has no fused TFLite kernel"),
    ("Bidirectional", {"merge_mode": "concat", "layer": {"class_name": "LSTM", "config": _DEFAULT}}, False, "none", None),
    ("Bidirectional", {"merge_mode": None, "layer": {"class_name": "LSTM", "config": _DEFAULT}}, False, "none", "merge_mode"),
    ("Bidirectional", {"merge_mode": "sum", "layer": {"class_name": "GRU", "config": _DEFAULT}}, False, "none", "GRU"),
    ("Bidirectional", {"merge_mode": "ave", "layer": {"class_name": "LSTM", "config": {**_DEFAULT, "return_state": True}}},
     False, "none", "return_state"),
])
def test_which_layers_the_fused_lstm_kernel_computes_exactly(
    kind: str, changes: dict[str, Any], masking: bool, quantize: str, refused: str | None,
) -> None:
    reason = lstm_fusion_refusal(kind, {**_DEFAULT, **changes}, masking, quantize)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_tflite_has_no_gru_kernel_to_fuse_into() -> None:
    """The schema's builtin operators: a fused sequence LSTM and RNN, no GRU at all."""
    from ai_edge_litert import schema_py_generated as schema

    names = [name for name in vars(schema.BuiltinOperator) if not name.startswith("_")]
    assert FUSED_LSTM_OPERATOR in names and "UNIDIRECTIONAL_SEQUENCE_RNN" in names
    assert not [name for name in names if "GRU" in name]


@pytest.fixture(scope="module")
def stacked_lstm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LSTMs, the second reading the sequence backwards, and a Dense head."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("stacked-lstm")
    tf.keras.utils.set_random_seed(1)
    inputs = tf.keras.Input((10, 5), name="signal")
    hidden = tf.keras.layers.LSTM(24, return_sequences=True)(inputs)
    hidden = tf.keras.layers.LSTM(12, go_backwards=True)(hidden)
    outputs = tf.keras.layers.Dense(4, activation="softmax", name="probs")(hidden)
    model = tf.keras.Model(inputs, outputs)
    model.save(folder / "stacked.keras")
    x = np.random.default_rng(1).normal(0, 1, (120, 10, 5)).astype(np.float32)
    np.savez(folder / "stacked.npz", x=x)
    return {"model": folder / "stacked.keras", "calib": folder / "stacked.npz"}


def _operators(path: Path) -> list[str]:
    return [o.name for o in read_tflite_graph(path).operators]


@pytest.mark.parametrize("quantize, tolerance", [
    ("none", 1e-5),
    pytest.param("float16", 2e-3, marks=pytest.mark.slow),
    pytest.param("dynamic", 5e-2, marks=pytest.mark.slow),
])
def test_lstms_become_the_fused_kernel_and_answer_like_keras(
    stacked_lstm: dict[str, Path], tmp_path: Path, quantize: str, tolerance: float,
) -> None:
    import tensorflow as tf

    result = convert_model(stacked_lstm["model"], tmp_path / f"stacked-{quantize}.tflite", quantize=quantize,
                           calib=stacked_lstm["calib"], latency_runs=2)
    operators = _operators(result.out)
    assert operators.count(FUSED_LSTM_OPERATOR) == 2, operators
    assert "WHILE" not in operators and not result.report["runtime"]["select_tf_ops"]
    notes = " ".join(result.report["conversion"]["notes"])
    assert "fused UNIDIRECTIONAL_SEQUENCE_LSTM" in notes and "fixed batch of 1" in notes
    assert result.report["signature"]["inputs"][0]["shape"][0] == 1
    assert result.report["quality"]["max_abs_error"] < tolerance, result.report["quality"]

    # stateless: the kernel keeps its state in variable tensors; each call starts
    # from zero, whatever ran before (the same sample answers the same in any order)
    from ai_edge_litert.interpreter import Interpreter

    keras = tf.keras.models.load_model(stacked_lstm["model"], compile=False)
    x = np.load(stacked_lstm["calib"])["x"][:3]
    interpreter = Interpreter(model_path=str(result.out))
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    answers = []
    for i in (0, 1, 2, 0, 2):
        interpreter.set_tensor(index, x[i : i + 1])
        interpreter.invoke()
        answers.append(interpreter.get_tensor(out)[0])
    np.testing.assert_array_equal(answers[0], answers[3])
    np.testing.assert_array_equal(answers[2], answers[4])
    expected = keras(x).numpy()
    np.testing.assert_allclose(np.stack(answers[:3]), expected, atol=tolerance)


def test_int8_unrolls_the_lstms_and_says_why(stacked_lstm: dict[str, Path], tmp_path: Path) -> None:
    result = convert_model(stacked_lstm["model"], tmp_path / "stacked-int8.tflite", quantize="int8",
                           calib=stacked_lstm["calib"], latency_runs=2)
    operators = _operators(result.out)
    assert FUSED_LSTM_OPERATOR not in operators and "FULLY_CONNECTED" in operators
    notes = " ".join(result.report["conversion"]["notes"])
    assert "unrolled" in notes and "int8" in notes
    assert result.report["quality"]["agreement"] >= 0.85


def test_an_lstm_returning_its_state_is_unrolled_with_the_reason(tmp_path: Path) -> None:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(2)
    inputs = tf.keras.Input((8, 3), name="signal")
    sequence, state_h, _ = tf.keras.layers.LSTM(6, return_sequences=True, return_state=True)(inputs)
    pooled = tf.keras.layers.GlobalAveragePooling1D()(sequence)
    outputs = tf.keras.layers.Dense(2, name="score")(tf.keras.layers.Concatenate()([pooled, state_h]))
    model = tf.keras.Model(inputs, outputs)
    model.save(tmp_path / "state.keras")
    np.savez(tmp_path / "state.npz", x=np.random.default_rng(2).normal(0, 1, (40, 8, 3)).astype(np.float32))
    result = convert_model(tmp_path / "state.keras", tmp_path / "state.tflite", calib=tmp_path / "state.npz",
                           latency_runs=2)
    assert FUSED_LSTM_OPERATOR not in _operators(result.out)
    assert "return_state" in " ".join(result.report["conversion"]["notes"])
    assert result.report["quality"]["max_abs_error"] < 1e-5


def test_a_bidirectional_lstm_becomes_two_fused_kernels(tmp_path: Path) -> None:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(4)
    inputs = tf.keras.Input((9, 4), name="signal")
    hidden = tf.keras.layers.Bidirectional(tf.keras.layers.LSTM(8, return_sequences=True))(inputs)
    hidden = tf.keras.layers.Bidirectional(tf.keras.layers.LSTM(5), merge_mode="sum")(hidden)
    tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="score")(hidden)).save(tmp_path / "bi.keras")
    np.savez(tmp_path / "bi.npz", x=np.random.default_rng(4).normal(0, 1, (40, 9, 4)).astype(np.float32))
    result = convert_model(tmp_path / "bi.keras", tmp_path / "bi.tflite", calib=tmp_path / "bi.npz", latency_runs=2)
    assert _operators(result.out).count(FUSED_LSTM_OPERATOR) == 4
    assert result.report["quality"]["max_abs_error"] < 1e-5, result.report["quality"]
