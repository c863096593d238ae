"""Predict requests decoded as TensorFlow Serving decodes them (decoding.py): a table
of its documented and observed answers (tensorflow_serving/util/json_tensor.cc), and
integer inputs end to end on a real TFLite model with an int32 input (token ids
into an Embedding, converted by TensorFlow's converter)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_fixtures import TFServingClient

from edgeship.agent.decoding import DecodeLimits, PredictRequestError, decode_request
from edgeship.agent.runtimes import ModelSignature, TensorSpec, open_model
from edgeship.agent.server import ApiServer
from edgeship.agent.serving import LoadedModel, ServingModel

FLOAT = ModelSignature(inputs=(TensorSpec("x", (-1, 2), "float32"),), outputs=(TensorSpec("y", (-1, 1), "float32"),))
INT32 = ModelSignature(inputs=(TensorSpec("ids", (-1, 3), "int32"),), outputs=FLOAT.outputs)
INT8 = ModelSignature(inputs=(TensorSpec("q", (-1, 2), "int8"),), outputs=FLOAT.outputs)
UINT8 = ModelSignature(inputs=(TensorSpec("u", (-1, 2), "uint8"),), outputs=FLOAT.outputs)
INT64 = ModelSignature(inputs=(TensorSpec("l", (-1, 1), "int64"),), outputs=FLOAT.outputs)
BOOL = ModelSignature(inputs=(TensorSpec("mask", (-1, 2), "bool"),), outputs=FLOAT.outputs)
QUANT = ModelSignature(inputs=(TensorSpec("x", (-1, 2), "int8", scale=0.5, zero_point=1),), outputs=FLOAT.outputs)
TWO = ModelSignature(
    inputs=(TensorSpec("serving_default_ids:0", (-1, 3), "int32"), TensorSpec("serving_default_x:0", (-1, 2), "float32")),
    outputs=FLOAT.outputs,
)
STRING = ModelSignature(inputs=(TensorSpec("s", (-1,), "object"),), outputs=FLOAT.outputs)

OK = "ok"

# (signature, request document, expected: (dtype, shape) or words of the 400)
TABLE: list[tuple[str, ModelSignature, Any, Any]] = [
    # numbers into float tensors; TF Serving: "JSON Value: ... is not of expected type: float"
    ("row floats", FLOAT, {"instances": [[1.5, 2]]}, ("float32", (1, 2))),
    ("columnar floats", FLOAT, {"inputs": [[1.5, 2], [3, 4]]}, ("float32", (2, 2))),
    ("NaN and Infinity are numbers", FLOAT, {"instances": [[math.nan, math.inf]]}, ("float32", (1, 2))),
    ("null into float", FLOAT, {"instances": [[None, 1.0]]}, "numbers only"),
    ("true into float", FLOAT, {"instances": [[True, 1.0]]}, "true/false are not numbers"),
    ("all-bool row into float", FLOAT, {"instances": [[True, False]]}, "true/false are not numbers"),
    ("string '1.5' into float", FLOAT, {"instances": [["1.5", "2"]]}, "strings are not numbers"),
    ("b64 object into float", FLOAT, {"instances": [[{"b64": "AAAA"}, 1.0]]}, "numbers only"),
    ("beyond float32's range", FLOAT, {"instances": [[1e39, 1.0]]}, "beyond float32's range"),
    ("integer beyond 2**24 is lossy", FLOAT, {"instances": [[16777217, 1]]}, "loss of precision"),
    ("huge integer", FLOAT, {"instances": [[10**400, 1]]}, "numbers only"),
    # integers: JSON integers only (rapidjson's IsInt: 1.0 is a double)
    ("ints into int32", INT32, {"instances": [[1, 2, 3]]}, ("int32", (1, 3))),
    ("negative ints into int32", INT32, {"instances": [[-1, 0, 2**31 - 1]]}, ("int32", (1, 3))),
    ("1.7 into int32", INT32, {"instances": [[1.7, 2, 3]]}, "JSON integers only"),
    ("1.0 into int32", INT32, {"instances": [[1.0, 2, 3]]}, "JSON integers only"),
    ("2**31 into int32", INT32, {"instances": [[2**31, 2, 3]]}, "outside int32's range"),
    ("true into int32", INT32, {"instances": [[True, 2, 3]]}, "true/false are not numbers"),
    ("null into int32", INT32, {"instances": [[None, 2, 3]]}, "numbers only"),
    ("300 into int8", INT8, {"instances": [[300, 1]]}, "outside int8's range"),
    ("-1 into uint8", UINT8, {"instances": [[-1, 1]]}, "outside uint8's range"),
    ("255 into uint8", UINT8, {"instances": [[255, 0]]}, ("uint8", (1, 2))),
    ("2**40 into int64", INT64, {"instances": [[2**40]]}, ("int64", (1, 1))),
    ("2**63 into int64", INT64, {"instances": [[2**63]]}, "outside int64's range"),
    # quantized models take floats (the runtime quantizes)
    ("floats into a quantized input", QUANT, {"instances": [[0.5, 1.0]]}, ("float32", (1, 2))),
    # bools: true/false only
    ("bools into bool", BOOL, {"instances": [[True, False]]}, ("bool", (1, 2))),
    ("0/1 into bool", BOOL, {"instances": [[0, 1]]}, "true or false only"),
    # shapes: ragged, wrong depth, mismatched columns -- all before the model runs
    ("ragged rows", FLOAT, {"instances": [[1.0, 2.0], [3.0]]}, "rectangular"),
    ("scalar at the wrong level", FLOAT, {"instances": [1.0, 2.0]}, "has shape [2]"),
    ("too deep", FLOAT, {"instances": [[[1.0], [2.0]]]}, "has shape [1, 2, 1]"),
    ("wrong inner size", FLOAT, {"instances": [[1.0, 2.0, 3.0]]}, "has shape [1, 3]"),
    ("empty batch", FLOAT, {"inputs": []}, "empty batch"),
    (
        "columnar batches differ",
        TWO,
        {"inputs": {"ids": [[1, 2, 3]], "x": [[1.0, 2.0], [3.0, 4.0]]}},
        "different batch sizes",
    ),
    ("named rows", TWO, {"instances": [{"ids": [1, 2, 3], "x": [0.5, 1]}] * 2}, ("int32", (2, 3))),
    ("named rows, one ragged", TWO, {"instances": [{"ids": [1, 2, 3], "x": [0.5]}, {"ids": [1, 2, 3], "x": [0.5, 1]}]}, "rectangular"),
    ("named rows, float ids", TWO, {"instances": [{"ids": [1.0, 2, 3], "x": [0.5, 1]}]}, "JSON integers only"),
    ("strings are not served", STRING, {"instances": [{"b64": "aGk="}]}, "b64"),
    # limits, checked before anything is allocated
    ("over max_batch", FLOAT, {"instances": [[1.0, 2.0]] * 5}, "[limits] max_batch"),
    ("over max_tensor_bytes", FLOAT, {"inputs": [[1.0, 2.0]] * 4}, "[limits] max_tensor_bytes"),
]
LIMITS = DecodeLimits(max_batch=4, max_tensor_bytes=24)


@pytest.mark.parametrize("signature, document, expected", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_decoding_follows_tf_serving(signature: ModelSignature, document: Any, expected: Any) -> None:
    # the document goes through real JSON, as it does over HTTP (NaN/Infinity included)
    body = json.loads(json.dumps(document))
    if isinstance(expected, str):
        with pytest.raises(PredictRequestError) as info:
            decode_request(body, signature, LIMITS)
        assert expected in info.value.message and "\n" not in info.value.message
        return
    decoded = decode_request(body, signature, LIMITS)
    dtype, shape = expected
    assert (decoded.inputs[0].dtype.name, decoded.inputs[0].shape) == (dtype, shape)
    assert decoded.row == ("instances" in document)


def test_the_bool_hint_only_skips_work_never_a_refusal() -> None:
    body = json.loads('{"instances": [[1.0, true]]}')
    with pytest.raises(PredictRequestError, match="true/false"):
        decode_request(body, FLOAT, maybe_bools=True)
    # the HTTP layer only passes False when the body's bytes hold neither word
    assert decode_request(json.loads('{"instances": [[1.0, 2]]}'), FLOAT, maybe_bools=False).inputs[0].shape == (1, 2)


def test_values_survive_decoding_exactly() -> None:
    decoded = decode_request({"instances": [[-2147483648, 0, 2147483647]]}, INT32)
    assert decoded.inputs[0].tolist() == [[-2147483648, 0, 2147483647]]
    decoded = decode_request({"inputs": [[0.1, 16777215]]}, FLOAT)
    assert decoded.inputs[0].tolist() == [[np.float32(0.1), 16777215.0]]


# -- a real model with an int32 input --------------------------------------------------------
@pytest.fixture(scope="module")
def token_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ids``: int32 token ids -> Embedding -> class scores; ``mixed``: ids and float
    features, two inputs. Converted by TensorFlow's converter (seconds)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("token-models")
    ids = tf.keras.Input(shape=(6,), dtype="int32", name="ids")
    pooled = tf.keras.layers.GlobalAveragePooling1D()(tf.keras.layers.Embedding(50, 4)(ids))
    single = tf.keras.Model(ids, tf.keras.layers.Dense(3, activation="softmax")(pooled))
    feats = tf.keras.Input(shape=(2,), dtype="float32", name="x")
    ids2 = tf.keras.Input(shape=(6,), dtype="int32", name="ids")
    joined = tf.keras.layers.Concatenate()(
        [tf.keras.layers.GlobalAveragePooling1D()(tf.keras.layers.Embedding(50, 4)(ids2)), feats]
    )
    mixed = tf.keras.Model([ids2, feats], tf.keras.layers.Dense(3)(joined))
    paths = {}
    for name, model in (("ids", single), ("mixed", mixed)):
        paths[name] = out / f"{name}.tflite"
        paths[name].write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return paths


@pytest.fixture
def token_api(tmp_path: Path, token_models: dict[str, Path]) -> Iterator[tuple[ApiServer, ServingModel]]:
    serving = ServingModel()
    serving.swap(LoadedModel("tokens", "1", open_model(token_models["ids"])))
    server = ApiServer(serving, tmp_path, port=0).start()
    yield server, serving
    server.stop()


def test_int32_token_ids_are_served_end_to_end(token_api, token_models: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    server, serving = token_api
    signature = serving.current.runner.signature
    assert signature.inputs[0].dtype == "int32"
    ids = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 49]]
    client = TFServingClient(server.host, server.port)
    status, body = client.predict("tokens", ids)
    assert status == 200, body
    with open_model(token_models["ids"]) as runner:
        (expected,) = runner.run([np.asarray(ids, dtype=np.int32)])
    np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-6)
    status, meta = client.request("GET", "/v1/models/tokens/metadata")
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert [t["dtype"] for t in sig["inputs"].values()] == ["DT_INT32"]
    for bad, words in (
        ([[1.0, 2, 3, 4, 5, 6]], "JSON integers only"),
        ([[1.7, 2, 3, 4, 5, 6]], "JSON integers only"),
        ([[2**31, 2, 3, 4, 5, 6]], "outside int32's range"),
        ([[True, 2, 3, 4, 5, 6]], "true/false"),
        ([["1", 2, 3, 4, 5, 6]], "strings are not numbers"),
    ):
        status, reply = client.predict("tokens", bad)
        assert status == 400 and words in reply["error"], (bad, reply)
    snap = serving.current.stats.snapshot()
    assert snap["caller_errors"] == 5 and snap["model_errors"] == 0
    client.close()


def test_two_inputs_with_different_batches_are_a_400_not_the_models_error(tmp_path: Path, token_models: dict[str, Path]) -> None:
    serving = ServingModel()
    serving.swap(LoadedModel("mixed", "1", open_model(token_models["mixed"])))
    server = ApiServer(serving, tmp_path, port=0).start()
    try:
        client = TFServingClient(server.host, server.port)
        good = {"inputs": {"ids": [[1, 2, 3, 4, 5, 6]] * 2, "x": [[0.5, 1.0]] * 2}}
        status, body = client.request("POST", "/v1/models/mixed:predict", good)
        assert status == 200 and np.asarray(body["outputs"]).shape == (2, 3), body
        for _ in range(5):
            status, body = client.request(
                "POST", "/v1/models/mixed:predict", {"inputs": {"ids": [[1, 2, 3, 4, 5, 6]] * 2, "x": [[0.5, 1.0]] * 3}}
            )
            assert status == 400 and "different batch sizes" in body["error"], body
        snap = serving.current.stats.snapshot()
        assert snap["caller_errors"] == 5 and snap["model_errors"] == 0
        status, _ = client.request("POST", "/v1/models/mixed:predict", good)  # still serving
        assert status == 200
        client.close()
    finally:
        server.stop()


def test_an_out_of_vocabulary_token_id_is_the_callers_400(token_api) -> None:  # type: ignore[no-untyped-def]
    server, serving = token_api
    client = TFServingClient(server.host, server.port)
    status, reply = client.predict("tokens", [[999, 1, 2, 3, 4, 5]])  # the Embedding has 50 rows
    assert status == 400 and "out of range" in reply["error"], reply
    snap = serving.current.stats.snapshot()
    assert snap["caller_errors"] == 1 and snap["model_errors"] == 0
    status, _ = client.predict("tokens", [[1, 2, 3, 4, 5, 6]])
    assert status == 200
    client.close()


# -- the fast path (simdjson) against the exact path, body by body ------------------------------------
FRAME = ModelSignature(inputs=(TensorSpec("image", (-1, 4, 3, 2), "float32"),), outputs=FLOAT.outputs)
QUANT_FRAME = ModelSignature(
    inputs=(TensorSpec("image", (-1, 4, 3, 2), "int8", scale=0.5, zero_point=1),), outputs=FLOAT.outputs
)
_RNG = np.random.default_rng(7)
_FRAME_VALUES = _RNG.random((1, 4, 3, 2)).astype(np.float32)


def _frame_text(values: Any, key: str = "instances") -> bytes:
    return json.dumps({key: values}).encode()


def _with(values: np.ndarray, where: tuple[int, ...], token: str) -> bytes:
    """The frame's JSON with one value's text replaced by ``token`` (a raw JSON token)."""
    nested = values.tolist()
    marker = 123456.25
    target = nested
    for i in where[:-1]:
        target = target[i]
    target[where[-1]] = marker
    return _frame_text(nested).replace(b"123456.25", token.encode())


# (name, body, signature, whether the fast path must take it)
FAST_TABLE: list[tuple[str, bytes, ModelSignature, bool]] = [
    ("a frame, row format", _frame_text(_FRAME_VALUES.tolist()), FRAME, True),
    ("a frame, columnar", _frame_text(_FRAME_VALUES.tolist(), "inputs"), FRAME, True),
    ("a batch of 3", _frame_text(np.repeat(_FRAME_VALUES, 3, axis=0).tolist()), FRAME, True),
    ("compact separators", json.dumps({"instances": _FRAME_VALUES.tolist()}, separators=(",", ":")).encode(), FRAME, True),
    ("whitespace everywhere", b' \r\n{ "instances" :\t' + json.dumps(_FRAME_VALUES.tolist(), indent=1).encode() + b"\n}\n", FRAME, True),
    ("a quantized input takes floats", _frame_text(_FRAME_VALUES.tolist()), QUANT_FRAME, True),
    ("integers only", _frame_text((_FRAME_VALUES * 255).astype(int).tolist()), FRAME, True),
    ("pixels 0-255 with exponents", _with(_FRAME_VALUES * 255, (0, 1, 1, 1), "2.55E2"), FRAME, True),
    ("-0 (an integer: +0.0)", _with(_FRAME_VALUES, (0, 0, 0, 0), "-0"), FRAME, True),
    ("-0.0 keeps its sign", _with(_FRAME_VALUES, (0, 0, 0, 0), "-0.0"), FRAME, True),
    ("-0e0", _with(_FRAME_VALUES, (0, 0, 0, 1), "-0e0"), FRAME, True),
    ("a long mantissa", _with(_FRAME_VALUES, (0, 2, 1, 0), "0.1000000000000000055511151231257827021181583404541015625"), FRAME, True),
    ("a subnormal", _with(_FRAME_VALUES, (0, 2, 1, 0), "4.9e-324"), FRAME, True),
    ("an underflow to zero", _with(_FRAME_VALUES, (0, 2, 1, 0), "1e-400"), FRAME, True),
    ("2**24 - 1, the largest exact integer", _with(_FRAME_VALUES, (0, 3, 2, 1), "16777215"), FRAME, True),
    # everything else: the exact path answers (values or the 400)
    ("2**24 (an integer the exact path refuses)", _with(_FRAME_VALUES, (0, 3, 2, 1), "16777216"), FRAME, False),
    ("2**24 written as a float", _with(_FRAME_VALUES, (0, 3, 2, 1), "16777216.0"), FRAME, False),
    ("2**24 + 1, an integer beyond it", _with(_FRAME_VALUES, (0, 3, 2, 1), "16777217"), FRAME, False),
    ("a float beyond 2**24", _with(_FRAME_VALUES, (0, 3, 2, 1), "16777217.5"), FRAME, False),
    ("beyond float32's range", _with(_FRAME_VALUES, (0, 0, 0, 0), "1e39"), FRAME, False),
    ("a huge exponent", _with(_FRAME_VALUES, (0, 0, 0, 0), "1e400"), FRAME, False),
    ("an integer beyond 64 bits", _with(_FRAME_VALUES, (0, 0, 0, 0), "123456789012345678901234567890"), FRAME, False),
    ("2**64 - 1", _with(_FRAME_VALUES, (0, 0, 0, 0), "18446744073709551615"), FRAME, False),
    ("NaN", _with(_FRAME_VALUES, (0, 1, 0, 0), "NaN"), FRAME, False),
    ("Infinity", _with(_FRAME_VALUES, (0, 1, 0, 0), "-Infinity"), FRAME, False),
    ("null", _with(_FRAME_VALUES, (0, 1, 0, 0), "null"), FRAME, False),
    ("true", _with(_FRAME_VALUES, (0, 1, 0, 0), "true"), FRAME, False),
    ("a string", _with(_FRAME_VALUES, (0, 1, 0, 0), '"0.5"'), FRAME, False),
    ("a string of digits", _with(_FRAME_VALUES, (0, 1, 0, 0), '"5"'), FRAME, False),
    ("a b64 object", _with(_FRAME_VALUES, (0, 1, 0, 0), '{"b64": "AAAA"}'), FRAME, False),
    ("a nested object", _with(_FRAME_VALUES, (0, 1, 0, 0), '{"1": 2}'), FRAME, False),
    ("a number where a row goes", _with(_FRAME_VALUES, (0, 1, 0), "0.5"), FRAME, False),
    ("a row where a number goes", _with(_FRAME_VALUES, (0, 1, 0, 0), "[0.5, 0.5]"), FRAME, False),
    ("ragged: a short row", _with(_FRAME_VALUES, (0, 1, 0), "[0.5]"), FRAME, False),
    ("ragged: a long row", _with(_FRAME_VALUES, (0, 1, 0), "[0.5, 0.5, 0.5]"), FRAME, False),
    ("ragged rows that add up", _frame_text([[[[0.5] * 3, [0.5]] + [[0.5, 0.5]] * 2] * 4]), FRAME, False),
    ("a missing value", _with(_FRAME_VALUES, (0, 1, 0), "[0.5, ]"), FRAME, False),
    ("a leading zero", _with(_FRAME_VALUES, (0, 1, 0, 0), "01"), FRAME, False),
    ("a trailing dot", _with(_FRAME_VALUES, (0, 1, 0, 0), "1."), FRAME, False),
    ("a plus sign", _with(_FRAME_VALUES, (0, 1, 0, 0), "+1"), FRAME, False),
    ("two numbers in a slot", _with(_FRAME_VALUES, (0, 1, 0, 0), "1 2"), FRAME, False),
    ("wrong inner shape", _frame_text(np.zeros((1, 4, 2, 3)).tolist()), FRAME, False),
    ("too deep", _frame_text(np.zeros((1, 1, 4, 3, 2)).tolist()), FRAME, False),
    ("a scalar instance", _frame_text([0.5]), FRAME, False),
    ("empty batch", _frame_text([]), FRAME, False),
    ("over max_batch", _frame_text(np.zeros((5, 4, 3, 2)).tolist()), FRAME, False),
    ("a second key", json.dumps({"instances": _FRAME_VALUES.tolist(), "signature_name": "x"}).encode(), FRAME, False),
    ("the key twice", b'{"instances": [], ' + _frame_text(_FRAME_VALUES.tolist())[1:], FRAME, False),
    ("both keys", json.dumps({"instances": _FRAME_VALUES.tolist(), "inputs": _FRAME_VALUES.tolist()}).encode(), FRAME, False),
    ("a key with a digit", _frame_text(_FRAME_VALUES.tolist(), "insta1nces"), FRAME, False),
    ("a key with a space", _frame_text(_FRAME_VALUES.tolist(), "inst ances"), FRAME, False),
    ("an escaped key", _frame_text(_FRAME_VALUES.tolist()).replace(b"instances", b"instance\\u0073"), FRAME, False),
    ("named instances", _frame_text([{"image": _FRAME_VALUES[0].tolist()}]), FRAME, False),
    ("trailing garbage", _frame_text(_FRAME_VALUES.tolist()) + b" x", FRAME, False),
    ("a BOM", b"\xef\xbb\xbf" + _frame_text(_FRAME_VALUES.tolist()), FRAME, False),
    ("not JSON", b"[" * 5000, FRAME, False),
    ("an int32 input (exact integers)", _frame_text([[1, 2, 3]]), INT32, False),
    ("an int64 input beyond 2**53", _frame_text([[2**53 + 1]]), INT64, False),
    ("a bool input", _frame_text([[True, False]]), BOOL, False),
    ("two inputs", _frame_text({"ids": [1, 2, 3], "x": [0.5, 1]}, "inputs"), TWO, False),
    ("a dynamic inner dimension", _frame_text([[[0.5, 0.5]]]), ModelSignature(
        inputs=(TensorSpec("x", (-1, -1, 2), "float32"),), outputs=FLOAT.outputs), False),
]
FAST_LIMITS = DecodeLimits(max_batch=4, max_tensor_bytes=1 << 20)


def _exact(raw: bytes, signature: ModelSignature) -> Any:
    """The exact path as the server runs it: loads_json (orjson, json where it refuses or
    where a number could differ), then decode_request; a 400's message."""
    from edgeship.agent.decoding import InexactParseError, loads_json

    try:
        body, exact = loads_json(raw)
        try:
            return decode_request(body, signature, FAST_LIMITS, exact_integers=exact)
        except InexactParseError:
            return decode_request(loads_json(raw, exact=True)[0], signature, FAST_LIMITS)
    except PredictRequestError as exc:
        return exc.message


