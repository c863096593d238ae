"""Deltas between bundles: every model kind and dtype rebuilt bit for bit (TFLite fp32, float16 and
int8; ONNX fp32 and int8; a bundle whose model cannot be parsed takes the plain binary path), and a
corrupted, truncated, cut, wrong-base or wrong-target delta refused with nothing left behind."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from converters_fixtures import fine_tuned_digits

from edgeship.ota.bundle_build import build_bundle
from edgeship.ota.delta import (
    MAGIC,
    DeltaError,
    DeltaHeader,
    Region,
    apply_delta,
    decode_region,
    encode_region,
    read_header,
)
from edgeship.toolkit.deltas import TensorSpan, build_delta, pair_tensors, tensor_spans


@pytest.fixture(scope="module")
def digits_pair(digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits model and the same model fine-tuned one more epoch (every weight moves)."""
    old, new, x = fine_tuned_digits(digits_files)
    return {"folder": tmp_path_factory.mktemp("delta-models"), "old": old, "new": new, "x": x}


def _tflite(model: Any, x: np.ndarray, path: Path, variant: str) -> Path:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(64))
    path.write_bytes(converter.convert())
    return path


def _bundle(model_file: Path, version: str, out: Path) -> bytes:
    build_bundle(model_file, name="digits", version=version, out=out)
    return out.read_bytes()


def _roundtrip(tmp_path: Path, old: bytes, new: bytes) -> Any:
    built = build_delta(old, new)
    assert built.data is not None, built.sizes
    (tmp_path / "old.bundle").write_bytes(old)
    (tmp_path / "x.delta").write_bytes(built.data)
    digest = apply_delta(tmp_path / "x.delta", tmp_path / "old.bundle", tmp_path / "new.bundle",
                         expected_target_sha256=hashlib.sha256(new).hexdigest())
    assert (tmp_path / "new.bundle").read_bytes() == new
    assert digest == hashlib.sha256(new).hexdigest()
    return built


@pytest.mark.parametrize("variant", ["fp32", "float16", "int8"])
def test_tflite_fine_tune_rebuilds_bit_for_bit_and_is_smaller(digits_pair: dict[str, Any], tmp_path: Path,
                                                              variant: str) -> None:
    folder = digits_pair["folder"]
    old = _bundle(_tflite(digits_pair["old"], digits_pair["x"], folder / f"old-{variant}.tflite", variant), "1.0.0",
                  tmp_path / "a.bundle")
    new = _bundle(_tflite(digits_pair["new"], digits_pair["x"], folder / f"new-{variant}.tflite", variant), "1.1.0",
                  tmp_path / "b.bundle")
    spans = tensor_spans(new)
    assert spans and {s.kind for s in spans} >= ({"sub"} if variant == "int8" else {"xor"})
    built = _roundtrip(tmp_path, old, new)
    assert built.method == "tensor" and built.tensors == len(spans)
    assert built.sizes["delta"] < built.sizes["full_zstd"]


