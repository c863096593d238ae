"""Read what the runtime API does not show from a ``.tflite`` flatbuffer: the
converter's metadata (``min_runtime_version``), each operator's tensor types
(to name the operators left in float) and the quantization of the tensor behind
each float output.

The flatbuffer schema module ships with LiteRT (``ai_edge_litert``) and with
TensorFlow; whichever is installed is used.
"""

from __future__ import annotations

__all__ = ["OperatorInfo", "TFLiteGraph", "parse_tflite_graph", "read_tflite_graph"]

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.agent.runtimes import ModelLoadError
from edgeship.ota.errors import MissingExtraError


@dataclass(frozen=True)
class OperatorInfo:
    """One operator of the main subgraph: its name and the dtypes of its tensors."""

    name: str
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]

    @property
    def is_float(self) -> bool:
        """Computes in floating point (casts between float and int do not count)."""
        if self.name in ("QUANTIZE", "DEQUANTIZE", "CAST"):
            return False
        return any(d in ("float32", "float16") for d in self.output_dtypes)


@dataclass(frozen=True)
class TFLiteGraph:
    operators: tuple[OperatorInfo, ...]
    metadata: dict[str, bytes]
    output_quanta: tuple[float, ...]
    """For each graph output, the step of the integer tensor it is dequantized
    from (0.0 when the output is computed in float)."""
    select_tf_ops: tuple[str, ...]

    @property
    def min_runtime_version(self) -> str | None:
        raw = self.metadata.get("min_runtime_version")
        return raw.split(b"\x00")[0].decode() if raw else None


_TYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool",
    7: "int16", 8: "complex64", 9: "int8", 10: "float64",
}


def _schema() -> Any:
    for name in ("ai_edge_litert.schema_py_generated", "tflite_runtime.schema_py_generated", "tensorflow.lite.python.schema_py_generated"):
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a schema module that fails to import for any reason is skipped for the next
            continue
    raise MissingExtraError("reading a .tflite file needs LiteRT or TensorFlow: pip install 'edgeship[litert]'")


def read_tflite_graph(path: str | os.PathLike[str]) -> TFLiteGraph:
    """Parse the model's main subgraph (ModelLoadError on a corrupt file)."""
    return parse_tflite_graph(Path(path).read_bytes(), str(path))


def parse_tflite_graph(data: bytes, path: str = "the model") -> TFLiteGraph:
    """``read_tflite_graph`` of a flatbuffer in memory."""
    schema = _schema()
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
        builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        metadata = {m.name.decode(): _buffer_bytes(model.buffers[m.buffer].data) for m in (model.metadata or [])}
        graph = model.subgraphs[0]
        tensors = graph.tensors
        codes = model.operatorCodes
        operators: list[OperatorInfo] = []
        select: list[str] = []
        producer: dict[int, Any] = {}
        for op in graph.operators or []:
            code = codes[op.opcodeIndex]
            builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            name = builtin_names.get(builtin, str(builtin))
            if name == "CUSTOM" and code.customCode:
                name = code.customCode.decode()
                if name.startswith("Flex"):
                    select.append(name[4:])
            ins = tuple(_TYPES.get(tensors[i].type, "?") for i in (op.inputs if op.inputs is not None else []) if i >= 0)
            outs = tuple(_TYPES.get(tensors[i].type, "?") for i in (op.outputs if op.outputs is not None else []) if i >= 0)
            operators.append(OperatorInfo(name, ins, outs))
            for i in op.outputs if op.outputs is not None else []:
                producer[int(i)] = (name, op)
        quanta: list[float] = []
        for out in graph.outputs if graph.outputs is not None else []:
            quanta.append(_output_quantum(int(out), tensors, producer))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the generated flatbuffer parser raises whatever a truncated buffer trips (struct.error, IndexError, ...)
        raise ModelLoadError(
            f"{path}: not a readable TFLite flatbuffer (corrupt or truncated? the parser failed with {exc.__class__.__name__})"
        ) from None
    return TFLiteGraph(tuple(operators), metadata, tuple(quanta), tuple(sorted(set(select))))


def _buffer_bytes(data: Any) -> bytes:
    return b"" if data is None else bytes(bytearray(data))


def _scale(tensor: Any) -> float:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return 0.0
    return float(max(q.scale))


def _output_quantum(index: int, tensors: Any, producer: dict[int, Any]) -> float:
    own = _scale(tensors[index])
    if own:
        return own
    made_by = producer.get(index)
    if made_by and made_by[0] == "DEQUANTIZE":
        return _scale(tensors[int(made_by[1].inputs[0])])
    return 0.0
