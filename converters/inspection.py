"""What a model is: inputs and outputs (names, shapes, dtypes, quantization),
operator counts, size, whether it computes fully in integers, and which
operators are left in float. ``.tflite`` and ``.onnx`` load through the device
runtimes; Keras models and SavedModels through TensorFlow (a Keras model's
layers stand in for operators; a SavedModel lists the TensorFlow operations of
its serving signature).
"""

from __future__ import annotations

__all__ = ["inspect_model", "onnx_float_operators", "runtime_requirements", "savedmodel_operations"]

import collections
import os
from pathlib import Path
from typing import Any

from edgeship.agent.runtimes import ModelLoadError
from edgeship.ota.errors import require_module

from .sources import detect_source_kind, open_any_model, serving_function
from .tflite_flatbuffer import read_tflite_graph
from .to_onnx import min_onnxruntime_version, onnx_operator_counts
from .validate import model_size_bytes

# ONNX operators that compute in integers (QOperator and dynamic formats).
_ONNX_INTEGER_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "QLinearSoftmax",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid",
}
# Operators that only move or reshape data: they carry no arithmetic to quantize.
_DATA_MOVEMENT_OPS = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Shape", "Gather", "Concat", "Slice",
    "Identity", "Cast", "MaxPool", "Split", "Expand", "Pad", "Constant", "ConstantOfShape", "RESHAPE",
}


def onnx_float_operators(model: Any) -> list[str]:
    """Operator types that still compute in float in an ONNX graph.

    A compute node counts as integer when it is an integer operator, or (QDQ
    format) when every input it takes from another node comes through
    DequantizeLinear and every consumer of its outputs is QuantizeLinear; ONNX
    Runtime then runs it with an integer kernel.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in model.graph.node:
        for value in node.input:
            consumers[value].append(node)
    graph_outputs = {o.name for o in model.graph.output}
    floats = []
    for node in model.graph.node:
        if node.op_type in _ONNX_INTEGER_OPS or node.op_type in _DATA_MOVEMENT_OPS:
            continue
        fed = [producers[v] for v in node.input if v in producers]
        inputs_quantized = bool(fed) and all(p.op_type == "DequantizeLinear" for p in fed)
        used = [c for v in node.output for c in consumers.get(v, [])]
        outputs_quantized = all(c.op_type == "QuantizeLinear" for c in used) and not (set(node.output) & graph_outputs)
        if not (inputs_quantized and (outputs_quantized or node.op_type in ("Softmax",) and not used)):
            floats.append(node.op_type)
    return sorted(set(floats))


# TensorFlow graph bookkeeping: feeds, variables, constants and call wrappers compute nothing.
_TF_BOOKKEEPING_OPS = {
    "Placeholder", "ReadVariableOp", "VarHandleOp", "Const", "NoOp", "Identity", "IdentityN",
    "StatefulPartitionedCall", "PartitionedCall",
}


def savedmodel_operations(model: Any) -> dict[str, int]:
    """TensorFlow operation counts of a loaded SavedModel's serving signature
    (its functions included), bookkeeping operations left out."""
    function = serving_function(model)
    if function is None:
        return {}
    graph = function.graph.as_graph_def()
    counts = collections.Counter(node.op for node in graph.node)
    for library_function in graph.library.function:
        counts.update(node.op for node in library_function.node_def)
    return dict(sorted((op, n) for op, n in counts.items() if op not in _TF_BOOKKEEPING_OPS))


def runtime_requirements(path: str | os.PathLike[str], fmt: str, signature: Any) -> dict[str, Any]:
    """What a device needs to run this model (the bundle manifest's ``runtime``)."""
    int8_io = any(t.dtype in ("int8", "uint8") for t in (*signature.inputs, *signature.outputs))
    if fmt == "tflite":
        graph = read_tflite_graph(path)
        return {
            "name": "tflite",
            "min_version": graph.min_runtime_version,
            "int8_io": int8_io,
            "select_tf_ops": bool(graph.select_tf_ops),
            "select_tf_ops_used": list(graph.select_tf_ops),
            "runtimes": ["tensorflow"] if graph.select_tf_ops else ["litert", "tflite_runtime", "tensorflow"],
        }
    _, opset = onnx_operator_counts(path)
    return {
        "name": "onnxruntime",
        "min_version": min_onnxruntime_version(opset),
        "opset": opset,
        "int8_io": int8_io,
        "select_tf_ops": False,
        "select_tf_ops_used": [],
        "runtimes": ["onnxruntime"],
    }


def inspect_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``edgeship inspect`` shows, as a JSON-ready dict."""
    p = Path(path)
    kind = detect_source_kind(p)
    size = model_size_bytes(p)
    if kind == "tflite":
        with open_any_model(p) as runner:
            signature = runner.signature
            runtime = {"name": runner.runtime, "version": runner.runtime_version}
        graph = read_tflite_graph(p)
        # The model's own operators (the runtime's list shows delegate nodes instead).
        counts = dict(sorted(collections.Counter(o.name for o in graph.operators).items()))
        float_ops = sorted({o.name for o in graph.operators if o.is_float})
        fully_integer = not float_ops
    elif kind == "onnx":
        onnx = require_module("onnx", "onnx")
        with open_any_model(p) as runner:
            signature = runner.signature
            runtime = {"name": runner.runtime, "version": runner.runtime_version}
        counts, _ = onnx_operator_counts(p)
        try:
            float_ops = onnx_float_operators(onnx.load(str(p), load_external_data=False))
        except Exception as exc:  # noqa: BLE001 - onnx's parser raises protobuf's DecodeError and others, no one family
            raise ModelLoadError(f"{p}: not a readable ONNX model ({exc.__class__.__name__})") from None
        fully_integer = not float_ops
    else:
        with open_any_model(p) as runner:
            signature = runner.signature
            runtime = {"name": runner.runtime, "version": runner.runtime_version}
            model = runner.model  # type: ignore[attr-defined]
            layers = getattr(model, "layers", None)
            if layers is None and kind == "savedmodel":
                counts = savedmodel_operations(model)
            else:
                counts = dict(sorted(collections.Counter(type(layer).__name__ for layer in layers or []).items()))
        float_ops = sorted(counts)
        fully_integer = False
    result: dict[str, Any] = {
        "path": str(p),
        "format": kind,
        "size_bytes": size,
        "signature": signature.to_dict(),
        "operators": counts,
        "operator_total": int(sum(counts.values())),
        "fully_integer": fully_integer,
        "float_operators": float_ops,
        "loaded_with": runtime,
    }
    if kind in ("tflite", "onnx"):
        result["runtime_requirements"] = runtime_requirements(p, kind, signature)
    return result
