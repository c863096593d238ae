"""The Open Inference Protocol (KServe v2) over REST: pure functions from request bytes to
checked tensors and from outputs to response bytes. ``server.py`` routes the paths; the
same checks (``inference.py``) serve the gRPC form of the protocol.

What the agent answers (docs/agent.md, "Protocols")::

    GET  /v2/health/live | /v2/health/ready           liveness, readiness (open, like /healthz)
    GET  /v2                                          server metadata
    GET  /v2/models/NAME[/versions/V]                 model metadata
    GET  /v2/models/NAME[/versions/V]/ready           model readiness
    POST /v2/models/NAME[/versions/V]/infer           inference: JSON tensors, or the binary
                                                      tensor data extension

The binary tensor data extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw bytes of each input whose
``parameters.binary_data_size`` is given, in the order the inputs are listed (row-major,
little-endian). Outputs are answered in binary the same way when the request asks for it
(``parameters.binary_data_output``, or ``binary_data`` on a requested output).
"""

from __future__ import annotations

__all__ = [
    "InferRequest",
    "RequestedOutput",
    "decode_infer",
    "encode_infer",
    "model_metadata",
    "server_metadata",
]

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decoding import (
    DecodeLimits,
    InexactParseError,
    PredictRequestError,
    caller_dtype,
    loads_json,
    tensor_keys,
)
from .inference import (
    OIP_DTYPES,
    oip_datatype,
    tensor_from_bytes,
    tensor_from_values,
    tensor_order,
    version_text,
)
from .serving import LoadedModel

EXTENSIONS = ("binary_tensor_data",)
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx"}


@dataclass(frozen=True)
class RequestedOutput:
    index: int
    """Position among the model's outputs."""
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[np.ndarray]
    """In the model's input order."""
    outputs: list[RequestedOutput]


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "edgeship-agent", "version": version, "extensions": list(EXTENSIONS)}


def _shape(spec_shape: Sequence[int]) -> list[int]:
    return [-1, *spec_shape[1:]]


def model_metadata(model: LoadedModel, versions: Sequence[LoadedModel]) -> dict[str, Any]:
    """The model metadata response: every loaded version's serving number, the tensors
    under the names requests use (SignatureDef keys, as TF Serving's metadata)."""
    signature = model.runner.signature
    return {
        "name": model.name,
        "versions": [str(m.serving_version) for m in versions],
        "platform": _PLATFORMS.get(model.runner.runtime, "tensorflow_lite"),
        "inputs": [
            {"name": key, "datatype": oip_datatype(caller_dtype(s)), "shape": _shape(s.shape)}
            for key, s in zip(tensor_keys(signature.inputs), signature.inputs)
        ],
        "outputs": [
            {"name": key, "datatype": oip_datatype(caller_dtype(s)), "shape": _shape(s.shape)}
            for key, s in zip(tensor_keys(signature.outputs), signature.outputs)
        ],
    }


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PredictRequestError(f"{what} must be a JSON object")
    return value


def _parameters(tensor: dict[str, Any], what: str) -> dict[str, Any]:
    params = tensor.get("parameters", {})
    return _object(params, f"{what} 'parameters'") if params is not None else {}


