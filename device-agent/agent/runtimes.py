"""Model runtimes behind one small interface: load a ``.tflite`` or ``.onnx``
file, describe its signature, run it with float inputs and outputs.

TFLite models run on LiteRT (``ai_edge_litert``), ``tflite_runtime`` or
``tensorflow.lite``, whichever is installed, in that order of preference; ONNX
models on ONNX Runtime (TensorRT and CUDA providers first where present, as on a
Jetson, then CPU). The agent serves through this module and the host's
``validate``/``bench`` run converted models through it too, so a model is
checked on the workstation by the same code that will run it on the device.

Quantized (int8/uint8) inputs and outputs are handled here from the model's own
scales and zero points: callers pass and receive float32.

It also decides whether a bundle can run here at all (``check_bundle_runtime``: format,
architecture, the TFLite version rules), before anything is loaded. Longer than the
project's usual module: one concept, the runtimes, and what each one can open.
"""

from __future__ import annotations

__all__ = [
    "TFLITE_RUNTIMES",
    "HotCalls",
    "ModelLoadError",
    "ModelRunner",
    "ModelSignature",
    "RuntimeUnavailableError",
    "TensorSpec",
    "LITERT_TFLITE_FLOOR",
    "available_runtimes",
    "check_bundle_runtime",
    "detect_model_format",
    "match_names",
    "open_model",
    "tensor_aliases",
    "tflite_runtime_order",
    "tflite_version_ok",
    "version_tuple",
]

import importlib
import importlib.util
import os
import platform
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgeship.ota.errors import EXIT_REJECTED, BadInputError, EdgeshipError, first_line

TFLITE_RUNTIMES: tuple[str, ...] = ("litert", "tflite_runtime", "tensorflow")
"""TFLite interpreters in order of preference."""
_TFLITE_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "ai_edge_litert"),
    "tflite_runtime": ("tflite_runtime.interpreter", "tflite_runtime"),
    "tensorflow": ("tensorflow.lite.python.interpreter", "tensorflow"),
}


class ModelLoadError(BadInputError):
    """The model file is corrupt, truncated, of an unknown format, or will not load."""


class RuntimeUnavailableError(EdgeshipError):
    """No installed runtime can run this model (the device lacks what it needs)."""

    family = "runtime_unavailable"

    exit_code = EXIT_REJECTED


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (-1 for a dynamic dimension), dtype,
    per-tensor quantization (scale 0.0 when the tensor is not quantized) and
    ``key``: its key in the model's SignatureDef where the file has one (a
    TFLite model converted from TensorFlow: ``image`` for the tensor
    ``serving_default_image:0``, ``output_0`` for ``StatefulPartitionedCall:0``),
    the name TensorFlow Serving would answer under; "" where there is none."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0
    key: str = ""

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype in ("int8", "uint8", "int16")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            shape=tuple(int(d) for d in data["shape"]),
            dtype=str(data["dtype"]),
            scale=float(data.get("scale", 0.0)),
            zero_point=int(data.get("zero_point", 0)),
            key=str(data.get("key", "")),
        )


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSignature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )


_NAME_PREFIXES = ("serving_default_", "StatefulPartitionedCall_")


def tensor_aliases(spec: TensorSpec) -> tuple[str, ...]:
    """The names a tensor answers to, most specific first (pure): its own name,
    its SignatureDef key, and its name without TensorFlow's decorations
    (``serving_default_image:0`` -> ``image``)."""
    base = spec.name.split(":")[0]
    for prefix in _NAME_PREFIXES:
        base = base.removeprefix(prefix)
    found: list[str] = []
    for alias in (spec.name, spec.key, base):
        if alias and alias not in found:
            found.append(alias)
    return tuple(found)


