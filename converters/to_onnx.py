"""To ONNX and within ONNX: Keras / SavedModel through tf2onnx, then
quantization with ``onnxruntime.quantization``: dynamic (int8 weights,
activations quantized at run time), static QDQ (per-channel int8 weights, int8
activations from a calibration reader over DATA) and float16 (weights and math in
float16, float inputs and outputs kept).

Keras 3 models do not go through ``tf2onnx.convert.from_keras`` (it fails on
Keras 3 tensors); a ``tf.function`` around the model with a named input
signature goes through ``tf2onnx.convert.from_function`` instead, and the graph
outputs are renamed to the Keras output names.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_OPSET",
    "ONNX_QUANTIZATIONS",
    "export_to_onnx",
    "min_onnxruntime_version",
    "onnx_operator_counts",
    "quantize_onnx",
]

import collections
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgeship.agent.runtimes import ModelLoadError, TensorSpec, match_names
from edgeship.ota.errors import BadInputError, EdgeshipError, first_line, require_module

from .data import Dataset
from .progress import ProgressCallback, no_progress
from .sources import import_tensorflow, keras_output_names, serving_function, stdout_to_stderr

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


def export_to_onnx(source: Any, kind: str, path: Path, out: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write the Keras model / SavedModel ``source`` as fp32 ONNX to ``out``."""
    tf = import_tensorflow()
    tf2onnx = require_module("tf2onnx", "convert")
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

    try:
        with stdout_to_stderr():
            proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    except Exception as exc:
        raise EdgeshipError(f"tf2onnx could not convert {path}: {first_line(exc)}") from None
    _rename_outputs(proto, output_names)
    onnx.save(proto, str(out))


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


class _CalibrationReader:
    """An onnxruntime CalibrationDataReader over a Dataset, one sample at a time."""

    def __init__(self, names: Sequence[str], data: Dataset, progress: ProgressCallback) -> None:
        # graph input i is fed the data array of the same name
        graph_specs = [TensorSpec(n, (), "float32") for n in names]
        order = match_names(graph_specs, list(data.names), "input") if data.names else list(range(len(names)))
        self._names = [names[i] for i in order]
        self._data = data
        self._next = 0
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self._next
        if i >= len(self._data):
            return None
        self._next += 1
        self._progress("calibrating", i + 1, len(self._data))
        return {name: x[i : i + 1] for name, x in zip(self._names, self._data.inputs)}

    def rewind(self) -> None:
        self._next = 0


def quantize_onnx(
    src: Path,
    out: Path,
    *,
    quantize: str,
    calibration: Dataset | None = None,
    progress: ProgressCallback | None = None,
) -> int:
    """Write ``src`` quantized as asked to ``out``; returns the calibration samples used."""
    onnx = require_module("onnx", "convert")
    if quantize not in ONNX_QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(ONNX_QUANTIZATIONS)}")
    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise ModelLoadError(f"{src}: not a readable ONNX model: {first_line(exc)}") from None
    if quantize == "none":
        onnx.save(model, str(out))
        return 0
    if quantize == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out))
        except Exception as exc:
            raise EdgeshipError(f"float16 conversion of {src} failed: {first_line(exc)}") from None
        return 0
    quantization = require_module("onnxruntime.quantization", "convert")
    if quantize == "dynamic":
        try:
            quantization.quantize_dynamic(str(src), str(out), weight_type=quantization.QuantType.QInt8)
        except Exception as exc:
            raise EdgeshipError(f"dynamic quantization of {src} failed: {first_line(exc)}") from None
        return 0
    if calibration is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    with tempfile.TemporaryDirectory(prefix="edgeship-qdq-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:  # shape inference + graph clean-up, as onnxruntime recommends before static quantization
            quantization.shape_inference.quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception:
            prepared = src
        reader = _CalibrationReader(names, calibration, progress or no_progress)
        try:
            quantization.quantize_static(
                str(prepared),
                str(out),
                reader,
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quantization.QuantType.QInt8,
                weight_type=quantization.QuantType.QInt8,
            )
        except Exception as exc:
            raise EdgeshipError(f"static int8 quantization of {src} failed: {first_line(exc)}") from None
    return len(calibration)


def onnx_operator_counts(path: str | os.PathLike[str]) -> tuple[dict[str, int], int]:
    """(operator type -> count, default-domain opset) of an ONNX model."""
    onnx = require_module("onnx", "onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
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


