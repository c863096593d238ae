"""The Open Inference Protocol (KServe v2) over REST, driven by Triton's own client library
(``tritonclient.http``) against a real ``edgeship-agent run`` process: health, metadata,
readiness, inference with JSON tensors and with the binary tensor data extension, the
caller's mistakes answered 4xx and never counted against the model. Then, in process, a
catalogue of two models with serving version numbers and labels (TF Serving REST's
``/versions/N`` and ``/labels/L``, OIP's versions) and the bearer token on every path but
health."""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from agent_fixtures import AgentProcess, AgentRepo, agent_cli, wait_for, write_config

from edgeship.agent.oip import decode_infer
from edgeship.agent.runtimes import open_model
from edgeship.agent.servables import Servables
from edgeship.agent.server import ApiServer, load_access
from edgeship.agent.serving import LoadedModel

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (the dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"


class Agent:
    def __init__(self, process: AgentProcess, x: np.ndarray) -> None:
        self.process = process
        self.x = x.astype(np.float32)
        self.port = int(process.status()["server"].rsplit(":", 1)[1])
        self.url = f"127.0.0.1:{self.port}"
        self.client = httpclient.InferenceServerClient(url=self.url)
        meta = self.client.get_model_metadata("digits")
        self.input = meta["inputs"][0]["name"]
        self.output = meta["outputs"][0]["name"]

    def serving(self) -> dict[str, Any]:
        return dict(self.process.status()["serving"])

    def raw_infer(self, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(f"http://{self.url}/v2/models/digits/infer", data=body, headers=headers or {}, timeout=10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, agent_repo: AgentRepo) -> Iterator[Agent]:
    folder = tmp_path_factory.mktemp("oip")
    config = write_config(folder, agent_repo, window_s=0.3)
    result = agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config))
    assert result.returncode == 0, result.stderr
    process = AgentProcess(config)
    process.wait_serving()
    wait_for(lambda: process.status()["update"]["state"] == "COMMITTED" or None, 30, what="probation")
    found = Agent(process, agent_repo.eval_x)
    yield found
    found.client.close()
    process.stop()


