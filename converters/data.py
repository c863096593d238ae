"""DATA for calibration and validation: an ``.npz`` (one array per model input,
named after the input, ``x`` for a single-input model; optional labels ``y``), an
``.npy`` (a single-input model), or a folder of images read with a preprocessing
spec. Arrays keep the dtype the model's input takes: float inputs get float32
(through the preprocessing spec), integer and boolean inputs (token ids,
category ids, masks) get exactly their dtype, checked to fit.

The preprocessing spec is the contract between the data the engineer has and
the tensor the model takes; it travels on with the converted model (the report,
then the bundle manifest), so a device feeds its camera frames the same way.
Everything here is checked against the model's input before any conversion
starts, and a problem is one line that names the file, what was found and what
was expected.
"""

from __future__ import annotations

__all__ = [
    "IMAGE_SUFFIXES",
    "Dataset",
    "PreprocessingSpec",
    "check_against_input",
    "input_name",
    "load_dataset",
    "parse_preprocessing",
    "specs_from_shapes",
    "split_holdback",
]

import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.runtimes import TensorSpec, tensor_aliases
from edgeship.ota.errors import BadInputError, require_module

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_LAYOUTS = ("NHWC", "NCHW")
_COLORS = ("rgb", "grayscale")


@dataclass(frozen=True)
class PreprocessingSpec:
    """How raw data becomes the model's float input: ``(pixel * scale - mean) / std``.

    Attributes:
        size: (height, width) images are resized to; None: the model's input size.
        scale: multiplies raw values first (1/255 for 8-bit images).
        mean: subtracted per channel after scaling (one value, or one per channel).
        std: divides per channel after the mean.
        layout: "NHWC" (TFLite, Keras) or "NCHW" (PyTorch exports).
        color: "rgb" or "grayscale" (how image files are decoded).
    """

    size: tuple[int, int] | None = None
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NHWC"
    color: str = "rgb"

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise BadInputError(f"preprocessing layout {self.layout!r} is not one of {list(_LAYOUTS)}")
        if self.color not in _COLORS:
            raise BadInputError(f"preprocessing color {self.color!r} is not one of {list(_COLORS)}")
        if any(s == 0 for s in self.std):
            raise BadInputError("preprocessing std must not be 0")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BadInputError(f"preprocessing size {self.size!r} must be two positive integers (height, width)")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size) if self.size else None,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "color": self.color,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingSpec:
        unknown = set(data) - {"size", "scale", "mean", "std", "layout", "color"}
        if unknown:
            raise BadInputError(f"preprocessing spec has unknown keys {sorted(unknown)}")
        try:
            size = data.get("size")
            return cls(
                size=(int(size[0]), int(size[1])) if size else None,
                scale=float(data.get("scale", 1.0)),
                mean=tuple(float(v) for v in _as_list(data.get("mean", [0.0]))),
                std=tuple(float(v) for v in _as_list(data.get("std", [1.0]))),
                layout=str(data.get("layout", "NHWC")).upper(),
                color=str(data.get("color", "rgb")).lower(),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise BadInputError(f"preprocessing spec {data!r} is malformed: {exc}") from None

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Scale, normalize per channel (the channel axis of ``layout``), cast to float32."""
        x = values.astype(np.float32) * np.float32(self.scale)
        if self.is_identity:
            return x
        channel_axis = -1 if self.layout == "NHWC" else 1
        shape = [1] * x.ndim
        if x.ndim >= 2:
            shape[channel_axis] = -1
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        channels = int(x.shape[channel_axis]) if x.ndim >= 2 else 1
        for name, per_channel in (("mean", mean), ("std", std)):
            if per_channel.size > 1 and per_channel.size != channels:  # never broadcast into another channel count
                raise BadInputError(
                    f"preprocessing {name} has {per_channel.size} values, but the data has {channels} "
                    f"channel{'s' if channels != 1 else ''} on the {self.layout} channel axis (give one value, or one per channel)"
                )
        mean = mean.reshape(shape) if mean.size > 1 else mean
        std = std.reshape(shape) if std.size > 1 else std
        return ((x - mean) / std).astype(np.float32)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_preprocessing(text: str | None) -> PreprocessingSpec | None:
    """A spec from a JSON file path, a JSON object, or ``key=value`` pairs.

    ``size=224x224,scale=1/255,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW``
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return PreprocessingSpec.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise BadInputError(f"preprocessing spec is not valid JSON: {exc}") from None
    if os.path.isfile(text):
        try:
            return PreprocessingSpec.from_dict(json.loads(Path(text).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(f"preprocessing spec {text} cannot be read: {exc}") from None
    if text.lower().endswith(".json"):
        raise BadInputError(f"preprocessing spec file {text}: no such file")
    data: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"preprocessing spec item {item!r} is not key=value (e.g. size=224x224,scale=1/255)")
        key = key.strip().lower()
        try:
            if key == "size":
                h, _, w = value.lower().partition("x")
                data["size"] = [int(h), int(w or h)]
            elif key in ("scale",):
                data["scale"] = _number(value)
            elif key in ("mean", "std"):
                data[key] = [_number(v) for v in value.split(":")]
            else:
                data[key] = value
        except ValueError:
            raise BadInputError(f"preprocessing spec item {item!r} has a malformed value") from None
    return PreprocessingSpec.from_dict(data)


def _number(text: str) -> float:
    text = text.strip()
    if re.fullmatch(r"[0-9.eE+-]+/[0-9.eE+-]+", text):
        a, b = text.split("/")
        if float(b) == 0:
            raise ValueError(f"{text} divides by zero")
        return float(a) / float(b)
    return float(text)


@dataclass(frozen=True)
class Dataset:
    """Model inputs (one array per model input, in the model's dtype), their
    input names, optional labels."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None
    source: str
    preprocessing: PreprocessingSpec | None = None
    class_names: tuple[str, ...] = field(default_factory=tuple)
    names: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0

    def take(self, indices: np.ndarray | slice) -> Dataset:
        return replace(
            self,
            inputs=tuple(x[indices] for x in self.inputs),
            labels=None if self.labels is None else self.labels[indices],
        )

    def by_name(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.inputs))

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": len(self),
            "labels": self.labels is not None,
            "inputs": list(self.names),
            "shapes": [list(x.shape) for x in self.inputs],
            "dtypes": [x.dtype.name for x in self.inputs],
        }


def specs_from_shapes(input_shapes: Sequence[Sequence[int]]) -> list[TensorSpec]:
    """Float inputs named ``x`` (one) or ``input_<i>`` for callers that know only shapes."""
    if len(input_shapes) == 1:
        return [TensorSpec("x", tuple(input_shapes[0]), "float32")]
    return [TensorSpec(f"input_{i}", tuple(shape), "float32") for i, shape in enumerate(input_shapes)]


def input_name(spec: TensorSpec) -> str:
    """The name a user knows an input by (``image``, not ``serving_default_image:0``)."""
    return tensor_aliases(spec)[-1]


def load_dataset(
    path: str | os.PathLike[str],
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_specs: Sequence[TensorSpec] | None = None,
    preprocessing: PreprocessingSpec | None = None,
    role: str = "data",
) -> Dataset:
    """Load DATA for a model whose inputs are ``input_specs`` (or, float inputs
    only, ``input_shapes``: batch first, -1 dynamic).

    Raises:
        BadInputError: missing/unreadable file, no array for an input, wrong shape or dtype.
    """
    specs = list(input_specs) if input_specs is not None else specs_from_shapes(input_shapes or [])
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{role} {p}: no such file or folder")
    if p.is_dir():
        dataset = _load_image_folder(p, [s.shape for s in specs], preprocessing, role)
    elif p.suffix == ".npz":
        dataset = _load_npz(p, specs, preprocessing, role)
    elif p.suffix == ".npy":
        dataset = _load_npy(p, specs, preprocessing, role)
    else:
        raise BadInputError(
            f"{role} {p}: unknown data format (expected an .npz with one array per input, an .npy, or a folder of images)"
        )
    dataset = replace(dataset, names=tuple(input_name(s) for s in specs))
    check_against_input(dataset, specs, role)
    return dataset


def _load_npz(p: Path, specs: Sequence[TensorSpec], spec: PreprocessingSpec | None, role: str) -> Dataset:
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{role} {p} cannot be read as .npz: {exc}") from None
    found = ", ".join(sorted(arrays)) or "nothing"
    xs = []
    for tensor in specs:
        aliases = tensor_aliases(tensor)
        key = next((a for a in aliases if a in arrays), None)
        if key is None and len(specs) == 1 and "x" in arrays:
            key = "x"
        if key is None:
            wanted = " or ".join(f"'{a}'" for a in dict.fromkeys((aliases[-1], "x"))) if len(specs) == 1 else f"'{aliases[-1]}'"
            raise BadInputError(
                f"{role} file {p} has no array {wanted} for the model's input '{aliases[-1]}' (found: {found}); "
                "store one array per model input, named after it"
            )
        xs.append(_to_model_dtype(arrays[key], tensor, spec, p, role))
    labels = arrays.get("y")
    if labels is not None:
        labels = _labels(labels, len(xs[0]), p, role)
    return Dataset(tuple(xs), labels, str(p), spec)


def _load_npy(p: Path, specs: Sequence[TensorSpec], spec: PreprocessingSpec | None, role: str) -> Dataset:
    if len(specs) != 1:
        raise BadInputError(
            f"{role} {p}: an .npy holds one array, the model takes {len(specs)} inputs "
            f"({', '.join(input_name(s) for s in specs)}); give an .npz with one array per input"
        )
    try:
        x = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BadInputError(f"{role} {p} cannot be read as .npy: {exc}") from None
    return Dataset((_to_model_dtype(x, specs[0], spec, p, role),), None, str(p), spec)


def _to_model_dtype(x: np.ndarray, tensor: TensorSpec, spec: PreprocessingSpec | None, p: Path, role: str) -> np.ndarray:
    """The array in the dtype the model's input takes, or a one-line refusal."""
    name = input_name(tensor)
    if x.ndim == 0:
        raise BadInputError(f"{role} {p}: the array for '{name}' is a single number; it needs a sample axis (shape [N, ...])")
    want: np.dtype[Any] = np.dtype(tensor.dtype) if tensor.dtype in _NUMPY_DTYPES else np.dtype(np.float32)
    if want.kind == "f" or tensor.quantized:
        return _to_float(x, spec, p, role)
    if want.kind == "b":
        if x.dtype.kind == "b":
            return x
        if x.dtype.kind in "iuf" and np.all((x == 0) | (x == 1)):
            return x.astype(bool)
        raise BadInputError(f"{role} {p}: input '{name}' is boolean; its array has dtype {x.dtype} with values other than 0 and 1")
    # integer inputs: ids, never scaled or normalized
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
            raise BadInputError(
                f"{role} {p}: input '{name}' takes {want.name} (ids); its array holds non-integer floats"
            )
    elif x.dtype.kind not in "iub":
        raise BadInputError(f"{role} {p}: input '{name}' takes {want.name}; its array has dtype {x.dtype}")
    info = np.iinfo(want)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise BadInputError(
            f"{role} {p}: input '{name}' takes {want.name}; its array holds values from {x.min()} to {x.max()}, out of range"
        )
    return x.astype(want)


_NUMPY_DTYPES = {"float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool"}


def _to_float(x: np.ndarray, spec: PreprocessingSpec | None, p: Path, role: str) -> np.ndarray:
    if x.ndim == 0:
        raise BadInputError(f"{role} {p}: the array is a single number; it needs a sample axis (shape [N, ...])")
    if x.dtype.kind == "f":
        return spec.apply(x) if spec else x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu" and spec is not None:
        return spec.apply(x)
    raise BadInputError(
        f"{role} {p}: array has dtype {x.dtype}, the model takes float32 "
        "(store floats, or give --preprocess with the scale that maps raw values to the model's range)"
    )


def _labels(y: np.ndarray, n: int, p: Path, role: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or y.dtype.kind not in "iubf":
        raise BadInputError(f"{role} {p}: labels 'y' must be class indices (shape [N]), one-hot (shape [N, classes]) or regression targets; got {y.dtype} {list(y.shape)}")
    if len(y) != n:
        raise BadInputError(f"{role} {p}: 'y' has {len(y)} labels but the inputs have {n} samples")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        return y.astype(np.float64)  # regression targets: error metrics, not accuracy
    return y.astype(np.int64)


def _load_image_folder(
    p: Path, input_shapes: Sequence[Sequence[int]], spec: PreprocessingSpec | None, role: str
) -> Dataset:
    """Images in ``p`` (unlabelled) or in ``p/<class>/`` (labelled by sorted class folder)."""
    if len(input_shapes) != 1:
        raise BadInputError(f"{role} {p}: a folder of images can feed only a single-input model")
    image = require_module("PIL.Image", "convert")
    spec = spec or PreprocessingSpec(scale=1 / 255)
    shape = list(input_shapes[0])
    if len(shape) != 4:
        raise BadInputError(f"{role} {p}: a folder of images needs a model with a 4-d image input, this one takes {shape}")
    h_axis, w_axis, c_axis = (1, 2, 3) if spec.layout == "NHWC" else (2, 3, 1)
    size = spec.size or (shape[h_axis], shape[w_axis])
    if min(size) < 1:
        raise BadInputError(f"{role} {p}: the model's input size is dynamic; give it with --preprocess size=HxW")
    channels = shape[c_axis]
    color = "grayscale" if channels == 1 else spec.color
    spec = replace(spec, size=(int(size[0]), int(size[1])), color=color)
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    if classes:
        for index, name in enumerate(classes):
            files += [(f, index) for f in sorted((p / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadInputError(f"{role} {p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, directly or in class folders)")
    height, width = int(size[0]), int(size[1])
    pixels = []
    for f, _ in files:
        try:
            with image.open(f) as img:
                img = img.convert("L" if color == "grayscale" else "RGB").resize((width, height))
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{role} image {f} cannot be decoded: {exc}") from None
        array = array[..., np.newaxis] if array.ndim == 2 else array
        pixels.append(array if spec.layout == "NHWC" else np.transpose(array, (2, 0, 1)))
    x = spec.apply(np.stack(pixels))
    labels = np.array([label for _, label in files], np.int64) if classes else None
    return Dataset((x,), labels, str(p), spec, tuple(classes))


def check_against_input(
    dataset: Dataset, inputs: Sequence[TensorSpec] | Sequence[Sequence[int]], role: str = "data"
) -> None:
    """Refuse data whose per-sample shape does not fit the model's inputs."""
    given: Sequence[TensorSpec | Sequence[int]] = inputs
    specs = [s if isinstance(s, TensorSpec) else TensorSpec(f"input_{i}", tuple(s), "float32") for i, s in enumerate(given)]
    if len(dataset.inputs) != len(specs):
        raise BadInputError(f"{role} {dataset.source}: has {len(dataset.inputs)} input arrays, the model takes {len(specs)}")
    if len(dataset) == 0:
        raise BadInputError(f"{role} {dataset.source}: holds no samples")
    for x, tensor in zip(dataset.inputs, specs):
        name = input_name(tensor)
        want = list(tensor.shape)[1:]
        got = list(x.shape)[1:]
        if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
            raise BadInputError(
                f"{role} {dataset.source}: input '{name}' has samples of shape {got}, the model expects {want} "
                "(-1: any size; the first axis of the array is the sample)"
            )
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise BadInputError(f"{role} {dataset.source}: input '{name}' contains NaN or Inf")
        if len(x) != len(dataset):
            raise BadInputError(f"{role} {dataset.source}: inputs have different numbers of samples")


def split_holdback(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(calibration part, held-back part): the held-back part validates when no --eval is given.

    Deterministic for ``seed``; at least one sample each side when there are two or more.
    """
    n = len(dataset)
    if n < 2:
        raise BadInputError(f"calibration data {dataset.source} has {n} sample; give at least 2, or --eval DATA")
    held = max(1, int(round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return dataset.take(np.sort(order[held:])), dataset.take(np.sort(order[:held]))