@pytest.mark.parametrize("raw, signature, taken", [row[1:] for row in FAST_TABLE], ids=[row[0] for row in FAST_TABLE])
def test_the_fast_path_answers_exactly_what_the_exact_path_answers(raw: bytes, signature: ModelSignature, taken: bool) -> None:
    from edgeship.agent import decoding

    if decoding._simdjson is None:
        pytest.skip("pysimdjson is not installed: the exact path serves alone")
    fast = decoding.decode_request_fast(raw, signature, FAST_LIMITS)
    exact = _exact(raw, signature)
    assert (fast is not None) == taken, exact
    if fast is None:
        return
    assert not isinstance(exact, str), exact  # the exact path accepts what the fast path takes
    assert fast.row == exact.row
    (mine,), (theirs,) = fast.inputs, exact.inputs
    assert mine.dtype == theirs.dtype == np.float32 and mine.shape == theirs.shape
    assert mine.view(np.uint32).tolist() == theirs.view(np.uint32).tolist()  # bit for bit (-0.0 too)


def test_every_float_frame_of_random_values_takes_the_fast_path_with_equal_bits() -> None:
    from edgeship.agent import decoding

    if decoding._simdjson is None:
        pytest.skip("pysimdjson is not installed: the exact path serves alone")
    rng = np.random.default_rng(0)
    for scale in (1.0, 255.0, 1e-30, 1e6):
        values = (rng.standard_normal((2, 4, 3, 2)) * scale).astype(np.float64)
        for text in (json.dumps({"instances": values.tolist()}), json.dumps({"instances": values.astype(np.float32).tolist()})):
            fast = decoding.decode_request_fast(text.encode(), FRAME, FAST_LIMITS)
            exact = _exact(text.encode(), FRAME)
            assert fast is not None
            assert fast.inputs[0].view(np.uint32).tolist() == exact.inputs[0].view(np.uint32).tolist()


def test_without_simdjson_the_exact_path_serves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.agent import decoding

    monkeypatch.setattr(decoding, "_simdjson", None)
    assert decoding.decode_request_fast(_frame_text(_FRAME_VALUES.tolist()), FRAME, FAST_LIMITS) is None
