"""Conversion benchmark: size, accuracy, agreement and batch-1 latency of every
quantization against fp32 of the same runtime, for the digits CNN and for
MobileNetV2 with random weights (224x224), measured in one run.

    python benchmarks/conversion.py [--write docs/benchmarks.md] [--runs N] [--no-mobilenet] [--json]

Latency is measured interleaved: the models of a runtime take turns call by
call, so a noisy neighbour on a shared machine slows every row alike instead of
one row by chance. The conversion targets are checked and
printed PASS/FAIL beside the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "digits"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
LABEL = {"none": "fp32", "dynamic": "dynamic", "float16": "float16", "int8": "int8"}
TARGETS = {
    "mobilenet_int8_size_ratio_max": 0.30,
    "mobilenet_int8_p50_1t_ratio_max": 0.70,
    "digits_int8_accuracy_drop_pp_max": 1.0,
    "digits_int8_agreement_min": 0.97,
}


def prepare_digits(folder: Path) -> dict[str, Path]:
    from model import save_digits_model  # examples/digits/model.py

    return save_digits_model(folder / "digits", epochs=12)


def prepare_mobilenet(folder: Path, calib_samples: int = 64, eval_samples: int = 16) -> dict[str, Path]:
    """MobileNetV2 (weights=None, 224x224x3) and random images in its [-1, 1] input range."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    target = folder / "mobilenet"
    target.mkdir(parents=True, exist_ok=True)
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    paths = {"model": target / "mobilenet_v2.keras", "calib": target / "calib.npz", "eval": target / "eval.npz"}
    model.save(paths["model"])
    rng = np.random.default_rng(0)
    np.savez(paths["calib"], x=rng.uniform(-1, 1, (calib_samples, 224, 224, 3)).astype(np.float32))
    np.savez(paths["eval"], x=rng.uniform(-1, 1, (eval_samples, 224, 224, 3)).astype(np.float32))
    return paths


