"""The digits example end to end: train a small CNN on scikit-learn's digits,
convert it to every TFLite and ONNX variant, validate each against the Keras
model, benchmark them, and print a summary table.

    python examples/digits/run.py [--out DIR] [--json] [--epochs N] [--runs N]

Each step is a function a later step (bundle, sign, publish, roll out) can call:

    paths = train(out_dir)                       # digits.keras, calib.npz, eval.npz
    results = convert_variants(paths, out_dir)   # {variant: VariantResult}
    bench = benchmark_variants(paths, results)   # {name: latency dict}
    results[PRIMARY_VARIANT].model               # the .tflite a device runs; .golden / .report beside it

Files land in DIR (default ./demo-out): ``digits.keras``, ``calib.npz``,
``eval.npz``, ``labels.txt``, ``digits-<variant>.{tflite,onnx}`` each with ``.golden.npz`` and
``.report.json``, and ``summary.json``.
"""

from __future__ import annotations

__all__ = [
    "GATES",
    "PRIMARY_VARIANT",
    "VARIANTS",
    "Variant",
    "VariantResult",
    "benchmark_variants",
    "convert_variants",
    "main",
    "render_table",
    "run_demo",
    "summary_rows",
    "train",
    "write_labels",
    "LABELS",
]

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import save_digits_model

from edgeship.converters.validate import GateLimits

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Variant:
    name: str
    to: str
    quantize: str
    int8_io: bool = False

    @property
    def file_name(self) -> str:
        return f"digits-{self.name}.{self.to}"


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "tflite", "none"),
    Variant("dynamic", "tflite", "dynamic"),
    Variant("float16", "tflite", "float16"),
    Variant("int8", "tflite", "int8"),
    Variant("int8-io", "tflite", "int8", int8_io=True),
    Variant("onnx-fp32", "onnx", "none"),
    Variant("onnx-int8-dynamic", "onnx", "dynamic"),
    Variant("onnx-float16", "onnx", "float16"),
    Variant("onnx-int8-qdq", "onnx", "int8"),
)
LABELS = tuple(str(digit) for digit in range(10))
PRIMARY_VARIANT = "int8"
"""The variant the fleet demo bundles and rolls out (full-integer TFLite, float I/O)."""
GATES = GateLimits(max_accuracy_drop_pp=1.0, min_agreement_pct=97.0)
"""The conversion target for the digits model, applied to every variant."""


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    model: Path
    golden: Path
    report_path: Path
    report: dict[str, Any]
    seconds: float


def train(out_dir: str | os.PathLike[str], *, epochs: int = 12, seed: int = 0) -> dict[str, Path]:
    """Train the CNN and save ``digits.keras``, ``calib.npz`` and ``eval.npz`` in ``out_dir``.

    Quietly, as the converters run (EDGESHIP_VERBOSE=1 shows everything): importing TensorFlow
    prints absl and oneDNN lines that no environment variable of TensorFlow 2.21 turns off.
    """
    from edgeship.converters.quiet import quiet_output

    with quiet_output():
        return save_digits_model(out_dir, epochs=epochs, seed=seed)


def write_labels(path: Path) -> Path:
    """``labels.txt``: the ten digit classes, one per line (the bundle's labels)."""
    from edgeship.ota.atomicfile import atomic_write_text

    atomic_write_text(path, "".join(f"{digit}\n" for digit in range(10)))
    return path


def convert_variants(
    paths: dict[str, Path],
    out_dir: str | os.PathLike[str],
    *,
    variants: Sequence[Variant] = VARIANTS,
    limits: GateLimits = GATES,
    progress: ProgressCallback | None = None,
) -> dict[str, VariantResult]:
    """Convert the trained model to each variant, validated on eval.npz (gates applied)."""
    from edgeship.converters.convert import convert_model

    out = Path(out_dir)
    results: dict[str, VariantResult] = {}
    for variant in variants:
        start = time.perf_counter()
        result = convert_model(
            paths["model"],
            out / variant.file_name,
            to=variant.to,
            quantize=variant.quantize,
            int8_io=variant.int8_io,
            calib=paths["calib"],
            eval_data=paths["eval"],
            labels=LABELS,
            limits=limits,
            progress=progress,
        )
        results[variant.name] = VariantResult(
            variant, result.out, result.golden_path, result.report_path, result.report, time.perf_counter() - start
        )
    return results


