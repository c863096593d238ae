"""Keras / SavedModel to TFLite with the TensorFlow Lite converter: fp32,
dynamic-range, float16, full-integer int8 with float I/O, and int8 I/O.

Operators that TFLite builtins cannot express are refused by name unless the
caller opts in to Select TF ops (which then need the full TensorFlow runtime on
the device: LiteRT and tflite-runtime do not carry them).
"""

from __future__ import annotations

__all__ = [
    "QUANTIZATIONS",
    "TFLITE_ACTIVATIONS",
    "TFLiteConversion",
    "TFLiteOptions",
    "convert_to_tflite",
    "named_outputs_model",
    "unsupported_ops_from_error",
]

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import TensorSpec, match_names
from edgeship.ota.errors import BadInputError, EdgeshipError

from .data import Dataset
from .progress import ProgressCallback, no_progress
from .recurrent import FUSED_LSTM_OPERATOR, plan_recurrent
from .sources import import_tensorflow, keras_output_names, stdout_to_stderr

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")


TFLITE_ACTIVATIONS = ("int8", "int16")


@dataclass(frozen=True)
class TFLiteOptions:
    """How to convert (JSON-ready: it travels to the converter's child process).

    Attributes:
        quantize: one of QUANTIZATIONS.
        int8_io: integer float-tensors at the model's edges (int8 only; integer
            inputs such as token ids stay as they are).
        allow_select_tf_ops: let TensorFlow kernels fill in (explicit opt-in).
        per_channel: per-channel weight scales (False: one scale per tensor).
        activations: "int8", or "int16" for TFLite's 16x8 mode (int16
            activations, int8 weights: more accurate, slower, fewer kernels).
        strict: refuse, naming the operators, a model that is not fully integer
            after int8 conversion (no float islands such as NEG or a float LayerNorm).
        keep_float: operator output tensor names (or operator types) kept in
            float by the quantization doctor (TFLite's selective quantization).
        fixed_batch: the batch size the model is rebuilt with before converting
            (recurrent layers need a static batch to become builtin kernels).
        recurrent: "fused" (LSTMs to TFLite's fused sequence kernel, the rest
            unrolled) or "unrolled" (every recurrent layer unrolled: the fallback
            when the fused conversion fails).
    """

    quantize: str = "none"
    int8_io: bool = False
    allow_select_tf_ops: bool = False
    per_channel: bool = True
    activations: str = "int8"
    strict: bool = False
    keep_float: tuple[str, ...] = ()
    fixed_batch: int | None = None
    recurrent: str = "fused"


@dataclass(frozen=True)
class TFLiteConversion:
    content: bytes
    select_tf_ops: bool
    """Whether the converter was allowed to fall back to TensorFlow kernels."""
    calibration_samples: int
    notes: tuple[str, ...] = ()


def unsupported_ops_from_error(message: str) -> list[str]:
    """The TensorFlow op names a converter error lists as unsupported by TFLite builtins."""
    names = set(re.findall(r"\btf\.([A-Z][A-Za-z0-9_]*)", message))
    names |= set(re.findall(r"\bFlex([A-Z][A-Za-z0-9_]*)", message))
    return sorted(names)


def named_outputs_model(model: Any) -> Any:
    """The Keras model with its outputs as a dict keyed by the model's output
    names, so the TFLite SignatureDef names each output (``classes``) instead of
    numbering it (``output_0``): LiteRT may keep output tensors in another order,
    and names are how validation, golden vectors and the agent pair them up."""
    tf = import_tensorflow()
    if isinstance(getattr(model, "output", None), dict) or not getattr(model, "outputs", None):
        return model
    try:
        return tf.keras.Model(model.inputs, dict(zip(keras_output_names(model), model.outputs)))
    except Exception:  # noqa: BLE001 - a subclassed model without a graph of layers: its own outputs
        return model


def convert_to_tflite(
    source: Any,
    kind: str,
    path: Path,
    *,
    options: TFLiteOptions = TFLiteOptions(),
    calibration: Dataset | None = None,
    progress: ProgressCallback | None = None,
) -> TFLiteConversion:
    """Convert a loaded Keras model (``kind`` keras/h5) or a SavedModel folder ``path``.

    Raises:
        BadInputError: bad option combination, missing calibration data, or operators
            that TFLite builtins cannot express (named; allow_select_tf_ops opts in).
        EdgeshipError: the converter failed for another reason (exit 1).
    """
    report = progress or no_progress
    fused: list[str] = []
    try:
        content, samples, notes = _convert_once(source, kind, path, options, calibration, report, fused)
    except EdgeshipError as exc:
        if not fused:
            raise
        fused_failure: str | None = exc.message
    else:
        fused_failure = _missing_fused_kernels(content, fused)
    if fused_failure is not None:  # unrolling is the way that works without the fused kernel
        fallback = replace(options, recurrent="unrolled")
        content, samples, notes = _convert_once(source, kind, path, fallback, calibration, report, [])
        notes = [f"the fused LSTM conversion failed ({fused_failure[:200]}); recurrent layers unrolled instead", *notes]
    return TFLiteConversion(bytes(content), options.allow_select_tf_ops, samples, tuple(notes))


