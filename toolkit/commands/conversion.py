"""``edgeship convert``, ``validate``, ``inspect`` and ``bench``: thin click
commands over ``edgeship.converters``; errors become one line and an exit status
at the CLI edge (``edgeship.toolkit.cli``).
"""

from __future__ import annotations

__all__ = ["bench", "convert", "inspect_model", "validate"]

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.output import console, emit_json, progress_reporter

_QUANTIZE = ("none", "dynamic", "float16", "int8")


def _gate_options(func: Any) -> Any:
    func = click.option(
        "--min-agreement", "min_agreement", type=float, default=None, metavar="PCT",
        help="Refuse when top-1 agreement with the reference is below PCT percent.",
    )(func)
    func = click.option(
        "--max-accuracy-drop", "max_accuracy_drop", type=float, default=None, metavar="PP",
        help="Refuse when accuracy drops by more than PP percentage points (needs labels 'y').",
    )(func)
    return func


def _limits(max_accuracy_drop: float | None, min_agreement: float | None) -> Any:
    from edgeship.converters.validate import GateLimits

    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise BadInputError("--max-accuracy-drop must be 0 or more percentage points")
    if min_agreement is not None and not 0 <= min_agreement <= 100:
        raise BadInputError("--min-agreement is a percentage between 0 and 100")
    return GateLimits(max_accuracy_drop_pp=max_accuracy_drop, min_agreement_pct=min_agreement)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _console(stderr: bool = False) -> Any:
    """A rich console; when the stream is not a terminal, wide enough that tables keep their names."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return console(stderr=stderr)
    from rich.console import Console

    return Console(stderr=stderr, width=160, highlight=False, soft_wrap=False)


def _line(out: Any, text: str) -> None:
    """A plain line (click.echo, never wrapped: paths stay whole) on ``out``'s stream."""
    click.echo(text, err=bool(getattr(out, "stderr", False)))


