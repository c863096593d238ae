"""Predict requests decoded as TensorFlow Serving decodes them: pure functions of a
parsed JSON document and the model's signature, tested table by table.

The rules follow TF Serving's REST API reference and, where it is silent, its
decoder (``tensorflow_serving/util/json_tensor.cc``), whose check per value is:

- float tensors take JSON numbers only (``null``, ``true``, ``"1.5"`` are refused);
  ``NaN`` and ``Infinity`` are accepted (TF Serving parses them), and a number a
  float32 cannot hold without loss (beyond float32's range, or an integer beyond
  2**24) is refused;
- integer tensors take JSON integers only: ``1.0`` is a JSON float and is refused
  like ``1.7`` (TF Serving's ``IsInt``); a value outside the tensor's range is
  refused (TF Serving checks int32/int64 only; the agent checks int8/uint8/int16
  too rather than wrap around);
- bool tensors take ``true``/``false`` only;
- ``{"b64": ...}`` objects are for string tensors, which the agent's runtimes do not
  serve: refused with a clear message;
- ragged lists, values at the wrong depth and columnar inputs whose batch sizes
  differ are refused before the model runs.

Every refusal is a ``PredictRequestError`` (HTTP 400), so a caller's mistake never
reaches the model. Sizes are checked before the tensor is allocated (``DecodeLimits``).
Quantized models take and return floats: the caller's dtype is float32 for them.
"""

from __future__ import annotations

__all__ = [
    "DecodeLimits",
    "DecodedRequest",
    "InexactParseError",
    "PredictRequestError",
    "build_inputs",
    "caller_dtype",
    "decode_request",
    "decode_request_fast",
    "format_outputs",
    "loads_json",
    "signature_key",
    "strict_array",
    "tensor_keys",
]

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship.ota.errors import BadInputError

from .runtimes import ModelSignature, TensorSpec


class PredictRequestError(BadInputError):
    """A predict request that cannot be served as sent (HTTP 400)."""


_orjson: Any
try:  # the fast parser where the device has it (edgeship[litert] / [onnx]); json otherwise
    import orjson as _orjson
except ImportError:  # pragma: no cover - a device without it
    _orjson = None


_simdjson: Any
try:  # the fast path for camera frames where the device has it (the same extras as orjson)
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - a device without it: the exact path serves alone
    _simdjson = None


class InexactParseError(Exception):
    """A document parsed by orjson holds a number orjson may have read differently from
    ``json`` (an integer literal beyond 64 bits becomes a float): parse it again with
    ``json`` (``loads_json(raw, exact=True)``) and decode again. Not the caller's error."""


_INEXACT_FLOAT = float(2**63)
"""orjson reads integer literals beyond 64 bits as floats: only a float this large can be one."""


def loads_json(raw: bytes | memoryview, exact: bool = False) -> tuple[Any, bool]:
    """A request body parsed as JSON, or PredictRequestError; and whether its numbers are
    exactly ``json``'s (False: orjson parsed it; decode with ``exact_integers=False``, which
    raises InexactParseError where that could matter, and then parse again with ``exact``).

    orjson parses a camera frame's 3 MB of numbers about 2.3x faster than ``json``
    (docs/benchmarks.md). It is stricter than ``json`` (no ``NaN``/``Infinity``, which TF
    Serving accepts, no integers beyond 64 bits, no lone surrogates), so a body it refuses
    is parsed again by ``json``: the answer is always ``json``'s, only faster. The one
    difference left, an integer literal beyond 64 bits that orjson reads as a float (``json``
    as an integer, which a float tensor refuses), is caught after decoding: a float of 2**63
    or more from an orjson document raises InexactParseError, and the body is parsed again
    by ``json`` (a pre-scan of the body for such literals cost more than the parse itself).
    """
    if _orjson is not None and not exact:
        try:
            return _orjson.loads(raw), False
        except _orjson.JSONDecodeError:
            pass
    try:
        return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw), True
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PredictRequestError(f"JSON Parse error: {str(exc)[:200]}") from None


