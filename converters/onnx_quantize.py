"""Within ONNX: quantization with ``onnxruntime.quantization``: dynamic (int8 weights,
activations quantized at run time), static QDQ (int8 weights, int8 or uint8 activations from a
calibration reader over DATA) and float16 (weights and math in float16, float inputs and outputs
kept); and the output quanta of a quantized model (the step an int8 rounding flip moves an output).

ONNX models from elsewhere are prepared before quantization: opsets below 13
upgraded with onnx's version converter (per-channel QDQ needs opset 13),
initializers taken off the graph inputs (old exporters list weights as inputs),
shapes inferred and the graph pre-processed with ``quant_pre_process``.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATION_METHODS",
    "ONNX_QUANTIZATIONS",
    "OnnxQuantOptions",
    "onnx_output_quanta",
    "prepare_onnx",
    "quantize_onnx",
    "strided",
]

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

ONNX_QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
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
        except Exception as exc:  # noqa: BLE001 - the version converter fails in many ways; the model still quantizes per tensor
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
    except Exception as exc:  # noqa: BLE001 - onnx's parser raises protobuf's DecodeError and others, no one family
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
        except Exception as exc:  # noqa: BLE001 - onnxruntime's float16 converter raises whatever an unusual graph trips
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
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises whatever an unusual graph trips
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
    except Exception as exc:  # noqa: BLE001 - pre-processing is optional: any failure retries without symbolic shapes
        try:
            quantization.shape_inference.quant_pre_process(str(prepared), str(processed), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is optional: quantize without it
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
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises whatever an unusual graph trips
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
