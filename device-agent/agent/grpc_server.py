"""The gRPC front ends (``edgeship[grpc]``): the Open Inference Protocol's
``inference.GRPCInferenceService`` and TF Serving's ``tensorflow.serving.PredictionService``
(Predict, GetModelMetadata) and ``tensorflow.serving.ModelService`` (GetModelStatus), on one
port (``[server] grpc_port``).

Both go through the serving core every front end shares (``inference.py``): the same
catalogue lookup, the same tensor checks and ``[limits]``, the same health accounting (a
caller's INVALID_ARGUMENT / NOT_FOUND never counts against a model; the model's own failure,
INTERNAL, does). The same access rules as the REST API: a bearer token in the
``authorization`` metadata (health RPCs stay open, like ``/healthz``) and TLS with client
certificates, required at the handshake.

The messages come from the .proto copies in ``protos/`` (generated modules checked in, so a
device needs ``grpcio`` and ``protobuf`` only); the services are registered by their
canonical names with generic handlers, so the messages live in a package of our own and
never clash with a client library's copies.
"""

from __future__ import annotations

__all__ = ["GRPC_SERVICES", "GrpcServer", "WireField", "grpc_available", "oip_split", "tf_split", "wire_fields"]

import functools
import hmac
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError

from .decoding import DecodeLimits, PredictRequestError, caller_dtype, tensor_keys
from .inference import (
    OIP_DTYPES,
    caller_error,
    check_bounds,
    oip_datatype,
    predict,
    resolve,
    signature_names,
    tensor_from_bytes,
    tensor_from_values,
    tensor_order,
    version_text,
)
from .servables import Servables
from .serving import LoadedModel, NoModelError

GRPC_SERVICES = (
    "inference.GRPCInferenceService",
    "tensorflow.serving.PredictionService",
    "tensorflow.serving.ModelService",
)
_SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


def grpc_available() -> bool:
    """Whether the gRPC extra is installed (grpcio and protobuf import); called only where
    ``[server] grpc_port`` is set, so a REST-only agent never loads them."""
    try:
        import grpc  # noqa: F401
        from google.protobuf import message  # noqa: F401
    except ImportError:
        return False
    return True


# TF DataType numbers -> the numpy dtype of tensor_content, and the repeated field of values
_TF_DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype(np.float32), "float_val"),
    2: (np.dtype(np.float64), "double_val"),
    3: (np.dtype(np.int32), "int_val"),
    4: (np.dtype(np.uint8), "int_val"),
    5: (np.dtype(np.int16), "int_val"),
    6: (np.dtype(np.int8), "int_val"),
    9: (np.dtype(np.int64), "int64_val"),
    10: (np.dtype(np.bool_), "bool_val"),
    17: (np.dtype(np.uint16), "int_val"),
    19: (np.dtype(np.float16), "half_val"),
    22: (np.dtype(np.uint32), "uint32_val"),
    23: (np.dtype(np.uint64), "uint64_val"),
}
_TF_NUMBERS = {dtype.name: number for number, (dtype, _) in _TF_DTYPES.items()}
_OIP_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


# -- the large byte fields, read in place --------------------------------------------------------------
# A bytes field parsed by protobuf is copied out of the request (0.2-0.3 ms for a 600 kB camera
# frame, a third of what the protocol costs per call). The tensors are read instead straight from
# the request's own bytes, located by a scan of the wire format, and protobuf parses only the rest:
# the same bytes with the tensor fields cut out, which is the same message less those fields
# (a message is the merge of its fields in wire order; a bytes field's content is never checked).
# The scan follows the wire format's rules for what it reads (a repeated field's elements in
# order, a singular field's last occurrence wins) and gives up (None: protobuf parses the whole
# request and its own fields serve, as before) on anything it does not expect.

_OIP_RAW_CONTENTS = 7  # ModelInferRequest.raw_input_contents (repeated bytes)
_TF_INPUTS = 2  # PredictRequest.inputs (map<string, TensorProto>: entries of key 1, value 2)
_TF_TENSOR_CONTENT = 4  # TensorProto.tensor_content (bytes)
_LENGTH_DELIMITED = 2
_MAX_FIELDS = 256
"""Fields one scan reads before it gives up: a request has a handful; a message of millions of
tiny (unknown or unpacked) fields, which protobuf parses in C, must not cost seconds of Python."""


