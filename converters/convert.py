"""``convert``: a source model in; the converted model, its golden vectors and its
report out, all or nothing.

The work happens in a private folder beside OUT; only when conversion,
validation, golden vectors and report all succeeded (and the gates passed) are
the three files moved into place, each through ``atomic_output_path``. A
failure at any step leaves nothing behind, not even a temporary file.

Why one module of this size: it is one concept, the conversion pipeline (plan, isolated
stages, validation, the doctor's retries, atomic placement), whose steps share the plan and the
private work folder. Each step's substance lives in its own module (``to_tflite``, ``to_onnx``,
``onnx_quantize``, ``validate``, ``doctor``, ``golden_vectors``, ``report``); what remains here
is the order they run in and what each hands the next.
"""

from __future__ import annotations

__all__ = [
    "FORMATS",
    "ConversionGateError",
    "ConversionResult",
    "QuantizationChoices",
    "check_output_path",
    "convert_model",
    "read_labels",
]

import importlib.metadata
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelLoadError, ModelRunner
from edgeship.ota.atomicfile import atomic_output_path, atomic_write_json
from edgeship.ota.bundle_build import read_labels
from edgeship.ota.errors import BadInputError, EdgeshipError, GateFailedError, require_module

from .bench import measure_latency
from .data import Dataset, PreprocessingSpec, input_name, load_dataset, split_holdback
from .doctor import DOCTOR_SAMPLES, doctor_summary, fewest_kept, rank_onnx_layers
from .golden_vectors import golden_sample_count, make_golden_vectors
from .inspection import inspect_model, runtime_requirements
from .isolated import run_stage, save_dataset
from .onnx_quantize import (
    ACTIVATION_TYPES,
    CALIBRATION_METHODS,
    OnnxQuantOptions,
    onnx_output_quanta,
)
from .progress import ProgressCallback, no_progress
from .quiet import quiet_output
from .report import REPORT_SCHEMA, build_report, golden_path, quality_summary, report_path
from .sources import (
    FEEDABLE_DTYPES,
    KerasRunner,
    check_runner_inputs,
    detect_source_kind,
    load_keras_or_savedmodel,
    open_any_model,
)
from .tflite_flatbuffer import read_tflite_graph
from .to_onnx import DEFAULT_OPSET
from .to_tflite import QUANTIZATIONS, TFLITE_ACTIVATIONS, TFLiteOptions
from .validate import GateLimits, fixed_batch, inputs_for, run_dataset, validate_models

FORMATS = ("tflite", "onnx")


