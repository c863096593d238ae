"""Inputs and outputs are matched by name through conversion, validation and
golden vectors: a model with three inputs (one of them integer token ids into an
Embedding) and two outputs of the same shape converts to every format with
exact fp32 parity, which position-matching cannot give (LiteRT keeps these
tensors in another order than Keras)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.agent.runtimes import open_model
from edgeship.converters.convert import convert_model
from edgeship.ota.errors import BadInputError
from edgeship.ota.golden import GoldenVectors, compare_outputs

VOCAB = 20


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("multi")
    tf.keras.utils.set_random_seed(0)
    meta = tf.keras.Input((3,), name="meta")
    image = tf.keras.Input((8, 8, 1), name="image")
    tokens = tf.keras.Input((5,), dtype="int32", name="tokens")
    embedded = tf.keras.layers.Flatten()(tf.keras.layers.Embedding(VOCAB, 4)(tokens))
    hidden = tf.keras.layers.Concatenate()([tf.keras.layers.Flatten()(image), meta, embedded])
    first = tf.keras.layers.Dense(4, name="first")(hidden)
    second = tf.keras.layers.Dense(4, name="second")(hidden)
    model = tf.keras.Model([meta, image, tokens], [first, second])
    model.save(folder / "multi.keras")
    rng = np.random.default_rng(0)
    # arrays stored in another order than the model's inputs; ids as int64
    np.savez(
        folder / "calib.npz",
        tokens=rng.integers(0, VOCAB, (80, 5)),
        image=rng.random((80, 8, 8, 1), dtype=np.float32),
        meta=rng.random((80, 3), dtype=np.float32),
    )
    return {"model": folder / "multi.keras", "calib": folder / "calib.npz", "folder": folder}


def _convert(multi: dict[str, Path], to: str, quantize: str) -> Any:
    return convert_model(
        multi["model"], multi["folder"] / f"multi-{quantize}.{to}", to=to, quantize=quantize, calib=multi["calib"], latency_runs=2
    )


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_multi_input_same_shaped_outputs_fp32_is_exact(multi: dict[str, Path], to: str) -> None:
    report = _convert(multi, to, "none").report
    quality = report["quality"]
    assert quality["max_abs_error"] < 1e-4  # swapped outputs would differ by whole units
    assert {o["name"] for o in report["validation"]["metrics"]["per_output"]} == {"first", "second"}
    dtypes = {i.get("key") or i["name"]: i["dtype"] for i in report["signature"]["inputs"]}
    assert dtypes == {"meta": "float32", "image": "float32", "tokens": "int32"}


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_int8_keeps_integer_inputs_and_golden_vectors_replay_by_name(multi: dict[str, Path], to: str) -> None:
    result = _convert(multi, to, "int8")
    inputs = {i.get("key") or i["name"]: i for i in result.report["signature"]["inputs"]}
    assert inputs["tokens"]["dtype"] == "int32" and inputs["tokens"]["scale"] == 0.0  # ids are never quantized
    golden = GoldenVectors.load(result.golden_path)
    tokens = golden.inputs[next(i for i, n in enumerate(golden.input_names) if "tokens" in n)]
    assert tokens.dtype == np.int32 and tokens.max() < VOCAB
    # replayed as the agent does, by name, with the golden tensors handed over in reverse order
    with open_model(result.out) as runner:
        named = dict(reversed(list(zip(golden.input_names, golden.inputs))))
        check = compare_outputs(golden, runner.run_named(named))
    assert check.passed, check.reason


def test_golden_replay_fed_by_position_in_the_wrong_order_is_caught(multi: dict[str, Path]) -> None:
    """The tolerance is tight enough that mixing up two same-shaped outputs fails."""
    result = _convert(multi, "tflite", "none")
    golden = GoldenVectors.load(result.golden_path)
    with open_model(result.out) as runner:
        outputs = runner.run_named(dict(zip(golden.input_names, golden.inputs)))
    swapped = dict(zip(golden.output_names, reversed([outputs[n] for n in golden.output_names])))
    assert not compare_outputs(golden, swapped).passed


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_the_agent_installs_a_multi_input_model_with_integer_ids(multi: dict[str, Path], tmp_path: Path, to: str) -> None:
    """The agent's self-test replays the golden vectors (int32 ids included) by name."""
    from converters_fixtures import serve_with_agent

    _, state = serve_with_agent(_convert(multi, to, "int8"), tmp_path / "agent", "multi", None)
    assert state == "COMMITTED"


def test_data_missing_an_input_names_it(multi: dict[str, Path], tmp_path: Path) -> None:
    calib = tmp_path / "partial.npz"
    np.savez(calib, meta=np.zeros((4, 3), np.float32), image=np.zeros((4, 8, 8, 1), np.float32))
    with pytest.raises(BadInputError, match="no array 'tokens' for the model's input 'tokens'"):
        convert_model(multi["model"], tmp_path / "o.tflite", calib=calib)


def test_random_stand_in_data_feeds_valid_ids(multi: dict[str, Path], tmp_path: Path) -> None:
    report = convert_model(multi["model"], tmp_path / "r.onnx", latency_runs=2).report
    assert "integer ids" in report["quality"]["data"] and report["quality"]["max_abs_error"] < 1e-4