def _varint(data: memoryview, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class WireField(NamedTuple):
    """One field of a protobuf message as it lies in the bytes received."""

    number: int
    wire: int
    """The wire type: 2 is length-delimited, its value ``data[value:end]``."""
    start: int
    """Where the field's key begins: ``data[start:end]`` is the whole field."""
    value: int
    end: int

    def delimited(self, number: int) -> bool:
        return self.number == number and self.wire == _LENGTH_DELIMITED


def wire_fields(data: memoryview, start: int = 0, end: int | None = None) -> list[WireField] | None:
    """The fields of one protobuf message in ``data[start:end]``, in wire order. None where
    the bytes are not a message this scan reads (groups, a value past the end, more than
    ``_MAX_FIELDS`` fields)."""
    end = len(data) if end is None else end
    found: list[WireField] = []
    at = start
    try:
        while at < end:
            if len(found) >= _MAX_FIELDS:
                return None
            field_start = at
            key, at = _varint(data, at, end)
            number, wire = key >> 3, key & 7
            value_start = at
            if wire == 0:
                _, at = _varint(data, at, end)
            elif wire == 1:
                at += 8
            elif wire == 5:
                at += 4
            elif wire == _LENGTH_DELIMITED:
                size, value_start = _varint(data, at, end)
                at = value_start + size
            else:  # groups: not in these messages
                return None
            if at > end:
                return None
            found.append(WireField(number, wire, field_start, value_start, at))
    except ValueError:
        return None
    return found


def oip_split(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """A ModelInferRequest as (its bytes without ``raw_input_contents``, those contents in
    order as views of ``data``)."""
    view = memoryview(data)
    fields = wire_fields(view)
    if fields is None:
        return None
    rest = b"".join(view[f.start : f.end] for f in fields if not f.delimited(_OIP_RAW_CONTENTS))
    return rest, [view[f.value : f.end] for f in fields if f.delimited(_OIP_RAW_CONTENTS)]


def tf_split(data: bytes) -> tuple[bytes, dict[str, memoryview]] | None:
    """A PredictRequest as (its bytes without the inputs' ``tensor_content``, the contents
    by input name as views of ``data``; an input without one is absent). None where a map
    entry repeats a key or a field, or holds a field of its own beyond key and value
    (protobuf would merge, replace or set the entry aside: it decides then)."""
    view = memoryview(data)
    fields = wire_fields(view)
    if fields is None:
        return None
    rest: list[bytes | memoryview] = []
    found: dict[str, memoryview] = {}
    names: set[str] = set()
    for field in fields:
        if not field.delimited(_TF_INPUTS):
            rest.append(view[field.start : field.end])
            continue
        entry = wire_fields(view, field.value, field.end)
        if entry is None:
            return None
        keys = [f for f in entry if f.number == 1]
        values = [f for f in entry if f.number == 2]
        if len(keys) != 1 or not keys[0].delimited(1) or len(values) > 1 or len(keys) + len(values) != len(entry):
            return None  # an unknown field makes protobuf keep the whole entry aside, unread
        if values and not values[0].delimited(2):
            return None
        try:
            name = bytes(view[keys[0].value : keys[0].end]).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if name in names:
            return None
        names.add(name)
        tensor = wire_fields(view, values[0].value, values[0].end) if values else []
        if tensor is None:
            return None
        contents = [f for f in tensor if f.delimited(_TF_TENSOR_CONTENT)]
        if not contents:
            rest.append(view[field.start : field.end])
            continue
        found[name] = view[contents[-1].value : contents[-1].end]  # a singular field: the last one counts
        value = b"".join(view[f.start : f.end] for f in tensor if not f.delimited(_TF_TENSOR_CONTENT))
        pieces = view[keys[0].start : keys[0].end].tobytes()
        pieces += b"\x12" + _encode_varint(len(value)) + value  # the entry's value: field 2, length-delimited
        rest.append(b"\x12" + _encode_varint(len(pieces)) + pieces)  # inputs: field 2, length-delimited
    return b"".join(rest), found


class _InPlace:
    """A parsed request message (without its large byte fields where ``contents`` holds
    them) and those fields as views of the bytes received (None: the message has them)."""

    __slots__ = ("contents", "message")

    def __init__(self, message: Any, contents: Any) -> None:
        self.message = message
        self.contents = contents

    @classmethod
    def parse(cls, request_type: Any, split: Callable[[bytes], Any], data: bytes) -> _InPlace:
        parts = split(data)
        if parts is None:
            return cls(request_type.FromString(data), None)
        return cls(request_type.FromString(parts[0]), parts[1])


class _Malformed:
    """What a request's deserializer returns for bytes that are not its message: the RPC
    answers INVALID_ARGUMENT (grpcio's own answer to a deserializer's exception is INTERNAL,
    with a traceback in the log: a hostile caller's garbage is neither)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _Refusal(Exception):
    """An RPC answered with a status code (aborts the call)."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_WIDE = {"f": np.dtype(np.float64), "i": np.dtype(np.int64), "u": np.dtype(np.uint64), "b": np.dtype(np.bool_)}


def _typed_values(
    values: Any, dtype: np.dtype, shape: Sequence[int], spec: Any, limits: DecodeLimits, label: str,
    broadcast: bool = False,
) -> np.ndarray:
    """A typed repeated field's values (protobuf holds them as numbers of the field's type)
    as a checked array: shape and limits before allocation, integers out of the dtype's range
    refused rather than wrapped (``decoding.strict_array``). ``broadcast``: one value fills
    the whole shape (TensorFlow's rule for a TensorProto)."""
    check_bounds(shape, dtype, spec, limits, label)
    count = int(np.prod(list(shape), dtype=np.int64))
    wide = _WIDE[dtype.kind]
    if broadcast and len(values) == 1 and count > 1:
        array = np.full(list(shape), values[0], dtype=wide)
    else:
        array = np.array(values, dtype=wide)
    return tensor_from_values(array, dtype, shape, spec, limits, label)


class _Frontends:
    """The RPC handlers of both protocols over one catalogue (no gRPC types in here but
    the context: each handler returns a response message or raises ``_Refusal``)."""

    def __init__(self, servables: Servables, limits: DecodeLimits, token: str | None, version: str) -> None:
        import grpc

        from .protos import edgeship_oip_pb2 as oip_pb2
        from .protos import edgeship_tfserving_pb2 as tfs_pb2

        self.grpc = grpc
        self.oip = oip_pb2
        self.tfs = tfs_pb2
        self.servables = servables
        self.limits = limits
        self.token = token
        self.version = version

    # -- access and errors ------------------------------------------------------------------------
    def authorized(self, context: Any) -> bool:
        if self.token is None:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, credential = value.partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                    credential.strip().encode(), self.token.encode()
                ):
                    return True
        return False

    def guarded(self, handler: Callable[[Any], Any], open_rpc: bool = False) -> Callable[[Any, Any], Any]:
        """``handler(request)`` as a gRPC method: access first, then the agent's errors as
        status codes (the caller's: INVALID_ARGUMENT, NOT_FOUND; no model: UNAVAILABLE; the
        model's own failure: INTERNAL)."""
        codes = self.grpc.StatusCode

        def method(request: Any, context: Any) -> Any:
            if not open_rpc and not self.authorized(context):
                context.abort(codes.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization: Bearer ...)")
            if isinstance(request, _Malformed):
                context.abort(codes.INVALID_ARGUMENT, request.message)
            try:
                return handler(request)
            except _Refusal as exc:
                context.abort(exc.code, exc.message)
            except BadInputError as exc:
                context.abort(codes.INVALID_ARGUMENT, exc.message)
            except NoModelError as exc:
                context.abort(codes.UNAVAILABLE, exc.message)
            except LookupError as exc:
                context.abort(codes.NOT_FOUND, str(exc))
            except Exception as exc:  # noqa: BLE001 - the model failed (counted by the serving layer): INTERNAL
                context.abort(codes.INTERNAL, f"prediction failed: {str(exc)[:300]}")
            return None  # pragma: no cover - abort raises

        return method

    def _run(self, model: LoadedModel, build: Callable[[], list[np.ndarray]]) -> tuple[LoadedModel, list[np.ndarray]]:
        try:
            inputs = build()
        except PredictRequestError:
            caller_error(model)
            raise
        return predict(self.servables, model, inputs)

    # -- the Open Inference Protocol --------------------------------------------------------------
    def server_live(self, request: Any) -> Any:
        return self.oip.ServerLiveResponse(live=True)

    def server_ready(self, request: Any) -> Any:
        names = self.servables.names()
        ready = bool(names) and all(m.serving.current is not None for m in self.servables)
        return self.oip.ServerReadyResponse(ready=ready)

    def model_ready(self, request: Any) -> Any:
        try:
            resolve(self.servables, request.name, request.version or None)
        except (NoModelError, LookupError):  # as Triton: an unknown model is not ready, not an error
            return self.oip.ModelReadyResponse(ready=False)
        return self.oip.ModelReadyResponse(ready=True)

    def server_metadata(self, request: Any) -> Any:
        from .oip import EXTENSIONS

        return self.oip.ServerMetadataResponse(name="edgeship-agent", version=self.version, extensions=list(EXTENSIONS))

    def model_metadata(self, request: Any) -> Any:
        from .oip import model_metadata

        model = resolve(self.servables, request.name, request.version or None)
        doc = model_metadata(model, self.servables.get(model.name).loaded())
        tensor = self.oip.ModelMetadataResponse.TensorMetadata
        return self.oip.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]], outputs=[tensor(**t) for t in doc["outputs"]],
        )

    def model_infer(self, parsed: _InPlace) -> Any:
        request = parsed.message
        model = resolve(self.servables, request.model_name, request.model_version or None)
        specs = model.runner.signature.inputs
        raw = parsed.contents if parsed.contents is not None else request.raw_input_contents

        def build() -> list[np.ndarray]:
            if len(request.inputs) != len(specs):
                raise PredictRequestError(
                    f"the model takes {len(specs)} inputs {tensor_keys(specs)}, the request has {len(request.inputs)}"
                )
            if raw and len(raw) != len(request.inputs):
                raise PredictRequestError(
                    f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs (one per input, or none)"
                )
            order = tensor_order(specs, [t.name for t in request.inputs], tensor_keys(specs), "input")
            arrays: list[Any] = [None] * len(specs)
            for position, (tensor, index) in enumerate(zip(request.inputs, order)):
                label = f"input '{tensor.name}'"
                dtype = OIP_DTYPES.get(tensor.datatype)
                if dtype is None:
                    raise PredictRequestError(
                        f"{label}: datatype {tensor.datatype!r} is not served (one of {', '.join(OIP_DTYPES)})"
                    )
                shape = list(tensor.shape)
                if raw:
                    if tensor.HasField("contents"):
                        raise PredictRequestError(f"{label} has both contents and raw_input_contents")
                    arrays[index] = tensor_from_bytes(raw[position], dtype, shape, specs[index], self.limits, label)
                else:
                    field = _OIP_FIELDS.get(tensor.datatype)
                    if field is None:
                        raise PredictRequestError(f"{label}: {tensor.datatype} needs raw_input_contents")
                    values = getattr(tensor.contents, field)
                    arrays[index] = _typed_values(values, dtype, shape, specs[index], self.limits, label)
            if len({len(a) for a in arrays}) > 1:
                raise PredictRequestError("inputs have different batch sizes")
            for asked in request.outputs:
                if "classification" in asked.parameters:
                    raise PredictRequestError(f"output '{asked.name}': the classification extension is not served")
            return arrays

        try:
            wanted = self._oip_outputs(model, [o.name for o in request.outputs])
        except PredictRequestError:
            caller_error(model)
            raise
        served, outputs = self._run(model, build)
        keys = tensor_keys(served.runner.signature.outputs)
        response = self.oip.ModelInferResponse(
            model_name=served.name, model_version=version_text(served), id=request.id
        )
        for index in wanted:
            y = np.ascontiguousarray(outputs[index])
            response.outputs.add(name=keys[index], datatype=oip_datatype(y.dtype), shape=list(y.shape))
            response.raw_output_contents.append(y.astype(y.dtype.newbyteorder("<"), copy=False).tobytes())
        return response

    @staticmethod
    def _oip_outputs(model: LoadedModel, names: Sequence[str]) -> list[int]:
        specs = model.runner.signature.outputs
        keys = tensor_keys(specs)
        if not names:
            return list(range(len(specs)))
        return tensor_order(specs, names, keys, "output")

    # -- TF Serving ----------------------------------------------------------------------------------
    def _tf_model(self, spec: Any) -> LoadedModel:
        which = spec.WhichOneof("version_choice")
        version = str(spec.version.value) if which == "version" else None
        label = spec.version_label if which == "version_label" else None
        model = resolve(self.servables, spec.name, version, label)
        if spec.signature_name and spec.signature_name not in signature_names(model):
            caller_error(model)
            raise PredictRequestError(
                f"unknown signature_name {spec.signature_name!r}: this model has "
                + ", ".join(repr(n) for n in signature_names(model))
            )
        return model

    def _model_spec(self, model: LoadedModel, signature_name: str) -> Any:
        spec = self.tfs.ModelSpec(name=model.name, signature_name=signature_name or signature_names(model)[0])
        if model.serving_version > 0:
            spec.version.value = model.serving_version
        return spec

    def _tf_tensor(self, proto: Any, spec: Any, label: str, content: memoryview | None = None) -> np.ndarray:
        found = _TF_DTYPES.get(proto.dtype)
        want = caller_dtype(spec)
        if found is None or found[0] != want:
            raise PredictRequestError(
                f"{label}: expects dtype {_TF_NAMES.get(_TF_NUMBERS.get(want.name, 0), want.name)}, "
                f"got {_TF_NAMES.get(proto.dtype, proto.dtype)}"
            )
        dtype, field = found
        if proto.tensor_shape.unknown_rank:
            raise PredictRequestError(f"{label}: a tensor of unknown rank cannot be served")
        shape = [d.size for d in proto.tensor_shape.dim]
        if content is None:  # not read in place: the message's own field
            content = memoryview(proto.tensor_content)
        if len(content):
            return tensor_from_bytes(content, dtype, shape, spec, self.limits, label)
        return _typed_values(getattr(proto, field), dtype, shape, spec, self.limits, label, broadcast=True)

    def predict(self, parsed: _InPlace) -> Any:
        request = parsed.message
        model = self._tf_model(request.model_spec)
        specs = model.runner.signature.inputs
        contents = parsed.contents

        def build() -> list[np.ndarray]:
            names = list(request.inputs.keys())
            if len(names) != len(specs):
                raise PredictRequestError(f"the model takes inputs {tensor_keys(specs)}, the request names {names}")
            order = tensor_order(specs, names, tensor_keys(specs), "input")
            arrays: list[Any] = [None] * len(specs)
            for name, index in zip(names, order):
                proto = request.inputs[name]
                content = None
                if contents is not None:
                    content = contents.get(name, memoryview(b""))
                arrays[index] = self._tf_tensor(proto, specs[index], f"input '{name}'", content)
            if len({len(a) for a in arrays}) > 1:
                raise PredictRequestError("inputs have different batch sizes: every input needs one row per instance")
            return arrays

        out_specs = model.runner.signature.outputs
        keys = tensor_keys(out_specs)
        try:
            wanted = self._oip_outputs(model, list(request.output_filter))
        except PredictRequestError:
            caller_error(model)
            raise
        served, outputs = self._run(model, build)
        response = self.tfs.PredictResponse(model_spec=self._model_spec(served, request.model_spec.signature_name))
        for index in wanted:
            y = np.ascontiguousarray(outputs[index])
            tensor = response.outputs[keys[index]]
            tensor.dtype = _TF_NUMBERS.get(y.dtype.name, 0)
            tensor.tensor_shape.dim.extend(self.tfs.TensorShapeProto.Dim(size=d) for d in y.shape)
            tensor.tensor_content = y.astype(y.dtype.newbyteorder("<"), copy=False).tobytes()
        return response

    def get_model_metadata(self, request: Any) -> Any:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise PredictRequestError(f"metadata_field must be ['signature_def'] (got {fields})")
        model = self._tf_model(request.model_spec)
        signature = model.runner.signature

        def infos(specs: Sequence[Any], target: Any) -> None:
            for key, spec in zip(tensor_keys(specs), specs):
                info = target[key]
                info.name = spec.name
                info.dtype = _TF_NUMBERS.get(caller_dtype(spec).name, 0)
                info.tensor_shape.dim.extend(
                    self.tfs.TensorShapeProto.Dim(size=d) for d in (-1, *spec.shape[1:])
                )

        definitions = self.tfs.SignatureDefMap()
        for name in signature_names(model):
            definition = definitions.signature_def[name]
            definition.method_name = "tensorflow/serving/predict"
            infos(signature.inputs, definition.inputs)
            infos(signature.outputs, definition.outputs)
        response = self.tfs.GetModelMetadataResponse(model_spec=self._model_spec(model, ""))
        packed = response.metadata["signature_def"]
        packed.type_url = _SIGNATURE_DEF_MAP_URL
        packed.value = definitions.SerializeToString()
        return response

    def get_model_status(self, request: Any) -> Any:
        spec = request.model_spec
        which = spec.WhichOneof("version_choice")
        if which is None:
            models = self.servables.get(spec.name).loaded()
            if not models:
                raise NoModelError(f"model {spec.name!r} has no version serving")
        else:
            models = [self._tf_model(spec)]
        response = self.tfs.GetModelStatusResponse()
        for model in models:
            response.model_version_status.add(
                version=model.serving_version, state=self.tfs.ModelVersionStatus.AVAILABLE,
                status=self.tfs.StatusProto(error_code=0, error_message=""),
            )
        return response

    # -- registration ----------------------------------------------------------------------------------
    def handlers(self) -> list[Any]:
        from google.protobuf.message import DecodeError

        grpc = self.grpc
        oip, tfs = self.oip, self.tfs

        def unary(
            fn: Callable[[Any], Any], request_type: Any, open_rpc: bool = False,
            in_place: Callable[[bytes], Any] | None = None,
        ) -> Any:
            parse = request_type.FromString
            if in_place is not None:
                parse = functools.partial(_InPlace.parse, request_type, in_place)
            name = request_type.DESCRIPTOR.full_name.rpartition(".")[2]

            def deserializer(data: bytes) -> Any:
                try:
                    return parse(data)
                except DecodeError:
                    return _Malformed(f"the request's {len(data)} bytes are not a {name} message")

            return grpc.unary_unary_rpc_method_handler(
                self.guarded(fn, open_rpc),
                request_deserializer=deserializer,
                response_serializer=lambda message: message.SerializeToString(),
            )

        return [
            grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
                "ServerLive": unary(self.server_live, oip.ServerLiveRequest, open_rpc=True),
                "ServerReady": unary(self.server_ready, oip.ServerReadyRequest, open_rpc=True),
                "ModelReady": unary(self.model_ready, oip.ModelReadyRequest),
                "ServerMetadata": unary(self.server_metadata, oip.ServerMetadataRequest),
                "ModelMetadata": unary(self.model_metadata, oip.ModelMetadataRequest),
                "ModelInfer": unary(self.model_infer, oip.ModelInferRequest, in_place=oip_split),
            }),
            grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
                "Predict": unary(self.predict, tfs.PredictRequest, in_place=tf_split),
                "GetModelMetadata": unary(self.get_model_metadata, tfs.GetModelMetadataRequest),
            }),
            grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
                "GetModelStatus": unary(self.get_model_status, tfs.GetModelStatusRequest),
            }),
        ]