class ConversionGateError(GateFailedError):
    """A gate refused the converted model; nothing was written. Carries the report."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ConversionResult:
    out: Path
    report_path: Path
    golden_path: Path
    report: dict[str, Any]


def check_output_path(out: Path) -> None:
    """Refuse an OUT (or the golden vectors and report beside it) that cannot be
    written, before any work is done."""
    if out.is_dir():
        raise BadInputError(f"output {out} is a folder; give a file name such as {out / 'model.tflite'}")
    parent = out.parent
    if not parent.is_dir():
        what = f"{parent} is a file, not a folder" if parent.exists() else f"folder {parent} does not exist"
        raise BadInputError(f"output {out} cannot be written: {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"output {out} cannot be written: no permission to write in {parent}")
    for path in (out, golden_path(out), report_path(out)):
        if path.is_dir():
            raise BadInputError(f"output {path} is a folder in the way of the file convert writes there; move it")
        if path.exists() and not os.access(path, os.W_OK):
            raise BadInputError(f"output {path} cannot be written: the existing file is read-only")
    # os.access answers yes to root even on a read-only file system or in /proc: try it.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
    except OSError as exc:
        raise BadInputError(f"output {out} cannot be written in {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _refuse_overwriting_inputs(out: Path, inputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """OUT, OUT.golden.npz and OUT.report.json must not be one of the inputs
    (ONNX in, ONNX out makes ``-o MODEL`` easy to type, and it would replace the original)."""
    for written in (out, golden_path(out), report_path(out)):
        for role, given in inputs.items():
            if given is None or not written.exists():
                continue
            try:
                same = os.path.samefile(written, given)
            except OSError:
                continue
            if same:
                raise BadInputError(f"output {written} would overwrite {role} {given}; write the conversion elsewhere")


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _random_data(runner: ModelRunner, samples: int = 64) -> Dataset:
    """Stand-in data when none is given: uniform [0, 1) floats; integer inputs get
    ids 0 and 1 (valid for any embedding or category table), booleans coin flips."""
    rng = np.random.default_rng(0)
    inputs = []
    for spec in runner.signature.inputs:
        dims = list(spec.shape[1:])
        if any(d < 0 for d in dims):
            raise BadInputError(
                f"input '{input_name(spec)}' has dynamic dimensions {list(spec.shape)}; give --calib or --eval DATA to validate on"
            )
        kind = np.dtype(spec.dtype).kind if spec.dtype in FEEDABLE_DTYPES else "f"
        if kind == "f" or spec.quantized:
            inputs.append(rng.random((samples, *dims), dtype=np.float32))
        elif kind == "b":
            inputs.append(rng.integers(0, 2, (samples, *dims)).astype(bool))
        else:
            inputs.append(rng.integers(0, 2, (samples, *dims)).astype(spec.dtype))
    names = tuple(input_name(s) for s in runner.signature.inputs)
    return Dataset(tuple(inputs), None, "random inputs (no --calib or --eval given: floats uniform in [0, 1), integer ids 0/1)", names=names)


def _check_labels(labels: list[str], reference: ModelRunner, from_data: list[str] | None) -> list[str]:
    classes = next((s.shape[-1] for s in reference.signature.outputs if len(s.shape) == 2 and s.shape[-1] > 1), None)
    if classes is not None and len(labels) != classes:
        raise BadInputError(f"{len(labels)} labels given, but the model's classification output has {classes} classes")
    if from_data and from_data != labels:
        raise BadInputError(f"the labels given differ from the image folder's class folders {from_data}")
    return labels


def _open_candidate(work: Path, fmt: str, target: Path) -> ModelRunner:
    """The converted model through the device runtimes; a model no runtime here
    can run (Select TF ops without a Flex delegate) cannot be proven, so it is
    not written."""
    try:
        return open_any_model(work, threads=1)
    except ModelLoadError:
        flex = read_tflite_graph(work).select_tf_ops if fmt == "tflite" else ()
        if not flex:
            raise
        raise EdgeshipError(
            f"the converted model needs Select TF ops ({', '.join(flex)}), and no TFLite runtime here can run them "
            "(LiteRT and tflite-runtime have no Flex delegate, and this TensorFlow's interpreter does not load it), "
            f"so it cannot be validated or self-tested; nothing was written to {target}"
        ) from None


@dataclass(frozen=True)
class QuantizationChoices:
    """The calibration choices a user makes (defaults: what works for most CNNs).

    Attributes:
        per_channel: per-channel weight scales (False: per-tensor).
        method: ONNX calibration method: minmax, entropy or percentile (TFLite
            calibrates min-max only).
        activations: int8 or uint8 (ONNX), int8 or int16 (TFLite 16x8).
        strict: TFLite int8 refuses, naming them, operators left in float.
        samples: calibration samples used (None: all given); a few hundred
            representative samples are enough for min-max, entropy and
            percentile want more.
        keep_float: layers (TFLite tensor names / ONNX node names, or TFLite
            operator types) left in float, or ("auto",): the doctor picks them.
        fixed_batch: TFLite: rebuild the model with this static batch size.
    """

    per_channel: bool = True
    method: str = "minmax"
    activations: str = "int8"
    strict: bool = False
    samples: int | None = None
    keep_float: tuple[str, ...] = ()
    fixed_batch: int | None = None
    doctor: bool = False
    """Measure per-layer int8 error even when the gates pass (a failed gate always does)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        return data