def convert_all(name: str, paths: dict[str, Path], out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every (format, quantization) of one model through edgeship's own convert."""
    from edgeship.converters.convert import convert_model

    results: dict[tuple[str, str], dict[str, Any]] = {}
    for fmt in ("tflite", "onnx"):
        for quantize in QUANTIZATIONS:
            start = time.perf_counter()
            result = convert_model(
                paths["model"], out / f"{name}-{LABEL[quantize]}.{fmt}", to=fmt, quantize=quantize,
                calib=paths["calib"], eval_data=paths["eval"], latency_runs=3,
            )
            print(f"  converted {name} {fmt} {LABEL[quantize]} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            results[(fmt, quantize)] = {"path": result.out, "report": result.report}
    return results


def interleaved_p50(paths: Sequence[Path], sample: np.ndarray, threads: int, rounds: int, per_round: int) -> list[float]:
    """p50 (ms) of each model, the models timed in turn round after round."""
    from edgeship.converters.bench import latency_stats
    from edgeship.converters.sources import open_any_model

    runners = [open_any_model(p, threads=threads) for p in paths]
    try:
        for runner in runners:  # warm-up
            for _ in range(3):
                runner.run([sample])
        timings: list[list[float]] = [[] for _ in runners]
        for _ in range(rounds):
            for i, runner in enumerate(runners):
                for _ in range(per_round):
                    start = time.perf_counter()
                    runner.run([sample])
                    timings[i].append(time.perf_counter() - start)
        return [latency_stats(t, threads).p50_ms for t in timings]
    finally:
        for runner in runners:
            runner.close()


def measure(name: str, paths: dict[str, Path], out: Path, rounds: int, per_round: int) -> list[dict[str, Any]]:
    converted = convert_all(name, paths, out)
    sample = np.load(paths["eval"])["x"][:1].astype(np.float32)
    keras_size = Path(paths["model"]).stat().st_size
    rows: list[dict[str, Any]] = []
    for fmt in ("tflite", "onnx"):
        files = [converted[(fmt, q)]["path"] for q in QUANTIZATIONS]
        p50 = {t: interleaved_p50(files, sample, t, rounds, per_round) for t in (1, 2)}
        base_size = converted[(fmt, "none")]["report"]["model"]["size_bytes"]
        for i, quantize in enumerate(QUANTIZATIONS):
            report = converted[(fmt, quantize)]["report"]
            quality = report["quality"]
            rows.append(
                {
                    "model": name,
                    "format": fmt,
                    "runtime": report["runtime"]["validated_with"]["runtime"],
                    "quantize": LABEL[quantize],
                    "size_bytes": report["model"]["size_bytes"],
                    "size_ratio": report["model"]["size_bytes"] / base_size,
                    "keras_size_bytes": keras_size,
                    "reference_accuracy": quality["reference_accuracy"],
                    "accuracy": quality["accuracy"],
                    "accuracy_drop_pp": quality["accuracy_drop_pp"],
                    "agreement": quality["agreement"],
                    "p50_ms_1t": p50[1][i],
                    "p50_ratio_1t": p50[1][i] / p50[1][0],
                    "p50_ms_2t": p50[2][i],
                    "p50_ratio_2t": p50[2][i] / p50[2][0],
                    "fully_integer": report["operators"]["fully_integer"],
                }
            )
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversion targets against the measured rows (pure)."""
    def row(model: str, fmt: str, quantize: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["model"] == model and r["format"] == fmt and r["quantize"] == quantize), None)

    checks = []
    mobile = row("mobilenet_v2", "tflite", "int8")
    if mobile:
        checks.append({"target": "MobileNetV2 int8 TFLite size <= 0.30x fp32", "measured": f"{mobile['size_ratio']:.3f}x",
                       "passed": mobile["size_ratio"] <= TARGETS["mobilenet_int8_size_ratio_max"]})
        checks.append({"target": "MobileNetV2 int8 TFLite p50 <= 0.7x fp32 at 1 thread", "measured": f"{mobile['p50_ratio_1t']:.3f}x",
                       "passed": mobile["p50_ratio_1t"] <= TARGETS["mobilenet_int8_p50_1t_ratio_max"]})
    for fmt in ("tflite", "onnx"):
        digits = row("digits_cnn", fmt, "int8")
        if digits:
            checks.append({"target": f"digits int8 {fmt} accuracy within 1 point of Keras",
                           "measured": f"{digits['reference_accuracy']:.2%} -> {digits['accuracy']:.2%} ({digits['accuracy_drop_pp']:+.2f} pp drop)",
                           "passed": digits["accuracy_drop_pp"] <= TARGETS["digits_int8_accuracy_drop_pp_max"]})
            checks.append({"target": f"digits int8 {fmt} agreement >= 97%", "measured": f"{digits['agreement']:.2%}",
                           "passed": digits["agreement"] >= TARGETS["digits_int8_agreement_min"]})
    return checks


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def render_markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "## Conversion: size, accuracy and latency against fp32 of the same runtime",
        "",
        f"Reproduce: `{meta['command']}` ({meta['date']}, {meta['machine']}, load average {meta['load_before']} "
        f"before and {meta['load_after']} after the run: the cores are shared, so 2 threads are often no faster here; "
        f"TensorFlow {meta['versions'].get('tensorflow', '?')}, LiteRT {meta['versions'].get('ai-edge-litert', '?')}, "
        f"ONNX Runtime {meta['versions'].get('onnxruntime', '?')}). Batch-1 p50 latency, "
        f"models of a runtime timed in turn, {meta['per_round']} call(s) each per round, {meta['rounds']} rounds for digits "
        f"and {max(10, meta['rounds'] // 3)} for MobileNetV2; ratios are to the fp32 row of the same "
        "runtime, measured in the same run. Accuracy and agreement: digits eval split (397 images) against the Keras "
        "model (Keras accuracy in the fp32 rows' reference); MobileNetV2 has random weights, so only size and latency mean "
        "something there (its outputs are near-uniform; agreement would be an artefact).",
        "",
        "| model | runtime | variant | size KiB | size x | accuracy | agreement | p50 1t ms | p50 1t x | p50 2t ms | p50 2t x |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        labelled = r["model"] == "digits_cnn"  # random weights: accuracy and agreement mean nothing
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['quantize']} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.2f} | "
            f"{_pct(r['accuracy']) if labelled else 'n/a'} | {_pct(r['agreement']) if labelled else 'n/a'} | {r['p50_ms_1t']:.3f} | {r['p50_ratio_1t']:.2f} | "
            f"{r['p50_ms_2t']:.3f} | {r['p50_ratio_2t']:.2f} |"
        )
    lines += ["", "Conversion targets:", "", "| target | measured | result |", "| --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['measured']} | {'PASS' if c['passed'] else 'FAIL'} |")
    lines += [
        "",
        "ONNX int8 is reported as measured against ONNX fp32, faster or slower: static QDQ int8 and dynamic "
        "quantization run through ONNX Runtime's CPU kernels, whose speed-up depends on the CPU's int8 instructions; "
        "ONNX float16 keeps float I/O and runs on a CPU that has no float16 kernels for most operators.",
    ]
    return "\n".join(lines)


def _load() -> str:
    """The 1-minute load average ('?' where the OS has none)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the results into this docs/benchmarks.md (section 'conversion')")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds for digits (default 100; MobileNetV2 a third)")
    parser.add_argument("--per-round", type=int, default=1, help="timed calls per model per round (default 1: models alternate call by call)")
    parser.add_argument("--no-mobilenet", action="store_true", help="digits only (quick)")
    parser.add_argument("--json", action="store_true", help="print rows and checks as one JSON document")
    args = parser.parse_args(argv)

    import importlib.metadata

    versions = {}
    for dist in ("tensorflow", "tensorflow-cpu", "ai-edge-litert", "onnxruntime", "tf2onnx"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions.setdefault("tensorflow", versions.get("tensorflow-cpu", "?"))
    started = time.perf_counter()
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as work:
        folder = Path(work)
        rows = measure("digits_cnn", prepare_digits(folder), folder, args.rounds, args.per_round)
        if not args.no_mobilenet:
            rows += measure("mobilenet_v2", prepare_mobilenet(folder), folder, max(10, args.rounds // 3), args.per_round)
    checks = check_targets(rows)
    command = "make bench" if not args.no_mobilenet else "python benchmarks/conversion.py --no-mobilenet"
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": _load(),
    }
    markdown = render_markdown(rows, checks, meta)
    if args.write:
        from results_doc import write_section

        write_section("conversion", markdown, doc=args.write)
    if args.json:
        print(json.dumps({"rows": rows, "checks": checks, "meta": meta}, indent=2, default=str))
    else:
        print(markdown)
        for c in checks:
            print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['target']}: {c['measured']}")
        print(f"({meta['seconds']:.0f} s)")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
