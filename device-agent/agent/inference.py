"""The serving core every protocol front end goes through: resolve the model a request
names, turn the caller's tensors into checked arrays, run the model, count what happened.

TF Serving REST (``server.py``), the Open Inference Protocol over REST (``oip.py``) and
gRPC (``grpc_server.py``) differ only in how a request is framed. Each of them:

1. resolves the model through ``resolve`` (a ``Servables`` lookup: a name, a serving
   version number or bundle version string, or a label; an unknown one is the caller's
   404 / NOT_FOUND, a name with nothing loaded a 503 / UNAVAILABLE);
2. builds its input arrays with ``tensor_from_values`` / ``tensor_from_bytes``, which
   apply the same ``DecodeLimits`` (batch, tensor bytes) *before* anything is allocated and
   the same dtype rules as ``decoding.py``; a refusal is a ``PredictRequestError``, counted
   with ``caller_error`` (never against the model's health);
3. runs the model with ``predict``, which goes through ``ServingModel.predict`` (the
   model's own failures are counted there, and only there).
"""

from __future__ import annotations

__all__ = [
    "OIP_DTYPES",
    "OneModelServables",
    "as_servables",
    "caller_error",
    "check_bounds",
    "oip_datatype",
    "predict",
    "resolve",
    "signature_names",
    "tensor_from_bytes",
    "tensor_from_values",
    "tensor_order",
    "version_text",
]

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .decoding import DecodeLimits, PredictRequestError, caller_dtype, strict_array
from .runtimes import TensorSpec, tensor_aliases
from .servables import ModelVersions, ServableNotFoundError, Servables
from .serving import LoadedModel, NoModelError, ServingModel

OIP_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
"""The Open Inference Protocol's tensor data types the agent's runtimes serve (no BYTES)."""
_OIP_NAMES = {dtype.name: name for name, dtype in OIP_DTYPES.items()}


def version_text(model: LoadedModel) -> str:
    """A model's version as TF Serving and OIP clients see it: its serving version number,
    or its bundle version where it has none (0: loaded by a caller that assigns none)."""
    return str(model.serving_version) if model.serving_version > 0 else model.version


