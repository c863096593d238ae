"""The self-test a new bundle passes on this device before it may serve.

Three checks, in order: the bundle's golden vectors replayed within their tolerance
(or, without golden vectors, a finite output for a zero input); a benchmark of the new
model against the running one on the same input, held to ``[self_test]
max_latency_ratio`` (the gate itself is pure, in health.py); and the memory the new
model takes (resident set growth while it loads and runs), which the update compares
with the memory budget before activating it.
"""

from __future__ import annotations

__all__ = ["SelfTestResult", "measure_footprint", "rss_bytes", "run_self_test"]

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.ota.errors import EdgeshipError
from edgeship.ota.golden import GoldenVectors, compare_outputs

from .health import latency_gate
from .persistence import InstalledBundle
from .runtimes import match_names
from .serving import LoadedModel, warm_up, zero_inputs


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    reason: str
    new_ms: float | None = None
    running_ms: float | None = None


def run_self_test(
    model: LoadedModel,
    installed: InstalledBundle,
    slot_dir: Path,
    running: LoadedModel | None,
    *,
    runs: int,
    max_latency_ratio: float,
) -> SelfTestResult:
    """Replay the golden vectors within tolerance, check outputs are finite, and time
    the new model against ``running`` (the version serving now) on this device."""
    runner = model.runner
    reasons: list[str] = []
    sample: list[np.ndarray]
    if installed.golden_file:
        golden = GoldenVectors.load(slot_dir / installed.golden_file)
        if installed.golden_tolerance:
            golden = GoldenVectors(
                golden.input_names,
                golden.inputs,
                golden.output_names,
                golden.outputs,
                atol=installed.golden_tolerance.get("atol", golden.atol),
                rtol=installed.golden_tolerance.get("rtol", golden.rtol),
            )
        # by name: the file's tensor order need not be the order the golden vectors were written in
        try:
            feed = runner.ordered({n: np.asarray(x) for n, x in zip(golden.input_names, golden.inputs)})
            produced = match_names(runner.signature.outputs, list(golden.output_names), "output")
        except EdgeshipError as exc:
            return SelfTestResult(False, f"golden vectors do not fit the model: {exc.message}")
        outputs = runner.run(feed)
        check = compare_outputs(golden, {n: outputs[i] for n, i in zip(golden.output_names, produced)})
        if not check.passed:
            return SelfTestResult(False, check.reason)
        reasons.append(check.reason)
        sample = [np.asarray(x)[:1] for x in feed]
    else:
        sample = zero_inputs(runner.signature)
        outputs = runner.run(sample)
        if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
            return SelfTestResult(False, "model gives NaN/Inf outputs for a zero input (no golden vectors)")
        reasons.append("no golden vectors: load and finite-output check only")
    warm_up(runner, sample)
    new_ms = _time_runs(lambda: runner.run(sample), runs)
    running_ms = None
    same_shapes = running is not None and [i.shape for i in running.runner.signature.inputs] == [
        i.shape for i in runner.signature.inputs
    ]
    if running is not None and same_shapes:
        try:
            running_ms = _time_runs(lambda: running.runner.run(sample), runs)
        except Exception:  # noqa: BLE001 - the running model cannot take the sample: no comparison
            running_ms = None
    ok, text = latency_gate(new_ms, running_ms, max_latency_ratio)
    reasons.append(text)
    return SelfTestResult(ok, "; ".join(reasons), new_ms, running_ms)


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()


def measure_footprint(load: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``load`` (open a model and self-test it) and return its result with the growth
    of the resident set it caused, in bytes (None where the OS does not say).

    An upper-bound estimate on purpose: what the new version costs while it and the
    running one are both loaded, allocator slack included, which is what the memory
    budget must hold during probation."""
    before = rss_bytes()
    result = load()
    after = rss_bytes()
    if before is None or after is None:
        return result, None
    return result, max(0, after - before)


def _time_runs(func: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))