def _print_validation(out: Any, validation: dict[str, Any]) -> None:
    from rich.table import Table

    metrics = validation["metrics"]
    table = Table(title=f"validation on {validation['data']['source']} ({metrics['samples']} samples)")
    for column in ("model", "runtime", "size KiB", "accuracy", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for role, accuracy in (("reference", metrics["reference_accuracy"]), ("candidate", metrics["candidate_accuracy"])):
        side = validation[role]
        table.add_row(
            f"{role}: {Path(side['path']).name}",
            f"{side['runtime']} {side['runtime_version']}",
            f"{side['size_bytes'] / 1024:.1f}",
            _pct(accuracy),
            _ms(side["latency"]["p50_ms"]),
            _ms(side["latency"]["p95_ms"]),
        )
    out.print(table)
    drop = metrics["accuracy_drop_pp"]
    _line(
        out,
        f"agreement {_pct(metrics['agreement'])}, accuracy drop "
        f"{'-' if drop is None else f'{drop:.2f} points'}, max abs error {metrics['max_abs_error']:.4g}, "
        f"mean abs error {metrics['mean_abs_error']:.4g}"
    )
    gates = validation["gates"]
    if gates["failures"]:
        for failure in gates["failures"]:
            _line(out, f"FAIL {failure}")
    elif any(v is not None for v in gates["limits"].values()):
        _line(out, "gates passed")


@click.command("convert")
@click.argument("model", type=str)
@click.option("-o", "--output", "output", required=True, type=str, help="The converted model file to write (.tflite or .onnx).")
@click.option("--to", "to", type=click.Choice(["tflite", "onnx"]), default=None, help="Target format (default: from OUT's suffix; ONNX in gives ONNX out).")
@click.option("--quantize", type=click.Choice(list(_QUANTIZE)), default="none", show_default=True, help="Quantization.")
@click.option("--int8-io", is_flag=True, help="int8 inputs and outputs (TFLite int8 only: Edge TPU, microcontrollers).")
@click.option("--calib", type=str, default=None, metavar="DATA", help="Calibration data: .npz (x[, y]), .npy, or a folder of images.")
@click.option("--eval", "eval_data", type=str, default=None, metavar="DATA", help="Validation data (default: a fifth held back from --calib).")
@click.option("--preprocess", type=str, default=None, metavar="SPEC", help="Preprocessing: JSON file, JSON object, or size=224x224,scale=1/255,mean=..,std=..,layout=NHWC.")
@click.option("--labels", "labels_file", type=str, default=None, metavar="FILE", help="Class names, one per line, recorded in the report (the bundle's labels).")
@click.option("--no-validate", is_flag=True, help="Skip validation against MODEL (golden vectors are still written).")
@click.option("--allow-select-tf-ops", is_flag=True, help="Let TFLite fall back to TensorFlow kernels (the device then needs full TensorFlow).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel (int8).")
@click.option("--calibration-method", "calibration_method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True, help="ONNX static int8 calibration (TFLite: minmax).")
@click.option("--activations", type=click.Choice(["int8", "uint8", "int16"]), default="int8", show_default=True, help="Activation type: int8 or uint8 (ONNX), int8 or int16 (TFLite 16x8).")
@click.option("--strict", is_flag=True, help="TFLite int8: refuse, naming them, operators that would stay in float.")
@click.option("--calib-samples", "calib_samples", type=int, default=None, metavar="N", help="Use the first N calibration samples (a few hundred suffice for minmax).")
@click.option("--keep-float", "keep_float", type=str, default=None, metavar="auto|LAYER,...", help="Leave these layers in float (int8), or 'auto': the fewest that make the gate pass.")
@click.option("--doctor", is_flag=True, help="int8: measure and name the layers int8 hurts most, even when the gates pass.")
@click.option("--fixed-batch", "fixed_batch", type=int, default=None, metavar="N", help="TFLite: convert with a static batch size N (recurrent models).")
@click.option("--trust-pickle", is_flag=True, help="Load a scikit-learn .joblib/.pkl (a pickle runs code when loaded: only files you trust).")
@click.option("--verbose", is_flag=True, help="Show the converters' and runtimes' own output.")
@_gate_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def convert(
    model: str, output: str, to: str | None, quantize: str, int8_io: bool, calib: str | None, eval_data: str | None,
    preprocess: str | None, labels_file: str | None, no_validate: bool, allow_select_tf_ops: bool, per_tensor: bool,
    calibration_method: str, activations: str, strict: bool, calib_samples: int | None, keep_float: str | None,
    doctor: bool, fixed_batch: int | None, trust_pickle: bool, verbose: bool, max_accuracy_drop: float | None,
    min_agreement: float | None, as_json: bool,
) -> None:
    """Convert and quantize MODEL (.keras, .h5, SavedModel folder, .onnx, scikit-learn .joblib/.pkl)
    to OUT, validate it, and write OUT.golden.npz and OUT.report.json beside it."""
    from edgeship.converters.convert import (
        ConversionGateError,
        QuantizationChoices,
        convert_model,
        read_labels,
    )
    from edgeship.converters.data import parse_preprocessing
    from edgeship.converters.quiet import stage_lines

    limits = _limits(max_accuracy_drop, min_agreement)
    spec = parse_preprocessing(preprocess)
    labels = read_labels(labels_file) if labels_file else None
    keep = tuple(k.strip() for k in keep_float.split(",") if k.strip()) if keep_float else ()
    if "auto" in keep and keep != ("auto",):
        raise BadInputError("--keep-float takes 'auto' or a list of layers, not both")
    choices = QuantizationChoices(
        per_channel=not per_tensor, method=calibration_method, activations=activations, strict=strict,
        samples=calib_samples, keep_float=keep, fixed_batch=fixed_batch, doctor=doctor,
    )
    try:
        with progress_reporter(enabled=sys.stderr.isatty()) as bars:
            lines = stage_lines() if not sys.stderr.isatty() else None

            def progress(description: str, completed: int, total: int) -> None:
                bars(description, completed, total)
                if lines is not None:
                    lines(description, completed, total)

            result = convert_model(
                model, output, to=to, quantize=quantize, int8_io=int8_io, calib=calib, eval_data=eval_data,
                preprocessing=spec, validate=not no_validate, limits=limits, allow_select_tf_ops=allow_select_tf_ops,
                labels=labels, progress=progress, choices=choices, trust_pickle=trust_pickle, verbose=verbose,
            )
    except ConversionGateError as exc:
        if as_json:
            emit_json({"written": False, "error": exc.message, "report": exc.report})
        elif exc.report.get("validation"):
            _print_validation(_console(stderr=True), exc.report["validation"])
            diagnosis = (exc.report.get("conversion") or {}).get("doctor")
            if diagnosis and diagnosis.get("worst_layers"):
                names = ", ".join(row["layer"] for row in diagnosis["worst_layers"][:3])
                _line(_console(stderr=True), f"int8 error is largest at: {names}; try --keep-float auto (or --keep-float {diagnosis['worst_layers'][0]['layer']})")
        raise
    report = result.report
    if as_json:
        emit_json({"written": True, "model": str(result.out), "report_file": str(result.report_path),
                   "golden_file": str(result.golden_path), "report": report})
        return
    out = _console()
    if report.get("validation"):
        _print_validation(out, report["validation"])
    golden = report["golden"]
    _line(
        out,
        f"wrote {result.out} ({report['model']['size_bytes'] / 1024:.1f} KiB, {report['conversion']['to']} "
        f"{report['conversion']['quantize']}{', int8 I/O' if int8_io else ''}; fully integer: "
        f"{report['operators']['fully_integer']})"
    )
    _line(out, f"wrote {result.golden_path} ({golden['samples']} samples, atol {golden['atol']:.3g}) and {result.report_path}")
    conversion = report["conversion"]
    for note in conversion.get("notes") or []:
        _line(out, f"note: {note}")
    diagnosis = conversion.get("doctor")
    if diagnosis and diagnosis.get("worst_layers"):
        worst = ", ".join(f"{row['layer']} ({row.get('introduced', row.get('rmse_over_scale')) or 0:.3g})" for row in diagnosis["worst_layers"][:3])
        _line(out, f"int8 error is largest at: {worst}")
        if diagnosis.get("kept_in_float"):
            _line(out, f"kept in float: {', '.join(diagnosis['kept_in_float'])}")
    peak = conversion.get("peak_rss_mib") or {}
    _line(out, f"took {conversion.get('seconds', 0):.1f} s; peak memory {peak.get('edgeship') or 0:.0f} MiB here, "
               f"{peak.get('converter') or 0:.0f} MiB in the converter")


@click.command("validate")
@click.argument("reference", type=str)
@click.argument("candidate", type=str)
@click.option("--data", "data", required=True, type=str, metavar="DATA", help="Data to compare on: .npz (x[, y]), .npy, or a folder of images.")
@click.option("--preprocess", type=str, default=None, metavar="SPEC", help="Preprocessing spec for DATA (see convert).")
@_gate_options
@click.option("--runs", type=int, default=50, show_default=True, help="Timed batch-1 runs per model.")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for the converted model's runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
def validate(
    reference: str, candidate: str, data: str, preprocess: str | None, max_accuracy_drop: float | None,
    min_agreement: float | None, runs: int, threads: int, as_json: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE on DATA: accuracy, agreement, error, size, latency.
    Exits 3 naming the gate and the numbers when a gate fails."""
    from edgeship.converters.data import load_dataset, parse_preprocessing
    from edgeship.converters.sources import open_any_model
    from edgeship.converters.validate import validate_models

    limits = _limits(max_accuracy_drop, min_agreement)
    if runs < 1 or threads < 1:
        raise BadInputError("--runs and --threads must be at least 1")
    spec = parse_preprocessing(preprocess)
    with open_any_model(reference, threads=threads) as ref, open_any_model(candidate, threads=threads) as cand:
        dataset = load_dataset(data, input_specs=ref.signature.inputs, preprocessing=spec)
        with progress_reporter(enabled=sys.stderr.isatty()) as progress:
            result = validate_models(ref, cand, dataset, limits=limits, latency_runs=runs, threads=threads, progress=progress)
    if as_json:
        emit_json(result.to_dict())
    else:
        _print_validation(_console(), result.to_dict())
    result.raise_if_failed()


@click.command("inspect")
@click.argument("model", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print as one JSON document.")
def inspect_model(model: str, as_json: bool) -> None:
    """Show MODEL's inputs and outputs (with quantization), operators, size, and
    whether it is fully integer (operators left in float are named)."""
    from edgeship.converters.inspection import inspect_model as inspect_file

    info = inspect_file(model)
    if as_json:
        emit_json(info)
        return
    from rich.table import Table

    out = _console()
    _line(out, f"{info['path']}: {info['format']}, {info['size_bytes'] / 1024:.1f} KiB, loaded with "
              f"{info['loaded_with']['name']} {info['loaded_with']['version']}")
    table = Table(title="signature")
    for column in ("", "name", "shape", "dtype", "scale", "zero point"):
        table.add_column(column)
    for role in ("inputs", "outputs"):
        for t in info["signature"][role]:
            table.add_row(role[:-1], t["name"], str(t["shape"]), t["dtype"],
                          f"{t['scale']:.6g}" if t["scale"] else "-", str(t["zero_point"]) if t["scale"] else "-")
    out.print(table)
    _line(out, "operators: " + ", ".join(f"{name} x{count}" for name, count in info["operators"].items()))
    if info["fully_integer"]:
        _line(out, "fully integer: yes")
    else:
        _line(out, "fully integer: no; in float: " + ", ".join(info["float_operators"]))
    requirements = info.get("runtime_requirements")
    if requirements:
        _line(out, f"needs: {requirements['name']} >= {requirements['min_version']}"
                  + (", Select TF ops (full TensorFlow)" if requirements["select_tf_ops"] else ""))


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=str)
@click.option("--threads", type=int, default=1, show_default=True, help="Threads per runtime (XNNPACK / intra-op).")
@click.option("--runs", type=int, default=100, show_default=True, help="Timed batch-1 runs per model.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first.")
@click.option("--data", type=str, default=None, metavar="DATA", help="Take the input from DATA's first sample (default: random).")
@click.option("--json", "as_json", is_flag=True, help="Print as one JSON document.")
def bench(models: Sequence[str], threads: int, runs: int, warmup: int, data: str | None, as_json: bool) -> None:
    """Latency p50/p95/p99, throughput and memory of each MODEL (.tflite on LiteRT, .onnx on
    ONNX Runtime, Keras on TensorFlow), with each model's ratio to the first."""
    from edgeship.converters.bench import fastest, measure_latency, rss_mib, sample_inputs
    from edgeship.converters.data import load_dataset
    from edgeship.converters.sources import detect_source_kind, import_tensorflow, open_any_model

    if runs < 1 or threads < 1 or warmup < 0:
        raise BadInputError("--runs and --threads must be at least 1, --warmup at least 0")
    kinds = [detect_source_kind(m) for m in models]  # refuse a bad file before timing anything
    if any(k in ("keras", "h5", "savedmodel") for k in kinds):
        import_tensorflow()  # its import is not the model's memory
    from edgeship.agent.runtimes import available_runtimes

    available_runtimes(include_tensorflow=False)  # nor is LiteRT's or ONNX Runtime's: import them first
    rows: list[dict[str, Any]] = []
    with progress_reporter(enabled=sys.stderr.isatty()) as progress:
        for path, kind in zip(models, kinds):
            before = rss_mib()
            with open_any_model(path, threads=threads) as runner:
                if data is not None:
                    dataset = load_dataset(data, input_specs=runner.signature.inputs)
                    inputs = [x[:1] for x in dataset.inputs]
                else:
                    inputs = sample_inputs(runner.signature.inputs)
                stats = measure_latency(runner, inputs, runs=runs, warmup=warmup, threads=threads,
                                        rss_before_mib=before, progress=progress, label=f"bench {Path(path).name}")
                rows.append({"model": str(path), "format": kind, "runtime": runner.runtime,
                             "runtime_version": runner.runtime_version, **stats.to_dict()})
    base = rows[0]["p50_ms"]
    for row in rows:
        row["p50_ratio_to_first"] = row["p50_ms"] / base if base else None
    best = fastest({row["model"]: row["p50_ms"] for row in rows})
    if as_json:
        emit_json({"threads": threads, "runs": runs, "models": rows, "fastest": best})
        return
    from rich.table import Table

    out = _console()
    table = Table(title=f"batch-1 latency, {threads} thread(s), {runs} runs")
    for column in ("model", "runtime", "p50 ms", "p95 ms", "p99 ms", "per s", "RSS +MiB", "p50 vs first"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for row in rows:
        table.add_row(Path(row["model"]).name, row["runtime"], _ms(row["p50_ms"]), _ms(row["p95_ms"]), _ms(row["p99_ms"]),
                      f"{row['throughput_per_s']:.0f}",
                      "-" if row["rss_growth_mib"] is None else f"{row['rss_growth_mib']:.1f}",
                      f"{row['p50_ratio_to_first']:.3g}x")
    out.print(table)
    _line(out, f"fastest here: {Path(best).name if best else '-'}")

