"""scikit-learn models (classifiers, regressors, pipelines with their
preprocessing) to ONNX through skl2onnx, the converter the ONNX project keeps
for them, and a runner that makes the original model the reference.

A ``.joblib`` or ``.pkl`` file is a pickle: loading it runs whatever code it
contains. It is loaded only when the user says they trust it
(``--trust-pickle``); the refusal says why.

Graph contract: one float32 input ``input`` of shape [N, features]; a
classifier gives ``label`` (int64, [N]) and ``probabilities`` (float32, [N,
classes], no ZipMap: plain tensors every runtime serves); a regressor gives
``variable`` (float32, [N, 1]). Class labels must be integers so the label
output is a number (accuracy then compares ``argmax(probabilities)`` with the
labels 'y' as class indices).
"""

from __future__ import annotations

__all__ = ["SKLEARN_OPSET", "SKLEARN_SUFFIXES", "SklearnRunner", "export_sklearn_to_onnx", "load_sklearn"]

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelLoadError, ModelRunner, ModelSignature, TensorSpec
from edgeship.ota.errors import BadInputError, EdgeshipError, first_line, require_module

from .sources import SKLEARN_SUFFIXES

SKLEARN_OPSET = {"": 17, "ai.onnx.ml": 3}
"""Default-domain opset 17 (as for Keras exports) and ai.onnx.ml 3 (TreeEnsemble*)."""
INPUT_NAME = "input"


def load_sklearn(path: Path, *, trust_pickle: bool) -> Any:
    """The estimator in a pickle/joblib file; refused unless the user trusts the file."""
    if not trust_pickle:
        raise BadInputError(
            f"{path} is a pickle: loading it runs any code it contains; if you made it or trust its source, "
            "pass --trust-pickle"
        )
    joblib = require_module("joblib", "convert")
    try:
        model = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - a pickle can raise anything
        raise ModelLoadError(f"{path}: cannot load this pickle: {first_line(exc)}") from None
    if not hasattr(model, "predict"):
        raise ModelLoadError(f"{path}: holds a {type(model).__name__}, not a scikit-learn estimator (no predict)")
    if getattr(model, "n_features_in_", None) is None:
        raise ModelLoadError(f"{path}: the {type(model).__name__} is not fitted (no n_features_in_)")
    if _is_classifier(model):
        classes = np.asarray(model.classes_)
        if classes.dtype.kind not in "iub":
            raise BadInputError(
                f"{path}: the classifier's classes are {classes.dtype} ({list(classes[:3])}...); "
                "edgeship serves integer class ids: fit on label indices and ship the names with --labels"
            )
    return model


def _is_classifier(model: Any) -> bool:
    from sklearn.base import is_classifier

    return bool(is_classifier(model))


def _classifiers_in(model: Any) -> list[Any]:
    """Every classifier in the model (a pipeline's final step, stacked estimators), for skl2onnx options."""
    found = [model] if _is_classifier(model) else []
    for step in getattr(model, "steps", []) or []:
        found += _classifiers_in(step[1])
    return found


def export_sklearn_to_onnx(path: Path, out: Path, *, trust_pickle: bool) -> list[str]:
    """Write the estimator in ``path`` as ONNX to ``out``, checked and loadable by ONNX Runtime."""
    from .to_onnx import check_onnx_model, load_in_onnxruntime

    model = load_sklearn(path, trust_pickle=trust_pickle)
    skl2onnx = require_module("skl2onnx", "convert")
    data_types = require_module("skl2onnx.common.data_types", "convert")
    onnx = require_module("onnx", "convert")
    features = int(model.n_features_in_)
    options = {id(c): {"zipmap": False} for c in _classifiers_in(model)}
    try:
        with _integer_missing_value_flags():
            proto = skl2onnx.convert_sklearn(
                model,
                initial_types=[(INPUT_NAME, data_types.FloatTensorType([None, features]))],
                target_opset=SKLEARN_OPSET,
                options=options or None,
            )
    except Exception as exc:  # noqa: BLE001 - skl2onnx raises RuntimeError/NotImplementedError naming the estimator
        raise EdgeshipError(f"skl2onnx cannot convert {path.name} ({type(model).__name__}): {_skl2onnx_reason(exc)}") from None
    check_onnx_model(proto, path.name)
    onnx.save(proto, str(out))
    load_in_onnxruntime(out, path.name)
    return [f"scikit-learn {type(model).__name__} exported with skl2onnx (ZipMap off: plain label and probability tensors)"]


@contextlib.contextmanager
def _integer_missing_value_flags() -> Iterator[None]:
    """skl2onnx 1.20 gives a HistGradientBoosting tree's leaves the Python
    ``False`` as their ``nodes_missing_value_tracks_true`` flag (its branches get
    numpy integers); onnx 1.16+ refuses a bool in an integer list attribute, so
    every HistGradientBoosting model failed with "Expected an int, got a
    boolean". Within: skl2onnx's tree-node helper receives the flag as 0/1."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        flag = kwargs.get("nodes_missing_value_tracks_true")
        if flag is not None:
            kwargs["nodes_missing_value_tracks_true"] = int(flag)
        return original(*args, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _skl2onnx_reason(exc: BaseException) -> str:
    """One short line: skl2onnx's message can hold a whole tree's attributes."""
    text = first_line(exc)
    node = re.match(r"Unable to create node '([^']+)'", text)
    cause = exc.__cause__ or exc.__context__
    if node:
        text = f"cannot create the {node.group(1)} node"
        if cause is not None:
            text += f" ({type(cause).__name__}: {first_line(cause)[:150]})"
    return text[:300]


class SklearnRunner(ModelRunner):
    """The original estimator behind the runner interface: the reference a
    converted scikit-learn model is validated against."""

    def __init__(self, path: Path, model: Any) -> None:
        sklearn = require_module("sklearn", "convert")
        self.runtime = "scikit-learn"
        self.runtime_version = str(sklearn.__version__)
        self.path = path
        self._model = model
        self._lock = threading.Lock()
        features = int(model.n_features_in_)
        self.classifier = _is_classifier(model)
        inputs = (TensorSpec(INPUT_NAME, (-1, features), "float32"),)
        if self.classifier:
            classes = len(model.classes_)
            outputs: tuple[TensorSpec, ...] = (
                TensorSpec("label", (-1,), "int64"),
                TensorSpec("probabilities", (-1, classes), "float32"),
            )
        else:
            outputs = (TensorSpec("variable", (-1, 1), "float32"),)
        self.signature = ModelSignature(inputs=inputs, outputs=outputs)

    @property
    def model(self) -> Any:
        return self._model

    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != 1:
            raise BadInputError(f"a scikit-learn model takes one input, got {len(inputs)}")
        x = np.asarray(inputs[0], np.float32)
        with self._lock:
            if self.classifier:
                probabilities = np.asarray(self._model.predict_proba(x), np.float32)
                labels = np.asarray(self._model.classes_)[probabilities.argmax(axis=1)].astype(np.int64)
                return [labels, probabilities]
            return [np.asarray(self._model.predict(x), np.float32).reshape(-1, 1)]

    def close(self) -> None:
        self._model = None


def is_sklearn_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SKLEARN_SUFFIXES
