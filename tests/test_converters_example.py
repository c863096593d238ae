"""examples/digits/run.py, what `make demo` runs: every variant converted,
validated and benchmarked, files where the later fleet steps pick them up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits" / "run.py"), "--out", str(out), "--json", "--epochs", "8", "--runs", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"keras", "fp32", "dynamic", "float16", "int8", "int8-io", "onnx-fp32", "onnx-int8-dynamic", "onnx-float16",
                         "onnx-int8-qdq"}
    for name, row in rows.items():
        assert row["gates_passed"], name
        assert row["p50_ms"] > 0
    primary = summary["files"][summary["primary"]]
    for key in ("model", "golden", "report"):
        assert Path(primary[key]).is_file()
    report = json.loads(Path(primary["report"]).read_text())
    assert report["quality"]["agreement"] >= 0.97
    assert report["labels"] == [str(i) for i in range(10)]
    assert Path(summary["files"]["labels"]).read_text().split() == report["labels"]
    assert (out / "summary.json").is_file()


def test_demo_steps_are_importable() -> None:
    sys.path.insert(0, str(REPO / "examples" / "digits"))
    import run  # examples/digits/run.py

    names = [v.name for v in run.VARIANTS]
    assert run.PRIMARY_VARIANT in names
    assert {(v.to, v.quantize, v.int8_io) for v in run.VARIANTS} >= {
        ("tflite", "none", False), ("tflite", "dynamic", False), ("tflite", "float16", False),
        ("tflite", "int8", False), ("tflite", "int8", True),
        ("onnx", "none", False), ("onnx", "dynamic", False), ("onnx", "float16", False), ("onnx", "int8", False),
    }  # every quantization `edgeship convert` offers, in both formats
    for step in (run.train, run.convert_variants, run.benchmark_variants, run.run_demo, run.main):
        assert callable(step)


def test_summary_ratios_are_measured_never_filled_in(tmp_path: Path) -> None:
    """The Keras row has no fp32 of its own runtime: its "vs fp32" is absent, not 1.00x."""
    sys.path.insert(0, str(REPO / "examples" / "digits"))
    import run  # examples/digits/run.py

    keras = tmp_path / "digits.keras"
    keras.write_bytes(b"x" * 4000)
    quality = {"reference_accuracy": 0.98, "accuracy": 0.97, "agreement": 0.99, "max_abs_error": 0.03,
               "size_bytes": 1000, "gates_passed": True}
    report = {"quality": quality, "operators": {"fully_integer": True}, "golden": {"atol": 0.01}}
    results = {
        v.name: run.VariantResult(v, tmp_path / v.file_name, tmp_path / "g", tmp_path / "r", report, 1.0)
        for v in run.VARIANTS if v.name in ("fp32", "int8", "onnx-fp32", "onnx-int8-qdq")
    }
    bench = {"keras": {"p50_ms": 5.0, "runtime": "tensorflow"}, "fp32": {"p50_ms": 0.02, "runtime": "litert"},
             "int8": {"p50_ms": 0.01, "runtime": "litert"}, "onnx-fp32": {"p50_ms": 0.03, "runtime": "onnxruntime"},
             "onnx-int8-qdq": {"p50_ms": 0.06, "runtime": "onnxruntime"}}
    rows = {row["model"]: row for row in run.summary_rows({"model": keras}, results, bench)}
    assert rows["keras"]["p50_ratio_to_fp32"] is None and rows["keras"]["p50_ratio_to_keras"] == 1.0
    assert rows["int8"]["p50_ratio_to_fp32"] == pytest.approx(0.5)
    assert rows["onnx-int8-qdq"]["p50_ratio_to_fp32"] == pytest.approx(2.0)  # slower is shown as slower
    assert rows["int8"]["p50_ratio_to_keras"] == pytest.approx(0.002)
    table = run.render_table(list(rows.values()))
    assert table.columns[7].header == "vs fp32" and list(table.columns[7].cells)[0] == "-"
