"""The conversion report written beside every converted model (OUT + ``.report.json``).

It is the hand-over to the bundle manifest: format, signature with
quantization parameters, preprocessing, quality, operators, runtime
requirements and the golden tolerance. The schema is documented in
docs/converters.md; ``REPORT_SCHEMA`` changes when a field changes meaning.
"""

from __future__ import annotations

__all__ = ["REPORT_SCHEMA", "build_report", "golden_path", "quality_summary", "report_path"]

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from edgeship.ota.hashing import sha256_file

REPORT_SCHEMA = "edgeship.conversion-report/1"


def report_path(out: str | os.PathLike[str]) -> Path:
    return Path(str(out) + ".report.json")


def golden_path(out: str | os.PathLike[str]) -> Path:
    return Path(str(out) + ".golden.npz")


def quality_summary(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The flat quality block a manifest and a dashboard want, from a ValidationResult dict."""
    if validation is None:
        return None
    metrics = validation["metrics"]
    return {
        "data": validation["data"]["source"],
        "samples": metrics["samples"],
        "reference_accuracy": metrics["reference_accuracy"],
        "accuracy": metrics["candidate_accuracy"],
        "accuracy_drop_pp": metrics["accuracy_drop_pp"],
        "agreement": metrics["agreement"],
        "max_abs_error": metrics["max_abs_error"],
        "rmse": metrics.get("candidate_rmse"),
        "reference_rmse": metrics.get("reference_rmse"),
        "mae": metrics.get("candidate_mae"),
        "mean_abs_error": metrics["mean_abs_error"],
        "size_bytes": validation["candidate"]["size_bytes"],
        "reference_size_bytes": validation["reference"]["size_bytes"],
        "size_ratio": validation["candidate"]["size_bytes"] / max(1, validation["reference"]["size_bytes"]),
        "latency_p50_ms": validation["candidate"]["latency"]["p50_ms"],
        "latency_p95_ms": validation["candidate"]["latency"]["p95_ms"],
        "reference_latency_p50_ms": validation["reference"]["latency"]["p50_ms"],
        "gates_passed": validation["gates"]["passed"],
    }


def build_report(
    *,
    out: Path,
    source: Path,
    source_kind: str,
    fmt: str,
    quantize: str,
    int8_io: bool,
    signature: dict[str, Any],
    preprocessing: dict[str, Any] | None,
    labels: list[str] | None,
    calibration: dict[str, Any] | None,
    validation: dict[str, Any] | None,
    inspection: dict[str, Any],
    runtime: dict[str, Any],
    golden: dict[str, Any],
    converter: dict[str, str],
) -> dict[str, Any]:
    """The report as a JSON-ready dict (pure apart from hashing ``out``)."""
    return {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model": {
            "file": out.name,
            "format": fmt,
            "size_bytes": out.stat().st_size,
            "sha256": sha256_file(out),
        },
        "source": {"path": str(source), "kind": source_kind},
        "conversion": {
            "to": fmt,
            "quantize": quantize,
            "int8_io": int8_io,
            "calibration": calibration,
            "converter": converter,
        },
        "signature": signature,
        "preprocessing": preprocessing,
        "labels": labels,
        "quality": quality_summary(validation),
        "validation": validation,
        "operators": {
            "counts": inspection["operators"],
            "total": inspection["operator_total"],
            "fully_integer": inspection["fully_integer"],
            "float_operators": inspection["float_operators"],
        },
        "runtime": runtime,
        "golden": golden,
    }
