"""The gRPC front ends, driven by the client libraries applications use: Triton's
``tritonclient.grpc`` (OIP v2 ``inference.GRPCInferenceService``) and
``tensorflow-serving-api``'s stubs (``tensorflow.serving.PredictionService`` Predict and
GetModelMetadata, ``ModelService`` GetModelStatus) against a real ``edgeship-agent run``
process with ``[server] grpc_port``; the caller's mistakes are INVALID_ARGUMENT / NOT_FOUND
and never count against the model; a bearer token and client certificates guard them like
the REST API. The checked-in message modules are what the .proto files generate, and their
fields are those of the client libraries' own messages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from agent_fixtures import AgentProcess, AgentRepo, agent_cli, wait_for, write_config

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'edgeship[grpc]')")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (the dev extra)")
pytest.importorskip("tensorflow_serving.apis", reason="tensorflow-serving-api is not installed (make installs it)")

from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgeship.agent.grpc_server import GrpcServer  # noqa: E402
from edgeship.agent.runtimes import open_model  # noqa: E402
from edgeship.agent.servables import Servables  # noqa: E402
from edgeship.agent.serving import LoadedModel  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"
PROTOS = Path(__file__).resolve().parents[1] / "device-agent" / "agent" / "protos"


def _tensor_proto(x: np.ndarray, dtype: int = 1) -> Any:
    """A TensorProto as TensorFlow's make_tensor_proto writes one for a numpy array."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    return tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in x.shape]),
        tensor_content=x.tobytes(),
    )


class Agent:
    def __init__(self, process: AgentProcess, x: np.ndarray) -> None:
        self.process = process
        self.x = x.astype(np.float32)
        status = process.status()
        grpc_address = next(p["address"] for p in status["protocols"] if p["name"] == "oip-grpc")
        self.grpc_port = int(re.search(r":(\d+) ", grpc_address).group(1))  # type: ignore[union-attr]
        self.rest = status["server"]
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.triton = grpcclient.InferenceServerClient(url=self.target)
        self.channel = grpc.insecure_channel(self.target)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        meta = self.triton.get_model_metadata("digits", as_json=True)
        self.input = meta["inputs"][0]["name"]
        self.output = meta["outputs"][0]["name"]

    def serving(self) -> dict[str, Any]:
        return dict(self.process.status()["serving"])

    def expected(self, x: np.ndarray) -> np.ndarray:
        reply = requests.post(f"{self.rest}/v1/models/digits:predict", json={"instances": x.tolist()}, timeout=10)
        return np.asarray(reply.json()["predictions"], dtype=np.float32)

    def predict_request(self, x: np.ndarray, **spec: Any) -> Any:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = spec.pop("name", "digits")
        for key, value in spec.items():
            if key == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, key, value)
        request.inputs[self.input].CopyFrom(_tensor_proto(x))
        return request


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, agent_repo: AgentRepo) -> Iterator[Agent]:
    folder = tmp_path_factory.mktemp("grpc")
    config = write_config(folder, agent_repo, window_s=0.3)
    config.write_text(config.read_text().replace("[server]\n", "[server]\ngrpc_port = 0\n", 1))
    result = agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config))
    assert result.returncode == 0, result.stderr
    process = AgentProcess(config)
    process.wait_serving()
    wait_for(lambda: process.status()["update"]["state"] == "COMMITTED" or None, 30, what="probation")
    found = Agent(process, agent_repo.eval_x)
    yield found
    found.triton.close()
    found.channel.close()
    process.stop()


def test_oip_grpc_health_metadata_and_infer_through_tritonclient(agent: Agent) -> None:
    client = agent.triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == ["-1", "8", "8", "1"]
    x = agent.x[:3]
    tensor = grpcclient.InferInput(agent.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput(agent.output)], request_id="g-1")
    np.testing.assert_allclose(result.as_numpy(agent.output), agent.expected(x), rtol=1e-6, atol=1e-6)
    assert result.get_response().id == "g-1"


