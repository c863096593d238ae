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
then a binary search finds the shortest passing prefix (``fewest_layers``), and
each kept layer goes back to int8 if the gate passes without it (``fewest_kept``). ONNX
excludes them through ``nodes_to_exclude``; TFLite through the converter's
selective quantization (the QuantizationDebugger's ``denylisted_nodes``).
"""

from __future__ import annotations

__all__ = [
    "ChannelStats",
    "channel_relative_rmse",
    "doctor_summary",
    "fewest_kept",
    "fewest_layers",
    "introduced_errors",
    "rank_onnx_layers",
]

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


def channel_axis(ndim: int) -> int:
    """The channel axis of an activation: 1 for NCHW images (ONNX), else the last."""
    return 1 if ndim == 4 else ndim - 1


class ChannelStats:
    """Per-channel running sums over samples (bounded memory: three vectors a
    tensor): squared error of int8 against float, and the float values' sum and
    sum of squares for the channel's spread."""

    def __init__(self) -> None:
        self.count = 0
        self.error: Any = 0.0
        self.total: Any = 0.0
        self.squares: Any = 0.0

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        f = np.asarray(reference, np.float64)
        q = np.asarray(other, np.float64)
        if f.ndim > 1:
            axis = channel_axis(f.ndim)
            channels = f.shape[axis]
            f = np.moveaxis(f, axis, -1).reshape(-1, channels)
            q = np.moveaxis(q, axis, -1).reshape(-1, channels)
        else:
            f, q = f.reshape(-1, 1), q.reshape(-1, 1)
        self.count += f.shape[0]
        self.error = self.error + ((f - q) ** 2).sum(axis=0)
        self.total = self.total + f.sum(axis=0)
        self.squares = self.squares + (f**2).sum(axis=0)

    def relative_rmse(self) -> float:
        if not self.count:
            return 0.0
        deviation = np.maximum(np.atleast_1d(self.squares) - np.atleast_1d(self.total) ** 2 / self.count, 0.0)
        return channel_relative_rmse(np.atleast_1d(self.error), deviation)


def channel_relative_rmse(squared_error: np.ndarray, squared_deviation: np.ndarray) -> float:
    """The worst channel's RMSE relative to its own spread (pure).

    Per channel, so one channel with a huge range (an outlier that stretches a
    per-tensor int8 scale) cannot hide the others being rounded to nothing;
    channels that never vary (a ReLU that never fires) are left out.
    """
    live = squared_deviation > 1e-12 * max(float(squared_deviation.max(initial=0.0)), 1e-30)
    if not np.any(live):
        return 0.0
    return float(np.sqrt((squared_error[live] / squared_deviation[live]).max()))


def fewest_kept(ranked: Sequence[str], passes: Callable[[tuple[str, ...]], bool]) -> tuple[str, ...] | None:
    """The layers to keep in float: the shortest passing prefix of ``ranked``
    (worst first; ``fewest_layers``), then pruned: each kept layer, least
    suspected first, is put back into int8 if the gate still passes without it
    (the ranking measures where error appears, which is not always the layer
    whose float output cures it). None when even all of ``ranked`` fails."""
    k = fewest_layers(len(ranked), lambda n: passes(tuple(ranked[:n])))
    if k is None:
        return None
    kept = list(ranked[:k])
    for name in reversed(ranked[:k]):
        if len(kept) == 1:
            break
        trial = tuple(n for n in kept if n != name)
        if passes(trial):
            kept = list(trial)
    return tuple(kept)


def introduced_errors(
    nodes: Sequence[tuple[str, str, Sequence[str], Sequence[str]]], relative: dict[str, float]
) -> list[dict[str, Any]]:
    """Rank nodes by the error they introduce (pure).

    Args:
        nodes: (name, op type, input tensors, output tensors) in graph order.
        relative: tensor -> relative RMSE of int8 against float.
    """
    rows: list[dict[str, Any]] = []
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
    from .onnx_quantize import prepare_onnx

    float_proto, _ = prepare_onnx(onnx.load(str(float_model)))  # a no-op on the quantizer's own prepared graph
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
    stats = {t: ChannelStats() for t in watched}
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
            stats[tensor].add(f, q)
    relative = {t: stats[t].relative_rmse() for t in watched}
    return introduced_errors(nodes, relative)


def doctor_summary(ranking: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The report's doctor block: the worst layers, named (pure)."""
    return {
        "metric": metric,
        "worst_layers": ranking[:SHOWN_LAYERS],
        "layers_measured": len(ranking),
    }
