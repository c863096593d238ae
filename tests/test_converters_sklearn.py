"""scikit-learn to ONNX: classifiers, regressors and pipelines with scalers,
validated against the original estimator, bundled, installed and served by the
real agent on ONNX Runtime; a pickle is loaded only when the user trusts it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from converters_fixtures import serve_with_agent, sklearn_models

from edgeship.converters.convert import convert_model
from edgeship.ota.errors import BadInputError
from edgeship.toolkit.cli import main as cli


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return sklearn_models(tmp_path_factory.mktemp("sklearn"))


@pytest.mark.parametrize("name", ["logistic-pipeline", "random-forest", "hist-boosting"])
def test_classifiers_convert_with_label_and_probabilities(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    result = convert_model(models[name], tmp_path / f"{name}.onnx", eval_data=models["digits-eval"],
                           trust_pickle=True, latency_runs=3)
    report = result.report
    assert [o["name"] for o in report["signature"]["outputs"]] == ["label", "probabilities"]  # no ZipMap
    quality = report["quality"]
    assert quality["reference_accuracy"] > 0.85 and abs(quality["accuracy_drop_pp"]) < 0.5
    assert quality["agreement"] >= 0.99 and quality["max_abs_error"] < 1e-4
    assert report["validation"]["reference"]["runtime"] == "scikit-learn"


@pytest.mark.parametrize("name", ["ridge-pipeline", "boosted-regressor", "hist-boosting-regressor"])
def test_regressors_are_validated_with_error_metrics(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    result = convert_model(models[name], tmp_path / f"{name}.onnx", eval_data=models["diabetes-eval"],
                           trust_pickle=True, latency_runs=3)
    quality = result.report["quality"]
    assert quality["accuracy"] is None and quality["agreement"] is None
    assert 30 < quality["reference_rmse"] < 90  # diabetes progression: RMSE ~55 for these models
    assert abs(quality["rmse"] - quality["reference_rmse"]) < 0.01 and quality["mae"] > 0


def test_a_pickle_is_refused_unless_trusted(models: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(models["random-forest"]), "-o", str(tmp_path / "f.onnx")])
    assert result.exit_code == 2
    assert "is a pickle: loading it runs any code it contains" in result.stderr and "--trust-pickle" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_is_never_loaded_before_the_flag_is_checked(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BadInputError, match="--trust-pickle"):
        convert_model(evil, tmp_path / "e.onnx")
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"quantize": "int8"}, {"to": "tflite"}])
def test_scikit_learn_converts_to_fp32_onnx_only(models: dict[str, Path], tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(BadInputError, match="fp32 ONNX only"):
        convert_model(models["ridge-pipeline"], tmp_path / "r.out", trust_pickle=True,
                      calib=models["diabetes-eval"], **kwargs)


def test_cli_converts_a_joblib_model_with_trust(models: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(models["logistic-pipeline"]), "-o", str(tmp_path / "lr.onnx"),
                                      "--eval", str(models["digits-eval"]), "--trust-pickle", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"]["source"]["kind"] == "sklearn"


def test_the_agent_installs_and_serves_a_scikit_learn_model(models: dict[str, Path], tmp_path: Path) -> None:
    result = convert_model(models["logistic-pipeline"], tmp_path / "lr.onnx", eval_data=models["digits-eval"],
                           trust_pickle=True, latency_runs=3)
    x = np.load(models["digits-eval"])["x"][:3]
    answer, state = serve_with_agent(result, tmp_path / "agent", "digits-lr", x.tolist())
    assert state == "COMMITTED"  # installed: signature checked, golden vectors replayed by name
    import joblib

    expected = joblib.load(models["logistic-pipeline"]).predict(x)
    predictions = answer["predictions"]
    assert [p["label"] for p in predictions] == expected.tolist()
    assert np.allclose([sum(p["probabilities"]) for p in predictions], 1.0, atol=1e-4)


def test_hist_gradient_boosting_sends_missing_values_where_scikit_learn_does(tmp_path: Path) -> None:
    """skl2onnx's tree helper is given integer missing-value flags (it passes a bool
    that onnx refuses); NaN features still take the branch scikit-learn learned."""
    import joblib
    import onnxruntime as ort
    from skl2onnx.common import tree_ensemble
    from sklearn.datasets import load_digits
    from sklearn.ensemble import HistGradientBoostingClassifier

    from edgeship.converters.from_sklearn import export_sklearn_to_onnx

    original = tree_ensemble.add_node
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x[::5, 20] = np.nan
    x[1::7, 36] = np.nan
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(x[:1400], y[:1400])
    joblib.dump(model, tmp_path / "hgb.joblib")
    export_sklearn_to_onnx(tmp_path / "hgb.joblib", tmp_path / "hgb.onnx", trust_pickle=True)
    assert tree_ensemble.add_node is original  # the compatibility shim is gone afterwards
    labels, probabilities = ort.InferenceSession(str(tmp_path / "hgb.onnx")).run(None, {"input": x[1400:]})
    np.testing.assert_array_equal(labels, model.predict(x[1400:]))
    np.testing.assert_allclose(probabilities, model.predict_proba(x[1400:]), atol=1e-5)
