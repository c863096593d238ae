"""Golden vectors for a converted model, with a tolerance derived from the
model's own numerics.

The expected outputs are what the converted model gives on this host through
``edgeship.agent.runtimes`` (one thread, the device's default kernels). The
tolerance is the largest of:

- ``SPREAD_MARGIN`` x the spread actually observed when the same model runs
  other ways here: 2 threads, and (TFLite) the builtin kernels without XNNPACK
  and TFLite's reference kernels, or (ONNX) graph optimizations switched off;
  a device's kernels differ from ours as these differ from each other;
- ``QUANTUM_STEPS`` steps of the integer tensor each output is dequantized from
  (int8 models: one rounding flip anywhere shows up as whole steps);
- a floor per numeric format, relative to the outputs' magnitude, for what this
  host cannot observe (another CPU's fused multiply-add, native float16 math).

Everything that went into the number is recorded in the report.
"""

from __future__ import annotations

__all__ = ["FLOORS", "QUANTUM_STEPS", "SPREAD_MARGIN", "GoldenDerivation", "golden_tolerance", "make_golden_vectors"]

import importlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelRunner, dequantize, quantize
from edgeship.ota.golden import GoldenVectors

from .data import Dataset
from .sources import open_any_model
from .validate import fixed_batch, inputs_for, run_arrays

SPREAD_MARGIN = 4.0
QUANTUM_STEPS = 2.0
FLOORS = {"none": 1e-4, "dynamic": 1e-3, "float16": 1e-2, "int8": 1e-4}
"""Relative floor per quantization mode (x max(1, max |output|))."""
MAX_GOLDEN_BYTES = 2 << 20
CHILD_TIMEOUT_S = 240


@dataclass(frozen=True)
class GoldenDerivation:
    samples: int
    variants: tuple[str, ...]
    observed_spread: float
    output_quantum: float
    floor: float
    atol: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["variants"] = list(self.variants)
        data["spread_margin"] = SPREAD_MARGIN
        data["quantum_steps"] = QUANTUM_STEPS
        return data


def golden_tolerance(observed_spread: float, output_quantum: float, floor: float) -> float:
    """The tolerance rule above (pure)."""
    return float(max(SPREAD_MARGIN * observed_spread, QUANTUM_STEPS * output_quantum, floor))


def golden_sample_count(input_shapes: Sequence[Sequence[int]], wanted: int = 8) -> int:
    """Up to ``wanted`` samples, fewer for large inputs (the file stays under ~2 MiB;
    4 bytes an element, the widest common input dtype)."""
    per_sample = sum(int(np.prod([d for d in s[1:] if d > 0])) * 4 for s in input_shapes) or 1
    return int(max(1, min(wanted, MAX_GOLDEN_BYTES // per_sample)))


def _max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0)) for x, y in zip(a, b))


def _tflite_variant(path: Path, inputs: Sequence[np.ndarray], resolver: str, runner: ModelRunner) -> list[np.ndarray] | None:
    """Outputs with another kernel set (the runtime API has no switch for it)."""
    module = None
    order = ["ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite.python.interpreter"]
    if runner.runtime == "tensorflow":  # Select TF ops: only TensorFlow's interpreter runs them
        order = ["tensorflow.lite.python.interpreter"]
    for name in order:
        try:
            module = importlib.import_module(name)
            break
        except Exception:  # noqa: BLE001 - a runtime that fails to import for any reason (missing, a broken native library) is skipped for the next
            continue
    if module is None:
        return None
    resolver_type = getattr(getattr(module, "OpResolverType", None) or getattr(getattr(module, "experimental", None), "OpResolverType", None), resolver, None)
    if resolver_type is None:
        return None
    interpreter = module.Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver_type)
    in_details = interpreter.get_input_details()
    for x, detail in zip(inputs, in_details):
        interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    for x, detail, spec in zip(inputs, in_details, runner.signature.inputs):
        interpreter.set_tensor(detail["index"], np.ascontiguousarray(quantize(x, spec), dtype=detail["dtype"]))
    interpreter.invoke()
    return [
        dequantize(interpreter.get_tensor(d["index"]).copy(), spec)
        for d, spec in zip(interpreter.get_output_details(), runner.signature.outputs)
    ]


