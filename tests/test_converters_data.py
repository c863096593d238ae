"""DATA loading: .npz, .npy, folders of images with a preprocessing spec, and
every way a file can be wrong (one clear BadInputError each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.agent.runtimes import TensorSpec
from edgeship.converters.data import PreprocessingSpec, load_dataset, split_holdback
from edgeship.ota.errors import BadInputError

SHAPE = [(-1, 8, 8, 1)]


def test_npz_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(10, 8, 8, 1), y=np.arange(10) % 3)
    data = load_dataset(path, input_shapes=SHAPE)
    assert len(data) == 10 and data.inputs[0].dtype == np.float32
    assert data.labels is not None and data.labels.tolist() == [i % 3 for i in range(10)]


def test_one_hot_labels_become_indices(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(3, 8, 8, 1).astype(np.float32), y=np.eye(3))
    assert load_dataset(path, input_shapes=SHAPE).labels.tolist() == [0, 1, 2]


def test_npy_without_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.random.rand(4, 8, 8, 1).astype(np.float32))
    data = load_dataset(path, input_shapes=SHAPE)
    assert data.labels is None and len(data) == 4


def test_uint8_arrays_need_a_spec_and_use_it(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((2, 8, 8, 1), 255, np.uint8))
    with pytest.raises(BadInputError, match="dtype uint8"):
        load_dataset(path, input_shapes=SHAPE)
    data = load_dataset(path, input_shapes=SHAPE, preprocessing=PreprocessingSpec(scale=1 / 255))
    assert float(data.inputs[0].max()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 8, 8, 1), np.float32)}, "has no array 'x' for the model's input 'x' (found: images)"),
        ({"x": np.zeros((2, 7, 8, 1), np.float32)}, "samples of shape [7, 8, 1], the model expects [8, 8, 1]"),
        ({"x": np.zeros((2, 8, 8), np.float32)}, "samples of shape [8, 8]"),
        ({"x": np.array(["a", "b"])}, "dtype <U1"),
        ({"x": np.zeros((2, 8, 8, 1), np.float32), "y": np.zeros(3)}, "'y' has 3 labels but the inputs have 2 samples"),
        ({"x": np.full((2, 8, 8, 1), np.nan, np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 8, 8, 1), np.float32)}, "holds no samples"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInputError) as info:
        load_dataset(path, input_shapes=SHAPE, role="calibration data")
    assert message in info.value.message
    assert "\n" not in info.value.message and str(path) in info.value.message


@pytest.mark.parametrize("name, payload", [("trunc.npz", b"PK\x03\x04garbage"), ("bad.npy", b"\x93NUMPY garbage"), ("d.csv", b"1,2")])
def test_unreadable_or_unknown_data_files(tmp_path: Path, name: str, payload: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(BadInputError):
        load_dataset(path, input_shapes=SHAPE)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        load_dataset(tmp_path / "nope.npz", input_shapes=SHAPE)


def _write_images(folder: Path, classes: dict[str, int], size: tuple[int, int] = (16, 12)) -> None:
    from PIL import Image

    for index, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((size[1], size[0], 3), 40 * index + i, np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_with_class_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", {"cat": 2, "dog": 3})
    data = load_dataset(tmp_path / "imgs", input_shapes=[(-1, 8, 8, 3)], preprocessing=PreprocessingSpec(scale=1 / 255))
    assert data.inputs[0].shape == (5, 8, 8, 3)
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.class_names == ("cat", "dog")
    assert data.preprocessing.size == (8, 8)  # taken from the model's input
    assert float(data.inputs[0][2, 0, 0, 0]) == pytest.approx(40 / 255)


def test_image_folder_nchw_grayscale_with_normalization(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", {"a": 2})
    spec = PreprocessingSpec(scale=1 / 255, mean=(0.5,), std=(0.25,), layout="NCHW")
    data = load_dataset(tmp_path / "imgs", input_shapes=[(-1, 1, 8, 8)], preprocessing=spec)
    assert data.inputs[0].shape == (2, 1, 8, 8)
    assert data.preprocessing.color == "grayscale"
    assert float(data.inputs[0][1, 0, 0, 0]) == pytest.approx((1 / 255 - 0.5) / 0.25, rel=1e-3)


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images found"):
        load_dataset(tmp_path / "empty", input_shapes=[(-1, 8, 8, 3)])
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="cannot be decoded"):
        load_dataset(tmp_path / "broken", input_shapes=[(-1, 8, 8, 3)])


def test_holdback_split_is_disjoint_and_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1), y=np.arange(50))
    data = load_dataset(path, input_shapes=[(-1, 1, 1, 1)])
    calib, held = split_holdback(data)
    assert len(calib) == 40 and len(held) == 10
    assert not set(calib.labels.tolist()) & set(held.labels.tolist())
    assert split_holdback(data)[1].labels.tolist() == held.labels.tolist()


def test_nchw_is_the_nhwc_image_transposed_not_reshaped(tmp_path: Path) -> None:
    """Non-uniform images, so a height/width or channel mix-up cannot hide."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    nhwc = load_dataset(tmp_path / "imgs", input_shapes=[(-1, 6, 10, 3)], preprocessing=PreprocessingSpec(scale=1 / 255))
    nchw = load_dataset(tmp_path / "imgs", input_shapes=[(-1, 3, 6, 10)],
                        preprocessing=PreprocessingSpec(scale=1 / 255, layout="NCHW"))
    assert nhwc.inputs[0].shape == (3, 6, 10, 3) and nchw.inputs[0].shape == (3, 3, 6, 10)
    np.testing.assert_array_equal(nchw.inputs[0], np.transpose(nhwc.inputs[0], (0, 3, 1, 2)))
    spec = PreprocessingSpec(scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125), layout="NCHW")
    normalized = load_dataset(tmp_path / "imgs", input_shapes=[(-1, 3, 6, 10)], preprocessing=spec).inputs[0]
    for c, (m, s) in enumerate(zip(spec.mean, spec.std)):
        np.testing.assert_allclose(normalized[:, c], (nchw.inputs[0][:, c] - m) / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["x.npy", "x.npz"])