@dataclass(frozen=True)
class DecodeLimits:
    """What one request may ask the agent to allocate ([limits] in the config)."""

    max_batch: int = 1024
    """Instances (rows of the batch dimension) per request."""
    max_tensor_bytes: int = 32 << 20
    """Bytes of one decoded input tensor (batch x shape x dtype size)."""


@dataclass(frozen=True)
class DecodedRequest:
    """Model inputs (batched, in the caller's dtypes) and the answer's form."""

    inputs: list[np.ndarray]
    row: bool
    """True for ``instances`` (answer ``predictions``), False for ``inputs`` (``outputs``)."""


_TF_TENSOR_NAME = re.compile(r"^serving_default_(?P<key>.+):\d+$")
_FLOAT32_EXACT_INT = (1 << 24) - 1
"""The largest integer float32 holds exactly: TF Serving refuses larger ones as lossy."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def signature_key(tensor_name: str) -> str:
    """The SavedModel signature key a TF Serving client uses for an input: TF's TFLite
    converter names the tensor of key ``image`` ``serving_default_image:0``."""
    match = _TF_TENSOR_NAME.match(tensor_name)
    return match.group("key") if match else tensor_name


def tensor_keys(specs: Sequence[TensorSpec]) -> list[str]:
    """The names TF Serving would use for these tensors: the model's SignatureDef keys
    (``TensorSpec.key``), else the key in a converter's tensor name
    (``signature_key``), else the tensor names themselves where keys would collide."""
    keys = [s.key or signature_key(s.name) for s in specs]
    return keys if len(set(keys)) == len(keys) else [s.name for s in specs]


def caller_dtype(spec: TensorSpec) -> np.dtype:
    """The dtype a caller sends for this input: float32 for float and quantized tensors."""
    if spec.quantized or np.dtype(spec.dtype).kind == "f":
        return np.dtype(np.float32)
    return np.dtype(spec.dtype)


def _named_values(given: dict[str, Any], specs: Sequence[TensorSpec], where: str) -> list[Any]:
    """The values of a document naming each input, by tensor name or by signature key."""
    if set(given) == {s.name for s in specs}:
        return [given[s.name] for s in specs]
    keys = tensor_keys(specs)
    if set(given) == set(keys):
        return [given[k] for k in keys]
    raise PredictRequestError(f"{where} must name exactly the inputs {keys}")


def _leading_shape(value: Any) -> list[int]:
    """The shape the first elements describe (TF Serving's GetDenseTensorShape):
    enough to size the tensor before it is allocated; rectangularity is checked after."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _holds_bool(value: Any) -> bool:
    """Whether a nested list holds a JSON ``true``/``false`` (numpy would read it as 1/0)."""
    if type(value) is bool:
        return True
    if isinstance(value, list):
        if value and not isinstance(value[0], list):
            return any(type(v) is bool for v in value)
        return any(_holds_bool(v) for v in value)
    return False


def _shape_text(spec: TensorSpec) -> list[Any]:
    return ["batch" if i == 0 else d for i, d in enumerate(spec.shape)]


def strict_array(
    value: Any,
    dtype: np.dtype,
    label: str,
    maybe_bools: bool = True,
    shape: Sequence[int] | None = None,
    exact_integers: bool = True,
) -> np.ndarray:
    """JSON values (nested lists) as an array of ``dtype`` by TF Serving's rules (the
    table above), or PredictRequestError; ``shape``: the leading shape, when known;
    ``exact_integers``: False for values orjson parsed (see ``loads_json``)."""
    dtype = np.dtype(dtype)
    if shape is None:
        shape = list(value.shape) if isinstance(value, np.ndarray) else _leading_shape(value)
    try:
        found = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # ragged lists
        raise PredictRequestError(
            f"{label} must be a rectangular array of {dtype.name} values ({str(exc)[:120]})"
        ) from None
    kind = found.dtype.kind
    if found.shape != tuple(shape) or kind == "O":
        # ragged (older numpy makes an object array), nested objects, null, huge integers
        raise PredictRequestError(
            f"{label} must be a rectangular array of {dtype.name} values "
            "(numbers only: no null, strings, objects or ragged lists)"
        )
    if kind in "US":
        raise PredictRequestError(f"{label} takes {dtype.name} values: strings are not numbers")
    if not exact_integers and kind == "f" and found.size and np.abs(found).max() >= _INEXACT_FLOAT:
        raise InexactParseError()
    if dtype.kind == "b":
        if kind != "b":
            raise PredictRequestError(f"{label} takes bool values: true or false only")
        array = found
    elif kind == "b" or (maybe_bools and _holds_bool(value)):
        raise PredictRequestError(f"{label} takes {dtype.name} values: true/false are not numbers")
    elif dtype.kind in "iu":
        if kind == "f":
            raise PredictRequestError(
                f"{label} takes {dtype.name} values: JSON integers only (1, not 1.0 or 1.5)"
            )
        info = np.iinfo(dtype)
        if found.size and (found.min() < info.min or found.max() > info.max):
            raise PredictRequestError(
                f"{label}: a value is outside {dtype.name}'s range [{info.min}, {info.max}]"
            )
        array = found.astype(dtype, copy=False)
    else:  # float32 from JSON numbers
        if kind in "iu" and found.size and np.abs(found).max() > _FLOAT32_EXACT_INT:
            raise PredictRequestError(
                f"{label}: an integer beyond 2**24 cannot be a float32 without loss of precision"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            array = found.astype(np.float32)
        if kind == "f" and not np.isfinite(array).all():
            overflow = np.isinf(array) & np.isfinite(found)
            if overflow.any():
                raise PredictRequestError(
                    f"{label}: a value is beyond float32's range (+-{_FLOAT32_MAX:.4g})"
                )
    return array


def _tensor(
    value: Any, spec: TensorSpec, where: str, limits: DecodeLimits, maybe_bools: bool,
    exact_integers: bool = True,
) -> np.ndarray:
    dtype = caller_dtype(spec)
    label = f"{where}: input '{spec.name}'"
    if dtype.kind not in "fiub":
        raise PredictRequestError(
            f"{label} has dtype {dtype.name}: the agent serves numeric and bool inputs only "
            "({\"b64\": ...} strings are not supported)"
        )
    shape = _leading_shape(value)
    if shape and shape[0] == 0:
        raise PredictRequestError(f"{where}: empty batch")
    if len(shape) != len(spec.shape):
        raise PredictRequestError(
            f"{label} has shape {shape}, the model expects {_shape_text(spec)} (-1: any size)"
        )
    if shape[0] > limits.max_batch:
        raise PredictRequestError(
            f"{label}: batch of {shape[0]} instances exceeds the limit of {limits.max_batch} "
            "([limits] max_batch); split the request"
        )
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise PredictRequestError(
            f"{label}: {shape} {dtype.name} is {nbytes} bytes, over the limit of "
            f"{limits.max_tensor_bytes} ([limits] max_tensor_bytes)"
        )
    array = strict_array(value, dtype, label, maybe_bools, shape, exact_integers)
    expected = spec.shape
    if any(want not in (-1, got) for want, got in zip(expected[1:], array.shape[1:])):
        raise PredictRequestError(
            f"{label} has shape {list(array.shape)}, the model expects {_shape_text(spec)} (-1: any size)"
        )
    return array


def decode_request(
    body: Any,
    signature: ModelSignature,
    limits: DecodeLimits = DecodeLimits(),
    *,
    maybe_bools: bool = True,
    signature_names: Sequence[str] = ("serving_default",),
    exact_integers: bool = True,
) -> DecodedRequest:
    """A parsed request document -> the model's inputs, or PredictRequestError.

    ``maybe_bools``: whether the document may hold ``true``/``false`` at all (the
    HTTP layer passes False when the body's bytes hold neither word, which spares
    a walk over every value: numpy alone would read ``true`` as 1 among numbers).
    ``signature_names``: the names ``signature_name`` may give (the model's own first).
    ``exact_integers``: False for a document orjson parsed (``loads_json``).
    """
    if not isinstance(body, dict):
        raise PredictRequestError("request body must be a JSON object with 'instances' or 'inputs'")
    signature_name = body.get("signature_name", "serving_default")
    if signature_name not in (*signature_names, "", None):
        raise PredictRequestError(
            f"unknown signature_name {signature_name!r}: this model has "
            + ", ".join(repr(n) for n in signature_names)
        )
    specs = signature.inputs
    if ("instances" in body) == ("inputs" in body):
        raise PredictRequestError(
            "request must have exactly one of 'instances' (row format) or 'inputs' (columnar)"
        )

    def tensor(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
        return _tensor(value, spec, where, limits, maybe_bools, exact_integers)

    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise PredictRequestError("'instances' must be a non-empty list")
        if len(instances) > limits.max_batch:
            raise PredictRequestError(
                f"batch of {len(instances)} instances exceeds the limit of {limits.max_batch} "
                "([limits] max_batch); split the request"
            )
        first = instances[0]
        if isinstance(first, dict) and not (len(first) == 1 and "b64" in first):  # a b64 value is no name
            columns: list[list[Any]] = [[] for _ in specs]
            for row, instance in enumerate(instances):
                if not isinstance(instance, dict):
                    raise PredictRequestError(
                        f"instances[{row}] must name exactly the inputs {tensor_keys(specs)}"
                    )
                for i, value in enumerate(_named_values(instance, specs, f"instances[{row}]")):
                    columns[i].append(value)
            return DecodedRequest([tensor(c, s, "instances") for c, s in zip(columns, specs)], True)
        if len(specs) != 1:
            raise PredictRequestError(
                f"the model has {len(specs)} inputs: each instance must be an object naming {tensor_keys(specs)}"
            )
        return DecodedRequest([tensor(instances, specs[0], "instances")], True)
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        values = _named_values(inputs, specs, "'inputs'")
        arrays = [tensor(v, s, "inputs") for v, s in zip(values, specs)]
        batches = {len(a) for a in arrays}
        if len(batches) > 1:
            raise PredictRequestError(
                "'inputs' have different batch sizes "
                f"({', '.join(f'{k}: {len(a)}' for k, a in zip(tensor_keys(specs), arrays))}): "
                "every input needs one row per instance"
            )
        return DecodedRequest(arrays, False)
    if len(specs) != 1:
        raise PredictRequestError(
            f"the model has {len(specs)} inputs: 'inputs' must be an object naming them"
        )
    return DecodedRequest([tensor(inputs, specs[0], "inputs")], False)


def build_inputs(body: Any, signature: ModelSignature) -> tuple[list[np.ndarray], bool]:
    """``decode_request`` with the default limits, as (inputs, row form)."""
    decoded = decode_request(body, signature)
    return decoded.inputs, decoded.row


def format_outputs(
    outputs: Sequence[np.ndarray], signature: ModelSignature, row: bool
) -> dict[str, Any]:
    """Model outputs -> TF Serving's response (``predictions`` rows or ``outputs`` columns)."""
    if len(outputs) == 1:
        return {"predictions": outputs[0].tolist()} if row else {"outputs": outputs[0].tolist()}
    names = tensor_keys(signature.outputs)  # TF Serving answers under the SignatureDef's output keys
    if row:
        lists = [o.tolist() for o in outputs]
        return {"predictions": [dict(zip(names, values)) for values in zip(*lists)]}
    return {"outputs": {n: o.tolist() for n, o in zip(names, outputs)}}


# -- the fast path for one float tensor (a camera frame) --------------------------------------------

_NUMBER_BYTES = b"0123456789.eE+- \t\r\n"
"""What a JSON number (and JSON whitespace) is made of: deleting these bytes from a body leaves
its skeleton of brackets, commas, braces and keys."""
_FAST_KEYS = {b"instancs": "instances", b"inputs": "inputs"}
"""The body's one key as its skeleton shows it (``e`` is a number byte), and the key itself,
which simdjson then looks up: a key whose skeleton matches but whose bytes differ
(``inst1ances``) is not found, and the exact path answers."""


@functools.lru_cache(maxsize=32)
def _instance_skeleton(dims: tuple[int, ...]) -> bytes:
    """The skeleton of one instance of shape ``dims`` (``[[,,],[,,]]`` for (2, 3))."""
    if not dims:
        return b""
    inner = _instance_skeleton(dims[1:])
    return b"[" + b",".join([inner] * dims[0]) + b"]"


def decode_request_fast(raw: bytes, signature: ModelSignature, limits: DecodeLimits = DecodeLimits()) -> DecodedRequest | None:
    """A body that is exactly ``{"instances": A}`` or ``{"inputs": A}``, ``A`` a rectangular
    array of plain JSON numbers of the model's one float input's shape, decoded with simdjson
    (about 4x faster than orjson, which builds a Python float per value); None for anything
    else, which ``loads_json`` + ``decode_request`` then decode (with every answer and every
    error they give today).

    The fast path takes only what both paths read alike, and gives the same float32 values
    (both parsers round each number correctly to a double, then to float32):

    - the shape: simdjson flattens the array, so its structure is checked on the body's
      skeleton, the bytes left once the number bytes are deleted (``_NUMBER_BYTES``): for a
      rectangular array of shape (n, *dims) of numbers, one exact string. Ragged lists,
      strings, ``null``, ``true``, objects, ``NaN``/``Infinity``, a second key differ from it;
      a number simdjson refuses (``01``, ``1e400``, beyond 64 bits) is a parse error; both fall
      through to the exact path;
    - the values: any magnitude of 2**24 or more (where an integer literal is refused as lossy for
      float32, and float32's range ends) falls through too, so only values the exact path
      accepts as they are come out of the fast path;
    - the bounds: the batch and the tensor's bytes are within ``limits`` (else the exact path
      gives its 400).
    """
    if _simdjson is None or len(signature.inputs) != 1:
        return None
    spec = signature.inputs[0]
    dims = tuple(spec.shape[1:])
    if caller_dtype(spec) != np.float32 or len(spec.shape) < 2 or any(d <= 0 for d in dims):
        return None
    skeleton = raw.translate(None, _NUMBER_BYTES)
    if not skeleton.startswith(b'{"') or not skeleton.endswith(b"]}"):
        return None
    key_end = skeleton.find(b'":[', 2)
    name = _FAST_KEYS.get(skeleton[2:key_end]) if key_end > 0 else None
    if name is None:
        return None
    instance = _instance_skeleton(dims)
    head = key_end + 2  # the skeleton's array starts here
    batch, left = divmod(len(skeleton) - head - 2, len(instance) + 1)  # "[" n instances, n-1 commas "]}"
    count = batch * int(np.prod(dims))
    if left or not 0 < batch <= limits.max_batch or count * 4 > limits.max_tensor_bytes:
        return None
    if skeleton[head:] != b"[" + b",".join([instance] * batch) + b"]}":
        return None
    try:
        document = _simdjson.Parser().parse(raw)
        values = np.frombuffer(document[name].as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, TypeError, KeyError, RuntimeError):  # not what the skeleton promised: the exact path decides
        return None
    if values.size != count or not values.size or np.abs(values).max() > _FLOAT32_EXACT_INT:
        return None
    return DecodedRequest([values.astype(np.float32).reshape((batch, *dims))], name == "instances")