def _flag(params: dict[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise PredictRequestError(f"{what}: parameter '{key}' must be true or false")
    return value


def decode_infer(
    body: bytes, header_length: int | None, model: LoadedModel, limits: DecodeLimits
) -> InferRequest:
    """An infer request's bytes -> the model's inputs (checked) and the outputs asked for.
    Every refusal is a PredictRequestError (the caller's 400)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise PredictRequestError(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header, binary = body, memoryview(b"")
    document, exact = loads_json(header)
    try:
        return _decode(document, exact, binary, model, limits)
    except InexactParseError:  # a huge number orjson may have read otherwise: json decides
        return _decode(loads_json(header, exact=True)[0], True, binary, model, limits)


def _decode(
    document: Any, exact: bool, binary: memoryview, model: LoadedModel, limits: DecodeLimits
) -> InferRequest:
    request = _object(document, "the inference request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise PredictRequestError("'id' must be a string")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise PredictRequestError("'inputs' must be a non-empty list of tensors")
    specs = model.runner.signature.inputs
    keys = tensor_keys(specs)
    if len(inputs) != len(specs):
        raise PredictRequestError(f"the model takes {len(specs)} inputs {keys}, the request has {len(inputs)}")
    tensors = [_object(t, f"inputs[{i}]") for i, t in enumerate(inputs)]
    given = [t.get("name") for t in tensors]
    if not all(isinstance(n, str) for n in given):
        raise PredictRequestError("every input needs a 'name'")
    names: list[str] = [str(n) for n in given]
    order = tensor_order(specs, names, keys, "input")
    arrays: list[Any] = [None] * len(specs)
    offset = 0
    for tensor, name, index in zip(tensors, names, order):
        label = f"input '{name}'"
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if datatype not in OIP_DTYPES:
            raise PredictRequestError(
                f"{label}: datatype {datatype!r} is not served (one of {', '.join(OIP_DTYPES)})"
            )
        if not isinstance(shape, list):
            raise PredictRequestError(f"{label}: 'shape' must be a list of integers")
        params = _parameters(tensor, label)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise PredictRequestError(f"{label}: binary_data_size must be a non-negative integer")
            if "data" in tensor:
                raise PredictRequestError(f"{label} has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise PredictRequestError(
                    f"{label}: binary_data_size {size} runs past the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            arrays[index] = tensor_from_bytes(
                binary[offset : offset + size], OIP_DTYPES[datatype], shape, specs[index], limits, label
            )
            offset += size
        else:
            if "data" not in tensor:
                raise PredictRequestError(f"{label} has neither 'data' nor binary_data_size")
            arrays[index] = tensor_from_values(
                tensor["data"], OIP_DTYPES[datatype], shape, specs[index], limits, label, exact
            )
    if offset != len(binary):
        raise PredictRequestError(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size"
        )
    batches = {len(a) for a in arrays}
    if len(batches) > 1:
        raise PredictRequestError(f"inputs have different batch sizes ({sorted(batches)})")
    return InferRequest(request_id, arrays, _requested_outputs(request, model))


def _requested_outputs(request: dict[str, Any], model: LoadedModel) -> list[RequestedOutput]:
    params = _parameters(request, "the request")
    binary_default = _flag(params, "binary_data_output", "the request")
    specs = model.runner.signature.outputs
    keys = tensor_keys(specs)
    asked = request.get("outputs")
    if asked is None:
        return [RequestedOutput(i, k, binary_default) for i, k in enumerate(keys)]
    if not isinstance(asked, list) or not asked:
        raise PredictRequestError("'outputs' must be a non-empty list")
    found: list[RequestedOutput] = []
    for i, item in enumerate(asked):
        item = _object(item, f"outputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise PredictRequestError(f"outputs[{i}] needs a 'name'")
        out_params = _parameters(item, f"output '{name}'")
        if "classification" in out_params:
            raise PredictRequestError(f"output '{name}': the classification extension is not served")
        (index,) = tensor_order(specs, [name], keys, "output")
        binary = _flag(out_params, "binary_data", f"output '{name}'") if "binary_data" in out_params else binary_default
        found.append(RequestedOutput(index, keys[index], binary))
    return found


def encode_infer(
    model: LoadedModel, outputs: Sequence[np.ndarray], request: InferRequest
) -> tuple[bytes, int | None]:
    """The response body and, where any output goes in binary, the JSON header's length
    (the ``Inference-Header-Content-Length`` to send)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for asked in request.outputs:
        y = np.ascontiguousarray(outputs[asked.index])
        tensor: dict[str, Any] = {"name": asked.name, "datatype": oip_datatype(y.dtype), "shape": list(y.shape)}
        if asked.binary:
            data = y.astype(y.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            tensor["data"] = y.ravel().tolist()
        tensors.append(tensor)
    document: dict[str, Any] = {
        "model_name": model.name,
        "model_version": version_text(model),
        "outputs": tensors,
    }
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
