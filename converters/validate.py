"""Parity of a converted model with its reference: accuracy (when the data has
labels), top-1 agreement, max/mean absolute error of the (dequantized) outputs,
size, and batch-1 latency of both on this host; and the gates that refuse it.

The arithmetic (``compare_outputs_of``, ``check_gates``, ``align_outputs``) is
pure and table-tested; ``validate_models`` is the thin layer that runs models.
Accuracy and agreement are taken on the classification output: the first
output of shape [N, classes] with more than one class. Errors cover every output.
"""

from __future__ import annotations

__all__ = [
    "GateLimits",
    "ParityMetrics",
    "ValidationResult",
    "align_inputs",
    "align_outputs",
    "check_gates",
    "classification_output",
    "compare_outputs_of",
    "fixed_batch",
    "inputs_for",
    "model_size_bytes",
    "run_arrays",
    "run_dataset",
    "validate_models",
]

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import ModelRunner, TensorSpec, match_names, tensor_aliases
from edgeship.ota.errors import BadInputError, GateFailedError

from .bench import LatencyStats, measure_latency
from .data import Dataset
from .progress import ProgressCallback, no_progress


@dataclass(frozen=True)
class ParityMetrics:
    samples: int
    reference_accuracy: float | None
    candidate_accuracy: float | None
    agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    per_output: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    reference_rmse: float | None = None
    """Regression models (float labels 'y'): root mean square error against the labels."""
    candidate_rmse: float | None = None
    candidate_mae: float | None = None

    @property
    def accuracy_drop_pp(self) -> float | None:
        """Reference minus candidate accuracy, in percentage points."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return (self.reference_accuracy - self.candidate_accuracy) * 100.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_output"] = list(self.per_output)
        data["accuracy_drop_pp"] = self.accuracy_drop_pp
        return data


@dataclass(frozen=True)
class GateLimits:
    """The user's limits; None: no gate."""

    max_accuracy_drop_pp: float | None = None
    min_agreement_pct: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def align_outputs(reference: Sequence[TensorSpec], candidate: Sequence[TensorSpec]) -> list[int]:
    """For each reference output, the index of the candidate output of the same
    name (pure).

    Names are compared through their aliases (a TFLite file calls the Keras
    output ``classes`` ``StatefulPartitionedCall:1`` with the SignatureDef key
    ``classes``). Only where names say nothing (a candidate from elsewhere) may
    outputs of distinct shapes pair up by shape; outputs never pair by position,
    and same-shaped outputs without names in common are refused, not guessed.
    """
    if len(reference) != len(candidate):
        raise BadInputError(f"the reference has {len(reference)} outputs, the candidate {len(candidate)}")
    if len(reference) == 1:
        return [0]
    order: list[int] = []
    for r in reference:
        index = None
        for alias in tensor_aliases(r):
            try:
                index = match_names(candidate, [alias], "output")[0]
                break
            except BadInputError:
                continue
        order.append(-1 if index is None else index)
    if -1 not in order and len(set(order)) == len(order):
        return order
    shapes = [tuple(c.shape[1:]) for c in candidate]
    by_shape = []
    for r in reference:
        matches = [i for i, s in enumerate(shapes) if s == tuple(r.shape[1:])]
        by_shape.append(matches[0] if len(matches) == 1 else -1)
    if -1 not in by_shape and len(set(by_shape)) == len(by_shape):
        return by_shape
    raise BadInputError(
        "cannot pair the outputs by name: the reference has "
        f"{[tensor_aliases(r)[-1] for r in reference]}, the candidate {[tensor_aliases(c)[-1] for c in candidate]}, "
        "and same-shaped outputs cannot be told apart by shape"
    )


def align_inputs(runner: ModelRunner, names: Sequence[str]) -> list[int]:
    """For each of the runner's inputs, the index in ``names`` of the data that
    feeds it (by name; see ``match_names``)."""
    order = match_names(runner.signature.inputs, list(names), "input")
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return inverse


def inputs_for(runner: ModelRunner, data: Dataset) -> list[np.ndarray]:
    """The dataset's arrays in the order the runner's file keeps its inputs, matched by name."""
    if not data.names:
        if len(data.inputs) != 1:
            raise BadInputError("data for a multi-input model must name its arrays after the inputs")
        return list(data.inputs)
    if len(data.names) != len(runner.signature.inputs):
        raise BadInputError(f"the data has {len(data.names)} inputs, the model takes {len(runner.signature.inputs)}")
    return [data.inputs[i] for i in align_inputs(runner, data.names)]


