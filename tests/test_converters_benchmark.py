"""benchmarks/conversion.py's pure part: the conversion targets checked against
measured rows (PASS/FAIL decides the script's exit status), and the markdown it
writes into docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("edgeship_benchmark_conversion", REPO / "benchmarks" / "conversion.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the script puts benchmarks/ first; keep its module names out of other tests
    return module


bench = _load_benchmark()


def row(model: str, fmt: str, quantize: str, **values: Any) -> dict[str, Any]:
    base = {"model": model, "format": fmt, "quantize": quantize, "runtime": "litert" if fmt == "tflite" else "onnxruntime",
            "size_bytes": 1024, "size_ratio": 1.0, "keras_size_bytes": 4096, "reference_accuracy": 0.98,
            "accuracy": 0.98, "accuracy_drop_pp": 0.0, "agreement": 1.0, "p50_ms_1t": 1.0, "p50_ratio_1t": 1.0,
            "p50_ms_2t": 1.0, "p50_ratio_2t": 1.0, "fully_integer": quantize == "int8"}
    return {**base, **values}


def verdicts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    return {check["target"]: check["passed"] for check in bench.check_targets(rows)}


@pytest.mark.parametrize(
    "size_ratio, p50_ratio, size_ok, latency_ok",
    [(0.28, 0.49, True, True), (0.30, 0.70, True, True), (0.31, 0.49, False, True), (0.28, 0.71, True, False)],
)
def test_mobilenet_targets(size_ratio: float, p50_ratio: float, size_ok: bool, latency_ok: bool) -> None:
    result = verdicts([row("mobilenet_v2", "tflite", "int8", size_ratio=size_ratio, p50_ratio_1t=p50_ratio),
                       row("mobilenet_v2", "onnx", "int8", size_ratio=0.9, p50_ratio_1t=3.0)])  # ONNX: reported, not gated
    assert result == {"MobileNetV2 int8 TFLite size <= 0.30x fp32": size_ok,
                      "MobileNetV2 int8 TFLite p50 <= 0.7x fp32 at 1 thread": latency_ok}


@pytest.mark.parametrize(
    "drop, agreement, accuracy_ok, agreement_ok",
    [(0.0, 1.0, True, True), (1.0, 0.97, True, True), (1.01, 0.99, False, True), (0.5, 0.969, True, False)],
)
def test_digits_targets_for_both_formats(drop: float, agreement: float, accuracy_ok: bool, agreement_ok: bool) -> None:
    rows = [row("digits_cnn", fmt, "int8", accuracy_drop_pp=drop, accuracy=0.98 - drop / 100, agreement=agreement)
            for fmt in ("tflite", "onnx")]
    result = verdicts(rows)
    for fmt in ("tflite", "onnx"):
        assert result[f"digits int8 {fmt} accuracy within 1 point of Keras"] is accuracy_ok
        assert result[f"digits int8 {fmt} agreement >= 97%"] is agreement_ok


def test_no_rows_no_verdicts() -> None:
    assert bench.check_targets([]) == []


def test_markdown_names_the_command_every_row_and_every_verdict() -> None:
    rows = [row("digits_cnn", "tflite", q) for q in bench.QUANTIZATIONS]
    rows += [row("mobilenet_v2", "tflite", "int8", size_ratio=0.4)]
    meta = {"command": "make bench", "date": "2026-11-23", "machine": "x86_64, 2 cores", "versions": {},
            "rounds": 100, "per_round": 1, "load_before": "1.0", "load_after": "2.0"}
    text = bench.render_markdown(rows, bench.check_targets(rows), meta)
    assert "Reproduce: `make bench`" in text
    assert sum(line.startswith("| digits_cnn | litert |") for line in text.splitlines()) == 4
    assert "| MobileNetV2 int8 TFLite size <= 0.30x fp32 | 0.400x | FAIL |" in text
    assert "| mobilenet_v2 | litert | int8 | 1.0 | 0.40 | n/a | n/a |" in text  # random weights: no accuracy


def _zoo_module() -> Any:
    spec = importlib.util.spec_from_file_location("edgeship_benchmark_zoo", REPO / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_zoo_table_names_the_command_failures_and_the_memory_verdict() -> None:
    zoo = _zoo_module()
    rows = [
        {"model": "lstm", "to": "tflite", "quantize": "int8", "ok": True, "size_ratio": 0.3, "agreement": 0.96,
         "accuracy_drop_pp": None, "max_abs_error": 0.005, "rmse": None, "seconds": 5.0, "peak_rss_mib": 900.0,
         "notes": ["recurrent layer(s) lstm: unrolled"], "kept_in_float": None},
        {"model": "DenseNet121", "to": "onnx", "quantize": "int8", "ok": True, "size_ratio": 0.27, "agreement": 0.5,
         "accuracy_drop_pp": None, "max_abs_error": 0.1, "rmse": None, "seconds": 90.0, "peak_rss_mib": 5000.0,
         "notes": [], "kept_in_float": None},
        {"model": "hgb", "to": "onnx", "quantize": "none", "ok": False, "error": "skl2onnx cannot convert", "seconds": 1.0},
    ]
    text = zoo.render(rows, "python benchmarks/zoo.py", "x86_64")
    assert "`python benchmarks/zoo.py`" in text
    assert "| hgb | onnx none | no |" in text and "skl2onnx cannot convert" in text
    assert "5000 (over target)" in text and "2 of 3 conversions succeeded" in text and "FAIL against 4096 MiB" in text
