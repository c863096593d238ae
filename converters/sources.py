"""Source models: what kind a MODEL path is, loading Keras / SavedModel models
with TensorFlow, and one runner interface over every kind.

Keras and SavedModel references run in TensorFlow here; ``.tflite`` and
``.onnx`` files run through ``edgeship.agent.runtimes`` (the device's code), so
``validate`` and ``bench`` compare like with like.
"""

from __future__ import annotations

__all__ = [
    "SOURCE_KINDS",
    "KerasRunner",
    "check_runner_inputs",
    "detect_source_kind",
    "import_tensorflow",
    "keras_output_names",
    "load_keras_or_savedmodel",
    "open_any_model",
    "serving_function",
    "stdout_to_stderr",
]

import contextlib
import os
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import (
    ModelLoadError,
    ModelRunner,
    ModelSignature,
    RuntimeUnavailableError,
    TensorSpec,
    detect_model_format,
    open_model,
)
from edgeship.ota.errors import BadInputError, MissingExtraError, first_line, require_module

SOURCE_KINDS = ("keras", "h5", "savedmodel", "onnx", "tflite", "sklearn")
SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle")


def detect_source_kind(path: str | os.PathLike[str]) -> str:
    """One of SOURCE_KINDS, from the path's content; ModelLoadError when it is none of them."""
    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return "savedmodel"
        raise ModelLoadError(f"{p}: a folder, but not a SavedModel (no saved_model.pb inside)")
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such model file or folder")
    try:
        with open(p, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read model: {exc.strerror or exc}") from None
    if p.suffix == ".keras" or (head[:2] == b"PK" and p.suffix not in (".onnx", ".tflite")):
        if not zipfile.is_zipfile(p):
            raise ModelLoadError(f"{p}: not a valid .keras file (not a zip archive; corrupt or truncated?)")
        return "keras"
    if p.suffix in (".h5", ".hdf5") or head[:8] == b"\x89HDF\r\n\x1a\n":
        if head[:8] != b"\x89HDF\r\n\x1a\n":
            raise ModelLoadError(f"{p}: not a valid HDF5 Keras file (corrupt or truncated?)")
        return "h5"
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if p.suffix == ".onnx" or (head[:1] == b"\x08" and p.suffix != ".tflite"):
        return "onnx"  # an ONNX ModelProto starts with field 1, ir_version
    if p.suffix == ".tflite":
        return detect_model_format(p)  # raises the runtime layer's message
    if p.suffix.lower() in SKLEARN_SUFFIXES:
        return "sklearn"  # a pickle: never opened here (loading it runs code)
    raise ModelLoadError(
        f"{p}: unknown model format (expected a .keras or .h5 file, a SavedModel folder, an .onnx or a .tflite file, "
        "or a scikit-learn .joblib/.pkl)"
    )


def import_tensorflow() -> Any:
    """TensorFlow, quietly (its C++ logging off unless asked), or MissingExtraError."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return require_module("tensorflow", "convert")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """See ``_stdout_to_stderr``; inside ``quiet_output`` the output goes nowhere."""
    from .quiet import quiet_active

    if quiet_active():
        sys.stdout.flush()
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
        return
    with _stdout_to_stderr():
        yield


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever TensorFlow and friends print to stdout to stderr instead.

    The TFLite converter and Keras' export print ("Saved artifact at ...") from
    Python and from C++; ``--json`` promises that stdout holds one JSON document.
    Both the Python-level stream and file descriptor 1 are redirected.
    """
    sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
    except OSError:  # pragma: no cover - no fd 1
        saved_fd = -1
    try:
        if saved_fd >= 0:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # pragma: no cover - a closed or broken stream
            pass
        if saved_fd >= 0:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def load_keras_or_savedmodel(path: str | os.PathLike[str], kind: str | None = None) -> Any:
    """A Keras model (for .keras/.h5) or a loaded SavedModel (tf.saved_model.load)."""
    p = Path(path)
    kind = kind or detect_source_kind(p)
    tf = import_tensorflow()
    try:
        with stdout_to_stderr():
            if kind in ("keras", "h5"):
                return tf.keras.models.load_model(p, compile=False)
            if kind == "savedmodel":
                return tf.saved_model.load(str(p))
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile, ImportError, AttributeError) as exc:
        raise ModelLoadError(f"{p}: TensorFlow cannot load this {kind} model: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises many internal error types on corrupt files
        raise ModelLoadError(f"{p}: TensorFlow cannot load this {kind} model: {first_line(exc)}") from None
    raise ModelLoadError(f"{p}: a {kind} model is not a Keras model or a SavedModel")


def serving_function(model: Any) -> Any:
    """The concrete function a SavedModel serves (its default signature)."""
    signatures = getattr(model, "signatures", None)
    if signatures is None:
        return None
    if "serving_default" in signatures:
        return signatures["serving_default"]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    return None


class KerasRunner(ModelRunner):
    """A Keras model or SavedModel behind the runtime interface (float in, float out)."""

    def __init__(self, path: Path, model: Any, kind: str) -> None:
        tf = import_tensorflow()
        self.runtime = "tensorflow"
        self.runtime_version = str(tf.__version__)
        self.path = path
        self.kind = kind
        self._tf = tf
        self._model = model
        self._lock = threading.Lock()
        if kind == "savedmodel":
            fn = serving_function(model)
            if fn is None:
                raise ModelLoadError(f"{path}: SavedModel has no 'serving_default' signature to run")
            self._fn = fn
            specs = fn.structured_input_signature[1]
            self._input_keys = sorted(specs)
            inputs = tuple(_spec_from_tf(key, specs[key]) for key in self._input_keys)
            outputs_struct = fn.structured_outputs
            self._output_keys = sorted(outputs_struct)
            outputs = tuple(_spec_from_tf(key, outputs_struct[key]) for key in self._output_keys)
        else:
            self._fn = None
            # The reference runs as a compiled graph, traced once for any batch
            # size: timing eager Keras (Python per layer) would inflate every
            # speed-up reported against it.
            specs = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in model.inputs]
            single = len(specs) == 1

            @tf.function(input_signature=specs, reduce_retracing=True)
            def graph(*xs: Any) -> Any:
                return model(xs[0] if single else list(xs), training=False)

            self._graph = graph
            inputs = tuple(
                TensorSpec(_keras_name(t), tuple(-1 if d is None else int(d) for d in t.shape), _dtype_name(t.dtype))
                for t in model.inputs
            )
            outputs = tuple(
                TensorSpec(name, tuple(-1 if d is None else int(d) for d in t.shape), _dtype_name(t.dtype))
                for name, t in zip(keras_output_names(model), model.outputs)
            )
        self.signature = ModelSignature(inputs=inputs, outputs=outputs)

    @property
    def model(self) -> Any:
        return self._model

    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._fn is not None:
                result = self._fn(**{k: self._tf.constant(x) for k, x in zip(self._input_keys, inputs)})
                return [np.asarray(result[k]) for k in self._output_keys]
            result = self._graph(*[self._tf.convert_to_tensor(x) for x in inputs])
            if isinstance(result, dict):
                result = [result[k] for k in sorted(result)]
            if not isinstance(result, (list, tuple)):
                result = [result]
            return [np.asarray(r) for r in result]

    def close(self) -> None:
        self._model = None
        self._fn = None
        self._graph = None


