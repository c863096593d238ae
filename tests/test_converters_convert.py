"""Real conversions of the digits CNN (TensorFlow Lite converter, tf2onnx,
onnxruntime.quantization), validated through the device runtimes; the report,
the golden vectors, and every bad input a user can give."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from converters_fixtures import conversions_dir, convert_digits  # noqa: F401  (fixtures)

from edgeship.agent.runtimes import ModelLoadError, open_model
from edgeship.converters.convert import ConversionGateError, convert_model
from edgeship.converters.report import REPORT_SCHEMA
from edgeship.converters.validate import GateLimits
from edgeship.ota.errors import BadInputError
from edgeship.ota.golden import GoldenVectors, compare_outputs

VARIANTS = [
    ("tflite", "none", False),
    ("tflite", "dynamic", False),
    ("tflite", "float16", False),
    ("tflite", "int8", False),
    ("tflite", "int8", True),
    ("onnx", "none", False),
    ("onnx", "dynamic", False),
    ("onnx", "float16", False),
    ("onnx", "int8", False),
]


@pytest.mark.parametrize("to, quantize, int8_io", VARIANTS)
def test_every_variant_converts_validates_and_reports(convert_digits: Any, to: str, quantize: str, int8_io: bool) -> None:
    result = convert_digits(to, quantize, int8_io)
    report = result.report
    assert result.out.is_file() and result.golden_path.is_file() and result.report_path.is_file()
    assert json.loads(result.report_path.read_text()) == json.loads(json.dumps(report))
    assert report["schema"] == REPORT_SCHEMA
    assert report["model"]["format"] == to and report["model"]["size_bytes"] == result.out.stat().st_size
    quality = report["quality"]
    # the conversion target for digits, on held-out eval data
    assert quality["samples"] == 397
    assert quality["accuracy_drop_pp"] <= 1.0, quality
    assert quality["agreement"] >= 0.97, quality
    assert quality["size_bytes"] < quality["reference_size_bytes"]
    assert report["runtime"]["name"] == ("tflite" if to == "tflite" else "onnxruntime")
    assert report["runtime"]["min_version"]
    assert report["runtime"]["int8_io"] is int8_io
    assert report["runtime"]["select_tf_ops"] is False
    inputs = report["signature"]["inputs"]
    assert inputs[0]["shape"][1:] == [8, 8, 1]
    if int8_io:
        assert inputs[0]["dtype"] == "int8" and inputs[0]["scale"] > 0
        assert report["signature"]["outputs"][0]["dtype"] == "int8"
    if to == "tflite" and quantize == "int8":
        assert report["operators"]["fully_integer"] is True, report["operators"]
    if quantize == "none":
        assert report["operators"]["fully_integer"] is False
    # calibration is recorded only where it happened (the other modes only validate on --calib)
    calibration = report["conversion"]["calibration"]
    assert (calibration["samples"] if calibration else 0) == (200 if quantize == "int8" else 0)
    # no temporary files or work folders left beside the output
    leftovers = [p.name for p in result.out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("to, quantize, int8_io", VARIANTS)
def test_golden_vectors_replay_on_the_device_runtime(convert_digits: Any, to: str, quantize: str, int8_io: bool) -> None:
    result = convert_digits(to, quantize, int8_io)
    golden = GoldenVectors.load(result.golden_path)
    assert golden.atol == result.report["golden"]["atol"] > 0
    with open_model(result.out) as runner:
        check = compare_outputs(golden, runner.run(list(golden.inputs)))
        assert check.passed, check.reason
        singles = [runner.run([x[i : i + 1] for x in golden.inputs])[0] for i in range(len(golden.inputs[0]))]
    assert compare_outputs(golden, [np.concatenate(singles)]).passed  # one by one, as well as batched


def test_golden_tolerance_is_tight_enough_to_catch_another_model(convert_digits: Any) -> None:
    fp32 = convert_digits("tflite", "none")
    int8 = convert_digits("tflite", "int8")
    golden = GoldenVectors.load(fp32.golden_path)
    with open_model(int8.out) as runner:
        check = compare_outputs(golden, runner.run(list(golden.inputs)))
    assert not check.passed, check.reason
    assert fp32.report["golden"]["atol"] < int8.report["golden"]["atol"]  # int8 rounds in whole steps


def test_onnx_in_onnx_out_static_int8(convert_digits: Any, tmp_path: Path, digits_files: dict[str, Path]) -> None:
    fp32 = convert_digits("onnx", "none")
    out = tmp_path / "from-onnx-int8.onnx"
    result = convert_model(fp32.out, out, quantize="int8", calib=digits_files["calib"], latency_runs=3)
    report = result.report
    assert report["source"]["kind"] == "onnx" and report["model"]["format"] == "onnx"
    assert "QuantizeLinear" in report["operators"]["counts"]
    # no --eval: validated on the fifth of the calibration data held back from calibrating
    assert "held back" in report["quality"]["data"]
    assert report["conversion"]["calibration"]["samples"] == 160
    assert report["quality"]["agreement"] >= 0.97


def test_savedmodel_source_and_random_validation_data(digits_files: dict[str, Path], tmp_path: Path) -> None:
    import tensorflow as tf

    model = tf.keras.models.load_model(digits_files["model"])
    saved = tmp_path / "saved"
    model.export(saved)
    result = convert_model(saved, tmp_path / "sm.tflite", quantize="dynamic", latency_runs=3)
    assert result.report["source"]["kind"] == "savedmodel"
    assert "random" in result.report["quality"]["data"]
    assert result.report["quality"]["accuracy"] is None and result.report["quality"]["agreement"] >= 0.97


def test_multi_output_model(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    import tensorflow as tf

    inputs = tf.keras.Input((8, 8, 1), name="image")
    hidden = tf.keras.layers.Flatten()(inputs)
    hidden = tf.keras.layers.Dense(16, activation="relu")(hidden)
    classes = tf.keras.layers.Dense(10, activation="softmax", name="classes")(hidden)
    score = tf.keras.layers.Dense(1, name="score")(hidden)
    model = tf.keras.Model(inputs, [score, classes])
    path = tmp_path / "two.keras"
    model.save(path)
    for to in ("tflite", "onnx"):
        result = convert_model(path, tmp_path / f"two.{to}", calib=digits_files["calib"], latency_runs=3)
        report = result.report
        assert len(report["signature"]["outputs"]) == 2
        assert report["quality"]["max_abs_error"] < 1e-4
        assert report["quality"]["agreement"] == 1.0
        assert {o["name"] for o in report["validation"]["metrics"]["per_output"]} == {"score", "classes"}


def test_a_failed_gate_writes_nothing(digits_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gated.tflite"
    with pytest.raises(ConversionGateError) as info:
        convert_model(
            digits_files["model"], out, quantize="dynamic", eval_data=digits_files["eval"],
            limits=GateLimits(min_agreement_pct=100.0, max_accuracy_drop_pp=-1.0), latency_runs=2,
        )
    assert info.value.exit_code == 3
    assert "accuracy gate" in info.value.message
    assert info.value.report["quality"]["gates_passed"] is False
    assert list(tmp_path.iterdir()) == []


# ---- bad input: one clear error, nothing left behind -------------------------------------


def _assert_nothing_written(folder: Path, allowed: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == allowed


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("corrupt.keras", b"PK\x03\x04" + b"\x00" * 100, "not a valid .keras file"),
        ("empty.h5", b"", "not a valid HDF5"),
        ("model.txt", b"hello", "unknown model format"),
        ("bad.onnx", b"\x08\x07garbage", "cannot load this ONNX model"),
        ("model.tflite", b"\x00" * 64, "not a TFLite model"),
    ],
)
def test_corrupt_or_unknown_models(tmp_path: Path, name: str, payload: bytes, message: str) -> None:
    model = tmp_path / name
    model.write_bytes(payload)
    with pytest.raises((BadInputError, ModelLoadError)) as info:
        convert_model(model, tmp_path / "out.onnx" if name.endswith(".onnx") else tmp_path / "out.tflite")
    assert message in info.value.message and "\n" not in info.value.message
    assert info.value.exit_code == 2
    _assert_nothing_written(tmp_path, {name})


def test_truncated_keras_model(digits_files: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "truncated.keras"
    payload = digits_files["model"].read_bytes()
    model.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(BadInputError) as info:
        convert_model(model, tmp_path / "out.tflite")
    assert "truncated.keras" in info.value.message
    _assert_nothing_written(tmp_path, {"truncated.keras"})


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 28, 28, 1), np.float32)}, "the model expects [8, 8, 1]"),
        ({"x": np.zeros((4, 8, 8, 1), np.int32)}, "dtype int32"),
        ({"images": np.zeros((4, 8, 8, 1), np.float32)}, "has no array 'image' or 'x' for the model's input 'image' (found: images)"),
    ],
)
def test_bad_calibration_data(digits_files: dict[str, Path], tmp_path: Path, arrays: dict, message: str) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)
    with pytest.raises(BadInputError) as info:
        convert_model(digits_files["model"], tmp_path / "out.tflite", quantize="int8", calib=calib)
    assert message in info.value.message and "calibration data" in info.value.message
    _assert_nothing_written(tmp_path, {"calib.npz"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize": "int8"}, "needs calibration data"),
        ({"to": "onnx", "quantize": "int8", "int8_io": True, "calib": "x.npz"}, "--int8-io needs --to tflite"),
        ({"quantize": "int4"}, "unknown quantization"),
        ({"to": "onnx"}, "has the suffix .tflite"),
    ],
)
def test_bad_options(digits_files: dict[str, Path], tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        convert_model(digits_files["model"], tmp_path / "out.tflite", **kwargs)
    _assert_nothing_written(tmp_path, set())


def test_unwritable_output(digits_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        convert_model(digits_files["model"], tmp_path / "missing" / "out.tflite")
    with pytest.raises(BadInputError, match="is a folder"):
        convert_model(digits_files["model"], tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        convert_model(digits_files["model"], tmp_path / "file" / "out.tflite")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BadInputError, match="no permission"):
            convert_model(digits_files["model"], locked / "out.tflite")


@pytest.fixture(scope="module")
def determinant_savedmodel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel using MatrixDeterminant, which TFLite builtins cannot express."""
    import tensorflow as tf

    class Determinant(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            return {"det": tf.reshape(tf.linalg.det(x), [-1, 1])}

    module = Determinant()
    path = tmp_path_factory.mktemp("det") / "saved"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def test_operator_tflite_cannot_express_is_named(determinant_savedmodel: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as info:
        convert_model(determinant_savedmodel, tmp_path / "det.tflite")
    assert "MatrixDeterminant" in info.value.message and "--allow-select-tf-ops" in info.value.message
    _assert_nothing_written(tmp_path, set())


def test_select_tf_ops_opt_in(determinant_savedmodel: Path, tmp_path: Path) -> None:
    """With the opt-in the converter keeps the operator as a Flex op; the model is
    written only where a runtime can prove it (run it for validation and golden vectors)."""
    from edgeship.ota.errors import EdgeshipError

    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(8, 3, 3)).astype(np.float32))
    try:
        result = convert_model(determinant_savedmodel, tmp_path / "det.tflite", allow_select_tf_ops=True,
                               eval_data=tmp_path / "eval.npz", latency_runs=2)
    except EdgeshipError as exc:  # no Flex delegate in any runtime installed here
        assert exc.exit_code == 1
        assert "needs Select TF ops (MatrixDeterminant)" in exc.message and "nothing was written" in exc.message
        _assert_nothing_written(tmp_path, {"eval.npz"})
        return
    assert result.report["runtime"]["select_tf_ops"] is True
    assert result.report["runtime"]["runtimes"] == ["tensorflow"]
    assert "MatrixDeterminant" in result.report["runtime"]["select_tf_ops_used"]
    assert result.report["quality"]["max_abs_error"] < 1e-3


