"""The quantization doctor: when int8 breaks a model, say where, and find the
fewest layers to keep in float so the accuracy gate passes.

Where: each layer's error in the int8 model against the float model on the
evaluation data.

- ONNX: every compute node's output is made a graph output of both the float
  and the QDQ model (static quantization keeps the node and tensor names); the
  error a node *introduces* is its output's relative RMSE minus the worst
  relative RMSE among its inputs, so the ranking points at the layer that
  loses information, not at every layer after it.
- TFLite: LiteRT's own QuantizationDebugger, which runs each quantized operator
  beside its float twin on the same input (RMSE in units of the tensor's scale;
  about 0.29 is rounding noise).

The way out (``--keep-float auto``): layers are kept in float in the order of
that ranking, worst first; the prefix grows 1, 2, 4, ... until the gate passes,
then a binary search finds the shortest passing prefix (``fewest_layers``). ONNX
excludes them through ``nodes_to_exclude``; TFLite through the converter's
selective quantization (the QuantizationDebugger's ``denylisted_nodes``).
"""

from __future__ import annotations

__all__ = ["fewest_layers", "rank_onnx_layers", "introduced_errors", "doctor_summary"]

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgeship.ota.errors import require_module

from .data import Dataset

DOCTOR_SAMPLES = 64
"""Evaluation samples the per-layer error is measured on (enough to rank layers)."""
SHOWN_LAYERS = 5


def fewest_layers(count: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..count for which ``passes(k)`` (keep the k worst
    layers in float) is true, assuming more float layers never hurt; None when
    even ``count`` fails. Calls ``passes`` O(log count) times: 1, 2, 4, ...
    then a binary search between the last failure and the first success."""
    if count < 1:
        return None
    low, k = 0, 1  # low: largest k known to fail
    while True:
        k = min(k, count)
        if passes(k):
            high = k
            break
        low = k
        if k == count:
            return None
        k *= 2
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def introduced_errors(
    nodes: Sequence[tuple[str, str, Sequence[str], Sequence[str]]], relative: dict[str, float]
) -> list[dict[str, Any]]:
    """Rank nodes by the error they introduce (pure).

    Args:
        nodes: (name, op type, input tensors, output tensors) in graph order.
        relative: tensor -> relative RMSE of int8 against float.
    """
    rows = []
    for name, op, inputs, outputs in nodes:
        measured = [relative[t] for t in outputs if t in relative]
        if not measured:
            continue
        upstream = max([relative[t] for t in inputs if t in relative], default=0.0)
        out = max(measured)
        rows.append({"layer": name, "op": op, "relative_rmse": out, "introduced": out - upstream})
    rows.sort(key=lambda r: -r["introduced"])
    return rows


def rank_onnx_layers(float_model: Path, quantized: Path, data: Dataset, work: Path) -> list[dict[str, Any]]:
    """Per-node error of the QDQ model against the float one on ``data`` (worst first)."""
    onnx = require_module("onnx", "convert")
    ort = require_module("onnxruntime", "convert")
    from .to_onnx import prepare_onnx

    float_proto, _ = prepare_onnx(onnx.load(str(float_model)))
    quant_proto = onnx.load(str(quantized))
    quant_tensors = {o for n in quant_proto.graph.node for o in n.output}
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant", "Identity", "Shape", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
    nodes = [(n.name or n.output[0], n.op_type, list(n.input), list(n.output)) for n in float_proto.graph.node if n.op_type not in skip]
    watched = sorted({t for _, _, _, outs in nodes for t in outs if t in quant_tensors})
    paths = []
    for proto, name in ((float_proto, "float-probe.onnx"), (quant_proto, "int8-probe.onnx")):
        existing = {o.name for o in proto.graph.output}
        for tensor in watched:
            if tensor not in existing:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
        path = work / name
        onnx.save(proto, str(path))
        paths.append(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"]) for p in paths]
    n = min(len(data), DOCTOR_SAMPLES)
    names = [i.name for i in sessions[0].get_inputs()]
    from edgeship.agent.runtimes import TensorSpec, match_names

    order = match_names([TensorSpec(x, (), "float32") for x in names], list(data.names) or ["x"], "input")
    squares: dict[str, float] = {t: 0.0 for t in watched}
    energy: dict[str, float] = {t: 0.0 for t in watched}
    for i in range(n):
        feed = {names[order[j]]: np.asarray(data.inputs[j][i : i + 1]) for j in range(len(order))}
        results = []
        for session in sessions:
            outs = session.run(watched, feed)
            results.append(dict(zip(watched, outs)))
        for tensor in watched:
            f = np.asarray(results[0][tensor], np.float64)
            q = np.asarray(results[1][tensor], np.float64)
            if f.shape != q.shape or f.dtype.kind not in "fc":
                continue
            squares[tensor] += float(np.mean((f - q) ** 2))
            energy[tensor] += float(np.var(f))
    relative = {t: float(np.sqrt(squares[t] / max(energy[t], 1e-24))) for t in watched if energy[t] > 0}
    return introduced_errors(nodes, relative)


def doctor_summary(ranking: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The report's doctor block: the worst layers, named (pure)."""
    return {
        "metric": metric,
        "worst_layers": ranking[:SHOWN_LAYERS],
        "layers_measured": len(ranking),
    }