_TF_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16", 6: "DT_INT8",
             7: "DT_STRING", 9: "DT_INT64", 10: "DT_BOOL", 17: "DT_UINT16", 19: "DT_HALF",
             22: "DT_UINT32", 23: "DT_UINT64"}


class GrpcServer:
    """Both gRPC front ends on one port; ``port`` is the bound one (0 picks a free port).

    Bounds from ``[limits]``: a message may be at most ``max_body_bytes`` (RESOURCE_EXHAUSTED
    beyond it, before it is parsed), at most ``max_connections`` RPCs run or wait at once
    (RESOURCE_EXHAUSTED beyond), the handshake must complete within ``header_timeout_s``,
    and a connection idle for ``idle_timeout_s`` is closed."""

    def __init__(
        self,
        servables: Servables,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        limits: Any = None,
        token: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        version: str = "unknown",
        workers: int = 4,
    ) -> None:
        import grpc

        from .server import ServerLimits

        limits = limits or ServerLimits()
        self.limits = limits
        frontends = _Frontends(servables, limits.decode, token, version)
        options = [
            ("grpc.max_receive_message_length", int(limits.max_body_bytes)),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000)),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeship-grpc"),
            handlers=frontends.handlers(),
            options=options,
            maximum_concurrent_rpcs=limits.max_connections,
        )
        address = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls = tls_cert is not None and tls_key is not None
        try:
            if self.tls:
                assert tls_cert is not None and tls_key is not None
                credentials = grpc.ssl_server_credentials(
                    [(tls_key.read_bytes(), tls_cert.read_bytes())],
                    root_certificates=tls_client_ca.read_bytes() if tls_client_ca is not None else None,
                    require_client_auth=tls_client_ca is not None,
                )
                bound = self._server.add_secure_port(address, credentials)
            else:
                bound = self._server.add_insecure_port(address)
        except (OSError, RuntimeError) as exc:
            raise EdgeshipError(f"cannot listen for gRPC on {address} ([server] grpc_port): {exc}") from None
        if not bound:
            raise EdgeshipError(f"cannot listen for gRPC on {address} ([server] grpc_port): address in use or invalid")
        self.host = host
        self.port = int(bound)

    def start(self) -> GrpcServer:
        self._server.start()
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)
