"""tf2onnx with bounded memory.

Measured on ConvNeXtTiny (28.6 M parameters, 112 MB of weights): tf2onnx's
optimizer loop took the export from 2.2 GB to 6.0 GB, and the cause is not the
graph but two copies per optimizer pass:

- after each pass, every node rewrites its NodeProto in place (``del
  attribute[:]`` then ``extend``). With protobuf's upb backend a message's
  arena never gives memory back until the message itself is freed, so each pass
  left one more copy of every constant tensor behind: 36 passes, ~110 MB each;
- with ``catch_errors`` (tf2onnx's default) each pass first deep-copies the whole
  graph so that a failing optimizer can be undone; those copies are cyclic and
  wait for the garbage collector.

``bounded_tf2onnx`` gives each node a fresh NodeProto per pass (the old one,
arena and all, is freed at once) and runs the optimizers without the
deep copies. A conversion that fails that way is retried the default way
(``export_graph_def``), so no model converts worse than before.
"""

from __future__ import annotations

__all__ = ["bounded_tf2onnx", "export_graph_def", "release_memory"]

import contextlib
import ctypes
import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any

_CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"


def release_memory() -> None:
    """Collect cyclic garbage and hand freed heap pages back to the system, so
    the next stage's peak does not stack on the last one's leftovers."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fresh_update_proto(self: Any, external_tensor_storage: Any = None) -> None:
    """tf2onnx's ``Node.update_proto``, writing a new NodeProto instead of
    rewriting the old one in place (whose arena would keep every old copy)."""
    from onnx import NodeProto

    for attr_name, sub_graph in (self.get_body_graphs() or {}).items():
        graph_proto = sub_graph.make_graph("graph for " + self.name + " " + attr_name,
                                           external_tensor_storage=external_tensor_storage)
        self.set_attr(attr_name, graph_proto)
    old = self._op
    del old.attribute[:], old.input[:], old.output[:]
    op = NodeProto()
    op.CopyFrom(old)  # name, type, domain, doc string: small once the attributes are gone
    op.input.extend(self.input)
    op.output.extend(self.output)
    op.attribute.extend(self.get_onnx_attrs(external_tensor_storage).values())
    self._op = op


@contextlib.contextmanager
def bounded_tf2onnx() -> Iterator[None]:
    """Within: tf2onnx's nodes rebuild their protos per pass, optimizers run without deep copies."""
    from tf2onnx import graph as tf2onnx_graph

    original = tf2onnx_graph.Node.update_proto
    saved = os.environ.get(_CATCH_ERRORS)
    tf2onnx_graph.Node.update_proto = _fresh_update_proto
    os.environ[_CATCH_ERRORS] = "FALSE"
    try:
        yield
    finally:
        tf2onnx_graph.Node.update_proto = original
        if saved is None:
            os.environ.pop(_CATCH_ERRORS, None)
        else:
            os.environ[_CATCH_ERRORS] = saved


def export_graph_def(graph_def: Any, input_names: Sequence[str], output_names: Sequence[str], opset: int) -> tuple[Any, list[str]]:
    """tf2onnx's ``from_graph_def`` with bounded memory; (ONNX proto, notes).
    When an optimizer fails without its safety copy, the export is redone the
    default way (optimizers that fail are then skipped) and the notes say so."""
    import tf2onnx

    release_memory()
    try:
        with bounded_tf2onnx():
            proto, _ = tf2onnx.convert.from_graph_def(
                graph_def, input_names=list(input_names), output_names=list(output_names), opset=opset)
        return proto, []
    except Exception as exc:  # noqa: BLE001 - any tf2onnx failure: retry the way tf2onnx itself defaults to
        first = next((line for line in str(exc).splitlines() if line.strip()), exc.__class__.__name__)
    release_memory()
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=list(input_names), output_names=list(output_names), opset=opset)
    return proto, [f"tf2onnx's memory-bounded export failed ({first[:160]}); exported with its default optimizer safety copies"]
