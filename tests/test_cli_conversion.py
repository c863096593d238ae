"""``edgeship convert / validate / inspect / bench`` through click's CliRunner,
and once as a real subprocess (stdout must hold exactly one JSON document even
though TensorFlow prints while it converts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from converters_fixtures import conversions_dir, convert_digits  # noqa: F401  (fixtures)

from edgeship.toolkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_convert_json_then_inspect_and_validate(digits_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "digits-int8.tflite"
    result = invoke(
        "convert", digits_files["model"], "-o", out, "--quantize", "int8", "--calib", digits_files["calib"],
        "--eval", digits_files["eval"], "--max-accuracy-drop", "1", "--min-agreement", "97", "--json",
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["written"] is True and Path(document["model"]) == out
    assert document["report"]["golden"]["file"] == "digits-int8.tflite.golden.npz"
    assert (tmp_path / "digits-int8.tflite.report.json").is_file()

    inspected = invoke("inspect", out, "--json")
    assert inspected.exit_code == 0
    info = json.loads(inspected.stdout)
    assert info["format"] == "tflite" and info["fully_integer"] is True and info["float_operators"] == []
    assert info["operators"]["CONV_2D"] == 2

    validated = invoke("validate", digits_files["model"], out, "--data", digits_files["eval"], "--runs", "5", "--json")
    assert validated.exit_code == 0, validated.stderr
    metrics = json.loads(validated.stdout)["metrics"]
    assert metrics["agreement"] >= 0.97 and metrics["candidate_accuracy"] is not None


def test_validate_gate_failure_exits_3_naming_the_gate(digits_files: dict[str, Path], tmp_path: Path) -> None:
    from model import build_digits_cnn  # examples/digits/model.py

    untrained = tmp_path / "untrained.keras"
    build_digits_cnn().save(untrained)
    result = invoke("validate", digits_files["model"], untrained, "--data", digits_files["eval"],
                    "--runs", "3", "--max-accuracy-drop", "1", "--min-agreement", "97")
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "accuracy gate" in line and "points" in line and "agreement gate" in line
    assert "accuracy" in result.stdout  # the human table is still shown


def test_validate_json_on_gate_failure_still_prints_the_document(
    convert_digits: Any, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    candidate = convert_digits("onnx", "int8")
    result = invoke("validate", candidate.out, candidate.out, "--data", digits_files["eval"], "--runs", "3",
                    "--min-agreement", "100", "--json")
    assert result.exit_code == 0  # a model agrees with itself
    document = json.loads(result.stdout)
    assert document["metrics"]["agreement"] == 1.0 and document["metrics"]["max_abs_error"] == 0.0
    # a gate that fails: accuracy cannot be measured on data without labels
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=np.load(digits_files["eval"])["x"][:40])
    result = invoke("validate", digits_files["model"], candidate.out, "--data", unlabelled, "--runs", "3",
                    "--max-accuracy-drop", "1", "--json")
    assert result.exit_code == 3
    assert "accuracy gate" in one_error_line(result)
    document = json.loads(result.stdout)  # still exactly one JSON document on stdout
    assert document["gates"]["passed"] is False and document["gates"]["failures"][0].startswith("accuracy gate")
    assert document["metrics"]["samples"] == 40 and document["metrics"]["agreement"] >= 0.97


def test_inspect_names_the_float_operators(convert_digits: Any) -> None:
    result = invoke("inspect", convert_digits("tflite", "none").out)
    assert result.exit_code == 0
    assert "fully integer: no; in float:" in result.stdout and "CONV_2D" in result.stdout


def test_inspect_a_savedmodel_lists_its_tensorflow_operations(digits_files: dict[str, Path], tmp_path: Path) -> None:
    import tensorflow as tf

    saved = tmp_path / "saved"
    tf.keras.models.load_model(digits_files["model"]).export(saved)
    info = json.loads(invoke("inspect", saved, "--json").stdout)
    assert info["format"] == "savedmodel"
    assert info["operators"]["Conv2D"] == 2 and info["operators"]["MatMul"] == 2
    assert "Placeholder" not in info["operators"] and "Conv2D" in info["float_operators"]
    human = invoke("inspect", saved)
    assert "operators: " in human.stdout and not any(line.endswith(": ") for line in human.stdout.splitlines())


def test_bench_ranks_models_against_the_first(convert_digits: Any, digits_files: dict[str, Path]) -> None:
    models = [convert_digits("tflite", "none").out, convert_digits("tflite", "int8").out, convert_digits("onnx", "none").out]
    result = invoke("bench", *models, "--runs", "20", "--threads", "1", "--data", digits_files["eval"], "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    rows = document["models"]
    assert [r["runtime"] for r in rows] == ["litert", "litert", "onnxruntime"]
    assert rows[0]["p50_ratio_to_first"] == 1.0
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["throughput_per_s"] > 0
    assert document["fastest"] in {str(m) for m in models}
    human = invoke("bench", digits_files["model"], *models[:2], "--runs", "5")  # Keras too, on TensorFlow
    assert human.exit_code == 0, human.stderr
    assert "fastest here:" in human.stdout and "tensorflow" in human.stdout and "digits.keras" in human.stdout
    keras = json.loads(invoke("bench", digits_files["model"], "--runs", "3", "--json").stdout)["models"][0]
    assert keras["runtime"] == "tensorflow" and keras["format"] == "keras" and keras["p50_ms"] > 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["convert", "{tmp}/nope.keras", "-o", "{tmp}/o.tflite"], 2, "no such model file"),
        (["convert", "{tmp}/junk.keras", "-o", "{tmp}/o.tflite"], 2, "not a valid .keras file"),
        (["convert", "{model}", "-o", "{tmp}/o.tflite", "--quantize", "int8", "--calib", "{tmp}/noxs.npz"], 2, "has no array 'image' or 'x'"),
        (["convert", "{model}", "-o", "{tmp}/no/such/dir/o.tflite"], 2, "cannot be written"),
        (["convert", "{model}", "-o", "{tmp}/o.tflite", "--preprocess", "layout=NWHC"], 2, "layout"),
        (["inspect", "{tmp}/junk.keras"], 2, "not a valid .keras file"),
        (["bench", "{tmp}/zeros.tflite"], 2, "not a TFLite model"),
        (["validate", "{model}", "{tmp}/zeros.tflite", "--data", "{eval}"], 2, "not a TFLite model"),
    ],
)
def test_bad_input_is_one_line_and_exit_code(
    digits_files: dict[str, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    (tmp_path / "zeros.tflite").write_bytes(b"\x00" * 32)
    np.savez(tmp_path / "noxs.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    before = {p.name for p in tmp_path.iterdir()}
    fill = {"tmp": tmp_path, "model": digits_files["model"], "eval": digits_files["eval"]}
    result = invoke(*[a.format(**fill) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert message in one_error_line(result)
    assert {p.name for p in tmp_path.iterdir()} == before  # no partial output


def test_real_subprocess_json_stdout_is_one_document(digits_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "digits.onnx"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}  # let TensorFlow be as chatty as it can
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship.toolkit.cli", "convert", str(digits_files["model"]), "-o", str(out),
         "--quantize", "dynamic", "--calib", str(digits_files["calib"]), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    document = json.loads(proc.stdout)
    assert document["report"]["conversion"]["quantize"] == "dynamic"
    assert out.is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "edgeship.toolkit.cli", "convert", str(tmp_path / "missing.keras"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")


def test_help_does_not_import_tensorflow() -> None:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom edgeship.toolkit.cli import main\n"
        "from edgeship.toolkit.commands import conversion\n"
        "r = CliRunner().invoke(main, ['convert', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_convert_from_a_folder_of_images_records_the_preprocessing(digits_files: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    data = np.load(digits_files["eval"])
    images = tmp_path / "images"
    for i, (x, y) in enumerate(zip(data["x"][:200], data["y"][:200])):
        (images / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[..., 0] * 255).astype(np.uint8), mode="L").save(images / str(int(y)) / f"{i}.png")
    out = tmp_path / "digits-int8.tflite"
    result = invoke("convert", digits_files["model"], "-o", out, "--quantize", "int8", "--calib", images,
                    "--preprocess", "scale=1/255", "--min-agreement", "97", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["labels"] == [str(i) for i in range(10)]
    assert report["preprocessing"] == {"size": [8, 8], "scale": 1 / 255, "mean": [0.0], "std": [1.0],
                                       "layout": "NHWC", "color": "grayscale"}
    assert report["quality"]["accuracy"] >= 0.9 and "held back" in report["quality"]["data"]


def test_convert_refuses_a_gate_it_would_not_check(digits_files: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("convert", digits_files["model"], "-o", tmp_path / "d.tflite", "--no-validate", "--min-agreement", "97")
    assert result.exit_code == 2 and "--no-validate" in one_error_line(result)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_convert_reports_progress_of_the_long_steps(digits_files: dict[str, Path], tmp_path: Path) -> None:
    """Calibration, validation and timing report progress (the CLI draws rich bars from it)."""
    from edgeship.converters.convert import convert_model

    seen: dict[str, list[tuple[int, int]]] = {}
    convert_model(digits_files["model"], tmp_path / "p.tflite", quantize="int8", calib=digits_files["calib"],
                  latency_runs=3, progress=lambda label, done, total: seen.setdefault(label, []).append((done, total)))
    for label in ("loading model", "calibrating", "validating: reference", "validating: candidate",
                  "timing: reference", "timing: candidate"):
        assert label in seen, sorted(seen)
        done, total = seen[label][-1]
        assert done == total > 0, (label, seen[label][-1])
    assert seen["calibrating"][-1] == (160, 160)  # four fifths of calib.npz; the rest validates


def test_nchw_onnx_model_from_an_image_folder(convert_digits: Any, digits_files: dict[str, Path], tmp_path: Path) -> None:
    """A PyTorch-style NCHW ONNX model quantized on a folder of images with layout=NCHW answers like it does on
    the NHWC arrays (digits are not symmetric: a transposed image would show in the accuracy)."""
    import onnx
    from onnx import TensorProto, helper
    from PIL import Image

    model = onnx.load(str(convert_digits("onnx", "none").out))
    graph, old = model.graph, model.graph.input[0]
    for node in graph.node:
        node.input[:] = [f"{old.name}_nhwc" if v == old.name else v for v in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["pixels"], [f"{old.name}_nhwc"], perm=[0, 2, 3, 1]))
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8]))
    nchw = tmp_path / "nchw.onnx"
    onnx.save(model, str(nchw))
    data = np.load(digits_files["eval"])
    for i, (x, y) in enumerate(zip(data["x"][:150], data["y"][:150])):
        (tmp_path / "images" / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[..., 0] * 255).astype(np.uint8)).save(tmp_path / "images" / str(int(y)) / f"{i}.png")
    result = invoke("convert", nchw, "-o", tmp_path / "nchw-int8.onnx", "--quantize", "int8", "--calib", tmp_path / "images",
                    "--preprocess", "scale=1/255,layout=NCHW", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["preprocessing"]["layout"] == "NCHW" and report["signature"]["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert report["quality"]["reference_accuracy"] >= 0.9 and report["quality"]["agreement"] >= 0.97


def test_convert_h5_source_human_output(digits_files: dict[str, Path], tmp_path: Path) -> None:
    import tensorflow as tf

    h5 = tmp_path / "digits.h5"
    tf.keras.models.load_model(digits_files["model"]).save(h5)
    result = invoke("convert", h5, "-o", tmp_path / "digits.tflite", "--eval", digits_files["eval"], "--no-validate")
    assert result.exit_code == 0, result.stderr
    assert "wrote" in result.stdout and "golden" in result.stdout
    report = json.loads((tmp_path / "digits.tflite.report.json").read_text())
    assert report["source"]["kind"] == "h5" and report["quality"] is None and report["validation"] is None


def test_convert_records_labels_and_refuses_a_wrong_count(digits_files: dict[str, Path], tmp_path: Path) -> None:
    good, bad = tmp_path / "labels.txt", tmp_path / "three.txt"
    good.write_text("".join(f"digit {i}\n" for i in range(10)))
    bad.write_text("a\nb\nc\n")
    result = invoke("convert", digits_files["model"], "-o", tmp_path / "d.tflite", "--labels", bad, "--no-validate")
    assert result.exit_code == 2 and "3 labels given" in one_error_line(result) and "10 classes" in result.stderr
    result = invoke("convert", digits_files["model"], "-o", tmp_path / "d.tflite", "--labels", good, "--no-validate", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"]["labels"] == [f"digit {i}" for i in range(10)]


def test_convert_gate_refusal_exits_3_writes_nothing_and_still_reports(digits_files: dict[str, Path], tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=np.load(digits_files["eval"])["x"][:50])
    out = tmp_path / "gated.tflite"
    result = invoke("convert", digits_files["model"], "-o", out, "--quantize", "dynamic", "--eval", unlabelled,
                    "--max-accuracy-drop", "1", "--json")
    assert result.exit_code == 3
    assert "accuracy gate: the data has no labels" in one_error_line(result)
    document = json.loads(result.stdout)
    assert document["written"] is False and document["report"]["quality"]["gates_passed"] is False
    assert document["report"]["quality"]["agreement"] >= 0.97
    assert {p.name for p in tmp_path.iterdir()} == {"unlabelled.npz"}
