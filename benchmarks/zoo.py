"""Conversion zoo benchmark: every model of the zoo through every variant its
operators allow, in one run: success (or the one-line error), size against the
original, agreement and max abs error against the original on the same inputs,
conversion time and peak resident memory (this process and the converter's
child process, from the conversion report).

    python benchmarks/zoo.py [--write docs/benchmarks.md] [--json] [--small] [--only NAME,...]

The large models are Keras applications with random weights (``weights=None``,
224x224x3) and random calibration images; ``--small`` runs only the small zoo
(the tests' models). Peak memory is checked against the 4 GB target per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np

PEAK_RSS_TARGET_MIB = 4096
KERAS_VARIANTS = (("tflite", "none"), ("tflite", "dynamic"), ("tflite", "int8"), ("onnx", "none"), ("onnx", "dynamic"), ("onnx", "int8"))
LARGE_VARIANTS = (("tflite", "int8"), ("onnx", "none"), ("onnx", "int8"))


def _application(name: str, folder: Path, samples: int = 32) -> dict[str, Path]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    build = getattr(tf.keras.applications, name)
    model = build(weights=None, input_shape=(224, 224, 3))
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(target / "calib.npz", x=rng.uniform(0, 255, (samples, 224, 224, 3)).astype(np.float32))
    model.save(target / f"{name}.keras")
    return {"model": target / f"{name}.keras", "calib": target / "calib.npz"}


def zoo(folder: Path, small_only: bool) -> list[tuple[str, Callable[[], dict[str, Path]], Sequence[tuple[str, str]], dict[str, Any]]]:
    """(name, builder, variants, convert options) for every model of the zoo."""
    from converters_fixtures import (
        int8_sensitive_model,
        old_toolchain_cnn,
        sklearn_models,
        zoo_model,
    )

    def old_onnx() -> dict[str, Path]:
        from sklearn.datasets import load_digits

        target = folder / "old-onnx"
        target.mkdir(parents=True, exist_ok=True)
        digits = load_digits()
        np.savez(target / "calib.npz", x=(digits.images / 16.0).astype(np.float32)[:300, None], y=digits.target[:300])
        return {"model": old_toolchain_cnn(target / "old.onnx"), "calib": target / "calib.npz"}

    def sklearn(name: str, data: str) -> Callable[[], dict[str, Path]]:
        def build() -> dict[str, Path]:
            paths = sklearn_models(folder / "sklearn")
            return {"model": paths[name], "eval": paths[data]}
        return build

    entries: list[tuple[str, Callable[[], dict[str, Path]], Sequence[tuple[str, str]], dict[str, Any]]] = [
        (kind, (lambda k=kind: zoo_model(k, folder / "small")), KERAS_VARIANTS, {})
        for kind in ("normalization", "encoder", "lstm", "gru")
    ]
    entries += [
        ("lstm-dynamic", lambda: zoo_model("lstm-dynamic", folder / "small"), (("tflite", "none"), ("tflite", "int8"), ("onnx", "none")), {}),
        ("old-toolchain-cnn (opset 9)", old_onnx, (("onnx", "none"), ("onnx", "dynamic"), ("onnx", "float16"), ("onnx", "int8")), {}),
        ("sklearn logistic pipeline", sklearn("logistic-pipeline", "digits-eval"), (("onnx", "none"),), {"trust_pickle": True}),
        ("sklearn random forest", sklearn("random-forest", "digits-eval"), (("onnx", "none"),), {"trust_pickle": True}),
        ("sklearn ridge pipeline", sklearn("ridge-pipeline", "diabetes-eval"), (("onnx", "none"),), {"trust_pickle": True}),
        ("sklearn hist gradient boosting", sklearn("hist-boosting", "digits-eval"), (("onnx", "none"),), {"trust_pickle": True}),
        ("sklearn hist gradient boosting regressor", sklearn("hist-boosting-regressor", "diabetes-eval"), (("onnx", "none"),),
         {"trust_pickle": True}),
        ("int8-sensitive MLP (doctor)", lambda: int8_sensitive_model(folder / "sensitive"), (("onnx", "int8"), ("tflite", "int8")),
         {"doctor_gate": 1.0}),
    ]
    if not small_only:
        for name in ("MobileNetV3Small", "EfficientNetB0", "ConvNeXtTiny", "DenseNet121"):
            entries.append((name, (lambda n=name: _application(n, folder / "apps")), LARGE_VARIANTS, {}))
    return entries


def run_row(name: str, files: dict[str, Path], to: str, quantize: str, options: dict[str, Any], folder: Path) -> dict[str, Any]:
    from edgeship.converters.convert import QuantizationChoices, convert_model
    from edgeship.converters.validate import GateLimits
    from edgeship.ota.errors import EdgeshipError

    kwargs: dict[str, Any] = {"trust_pickle": bool(options.get("trust_pickle"))}
    gate = options.get("doctor_gate")
    if gate is not None:
        kwargs["limits"] = GateLimits(max_accuracy_drop_pp=gate)
        kwargs["choices"] = QuantizationChoices(keep_float=("auto",))
    row: dict[str, Any] = {"model": name, "to": to, "quantize": quantize}
    out = folder / "out" / f"{name.split()[0]}-{quantize}.{to}"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = convert_model(
            files["model"], out, to=to, quantize=quantize, calib=files.get("calib"), eval_data=files.get("eval"),
            latency_runs=5, **kwargs,
        )
    except EdgeshipError as exc:
        row.update({"ok": False, "error": exc.message, "seconds": time.perf_counter() - start})
        return row
    report = result.report
    quality = report["quality"] or {}
    conversion = report["conversion"]
    peak = conversion.get("peak_rss_mib") or {}
    row.update({
        "ok": True,
        "size_ratio": quality.get("size_ratio"),
        "agreement": quality.get("agreement"),
        "accuracy_drop_pp": quality.get("accuracy_drop_pp"),
        "max_abs_error": quality.get("max_abs_error"),
        "rmse": quality.get("rmse"),
        "seconds": conversion.get("seconds"),
        "peak_rss_mib": max(peak.get("edgeship") or 0.0, peak.get("converter") or 0.0),
        "notes": conversion.get("notes") or [],
        "kept_in_float": (conversion.get("doctor") or {}).get("kept_in_float"),
    })
    for path in (result.out, result.golden_path, result.report_path):
        path.unlink(missing_ok=True)
    return row


def _measure_in_child(name: str, files: dict[str, Path], to: str, quantize: str, options: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One row in a fresh process: its peak resident set is that row's alone."""
    import subprocess

    request = folder / "row.json"
    request.write_text(json.dumps({"name": name, "files": {k: str(v) for k, v in files.items()}, "to": to,
                                   "quantize": quantize, "options": options, "folder": str(folder)}))
    proc = subprocess.run([sys.executable, __file__, "--row", str(request)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"model": name, "to": to, "quantize": quantize, "ok": False,
                "error": f"benchmark row exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def render(rows: list[dict[str, Any]], command: str, host: str) -> str:
    """The markdown table (pure)."""
    lines = [
        "## Conversion zoo: every model through every variant (`benchmarks/zoo.py`)",
        "",
        f"Measured in one run with `{command}` on {host}. Each row converts in a fresh process, so its peak",
        "memory is its own: the larger of this process's and the converter child's peak resident set, from the",
        "conversion report. Size ratio: converted / original file. Agreement: top-1 against the original on the",
        "same inputs (random inputs for the Keras applications; held-back calibration data otherwise); for",
        "regressors the RMSE against the labels. With random weights a 1000-class softmax is nearly uniform, so",
        "the Keras applications' top-1 agreement is noise (EfficientNetB0 int8 shows 0%); their max abs error on the",
        f"probabilities (about 0.001) is the number to read. Target: peak memory under {PEAK_RSS_TARGET_MIB} MiB for every row.",
        "",
        "| model | variant | ok | size ratio | agreement | max abs error | time s | peak MiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        variant = f"{row['to']} {row['quantize']}"
        if not row.get("ok"):
            lines.append(f"| {row['model']} | {variant} | no | | | | {row.get('seconds', 0):.1f} | | {row['error'][:160]} |")
            continue
        agreement = "-" if row["agreement"] is None else f"{row['agreement']:.2%}"
        if row.get("rmse") is not None:
            agreement = f"RMSE {row['rmse']:.2f}"
        peak = row["peak_rss_mib"]
        flag = "" if peak < PEAK_RSS_TARGET_MIB else " (over target)"
        note = "; ".join(row["notes"])[:160]
        if row.get("kept_in_float"):
            note = f"doctor kept {len(row['kept_in_float'])} layer(s) in float; drop {row['accuracy_drop_pp']:.2f} pp. " + note
        lines.append(
            f"| {row['model']} | {variant} | yes | {row['size_ratio']:.3f} | {agreement} | {row['max_abs_error']:.3g} "
            f"| {row['seconds']:.1f} | {peak:.0f}{flag} | {note} |"
        )
    ok = sum(1 for r in rows if r.get("ok"))
    worst = max((r["peak_rss_mib"] for r in rows if r.get("ok")), default=0.0)
    verdict = "PASS" if worst < PEAK_RSS_TARGET_MIB else "FAIL"
    lines += ["", f"{ok} of {len(rows)} conversions succeeded; the highest peak memory was {worst:.0f} MiB "
                  f"({verdict} against {PEAK_RSS_TARGET_MIB} MiB)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, default=None, help="write the table into this markdown file's zoo section")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--small", action="store_true", help="only the small zoo (no Keras applications)")
    parser.add_argument("--only", type=str, default=None, help="comma-separated model names")
    parser.add_argument("--row", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:  # one row, in this (fresh) process
        request = json.loads(args.row.read_text())
        row = run_row(request["name"], {k: Path(v) for k, v in request["files"].items()}, request["to"],
                      request["quantize"], request["options"], Path(request["folder"]))
        print(json.dumps(row))
        return 0
    only = {n.strip() for n in args.only.split(",")} if args.only else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeship-zoo-") as work:
        folder = Path(work)
        for name, build, variants, options in zoo(folder, args.small):
            if only and name not in only:
                continue
            files = build()
            for to, quantize in variants:
                row = _measure_in_child(name, files, to, quantize, options, folder)
                rows.append(row)
                state = "ok" if row.get("ok") else "FAILED " + row.get("error", "")[:120]
                print(f"{name} {to} {quantize}: {state} ({row.get('seconds') or 0:.1f} s, "
                      f"{row.get('peak_rss_mib') or 0:.0f} MiB)", file=sys.stderr, flush=True)
    command = (
        "python benchmarks/zoo.py" + (" --small" if args.small else "") + (f" --only {args.only}" if args.only else "")
        + (f" --write {args.write}" if args.write else "")
    )
    host = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    markdown = render(rows, command, host)
    if args.write:
        from results_doc import write_section

        write_section("zoo", markdown, args.write)
    print(json.dumps(rows, indent=2) if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
