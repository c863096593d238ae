"""To ONNX and within ONNX: Keras / SavedModel through tf2onnx, then
quantization with ``onnxruntime.quantization``: dynamic (int8 weights,
activations quantized at run time), static QDQ (int8 weights, int8 or uint8
activations from a calibration reader over DATA) and float16 (weights and math
in float16, float inputs and outputs kept).

Keras 3 models do not go through ``tf2onnx.convert.from_keras`` (it fails on
Keras 3 tensors). A ``tf.function`` around the model with a named input
signature is frozen first (variables and captured constants become constants,
nested functions are inlined), so a ``Normalization`` layer's mean is a
constant and not a second graph input, and ConvNeXt leaves no
``StatefulPartitionedCall``; ``Erfc`` (exact GELU), which ONNX lacks, becomes
``1 - Erf``. The frozen graph goes through ``tf2onnx.convert.from_graph_def`` at
opset ``DEFAULT_OPSET``, the outputs get the Keras output names, and the result
is checked with ``onnx.checker`` and loaded by ONNX Runtime before it counts.

ONNX models from elsewhere are prepared before quantization: opsets below 13
upgraded with onnx's version converter (per-channel QDQ needs opset 13),
initializers taken off the graph inputs (old exporters list weights as inputs),
shapes inferred and the graph pre-processed with ``quant_pre_process``.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATION_METHODS",
    "DEFAULT_OPSET",
    "ONNX_QUANTIZATIONS",
    "OnnxQuantOptions",
    "check_onnx_model",
    "export_to_onnx",
    "load_in_onnxruntime",
    "min_onnxruntime_version",
    "onnx_operator_counts",
    "prepare_onnx",
    "quantize_onnx",
    "inline_function_calls",
    "replace_erfc",
]

import collections
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelLoadError, TensorSpec, match_names
from edgeship.ota.errors import BadInputError, EdgeshipError, first_line, require_module

from .data import Dataset
from .progress import ProgressCallback, no_progress
from .sources import import_tensorflow, keras_output_names, serving_function, stdout_to_stderr
from .tf2onnx_memory import export_graph_def, release_memory

DEFAULT_OPSET = 17
ONNX_QUANTIZATIONS = ("none", "dynamic", "float16", "int8")

# Highest default-domain opset each onnxruntime release implements
# (onnxruntime.ai/docs/reference/compatibility.html).
_ORT_FOR_OPSET = {13: "1.7", 14: "1.10", 15: "1.10", 16: "1.11", 17: "1.12", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}


def min_onnxruntime_version(opset: int) -> str:
    """The oldest onnxruntime that runs a model of this default-domain opset."""
    for known in sorted(_ORT_FOR_OPSET):
        if opset <= known:
            return _ORT_FOR_OPSET[known]
    return "1.20"


def export_to_onnx(source: Any, kind: str, path: Path, out: Path, *, opset: int = DEFAULT_OPSET) -> list[str]:
    """Write the Keras model / SavedModel ``source`` as fp32 ONNX to ``out``,
    checked and loadable; returns notes on what was rewritten."""
    tf = import_tensorflow()
    require_module("tf2onnx", "convert")
    onnx = require_module("onnx", "convert")
    if kind == "savedmodel":
        function = serving_function(source)
        if function is None:
            raise ModelLoadError(f"{path}: SavedModel has no 'serving_default' signature to export")
        specs = function.structured_input_signature[1]
        keys = sorted(specs)
        signature = [tf.TensorSpec(specs[k].shape, specs[k].dtype, name=k) for k in keys]
        structured = function.structured_outputs
        output_names = sorted(structured)

        @tf.function(input_signature=signature)
        def forward(*xs: Any) -> Any:
            result = function(**dict(zip(keys, xs)))
            return [result[k] for k in output_names]
    else:
        model = source
        signature = [
            tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=str(t.name).split(":")[0]) for t in model.inputs
        ]
        output_names = keras_output_names(model)

        @tf.function(input_signature=signature)
        def forward(*xs: Any) -> Any:
            result = model(list(xs) if len(xs) > 1 else xs[0], training=False)
            return list(result) if isinstance(result, (list, tuple)) else [result]

    notes: list[str] = []
    try:
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        with stdout_to_stderr():
            concrete = forward.get_concrete_function()
            frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
            graph_def = frozen.graph.as_graph_def()
            inlined = inline_function_calls(graph_def, frozen)
            if inlined is not None:
                graph_def = inlined
                notes.append("functions marked no-inline (Keras' XLA convolutions) inlined before export")
            rewritten = replace_erfc(graph_def)
            if rewritten:
                notes.append(f"Erfc (exact GELU) rewritten as 1 - Erf at {rewritten} node(s): ONNX has no Erfc")
            input_names = [t.name for t in frozen.inputs if t.dtype != tf.resource]
            graph_outputs = [t.name for t in frozen.outputs]
            # the frozen function and the graphs before inlining hold their own copies
            # of every weight: gone before tf2onnx makes its own
            del concrete, frozen, inlined, forward
            proto, export_notes = export_graph_def(graph_def, input_names, graph_outputs, opset)
            notes += export_notes
            del graph_def
            release_memory()
    except Exception as exc:  # noqa: BLE001 - tf2onnx raises anything; one line naming the model
        raise EdgeshipError(f"tf2onnx could not convert {path.name}: {first_line(exc)}") from None
    unsupported = sorted({
        n.op_type for n in proto.graph.node
        if n.domain not in ("com.microsoft",) and not onnx.defs.has(n.op_type, n.domain if n.domain != "ai.onnx" else "")
    })
    if unsupported:  # tf2onnx keeps what it cannot map as the TensorFlow op, which no ONNX runtime has
        raise EdgeshipError(
            f"tf2onnx cannot express operator(s) {', '.join(unsupported)} of {path.name} in ONNX opset {opset}; "
            "rewrite those layers or convert to TFLite"
        )
    _rename_inputs(proto, [str(s.name) for s in signature])
    _rename_outputs(proto, output_names)
    check_onnx_model(proto, path.name)
    onnx.save(proto, str(out))
    load_in_onnxruntime(out, path.name)
    return notes


_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")


def inline_function_calls(graph_def: Any, frozen: Any) -> Any | None:
    """A GraphDef with the function calls freezing left behind inlined, or None
    when there were none. Keras 3 wraps some convolutions (ConvNeXt's grouped
    and depthwise ones) in ``tf.function(jit_compile=True)`` marked
    ``_noinline``: freezing keeps those calls, and ONNX has no
    StatefulPartitionedCall. The marks are removed and grappler's function
    optimizer inlines the calls."""
    if not any(node.op in _CALL_OPS for node in graph_def.node):
        return None
    tf = import_tensorflow()
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    for function in graph_def.library.function:
        for key in ("_noinline", "_XlaMustCompile", "_jit_compile"):
            if key in function.attr:
                del function.attr[key]
    for node in graph_def.node:
        for key in ("_noinline", "_XlaMustCompile"):
            if key in node.attr:
                del node.attr[key]
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=frozen.graph)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(t.name for t in frozen.outputs)
    meta.collection_def["train_op"].CopyFrom(fetch)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.optimizers.append("function")
    config.graph_options.rewrite_options.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(config, meta)


def replace_erfc(graph_def: Any) -> int:
    """Rewrite every ``Erfc(x)`` node of a GraphDef as ``1 - Erf(x)`` in place
    (ONNX has Erf, not Erfc); the number of nodes rewritten."""
    tf = import_tensorflow()
    count = 0
    new_nodes = []
    for node in graph_def.node:
        if node.op != "Erfc":
            continue
        count += 1
        dtype = node.attr["T"].type
        erf = graph_def.node.add()
        erf.CopyFrom(node)
        erf.name = node.name + "/edgeship_erf"
        erf.op = "Erf"
        one = graph_def.node.add()
        one.name = node.name + "/edgeship_one"
        one.op = "Const"
        one.attr["dtype"].type = dtype
        one.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0, dtype=tf.dtypes.as_dtype(dtype)))
        new_nodes.append((node, erf, one))
    for node, erf, one in new_nodes:
        node.op = "Sub"
        del node.input[:]
        node.input.extend([one.name, erf.name])
    return count


def check_onnx_model(proto: Any, name: str) -> None:
    """``onnx.checker`` (full check, shapes inferred) or one line naming what is wrong."""
    onnx = require_module("onnx", "convert")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx.checker raises ValidationError and friends
        raise EdgeshipError(f"the ONNX export of {name} is not a valid ONNX model: {first_line(exc)}") from None


def load_in_onnxruntime(path: Path, name: str) -> None:
    """ONNX Runtime must load the model before it counts as converted."""
    ort = require_module("onnxruntime", "convert")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EdgeshipError(f"ONNX Runtime cannot load the ONNX export of {name}: {first_line(exc)}") from None


def _rename_inputs(proto: Any, names: Sequence[str]) -> None:
    """Graph inputs named as the model's inputs (a frozen graph calls them ``image:0``)."""
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    real = [i for i in graph.input if i.name not in initializers]
    renames = {}
    for value, name in zip(real, names):
        if value.name != name:
            renames[value.name] = name
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in renames:
                node.input[i] = renames[value]
    for value in real:
        if value.name in renames:
            value.name = renames[value.name]