def match_names(specs: Sequence[TensorSpec], names: Sequence[str], what: str = "input") -> list[int]:
    """For each of ``names``, the index of the tensor in ``specs`` it names (pure).

    Tensors are matched by name, never by position: a name matches a tensor's
    own name first, then its SignatureDef key, then its undecorated name. The
    one exception is a single tensor on both sides, whatever it is called.

    Raises:
        BadInputError: a name matches no tensor or the same tensor as another.
    """
    if len(specs) == 1 and len(names) == 1:
        return [0]
    chosen: list[int] = []
    for name in names:
        aliases = [tensor_aliases(s) for s in specs]
        index = next((i for level in range(3) for i, known in enumerate(aliases)
                      if len(known) > level and known[level] == name), None)
        if index is None:
            known = ", ".join(a[-1] for a in aliases)
            raise BadInputError(f"no {what} named '{name}' (the model's {what}s: {known})")
        if index in chosen:
            raise BadInputError(f"{what} '{name}' names the same tensor as another {what}")
        chosen.append(index)
    return chosen


def quantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float values to the tensor's integer domain (pass-through if already that dtype)."""
    target = np.dtype(spec.dtype)
    if values.dtype == target or not spec.quantized:
        return values.astype(target, copy=False)
    info = np.iinfo(target)
    q = np.round(values.astype(np.float32) / spec.scale + spec.zero_point)
    return np.clip(q, info.min, info.max).astype(target)


def dequantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if not spec.quantized:
        return values.astype(np.float32, copy=False) if values.dtype.kind == "f" else values
    return (values.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)


class HotCalls(NamedTuple):
    """A single float input to a single float output, as bound calls (no Python
    frame of the runner's own on the request path). The contract: ``acquire()``;
    ``set_tensor(input_index, x)``; ``invoke()``; ``y = get_tensor(output_index)``
    (a copy); ``release()``, the lock held from the first call to the last. A
    ``ValueError`` from ``set_tensor`` (another dtype or batch size) means "use
    ``run``", which converts or resizes, or answers with a one-line error."""

    acquire: Callable[[], Any]
    release: Callable[[], Any]
    set_tensor: Callable[[int, Any], Any]
    invoke: Callable[[], Any]
    get_tensor: Callable[[int], np.ndarray]
    input_index: int
    output_index: int