def test_compressed_requests_are_served_and_a_compression_bomb_is_refused(agent: Agent) -> None:
    x = agent.x[:3]
    tensor = grpcclient.InferInput(agent.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):  # tritonclient's own option, as an application sets it
        result = agent.triton.infer("digits", [tensor], compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy(agent.output), agent.expected(x), rtol=1e-6, atol=1e-6)
    # 64 MiB of zeros gzip to about 64 kB: over max_body_bytes once decompressed, refused before it is parsed
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    bomb = service_pb2.ModelInferRequest(model_name="digits", raw_input_contents=[bytes(64 << 20)])
    bomb.inputs.add(name=agent.input, datatype="FP32", shape=[(64 << 20) // 256, 8, 8, 1])
    with grpc.insecure_channel(agent.target, options=[("grpc.max_send_message_length", 128 << 20)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        found, details = _code(lambda: stub.ModelInfer(bomb, timeout=30, compression=grpc.Compression.Gzip))
    assert found == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    result = agent.triton.infer("digits", [tensor])
    np.testing.assert_allclose(result.as_numpy(agent.output), agent.expected(x), rtol=1e-6, atol=1e-6)


def test_tensorflows_own_tensor_protos_in_and_out(agent: Agent) -> None:
    """The TF Serving client's usual code: ``tf.make_tensor_proto`` in, ``tf.make_ndarray`` out."""
    import tensorflow as tf

    x = agent.x[:2]
    for proto, expected in (
        (tf.make_tensor_proto(x), agent.expected(x)),  # tensor_content
        (tf.make_tensor_proto(x.tolist(), dtype=tf.float32), agent.expected(x)),  # from a nested list
        (tf.make_tensor_proto(0.25, shape=[1, 8, 8, 1]), agent.expected(np.full((1, 8, 8, 1), 0.25, np.float32))),  # one value broadcast
    ):
        request = agent.predict_request(x)
        request.inputs[agent.input].CopyFrom(proto)
        response = agent.predictions.Predict(request, timeout=10)
        y = tf.make_ndarray(next(iter(response.outputs.values())))
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    request = agent.predict_request(x)
    request.inputs[agent.input].CopyFrom(tf.make_tensor_proto(x.astype(np.float64)))  # DT_DOUBLE for a float model
    found, details = _code(lambda: agent.predictions.Predict(request, timeout=10))
    assert found == grpc.StatusCode.INVALID_ARGUMENT and "DT_FLOAT" in details


def test_tf_serving_predict_metadata_and_status_through_its_stubs(agent: Agent) -> None:
    x = agent.x[:2]
    response = agent.predictions.Predict(agent.predict_request(x), timeout=10)
    (key,) = response.outputs.keys()
    out = response.outputs[key]
    y = np.frombuffer(out.tensor_content, dtype=np.float32).reshape([d.size for d in out.tensor_shape.dim])
    np.testing.assert_allclose(y, agent.expected(x), rtol=1e-6, atol=1e-6)
    assert response.model_spec.name == "digits"
    # a TensorProto of typed values (float_val), one value broadcast as TensorFlow allows
    request = agent.predict_request(x)
    request.inputs[agent.input].ClearField("tensor_content")
    request.inputs[agent.input].float_val.append(0.25)
    response = agent.predictions.Predict(request, timeout=10)
    assert np.frombuffer(response.outputs[key].tensor_content, np.float32).shape == (20,)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    meta = agent.predictions.GetModelMetadata(request, timeout=10)
    from tensorflow_serving.apis import get_model_metadata_pb2 as gmm

    signatures = gmm.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(signatures)  # the client's own type unpacks it
    inputs = signatures.signature_def["serving_default"].inputs
    assert [d.size for d in inputs[agent.input].tensor_shape.dim] == [-1, 8, 8, 1] and inputs[agent.input].dtype == 1
    status = model_service_pb2_grpc.ModelServiceStub(agent.channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "digits"}), timeout=10
    )
    assert [s.state for s in status.model_version_status] == [30]  # AVAILABLE


def _code(call: Any) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_callers_mistakes_are_invalid_argument_or_not_found_and_never_the_models(agent: Agent) -> None:
    before = agent.serving()
    x = agent.x[:1]
    stub = agent.predictions
    cases: list[tuple[Any, Any, str]] = []
    bad = agent.predict_request(x)
    bad.inputs[agent.input].CopyFrom(_tensor_proto(x.astype(np.float64), dtype=2))
    cases.append((lambda: stub.Predict(bad, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "DT_FLOAT"))
    shape = agent.predict_request(x.reshape(1, 8, 8))
    cases.append((lambda: stub.Predict(shape, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "the model expects"))
    short = agent.predict_request(x)
    short.inputs[agent.input].tensor_content = x.tobytes()[:-4]
    cases.append((lambda: stub.Predict(short, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "needs 256"))
    big = agent.predict_request(np.zeros((2048, 8, 8, 1), np.float32))
    cases.append((lambda: stub.Predict(big, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "max_batch"))
    named = agent.predict_request(x)
    named.inputs["nope"].CopyFrom(named.inputs.pop(agent.input))
    cases.append((lambda: stub.Predict(named, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "no input named"))
    signature = agent.predict_request(x, signature_name="classify")
    cases.append((lambda: stub.Predict(signature, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "signature_name"))
    for call, code, words in cases:
        found, details = _code(call)
        assert found == code and words in details, (words, found, details)
    for request in (agent.predict_request(x, name="other"), agent.predict_request(x, version=99),
                    agent.predict_request(x, version_label="beta")):
        found, details = _code(lambda r=request: stub.Predict(r, timeout=10))
        assert found == grpc.StatusCode.NOT_FOUND and "Servable not found" in details
    # OIP over gRPC: a wrong datatype, raw bytes that do not add up, an unknown model
    for datatype, data, words in (("FP64", np.zeros((1, 8, 8, 1)), "takes FP32"),
                                  ("FP32", np.zeros((1, 8, 8, 2), np.float32), "the model expects")):
        tensor = grpcclient.InferInput(agent.input, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as caught:
            agent.triton.infer("digits", [tensor])
        assert "INVALID_ARGUMENT" in caught.value.status() and words in caught.value.message()
    tensor = grpcclient.InferInput(agent.input, [1, 8, 8, 1], "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as caught:
        agent.triton.infer("other", [tensor])
    assert "NOT_FOUND" in caught.value.status()
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    raw = service_pb2.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()[:100]])
    raw.inputs.add(name=agent.input, datatype="FP32", shape=[1, 8, 8, 1])
    found, details = _code(lambda: service_pb2_grpc.GRPCInferenceServiceStub(agent.channel).ModelInfer(raw, timeout=10))
    assert found == grpc.StatusCode.INVALID_ARGUMENT and "100 bytes" in details
    oversized = agent.predict_request(np.zeros((1024, 64, 64, 1), np.float32))  # 16 MiB: over max_body_bytes
    found, _ = _code(lambda: stub.Predict(oversized, timeout=10))
    assert found == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = agent.serving()
    assert after["caller_errors"] > before["caller_errors"]
    assert sum(v for k, v in after["errors"].items() if k != "bad_request") == 0
    assert agent.process.status()["update"]["state"] == "COMMITTED"
    assert agent.predictions.Predict(agent.predict_request(x), timeout=10).outputs


def test_bytes_that_are_not_the_message_are_invalid_argument_and_never_the_models(agent: Agent) -> None:
    before = agent.serving()
    good = agent.predict_request(agent.x[:1]).SerializeToString()
    for method in ("/inference.GRPCInferenceService/ModelInfer", "/tensorflow.serving.PredictionService/Predict",
                   "/tensorflow.serving.PredictionService/GetModelMetadata", "/inference.GRPCInferenceService/ModelReady"):
        call = agent.channel.unary_unary(method)
        for body in (b"\xff\xff\xff\xff", good[: len(good) // 2], b"\x0a\x05ab"):  # garbage, cut short, a length past the end
            found, details = _code(lambda c=call, b=body: c(b, timeout=10))
            assert found == grpc.StatusCode.INVALID_ARGUMENT and "are not a" in details, (method, body[:8], found, details)
    after = agent.serving()
    assert sum(v for k, v in after["errors"].items() if k != "bad_request") == sum(
        v for k, v in before["errors"].items() if k != "bad_request")
    assert agent.predictions.Predict(agent.predict_request(agent.x[:1]), timeout=10).outputs


def test_status_and_log_name_the_grpc_protocols(agent: Agent) -> None:
    names = [p["name"] for p in agent.process.status()["protocols"]]
    assert names == ["tfserving-rest", "oip-rest", "oip-grpc", "tfserving-grpc"]
    assert "oip-grpc grpc://127.0.0.1:" in agent.process.log.read_text()


# -- in process: access rules ---------------------------------------------------------------------

@pytest.fixture
def catalogue(digits_tflite: Path) -> Servables:
    servables = Servables()
    servables.ensure("digits").serving.swap(LoadedModel("digits", "1.0.0", open_model(digits_tflite), serving_version=3))
    return servables


def test_a_bearer_token_guards_every_rpc_but_health(catalogue: Servables) -> None:
    server = GrpcServer(catalogue, port=0, token=TOKEN).start()
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        for headers in ({}, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("digits", headers=headers)
            assert "UNAUTHENTICATED" in caught.value.status()
        good = {"authorization": f"Bearer {TOKEN}"}
        meta = client.get_model_metadata("digits", headers=good, as_json=True)
        assert meta["versions"] == ["3"]
        tensor = grpcclient.InferInput(meta["inputs"][0]["name"], [1, 8, 8, 1], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.float32))
        assert client.infer("digits", [tensor], headers=good).get_response().model_version == "3"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "digits"
            found, _ = _code(lambda: prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10))
            assert found == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()
        server.stop()


def test_tls_with_client_certificates_refuses_a_client_without_one(tmp_path: Path, catalogue: Servables) -> None:
    from test_agent_access import _ca_and_certs

    pki = _ca_and_certs(tmp_path)
    server = GrpcServer(catalogue, port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                        tls_client_ca=pki["ca"]).start()
    target = f"127.0.0.1:{server.port}"
    try:
        good = grpcclient.InferenceServerClient(
            url=target, ssl=True, root_certificates=str(pki["ca"]), private_key=str(pki["client_key"]),
            certificate_chain=str(pki["client_cert"]),
        )
        assert good.is_model_ready("digits")
        good.close()
        anonymous = grpcclient.InferenceServerClient(url=target, ssl=True, root_certificates=str(pki["ca"]))
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live(client_timeout=5)
        anonymous.close()
    finally:
        server.stop()


# -- the message modules ----------------------------------------------------------------------------

def test_checked_in_message_modules_are_what_the_protos_generate(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the dev extra)")
    import subprocess
    import sys

    # in a process of its own: protoc's extension next to TensorFlow's in one process crashes
    subprocess.run([sys.executable, str(PROTOS / "generate.py"), str(tmp_path)], check=True, timeout=120)
    for generated in sorted(tmp_path.iterdir()):
        assert generated.read_bytes() == (PROTOS / generated.name).read_bytes(), f"{generated.name}: run `make protos`"


def _fields(descriptor: Any) -> dict[str, tuple[int, int, bool]]:
    """Field name -> (number, wire-relevant type, repeated); enums read as int32 (one varint)."""
    enum, int32 = 14, 5
    return {f.name: (f.number, int32 if f.type == enum else f.type, f.is_repeated) for f in descriptor.fields}


def test_message_fields_match_the_client_libraries_own() -> None:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import model_pb2
    from tritonclient.grpc import service_pb2

    from edgeship.agent.protos import edgeship_oip_pb2 as ours_oip
    from edgeship.agent.protos import edgeship_tfserving_pb2 as ours_tfs

    pairs = [(getattr(ours_oip, name).DESCRIPTOR, service_pb2.DESCRIPTOR.message_types_by_name[name])
             for name in ours_oip.DESCRIPTOR.message_types_by_name]
    pairs += [
        (ours_tfs.TensorProto.DESCRIPTOR, tensor_pb2.TensorProto.DESCRIPTOR),
        (ours_tfs.TensorShapeProto.DESCRIPTOR, tensor_shape_pb2.TensorShapeProto.DESCRIPTOR),
        (ours_tfs.TensorInfo.DESCRIPTOR, meta_graph_pb2.TensorInfo.DESCRIPTOR),
        (ours_tfs.SignatureDef.DESCRIPTOR, meta_graph_pb2.SignatureDef.DESCRIPTOR),
        (ours_tfs.SignatureDefMap.DESCRIPTOR, get_model_metadata_pb2.SignatureDefMap.DESCRIPTOR),
        (ours_tfs.ModelSpec.DESCRIPTOR, model_pb2.ModelSpec.DESCRIPTOR),
        (ours_tfs.PredictRequest.DESCRIPTOR, predict_pb2.PredictRequest.DESCRIPTOR),
        (ours_tfs.PredictResponse.DESCRIPTOR, predict_pb2.PredictResponse.DESCRIPTOR),
        (ours_tfs.GetModelMetadataRequest.DESCRIPTOR, get_model_metadata_pb2.GetModelMetadataRequest.DESCRIPTOR),
        (ours_tfs.GetModelMetadataResponse.DESCRIPTOR, get_model_metadata_pb2.GetModelMetadataResponse.DESCRIPTOR),
        (ours_tfs.GetModelStatusRequest.DESCRIPTOR, get_model_status_pb2.GetModelStatusRequest.DESCRIPTOR),
        (ours_tfs.GetModelStatusResponse.DESCRIPTOR, get_model_status_pb2.GetModelStatusResponse.DESCRIPTOR),
        (ours_tfs.ModelVersionStatus.DESCRIPTOR, get_model_status_pb2.ModelVersionStatus.DESCRIPTOR),
    ]
    checked = 0
    while pairs:
        ours, theirs = pairs.pop()
        mine, reference = _fields(ours), _fields(theirs)
        for name, shape in mine.items():
            assert reference.get(name) == shape, f"{ours.full_name}.{name}: {shape} vs {reference.get(name)}"
            checked += 1
        pairs += [(nested, theirs.nested_types_by_name[nested.name]) for nested in ours.nested_types]
    assert checked > 80


# -- large byte fields read in place: what protobuf itself reads, or None --------------------------------
def _oip_request(contents: list[bytes], **fields: Any) -> Any:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="m", raw_input_contents=contents, **fields)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    return request


def _predict_request(inputs: dict[str, bytes]) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for name, content in inputs.items():
        request.inputs[name].CopyFrom(_tensor_proto(np.frombuffer(content, dtype=np.uint8) if content else np.zeros(0, np.uint8), 4))
        request.inputs[name].tensor_content = content
    request.output_filter.append("y")
    return request


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


OIP_WIRE = [
    ("one tensor", _oip_request([b"\x01" * 8]).SerializeToString()),
    ("three tensors and an id", _oip_request([b"a" * 3, b"", b"c" * 300], id="r1").SerializeToString()),
    ("none", _oip_request([]).SerializeToString()),
    # a message followed by another is their merge: repeated fields append, in wire order
    ("two messages back to back", _oip_request([b"a"]).SerializeToString() + _oip_request([b"b" * 200]).SerializeToString()),
    ("an unknown varint, fixed64 and fixed32 field", _oip_request([b"z" * 5]).SerializeToString()
     + b"\xa0\x06\x96\x01" + b"\xa9\x06" + b"\x00" * 8 + b"\xad\x06" + b"\x00" * 4),
    ("a frame-sized tensor", _oip_request([bytes(range(256)) * 2352], id="frame").SerializeToString()),
    ("field 7 as a varint: an unknown field, not a tensor", _oip_request([b"q" * 3]).SerializeToString() + b"\x38\x05"),
]


@pytest.mark.parametrize("data", [row[1] for row in OIP_WIRE], ids=[row[0] for row in OIP_WIRE])
def test_a_split_infer_request_is_what_protobuf_reads_with_its_tensors_apart(data: bytes) -> None:
    from edgeship.agent.grpc_server import oip_split
    from edgeship.agent.protos import edgeship_oip_pb2

    parts = oip_split(data)
    assert parts is not None
    rest, found = parts
    whole = edgeship_oip_pb2.ModelInferRequest.FromString(data)
    assert [bytes(v) for v in found] == list(whole.raw_input_contents)
    assert len(rest) == len(data) - sum(len(v) for v in found) - sum(1 + len(_varint_bytes(len(v))) for v in found)
    whole.ClearField("raw_input_contents")
    assert edgeship_oip_pb2.ModelInferRequest.FromString(rest) == whole


def _entry(entry: bytes) -> bytes:
    """A PredictRequest of one inputs entry written by hand, and a model_spec after it."""
    return b"\x12" + _varint_bytes(len(entry)) + entry + b"\x0a\x03\x0a\x01m"


TF_WIRE = [
    ("one input", _predict_request({"image": b"\x01\x02\x03"}).SerializeToString(), True),
    ("two inputs", _predict_request({"a": b"\x01" * 40, "b": b"\x02" * 4}).SerializeToString(), True),
    ("typed values only", _predict_request({"a": b""}).SerializeToString(), True),
    ("a unicode input name", _predict_request({"bild-\u00e9": b"\x05" * 3}).SerializeToString(), True),
    # the same key twice (two messages back to back): protobuf keeps the last; the scan gives up
    ("a key twice", _predict_request({"a": b"\x01"}).SerializeToString() + _predict_request({"a": b"\x02\x02"}).SerializeToString(), False),
    ("different keys back to back", _predict_request({"a": b"\x01"}).SerializeToString() + _predict_request({"b": b"\x02\x02"}).SerializeToString(), True),
    # lengths of one and three varint bytes re-encoded around the cut
    ("a frame-sized tensor", _predict_request({"image": bytes(range(256)) * 600}).SerializeToString(), True),
    ("an entry's value before its key, an unknown field in the tensor",
     _entry(b"\x12" + _varint_bytes(9) + b"\x08\x04" + b"\x22\x03abc" + b"\x28\x01" + b"\x0a\x01k"), True),
    # an unknown field in a map entry: protobuf sets the whole entry aside; the scan gives up
    ("an unknown field in an entry", _entry(b"\x0a\x01k\x12\x05\x22\x03abc\x18\x07"), False),
    ("tensor_content twice in one tensor: the last counts", _entry(b"\x0a\x01k\x12\x0b\x08\x04\x22\x02ab\x22\x03xyz"), True),
]


@pytest.mark.parametrize("data, read", [row[1:] for row in TF_WIRE], ids=[row[0] for row in TF_WIRE])
def test_a_split_predict_request_is_what_protobuf_reads_with_its_tensors_apart(data: bytes, read: bool) -> None:
    from edgeship.agent.grpc_server import tf_split
    from edgeship.agent.protos import edgeship_tfserving_pb2

    parts = tf_split(data)
    whole = edgeship_tfserving_pb2.PredictRequest.FromString(data)
    assert (parts is not None) == read
    if parts is not None:
        rest, found = parts
        expected = {name: tensor.tensor_content for name, tensor in whole.inputs.items() if tensor.tensor_content}
        assert {name: bytes(v) for name, v in found.items()} == expected
        for tensor in whole.inputs.values():
            tensor.ClearField("tensor_content")
        assert edgeship_tfserving_pb2.PredictRequest.FromString(rest) == whole


def test_the_wire_scan_gives_up_on_what_it_does_not_read() -> None:
    from edgeship.agent.grpc_server import oip_split, wire_fields

    assert wire_fields(memoryview(b"\x0a\x05abc")) is None  # a value past the end
    assert wire_fields(memoryview(b"\x0b\x0c")) is None  # a group
    assert wire_fields(memoryview(b"\x08\xff")) is None  # a truncated varint
    assert oip_split(b"\x3a\x80") is None
    # a well-formed message of many tiny unknown fields (protobuf reads it in C): past the cap the
    # scan gives up, and the message's own field serves the same bytes
    from edgeship.agent.protos import edgeship_oip_pb2

    many = _oip_request([b"a" * 8]).SerializeToString() + b"\xa0\x06\x01" * 100_000
    assert oip_split(many) is None
    assert list(edgeship_oip_pb2.ModelInferRequest.FromString(many).raw_input_contents) == [b"a" * 8]