def test_a_single_number_instead_of_samples_is_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, np.float32(3.0))
    else:
        np.savez(path, x=np.float32(3.0))
    with pytest.raises(BadInputError, match="single number; it needs a sample axis"):
        load_dataset(path, input_shapes=SHAPE)


MULTI = [
    TensorSpec("serving_default_tokens:0", (-1, 5), "int32", key="tokens"),
    TensorSpec("serving_default_meta:0", (-1, 3), "float32", key="meta"),
    TensorSpec("mask", (-1, 5), "bool"),
]


def test_npz_arrays_are_matched_to_inputs_by_name_and_keep_integer_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "multi.npz"
    # stored in another order than the model's, ids as int64, mask as 0/1 integers
    np.savez(path, mask=np.array([[1, 0, 1, 0, 1]] * 4), meta=np.ones((4, 3)), tokens=np.arange(20).reshape(4, 5), y=np.arange(4))
    data = load_dataset(path, input_specs=MULTI)
    assert data.names == ("tokens", "meta", "mask")
    tokens, meta, mask = data.inputs
    assert tokens.dtype == np.int32 and tokens[1].tolist() == [5, 6, 7, 8, 9]
    assert meta.dtype == np.float32 and mask.dtype == np.bool_ and mask[0].tolist() == [True, False, True, False, True]
    assert data.by_name()["tokens"] is tokens


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 5))}, "has no array 'tokens' for the model's input 'tokens'"),
        ({"tokens": np.full((2, 5), 0.5), "meta": np.zeros((2, 3)), "mask": np.zeros((2, 5))}, "input 'tokens' takes int32 (ids); its array holds non-integer floats"),
        ({"tokens": np.full((2, 5), 2**40), "meta": np.zeros((2, 3)), "mask": np.zeros((2, 5))}, "out of range"),
        ({"tokens": np.zeros((2, 5)), "meta": np.zeros((2, 3)), "mask": np.full((2, 5), 2)}, "input 'mask' is boolean"),
        ({"tokens": np.zeros((2, 4)), "meta": np.zeros((2, 3)), "mask": np.zeros((2, 5))}, "input 'tokens' has samples of shape [4]"),
    ],
)
def test_named_arrays_refused_with_the_input_named(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInputError) as info:
        load_dataset(path, input_specs=MULTI)
    assert message in info.value.message and "\n" not in info.value.message


def test_an_npy_cannot_feed_a_multi_input_model(tmp_path: Path) -> None:
    path = tmp_path / "one.npy"
    np.save(path, np.zeros((2, 5)))
    with pytest.raises(BadInputError, match="one array per input"):
        load_dataset(path, input_specs=MULTI)


def test_float_labels_are_regression_targets(tmp_path: Path) -> None:
    path = tmp_path / "reg.npz"
    np.savez(path, x=np.zeros((3, 8, 8, 1), np.float32), y=np.array([0.5, 1.25, 3.0]))
    labels = load_dataset(path, input_shapes=SHAPE).labels
    assert labels.dtype == np.float64 and labels.tolist() == [0.5, 1.25, 3.0]
