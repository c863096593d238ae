"""tf2onnx with bounded memory: each node's proto rebuilt per optimizer pass (the
old one and its copies of the weights freed), optimizers without deep copies,
and the same ONNX model as tf2onnx's default way. The memory itself is measured
by benchmarks/zoo.py (ConvNeXtTiny to ONNX), not here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from edgeship.converters import tf2onnx_memory
from edgeship.converters.tf2onnx_memory import bounded_tf2onnx, export_graph_def


def _small_cnn_graph() -> tuple[Any, list[str], list[str], np.ndarray, np.ndarray]:
    """A frozen GraphDef of a small Keras CNN, its input/output names, an input and Keras' answer."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((12, 12, 3), name="image")
    hidden = tf.keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    hidden = tf.keras.layers.DepthwiseConv2D(3)(hidden)
    hidden = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.BatchNormalization()(hidden))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4, activation="softmax")(hidden))
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec([None, 12, 12, 3], tf.float32, name="image")])
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    x = np.random.default_rng(3).normal(0, 1, (5, 12, 12, 3)).astype(np.float32)
    return (frozen.graph.as_graph_def(), [t.name for t in frozen.inputs], [t.name for t in frozen.outputs], x,
            model(x).numpy())


def _weights(proto: Any) -> list[tuple[tuple[int, ...], float]]:
    from onnx import numpy_helper

    return sorted((tuple(i.dims), round(float(numpy_helper.to_array(i).astype(np.float64).sum()), 4))
                  for i in proto.graph.initializer)


def _run(proto: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_the_bounded_export_is_the_model_tf2onnx_exports_by_default() -> None:
    import tf2onnx

    graph_def, inputs, outputs, x, expected = _small_cnn_graph()
    bounded, notes = export_graph_def(graph_def, inputs, outputs, 17)
    default, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=17)
    assert notes == []
    assert sorted(n.op_type for n in bounded.graph.node) == sorted(n.op_type for n in default.graph.node)
    assert _weights(bounded) == _weights(default)  # tf2onnx numbers its names globally: compare the values
    np.testing.assert_allclose(_run(bounded, x), expected, atol=1e-5)
    np.testing.assert_array_equal(_run(bounded, x), _run(default, x))


def test_within_the_bounds_a_node_gets_a_new_proto_and_afterwards_tf2onnx_is_as_it_was() -> None:
    from onnx import helper, numpy_helper
    from tf2onnx import graph as tf2onnx_graph

    original = tf2onnx_graph.Node.update_proto
    before = os.environ.get("TF2ONNX_CATCH_ERRORS")
    weights = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = tf2onnx_graph.Graph([helper.make_node("Const", [], ["w:0"], name="w", value=weights)],
                                output_shapes={"w:0": [3, 4]}, dtypes={"w:0": 1}, opset=17)
    node = graph.get_node_by_name("w")
    with bounded_tf2onnx():
        assert os.environ["TF2ONNX_CATCH_ERRORS"] == "FALSE"  # optimizers without deep copies
        old = node.op
        graph.update_proto()
        assert node.op is not old  # the old proto (and its arena's copies) can be freed
        assert list(node.op.output) == ["w:0"] and node.op.op_type == "Const"
        np.testing.assert_array_equal(numpy_helper.to_array(node.op.attribute[0].t), np.arange(12).reshape(3, 4))
    assert tf2onnx_graph.Node.update_proto is original
    assert os.environ.get("TF2ONNX_CATCH_ERRORS") == before


def test_an_export_that_fails_within_the_bounds_is_redone_the_default_way(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.contextmanager
    def failing() -> Iterator[None]:
        raise RuntimeError("an optimizer failed without its safety copy")
        yield  # pragma: no cover

    graph_def, inputs, outputs, x, expected = _small_cnn_graph()
    monkeypatch.setattr(tf2onnx_memory, "bounded_tf2onnx", failing)
    proto, notes = export_graph_def(graph_def, inputs, outputs, 17)
    assert len(notes) == 1 and "an optimizer failed without its safety copy" in notes[0]
    np.testing.assert_allclose(_run(proto, x), expected, atol=1e-5)
