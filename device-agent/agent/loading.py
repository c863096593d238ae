"""Opening a slot's model for serving, and giving memory back after an update.

Shared by the daemon (the bundle to serve at start) and the update driver (the new
bundle in SELF_TEST, the old one again in ROLLING_BACK), so both open a model the same
way: the configured runtime preference narrowed by the bundle's manifest, the golden
input statistics for drift, and a warm-up so the first request pays no first-invoke cost.
"""

from __future__ import annotations

__all__ = ["load_bundle_model", "release_memory"]

import gc
from pathlib import Path

import numpy as np

from edgeship.ota.errors import EdgeshipError
from edgeship.ota.golden import GoldenVectors

from .config import AgentConfig
from .persistence import InstalledBundle
from .runtimes import open_model, tflite_runtime_order
from .serving import LoadedModel, warm_up


def load_bundle_model(
    config: AgentConfig,
    bundle: InstalledBundle,
    *,
    slots_dir: Path | None = None,
    warm: bool = True,
) -> LoadedModel:
    """Open a slot's model (under ``slots_dir``, default the config's) with the configured
    runtime preference, warmed; its serving version is the one the bundle was given."""
    slot = (slots_dir or config.slots_dir) / bundle.slot
    prefer = tflite_runtime_order(config.runtime_prefer, (bundle.runtime or {}).get("runtimes"))
    runner = open_model(
        slot / bundle.model_file, threads=config.threads, prefer=prefer or list(config.runtime_prefer)
    )
    model = LoadedModel(
        name=bundle.name, version=bundle.version, runner=runner, slot=bundle.slot,
        serving_version=bundle.serving_version,
    )
    golden = None
    if bundle.golden_file and (slot / bundle.golden_file).exists():
        try:
            golden = GoldenVectors.load(slot / bundle.golden_file)
        except EdgeshipError:
            golden = None
    if golden is not None and golden.inputs:
        x = np.asarray(golden.inputs[0], dtype=np.float32)
        model.golden_input_mean = float(x.mean())
        model.golden_input_std = float(x.std()) or None
    if warm:
        first = None
        if golden is not None:
            try:
                first = runner.ordered(
                    {n: np.asarray(a)[:1] for n, a in zip(golden.input_names, golden.inputs)}
                )
            except EdgeshipError:
                first = None
        try:
            warm_up(runner, first)
        except EdgeshipError:
            warm_up(runner)
    return model


def release_memory() -> bool:
    """After an update: collect the cycles it left (the old runner, golden arrays,
    parsed metadata) and hand glibc's free heap pages back to the kernel
    (``malloc_trim(0)``), so the idle agent does not keep the update's peak.
    Returns whether malloc_trim was available (glibc only)."""
    gc.collect()
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): gc.collect only
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