def keras_output_names(model: Any) -> list[str]:
    """The model's output names: Keras 2's ``output_names``, or (Keras 3) the name
    of the layer that produces each output."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == len(model.outputs):
        return [str(n) for n in names]
    found = []
    for tensor in model.outputs:
        history = getattr(tensor, "_keras_history", None)
        operation = getattr(history, "operation", None) or getattr(history, "layer", None)
        found.append(str(getattr(operation, "name", None) or _keras_name(tensor)))
    return found


def _keras_name(tensor: Any) -> str:
    name = str(getattr(tensor, "name", "input"))
    return name.split(":")[0]


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype))


def _spec_from_tf(name: str, spec: Any) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name, shape, spec.dtype.name)


def open_any_model(path: str | os.PathLike[str], *, threads: int | None = None) -> ModelRunner:
    """A runner for any MODEL: TFLite/ONNX via the device runtimes, Keras/SavedModel via TensorFlow.

    On the workstation a missing runtime is a missing extra (exit 5), not the
    device's RuntimeUnavailableError (exit 4: the device refuses the model).
    """
    try:
        return _open_any_model(Path(path), threads)
    except RuntimeUnavailableError as exc:
        raise MissingExtraError(exc.message) from None


def _open_any_model(p: Path, threads: int | None) -> ModelRunner:
    kind = detect_source_kind(p)
    if kind == "tflite":
        from .tflite_flatbuffer import read_tflite_graph

        # Select TF ops run only in TensorFlow's interpreter (LiteRT lacks the Flex delegate).
        flex = read_tflite_graph(p).select_tf_ops
        if not flex:
            return open_model(p, threads=threads)
        try:
            return open_model(p, threads=threads, prefer=["tensorflow"])
        except (AttributeError, ImportError) as exc:  # the runtime layer could not reach TF's interpreter
            raise ModelLoadError(
                f"{p}: uses Select TF ops ({', '.join(flex)}); TensorFlow's TFLite interpreter is not usable here ({exc})"
            ) from None
    if kind == "onnx":
        return open_model(p, threads=threads)
    tf = import_tensorflow()
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialized: TensorFlow keeps its first setting
            pass
    return KerasRunner(p, load_keras_or_savedmodel(p, kind), kind)




FEEDABLE_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool")


def check_runner_inputs(runner: ModelRunner, where: str) -> None:
    """Refuse models whose inputs the data path cannot feed (strings, complex numbers)."""
    for spec in runner.signature.inputs:
        if spec.dtype not in FEEDABLE_DTYPES:
            raise BadInputError(
                f"{where}: input '{spec.name}' has dtype {spec.dtype}; edgeship feeds float, integer and boolean inputs"
            )