def classification_output(outputs: Sequence[np.ndarray]) -> int | None:
    """Index of the first [N, classes>1] output (pure); None when there is none."""
    for i, y in enumerate(outputs):
        if y.ndim == 2 and y.shape[1] > 1:
            return i
    return None


def compare_outputs_of(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None,
    names: Sequence[str] | None = None,
) -> ParityMetrics:
    """Parity metrics of two models' outputs on the same samples (pure)."""
    if len(reference) != len(candidate):
        raise BadInputError(f"the reference has {len(reference)} outputs, the candidate {len(candidate)}")
    per_output = []
    worst, total, count = 0.0, 0.0, 0
    for i, (r, c) in enumerate(zip(reference, candidate)):
        if r.shape != c.shape:
            raise BadInputError(f"output {i}: the reference gives shape {list(r.shape)}, the candidate {list(c.shape)}")
        error = np.abs(r.astype(np.float64) - c.astype(np.float64))
        per_output.append(
            {
                "name": names[i] if names else str(i),
                "max_abs_error": float(error.max(initial=0.0)),
                "mean_abs_error": float(error.mean()) if error.size else 0.0,
            }
        )
        worst = max(worst, float(error.max(initial=0.0)))
        total += float(error.sum())
        count += error.size
    head = classification_output(reference)
    n = int(reference[0].shape[0]) if reference else 0
    ref_acc = cand_acc = agreement = None
    # regression: labels, but no [N, classes] output to take a top-1 from
    regression = labels is not None and head is None
    if regression and labels is not None:
        target = next((i for i, y in enumerate(reference) if y.size == n and y.dtype.kind == "f"), None)
        if target is not None:
            truth = labels.astype(np.float64)
            ref_y = reference[target].reshape(n).astype(np.float64)
            cand_y = candidate[target].reshape(n).astype(np.float64)
            return ParityMetrics(
                n, None, None, None, worst, total / count if count else 0.0, tuple(per_output),
                reference_rmse=float(np.sqrt(np.mean((ref_y - truth) ** 2))),
                candidate_rmse=float(np.sqrt(np.mean((cand_y - truth) ** 2))),
                candidate_mae=float(np.mean(np.abs(cand_y - truth))),
            )
    if head is not None:
        ref_top = reference[head].argmax(axis=1)
        cand_top = candidate[head].argmax(axis=1)
        agreement = float(np.mean(ref_top == cand_top))
        if labels is not None and not regression:
            ref_acc = float(np.mean(ref_top == labels))
            cand_acc = float(np.mean(cand_top == labels))
    return ParityMetrics(n, ref_acc, cand_acc, agreement, worst, total / count if count else 0.0, tuple(per_output))


def check_gates(metrics: ParityMetrics, limits: GateLimits) -> list[str]:
    """The gates that fail, each naming its numbers (pure; empty when all pass).

    A gate whose metric cannot be computed (no labels, no classification output)
    fails: a gate the user asked for is never passed silently.
    """
    failures = []
    if limits.max_accuracy_drop_pp is not None:
        drop = metrics.accuracy_drop_pp
        if drop is None:
            failures.append("accuracy gate: the data has no labels 'y' (or the model no classification output), so accuracy cannot be measured")
        elif drop > limits.max_accuracy_drop_pp + 1e-9:
            failures.append(
                f"accuracy gate: dropped {drop:.2f} points ({metrics.reference_accuracy:.2%} -> "
                f"{metrics.candidate_accuracy:.2%}), more than the allowed {limits.max_accuracy_drop_pp:g}"
            )
    if limits.min_agreement_pct is not None:
        if metrics.agreement is None:
            failures.append("agreement gate: the model has no classification output ([N, classes]) to compare top-1 on")
        elif metrics.agreement * 100.0 < limits.min_agreement_pct - 1e-9:
            failures.append(
                f"agreement gate: top-1 agreement {metrics.agreement:.2%} is below the required {limits.min_agreement_pct:g}%"
            )
    return failures


