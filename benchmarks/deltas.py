"""Delta sizes, build and apply times, and the device's memory while applying (section ``deltas`` of
docs/benchmarks.md).

Cases, each a pair of bundles (old -> new) built from real models:

- digits CNN (trained on scikit-learn's digits), fine-tuned one more epoch: fp32 and int8 TFLite, and
  ONNX (tf2onnx, fp32 initializers);
- MobileNetV2 (96x96, random weights, 10 classes), head retrained: only the last Dense layer moves;
- MobileNetV2 fine-tuned: a few SGD steps on every layer (every weight moves a little), fp32 and int8.

For each: the delta (tensor-aware, and the plain binary delta zstd makes with the old bundle as
dictionary, in the same run), bsdiff4's delta of the same pair (the classic binary diff, measured to
decide whether a bsdiff binding earns a place on the device: size and build time), the zstd-compressed full bundle (the baseline a delta must beat), the
time to build and to apply, the apply's peak RSS in a child process against the same child's RSS
before applying, and the time the full compressed bundle takes over a 1 MB/s link.

    .venv/bin/python benchmarks/deltas.py [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples" / "digits"))

import bsdiff4
import numpy as np
from results_doc import write_section

from edgeship.ota.bundle_build import build_bundle
from edgeship.toolkit.deltas import DEFAULT_LEVEL, build_delta

LINK_BYTES_PER_S = 1_000_000

# VmHWM (this process's peak resident set since exec), in kB: ru_maxrss would carry the parent's
# peak across fork and exec on Linux.
APPLY_CHILD = r"""
import sys, time
from edgeship.ota.delta import apply_delta
import zstandard, numpy
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
before = status("VmHWM")
t = time.perf_counter()
apply_delta(sys.argv[1], sys.argv[2], sys.argv[3])
elapsed = time.perf_counter() - t
print(before, status("VmHWM"), elapsed)
"""


def tflite(model: Any, path: Path, calib: np.ndarray, int8: bool) -> Path:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(min(len(calib), 64)))
    path.write_bytes(converter.convert())
    return path


def onnx(model: Any, path: Path, calib: np.ndarray) -> Path:
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, *calib.shape[1:]), tf.float32, name="input")]
    forward = tf.function(lambda batch: model(batch, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=13)
    path.write_bytes(proto.SerializeToString())
    return path


def copy_model(model: Any) -> Any:
    import tensorflow as tf

    twin = tf.keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def set_batchnorm_statistics(model: Any, x: np.ndarray) -> None:
    """Set every BatchNorm layer's moving statistics to those of the batch ``x``. With random weights
    and the initial statistics the features reaching a classifier's head are all zero, and
    "retraining the head" would move only its bias."""
    import tensorflow as tf

    norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)  # moving statistics := this batch's
    for layer in norms:
        layer.momentum = 0.99


def cases(folder: Path) -> list[tuple[str, Any, Any, np.ndarray, str]]:
    import tensorflow as tf
    from model import load_digits_split, train_digits_cnn

    split = load_digits_split()
    digits = train_digits_cnn(split, epochs=6)
    tuned = copy_model(digits)
    tuned.compile(optimizer=tf.keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    tuned.fit(split.x_train, split.y_train, epochs=1, verbose=0)
    x_digits = split.x_train[:64].astype(np.float32)

    tf.keras.utils.set_random_seed(0)
    mobile = tf.keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10)
    rng = np.random.default_rng(0)
    x = rng.random((64, 96, 96, 3), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    set_batchnorm_statistics(mobile, x)
    head = copy_model(mobile)
    for layer in head.layers[:-1]:
        layer.trainable = False
    head.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    head.fit(x, y, epochs=2, batch_size=16, verbose=0)
    moved = np.mean(mobile.layers[-1].get_weights()[0] != head.layers[-1].get_weights()[0])
    assert moved > 0.5, f"the retrained head's kernel barely moved ({moved:.1%} of its weights)"
    print(f"head retrain moved {moved:.1%} of the head's kernel", file=sys.stderr)
    fine = copy_model(mobile)
    fine.compile(optimizer=tf.keras.optimizers.SGD(1e-3), loss="sparse_categorical_crossentropy")
    fine.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return [
        ("digits CNN, fine-tuned (fp32)", digits, tuned, x_digits, "fp32"),
        ("digits CNN, fine-tuned (int8)", digits, tuned, x_digits, "int8"),
        ("digits CNN, fine-tuned (ONNX fp32)", digits, tuned, x_digits, "onnx"),
        ("MobileNetV2 96px, head retrained (fp32)", mobile, head, x, "fp32"),
        ("MobileNetV2 96px, head retrained (int8)", mobile, head, x, "int8"),
        ("MobileNetV2 96px, every layer fine-tuned (fp32)", mobile, fine, x, "fp32"),
        ("MobileNetV2 96px, every layer fine-tuned (int8)", mobile, fine, x, "int8"),
    ]


def measure(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for i, (label, old_model, new_model, calib, kind) in enumerate(cases(folder)):
        bundles = []
        for tag, model in (("old", old_model), ("new", new_model)):
            if kind == "onnx":
                model_file = onnx(model, folder / f"{i}-{tag}.onnx", calib)
            else:
                model_file = tflite(model, folder / f"{i}-{tag}.tflite", calib, kind == "int8")
            out = folder / f"{i}-{tag}.bundle"
            build_bundle(model_file, name="model", version="1.0.0" if tag == "old" else "1.1.0", out=out)
            bundles.append(out)
        old, new = bundles[0].read_bytes(), bundles[1].read_bytes()
        built = build_delta(old, new)
        row: dict[str, Any] = {"case": label, **built.sizes, "method": built.method, "build_s": built.seconds}
        started = time.perf_counter()
        patch = bsdiff4.diff(old, new)
        row.update(bsdiff=len(patch), bsdiff_s=time.perf_counter() - started)
        assert bsdiff4.patch(old, patch) == new, label
        if built.data is not None:
            delta = folder / f"{i}.delta"
            delta.write_bytes(built.data)
            result = subprocess.run([sys.executable, "-c", APPLY_CHILD, str(delta), str(bundles[0]),
                                     str(folder / f"{i}-rebuilt.bundle")], capture_output=True, text=True, check=True)
            before, after, elapsed = result.stdout.split()
            assert (folder / f"{i}-rebuilt.bundle").read_bytes() == new, label
            row.update(apply_s=float(elapsed), rss_before_mb=int(before) / 1024, rss_peak_mb=int(after) / 1024)
        rows.append(row)
        print(f"{label}: {row}", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Run: `.venv/bin/python benchmarks/deltas.py --write` on {platform.machine()}, 2 cores (shared), Python "
        f"{platform.python_version()}, zstd level {DEFAULT_LEVEL}. Bundles of TFLite and ONNX models; each delta rebuilt "
        "bit for bit in a child process (checked). Baseline: the new bundle compressed with zstd at the same level; "
        "the plain binary delta is zstd with the old bundle as dictionary (`--patch-from`); bsdiff: bsdiff4's "
        "patch of the same pair (bzip2 inside), build time in brackets; all in the same run.",
        "",
        "| case | bundle | zstd full | plain binary delta | bsdiff | tensor delta | sent / zstd full | build | apply "
        "| full over 1 MB/s | apply peak RSS (child before) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sent = r["delta"] / r["full_zstd"]
        apply = f"{r['apply_s'] * 1000:.0f} ms" if "apply_s" in r else "-"
        rss = f"{r['rss_peak_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB)" if "rss_peak_mb" in r else "-"
        lines.append(f"| {r['case']} | {r['full'] / 1e6:.2f} MB | {r['full_zstd'] / 1e6:.2f} MB | "
                     f"{r['binary'] / 1e3:.1f} kB | {r['bsdiff'] / 1e3:.1f} kB ({r['bsdiff_s']:.1f} s) | "
                     f"{r['tensor'] / 1e3:.1f} kB | **{sent:.3f}** ({r['method']}) | "
                     f"{r['build_s']:.2f} s | {apply} | {r['full_zstd'] / LINK_BYTES_PER_S:.1f} s | {rss} |")
    lines += ["", "Targets: head-only retrain at most 0.05 of the zstd full bundle; fp32 fine-tune at most 0.7; int8 "
              "fine-tune at most 0.3; applying faster than the full bundle would download at 1 MB/s. The apply holds "
              "the base's non-tensor bytes and one tensor at a time (docs/deltas.md): its peak over the child's "
              "starting RSS is about the largest tensor, not the model; the binary method (chosen where it is smaller) holds "
              "the whole base as its dictionary: one model, never two. The head-retrain cases set BatchNorm's statistics "
              "from one batch first, so the retrained head's every weight moves (checked), not only its bias."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(Path(folder))
    text = markdown(rows)
    print(text)
    if args.write:
        write_section("deltas", text)


if __name__ == "__main__":
    main()