def test_onnx_with_a_fixed_batch_of_one(convert_digits: Any, digits_files: dict[str, Path], tmp_path: Path) -> None:
    """PyTorch exports often fix the batch at 1: validation and golden vectors go one sample at a time."""
    import onnx

    model = onnx.load(str(convert_digits("onnx", "none").out))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    result = convert_model(fixed, tmp_path / "fixed-int8.onnx", quantize="int8", calib=digits_files["calib"],
                           eval_data=digits_files["eval"], latency_runs=2)
    assert result.report["signature"]["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert result.report["quality"]["samples"] == 397 and result.report["quality"]["agreement"] >= 0.97
    golden = GoldenVectors.load(result.golden_path)
    assert golden.inputs[0].shape[0] == 1
    with open_model(result.out) as runner:
        assert compare_outputs(golden, runner.run(list(golden.inputs))).passed


def test_missing_extra_names_it_and_exits_5(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ImportError('blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgeship.toolkit.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "convert", str(digits_files["model"]), "-o", str(tmp_path / "o.tflite")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith("error: ") and "pip install 'edgeship[convert]'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


# ---- outputs that cannot be written, gates that cannot be checked --------------------------


def test_a_folder_nobody_can_write_in_is_refused_before_any_work(digits_files: dict[str, Path]) -> None:
    """/proc takes no new files, not even from root (for whom os.access always says yes)."""
    with pytest.raises(BadInputError) as info:
        convert_model(digits_files["model"], "/proc/edgeship-unwritable.tflite")
    assert "cannot be written" in info.value.message and "\n" not in info.value.message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("suffix", [".report.json", ".golden.npz"])
def test_a_folder_where_the_report_or_golden_file_goes_is_refused(
    digits_files: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    (tmp_path / f"out.tflite{suffix}").mkdir()
    with pytest.raises(BadInputError) as info:
        convert_model(digits_files["model"], tmp_path / "out.tflite", validate=False)
    assert f"out.tflite{suffix}" in info.value.message and "is a folder" in info.value.message
    _assert_nothing_written(tmp_path, {f"out.tflite{suffix}"})


def test_gates_are_refused_when_validation_is_skipped(digits_files: dict[str, Path], tmp_path: Path) -> None:
    """A gate the user asked for is never passed silently: --no-validate with a gate is bad input."""
    with pytest.raises(BadInputError, match="--no-validate"):
        convert_model(digits_files["model"], tmp_path / "out.tflite", validate=False,
                      limits=GateLimits(min_agreement_pct=97.0))
    _assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize("to, quantize", [("tflite", "int8"), ("onnx", "dynamic")])
def test_converted_files_share_the_model_file_mode(convert_digits: Any, to: str, quantize: str) -> None:
    """The golden vectors and the report are as readable as the model they describe."""
    result = convert_digits(to, quantize)
    mode = result.out.stat().st_mode & 0o777
    assert result.golden_path.stat().st_mode & 0o777 == mode
    assert result.report_path.stat().st_mode & 0o777 == mode


def test_missing_onnxruntime_is_a_missing_extra_named_before_converting(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None  # as if not installed\n"
        "from edgeship.toolkit.cli import main\n"
        "main()\n"
    )
    for args in (["convert", str(digits_files["model"]), "-o", str(tmp_path / "o.onnx")],
                 ["inspect", str(tmp_path / "o.onnx")]):
        if args[0] == "inspect":
            (tmp_path / "o.onnx").write_bytes(b"\x08\x07")  # looks like ONNX; the runtime is what is missing
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 5, proc.stderr
        assert proc.stderr.startswith("error: ") and "edgeship[" in proc.stderr and ".work-" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]  # only what the test itself wrote


def test_an_output_that_would_overwrite_an_input_is_refused(convert_digits: Any, digits_files: dict[str, Path], tmp_path: Path) -> None:
    """ONNX in, ONNX out: `-o` the source itself would replace the original with its quantized copy."""
    source = tmp_path / "model.onnx"
    source.write_bytes(convert_digits("onnx", "none").out.read_bytes())
    calib = tmp_path / "calib.npz"
    calib.write_bytes(digits_files["calib"].read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out, kwargs, role in [
        (source, {"quantize": "dynamic"}, "MODEL"),
        (tmp_path / "." / "model.onnx", {"quantize": "dynamic"}, "MODEL"),
        (calib, {"to": "onnx", "quantize": "int8", "calib": calib}, "--calib"),
        (tmp_path / "x.onnx", {"eval_data": tmp_path / "x.onnx.report.json"}, "--eval"),
    ]:
        if role == "--eval":
            (tmp_path / "x.onnx.report.json").write_bytes(b"{}")
            before["x.onnx.report.json"] = b"{}"
        with pytest.raises(BadInputError, match=f"would overwrite {role}"):
            convert_model(source, out, latency_runs=2, **kwargs)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
