"""Keras / SavedModel to TFLite with the TensorFlow Lite converter: fp32,
dynamic-range, float16, full-integer int8 with float I/O, and int8 I/O.

Operators that TFLite builtins cannot express are refused by name unless the
caller opts in to Select TF ops (which then need the full TensorFlow runtime on
the device: LiteRT and tflite-runtime do not carry them).
"""

from __future__ import annotations

__all__ = ["QUANTIZATIONS", "TFLiteConversion", "convert_to_tflite", "unsupported_ops_from_error"]

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgeship.ota.errors import BadInputError, EdgeshipError

from .data import Dataset
from .progress import ProgressCallback, no_progress
from .sources import import_tensorflow, keras_output_names, stdout_to_stderr

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")


@dataclass(frozen=True)
class TFLiteConversion:
    content: bytes
    select_tf_ops: bool
    """Whether the converter was allowed to fall back to TensorFlow kernels."""
    calibration_samples: int


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
    except Exception:  # a subclassed model without a graph of layers: its own outputs
        return model


def convert_to_tflite(
    source: Any,
    kind: str,
    path: Path,
    *,
    quantize: str = "none",
    int8_io: bool = False,
    calibration: Dataset | None = None,
    allow_select_tf_ops: bool = False,
    progress: ProgressCallback | None = None,
) -> TFLiteConversion:
    """Convert a loaded Keras model (``kind`` keras/h5) or a SavedModel folder ``path``.

    Raises:
        BadInputError: bad option combination, missing calibration data, or operators
            that TFLite builtins cannot express (named; allow_select_tf_ops opts in).
        EdgeshipError: the converter failed for another reason (exit 1).
    """
    if quantize not in QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(QUANTIZATIONS)}")
    if int8_io and quantize != "int8":
        raise BadInputError("--int8-io needs --quantize int8 (integer inputs and outputs need a fully integer model)")
    if quantize == "int8" and calibration is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    tf = import_tensorflow()
    report = progress or no_progress

    def make_converter() -> Any:
        if kind == "savedmodel":
            return tf.lite.TFLiteConverter.from_saved_model(str(path))
        return tf.lite.TFLiteConverter.from_keras_model(named_outputs_model(source))

    converter = make_converter()
    samples = 0
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        assert calibration is not None
        samples = len(calibration)

        def representative() -> Iterator[dict[str, np.ndarray]]:
            # by input name (the SignatureDef keys), never by position
            for i in range(samples):
                report("calibrating", i + 1, samples)
                yield {name: x[i : i + 1] for name, x in zip(calibration.names, calibration.inputs)}

        converter.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    else:
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if allow_select_tf_ops:
        ops = ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    converter.target_spec.supported_ops = ops
    try:
        with stdout_to_stderr(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            content = converter.convert()
    except Exception as exc:  # the converter raises ConverterError and friends
        message = str(exc)
        missing = unsupported_ops_from_error(message)
        if missing and not allow_select_tf_ops:
            raise BadInputError(
                f"TFLite builtins cannot express operator(s) {', '.join(missing)}"
                + (" in int8" if quantize == "int8" else "")
                + "; rewrite the model, or pass --allow-select-tf-ops (the device then needs the full TensorFlow runtime)"
            ) from None
        first = next((line.strip() for line in message.splitlines() if line.strip()), exc.__class__.__name__)
        raise EdgeshipError(f"the TFLite converter failed: {first[:300]}") from None
    return TFLiteConversion(bytes(content), allow_select_tf_ops, samples)
