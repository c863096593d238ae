"""The TF Serving-compatible HTTP API, driven by a plain TF Serving-style client
(JSON over http.client keep-alive), and hot swaps under concurrent load."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_fixtures import TFServingClient

from edgeship.agent.runtimes import open_model
from edgeship.agent.server import ApiServer
from edgeship.agent.serving import LoadedModel, ServingModel, warm_up
from edgeship.agent.telemetry import TelemetryWindow
from edgeship.ota.protocol import TelemetryMessage


def loaded(path: Path, version: str) -> LoadedModel:
    runner = open_model(path)
    warm_up(runner)
    return LoadedModel("digits", version, runner)


@pytest.fixture
def api(tmp_path: Path, digits_tflite: Path) -> Iterator[tuple[ApiServer, ServingModel]]:
    serving = ServingModel()
    serving.swap(loaded(digits_tflite, "1.0.0"))
    server = ApiServer(serving, tmp_path, port=0).start()
    yield server, serving
    server.stop()


@pytest.fixture
def x(digits_files: dict[str, Path]) -> np.ndarray:
    return np.load(digits_files["eval"])["x"][:5].astype(np.float32)


def test_predict_row_and_columnar_forms_match_the_runtime(
    api, x: np.ndarray, digits_tflite: Path
) -> None:  # type: ignore[no-untyped-def]
    server, _ = api
    client = TFServingClient(server.host, server.port)
    with open_model(digits_tflite) as runner:
        (expected,) = runner.run([x])
    status, body = client.predict("digits", x.tolist())
    assert status == 200
    np.testing.assert_allclose(np.array(body["predictions"]), expected, atol=1e-6)
    status, body = client.request("POST", "/v1/models/digits:predict", {"inputs": x.tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"]), expected, atol=1e-6)
    name = server.servables.resolve("digits").runner.signature.inputs[0].name
    status, body = client.request(
        "POST",
        "/v1/models/digits/versions/1.0.0:predict",
        {"signature_name": "serving_default", "instances": [{name: x[0].tolist()}]},
    )
    assert status == 200 and len(body["predictions"]) == 1
    status, body = client.request(
        "POST", "/v1/models/digits:predict", {"inputs": {name: x[:2].tolist()}}
    )
    assert status == 200 and np.array(body["outputs"]).shape == (2, 10)
    client.close()


def test_int8_model_takes_and_returns_floats(
    tmp_path: Path, digits_int8_tflite: Path, x: np.ndarray
) -> None:
    serving = ServingModel()
    serving.swap(loaded(digits_int8_tflite, "2.0.0"))
    server = ApiServer(serving, tmp_path, port=0).start()
    try:
        client = TFServingClient(server.host, server.port)
        status, body = client.predict("digits", x.tolist())
        assert status == 200
        probs = np.array(body["predictions"])
        assert (
            probs.shape == (5, 10) and abs(probs.sum(axis=1) - 1).max() < 0.05
        )  # dequantized probabilities
        status, meta = client.request("GET", "/v1/models/digits/metadata")
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert [t["dtype"] for t in sig["inputs"].values()] == [
            "DT_FLOAT"
        ]  # int8 hidden from the caller
    finally:
        server.stop()


@pytest.mark.parametrize(
    "body, raw, words",
    [
        (None, b"{not json", "JSON Parse error"),
        ({"instances": [[1.0, 2.0]]}, None, "has shape [1, 2]"),
        ({"instances": [[[["a"]] * 8] * 8]}, None, "float32"),
        ({"instances": [[[[1.0]] * 8] * 8, [[[1.0]] * 7] * 8]}, None, "rectangular"),
        ({"instances": []}, None, "non-empty"),
        ({"rows": []}, None, "exactly one of 'instances'"),
        ({"instances": [[0.0]], "inputs": [[0.0]]}, None, "exactly one of"),
        ({"signature_name": "other", "instances": [[0.0]]}, None, "signature_name"),
        ([1, 2], None, "JSON object"),
        # hostile documents: a client error (400), never a 500 or a dropped connection
        (None, b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}", "JSON Parse error"),
        ({"instances": [[[[10**400]] * 1] * 8] * 8}, None, "float32"),
    ],
)
def test_bad_requests_get_400_in_tf_serving_error_format(api, body, raw, words: str) -> None:  # type: ignore[no-untyped-def]
    server, serving = api
    client = TFServingClient(server.host, server.port)
    status, reply = client.request("POST", "/v1/models/digits:predict", body, raw=raw)
    assert status == 400 and set(reply) == {"error"} and words in reply["error"], reply
    status, _ = client.predict(
        "digits", np.zeros((1, 8, 8, 1)).tolist()
    )  # the connection still works
    assert status == 200
    client.close()


def test_model_status_metadata_unknown_model_and_version(api) -> None:  # type: ignore[no-untyped-def]
    server, _ = api
    client = TFServingClient(server.host, server.port)
    status, body = client.request("GET", "/v1/models/digits")
    assert status == 200 and body["model_version_status"][0] == {
        "version": "1.0.0",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    status, body = client.request("GET", "/v1/models/digits/versions/1.0.0/metadata")
    assert status == 200 and body["model_spec"]["name"] == "digits"
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (spec,) = sig["inputs"].values()
    assert [d["size"] for d in spec["tensor_shape"]["dim"]] == ["-1", "8", "8", "1"]
    for path in ("/v1/models/other", "/v1/models/digits/versions/9"):
        status, body = client.request("GET", path)
        assert status == 404 and "Servable not found" in body["error"]
    status, body = client.predict("other", [[0.0]])
    assert status == 404
    status, body = client.request("GET", "/nope")
    assert status == 404
    client.close()


def test_healthz_metrics_feedback_and_telemetry(api, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    server, serving = api
    client = TFServingClient(server.host, server.port)
    window = TelemetryWindow(serving, server._httpd.data_dir)
    assert client.request("GET", "/healthz")[0] == 200
    for _ in range(3):
        assert client.predict("digits", x.tolist())[0] == 200
    assert client.request("POST", "/v1/models/digits:predict", {"instances": [[1.0]]})[0] == 400
    status, body = client.request(
        "POST", "/v1/models/digits:feedback", {"labels": [1, 2, 3], "predictions": [1, 2, 0]}
    )
    assert status == 200 and body == {"accepted": 3, "correct": 2}
    assert client.request("POST", "/v1/models/digits:feedback", {"labels": [1]})[0] == 400
    status, text = client.request("GET", "/metrics")
    assert status == 200
    assert 'edgeship_predict_requests_total{model="digits",version="1.0.0",serving_version="0"} 4' in text
    assert 'edgeship_predict_examples_total{model="digits",version="1.0.0",serving_version="0"} 15' in text
    assert 'kind="bad_request"} 1' in text
    assert 'edgeship_predict_latency_seconds_count{model="digits",version="1.0.0",serving_version="0"} 3' in text
    assert "process_resident_memory_bytes" in text and "edgeship_disk_free_bytes" in text
    classes = sum(
        int(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgeship_predict_class_total{")
    )
    assert classes == 15
    doc = window.take()
    message = TelemetryMessage.from_dict(doc)  # the fleet's schema accepts it
    # the fleet's counts are the model's own: the refused request is the caller's
    assert message.requests == 3 and message.errors == 0 and message.latency.count == 3
    assert doc["device_stats"]["caller_errors"] == 1
    assert message.feedback == {"correct": 2, "total": 3}
    assert (
        doc["device_stats"]["rss_bytes"] > 0 and sum(doc["device_stats"]["classes"].values()) == 15
    )
    assert TelemetryMessage.from_dict(window.take()).requests == 0  # windows do not overlap
    serving.swap(None)
    assert client.request("GET", "/healthz")[0] == 503
    assert client.predict("digits", x.tolist())[0] == 503
    client.close()


def test_hot_swaps_under_concurrent_load_fail_no_request(
    tmp_path: Path, digits_tflite: Path, digits_int8_tflite: Path, x: np.ndarray
) -> None:
    """4 keep-alive clients hammer the API while the model is swapped 60 times
    between two versions; every request succeeds and gets one model's answer."""
    models = {"1.0.0": digits_tflite, "2.0.0": digits_int8_tflite}
    expected = {}
    for version, path in models.items():
        with open_model(path) as runner:
            expected[version] = runner.run([x[:1]])[0][0]
    serving = ServingModel()
    serving.swap(loaded(digits_tflite, "1.0.0"))
    server = ApiServer(serving, tmp_path, port=0).start()
    stop = threading.Event()
    results: list[tuple[int, object]] = []
    lock = threading.Lock()

    def client_loop() -> None:
        client = TFServingClient(server.host, server.port)
        local = []
        while not stop.is_set():
            status, body = client.predict("digits", x[:1].tolist())
            local.append((status, body))
        client.close()
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(60):
            version = "2.0.0" if i % 2 == 0 else "1.0.0"
            new = loaded(models[version], version)  # loaded and warmed before the switch
            serving.swap(new)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop()
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert len(results) > 100
    for _, body in results:  # each answer is exactly one model's, never a mix or garbage
        got = np.array(body["predictions"][0])  # type: ignore[index]
        assert any(np.allclose(got, want, atol=1e-6) for want in expected.values())
    assert serving.swaps == 61


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    """Another process on [server] bind: `edgeship-agent run` says so in one line."""
    import socket

    from edgeship.ota.errors import EdgeshipError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(EdgeshipError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(\[server\] bind\)"):
            ApiServer(ServingModel(), tmp_path, "127.0.0.1", port)
    finally:
        taken.close()


def test_named_inputs_take_the_tf_serving_signature_key(api, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """A TF Serving client names inputs by the SavedModel signature's key ("image"); TF's
    TFLite converter names the tensor "serving_default_image:0". Both are accepted, and the
    metadata lists the input under its key with the tensor name as "name", as TF Serving does."""
    server, serving = api
    assert serving.current.runner.signature.inputs[0].name == "serving_default_image:0"  # precondition
    client = TFServingClient(server.host, server.port)
    status, columnar = client.request("POST", "/v1/models/digits:predict", {"inputs": {"image": x[:2].tolist()}})
    assert status == 200 and np.array(columnar["outputs"]).shape == (2, 10), columnar
    status, rows = client.request("POST", "/v1/models/digits:predict", {"instances": [{"image": x[0].tolist()}]})
    assert status == 200 and len(rows["predictions"]) == 1, rows
    np.testing.assert_allclose(rows["predictions"][0], columnar["outputs"][0], atol=1e-6)
    status, reply = client.request("POST", "/v1/models/digits:predict", {"inputs": {"images": x[:1].tolist()}})
    assert status == 400 and "image" in reply["error"]
    status, meta = client.request("GET", "/v1/models/digits/metadata")
    inputs = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert list(inputs) == ["image"] and inputs["image"]["name"] == "serving_default_image:0"
    client.close()


def test_chunked_request_body_is_read_and_the_connection_stays_usable(api, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """HTTP/1.1 clients may stream a body with Transfer-Encoding: chunked (TF Serving reads it)."""
    import http.client
    import json

    server, _ = api
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    body = json.dumps({"instances": x[:2].tolist()}).encode()
    conn.request("POST", "/v1/models/digits:predict", body=iter([body[:100], body[100:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    reply = json.loads(response.read())
    assert response.status == 200 and np.array(reply["predictions"]).shape == (2, 10), reply
    conn.request("POST", "/v1/models/digits:predict", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 2
    conn.close()


def test_an_internal_error_on_get_is_a_500_in_the_error_format(api, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A bug behind GET (e.g. a reading /metrics cannot take) answers 500 {"error"}, not a dropped connection."""
    from edgeship.agent import server as server_module

    def broken(*args: object) -> str:
        raise OSError("reading failed")

    monkeypatch.setattr(server_module, "render_prometheus", broken)
    server, _ = api
    client = TFServingClient(server.host, server.port)
    status, body = client.request("GET", "/metrics")
    assert status == 500 and "reading failed" in body["error"], body
    assert client.request("GET", "/v1/models/digits")[0] == 200  # the connection still works
    client.close()


def test_hostile_feedback_is_a_400(api) -> None:  # type: ignore[no-untyped-def]
    server, _ = api
    client = TFServingClient(server.host, server.port)
    for body in ({"labels": [1], "predictions": [[10**400, 1]]}, {"labels": [1], "predictions": [[[1, 2], [3]]]}):
        status, reply = client.request("POST", "/v1/models/digits:feedback", body)
        assert status == 400 and set(reply) == {"error"}, reply
    client.close()


@pytest.fixture(scope="module")
def two_output_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Keras model with two named outputs, converted by TF's TFLite converter."""
    import tensorflow as tf

    features = tf.keras.Input((4,), name="features")
    hidden = tf.keras.layers.Dense(8, activation="relu")(features)
    scores = tf.keras.layers.Dense(3, activation="softmax", name="scores")(hidden)
    value = tf.keras.layers.Dense(1, name="value")(hidden)
    model = tf.keras.Model(features, {"scores": scores, "value": value})
    path = tmp_path_factory.mktemp("two-outputs") / "two.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def test_a_multi_output_model_answers_under_its_signature_keys(tmp_path: Path, two_output_tflite: Path) -> None:
    """TF Serving answers a multi-output model under the SignatureDef's output keys; the
    TFLite file keeps that SignatureDef, so the agent does too (not under the tensor
    names, "StatefulPartitionedCall:0"), and its metadata lists the same keys."""
    runner = open_model(two_output_tflite)
    keys = sorted(s.key for s in runner.signature.outputs)
    assert keys == ["scores", "value"], runner.signature
    assert all(s.key != s.name for s in runner.signature.outputs)  # the tensor names differ from the keys
    x = np.random.default_rng(3).random((2, 4)).astype(np.float32)
    expected = dict(zip((s.key for s in runner.signature.outputs), runner.run([x])))
    serving = ServingModel()
    serving.swap(LoadedModel("two", "1", runner))
    server = ApiServer(serving, tmp_path, port=0).start()
    client = TFServingClient(server.host, server.port)
    try:
        status, rows = client.request("POST", "/v1/models/two:predict", {"instances": x.tolist()})
        assert status == 200, rows
        assert [sorted(r) for r in rows["predictions"]] == [["scores", "value"]] * 2
        np.testing.assert_allclose([r["scores"] for r in rows["predictions"]], expected["scores"], atol=1e-6)
        status, columns = client.request("POST", "/v1/models/two:predict", {"inputs": {"features": x.tolist()}})
        assert status == 200 and sorted(columns["outputs"]) == ["scores", "value"], columns
        np.testing.assert_allclose(columns["outputs"]["value"], expected["value"], atol=1e-6)
        status, meta = client.request("GET", "/v1/models/two/metadata")
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sorted(sig["outputs"]) == ["scores", "value"] and list(sig["inputs"]) == ["features"]
    finally:
        client.close()
        server.stop()


def _hostile_frames(x: np.ndarray) -> list[tuple[str, bytes]]:
    frame = json.dumps({"instances": x[:2].tolist()})
    return [
        ("/v1/models/digits:predict", frame.encode()),
        ("/v1/models/digits:predict", json.dumps({"inputs": x[:1].tolist()}).encode()),
        ("/v1/models/digits/versions/1.0.0:predict", frame.encode()),
        ("/v1/models/digits:predict", frame.replace("]]", "], 0.5]", 1).encode()),  # ragged
        ("/v1/models/digits:predict", frame.replace("[", "[NaN, ", 1).encode()),
        ("/v1/models/digits:predict", frame.replace("]", ", 16777217]", 1).encode()),  # lossy integer
        ("/v1/models/digits:predict", frame[:-1].encode()),  # cut short
        ("/v1/models/unknown:predict", frame.encode()),  # 404
        ("/v1/models/unknown:predict", frame[:-1].encode()),  # malformed first: 400, as before
        ("/v1/models/digits/versions/9:predict", frame.encode()),
        ("/v1/models/digits:predict", json.dumps({"instances": x[:5].tolist() * 300}).encode()),  # over max_batch
    ]


def test_a_frame_gets_the_same_answer_with_and_without_the_fast_path(
    api, x: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from edgeship.agent import decoding

    if decoding._simdjson is None:
        pytest.skip("pysimdjson is not installed: the exact path serves alone")
    server, serving = api
    client = TFServingClient(server.host, server.port)
    taken: list[bool] = []
    fast = decoding.decode_request_fast

    def counted(*args: object, **kwargs: object) -> object:
        found = fast(*args, **kwargs)  # type: ignore[arg-type]
        taken.append(found is not None)
        return found

    monkeypatch.setattr("edgeship.agent.server.decode_request_fast", counted)
    answers = [client.request("POST", path, raw=body) for path, body in _hostile_frames(x)]
    assert taken[:3] == [True, True, True] and not any(taken[3:])  # the frames took it, nothing else
    with_fast = serving.current.stats.snapshot()
    monkeypatch.setattr(decoding, "_simdjson", None)
    assert [client.request("POST", path, raw=body) for path, body in _hostile_frames(x)] == answers
    assert [status for status, _ in answers] == [200, 200, 200, 400, 400, 400, 400, 404, 400, 404, 400]
    without = serving.current.stats.snapshot()
    assert without["caller_errors"] == 2 * with_fast["caller_errors"] > 0 and without["model_errors"] == 0
    client.close()


def _deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


def _layers(data: bytes, count: int) -> bytes:
    for _ in range(count):
        data = gzip.compress(data)
    return data


_PLAIN = b'{"instances": [[1.0, 2.0]]}' * 10
CODINGS = [
    # (id, body, Content-Encoding values, the body read, or the words of the error)
    ("none", _PLAIN, [], _PLAIN),
    ("identity", _PLAIN, ["identity"], _PLAIN),
    ("gzip", gzip.compress(_PLAIN), ["gzip"], _PLAIN),
    ("x-gzip in capitals", gzip.compress(_PLAIN), ["X-GZIP"], _PLAIN),
    ("deflate, zlib's format", zlib.compress(_PLAIN), ["deflate"], _PLAIN),
    ("deflate, raw", _deflate_raw(_PLAIN), ["deflate"], _PLAIN),
    ("two codings, in the order applied", gzip.compress(zlib.compress(_PLAIN)), ["deflate, gzip"], _PLAIN),
    ("two header lines", gzip.compress(zlib.compress(_PLAIN)), ["deflate", "gzip"], _PLAIN),
    ("gzip with identity", gzip.compress(_PLAIN), ["gzip, identity"], _PLAIN),
    ("exactly the cap", gzip.compress(b"x" * 1000), ["gzip"], b"x" * 1000),
    ("br", _PLAIN, ["br"], "415:Content-Encoding 'br' is not read"),
    ("compress", _PLAIN, ["gzip, compress"], "415:Content-Encoding 'compress' is not read"),
    ("a bomb", gzip.compress(b"0" * 10_000_000), ["gzip"], "400:exceeds 1000 bytes once decompressed"),
    ("one byte over the cap", gzip.compress(b"x" * 1001), ["gzip"], "400:exceeds 1000 bytes once decompressed"),
    ("not gzip", _PLAIN, ["gzip"], "400:not gzip data"),
    ("not deflate", _PLAIN, ["deflate"], "400:not deflate data"),
    ("gzip cut short", gzip.compress(_PLAIN)[:-9], ["gzip"], "400:not complete gzip data"),
    ("garbage after the gzip stream", gzip.compress(_PLAIN) + b"tail", ["gzip"], "400:not complete gzip data"),
    ("empty body as gzip", b"", ["gzip"], "400:not complete gzip data"),
    ("four layers", _layers(_PLAIN, 4), ["gzip"] * 4, _PLAIN),
    ("five layers", _layers(_PLAIN, 5), ["gzip, gzip, gzip, gzip, gzip"], "400:5 content codings; at most 4"),
]


@pytest.mark.parametrize("raw, codings, expected", [c[1:] for c in CODINGS], ids=[c[0] for c in CODINGS])
def test_content_codings_are_undone_within_the_cap_or_refused(raw: bytes, codings: list[str], expected: object) -> None:
    from edgeship.agent.server import UnsupportedContentEncoding, content_decoded
    from edgeship.ota.errors import BadInputError

    if isinstance(expected, bytes):
        assert content_decoded(raw, codings, cap=1000 if len(expected) <= 1000 else len(expected)) == expected
        return
    status, words = str(expected).split(":", 1)
    with pytest.raises(BadInputError) as caught:
        content_decoded(raw, codings, cap=1000)
    assert isinstance(caught.value, UnsupportedContentEncoding) == (status == "415")
    assert words in caught.value.message
