"""The digits example's data and model: scikit-learn's ``load_digits`` (8x8
grey images, 10 classes, ships inside the package) and a small CNN that trains
in seconds on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DigitsSplit:
    """Train / calibration / test arrays, NHWC float32 in [0, 1], int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """1,797 digits shuffled with ``seed``: 1,200 train, 200 calibration, the rest test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return DigitsSplit(x[:1200], y[:1200], x[1200:1400], y[1200:1400], x[1400:], y[1400:])


def build_digits_cnn() -> Any:
    import tensorflow as tf

    return tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=(8, 8, 1), name="image"),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="digits_cnn",
    )


def train_digits_cnn(split: DigitsSplit, *, epochs: int = 12, seed: int = 0) -> Any:
    """Train the CNN (a few seconds on 2 cores); deterministic for a given seed."""
    import tensorflow as tf

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf.keras.utils.set_random_seed(seed)
    model = build_digits_cnn()
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(split.x_train, split.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def save_digits_model(out_dir: str | os.PathLike[str], *, epochs: int = 12, seed: int = 0) -> dict[str, Path]:
    """Train and save the model and its data; returns the paths.

    Writes ``digits.keras``, ``calib.npz`` (x, y) and ``eval.npz`` (x, y).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    model = train_digits_cnn(split, epochs=epochs, seed=seed)
    paths = {"model": out / "digits.keras", "calib": out / "calib.npz", "eval": out / "eval.npz"}
    model.save(paths["model"])
    np.savez(paths["calib"], x=split.x_calib, y=split.y_calib)
    np.savez(paths["eval"], x=split.x_test, y=split.y_test)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python examples/digits/model.py [FOLDER]``: train and write the three files the README's
    tour starts from (digits.keras, calib.npz, eval.npz) into FOLDER (default: here)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Train the digits CNN; write digits.keras, calib.npz, eval.npz.")
    parser.add_argument("folder", nargs="?", default=".", help="where to write them (default: the current folder)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    paths = save_digits_model(args.folder, epochs=args.epochs)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