@dataclass(frozen=True)
class ValidationResult:
    data: dict[str, Any]
    metrics: ParityMetrics
    reference: dict[str, Any]
    candidate: dict[str, Any]
    limits: GateLimits
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "metrics": self.metrics.to_dict(),
            "reference": self.reference,
            "candidate": self.candidate,
            "gates": {"limits": self.limits.to_dict(), "passed": self.passed, "failures": list(self.failures)},
        }

    def raise_if_failed(self) -> None:
        if self.failures:
            raise GateFailedError("; ".join(self.failures))


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """A file's size, or a folder's total (SavedModel)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def fixed_batch(runner: ModelRunner) -> int | None:
    """The batch size a model insists on (an ONNX export with batch 1), or None
    when its batch dimension is dynamic."""
    sizes = {int(s.shape[0]) for s in runner.signature.inputs if s.shape and s.shape[0] > 0}
    return min(sizes) if sizes else None


def run_arrays(
    runner: ModelRunner,
    inputs: Sequence[np.ndarray],
    *,
    batch: int = 32,
    progress: ProgressCallback | None = None,
    label: str = "running",
) -> list[np.ndarray]:
    """All outputs of ``runner`` over ``inputs`` (batch first), chunk by chunk (float32).

    A model with a fixed batch size gets chunks of exactly that size; the last one
    is padded by repeating its final sample, and the padding's outputs dropped.
    """
    report = progress or no_progress
    fixed = fixed_batch(runner)
    step = fixed or batch
    n = int(inputs[0].shape[0])
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        chunk = [x[start:stop] for x in inputs]
        if fixed and stop - start < fixed:
            chunk = [np.concatenate([c, np.repeat(c[-1:], fixed - (stop - start), axis=0)]) for c in chunk]
        outputs = runner.run(chunk)
        parts.append([np.asarray(y)[: stop - start] for y in outputs])
        report(label, stop, n)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def run_dataset(
    runner: ModelRunner,
    data: Dataset,
    *,
    batch: int = 32,
    progress: ProgressCallback | None = None,
    label: str = "running",
) -> list[np.ndarray]:
    """All outputs of ``runner`` over ``data`` (see run_arrays)."""
    return run_arrays(runner, inputs_for(runner, data), batch=batch, progress=progress, label=label)


def validate_models(
    reference: ModelRunner,
    candidate: ModelRunner,
    data: Dataset,
    *,
    limits: GateLimits = GateLimits(),
    latency_runs: int = 30,
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
    reference_outputs: Sequence[np.ndarray] | None = None,
) -> ValidationResult:
    """Run both models on ``data`` and compare; never raises for a failed gate
    (``ValidationResult.raise_if_failed`` does, so callers can report first)."""
    ref_out = list(reference_outputs) if reference_outputs is not None else run_dataset(
        reference, data, progress=progress, label="validating: reference"
    )
    cand_raw = run_dataset(candidate, data, progress=progress, label="validating: candidate")
    order = align_outputs(reference.signature.outputs, candidate.signature.outputs)
    cand_out = [cand_raw[i] for i in order]
    names = [s.name for s in reference.signature.outputs]
    metrics = compare_outputs_of(ref_out, cand_out, data.labels, names)
    size = max(fixed_batch(candidate) or 1, fixed_batch(reference) or 1)
    latencies: dict[str, LatencyStats] = {}
    for role, runner in (("reference", reference), ("candidate", candidate)):
        one = [np.repeat(x[:1], size, axis=0) for x in inputs_for(runner, data)]
        latencies[role] = measure_latency(
            runner, one, runs=latency_runs, threads=threads, progress=progress, label=f"timing: {role}"
        )
    return ValidationResult(
        data=data.describe(),
        metrics=metrics,
        reference=_describe(reference, latencies["reference"]),
        candidate=_describe(candidate, latencies["candidate"]),
        limits=limits,
        failures=tuple(check_gates(metrics, limits)),
    )


def _describe(runner: ModelRunner, latency: LatencyStats) -> dict[str, Any]:
    return {
        "path": str(runner.path),
        "runtime": runner.runtime,
        "runtime_version": runner.runtime_version,
        "size_bytes": model_size_bytes(runner.path),
        "latency": latency.to_dict(),
    }
