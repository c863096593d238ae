"""To ONNX: Keras / SavedModel through tf2onnx, checked with ``onnx.checker`` and loaded by
ONNX Runtime before it counts; and what the converters read off an ONNX file (operator counts,
the onnxruntime release an opset needs). Quantization within ONNX is :mod:`.onnx_quantize`.

Keras 3 models do not go through ``tf2onnx.convert.from_keras`` (it fails on
Keras 3 tensors). A ``tf.function`` around the model with a named input
signature is frozen first (variables and captured constants become constants,
nested functions are inlined), so a ``Normalization`` layer's mean is a
constant and not a second graph input, and ConvNeXt leaves no
``StatefulPartitionedCall``; ``Erfc`` (exact GELU), which ONNX lacks, becomes
``1 - Erf``. The frozen graph goes through ``tf2onnx.convert.from_graph_def`` at
opset ``DEFAULT_OPSET``, the outputs get the Keras output names, and the result
is checked with ``onnx.checker`` and loaded by ONNX Runtime before it counts.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_OPSET",
    "check_onnx_model",
    "export_to_onnx",
    "inline_function_calls",
    "load_in_onnxruntime",
    "min_onnxruntime_version",
    "onnx_operator_counts",
    "replace_erfc",
]

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeship.agent.runtimes import ModelLoadError
from edgeship.ota.errors import EdgeshipError, first_line, require_module

from .sources import import_tensorflow, keras_output_names, serving_function, stdout_to_stderr
from .tf2onnx_memory import export_graph_def, release_memory

DEFAULT_OPSET = 17

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
    except Exception as exc:  # noqa: BLE001 - onnx's checker raises ValidationError and C++ errors of several types
        raise EdgeshipError(f"the ONNX export of {name} is not a valid ONNX model: {first_line(exc)}") from None


def load_in_onnxruntime(path: Path, name: str) -> None:
    """ONNX Runtime must load the model before it counts as converted."""
    ort = require_module("onnxruntime", "convert")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors are pybind types (Fail, InvalidGraph, ...) with no common base
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


def onnx_operator_counts(path: str | os.PathLike[str]) -> tuple[dict[str, int], int]:
    """(operator type -> count, default-domain opset) of an ONNX model."""
    onnx = require_module("onnx", "onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx's parser raises protobuf's DecodeError and others, no one family
        raise ModelLoadError(f"{path}: not a readable ONNX model: {first_line(exc)}") from None
    counts = collections.Counter(
        (f"{node.domain}." if node.domain not in ("", "ai.onnx") else "") + node.op_type for node in model.graph.node
    )
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return dict(sorted(counts.items())), opset