def _rename_outputs(proto: Any, names: Sequence[str]) -> None:
    """Give graph outputs the model's own names (tf2onnx calls them Identity:0...)."""
    graph = proto.graph
    renames = {}
    for output, name in zip(graph.output, names):
        if name and output.name != name:
            renames[output.name] = name
    for node in graph.node:
        for i, value in enumerate(node.output):
            if value in renames:
                node.output[i] = renames[value]
        for i, value in enumerate(node.input):
            if value in renames:
                node.input[i] = renames[value]
    for output in graph.output:
        if output.name in renames:
            output.name = renames[output.name]
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("int8", "uint8")
PER_CHANNEL_MIN_OPSET = 13
PREPARED_OPSET = 13
"""Old models are upgraded to this opset (the first with per-axis QuantizeLinear/DequantizeLinear)."""


@dataclass(frozen=True)
class OnnxQuantOptions:
    """How to quantize an ONNX model (JSON-ready: it travels to a child process).

    Attributes:
        quantize: one of ONNX_QUANTIZATIONS.
        per_channel: per-channel weight scales (static int8; needs opset 13).
        method: calibration method: minmax, entropy or percentile (99.999).
        activations: int8 (symmetric-friendly, the default) or uint8 activations.
        keep_float: node names left in float (``nodes_to_exclude``; the doctor's way out).
        calibration_batch: samples per calibration run.
        merge_every: min-max ranges are computed and merged every this many
            runs (at most), so memory holds that many runs' activations.
    """

    quantize: str = "none"
    per_channel: bool = True
    method: str = "minmax"
    activations: str = "int8"
    keep_float: tuple[str, ...] = ()
    calibration_batch: int = 1
    merge_every: int = 16