def _convert_once(
    source: Any, kind: str, path: Path, options: TFLiteOptions, calibration: Dataset | None, report: ProgressCallback,
    fused: list[str],
) -> tuple[bytes, int, list[str]]:
    """One conversion; ``fused`` receives the LSTM layers swapped for the fused kernel's function."""
    tf = import_tensorflow()
    converter, samples, notes, fused[:] = build_converter(source, kind, path, options=options, calibration=calibration,
                                                          progress=report)
    quantize = options.quantize
    report("converting to TFLite", 0, 1)
    try:
        with stdout_to_stderr(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            if options.keep_float and quantize == "int8":
                content = _selectively_quantized(tf, converter, options.keep_float)
            else:
                content = converter.convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises ConverterError and friends
        raise _converter_error(str(exc), exc, options) from None
    report("converting to TFLite", 1, 1)
    if options.strict and quantize == "int8":
        from .tflite_flatbuffer import parse_tflite_graph

        floats = sorted({o.name for o in parse_tflite_graph(bytes(content)).operators if o.is_float})
        if floats:
            raise BadInputError(
                f"--strict: the int8 model keeps operator(s) {', '.join(floats)} in float (no int8 kernel for them here); "
                "rewrite those layers, or drop --strict to let them run in float"
            )
    return bytes(content), samples, notes


def _missing_fused_kernels(content: bytes, fused: list[str]) -> str | None:
    """None when every LSTM the plan fused is a fused kernel in the flatbuffer,
    else what is missing (the converter keeps the function's loop when it does
    not fuse, without an error)."""
    if not fused:
        return None
    from .tflite_flatbuffer import parse_tflite_graph

    found = sum(1 for o in parse_tflite_graph(content).operators if o.name == FUSED_LSTM_OPERATOR)
    if found >= len(fused):
        return None
    return f"{found} {FUSED_LSTM_OPERATOR} operator(s) for {len(fused)} LSTM layer(s)"


def _converter_error(message: str, exc: BaseException, options: TFLiteOptions) -> EdgeshipError:
    missing = unsupported_ops_from_error(message)
    if missing and not options.allow_select_tf_ops:
        return BadInputError(
            f"TFLite builtins cannot express operator(s) {', '.join(missing)}"
            + (" in int8" if options.quantize == "int8" else "")
            + "; rewrite the model, or pass --allow-select-tf-ops (the device then needs the full TensorFlow runtime)"
        )
    if "tensor list ops" in message:
        return BadInputError(
            "TFLite builtins cannot express this model's tensor-list ops (a recurrent layer with a dynamic "
            "batch or length); give --fixed-batch N, or pass --allow-select-tf-ops (full TensorFlow on the device)"
        )
    first = next((line.strip() for line in message.splitlines() if line.strip()), exc.__class__.__name__)
    return EdgeshipError(f"the TFLite converter failed: {first[:300]}")


def build_converter(
    source: Any,
    kind: str,
    path: Path,
    *,
    options: TFLiteOptions,
    calibration: Dataset | None,
    progress: ProgressCallback,
) -> tuple[Any, int, list[str], list[str]]:
    """A configured TFLiteConverter; (converter, calibration samples, notes, fused LSTM layers)."""
    quantize = options.quantize
    if quantize not in QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(QUANTIZATIONS)}")
    if options.int8_io and quantize != "int8":
        raise BadInputError("--int8-io needs --quantize int8 (integer inputs and outputs need a fully integer model)")
    if quantize == "int8" and calibration is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    if options.activations not in TFLITE_ACTIVATIONS:
        raise BadInputError(f"unknown TFLite activation type {options.activations!r}; choose from {list(TFLITE_ACTIVATIONS)}")
    tf = import_tensorflow()
    report = progress
    notes: list[str] = []
    fused: list[str] = []
    model = source
    if kind != "savedmodel":
        plan = plan_recurrent(source, options.fixed_batch, options.recurrent, options.quantize)
        model, notes, fused = plan.model, plan.notes, plan.fused
    if kind == "savedmodel":
        converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(named_outputs_model(model))
    samples = 0
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if not options.per_channel:
        converter._experimental_disable_per_channel = True  # the converter's own switch for per-tensor weights
    if quantize == "int8":
        assert calibration is not None
        samples = len(calibration)
        step = _calibration_step(calibration)

        def representative() -> Iterator[dict[str, np.ndarray]]:
            # by input name (the SignatureDef keys), never by position; read in
            # slices so a memory-mapped dataset streams from disk
            for start in range(0, samples, step):
                block = [np.asarray(x[start : start + step]) for x in calibration.inputs]
                for i in range(len(block[0])):
                    report("calibrating", start + i + 1, samples)
                    yield {name: x[i : i + 1] for name, x in zip(calibration.names, block)}

        converter.representative_dataset = representative
        if options.activations == "int16":
            ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        elif options.strict or options.int8_io:
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        else:  # operators without an int8 kernel may stay float; --strict refuses them
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        if options.int8_io:
            io_type = tf.int16 if options.activations == "int16" else tf.int8
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
    else:
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if options.allow_select_tf_ops:
        ops = ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    converter.target_spec.supported_ops = ops
    return converter, samples, notes, fused