def convert_model(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str | None = None,
    quantize: str = "none",
    int8_io: bool = False,
    calib: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    preprocessing: PreprocessingSpec | None = None,
    validate: bool = True,
    limits: GateLimits = GateLimits(),
    allow_select_tf_ops: bool = False,
    labels: Sequence[str] | None = None,
    latency_runs: int = 30,
    progress: ProgressCallback | None = None,
    choices: QuantizationChoices = QuantizationChoices(),
    trust_pickle: bool = False,
    verbose: bool = False,
) -> ConversionResult:
    """Convert MODEL to OUT and write OUT.golden.npz and OUT.report.json beside it.

    The converters run in child processes; what they and the runtimes print is
    hidden unless ``verbose``.

    Raises:
        BadInputError: unreadable/unknown model, bad data, bad options, unwritable OUT,
            operators TFLite builtins cannot express, an untrusted pickle.
        ConversionGateError: a gate refused the converted model (nothing written).
        MissingExtraError: TensorFlow / tf2onnx / onnxruntime / skl2onnx not installed.
        EdgeshipError: a converter failed or crashed (exit 1).
    """
    with quiet_output(enabled=not verbose):
        return _convert(
            Path(model), Path(out), to=to, quantize=quantize, int8_io=int8_io, calib=calib, eval_data=eval_data,
            preprocessing=preprocessing, validate=validate, limits=limits, allow_select_tf_ops=allow_select_tf_ops,
            labels=labels, latency_runs=latency_runs, report_progress=progress or no_progress, choices=choices,
            trust_pickle=trust_pickle,
        )


def _check_options(kind: str, fmt: str, quantize: str, int8_io: bool, calib: Any, choices: QuantizationChoices) -> None:
    """Option combinations that cannot work, refused before any work (pure)."""
    if quantize not in QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(QUANTIZATIONS)}")
    if int8_io and (fmt != "tflite" or quantize != "int8"):
        raise BadInputError("--int8-io needs --to tflite --quantize int8 (ONNX int8 models keep float inputs and outputs)")
    if quantize == "int8" and calib is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    if kind == "sklearn" and (fmt != "onnx" or quantize not in ("none",)):
        raise BadInputError(
            "a scikit-learn model converts to fp32 ONNX only (--to onnx, no --quantize): "
            "its tree, linear and scaler operators have no int8 or float16 form in ONNX Runtime"
        )
    if choices.keep_float and quantize not in ("int8", "dynamic"):
        raise BadInputError("--keep-float chooses layers to leave out of int8: it needs --quantize int8 (or dynamic for ONNX)")
    if choices.keep_float and (int8_io or choices.strict):
        raise BadInputError("--keep-float leaves layers in float: it cannot be combined with --int8-io or --strict")
    if choices.keep_float == ("auto",) and quantize != "int8":
        raise BadInputError("--keep-float auto needs --quantize int8 and labelled data with an accuracy gate")
    if fmt == "tflite":
        if choices.activations not in TFLITE_ACTIVATIONS:
            raise BadInputError(f"TFLite activations are one of {list(TFLITE_ACTIVATIONS)}, not {choices.activations!r}")
        if choices.method != "minmax":
            raise BadInputError("the TFLite converter calibrates min-max only; --calibration-method applies to ONNX")
    else:
        if choices.activations not in ACTIVATION_TYPES:
            raise BadInputError(f"ONNX activations are one of {list(ACTIVATION_TYPES)}, not {choices.activations!r}")
        if choices.method not in CALIBRATION_METHODS:
            raise BadInputError(f"unknown calibration method {choices.method!r}; choose from {list(CALIBRATION_METHODS)}")
        if choices.strict or choices.fixed_batch is not None:
            raise BadInputError("--strict and --fixed-batch apply to TFLite conversion")
    if choices.samples is not None and choices.samples < 1:
        raise BadInputError("--calib-samples must be at least 1")
    if choices.fixed_batch is not None and choices.fixed_batch < 1:
        raise BadInputError("--fixed-batch must be at least 1")


