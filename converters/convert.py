"""``convert``: a source model in; the converted model, its golden vectors and its
report out, all or nothing.

The work happens in a private folder beside OUT; only when conversion,
validation, golden vectors and report all succeeded (and the gates passed) are
the three files moved into place, each through ``atomic_output_path``. A
failure at any step leaves nothing behind, not even a temporary file.
"""

from __future__ import annotations

__all__ = ["FORMATS", "ConversionGateError", "ConversionResult", "check_output_path", "convert_model", "read_labels"]

import importlib.metadata
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgeship.agent.runtimes import ModelLoadError, ModelRunner
from edgeship.ota.atomicfile import atomic_output_path, atomic_write_json
from edgeship.ota.bundle import read_labels
from edgeship.ota.errors import BadInputError, EdgeshipError, GateFailedError, require_module

from .data import Dataset, PreprocessingSpec, input_name, load_dataset, split_holdback
from .golden_vectors import golden_sample_count, make_golden_vectors
from .inspection import inspect_model, runtime_requirements
from .progress import ProgressCallback, no_progress
from .report import REPORT_SCHEMA, build_report, golden_path, quality_summary, report_path
from .sources import (
    KerasRunner,
    FEEDABLE_DTYPES,
    check_runner_inputs,
    detect_source_kind,
    load_keras_or_savedmodel,
    open_any_model,
)
from .tflite_flatbuffer import read_tflite_graph
from .to_onnx import export_to_onnx, onnx_output_quanta, quantize_onnx
from .to_tflite import QUANTIZATIONS, convert_to_tflite
from .validate import GateLimits, validate_models

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
) -> ConversionResult:
    """Convert MODEL to OUT and write OUT.golden.npz and OUT.report.json beside it.

    Raises:
        BadInputError: unreadable/unknown model, bad data, bad options, unwritable OUT,
            operators TFLite builtins cannot express.
        ConversionGateError: a gate refused the converted model (nothing written).
        MissingExtraError: TensorFlow / tf2onnx / onnxruntime not installed.
        EdgeshipError: a converter failed.
    """
    report_progress = progress or no_progress
    source = Path(model)
    target = Path(out)
    kind = detect_source_kind(source)
    if kind == "tflite":
        raise BadInputError(f"{source} is already a TFLite model; convert from the Keras, SavedModel or ONNX original")
    fmt = to or ("onnx" if kind == "onnx" or target.suffix == ".onnx" else "tflite")
    if fmt not in FORMATS:
        raise BadInputError(f"unknown target format {fmt!r}; choose from {list(FORMATS)}")
    if kind == "onnx" and fmt != "onnx":
        raise BadInputError("an ONNX model converts to ONNX only (--to onnx): edgeship does not translate ONNX to TFLite")
    if quantize not in QUANTIZATIONS:
        raise BadInputError(f"unknown quantization {quantize!r}; choose from {list(QUANTIZATIONS)}")
    if int8_io and (fmt != "tflite" or quantize != "int8"):
        raise BadInputError("--int8-io needs --to tflite --quantize int8 (ONNX int8 models keep float inputs and outputs)")
    if quantize == "int8" and calib is None:
        raise BadInputError("--quantize int8 needs calibration data: give --calib DATA (a few hundred representative samples)")
    if not validate and (limits.max_accuracy_drop_pp is not None or limits.min_agreement_pct is not None):
        raise BadInputError("a gate (--max-accuracy-drop, --min-agreement) needs validation: drop --no-validate or the gate")
    if target.suffix in (".tflite", ".onnx") and target.suffix != f".{fmt}":
        raise BadInputError(f"output {target} has the suffix {target.suffix}, but the model is converted to {fmt}; name it *.{fmt}")
    check_output_path(target)
    _refuse_overwriting_inputs(target, {"MODEL": source, "--calib": calib, "--eval": eval_data})
    if fmt == "onnx":  # the converted model is proven on ONNX Runtime: refuse before any work without it
        require_module("onnxruntime", "convert")

    # The reference: the source model, run by TensorFlow (Keras/SavedModel) or ONNX Runtime.
    loaded: Any = None
    reference: ModelRunner
    if kind == "onnx":
        reference = open_any_model(source, threads=1)
    else:
        report_progress("loading model", 0, 1)
        loaded = load_keras_or_savedmodel(source, kind)
        reference = KerasRunner(source, loaded, kind)
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
        samples = 0
        try:
            if fmt == "tflite":
                conversion = convert_to_tflite(
                    loaded, kind, source, quantize=quantize, int8_io=int8_io, calibration=calibration,
                    allow_select_tf_ops=allow_select_tf_ops, progress=report_progress,
                )
                work.write_bytes(conversion.content)
                samples = conversion.calibration_samples
            else:
                if kind == "onnx":
                    fp32 = source
                else:
                    fp32 = Path(work_dir) / "fp32.onnx"
                    report_progress("exporting to ONNX", 0, 1)
                    export_to_onnx(loaded, kind, source, fp32)
                    report_progress("exporting to ONNX", 1, 1)
                samples = quantize_onnx(fp32, work, quantize=quantize, calibration=calibration, progress=report_progress)
        except OSError as exc:
            raise EdgeshipError(f"cannot write the converted model beside {target}: {exc.strerror or exc}") from None

        candidate = _open_candidate(work, fmt, target)
        try:
            validation = None
            if validate:
                result = validate_models(
                    reference, candidate, validation_data, limits=limits, latency_runs=latency_runs, progress=report_progress
                )
                validation = result.to_dict()
                validation["candidate"]["path"] = str(target)
            signature = candidate.signature
            validated_with = {"runtime": candidate.runtime, "version": candidate.runtime_version}
        finally:
            candidate.close()
            reference.close()
        if validation is not None and validation["gates"]["failures"]:
            # Refused before any more work: the report a caller gets says what was measured.
            refused = {"schema": REPORT_SCHEMA, "model": None, "source": {"path": str(source), "kind": kind},
                       "conversion": {"to": fmt, "quantize": quantize, "int8_io": int8_io},
                       "quality": quality_summary(validation), "validation": validation}
            raise ConversionGateError("; ".join(validation["gates"]["failures"]) + f" (nothing written to {target})", refused)

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
            calibration=None if calibration is None or not samples else {"source": str(calibration.source), "samples": samples},
            validation=validation,
            inspection=inspection,
            runtime=runtime,
            golden={"file": golden_path(target).name, "atol": golden.atol, "rtol": golden.rtol, **derivation.to_dict()},
            converter=_versions(("tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert")),
        )
        report["source"]["path"] = str(source)
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