def tflite_layer_statistics(
    source: Any,
    kind: str,
    path: Path,
    *,
    options: TFLiteOptions,
    calibration: Dataset,
    data: Dataset,
    progress: ProgressCallback,
) -> list[dict[str, Any]]:
    """Per-layer error of the int8 model against float, from LiteRT's
    QuantizationDebugger: each quantized operator's output compared with the
    float result of the same operator on the same (quantized) input, over
    ``data``: the error each layer introduces. Sorted worst first by the worst
    channel's RMSE relative to its spread (``doctor.channel_relative_rmse``);
    RMSE in units of the tensor's scale is reported too (about 0.29 is rounding
    noise, and it cannot see channels an outlier rounds to nothing)."""
    from .doctor import ChannelStats

    def relative(float_values: Sequence[np.ndarray], quant_values: Sequence[np.ndarray], scale: float, zero_point: int) -> float:
        stats = ChannelStats()
        for f, q in zip(float_values, quant_values):
            stats.add(np.asarray(f), (np.asarray(q, np.float64) - zero_point) * scale)
        return stats.relative_rmse()

    tf = import_tensorflow()
    converter, *_ = build_converter(source, kind, path, options=replace(options, keep_float=(), strict=False, int8_io=False),
                                      calibration=calibration, progress=progress)
    n = len(data)
    order: list[int] = []  # the debug interpreter's input order, known once it exists

    def debug_dataset() -> Iterator[list[np.ndarray]]:
        for i in range(n):
            progress("measuring per-layer error", i + 1, n)
            yield [np.asarray(data.inputs[j][i : i + 1]) for j in order]

    with stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debug_options = tf.lite.experimental.QuantizationDebugOptions(
            layer_direct_compare_metrics={"channel_relative_rmse": relative}
        )
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=debug_dataset, debug_options=debug_options
        )
        details = debugger._quant_interpreter.get_input_details()  # the debugger feeds by position: match names here
        specs = [TensorSpec(str(d["name"]), tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]).name) for d in details]
        order[:] = [list(data.names).index(name) if data.names else 0 for name in _names_for(specs, data.names)]
        debugger.run()
    rows: list[dict[str, Any]] = []
    for verify_name, stats in debugger.layer_statistics.items():
        tensor, _ = debugger._get_operand_name_and_index(verify_name)  # the quantized op's output tensor
        scale = float(stats.get("scale", 0.0) or 0.0)
        mse = float(stats.get("mean_squared_error", 0.0))
        rows.append({
            "layer": str(tensor),
            "introduced": float(stats.get("channel_relative_rmse", 0.0)),
            "rmse_over_scale": float(np.sqrt(mse) / scale) if scale else None,
            "rmse": float(np.sqrt(mse)),
            "max_abs_error": float(stats.get("max_abs_error", 0.0)),
            "scale": scale,
        })
    rows.sort(key=lambda r: -r["introduced"])
    return rows


def _names_for(specs: list[Any], names: tuple[str, ...]) -> list[str]:
    """For each interpreter input, the data name that feeds it."""
    if not names:
        return [""] * len(specs)
    positions = match_names(specs, list(names), "input")
    by_tensor = {index: name for name, index in zip(names, positions)}
    return [by_tensor[i] for i in range(len(specs))]


def _calibration_step(data: Dataset) -> int:
    """Samples read from disk at a time: about 64 MiB of inputs per slice."""
    per_sample = sum(int(np.prod(x.shape[1:])) * x.dtype.itemsize for x in data.inputs) or 1
    return int(max(1, min(len(data), (64 << 20) // per_sample)))


def _selectively_quantized(tf: Any, converter: Any, keep_float: tuple[str, ...]) -> bytes:
    """int8 with the named tensors' operators (or whole operator types) left in
    float: the converter calibrates only, then TFLite's MLIR quantizer runs with
    denylists (what LiteRT's QuantizationDebugger does for its "selective
    quantization"; called directly, because the debugger insists on building a
    debug model first, which fails when the denylist leaves nothing to verify)."""
    from tensorflow.lite.python import convert as tflite_convert

    nodes = [k for k in keep_float if not k.isupper()]
    op_types = [k for k in keep_float if k.isupper()]
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True  # the converter's own switch: calibrated float model out
    calibrated = converter.convert()
    return bytes(tflite_convert.mlir_quantize(
        calibrated,
        disable_per_channel=converter._experimental_disable_per_channel,
        fully_quantize=False,
        denylisted_ops=op_types or None,
        denylisted_nodes=nodes or None,
    ))