def benchmark_variants(
    paths: dict[str, Path],
    results: dict[str, VariantResult],
    *,
    runs: int = 200,
    threads: int = 1,
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency of the Keras model and of every variant, same inputs, one run."""
    import numpy as np

    from edgeship.converters.bench import measure_latency, rss_mib
    from edgeship.converters.sources import open_any_model

    sample = [np.load(paths["eval"])["x"][:1]]
    measured: dict[str, dict[str, Any]] = {}
    for name, path in [("keras", paths["model"])] + [(n, r.model) for n, r in results.items()]:
        before = rss_mib()
        with open_any_model(path, threads=threads) as runner:
            stats = measure_latency(
                runner, sample, runs=runs, threads=threads, rss_before_mib=before, progress=progress, label=f"bench {name}"
            )
            measured[name] = {**stats.to_dict(), "runtime": runner.runtime}
    return measured


def summary_rows(paths: dict[str, Path], results: dict[str, VariantResult], bench: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: size, accuracy, agreement, error, p50 and ratios to Keras (pure)."""
    keras_size = Path(paths["model"]).stat().st_size
    keras_p50 = bench["keras"]["p50_ms"]
    fp32_p50 = {r.variant.to: bench[n]["p50_ms"] for n, r in results.items() if r.variant.quantize == "none"}
    first = next(iter(results.values())).report["quality"]
    rows = [
        {
            "model": "keras",
            "format": "keras",
            "runtime": bench["keras"]["runtime"],
            "size_bytes": keras_size,
            "accuracy": first["reference_accuracy"],
            "agreement": 1.0,
            "max_abs_error": 0.0,
            "p50_ms": keras_p50,
            "p50_ratio_to_keras": 1.0,
            "p50_ratio_to_fp32": None,  # TensorFlow has no fp32 conversion of its own to compare with
            "gates_passed": True,
        }
    ]
    for name, result in results.items():
        quality = result.report["quality"]
        rows.append(
            {
                "model": name,
                "format": result.variant.to,
                "runtime": bench[name]["runtime"],
                "size_bytes": quality["size_bytes"],
                "accuracy": quality["accuracy"],
                "agreement": quality["agreement"],
                "max_abs_error": quality["max_abs_error"],
                "p50_ms": bench[name]["p50_ms"],
                "p50_ratio_to_keras": bench[name]["p50_ms"] / keras_p50 if keras_p50 else None,
                "p50_ratio_to_fp32": (
                    bench[name]["p50_ms"] / fp32_p50[result.variant.to] if fp32_p50.get(result.variant.to) else None
                ),
                "fully_integer": result.report["operators"]["fully_integer"],
                "golden_atol": result.report["golden"]["atol"],
                "gates_passed": quality["gates_passed"],
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]]) -> Any:
    """The summary as a rich Table."""
    from rich.table import Table

    table = Table(title="digits CNN: every variant against the Keras model (eval.npz; latency batch 1, 1 thread)")
    for column in ("model", "runtime", "KiB", "accuracy", "agreement", "max err", "p50 ms", "vs fp32", "gates"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for row in rows:
        table.add_row(
            row["model"],
            row["runtime"],
            f"{row['size_bytes'] / 1024:.1f}",
            f"{row['accuracy']:.2%}" if row["accuracy"] is not None else "-",
            f"{row['agreement']:.2%}" if row["agreement"] is not None else "-",
            f"{row['max_abs_error']:.2g}",
            f"{row['p50_ms']:.3f}",
            f"{row['p50_ratio_to_fp32']:.2f}x" if row["p50_ratio_to_fp32"] else "-",
            "pass" if row["gates_passed"] else "FAIL",
        )
    return table


def run_demo(out_dir: str | os.PathLike[str], *, epochs: int = 12, runs: int = 200, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train, convert, validate and benchmark; writes ``summary.json``; returns the summary."""
    from edgeship.ota.atomicfile import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    paths = train(out, epochs=epochs)
    paths["labels"] = write_labels(out / "labels.txt")
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    results = convert_variants(paths, out, progress=progress)
    timings["convert_and_validate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    bench = benchmark_variants(paths, results, runs=runs, progress=progress)
    timings["benchmark_s"] = time.perf_counter() - start
    summary = {
        "out": str(out),
        "files": {
            "keras": str(paths["model"]),
            "calib": str(paths["calib"]),
            "eval": str(paths["eval"]),
            "labels": str(paths["labels"]),
            **{name: {"model": str(r.model), "golden": str(r.golden), "report": str(r.report_path)} for name, r in results.items()},
        },
        "primary": PRIMARY_VARIANT,
        "gates": GATES.to_dict(),
        "rows": summary_rows(paths, results, bench),
        "timings": timings,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="folder for every file the demo writes (default ./demo-out)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document on stdout")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model in the benchmark (default 200)")
    args = parser.parse_args(argv)

    from edgeship.ota.errors import EdgeshipError
    from edgeship.toolkit.output import console, emit_json, progress_reporter

    try:
        with progress_reporter(enabled=sys.stderr.isatty()) as progress:
            summary = run_demo(args.out, epochs=args.epochs, runs=args.runs, progress=progress)
    except EdgeshipError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        emit_json(summary)
    else:
        from rich.console import Console

        out = console() if sys.stdout.isatty() else Console(width=120, highlight=False)
        out.print(render_table(summary["rows"]))
        t = summary["timings"]
        out.print(
            f"train {t['train_s']:.1f} s, convert + validate {t['convert_and_validate_s']:.1f} s, "
            f"benchmark {t['benchmark_s']:.1f} s; files in {summary['out']}/ (summary.json, *.report.json, *.golden.npz)"
        )
    failed = [row["model"] for row in summary["rows"] if not row["gates_passed"]]
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
