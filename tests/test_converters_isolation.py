"""Crash-proof, quiet conversion: the converters run in child processes; a crash
is one line naming the stage with nothing left behind, a converter's failure
exits 1, and what TensorFlow, absl, XNNPACK and friends print stays hidden
unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from converters_fixtures import zoo_model

from edgeship.converters.isolated import StageCrashedError, crash_message, run_stage
from edgeship.converters.quiet import stage_lines


@pytest.mark.parametrize(
    "code, expected",
    [
        (-11, "crashed (signal SIGSEGV)"),
        (-6, "crashed (signal SIGABRT)"),
        (139, "crashed (exit 139, signal SIGSEGV)"),
        (1, "crashed (exit 1)"),
    ],
)
def test_crash_message_names_the_stage_and_the_signal(code: int, expected: str) -> None:
    text = crash_message("TFLite converter", code, "lstm.keras")
    assert text.startswith(f"the TFLite converter {expected} on lstm.keras") and "\n" not in text


def test_a_child_that_segfaults_is_one_error_and_its_files_are_the_callers(tmp_path: Path) -> None:
    seen: list[str] = []
    with pytest.raises(StageCrashedError, match=r"the test stage crashed \(signal SIGSEGV\) on m.keras; nothing was written"):
        run_stage("test stage", {"stage": "crash"}, tmp_path / "stage", model_name="m.keras",
                  progress=lambda d, a, b: seen.append(d))
    assert seen == ["crashing"]  # progress crossed the process boundary before the crash


def test_stage_lines_print_one_line_per_finished_stage() -> None:
    import io

    out = io.StringIO()
    report = stage_lines(out)
    for i in range(1, 4):
        report("calibrating", i, 3)
    report("validating", 0, 2)  # never finished: no line
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("edgeship: calibrating done (")


def _edgeship(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "EDGESHIP_VERBOSE"))}
    return subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env, check=False)


@pytest.fixture(scope="module")
def dynamic_lstm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return zoo_model("lstm-dynamic", tmp_path_factory.mktemp("lstm-dynamic"))


def test_the_tflite_converter_segfaulting_is_exit_1_one_line_nothing_left(dynamic_lstm: dict[str, Path], tmp_path: Path) -> None:
    """An LSTM over sequences of any length converts with a fixed batch of 1 to a
    WHILE loop; int8 calibration of that loop segfaults TensorFlow's converter."""
    out = tmp_path / "lstm.tflite"
    proc = _edgeship("convert", str(dynamic_lstm["model"]), "-o", str(out), "--quantize", "int8",
                     "--calib", str(dynamic_lstm["calib"]), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [("error: the TFLite converter crashed (signal SIGSEGV) on lstm-dynamic.keras; nothing was written "
                       "(rerun with --verbose to see the converter's own output)")], proc.stderr
    assert "Traceback" not in proc.stderr and "/tmp/" not in errors[0].replace(str(tmp_path), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no model, no work folders


def test_a_conversion_is_quiet_unless_verbose(dynamic_lstm: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lstm.onnx"
    proc = _edgeship("convert", str(dynamic_lstm["model"]), "-o", str(out), "--calib", str(dynamic_lstm["calib"]),
                     "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    chatter = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("edgeship: ")]
    assert chatter == [], proc.stderr  # no absl, oneDNN, XNNPACK, tf2onnx or onnxruntime lines
    assert "edgeship: loading model done" in proc.stderr
    import json

    assert json.loads(proc.stdout)["written"] is True
    verbose = _edgeship("convert", str(dynamic_lstm["model"]), "-o", str(tmp_path / "v.onnx"), "--calib",
                        str(dynamic_lstm["calib"]), "--verbose", cwd=tmp_path)
    assert verbose.returncode == 0 and len(verbose.stderr.splitlines()) > len(proc.stderr.splitlines())


def test_a_dynamic_length_lstm_converts_with_a_fixed_batch_said_in_the_report(dynamic_lstm: dict[str, Path], tmp_path: Path) -> None:
    from edgeship.converters.convert import convert_model

    result = convert_model(dynamic_lstm["model"], tmp_path / "lstm.tflite", calib=dynamic_lstm["calib"], latency_runs=2)
    assert "fixed batch of 1" in " ".join(result.report["conversion"]["notes"])
    assert result.report["signature"]["inputs"][0]["shape"][0] == 1
    assert result.report["quality"]["max_abs_error"] < 1e-4 and not result.report["runtime"]["select_tf_ops"]
    assert np.isfinite(result.report["quality"]["max_abs_error"])