def test_health_and_metadata_through_tritonclient(agent: Agent) -> None:
    client = agent.client
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "edgeship-agent" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits" and meta["versions"]
    assert meta["inputs"] == [{"name": agent.input, "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"][0]["datatype"] == "FP32" and meta["outputs"][0]["shape"] == [-1, 10]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_with_tritonclient_matches_tf_serving_rest(agent: Agent, binary: bool) -> None:
    x = agent.x[:3]
    expected = np.asarray(
        requests.post(f"http://{agent.url}/v1/models/digits:predict", json={"instances": x.tolist()}, timeout=10)
        .json()["predictions"]
    )
    tensor = httpclient.InferInput(agent.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    asked = httpclient.InferRequestedOutput(agent.output, binary_data=binary)
    result = agent.client.infer("digits", [tensor], outputs=[asked], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy(agent.output), expected, rtol=1e-6, atol=1e-6)
    assert result.get_response()["id"] == "r-1"
    # no outputs named: tritonclient asks for every output in binary
    result = agent.client.infer("digits", [tensor])
    np.testing.assert_allclose(result.as_numpy(agent.output), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_request_bodies_from_tritonclient_and_tf_serving_clients(agent: Agent, binary: bool) -> None:
    x = agent.x[:3]
    predict = f"http://{agent.url}/v1/models/digits:predict"
    expected = np.asarray(requests.post(predict, json={"instances": x.tolist()}, timeout=10).json()["predictions"])
    tensor = httpclient.InferInput(agent.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    for request, response in (("gzip", None), ("deflate", None), ("gzip", "gzip"), (None, "deflate")):
        result = agent.client.infer("digits", [tensor], request_compression_algorithm=request,
                                    response_compression_algorithm=response)
        np.testing.assert_allclose(result.as_numpy(agent.output), expected, rtol=1e-6, atol=1e-6)
    body = json.dumps({"instances": x.tolist()}).encode()
    for coding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                           ("deflate", _raw_deflate(body))):  # raw deflate, as some clients send it
        reply = requests.post(predict, data=packed, headers={"Content-Encoding": coding}, timeout=10)
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), expected, rtol=1e-6, atol=1e-6)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


def test_an_unread_coding_is_415_and_a_compression_bomb_is_400_never_the_models(agent: Agent) -> None:
    before = agent.serving()
    predict = f"http://{agent.url}/v1/models/digits:predict"
    body = json.dumps({"instances": agent.x[:1].tolist()}).encode()
    reply = requests.post(predict, data=body, headers={"Content-Encoding": "br"}, timeout=10)
    assert reply.status_code == 415 and "'br'" in reply.json()["error"]
    assert reply.headers["Accept-Encoding"] == "gzip, deflate"
    bomb = gzip.compress(b"[" * (64 << 20))  # 64 MiB in 64 kB: refused at max_body_bytes, never inflated whole
    for url in (predict, f"http://{agent.url}/v2/models/digits/infer"):
        reply = requests.post(url, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
        assert reply.status_code == 400 and "once decompressed" in reply.json()["error"], reply.text
    reply = requests.post(predict, data=gzip.compress(body)[:-9], headers={"Content-Encoding": "gzip"}, timeout=10)
    assert reply.status_code == 400 and "not complete gzip data" in reply.json()["error"]
    reply = requests.post(predict, data=body, headers={"Content-Encoding": "gzip"}, timeout=10)
    assert reply.status_code == 400 and "not gzip data" in reply.json()["error"]
    after = agent.serving()
    assert sum(v for k, v in after["errors"].items() if k != "bad_request") == sum(
        v for k, v in before["errors"].items() if k != "bad_request")
    assert requests.post(predict, data=body, timeout=10).status_code == 200


def _binary_body(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def _tensor(agent: Agent, shape: list[int], datatype: str = "FP32", **rest: Any) -> dict[str, Any]:
    return {"name": agent.input, "shape": shape, "datatype": datatype, **rest}


def test_callers_mistakes_are_4xx_and_never_count_against_the_model(agent: Agent) -> None:
    before = agent.serving()
    x = agent.x[:1]
    raw = x.tobytes()
    cases: list[tuple[bytes, dict[str, str], int, str]] = []

    def json_case(document: Any, status: int, words: str) -> None:
        cases.append((json.dumps(document).encode(), {}, status, words))

    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], data=[0.0] * 63)]}, 400, "64 values")
    json_case({"inputs": [_tensor(agent, [1, 8, 8], data=[0.0] * 64)]}, 400, "the model expects")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], "FP64", data=[0.0] * 64)]}, 400, "takes FP32")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], "BYTES", data=["a"] * 64)]}, 400, "not served")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], data=[None] * 64)]}, 400, "numbers only")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], data=[True] * 64)]}, 400, "true/false")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], data=["0.5"] * 64)]}, 400, "strings")
    json_case({"inputs": [_tensor(agent, [2000, 8, 8, 1], data=[0.0])]}, 400, "max_batch")
    json_case({"inputs": [_tensor(agent, [1, 8, 8, 1], data=[0.0] * 64)], "outputs": [{"name": "nope"}]}, 400, "no output named")
    json_case({"inputs": [{**_tensor(agent, [1, 8, 8, 1], data=[0.0] * 64), "name": "nope"}]}, 400, "no input named")
    json_case({"inputs": []}, 400, "non-empty")
    json_case([1, 2], 400, "JSON object")
    cases.append((b"{not json", {}, 400, "JSON"))
    # the binary extension: sizes that do not add up
    header = {"inputs": [_tensor(agent, [1, 8, 8, 1], parameters={"binary_data_size": len(raw) + 4})]}
    cases.append((*_binary_body(header, raw), 400, "runs past"))
    header = {"inputs": [_tensor(agent, [1, 8, 8, 1], parameters={"binary_data_size": len(raw) - 4})]}
    cases.append((*_binary_body(header, raw), 400, "needs 256"))
    header = {"inputs": [_tensor(agent, [1, 8, 8, 1], parameters={"binary_data_size": len(raw)})]}
    body, headers = _binary_body(header, raw + b"\0" * 8)
    cases.append((body, headers, 400, "follow the inputs"))
    body, headers = _binary_body(header, raw)
    cases.append((body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}, 400, "outside the body"))
    cases.append((body, {**headers, "Inference-Header-Content-Length": "-3"}, 400, "invalid"))
    header = {"inputs": [_tensor(agent, [1, 8, 8, 1], parameters={"binary_data_size": -1})]}
    cases.append((*_binary_body(header, raw), 400, "non-negative"))
    header = {"inputs": [_tensor(agent, [4096, 8, 8, 1], parameters={"binary_data_size": 4096 * 256})]}
    cases.append((*_binary_body(header, b"\0" * (4096 * 256)), 400, "max_batch"))
    for body, headers, status, words in cases:
        reply = agent.raw_infer(body, headers)
        assert reply.status_code == status and words in reply.json()["error"], (words, reply.text)
    reply = requests.post(f"http://{agent.url}/v2/models/other/infer", data=b"{}", timeout=10)
    assert reply.status_code == 404 and "other" in reply.json()["error"]
    reply = requests.get(f"http://{agent.url}/v2/models/digits/versions/999", timeout=10)
    assert reply.status_code == 404
    with pytest.raises(InferenceServerException) as caught:
        tensor = httpclient.InferInput(agent.input, [1, 8, 8, 1], "INT32")
        tensor.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.int32))
        agent.client.infer("digits", [tensor])
    assert caught.value.status() == "400"
    after = agent.serving()
    assert after["caller_errors"] - before["caller_errors"] >= len(cases)  # counted apart...
    assert sum(v for k, v in after["errors"].items() if k != "bad_request") == 0  # ...never the model's
    assert agent.process.status()["update"]["state"] == "COMMITTED"
    tensor = httpclient.InferInput(agent.input, [1, 8, 8, 1], "FP32")
    tensor.set_data_from_numpy(x)
    assert agent.client.infer("digits", [tensor]).as_numpy(agent.output).shape == (1, 10)


