"""Bundles: building, the manifest schema, reading and extracting (the good paths and bad input)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ota_repo_simulator import SIGNATURE, fake_tflite

from edgeship.ota.archive import ManifestError
from edgeship.ota.bundle import (
    SCHEMA_VERSION,
    BundleManifest,
    extract_bundle,
    read_manifest,
    scan_bundle,
)
from edgeship.ota.bundle_build import build_bundle, sidecar_files
from edgeship.ota.errors import BadInputError
from edgeship.ota.golden import GoldenVectors

REPORT = {
    "schema": "edgeship.conversion-report/1",
    "signature": {
        "inputs": [{"name": "x", "shape": [-1, 64], "dtype": "int8", "scale": 0.05, "zero_point": -128}],
        "outputs": [{"name": "y", "shape": [-1, 10], "dtype": "int8", "scale": 0.00390625, "zero_point": -128}],
    },
    "preprocessing": {"scale": 1 / 16, "layout": "NC"},
    "labels": [str(i) for i in range(10)],
    "quality": {"accuracy": 0.962, "agreement": 0.991, "size_bytes": 4096},
    "operators": {"counts": {"FULLY_CONNECTED": 2, "SOFTMAX": 1}, "total": 3},
    "runtime": {"name": "tflite", "min_version": "2.14.0", "int8_io": True},
    "golden": {"file": "m.tflite.golden.npz", "atol": 0.02, "rtol": 0.0},
}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.tflite"
    path.write_bytes(fake_tflite(5000))
    return path


def _golden(path: Path) -> Path:
    GoldenVectors(
        input_names=("x",), inputs=(np.ones((4, 64), np.float32),),
        output_names=("y",), outputs=(np.zeros((4, 10), np.float32),), atol=0.5,
    ).save(path)
    return path


def test_build_with_report_golden_labels_meta(tmp_path: Path, model: Path) -> None:
    golden = _golden(tmp_path / "g.npz")
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\n\n")  # a blank line at the end is ignored (one inside is refused)
    out = tmp_path / "digits.bundle"
    manifest = build_bundle(model, name="digits", version="1.2.0", out=out, golden=golden, labels=labels,
                            report=REPORT, meta={"git": "abc123"}, tags=["arm64", "camera"])
    assert manifest.schema == SCHEMA_VERSION and manifest.format == "tflite"
    assert manifest.labels == ("zero", "one", "two")  # the file wins over the report's labels
    assert manifest.golden == {"file": "golden.npz", "atol": 0.02, "rtol": 0.0, "count": 4}  # report's tolerance
    assert manifest.runtime["runtime"] == "tflite" and manifest.runtime["min_version"] == "2.14.0"
    assert manifest.runtime["int8_io"] is True
    assert manifest.runtime["operators"] == ["FULLY_CONNECTED", "SOFTMAX"]
    assert manifest.signature == REPORT["signature"]
    assert manifest.preprocessing == REPORT["preprocessing"] and manifest.quality["accuracy"] == 0.962
    assert manifest.tags == ("arm64", "camera") and manifest.meta == {"git": "abc123"}
    assert manifest.files["model.tflite"] == {"size": 5000, "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    with tarfile.open(out) as tar:  # a plain POSIX tar, manifest first
        names = tar.getnames()
        assert names == ["manifest.json", "model.tflite", "golden.npz", "labels.txt", "report.json"]
        assert all(m.isreg() for m in tar.getmembers())
    assert read_manifest(out) == manifest
    extracted = extract_bundle(out, tmp_path / "x")
    assert extracted.model_path.read_bytes() == model.read_bytes()
    assert GoldenVectors.load(extracted.golden_path).atol == 0.5  # type: ignore[arg-type]
    assert extracted.labels_path is not None and extracted.report_path is not None
    assert json.loads(extracted.report_path.read_text())["quality"]["agreement"] == 0.991


def test_labels_come_from_the_report_when_no_file_is_given(tmp_path: Path, model: Path) -> None:
    manifest = build_bundle(model, name="digits", version="1.0.0", out=tmp_path / "b", report=REPORT)
    assert manifest.labels == tuple(str(i) for i in range(10))
    extracted = extract_bundle(tmp_path / "b", tmp_path / "x")
    assert extracted.labels_path is not None and extracted.labels_path.read_text().split() == list(manifest.labels)


def test_scan_hashes_the_whole_file(tmp_path: Path, model: Path) -> None:
    out = tmp_path / "b"
    build_bundle(model, name="digits", version="1.0.0", out=out, report={"signature": SIGNATURE})
    scan = scan_bundle(out)
    assert scan.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert scan.length == out.stat().st_size


def test_manifest_round_trip_and_schema_refusal(tmp_path: Path, model: Path) -> None:
    manifest = build_bundle(model, name="digits", version="1.0.0", out=tmp_path / "b", report={"signature": SIGNATURE})
    assert BundleManifest.from_dict(manifest.to_dict()) == manifest
    newer = dict(manifest.to_dict(), schema=SCHEMA_VERSION + 1)
    with pytest.raises(ManifestError, match="schema 2 is not supported"):
        BundleManifest.from_dict(newer)
    with pytest.raises(ManifestError, match="model_file"):
        BundleManifest.from_dict(dict(manifest.to_dict(), model_file="other.tflite"))
    with pytest.raises(ManifestError, match="sha256 must be 64"):
        BundleManifest.from_dict(dict(manifest.to_dict(), files={"model.tflite": {"size": 1, "sha256": "x"}}))


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "Digits!"}, "bundle name 'Digits!' is not allowed"),
    ({"version": "one"}, "version 'one' is not a version"),
    ({"name": "digits\n"}, "is not allowed"),  # a regex '$' matches before a final newline
    ({"version": "2.0.0\n"}, "is not a version"),
    ({"labels": "missing.txt"}, "labels file missing.txt cannot be read"),
    ({"report": "missing.json"}, "report missing.json cannot be read"),
])
def test_bad_input_is_refused_and_nothing_written(tmp_path: Path, model: Path, kwargs: dict, message: str) -> None:
    args = {"name": "digits", "version": "1.0.0", "report": {"signature": SIGNATURE}, **kwargs}
    with pytest.raises(BadInputError, match=message):
        build_bundle(model, out=tmp_path / "b", **args)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


def test_not_a_model_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(BadInputError, match="not a TFLite model"):
        build_bundle(bad, name="digits", version="1.0.0", out=tmp_path / "b", report={"signature": SIGNATURE})


def test_sidecar_files_are_found(tmp_path: Path, model: Path) -> None:
    assert sidecar_files(model) == {"golden": None, "report": None}
    (tmp_path / "m.tflite.report.json").write_text("{}")
    _golden(tmp_path / "m.tflite.golden.npz")
    found = sidecar_files(model)
    assert found["report"] == tmp_path / "m.tflite.report.json"
    assert found["golden"] == tmp_path / "m.tflite.golden.npz"


def test_read_manifest_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        read_manifest(tmp_path / "nope.bundle")


@pytest.mark.slow
def test_signature_is_read_from_a_real_model_without_a_report(tmp_path: Path, digits_int8_tflite: Path) -> None:
    from edgeship.agent.runtimes import open_model

    manifest = build_bundle(digits_int8_tflite, name="digits", version="1.0.0", out=tmp_path / "b")
    with open_model(digits_int8_tflite) as runner:
        assert manifest.signature == runner.signature.to_dict()
    assert manifest.runtime["int8_io"] is True
    assert "FULLY_CONNECTED" in manifest.runtime["operators"]
    assert "report.json" not in manifest.files


def test_build_reports_progress(tmp_path: Path, model: Path) -> None:
    seen: dict = {}
    build_bundle(model, name="digits", version="1.0.0", out=tmp_path / "b", report={"signature": SIGNATURE},
                 progress=lambda step, done, total: seen.__setitem__(step, (done, total)))
    assert seen["hash"] == (5000, 5000) and seen["pack"][0] == 5000
    assert seen["verify"][0] == seen["verify"][1] == (tmp_path / "b").stat().st_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat\ndog\n", ("cat", "dog")),
        ("cat\r\ndog\r\n\r\n\n", ("cat", "dog")),  # blank lines at the end: ignored
        ("  cat \n dog\n", ("cat", "dog")),
        ("cat\n\ndog\n", "line 2 is blank"),  # would shift dog to class 2
        ("\n\n", "has no labels"),
    ],
)
def test_labels_are_read_one_way_for_the_converter_and_the_bundle(tmp_path: Path, text: str, expected: object) -> None:
    from edgeship.converters.convert import read_labels as converter_read_labels
    from edgeship.ota.bundle_build import read_labels

    assert converter_read_labels is read_labels  # one reader: `convert --labels` and `bundle build --labels` agree
    path = tmp_path / "labels.txt"
    path.write_bytes(text.encode())
    if isinstance(expected, tuple):
        assert read_labels(path) == expected
    else:
        with pytest.raises(BadInputError, match=str(expected)):
            read_labels(path)


@pytest.mark.parametrize("tolerance, message", [
    ({"atol": "x"}, "golden atol and rtol must be numbers"),
    ({"atol": float("nan")}, "must be finite numbers >= 0"),
    ({"rtol": -1.0}, "must be finite numbers >= 0"),
])
def test_a_report_with_a_bad_golden_tolerance_is_one_line(tmp_path: Path, model: Path, tolerance: dict,
                                                          message: str) -> None:
    golden = _golden(tmp_path / "g.npz")
    with pytest.raises(BadInputError, match=message):
        build_bundle(model, name="digits", version="1.0.0", out=tmp_path / "b", golden=golden,
                     report={"signature": SIGNATURE, "golden": tolerance})
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_an_empty_or_cut_off_golden_file_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.npz"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="golden vectors .* cannot be read") as info:
        GoldenVectors.load(path)
    assert "\n" not in info.value.message