def test_onnx_fine_tune_rebuilds_bit_for_bit(digits_pair: dict[str, Any], tmp_path: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    def to_onnx(model: Any, path: Path) -> Path:
        spec = [tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image")]
        forward = tf.function(lambda x: model(x, training=False), input_signature=spec)
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=13)
        path.write_bytes(proto.SerializeToString())
        return path

    folder = digits_pair["folder"]
    old = _bundle(to_onnx(digits_pair["old"], folder / "old.onnx"), "1.0.0", tmp_path / "a.bundle")
    new = _bundle(to_onnx(digits_pair["new"], folder / "new.onnx"), "1.1.0", tmp_path / "b.bundle")
    assert tensor_spans(new)
    built = _roundtrip(tmp_path, old, new)
    assert built.method == "tensor"


def test_identical_models_cost_almost_nothing(digits_tflite: Path, tmp_path: Path) -> None:
    old = _bundle(digits_tflite, "1.0.0", tmp_path / "a.bundle")
    new = _bundle(digits_tflite, "1.0.1", tmp_path / "b.bundle")
    built = _roundtrip(tmp_path, old, new)
    assert built.sizes["delta"] < 0.02 * built.sizes["full_zstd"]


def test_unparseable_model_takes_the_binary_path(tmp_path: Path) -> None:
    """A bundle whose model the builder cannot parse still gets a (plain binary) delta."""
    import tarfile

    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()

    def tar(payload: bytes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
            info = tarfile.TarInfo("model.tflite")
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
        return out.getvalue()

    changed = bytearray(blob)
    changed[1000:1010] = b"0123456789"
    built = _roundtrip(tmp_path, tar(blob), tar(bytes(changed)))
    assert built.method == "binary" and built.sizes["delta"] < 2000


def test_a_binary_delta_reaches_a_base_larger_than_the_levels_window(tmp_path: Path) -> None:
    """12 MB of incompressible bytes with 4 kB changed: zstd at level 12 has an 8 MiB window, so
    without a window sized to the base the matching bytes are out of reach and the delta is as large
    as the file; with it (what ``zstd --patch-from`` does) the delta is about the change."""
    rng = np.random.default_rng(2)
    old = rng.bytes(12_000_000)
    changed = bytearray(old)
    changed[11_000_000:11_004_096] = rng.bytes(4096)
    built = _roundtrip(tmp_path, old, bytes(changed))
    assert built.method == "binary" and built.sizes["delta"] < 20_000, built.sizes


def _span(name: str, at: int, length: int = 64, kind: str = "xor", width: int = 4) -> TensorSpan:
    return TensorSpan(name, at, length, kind, width)


@pytest.mark.parametrize("old,new,paired", [
    # same names: paired by name, wherever they lie
    ([_span("a", 0), _span("b", 100)], [_span("b", 0), _span("a", 100)], {0: 100, 100: 0}),
    # a renamed tensor (a re-export numbers its layers): the next unpaired old tensor of its size and dtype
    ([_span("dense/MatMul", 0), _span("dense/BiasAdd", 100, 16)],
     [_span("dense_1/MatMul", 0), _span("dense_1/BiasAdd", 100, 16)], {0: 0, 100: 100}),
    # renamed, in file order among equals
    ([_span("x", 0), _span("y", 100), _span("z", 200)], [_span("x1", 0), _span("y1", 100), _span("z", 200)],
     {0: 0, 100: 100, 200: 200}),
    # a new tensor of another size or dtype is not paired
    ([_span("a", 0)], [_span("a2", 0, 128)], {}),
    ([_span("a", 0, kind="sub", width=1)], [_span("a", 0)], {}),
    # an old tensor is used once, even when a renamed tensor would also fit it
    ([_span("a", 0)], [_span("a", 0), _span("b", 100)], {0: 0}),
])
def test_tensors_pair_by_name_then_by_order_of_the_same_shape(old: list[TensorSpan], new: list[TensorSpan],
                                                             paired: dict[int, int]) -> None:
    assert {at: base.at for at, base in pair_tensors(old, new).items()} == paired


def test_no_delta_when_it_would_not_be_smaller(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    old, new = rng.bytes(100_000), rng.bytes(100_000)
    built = build_delta(old, new)
    assert built.data is None and built.method == "none"


@pytest.mark.parametrize("kind,width,dtype", [("xor", 4, np.float32), ("xor", 2, np.float16), ("sub", 1, np.int8),
                                              ("sub", 4, np.int32), ("sub", 8, np.int64), ("xor", 8, np.float64)])
def test_transforms_invert_exactly(kind: str, width: int, dtype: Any) -> None:
    rng = np.random.default_rng(2)
    if np.issubdtype(dtype, np.floating):
        old = rng.standard_normal(999).astype(dtype)
        new = (old + rng.standard_normal(999).astype(dtype) * dtype(0.01)).astype(dtype)
        new[0], new[1] = np.nan, -np.inf  # every bit pattern survives, NaN payloads included
    else:
        info = np.iinfo(dtype)
        old = rng.integers(info.min, info.max, 999, dtype=dtype, endpoint=True)
        new = rng.integers(info.min, info.max, 999, dtype=dtype, endpoint=True)
    encoded = encode_region(kind, width, new.tobytes(), old.tobytes())
    assert decode_region(kind, width, encoded, old.tobytes()) == new.tobytes()


# -- refusals ---------------------------------------------------------------------------------------

@pytest.fixture
def made(digits_pair: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    folder = digits_pair["folder"]
    old = _bundle(_tflite(digits_pair["old"], digits_pair["x"], folder / "o8.tflite", "int8"), "1.0.0",
                  tmp_path / "a.bundle")
    new = _bundle(_tflite(digits_pair["new"], digits_pair["x"], folder / "n8.tflite", "int8"), "1.1.0",
                  tmp_path / "b.bundle")
    built = build_delta(old, new)
    assert built.data is not None
    (tmp_path / "old.bundle").write_bytes(old)
    return {"old": old, "new": new, "delta": built.data, "sha": hashlib.sha256(new).hexdigest()}


def _refused(tmp_path: Path, delta: bytes, base: bytes, match: str, expected: str | None = None) -> None:
    (tmp_path / "bad.delta").write_bytes(delta)
    (tmp_path / "base.bundle").write_bytes(base)
    out = tmp_path / "out.bundle"
    with pytest.raises(DeltaError, match=match):
        apply_delta(tmp_path / "bad.delta", tmp_path / "base.bundle", out, expected_target_sha256=expected)
    assert not out.exists()  # nothing left behind


def test_delta_for_another_base_is_refused(made: dict[str, Any], tmp_path: Path) -> None:
    other = bytearray(made["old"])
    other[-600] ^= 1
    _refused(tmp_path, made["delta"], bytes(other), "another base")


def test_delta_for_another_target_is_refused(made: dict[str, Any], tmp_path: Path) -> None:
    _refused(tmp_path, made["delta"], made["old"], "another bundle than the one signed", expected="0" * 64)


@pytest.mark.parametrize("cut", [3, 10, 200, -1])
def test_truncated_delta_is_refused(made: dict[str, Any], tmp_path: Path, cut: int) -> None:
    data = made["delta"][:cut] if cut > 0 else made["delta"][:-40]
    _refused(tmp_path, data, made["old"], "magic|truncated|ends early|decompress|hash|wrong size")


def test_corrupted_payload_is_refused(made: dict[str, Any], tmp_path: Path) -> None:
    data = bytearray(made["delta"])
    data[len(data) - 100] ^= 0xFF  # inside the last tensor payload
    _refused(tmp_path, bytes(data), made["old"], "decompress|hash|wrong size")


def _with_header(delta: bytes, change: Any) -> bytes:
    header, offset = read_header(io.BytesIO(delta))
    doc = json.loads(header.to_json())
    change(doc)
    blob = json.dumps(doc).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + delta[offset:]


@pytest.mark.parametrize("change,match", [
    (lambda d: d["regions"].pop(), "make .* bytes"),
    (lambda d: d["regions"][1].__setitem__(0, 5), "in order"),
    (lambda d: d.__setitem__("schema", 2), "schema"),
    (lambda d: d["regions"][-1].__setitem__(2, "exec"), "unknown"),
    (lambda d: d["dictionary"].append([0, 10**12]), "outside the base"),
    (lambda d: d.__setitem__("target_sha256", "zz"), "64 hex"),
])
def test_lying_header_is_refused_before_anything_is_written(made: dict[str, Any], tmp_path: Path, change: Any,
                                                            match: str) -> None:
    _refused(tmp_path, _with_header(made["delta"], change), made["old"], match)


def test_tensor_region_reading_past_the_base_is_refused() -> None:
    header = DeltaHeader("a" * 64, 100, "b" * 64, 8, (), 0, (Region(0, 8, "xor", 4, 96, 10),))
    with pytest.raises(DeltaError, match="past the end of the base"):
        header.check()


def test_cli_builds_inspects_and_applies(made: dict[str, Any], tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "new.bundle").write_bytes(made["new"])

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "delta", *args], capture_output=True,
                              text=True, timeout=120)

    built = run("build", str(tmp_path / "old.bundle"), str(tmp_path / "new.bundle"), "-o", str(tmp_path / "d"),
                "--json")
    assert built.returncode == 0, built.stderr
    doc = json.loads(built.stdout)
    assert doc["method"] in ("tensor", "binary") and doc["ratio_to_zstd_full"] < 0.5
    inspected = json.loads(run("inspect", str(tmp_path / "d"), "--json").stdout)
    assert inspected["target_sha256"] == made["sha"] and inspected["file_size"] == doc["delta"]
    applied = run("apply", str(tmp_path / "d"), "--base", str(tmp_path / "old.bundle"), "-o", str(tmp_path / "r"),
                  "--sha256", made["sha"])
    assert applied.returncode == 0 and (tmp_path / "r").read_bytes() == made["new"]
    wrong = run("apply", str(tmp_path / "d"), "--base", str(tmp_path / "new.bundle"), "-o", str(tmp_path / "w"))
    assert wrong.returncode == 4 and len(wrong.stderr.strip().splitlines()) == 1 and "another base" in wrong.stderr
    assert not (tmp_path / "w").exists()
    rng = np.random.default_rng(3)
    (tmp_path / "r1").write_bytes(rng.bytes(50_000))
    (tmp_path / "r2").write_bytes(rng.bytes(50_000))
    none = run("build", str(tmp_path / "r1"), str(tmp_path / "r2"), "-o", str(tmp_path / "nd"))
    assert none.returncode == 1 and "send the full bundle" in none.stderr and not (tmp_path / "nd").exists()