def tensor_order(specs: Sequence[TensorSpec], names: Sequence[str], keys: Sequence[str], what: str) -> list[int]:
    """For each name a request gives, the index of the tensor it names: its key (what the
    metadata lists), its own name or an alias. Unlike golden vectors, a protocol request
    must name its tensors right even when the model has only one (a typo is the caller's 400)."""
    found: list[int] = []
    for name in names:
        index = next((i for i, spec in enumerate(specs) if name in (keys[i], *tensor_aliases(spec))), -1)
        if index < 0:
            raise PredictRequestError(f"no {what} named '{name}' (the model's {what}s: {', '.join(keys)})")
        if index in found:
            raise PredictRequestError(f"{what} '{name}' names the same tensor as another {what}")
        found.append(index)
    return found


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP name of a numpy dtype (``float32`` -> ``FP32``)."""
    return _OIP_NAMES.get(np.dtype(dtype).name, "BYTES")


class OneModelServables(Servables):
    """A bare ``ServingModel`` seen as a catalogue of one model: its name is whatever the
    serving model is called now (a single-model agent replaces its model by any name)."""

    def __init__(self, serving: ServingModel) -> None:
        super().__init__()
        self._serving = serving
        self._versions: ModelVersions | None = None

    def _current(self) -> ModelVersions | None:
        model = self._serving.current
        if model is None:
            return None
        found = self._versions
        if found is None or found.name != model.name:
            found = ModelVersions(model.name)
            found.serving = self._serving
            self._versions = found
        return found

    def ensure(self, name: str) -> ModelVersions:
        found = self._current()
        if found is not None and found.name == name:
            return found
        raise RuntimeError("a single-model agent's catalogue cannot add models")

    def get(self, name: str) -> ModelVersions:
        found = self._current()
        if found is None:
            raise NoModelError("no model is serving (install one with `edgeship-agent install PACKAGE`)")
        if found.name != name:
            raise ServableNotFoundError(
                f"Servable not found for request: Latest({name}); this agent serves {found.name}"
            )
        return found

    def remove(self, name: str) -> ModelVersions | None:
        return None

    def names(self) -> list[str]:
        found = self._current()
        return [] if found is None else [found.name]

    def __iter__(self) -> Iterator[ModelVersions]:
        found = self._current()
        return iter([] if found is None else [found])

    def serving(self, name: str) -> ServingModel:
        return self._serving


def as_servables(servables: Servables | ServingModel) -> Servables:
    """A catalogue from either form (a ``ServingModel``: the single-model form)."""
    return OneModelServables(servables) if isinstance(servables, ServingModel) else servables


def resolve(
    servables: Servables, name: str, version: str | None = None, label: str | None = None
) -> LoadedModel:
    """The loaded version a request names. A number is a serving version first and, when no
    loaded version has that number, a bundle version string (a bundle versioned ``3``)."""
    try:
        return servables.resolve(name, version, label)
    except ServableNotFoundError:
        if version is None or not version.isdigit():
            raise
        for model in servables.get(name).loaded():
            if model.version == version:
                return model
        raise


def predict(
    servables: Servables, model: LoadedModel, inputs: Sequence[np.ndarray]
) -> tuple[LoadedModel, list[np.ndarray]]:
    """Run ``model`` (already resolved) through its name's ``ServingModel``: the model's own
    failures are counted there; a model whose name was removed meanwhile still finishes."""
    try:
        serving = servables.get(model.name).serving
    except (ServableNotFoundError, NoModelError):
        serving = ServingModel()
    return serving.predict(inputs, model)


def caller_error(model: LoadedModel) -> None:
    """Count a request refused as the caller's mistake (apart from the model's health)."""
    model.stats.error("bad_request")


def signature_names(model: LoadedModel) -> tuple[str, ...]:
    """The signature names a request may give: the model's own (``serve`` for a Keras
    export converted under that key) and ``serving_default``, which every model answers to."""
    own = getattr(model.runner, "signature_name", "") or "serving_default"
    return (own,) if own == "serving_default" else (own, "serving_default")


def _shape_text(spec: TensorSpec) -> list[Any]:
    return ["batch" if i == 0 else d for i, d in enumerate(spec.shape)]


def check_bounds(
    shape: Sequence[int], dtype: np.dtype, spec: TensorSpec, limits: DecodeLimits, label: str
) -> None:
    """Refuse a tensor before it is allocated: rank and fixed dimensions against the
    model's, then the batch and the tensor's bytes against ``limits``."""
    shape = list(shape)
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape):
        raise PredictRequestError(f"{label}: shape {shape} must be a list of non-negative integers")
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], shape[1:])
    ):
        raise PredictRequestError(
            f"{label} has shape {shape}, the model expects {_shape_text(spec)} (-1: any size)"
        )
    if not shape or shape[0] == 0:
        raise PredictRequestError(f"{label}: empty batch")
    if shape[0] > limits.max_batch:
        raise PredictRequestError(
            f"{label}: batch of {shape[0]} exceeds the limit of {limits.max_batch} "
            "([limits] max_batch); split the request"
        )
    nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if nbytes > limits.max_tensor_bytes:
        raise PredictRequestError(
            f"{label}: {shape} {np.dtype(dtype).name} is {nbytes} bytes, over the limit of "
            f"{limits.max_tensor_bytes} ([limits] max_tensor_bytes)"
        )


def _expected_dtype(spec: TensorSpec, given: np.dtype, label: str) -> np.dtype:
    want = caller_dtype(spec)
    if given != want:
        raise PredictRequestError(
            f"{label} has datatype {oip_datatype(given)}, the model takes {oip_datatype(want)}"
        )
    return want


def tensor_from_bytes(
    raw: bytes | bytearray | memoryview,
    dtype: np.dtype,
    shape: Sequence[int],
    spec: TensorSpec,
    limits: DecodeLimits,
    label: str,
) -> np.ndarray:
    """Raw little-endian tensor bytes (OIP's binary extension, gRPC raw contents, a TF
    ``tensor_content``) as an array, checked: dtype, shape and limits first, then that the
    byte count is exactly what the shape says."""
    dtype = _expected_dtype(spec, np.dtype(dtype), label)
    check_bounds(shape, dtype, spec, limits, label)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise PredictRequestError(
            f"{label}: {len(raw)} bytes of data, the shape {list(shape)} of {oip_datatype(dtype)} "
            f"needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise PredictRequestError(f"{label}: BOOL bytes must be 0 or 1")
    return array


def tensor_from_values(
    values: Any,
    dtype: np.dtype,
    shape: Sequence[int],
    spec: TensorSpec,
    limits: DecodeLimits,
    label: str,
    exact_integers: bool = True,
) -> np.ndarray:
    """JSON or protobuf values (flat in row-major order, or nested as the shape) as an
    array, checked by ``decoding.py``'s rules (numbers only into numeric tensors, integers
    only into integer ones, ``true``/``false`` only into bool ones)."""
    dtype = _expected_dtype(spec, np.dtype(dtype), label)
    check_bounds(shape, dtype, spec, limits, label)
    array = strict_array(values, dtype, label, exact_integers=exact_integers)
    count = int(np.prod(shape, dtype=np.int64))
    if array.size != count or (array.ndim != 1 and list(array.shape) != list(shape)):
        raise PredictRequestError(
            f"{label}: {array.size} values for shape {list(shape)} ({count} values; flat or nested as the shape)"
        )
    return array.reshape(shape)