def test_an_oversized_binary_body_is_refused_before_it_is_read(agent: Agent) -> None:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: 10\r\n"
            b"Content-Length: 400000000\r\n\r\n{}"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and b"max_body_bytes" in answer


def test_status_names_the_protocols_it_serves(agent: Agent) -> None:
    names = [p["name"] for p in agent.process.status()["protocols"]]
    assert names[:2] == ["tfserving-rest", "oip-rest"] and "oip-grpc" not in names
    assert "serving protocols: tfserving-rest" in agent.process.log.read_text()


# -- in process: a catalogue of two models, versions and labels, access --------------------------

@pytest.fixture
def catalogue(digits_tflite: Path, digits_int8_tflite: Path) -> Servables:
    servables = Servables()
    digits = servables.ensure("digits")
    digits.serving.swap(LoadedModel("digits", "1.1.0", open_model(digits_int8_tflite), serving_version=4))
    digits.keep(LoadedModel("digits", "1.0.0", open_model(digits_tflite), serving_version=3))
    digits.set_label("stable", 3)
    digits.set_label("canary", 4)
    servables.ensure("other").serving.swap(LoadedModel("other", "7", open_model(digits_tflite), serving_version=1))
    return servables


def test_versions_and_labels_address_loaded_versions_over_both_rest_protocols(
    tmp_path: Path, catalogue: Servables
) -> None:
    server = ApiServer(catalogue, tmp_path, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    try:
        answers = {}
        for path in ("", "/versions/3", "/versions/4", "/versions/1.0.0", "/labels/stable", "/labels/canary"):
            reply = requests.post(f"{base}/v1/models/digits{path}:predict", json={"instances": x.tolist()}, timeout=10)
            assert reply.status_code == 200, (path, reply.text)
            answers[path] = np.asarray(reply.json()["predictions"])
        np.testing.assert_allclose(answers["/versions/3"], answers["/labels/stable"])
        np.testing.assert_allclose(answers["/versions/3"], answers["/versions/1.0.0"])
        np.testing.assert_allclose(answers["/versions/4"], answers[""])
        assert not np.allclose(answers["/versions/3"], answers["/versions/4"], atol=1e-7)  # fp32 vs int8
        status = requests.get(f"{base}/v1/models/digits", timeout=10).json()["model_version_status"]
        assert [s["version"] for s in status] == ["4", "3"] and {s["state"] for s in status} == {"AVAILABLE"}
        assert [s["version"] for s in requests.get(f"{base}/v1/models/digits/labels/stable", timeout=10)
                .json()["model_version_status"]] == ["3"]
        for path in ("/versions/5", "/labels/beta"):
            reply = requests.post(f"{base}/v1/models/digits{path}:predict", json={"instances": x.tolist()}, timeout=10)
            assert reply.status_code == 404 and "Servable not found" in reply.json()["error"]
        meta = requests.get(f"{base}/v1/models/digits/versions/3/metadata", timeout=10).json()
        assert meta["model_spec"]["version"] == "3"
        assert "serving_default" in meta["metadata"]["signature_def"]["signature_def"]
        reply = requests.post(f"{base}/v1/models/digits:predict",
                              json={"signature_name": "serve", "instances": x.tolist()}, timeout=10)
        assert reply.status_code == 400 and "serving_default" in reply.json()["error"]
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        assert client.get_model_metadata("digits")["versions"] == ["4", "3"]
        assert client.is_model_ready("digits", "3") and not client.is_model_ready("digits", "9")
        name = client.get_model_metadata("digits")["inputs"][0]["name"]
        tensor = httpclient.InferInput(name, [2, 8, 8, 1], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor], model_version="3")
        assert result.get_response()["model_version"] == "3"
        np.testing.assert_allclose(result.as_numpy(result.get_response()["outputs"][0]["name"]),
                                   answers["/versions/3"], rtol=1e-5, atol=1e-6)
        assert client.infer("other", [tensor]).get_response()["model_name"] == "other"
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert metrics.count("# TYPE edgeship_predict_requests_total counter") == 1
        assert 'model="other"' in metrics and 'model="digits"' in metrics
        client.close()
    finally:
        server.stop()