class _CalibrationReader:
    """An onnxruntime CalibrationDataReader over a Dataset, ``batch`` samples at a
    time, fed by input name; a memory-mapped dataset is read as it goes."""

    def __init__(self, names: Sequence[str], data: Dataset, progress: ProgressCallback, batch: int = 1) -> None:
        # graph input i is fed the data array of the same name
        graph_specs = [TensorSpec(n, (), "float32") for n in names]
        order = match_names(graph_specs, list(data.names), "input") if data.names else list(range(len(names)))
        self._names = [names[i] for i in order]
        self._data = data
        self._next = 0
        self._batch = max(1, batch)
        self._stop = len(data)
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self._next
        n = len(self._data)
        if i >= self._stop:
            return None
        stop = min(self._stop, i + self._batch)
        self._next = stop
        self._progress("calibrating", stop, n)
        return {name: np.ascontiguousarray(x[i:stop]) for name, x in zip(self._names, self._data.inputs)}

    def rewind(self) -> None:
        self._next = 0

    # onnxruntime's strided min-max calibration (CalibStridedMinMax) reads the
    # data in ranges of batches and merges the ranges of each: memory holds one
    # range's activations, not the whole calibration set's.
    def __len__(self) -> int:
        return -(-len(self._data) // self._batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = start_index * self._batch
        self._stop = min(len(self._data), end_index * self._batch)


def prepare_onnx(model: Any) -> tuple[Any, list[str]]:
    """An ONNX model from any exporter made fit for quantization (pure on the proto):
    opset below 13 upgraded, IR version raised to match, initializers removed from
    the graph inputs. Returns the model and notes on what changed."""
    onnx = require_module("onnx", "convert")
    notes: list[str] = []
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if 0 < opset < PREPARED_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, PREPARED_OPSET)
            notes.append(f"opset {opset} upgraded to {PREPARED_OPSET} (onnx version converter)")
        except Exception as exc:  # noqa: BLE001 - the version converter raises anything on odd graphs
            notes.append(f"opset {opset} could not be upgraded ({first_line(exc)[:120]}); per-channel quantization is off")
    if model.ir_version < 7:
        notes.append(f"IR version {model.ir_version} raised to 7")
        model.ir_version = 7
    initializers = {i.name for i in model.graph.initializer}
    listed = [i for i in model.graph.input if i.name in initializers]
    if listed:
        kept = [i for i in model.graph.input if i.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append(f"{len(listed)} initializer(s) removed from the graph inputs (weights listed as inputs by an old exporter)")
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001, S110 - inference is a help for quantization, not a requirement
        pass
    return model, notes


def quantize_onnx(
    src: Path,
    out: Path,
    *,
    options: OnnxQuantOptions,
    calibration: Dataset | None = None,
    progress: ProgressCallback | None = None,
    model_name: str = "",
    cache: Path | None = None,
) -> dict[str, Any]:
    """Write ``src`` quantized as asked to ``out``.

    Returns {"calibration_samples": n, "notes": [...]}. Errors name ``model_name``
    (the user's file), never a temporary path.
    """
    onnx = require_module("onnx", "convert")
    name = model_name or src.name
    report = progress or no_progress
    quantize = options.quantize
    if quantize not in ONNX_QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(ONNX_QUANTIZATIONS)}")
    if options.method not in CALIBRATION_METHODS:
        raise BadInputError(f"unknown calibration method {options.method!r}; choose from {list(CALIBRATION_METHODS)}")
    if options.activations not in ACTIVATION_TYPES:
        raise BadInputError(f"unknown ONNX activation type {options.activations!r}; choose from {list(ACTIVATION_TYPES)}")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others on a bad file
        raise ModelLoadError(f"{name}: not a readable ONNX model: {first_line(exc)}") from None
    notes: list[str] = []
    if quantize == "none":
        onnx.save(model, str(out))
        return {"calibration_samples": 0, "notes": notes}
    model, notes = prepare_onnx(model)
    if quantize == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out))
        except Exception as exc:  # noqa: BLE001 - the float16 converter raises anything
            raise EdgeshipError(f"float16 conversion of {name} failed: {first_line(exc)}") from None
        return {"calibration_samples": 0, "notes": notes}
    quantization = require_module("onnxruntime.quantization", "convert")
    work = out.parent / (out.name + ".prep")
    work.mkdir(exist_ok=True)
    prepared = work / "prepared.onnx"
    onnx.save(model, str(prepared))
    if quantize == "dynamic":
        try:
            quantization.quantize_dynamic(str(prepared), str(out), weight_type=quantization.QuantType.QInt8,
                                          nodes_to_exclude=list(options.keep_float) or None)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
            raise EdgeshipError(f"dynamic quantization of {name} failed: {_quantization_failure(exc)}") from None
        return {"calibration_samples": 0, "notes": notes}
    if calibration is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    per_channel = options.per_channel
    if per_channel and opset < PER_CHANNEL_MIN_OPSET:
        per_channel = False
        notes.append(f"per-channel quantization needs opset {PER_CHANNEL_MIN_OPSET}, the model has {opset}: per-tensor used")
    report("preparing the graph", 0, 1)
    processed = work / "processed.onnx"
    try:  # shape inference + graph clean-up, as onnxruntime recommends before static quantization
        quantization.shape_inference.quant_pre_process(str(prepared), str(processed), skip_symbolic_shape=False)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pre-processing raises anything
        try:
            quantization.shape_inference.quant_pre_process(str(prepared), str(processed), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - onnxruntime's pre-processing raises anything
            processed = prepared
            notes.append(f"onnxruntime's quantization pre-processing failed ({first_line(exc)[:120]}); quantized without it")
    report("preparing the graph", 1, 1)
    inputs = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inputs]
    fixed = _fixed_batch(model)
    batch = fixed or max(1, options.calibration_batch)
    reader = _CalibrationReader(names, calibration, report, batch)
    methods = quantization.CalibrationMethod
    method = {"minmax": methods.MinMax, "entropy": methods.Entropy, "percentile": methods.Percentile}[options.method]
    activation = quantization.QuantType.QInt8 if options.activations == "int8" else quantization.QuantType.QUInt8
    extra: dict[str, Any] = {}
    if options.method == "minmax":
        extra["CalibStridedMinMax"] = strided(len(reader), options.merge_every)
    if options.method == "percentile":
        extra["CalibPercentile"] = 99.999
    try:
        quantization.quantize_static(
            str(processed),
            str(out),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=activation,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=list(options.keep_float) or None,
            extra_options=extra,
            calibration_cache_path=str(cache) if cache else None,
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
        raise EdgeshipError(f"static int8 quantization of {name} failed: {_quantization_failure(exc)}") from None
    kept = out.parent / (out.name + ".float.onnx")  # what the quantizer saw: the doctor compares against it
    shutil.copyfile(processed, kept)
    return {"calibration_samples": len(calibration), "notes": notes, "per_channel": per_channel, "processed_model": str(kept)}


def strided(batches: int, most: int) -> int:
    """The largest stride of at most ``most`` batches that divides ``batches``
    (onnxruntime's strided calibration needs an exact division; pure)."""
    for stride in range(min(most, batches), 0, -1):
        if batches % stride == 0:
            return stride
    return 1


def _fixed_batch(model: Any) -> int | None:
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _quantization_failure(exc: BaseException) -> str:
    """One line naming the node and the reason where onnxruntime's message has them."""
    text = " ".join(str(exc).split())
    node = re.search(r"[Nn]ode(?: name)?[ :=]+'?\"?([^'\"\s,]+)", text)
    op = re.search(r"for operator ([A-Za-z]+)", text)
    where = f"node {node.group(1)}: " if node else (f"operator {op.group(1)}: " if op else "")
    return (where + text)[:400]


def onnx_operator_counts(path: str | os.PathLike[str]) -> tuple[dict[str, int], int]:
    """(operator type -> count, default-domain opset) of an ONNX model."""
    onnx = require_module("onnx", "onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others on a bad file
        raise ModelLoadError(f"{path}: not a readable ONNX model: {first_line(exc)}") from None
    counts = collections.Counter(
        (f"{node.domain}." if node.domain not in ("", "ai.onnx") else "") + node.op_type for node in model.graph.node
    )
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return dict(sorted(counts.items())), opset


def onnx_output_quanta(path: str | os.PathLike[str]) -> tuple[float, ...]:
    """For each graph output, the scale of the DequantizeLinear that produces it
    (QDQ models), else 0.0: the step an int8 rounding flip moves that output by."""
    onnx = require_module("onnx", "onnx")
    numpy_helper = require_module("onnx.numpy_helper", "onnx")
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    quanta = []
    for output in model.graph.output:
        node = producers.get(output.name)
        scale = 0.0
        if node is not None and node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in initializers:
            scale = float(np.max(numpy_helper.to_array(initializers[node.input[1]])))
        quanta.append(scale)
    return tuple(quanta)


