"""Golden vectors: a few inputs, the outputs the converted model gave for them
on the workstation, and the tolerance within which a device must reproduce them.

The converter writes them (``edgeship convert``), the bundle carries them and the
agent replays them as its self-test before it trusts a model. The file is an
``.npz`` read with ``allow_pickle=False``::

    meta            0-d unicode array: JSON {"format": 1, "inputs": [...names],
                    "outputs": [...names], "atol": float, "rtol": float}
    input_<i>       the input named ``inputs[i]``: float32 for a float input (in
                    the model's float domain, before any int8 quantization; the
                    runner quantizes), the input's own dtype for integer and
                    boolean inputs (token ids, category ids, masks)
    output_<i>      the output named ``outputs[i]`` as the converted model produced
                    it, dequantized to float32

Inputs and outputs are matched to the model's tensors by these names, never by
position: a TFLite file may keep its tensors in another order than the model it
was converted from.
"""

from __future__ import annotations

__all__ = ["GoldenVectors", "GoldenCheck", "GOLDEN_FORMAT", "check_against_signature", "compare_outputs"]

import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .atomicfile import atomic_write_bytes
from .errors import BadInputError, first_line

GOLDEN_FORMAT = 1


@dataclass(frozen=True)
class GoldenVectors:
    """Inputs, expected outputs and the tolerance of a model's self-test."""

    input_names: tuple[str, ...]
    inputs: tuple[np.ndarray, ...]
    output_names: tuple[str, ...]
    outputs: tuple[np.ndarray, ...]
    atol: float
    rtol: float = 0.0

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vectors atomically (temp file in the same folder, then rename)."""
        # Any: numpy's stub types savez's **kwds as its allow_pickle flag
        arrays: dict[str, Any] = {
            "meta": np.array(
                json.dumps(
                    {
                        "format": GOLDEN_FORMAT,
                        "inputs": list(self.input_names),
                        "outputs": list(self.output_names),
                        "atol": float(self.atol),
                        "rtol": float(self.rtol),
                    }
                )
            )
        }
        for i, array in enumerate(self.inputs):
            arrays[f"input_{i}"] = np.asarray(array)
        for i, array in enumerate(self.outputs):
            arrays[f"output_{i}"] = np.asarray(array, dtype=np.float32)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GoldenVectors:
        """Read a golden-vector file; a malformed one raises BadInputError."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its meta is not a JSON object")
                if meta.get("format") != GOLDEN_FORMAT:
                    raise BadInputError(
                        f"golden vectors {path}: unsupported format {meta.get('format')!r} "
                        f"(this edgeship reads format {GOLDEN_FORMAT})"
                    )
                input_names = tuple(str(n) for n in meta["inputs"])
                output_names = tuple(str(n) for n in meta["outputs"])
                inputs = tuple(npz[f"input_{i}"] for i in range(len(input_names)))
                outputs = tuple(npz[f"output_{i}"] for i in range(len(output_names)))
                return cls(
                    input_names=input_names,
                    inputs=inputs,
                    output_names=output_names,
                    outputs=outputs,
                    atol=float(meta["atol"]),
                    rtol=float(meta.get("rtol", 0.0)),
                )
        except BadInputError:
            raise
        except EOFError:  # an empty or cut-off file
            raise BadInputError(f"golden vectors {path} cannot be read: the file is empty or truncated") from None
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            raise BadInputError(f"golden vectors {path} cannot be read: {first_line(exc)}") from None


@dataclass(frozen=True)
class GoldenCheck:
    """The result of replaying golden vectors: pure data, decided by compare_outputs."""

    passed: bool
    max_abs_error: float
    atol: float
    rtol: float
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reason(self) -> str:
        if self.passed:
            return f"golden vectors match (max abs error {self.max_abs_error:.3g} <= atol {self.atol:.3g})"
        return "golden vectors do not match: " + "; ".join(self.failures)


def compare_outputs(golden: GoldenVectors, actual: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> GoldenCheck:
    """Compare a model's outputs with the golden ones, within atol + rtol*|expected|.

    NaN or Inf in an output is always a failure.
    """
    if isinstance(actual, Mapping):
        missing = [n for n in golden.output_names if n not in actual]
        if missing:
            return GoldenCheck(False, float("inf"), golden.atol, golden.rtol, (f"missing outputs {missing}",))
        actual_list = [np.asarray(actual[n]) for n in golden.output_names]
    else:
        actual_list = [np.asarray(a) for a in actual]
    if len(actual_list) != len(golden.outputs):
        return GoldenCheck(
            False, float("inf"), golden.atol, golden.rtol,
            (f"model has {len(actual_list)} outputs, golden vectors have {len(golden.outputs)}",),
        )
    failures: list[str] = []
    worst = 0.0
    for name, expected, got in zip(golden.output_names, golden.outputs, actual_list):
        got = got.astype(np.float32, copy=False)
        if got.shape != expected.shape:
            failures.append(f"output '{name}' has shape {list(got.shape)}, expected {list(expected.shape)}")
            worst = float("inf")
            continue
        if not np.all(np.isfinite(got)):
            failures.append(f"output '{name}' contains NaN or Inf")
            worst = float("inf")
            continue
        error = np.abs(got - expected)
        worst = max(worst, float(error.max(initial=0.0)))
        bound = golden.atol + golden.rtol * np.abs(expected)
        if np.any(error > bound):
            failures.append(
                f"output '{name}' differs by up to {float(error.max()):.4g} (tolerance atol={golden.atol:.4g}"
                f"{f', rtol={golden.rtol:.4g}' if golden.rtol else ''})"
            )
    return GoldenCheck(not failures, worst, golden.atol, golden.rtol, tuple(failures))


def check_against_signature(golden: GoldenVectors, signature: Mapping[str, Any]) -> None:
    """Refuse golden vectors whose tensors the model's signature does not have:
    each golden input and output must name a tensor of the signature (a single
    tensor on each side pairs whatever it is called), and an integer or boolean
    model input must get integer or boolean golden values (ids, not floats)."""
    from edgeship.agent.runtimes import TensorSpec, match_names

    try:
        inputs = [TensorSpec.from_dict(dict(t)) for t in signature.get("inputs", [])]
        outputs = [TensorSpec.from_dict(dict(t)) for t in signature.get("outputs", [])]
    except (KeyError, TypeError, ValueError):
        return  # a malformed signature is the manifest check's to refuse
    for role, specs, names in (("input", inputs, golden.input_names), ("output", outputs, golden.output_names)):
        if not specs:
            continue
        if len(specs) != len(names):
            raise BadInputError(f"golden vectors have {len(names)} {role}s, the model {len(specs)}")
        order = match_names(specs, list(names), role)
        if role == "input":
            for array, index in zip(golden.inputs, order):
                spec = specs[index]
                wants_ids = spec.dtype.startswith(("int", "uint", "bool")) and not spec.quantized
                if wants_ids and np.asarray(array).dtype.kind == "f":
                    raise BadInputError(
                        f"golden input for '{spec.name}' is {np.asarray(array).dtype}, the model takes {spec.dtype} ids"
                    )