def test_the_bearer_token_guards_every_v2_path_but_health(tmp_path: Path, catalogue: Servables) -> None:
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    server = ApiServer(catalogue, tmp_path, port=0, access=load_access(token_file)).start()
    url = f"127.0.0.1:{server.port}"
    try:
        client = httpclient.InferenceServerClient(url=url)
        assert client.is_server_live() and client.is_server_ready()  # open, like /healthz
        for call in (lambda: client.get_server_metadata(), lambda: client.get_model_metadata("digits")):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == "401"
        assert not client.is_model_ready("digits")
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.is_model_ready("digits", headers=good)
        name = client.get_model_metadata("digits", headers=good)["inputs"][0]["name"]
        tensor = httpclient.InferInput(name, [1, 8, 8, 1], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("digits", [tensor], headers={"Authorization": "Bearer wrong"})
        assert caught.value.status() == "401"
        assert client.infer("digits", [tensor], headers=good).get_response()["model_name"] == "digits"
        client.close()
    finally:
        server.stop()


def test_decode_infer_reads_json_and_binary_tensors_alike(catalogue: Servables) -> None:
    from edgeship.agent.decoding import DecodeLimits

    model = catalogue.resolve("other")
    x = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1) / 64
    name = model.runner.signature.inputs[0].name
    as_json = decode_infer(json.dumps({"inputs": [{"name": name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                                   "data": x.ravel().tolist()}]}).encode(), None, model, DecodeLimits())
    header = json.dumps({"inputs": [{"name": name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}],
                         "parameters": {"binary_data_output": True}}).encode()
    as_binary = decode_infer(header + x.tobytes(), len(header), model, DecodeLimits())
    np.testing.assert_array_equal(as_json.inputs[0], as_binary.inputs[0])
    assert [o.binary for o in as_binary.outputs] == [True] and [o.binary for o in as_json.outputs] == [False]


@pytest.mark.parametrize(("line", "words"), [("grpc_port = 8501", "REST API's port"), ("grpc_port = 70000", "0-65535"),
                                             ('grpc_port = "8500"', "must be a int")])