def _tflite_variant_in_child(path: Path, inputs: Sequence[np.ndarray], resolver: str) -> tuple[list[np.ndarray] | None, str]:
    """Run ``_tflite_variant`` in a child process: TFLite's reference kernels abort
    the process (SIGABRT) on some int8 graphs (MobileNetV2), and that must not
    take the conversion down. Returns (outputs or None, variant label)."""
    label = resolver.lower()
    with tempfile.TemporaryDirectory(prefix="edgeship-golden-") as work:
        given, produced = Path(work) / "in.npz", Path(work) / "out.npz"
        np.savez(given, *[np.asarray(x) for x in inputs])
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edgeship.converters.golden_vectors", str(path), str(given), resolver, str(produced)],
                capture_output=True, timeout=CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return None, f"{label} (skipped: over {CHILD_TIMEOUT_S} s)"
        if proc.returncode != 0 or not produced.is_file():
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            return None, f"{label} (skipped: the kernels crashed, {how})"
        with np.load(produced, allow_pickle=False) as npz:
            return [npz[f"arr_{i}"] for i in range(len(npz.files))], label


def _onnx_unoptimized(path: Path, inputs: Sequence[np.ndarray], runner: ModelRunner, fixed: int | None) -> list[np.ndarray]:
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    step = fixed or int(inputs[0].shape[0])
    parts = []
    for start in range(0, int(inputs[0].shape[0]), step):
        chunk = [x[start : start + step] for x in inputs]
        feed = {n: np.ascontiguousarray(x, dtype=s.dtype) for n, x, s in zip(names, chunk, runner.signature.inputs)}
        parts.append([np.asarray(y, np.float32) for y in session.run(None, feed)])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def make_golden_vectors(
    path: Path,
    fmt: str,
    data: Dataset,
    *,
    quantization: str,
    output_quanta: Sequence[float] = (),
) -> tuple[GoldenVectors, GoldenDerivation]:
    """Golden vectors for the model at ``path`` on ``inputs`` (float, batch first).

    A device may replay them as one batch or one by one; both ways are among the
    variants whose spread sets the tolerance.
    """
    with open_any_model(path, threads=1) as runner:
        inputs = inputs_for(runner, data)  # matched by name, in the file's own order
        names_in = tuple(s.name for s in runner.signature.inputs)
        names_out = tuple(s.name for s in runner.signature.outputs)
        expected = run_arrays(runner, inputs)
        variants: list[str] = []
        spread = _max_diff(expected, run_arrays(runner, inputs, batch=1))
        variants.append("batch=1")
        with open_any_model(path, threads=2) as two:
            spread = max(spread, _max_diff(expected, run_arrays(two, inputs)))
            variants.append("threads=2")
        if fmt == "tflite":
            for resolver in ("BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"):
                other, label = _tflite_variant_in_child(path, inputs, resolver)
                if other is not None:
                    spread = max(spread, _max_diff(expected, other))
                variants.append(label)
        else:
            try:
                spread = max(spread, _max_diff(expected, _onnx_unoptimized(path, inputs, runner, fixed_batch(runner))))
                variants.append("graph_optimization=disabled")
            except Exception:  # noqa: BLE001, S110 - the unoptimized run only widens the tolerance; a model it cannot run keeps the optimized spread
                pass
        quanta = [s.scale for s in runner.signature.outputs if s.quantized]
    quantum = max([*quanta, *output_quanta, 0.0])
    magnitude = max(1.0, max(float(np.max(np.abs(y), initial=0.0)) for y in expected))
    floor = FLOORS.get(quantization, 1e-3) * magnitude
    atol = golden_tolerance(spread, quantum, floor)
    golden = GoldenVectors(
        input_names=names_in,
        inputs=tuple(np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x) for x in inputs),
        output_names=names_out,
        outputs=tuple(np.asarray(y, np.float32) for y in expected),
        atol=atol,
        rtol=0.0,
    )
    return golden, GoldenDerivation(len(inputs[0]), tuple(variants), spread, quantum, floor, atol)


def _variant_main(argv: Sequence[str]) -> int:
    """Child entry: MODEL INPUTS.npz RESOLVER OUTPUTS.npz (see _tflite_variant_in_child)."""
    model, given, resolver, produced = argv
    with np.load(given, allow_pickle=False) as npz:
        inputs = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    with open_any_model(model, threads=1) as runner:
        outputs = _tflite_variant(Path(model), inputs, resolver, runner)
    if outputs is None:
        return 3
    np.savez(produced, *outputs)
    return 0


if __name__ == "__main__":
    sys.exit(_variant_main(sys.argv[1:]))
