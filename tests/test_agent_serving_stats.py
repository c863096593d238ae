"""Per-model request statistics (``ModelStats``) and the runner's fast path.

The statistics are folded in batches from compact buffers (the request path only
appends); these tests hold every fold path to a plain per-request reference:
counts, latency histogram, NaN/Inf requests, class histogram, examples, and the
sampled input statistics. The runner's fast path (one input, one output, checks
left to the interpreter's own ``set_tensor``) is held to the general path.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.agent.runtimes import open_model
from edgeship.agent.serving import LoadedModel, ModelStats, ServingModel
from edgeship.ota.errors import BadInputError
from edgeship.ota.telemetry import LATENCY_BUCKETS_MS

RNG = np.random.default_rng(7)


def _reference(latencies_ms: list[float], outputs: list[Any]) -> dict[str, Any]:
    """What the counters must hold, computed request by request."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for ms in latencies_ms:
        counts[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
    arrays = [o for o in outputs if isinstance(o, np.ndarray) and o.ndim]
    classes: dict[int, int] = {}
    nonfinite = 0
    for o in arrays:
        if not len(o):
            continue
        if o.dtype.kind == "f":
            finite_rows = np.isfinite(o.reshape(len(o), -1)).all(axis=1)
            nonfinite += int(not finite_rows.all())
        else:
            finite_rows = np.ones(len(o), dtype=bool)
        if o.ndim == 2 and o.shape[1] > 1:  # class histogram: argmax of each finite row
            for row in o[finite_rows]:
                c = int(np.argmax(row))
                classes[c] = classes.get(c, 0) + 1
    return {
        "requests": len(latencies_ms),
        "examples": sum(len(o) for o in arrays),
        "nonfinite": nonfinite,
        "classes": classes,
        "counts": counts,
        "total_ms": sum(latencies_ms),
    }


def _batch(rows: int, width: int = 10, bad: str | None = None, order: str = "C") -> np.ndarray:
    """Random scores; ``bad``: NaN or Inf in every row (one row: "nan1")."""
    y = np.asarray(RNG.random((rows, width)), dtype=np.float32, order=order)
    if bad and rows:
        value = np.inf if bad == "inf" else np.nan
        for r in [int(RNG.integers(rows))] if bad == "nan1" else range(rows):
            y[r, RNG.integers(width)] = value
    return y


def _cases() -> dict[str, tuple[bool, list[Any]]]:
    """name -> (fixed row shape, the outputs of the requests)."""
    # neighbouring bad requests and bad batches: a NaN request counts once, each its own
    batch1 = [_batch(1, bad="nan" if i % 97 in (5, 6) else ("inf" if i % 131 == 7 else None)) for i in range(3000)]
    mixed = [_batch(int(RNG.integers(0, 5)), bad=("nan", "nan1", None)[i % 3] if i % 13 < 2 else None) for i in range(700)]
    dynamic = [_batch(1, width=int(RNG.integers(2, 6)), bad="nan" if i % 11 == 0 else None) for i in range(300)]
    odd = [None, np.float32(1.0), _batch(2), np.zeros((0, 10), np.float32), _batch(1, bad="inf"), _batch(3)]
    strided = [_batch(4)[::2] for _ in range(50)] + [_batch(2, order="F") for _ in range(50)] + [_batch(1)] * 50
    views = [_batch(1)] + [_batch(1, width=20, bad="nan" if i % 9 == 0 else None)[:, ::2] for i in range(300)]
    vectors = [RNG.random(10).astype(np.float32) for _ in range(200)]  # outputs without a batch dimension
    ints = [RNG.integers(-128, 127, (1, 10)).astype(np.int8) for _ in range(500)]
    return {
        "batch 1, fixed shape": (True, batch1),
        "mixed batch sizes": (True, mixed),
        "mixed batch sizes, not fixed": (False, mixed),
        "dynamic width": (False, dynamic),
        "None, 0-d, empty": (True, odd),
        "non-contiguous and Fortran order": (True, strided),
        "strided views of the learned size": (True, views),
        "1-d outputs": (True, vectors),
        "int8 outputs": (True, ints),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_folded_counters_equal_a_per_request_reference(name: str) -> None:
    fixed, outputs = _cases()[name]
    stats = ModelStats(fixed_row_shape=fixed)
    latencies = [float(v) for v in RNG.lognormal(0.0, 1.5, len(outputs))]
    for i, (ms, y) in enumerate(zip(latencies, outputs)):
        stats.observe(ms, [np.zeros((1, 4), np.float32)], [y] if y is not None else [])
        if i % 389 == 0:
            stats.snapshot()  # folds at arbitrary points must not lose or double anything
    snap = stats.snapshot()
    want = _reference(latencies, outputs)
    assert snap["requests"] == want["requests"]
    assert snap["examples"] == want["examples"]
    assert snap["nonfinite"] == want["nonfinite"]
    assert snap["classes"] == want["classes"]
    assert snap["latency"].counts == want["counts"]
    assert snap["latency"].total_ms == pytest.approx(want["total_ms"])
    assert not stats._outputs and not len(stats._latencies)


def test_outputs_are_held_only_until_the_fold() -> None:
    """The request path keeps a reference to each output (no copy); the fold drops
    them, so a served output is not kept alive by the statistics afterwards."""
    stats = ModelStats(fixed_row_shape=True)
    stats.observe(1.0, [], [_batch(1)])  # the first request folds at once: it learns the output size
    y = _batch(1)
    ref = weakref.ref(y)
    stats.observe(1.0, [], [y])
    del y
    assert ref() is not None  # held for the fold
    stats.snapshot()
    assert ref() is None and not stats._outputs


def test_the_fold_batch_shrinks_for_large_outputs() -> None:
    """At most 8 MB of outputs are held between folds: a model with 1 MB outputs
    folds every 8 requests, one with small outputs every 4,096."""
    stats = ModelStats(fixed_row_shape=True)
    stats.observe(1.0, [], [np.zeros((1, 1 << 18), np.float32)])  # 1 MiB
    stats.snapshot()
    assert stats._flush_at == 8
    small = ModelStats(fixed_row_shape=True)
    small.observe(1.0, [], [_batch(1)])
    small.snapshot()
    assert small._flush_at == 4096


def test_input_statistics_are_per_example_means_of_the_sampled_requests() -> None:
    stats = ModelStats()
    x = np.arange(24, dtype=np.float32).reshape(3, 8)  # row means 3.5, 11.5, 19.5
    stats.observe(1.0, [x], [_batch(3)])  # the first request is always sampled
    snap = stats.snapshot()
    assert snap["input_count"] == 3
    assert snap["input_sum"] == pytest.approx(3.5 + 11.5 + 19.5)
    stats._next_sample = stats._next_input = 0
    stats.observe(1.0, [np.full((2, 4000), 60000.0, dtype=np.float16)], [_batch(2)])  # no float16 overflow
    stats._next_sample = stats._next_input = 0
    stats.observe(1.0, [np.array(["a", "b"])], [_batch(2)])  # not numeric: no input statistics
    snap = stats.snapshot()
    assert snap["input_count"] == 5
    assert snap["input_sum"] == pytest.approx(3.5 + 11.5 + 19.5 + 2 * 60000.0)


def test_input_statistics_are_sampled_under_load_and_counts_stay_exact() -> None:
    stats = ModelStats()
    x = np.ones((1, 64), np.float32)
    for _ in range(20000):  # far more than 100 requests in 10 ms
        stats.observe(0.01, [x], [_batch(1)])
    snap = stats.snapshot()
    assert snap["requests"] == 20000 and snap["examples"] == 20000
    assert sum(snap["classes"].values()) == 20000
    assert 1 <= snap["input_count"] < 20000
    assert snap["input_sum"] / snap["input_count"] == pytest.approx(1.0)


def test_concurrent_predicts_swaps_and_snapshots_lose_nothing(digits_tflite: Path) -> None:
    """Threads predicting while the model is swapped and snapshots fold: every
    request is counted once on the model that served it, none fails."""
    models = [LoadedModel("digits", str(v), open_model(digits_tflite, threads=1)) for v in range(3)]
    serving = ServingModel()
    serving.swap(models[0])
    x = RNG.random((1, 8, 8, 1)).astype(np.float32)
    per_thread, threads_n = 1500, 4
    failures: list[BaseException] = []
    done = threading.Event()

    def client() -> None:
        try:
            for i in range(per_thread):
                batch = x if i % 50 else np.repeat(x, 3, axis=0)  # some batches of 3 resize
                _, (y,) = serving.predict([batch])
                assert y.shape == (len(batch), 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def churn() -> None:
        i = 0
        while not done.wait(0.001):
            serving.swap(models[i % 3])
            models[(i + 1) % 3].stats.snapshot()
            i += 1

    clients = [threading.Thread(target=client) for _ in range(threads_n)]
    churner = threading.Thread(target=churn)
    churner.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    churner.join()
    assert not failures, failures[:3]
    snaps = [m.stats.snapshot() for m in models]
    total = per_thread * threads_n
    assert sum(s["requests"] for s in snaps) == total
    assert sum(s["latency"].count for s in snaps) == total
    assert sum(s["examples"] for s in snaps) == total + 2 * sum(1 for i in range(per_thread) if i % 50 == 0) * threads_n
    assert sum(sum(s["classes"].values()) for s in snaps) == sum(s["examples"] for s in snaps)
    assert all(not s["errors"] for s in snaps)


def test_fast_path_equals_the_general_path(digits_tflite: Path, digits_int8_tflite: Path, digits_files: dict[str, Path]) -> None:
    """Float input, int8 I/O, float64 input, a new batch size and back, non-contiguous
    input: the fast path gives what the general path gives."""
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    for model in (digits_tflite, digits_int8_tflite):
        with open_model(model, prefer=["litert"]) as runner:
            general = runner._run_general
            for inputs in (
                x[:1],
                x[:1].astype(np.float64),  # another dtype: converted on the general path
                x,  # batch 8 resizes
                x[3:4],  # and back to 1
                np.asfortranarray(x[:2]),
                x[::2],  # a strided view
                x[:1].tolist(),  # not an array
            ):
                (fast,) = runner.run([inputs])
                (slow,) = general([np.asarray(inputs, dtype=np.float32)])
                assert fast.dtype == np.float32
                np.testing.assert_array_equal(fast, slow)
            if runner.signature.inputs[0].quantized:  # the caller's own int8 values pass through as they are
                q = np.full((1, 8, 8, 1), 5, np.int8)
                (native,) = runner.run([q])
                np.testing.assert_array_equal(native, general([q])[0])
                assert native.dtype == np.float32


def test_the_inline_predict_path_equals_the_runner_and_counts_everything(
    digits_tflite: Path, digits_int8_tflite: Path, digits_files: dict[str, Path]
) -> None:
    """``ServingModel.predict`` runs a float model's interpreter calls itself
    (``LoadedModel.hot``); an int8 I/O model goes through ``run``. Either way the
    answers are the runner's and every request is counted once, including the
    ones the inline path hands to ``run`` (another dtype, batch size, a list)."""
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    inputs = [x[:1], x[:1].astype(np.float64), x, x[3:4], np.asfortranarray(x[:2]), x[::2], x[:1].tolist()]
    for path, inline in ((digits_tflite, True), (digits_int8_tflite, False)):
        with open_model(path, prefer=["litert"]) as reference:
            serving = ServingModel()
            serving.swap(LoadedModel("digits", "1", open_model(path, prefer=["litert"])))
            assert (serving.current.hot is not None) is inline  # type: ignore[union-attr]
            for batch in inputs:
                _, (y,) = serving.predict([batch])
                np.testing.assert_array_equal(y, reference.run([np.asarray(batch, np.float32)])[0])
            with pytest.raises(BadInputError, match="has shape"):
                serving.predict([np.zeros((1, 7, 8, 1), np.float32)])
            snap = serving.current.stats.snapshot()  # type: ignore[union-attr]
            assert snap["requests"] == len(inputs) + 1 and snap["latency"].count == len(inputs)
            assert snap["examples"] == sum(len(b) for b in inputs)
            assert snap["errors"] == {"bad_request": 1}


def test_a_failing_invoke_on_the_inline_path_is_a_runtime_error_and_releases_the_lock(
    digits_tflite: Path,
) -> None:
    serving = ServingModel()
    model = LoadedModel("digits", "1", open_model(digits_tflite, prefer=["litert"]))
    calls = model.runner.hot_calls()
    assert calls is not None

    def broken() -> None:
        raise RuntimeError("delegate failed")

    model.hot = (model.stats, *calls._replace(invoke=broken), model.stats._latencies.append,
                 model.stats._outputs.extend)
    serving.swap(model)
    with pytest.raises(RuntimeError, match="delegate failed"):
        serving.predict([np.zeros((1, 8, 8, 1), np.float32)])
    assert model.stats.snapshot()["errors"] == {"runtime": 1}
    (y,) = model.runner.run([np.zeros((1, 8, 8, 1), np.float32)])  # the lock was released
    assert y.shape == (1, 10)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([np.zeros((1, 7, 8, 1), np.float32)], "has shape"),
        ([np.zeros((1, 8, 8), np.float32)], "has shape"),
        ([np.zeros((1, 8, 8, 1), np.float32)] * 2, "model takes 1 inputs"),
        ([], "model takes 1 inputs"),
    ],
)
def test_bad_inputs_get_one_line_and_are_counted(digits_tflite: Path, inputs: list[np.ndarray], message: str) -> None:
    serving = ServingModel()
    serving.swap(LoadedModel("digits", "1", open_model(digits_tflite)))
    with pytest.raises(BadInputError, match=message) as info:
        serving.predict(inputs)
    assert "\n" not in str(info.value)
    snap = serving.current.stats.snapshot()  # type: ignore[union-attr]
    assert snap["errors"] == {"bad_request": 1} and snap["requests"] == 1
    serving.predict([np.zeros((1, 8, 8, 1), np.float32)])  # and the model still serves


def test_a_large_batch_runs_in_slices_with_the_same_answer(digits_tflite: Path, digits_files: dict[str, Path]) -> None:
    from edgeship.agent.serving import INVOKE_ROWS, run_in_slices

    x = np.load(digits_files["eval"])["x"][: INVOKE_ROWS * 3 + 5].astype(np.float32)
    with open_model(digits_tflite) as whole, open_model(digits_tflite) as sliced:
        (expected,) = whole.run([x])
        shapes: list[int] = []

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            shapes.append(len(inputs[0]))
            return sliced.run(inputs)

        (got,) = run_in_slices(run, [x])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert shapes == [INVOKE_ROWS] * 3 + [5]