def test_a_wrong_grpc_port_is_refused_with_one_line(tmp_path: Path, agent_repo: AgentRepo, line: str, words: str) -> None:
    from edgeship.agent.config import load_config
    from edgeship.ota.errors import BadInputError

    config = write_config(tmp_path, agent_repo, port=8501)
    config.write_text(config.read_text().replace("[server]\n", f"[server]\n{line}\n", 1))
    with pytest.raises(BadInputError, match=words):
        load_config(config)


@pytest.mark.parametrize(
    ("value", "status", "words"),
    [
        (str(2**70), 400, "float32"),  # orjson reads it as a float; json as an integer, which is refused
        ("1e20", 200, ""),  # a float literal that large is a float32 value
        ("NaN", 200, ""),  # orjson refuses NaN; json (and TF Serving) accept it
        ("123456789012345678901234567890.5", 200, ""),
    ],
)
def test_json_bodies_get_jsons_answer_whichever_parser_reads_them(
    tmp_path: Path, catalogue: Servables, value: str, status: int, words: str
) -> None:
    server = ApiServer(catalogue, tmp_path, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    row = "[" + ",".join([value] + ["0.5"] * 63) + "]"
    instances = "[" + ",".join(["[" + ",".join(["[" + row[1:-1].split(",")[i * 8 + j] + "]" for j in range(8)]) + "]"
                                for i in range(8)]) + "]"
    name = catalogue.resolve("other").runner.signature.inputs[0].name
    oip_body = f'{{"inputs": [{{"name": "{name}", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": {row}}}]}}'
    try:
        for path, body in (("/v1/models/other:predict", f'{{"instances": [{instances}]}}'),
                           ("/v2/models/other/infer", oip_body)):
            reply = requests.post(base + path, data=body.encode(), timeout=10)
            assert reply.status_code == status, (path, reply.text)
            assert words in reply.text
    finally:
        server.stop()


def test_grpc_port_without_grpcio_refuses_to_start_with_one_line(tmp_path: Path, agent_repo: AgentRepo) -> None:
    """A device configured for gRPC but installed without the extra must not come up
    silently serving REST only."""
    import subprocess
    import sys

    config = write_config(tmp_path, agent_repo)
    config.write_text(config.read_text().replace("[server]\n", "[server]\ngrpc_port = 0\n", 1))
    program = (
        "import sys; sys.modules['grpc'] = None; "  # as if grpcio were not installed
        "from edgeship.agent.cli import main; sys.argv = ['edgeship-agent', 'run', '--config', sys.argv[1]]; main()"
    )
    result = subprocess.run([sys.executable, "-c", program, str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install 'edgeship[grpc]'" in result.stderr and "Traceback" not in result.stderr


def test_a_model_exported_under_serve_answers_to_serve_and_serving_default(
    tmp_path: Path, digits_files: dict[str, Path]
) -> None:
    """Keras 3's ``model.export`` names its endpoint ``serve``; a TFLite converted under that
    key answers TF Serving clients that give ``signature_name: "serve"``."""
    import tensorflow as tf

    keras_model = tf.keras.models.load_model(digits_files["model"])
    keras_model.export(str(tmp_path / "saved"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"), signature_keys=["serve"])
    path = tmp_path / "serve.tflite"
    path.write_bytes(converter.convert())
    runner = open_model(path)
    assert runner.signature_name == "serve"
    servables = Servables()
    servables.ensure("digits").serving.swap(LoadedModel("digits", "1.0.0", runner, serving_version=2))
    server = ApiServer(servables, tmp_path, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    x = np.zeros((1, 8, 8, 1), np.float32).tolist()
    try:
        for name in ("serve", "serving_default", None):
            body: dict[str, Any] = {"instances": x} if name is None else {"signature_name": name, "instances": x}
            assert requests.post(f"{base}/v1/models/digits:predict", json=body, timeout=10).status_code == 200
        reply = requests.post(f"{base}/v1/models/digits:predict", json={"signature_name": "predict", "instances": x},
                              timeout=10)
        assert reply.status_code == 400 and "'serve'" in reply.json()["error"]
        meta = requests.get(f"{base}/v1/models/digits/metadata", timeout=10).json()
        assert set(meta["metadata"]["signature_def"]["signature_def"]) == {"serve", "serving_default"}
        assert meta["model_spec"]["version"] == "2"
    finally:
        server.stop()