class ModelRunner:
    """A loaded model. ``run`` takes and returns float32 arrays (one per input /
    output, in signature order); ``run_raw`` uses the model's native dtypes.

    Safe to call from several threads: TFLite interpreters are serialized by a
    lock, ONNX Runtime sessions run concurrently.
    """

    runtime: str
    runtime_version: str
    path: Path
    signature: ModelSignature
    signature_name: str = "serving_default"
    """The SignatureDef key the file's one signature has (``serve`` for a Keras export
    converted under that key); what TF Serving clients give as ``signature_name``."""

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.signature.inputs):
            raise BadInputError(
                f"model takes {len(self.signature.inputs)} inputs "
                f"({', '.join(t.name for t in self.signature.inputs)}), got {len(inputs)}"
            )
        native = [quantize(np.asarray(x), spec) for x, spec in zip(inputs, self.signature.inputs)]
        outputs = self.run_raw(native)
        return [dequantize(y, spec) for y, spec in zip(outputs, self.signature.outputs)]

    def ordered(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Named inputs as the positional list ``run`` takes, matched by name
        (``match_names``), whatever order the file keeps its tensors in."""
        specs = self.signature.inputs
        if len(inputs) != len(specs):
            raise BadInputError(
                f"model takes {len(specs)} inputs ({', '.join(tensor_aliases(t)[-1] for t in specs)}), got {len(inputs)}"
            )
        order = match_names(specs, list(inputs), "input")
        arrays: list[Any] = [None] * len(specs)
        for index, array in zip(order, inputs.values()):
            arrays[index] = array
        return arrays

    def run_named(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name in, outputs by name out (float, like ``run``): the way a
        caller that holds named tensors (golden vectors, a multi-input request)
        feeds a model."""
        outputs = self.run(self.ordered(inputs))
        return {spec.name: y for spec, y in zip(self.signature.outputs, outputs)}

    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def hot_calls(self) -> HotCalls | None:
        """The calls behind ``run`` for a caller that inlines the request path (the
        serving layer times and counts each request in the same frame); None where
        ``run`` has work of its own to do (several tensors, quantized I/O, ONNX)."""
        return None

    def close(self) -> None:
        """Release the runtime's resources (the runner must not be used after)."""

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TFLiteRunner(ModelRunner):
    def __init__(self, path: Path, runtime: str, threads: int | None) -> None:
        module_name, version_module = _TFLITE_MODULES[runtime]
        module = importlib.import_module(module_name)
        self.runtime = runtime
        self.runtime_version = _module_version(version_module)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._interpreter = module.Interpreter(model_path=str(path), num_threads=threads or 1)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: {runtime} cannot load this TFLite model: {first_line(exc)}") from None
        self._input_details = self._interpreter.get_input_details()
        self._output_details = self._interpreter.get_output_details()
        in_keys, out_keys = _signature_keys(self._interpreter)
        self.signature_name = _signature_name(self._interpreter)
        self.signature = ModelSignature(
            inputs=tuple(_tflite_spec(d, in_keys) for d in self._input_details),
            outputs=tuple(_tflite_spec(d, out_keys) for d in self._output_details),
        )
        self._current_shapes = [tuple(int(v) for v in d["shape"]) for d in self._input_details]
        # per-tensor facts the request path needs, computed once
        self._in_plan = [(d["index"], np.dtype(d["dtype"]), spec)
                         for d, spec in zip(self._input_details, self.signature.inputs)]
        self._out_plan = [(d["index"], spec, spec.quantized)
                          for d, spec in zip(self._output_details, self.signature.outputs)]
        self._fast: tuple[Any, ...] | None = None
        if len(self._in_plan) == 1 and len(self._out_plan) == 1:  # the serving hot path's facts and bound methods, in one attribute
            (in_index, in_dtype, in_spec), (out_index, out_spec, out_quantized) = self._in_plan[0], self._out_plan[0]
            interpreter = self._interpreter
            self._fast = (
                self._lock.acquire, self._lock.release, interpreter.set_tensor, interpreter.invoke,
                interpreter.get_tensor, in_index, out_index, in_spec if in_spec.quantized else None,
                in_dtype, out_spec if out_quantized else None,
            )

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float in, float out; the serving hot path.

        One input and one output (the common case): the interpreter's own
        ``set_tensor`` checks dtype and shape (and copies), so an input that already
        matches costs no extra Python check; one that does not (another dtype, a
        new batch size, a non-array) raises ValueError there before anything is
        written, and goes the general way (convert, resize, or a one-line error).
        """
        fast = self._fast
        if fast is not None and len(inputs) == 1:
            acquire, release, set_tensor, invoke, get_tensor, index, out_index, in_spec, in_dtype, out_spec = fast
            x = inputs[0]
            if in_spec is not None and (type(x) is not np.ndarray or x.dtype != in_dtype):
                x = quantize(np.asarray(x), in_spec)  # int8 I/O: float from the caller
            acquire()
            try:
                try:
                    set_tensor(index, x)
                except ValueError:
                    y = None
                else:
                    invoke()
                    y = get_tensor(out_index)  # a copy: safe to hand out after the lock
            finally:
                release()
            if y is not None:
                return [y] if out_spec is None else [dequantize(y, out_spec)]
        return self._run_general(inputs)

    def hot_calls(self) -> HotCalls | None:
        fast = self._fast
        if fast is None or fast[7] is not None or fast[9] is not None:  # quantized I/O: run converts
            return None
        acquire, release, set_tensor, invoke, get_tensor, index, out_index = fast[:7]
        return HotCalls(acquire, release, set_tensor, invoke, get_tensor, index, out_index)

    def _run_general(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Any number of inputs; converts dtypes, resizes for a new batch size."""
        if len(inputs) != len(self._in_plan):
            return super().run(inputs)  # raises the one-line error
        with self._lock:
            interpreter = self._interpreter
            resized = False
            native = []
            for i, (x, (index, dtype, spec)) in enumerate(zip(inputs, self._in_plan)):
                if not isinstance(x, np.ndarray):
                    x = np.asarray(x)
                if x.dtype != dtype:
                    x = quantize(x, spec)
                if not x.flags.c_contiguous:
                    x = np.ascontiguousarray(x)
                if x.shape != self._current_shapes[i]:
                    _check_shape(x.shape, spec)
                    interpreter.resize_tensor_input(index, list(x.shape))
                    self._current_shapes[i] = tuple(x.shape)
                    resized = True
                native.append((index, x))
            if resized:
                interpreter.allocate_tensors()
            for index, x in native:
                interpreter.set_tensor(index, x)
            interpreter.invoke()
            # get_tensor returns a copy: safe to hand out after the lock is released
            outputs = [interpreter.get_tensor(index) for index, _, _ in self._out_plan]
        return [dequantize(y, spec) if quantized else y for y, (_, spec, quantized) in zip(outputs, self._out_plan)]

    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            resized = False
            for i, (array, detail) in enumerate(zip(inputs, self._input_details)):
                if tuple(array.shape) != self._current_shapes[i]:
                    _check_shape(array.shape, self.signature.inputs[i])
                    self._interpreter.resize_tensor_input(detail["index"], list(array.shape))
                    self._current_shapes[i] = tuple(array.shape)
                    resized = True
            if resized:
                self._interpreter.allocate_tensors()
            for array, detail in zip(inputs, self._input_details):
                self._interpreter.set_tensor(detail["index"], np.ascontiguousarray(array, dtype=detail["dtype"]))
            self._interpreter.invoke()
            return [self._interpreter.get_tensor(d["index"]).copy() for d in self._output_details]

    def operators(self) -> list[str]:
        """The operator of each node in the graph, in execution order."""
        try:
            return [str(op["op_name"]) for op in self._interpreter._get_ops_details()]
        except AttributeError:  # pragma: no cover - very old runtimes
            return []

    def close(self) -> None:
        self._interpreter = None
        self._fast = None  # its bound methods hold the interpreter too


class OnnxRunner(ModelRunner):
    def __init__(self, path: Path, threads: int | None, providers: Sequence[str] | None) -> None:
        ort = importlib.import_module("onnxruntime")
        self.runtime = "onnxruntime"
        self.runtime_version = str(ort.__version__)
        self.path = path
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        available = ort.get_available_providers()
        wanted = list(providers) if providers else [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own, undocumented exception types
            raise ModelLoadError(f"{path}: onnxruntime cannot load this ONNX model: {first_line(exc)}") from None
        self.providers = tuple(self._session.get_providers())
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.signature = ModelSignature(
            inputs=tuple(_onnx_spec(i) for i in self._session.get_inputs()),
            outputs=tuple(_onnx_spec(o) for o in self._session.get_outputs()),
        )

    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = {}
        for name, array, spec in zip(self._input_names, inputs, self.signature.inputs):
            _check_shape(array.shape, spec)
            feed[name] = np.ascontiguousarray(array, dtype=spec.dtype)
        return list(self._session.run(self._output_names, feed))

    def close(self) -> None:
        self._session = None


def detect_model_format(path: str | os.PathLike[str]) -> str:
    """'tflite' or 'onnx', from the file's content (not its name)."""
    p = Path(path)
    try:
        with open(p, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read model: {exc.strerror or exc}") from None
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if p.suffix == ".onnx" or (head[:1] == b"\x08"):  # ONNX ModelProto starts with field 1 (ir_version)
        return "onnx"
    if p.suffix == ".tflite":
        raise ModelLoadError(f"{p}: not a TFLite model (no 'TFL3' identifier; corrupt or truncated?)")
    raise ModelLoadError(f"{p}: unknown model format (expected a .tflite or .onnx file)")


def _importable_tflite(name: str) -> bool:
    """Whether TFLite runtime ``name`` imports here (imported only when asked)."""
    module_name = _TFLITE_MODULES[name][0]
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a broken install (e.g. tflite_runtime under numpy 2) is not available
        return False
    return True


def available_runtimes(*, include_tensorflow: bool = True) -> dict[str, str]:
    """Runtime name -> version, for every runtime importable here.

    Importing TensorFlow takes seconds; pass ``include_tensorflow=False`` where
    only a light runtime matters.
    """
    found: dict[str, str] = {}
    for name in TFLITE_RUNTIMES:
        if name == "tensorflow" and not include_tensorflow:
            continue
        if _importable_tflite(name):
            found[name] = _module_version(_TFLITE_MODULES[name][1])
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            found["onnxruntime"] = str(importlib.import_module("onnxruntime").__version__)
        except Exception:  # noqa: BLE001 - a broken install is reported as absent, not as a crash
            return found
    return found


def open_model(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    prefer: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
) -> ModelRunner:
    """Load a model with the best runtime installed for its format.

    Args:
        path: a ``.tflite`` or ``.onnx`` file.
        threads: interpreter threads (XNNPACK / intra-op); None for the runtime's default.
        prefer: TFLite runtime names to try, in order (default TFLITE_RUNTIMES).
        providers: ONNX Runtime execution providers (default: TensorRT, CUDA, CPU as available).

    Raises:
        ModelLoadError: the file is missing, corrupt or of an unknown format.
        RuntimeUnavailableError: no runtime for this format is installed.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such model file")
    fmt = detect_model_format(p)
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailableError(
                f"{p}: ONNX model, but onnxruntime is not installed (pip install 'edgeship[onnx]')"
            )
        return OnnxRunner(p, threads, providers)
    order = list(prefer) if prefer else list(TFLITE_RUNTIMES)
    unknown = [r for r in order if r not in _TFLITE_MODULES]
    if unknown:
        raise BadInputError(f"unknown TFLite runtime(s) {unknown}; choose from {list(TFLITE_RUNTIMES)}")
    for name in order:  # import lazily: TensorFlow only when nothing lighter is there
        if _importable_tflite(name):
            return TFLiteRunner(p, name, threads)
    raise RuntimeUnavailableError(
        f"{p}: TFLite model, but none of {order} is installed (pip install 'edgeship[litert]')"
    )


def _tflite_spec(detail: dict[str, Any], keys: dict[int, str]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(v) for v in shape),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
        key=keys.get(int(detail["index"]), ""),
    )


def _signature_name(interpreter: Any) -> str:
    """The key of the file's only signature, else ``serving_default``."""
    try:
        signatures = list(interpreter.get_signature_list())
    except (AttributeError, RuntimeError, ValueError):
        return "serving_default"
    return str(signatures[0]) if len(signatures) == 1 and signatures[0] else "serving_default"


def _signature_keys(interpreter: Any) -> tuple[dict[int, str], dict[int, str]]:
    """Tensor index -> SignatureDef key, for inputs and outputs, when the model has
    exactly one signature whose tensors are the model's inputs and outputs (what
    the TFLite converter writes); empty maps otherwise (older files, several
    signatures, a runtime without signature runners)."""
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return {}, {}
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        inputs = {int(d["index"]): str(k) for k, d in runner.get_input_details().items()}
        outputs = {int(d["index"]): str(k) for k, d in runner.get_output_details().items()}
        del runner  # it holds the interpreter's wrapper: invoke() refuses to run while it lives
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return {}, {}
    model_inputs = {int(d["index"]) for d in interpreter.get_input_details()}
    model_outputs = {int(d["index"]) for d in interpreter.get_output_details()}
    if set(inputs) != model_inputs or set(outputs) != model_outputs:
        return {}, {}
    return inputs, outputs


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _onnx_spec(node: Any) -> TensorSpec:
    shape = tuple(int(d) if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(name=str(node.name), shape=shape, dtype=_ONNX_DTYPES.get(node.type, node.type))


def _check_shape(shape: Sequence[int], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) and not (i == 0) for i, (want, got) in enumerate(zip(spec.shape, shape))
    ):
        raise BadInputError(
            f"input '{spec.name}' has shape {list(shape)}, the model expects {list(spec.shape)} "
            "(-1: any size; the first dimension is the batch)"
        )


def _module_version(module_name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(module_name)
        if dist:
            try:
                return version(dist)
            except PackageNotFoundError:
                pass
        module = importlib.import_module(module_name)
        return str(getattr(module, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - any import failure: the version is unknown, never a crash
        return "unknown"




# -- can this bundle run here? ----------------------------------------------------------------------

LITERT_TFLITE_FLOOR = "2.17.0"
"""The TensorFlow Lite version whose kernels every LiteRT (``ai_edge_litert``) release
has: LiteRT was split out of TensorFlow after 2.17. A manifest's ``min_version`` for a
.tflite model is a TensorFlow Lite version (the converter's ``min_runtime_version``),
while LiteRT numbers its own releases (1.x, 2.x), so the two are never compared."""


def tflite_runtime_order(prefer: Sequence[str], runtimes: Sequence[str] | None) -> list[str]:
    """The configured TFLite runtimes (``[runtime] prefer``, in order) that the bundle
    may run on: its manifest's ``runtime.runtimes`` (e.g. only ``tensorflow`` for a
    model with SELECT_TF_OPS); all of them when the manifest names none."""
    allowed = {str(r) for r in runtimes or []}
    return [r for r in prefer if not allowed or r in allowed]


def tflite_version_ok(
    runtime: str, have: str, min_version: str | None, validated_with: Mapping[str, Any] | None
) -> tuple[bool, str]:
    """Whether TFLite runtime ``runtime`` at version ``have`` provides the TensorFlow Lite
    version ``min_version`` the bundle states, and why.

    tflite_runtime and tensorflow use TensorFlow's numbering: compared directly. LiteRT
    provides at least ``LITERT_TFLITE_FLOOR``; above it, only the converter's own proof
    counts (the model was validated on LiteRT at this version or an older one)."""
    if not min_version:
        return True, "no minimum runtime version"
    if runtime != "litert":
        if version_tuple(have) >= version_tuple(str(min_version)):
            return True, f"{runtime} {have} >= {min_version}"
        return False, f"bundle needs {runtime} >= {min_version}, this device has {have}"
    if version_tuple(str(min_version)) <= version_tuple(LITERT_TFLITE_FLOOR):
        return True, f"TensorFlow Lite {min_version} <= {LITERT_TFLITE_FLOOR}, which every LiteRT has"
    validated = validated_with or {}
    if validated.get("runtime") == "litert" and validated.get("version") and version_tuple(
        have
    ) >= version_tuple(str(validated["version"])):
        return True, f"validated by the converter on litert {validated['version']} (this device: {have})"
    return False, (
        f"bundle needs TensorFlow Lite >= {min_version}; litert {have} is not known to provide it "
        f"(LiteRT numbers its releases apart from TensorFlow; the converter validated the model "
        f"with {validated.get('runtime', 'no runtime')} {validated.get('version', '')})".rstrip()
    )


def check_bundle_runtime(manifest: Mapping[str, Any], prefer: Sequence[str]) -> str:
    """Whether a bundle's model can run on this device with the runtimes ``prefer`` allows:
    returns the runtime it would use, or raises RuntimeUnavailableError (the update is
    REJECTED: the device lacks what the bundle needs, nothing is broken)."""
    fmt = manifest.get("format")
    needs = manifest.get("runtime") or {}
    machine = platform.machine()
    arches = needs.get("architectures") or []
    if arches and machine not in arches:
        raise RuntimeUnavailableError(f"bundle is built for {arches}, this device is {machine}")
    if fmt == "tflite":
        order = tflite_runtime_order(prefer, needs.get("runtimes"))
        if not order:
            raise RuntimeUnavailableError(
                f"bundle runs only on {list(needs.get('runtimes') or [])}; this agent uses "
                f"{list(prefer)} ([runtime] prefer)"
            )
        found = next((r for r in order if _importable_tflite(r)), None)
        if found is None:
            raise RuntimeUnavailableError(f"bundle is a TFLite model for {order}; none of them is installed here")
        have = _module_version(_TFLITE_MODULES[found][1])
        ok, why = tflite_version_ok(found, have, needs.get("min_version"), needs.get("validated_with"))
        if not ok:
            raise RuntimeUnavailableError(why)
        return found
    if fmt != "onnx":
        raise RuntimeUnavailableError(f"bundle format {fmt!r} is not supported by this agent")
    if importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailableError("bundle is an ONNX model; onnxruntime is not installed here")
    minimum = needs.get("min_version")
    if minimum:
        have = _module_version("onnxruntime")
        if version_tuple(have) < version_tuple(str(minimum)):
            raise RuntimeUnavailableError(f"bundle needs onnxruntime >= {minimum}, this device has {have}")
    return "onnxruntime"


def version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers of a runtime's version: ``2.15.0+nv24.05`` -> (2, 15, 0),
    ``2.16.0rc1`` -> (2, 16, 0). Each dot-separated part gives its leading digits; a
    part with anything after them (a pre-release or local label) is the last one."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)