def _convert(
    source: Path,
    target: Path,
    *,
    to: str | None,
    quantize: str,
    int8_io: bool,
    calib: str | os.PathLike[str] | None,
    eval_data: str | os.PathLike[str] | None,
    preprocessing: PreprocessingSpec | None,
    validate: bool,
    limits: GateLimits,
    allow_select_tf_ops: bool,
    labels: Sequence[str] | None,
    latency_runs: int,
    report_progress: ProgressCallback,
    choices: QuantizationChoices,
    trust_pickle: bool,
) -> ConversionResult:
    started = time.perf_counter()
    kind = detect_source_kind(source)
    if kind == "tflite":
        raise BadInputError(f"{source} is already a TFLite model; convert from the Keras, SavedModel or ONNX original")
    fmt = to or ("onnx" if kind in ("onnx", "sklearn") or target.suffix == ".onnx" else "tflite")
    if fmt not in FORMATS:
        raise BadInputError(f"unknown target format {fmt!r}; choose from {list(FORMATS)}")
    if kind == "onnx" and fmt != "onnx":
        raise BadInputError("an ONNX model converts to ONNX only (--to onnx): edgeship does not translate ONNX to TFLite")
    _check_options(kind, fmt, quantize, int8_io, calib, choices)
    if not validate and (limits.max_accuracy_drop_pp is not None or limits.min_agreement_pct is not None):
        raise BadInputError("a gate (--max-accuracy-drop, --min-agreement) needs validation: drop --no-validate or the gate")
    if choices.keep_float == ("auto",) and limits.max_accuracy_drop_pp is None and limits.min_agreement_pct is None:
        raise BadInputError("--keep-float auto keeps layers in float until the gate passes: give --max-accuracy-drop or --min-agreement")
    if target.suffix in (".tflite", ".onnx") and target.suffix != f".{fmt}":
        raise BadInputError(f"output {target} has the suffix {target.suffix}, but the model is converted to {fmt}; name it *.{fmt}")
    check_output_path(target)
    _refuse_overwriting_inputs(target, {"MODEL": source, "--calib": calib, "--eval": eval_data})
    if fmt == "onnx":  # the converted model is proven on ONNX Runtime: refuse before any work without it
        require_module("onnxruntime", "convert")

    # The reference: the source model, run by TensorFlow (Keras/SavedModel),
    # ONNX Runtime, or scikit-learn.
    reference: ModelRunner
    report_progress("loading model", 0, 1)
    if kind == "onnx":
        reference = open_any_model(source, threads=1)
    elif kind == "sklearn":
        from .from_sklearn import SklearnRunner, load_sklearn

        require_module("skl2onnx", "convert")
        reference = SklearnRunner(source, load_sklearn(source, trust_pickle=trust_pickle))
    else:
        reference = KerasRunner(source, load_keras_or_savedmodel(source, kind), kind)
    report_progress("loading model", 1, 1)
    check_runner_inputs(reference, str(source))
    input_shapes = [s.shape for s in reference.signature.inputs]

    calibration: Dataset | None = None
    validation_data: Dataset | None = None
    if calib is not None:
        calibration = load_dataset(calib, input_specs=reference.signature.inputs, preprocessing=preprocessing, role="calibration data")
    if eval_data is not None:
        validation_data = load_dataset(eval_data, input_specs=reference.signature.inputs, preprocessing=preprocessing, role="eval data")
    if calibration is not None and validation_data is None:
        if quantize == "int8":  # hold back a fifth: never validate on what was calibrated on
            calibration, validation_data = split_holdback(calibration)
            validation_data = replace(validation_data, source=validation_data.source + " (held back from calibration)")
        else:
            validation_data = calibration
    if calibration is not None and choices.samples is not None and choices.samples < len(calibration):
        calibration = calibration.take(slice(0, choices.samples))
    if validation_data is None:
        validation_data = _random_data(reference)
    spec_used = (calibration or validation_data).preprocessing or preprocessing
    class_names = list((calibration or validation_data).class_names) or None
    if labels is not None:
        class_names = _check_labels(list(labels), reference, class_names)

    try:
        work_folder = tempfile.TemporaryDirectory(prefix=f".{target.name}.work-", dir=target.parent)
    except OSError as exc:
        raise EdgeshipError(f"cannot create a work folder beside {target}: {exc.strerror or exc}") from None
    with work_folder as work_dir:
        work = Path(work_dir) / target.name
        stages = Path(work_dir) / "stages"
        plan = _ConversionPlan(
            source=source, kind=kind, fmt=fmt, quantize=quantize, int8_io=int8_io, choices=choices,
            allow_select_tf_ops=allow_select_tf_ops, calibration=calibration, stages=stages, target=target,
        )
        try:
            outcome = _run_conversion(plan, work, report_progress)
            convert_seconds = time.perf_counter() - started
            candidate = _open_candidate(work, fmt, target)
            try:
                validation = None
                reference_outputs = None
                if validate:
                    reference_outputs = run_dataset(reference, validation_data, progress=report_progress, label="validating: reference")
                    result = validate_models(
                        reference, candidate, validation_data, limits=limits, latency_runs=latency_runs,
                        progress=report_progress, reference_outputs=reference_outputs,
                    )
                    if result.failures and choices.keep_float == ("auto",):
                        candidate.close()
                        result, outcome = _doctor_auto(
                            plan, work, reference, reference_outputs, validation_data, limits, latency_runs,
                            report_progress, outcome,
                        )
                        candidate = _open_candidate(work, fmt, target)
                    elif result.failures and quantize == "int8":
                        outcome["doctor"] = _layer_report(plan, work, validation_data, report_progress, outcome)
                    validation = result.to_dict()
                    validation["candidate"]["path"] = str(target)
                    validation["reference"]["timed_as"] = _reference_timing(kind)
                if quantize == "int8" and validate and choices.doctor and "doctor" not in outcome:
                    outcome["doctor"] = _layer_report(plan, work, validation_data, report_progress, outcome)
                signature = candidate.signature
                validated_with = {"runtime": candidate.runtime, "version": candidate.runtime_version}
            finally:
                candidate.close()
            if quantize != "none" and fmt == "onnx" and outcome.get("float_model"):
                outcome["notes"] += _slower_or_bigger(Path(outcome["float_model"]), work, validation_data, report_progress)
        except OSError as exc:
            raise EdgeshipError(f"cannot write the converted model beside {target}: {exc.strerror or exc}") from None
        finally:
            reference.close()
        if validation is not None and validation["gates"]["failures"]:
            # Refused before any more work: the report a caller gets says what was measured.
            refused = {"schema": REPORT_SCHEMA, "model": None, "source": {"path": str(source), "kind": kind},
                       "conversion": {"to": fmt, "quantize": quantize, "int8_io": int8_io, "notes": outcome["notes"],
                                      "doctor": outcome.get("doctor")},
                       "quality": quality_summary(validation), "validation": validation}
            raise ConversionGateError("; ".join(validation["gates"]["failures"]) + f" (nothing written to {target})", refused)

        report_progress("writing golden vectors", 0, 1)
        quanta = read_tflite_graph(work).output_quanta if fmt == "tflite" else onnx_output_quanta(work)
        n_golden = min(len(validation_data), golden_sample_count(input_shapes))
        fixed = {int(t.shape[0]) for t in signature.inputs if t.shape and t.shape[0] > 0}
        if fixed and min(fixed) <= len(validation_data):  # a fixed-batch model replays exactly one batch
            n_golden = min(fixed)
        golden, derivation = make_golden_vectors(
            work, fmt, validation_data.take(slice(0, n_golden)), quantization=quantize, output_quanta=quanta
        )
        golden_work = golden_path(work)
        golden.save(golden_work)
        report_progress("writing golden vectors", 1, 1)
        inspection = inspect_model(work)
        runtime = runtime_requirements(work, fmt, signature)
        runtime["validated_with"] = validated_with
        report = build_report(
            out=work,
            source=source,
            source_kind=kind,
            fmt=fmt,
            quantize=quantize,
            int8_io=int8_io,
            signature=signature.to_dict(),
            preprocessing=spec_used.to_dict() if spec_used else None,
            labels=class_names,
            calibration=None if calibration is None or not outcome["calibration_samples"] else {
                "source": str(calibration.source), "samples": outcome["calibration_samples"],
                "note": CALIBRATION_SAMPLES_NOTE,
            },
            validation=validation,
            inspection=inspection,
            runtime=runtime,
            golden={"file": golden_path(target).name, "atol": golden.atol, "rtol": golden.rtol, **derivation.to_dict()},
            converter=_versions(("tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "skl2onnx", "scikit-learn")),
        )
        report["source"]["path"] = str(source)
        report["conversion"].update({
            "choices": choices.to_dict(),
            "notes": outcome["notes"],
            "opset": DEFAULT_OPSET if fmt == "onnx" and kind != "onnx" else None,
            "seconds": round(time.perf_counter() - started, 3),
            "convert_seconds": round(convert_seconds, 3),
            "peak_rss_mib": {"edgeship": _own_peak_rss_mib(), "converter": outcome.get("peak_rss_mib")},
            "doctor": outcome.get("doctor"),
        })
        report_work = report_path(work)
        atomic_write_json(report_work, report)
        # Commit: golden vectors and report first, the model last (a reader that sees
        # the model also sees what describes it). All three get the model file's mode
        # (the umask's), not the private 0600 of a temporary file.
        mode = work.stat().st_mode & 0o777
        for done, final in ((golden_work, golden_path(target)), (report_work, report_path(target)), (work, target)):
            with atomic_output_path(final, mode=mode) as tmp:
                os.replace(done, tmp)
    return ConversionResult(target, report_path(target), golden_path(target), report)


CALIBRATION_SAMPLES_NOTE = (
    "min-max calibration settles within a few hundred representative samples (more rarely moves a range); "
    "entropy and percentile calibration want a thousand or more to shape their histograms"
)


def _reference_timing(kind: str) -> str:
    return {
        "onnx": "ONNX Runtime session, batch 1",
        "sklearn": "scikit-learn predict, batch 1",
    }.get(kind, "TensorFlow graph (tf.function, traced once), batch 1")


def _own_peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass(frozen=True)
class _ConversionPlan:
    source: Path
    kind: str
    fmt: str
    quantize: str
    int8_io: bool
    choices: QuantizationChoices
    allow_select_tf_ops: bool
    calibration: Dataset | None
    stages: Path
    target: Path


def _run_conversion(plan: _ConversionPlan, work: Path, progress: ProgressCallback, keep_float: Sequence[str] = ()) -> dict[str, Any]:
    """Convert (in child processes) into ``work``; {"calibration_samples", "notes", "peak_rss_mib", ...}."""
    calibration = None
    if plan.calibration is not None and plan.quantize == "int8":
        calibration = save_dataset(plan.calibration, plan.stages / "calibration")
    keep = tuple(keep_float) or tuple(k for k in plan.choices.keep_float if k != "auto")
    name = plan.source.name
    if plan.fmt == "tflite":
        options = TFLiteOptions(
            quantize=plan.quantize, int8_io=plan.int8_io, allow_select_tf_ops=plan.allow_select_tf_ops,
            per_channel=plan.choices.per_channel, activations=plan.choices.activations, strict=plan.choices.strict,
            keep_float=keep, fixed_batch=plan.choices.fixed_batch,
        )
        result = run_stage(
            "TFLite converter",
            {"stage": "tflite", "stage_name": "the TFLite converter", "source": str(plan.source), "kind": plan.kind,
             "out": str(work), "options": asdict(options), "calibration": calibration},
            plan.stages / "tflite", model_name=name, progress=progress,
        )
        return {"calibration_samples": result["calibration_samples"], "notes": list(result["notes"]),
                "peak_rss_mib": result.get("peak_rss_mib"), "keep_float": list(keep)}
    notes: list[str] = []
    peak: list[float] = []
    if plan.kind == "onnx":
        fp32 = plan.source
    else:
        fp32 = plan.stages / "fp32.onnx"
        if not fp32.exists():
            plan.stages.mkdir(parents=True, exist_ok=True)
            stage, request = ("sklearn-export", {"trust_pickle": True}) if plan.kind == "sklearn" else ("onnx-export", {"opset": DEFAULT_OPSET})
            exported = run_stage(
                "scikit-learn to ONNX export (skl2onnx)" if plan.kind == "sklearn" else "ONNX export (tf2onnx)",
                {"stage": stage, "stage_name": "the ONNX export", "source": str(plan.source), "kind": plan.kind,
                 "out": str(fp32), **request},
                plan.stages / "export", model_name=name, progress=progress,
            )
            notes += exported["notes"]
            peak.append(exported.get("peak_rss_mib") or 0.0)
    onnx_options = OnnxQuantOptions(
        quantize=plan.quantize, per_channel=plan.choices.per_channel, method=plan.choices.method,
        activations=plan.choices.activations, keep_float=keep,
    )
    if plan.quantize == "none":
        shutil.copyfile(fp32, work)
        return {"calibration_samples": 0, "notes": notes, "peak_rss_mib": max(peak, default=None), "float_model": str(fp32)}
    result = run_stage(
        "ONNX quantization",
        {"stage": "onnx-quantize", "stage_name": "ONNX quantization", "src": str(fp32), "out": str(work),
         "options": asdict(onnx_options), "calibration": calibration, "model_name": name,
         # the doctor's reconversions reuse the first calibration's ranges
         "cache": str(plan.stages / f"calibration-{plan.choices.method}.json")},
        plan.stages / "quantize", model_name=name, progress=progress,
    )
    peak.append(result.get("peak_rss_mib") or 0.0)
    return {"calibration_samples": result["calibration_samples"], "notes": notes + list(result["notes"]),
            "peak_rss_mib": max(peak, default=None), "float_model": str(fp32), "keep_float": list(keep),
            "processed_model": result.get("processed_model")}


def _slower_or_bigger(float_model: Path, quantized: Path, data: Dataset, progress: ProgressCallback) -> list[str]:
    """Warnings when the quantized ONNX model is bigger or slower than the float one on this host."""
    warnings_found = []
    float_size, quant_size = float_model.stat().st_size, quantized.stat().st_size
    if quant_size > float_size:
        warnings_found.append(
            f"warning: the quantized model is {quant_size / float_size:.2f}x the size of the float one "
            "(quantization parameters outweigh the int8 savings on this graph)"
        )
    p50 = {}
    for role, path in (("float", float_model), ("quantized", quantized)):
        with open_any_model(path, threads=1) as runner:
            size = fixed_batch(runner) or 1
            sample = [np.repeat(x[:1], size, axis=0) for x in inputs_for(runner, data)]
            p50[role] = measure_latency(runner, sample, runs=20, warmup=3, progress=progress, label=f"timing: {role} ONNX").p50_ms
    if p50["quantized"] > p50["float"] * 1.1 and p50["quantized"] - p50["float"] > 0.02:  # past timing noise
        warnings_found.append(
            f"warning: the quantized model runs {p50['quantized'] / p50['float']:.1f}x slower than float on this host "
            f"({p50['quantized']:.2f} ms against {p50['float']:.2f} ms at batch 1)"
        )
    return warnings_found


def _layer_report(
    plan: _ConversionPlan, work: Path, data: Dataset, progress: ProgressCallback, outcome: dict[str, Any]
) -> dict[str, Any]:
    """The doctor's diagnosis: per-layer error of the int8 model against float, worst first."""
    ranking = _rank_layers(plan, work, data, progress, outcome)
    metric = (
        "error a node introduces: its output's worst-channel RMSE relative to the channel's spread, "
        "minus the same of its inputs (int8 model against float, on the evaluation data)"
        if plan.fmt == "onnx" else
        "each int8 operator against its float twin on the same input (LiteRT QuantizationDebugger): "
        "worst-channel RMSE relative to the channel's spread"
    )
    return doctor_summary(ranking, metric)


def _rank_layers(
    plan: _ConversionPlan, work: Path, data: Dataset, progress: ProgressCallback, outcome: dict[str, Any]
) -> list[dict[str, Any]]:
    sample = data.take(slice(0, DOCTOR_SAMPLES))
    if "ranking" in outcome:
        return list(outcome["ranking"])
    if plan.fmt == "onnx":
        probe = plan.stages / "doctor"
        probe.mkdir(parents=True, exist_ok=True)
        progress("measuring per-layer error", 0, 1)
        ranking = rank_onnx_layers(Path(outcome.get("processed_model") or outcome["float_model"]), work, sample, probe)
        progress("measuring per-layer error", 1, 1)
    else:
        assert plan.calibration is not None
        options = TFLiteOptions(
            quantize="int8", per_channel=plan.choices.per_channel, activations=plan.choices.activations,
            fixed_batch=plan.choices.fixed_batch, allow_select_tf_ops=plan.allow_select_tf_ops,
        )
        result = run_stage(
            "TFLite quantization debugger",
            {"stage": "tflite-doctor", "stage_name": "the TFLite quantization debugger", "source": str(plan.source),
             "kind": plan.kind, "options": asdict(options),
             "calibration": save_dataset(plan.calibration, plan.stages / "calibration"),
             "data": save_dataset(sample, plan.stages / "doctor-data")},
            plan.stages / "doctor", model_name=plan.source.name, progress=progress,
        )
        ranking = list(result["ranking"])
    outcome["ranking"] = ranking
    return ranking


def _doctor_auto(
    plan: _ConversionPlan,
    work: Path,
    reference: ModelRunner,
    reference_outputs: Sequence[np.ndarray] | None,
    data: Dataset,
    limits: GateLimits,
    latency_runs: int,
    progress: ProgressCallback,
    outcome: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """Keep the fewest worst layers in float so the gate passes (see ``doctor``)."""
    ranking = _rank_layers(plan, work, data, progress, outcome)
    names = [row["layer"] for row in ranking]
    tried: dict[tuple[str, ...], Any] = {}

    def passes(keep: tuple[str, ...]) -> bool:
        if keep in tried:
            return bool(tried[keep][0].passed)
        attempt = plan.stages / f"keep-{len(tried)}" / work.name
        attempt.parent.mkdir(parents=True, exist_ok=True)
        progress(f"doctor: trying {len(keep)} layer(s) in float", 0, 1)
        result_outcome = _run_conversion(plan, attempt, progress, keep_float=keep)
        with _open_candidate(attempt, plan.fmt, plan.target) as candidate:
            result = validate_models(
                reference, candidate, data, limits=limits, latency_runs=latency_runs, progress=progress,
                reference_outputs=reference_outputs,
            )
        progress(f"doctor: trying {len(keep)} layer(s) in float", 1, 1)
        tried[keep] = (result, result_outcome, attempt)
        return bool(result.passed)

    kept = fewest_kept(names, passes)
    summary = doctor_summary(ranking, "see layer ranking")
    summary["tried"] = [list(k) for k in tried]
    if kept is None:
        summary["kept_in_float"] = None
        summary["verdict"] = f"the gate fails even with all {len(names)} measured layers in float"
        if not tried:
            raise EdgeshipError("the quantization doctor found no layers to keep in float")
        result, _, _ = tried[tuple(names)]
        return result, {**outcome, "doctor": summary}
    result, chosen, attempt = tried[kept]
    os.replace(attempt, work)
    summary["kept_in_float"] = list(kept)
    summary["verdict"] = f"{len(kept)} of {len(names)} layers kept in float; the gate passes ({len(tried)} conversions tried)"
    merged = {**outcome, **chosen, "doctor": summary, "ranking": ranking}
    merged["notes"] = list(outcome["notes"]) + [f"quantization doctor kept in float: {', '.join(kept)}"]
    return result, merged
