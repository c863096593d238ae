"""The quantization doctor: names the layers int8 hurts, and --keep-float auto
finds the fewest to keep in float so the accuracy gate passes, proven on a model
built to break in int8 (``converters_fixtures.int8_sensitive_model``: one layer
whose output carries an outlier channel thousands of times larger than the
rest, so a per-tensor int8 scale rounds the real activations to zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from converters_fixtures import int8_sensitive_model

from edgeship.converters.convert import ConversionGateError, QuantizationChoices, convert_model
from edgeship.converters.doctor import ChannelStats, fewest_kept, fewest_layers, introduced_errors
from edgeship.converters.validate import GateLimits
from edgeship.toolkit.cli import main

# ---- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize("count, needed, expected, calls", [
    (10, 1, 1, [1]),
    (10, 3, 3, [1, 2, 4, 3]),
    (10, 10, 10, [1, 2, 4, 8, 10, 9]),
    (10, 11, None, [1, 2, 4, 8, 10]),  # even all layers in float fail
    (0, 1, None, []),
])
def test_fewest_layers_doubles_then_bisects(count: int, needed: int, expected: int | None, calls: list[int]) -> None:
    seen: list[int] = []

    def passes(k: int) -> bool:
        seen.append(k)
        return k >= needed

    assert fewest_layers(count, passes) == expected and seen == calls


def test_fewest_kept_prunes_layers_the_gate_does_not_need() -> None:
    # the ranking blames 'a' first, but only 'b' and 'c' together cure the model
    ranked = ["a", "b", "c", "d"]
    assert fewest_kept(ranked, lambda keep: {"b", "c"} <= set(keep)) == ("b", "c")
    assert fewest_kept(ranked, lambda keep: False) is None


def test_introduced_error_blames_the_node_where_error_appears() -> None:
    nodes = [("conv", "Conv", ["x"], ["c"]), ("relu", "Relu", ["c"], ["r"]), ("fc", "Gemm", ["r"], ["y"])]
    rows = introduced_errors(nodes, {"c": 0.01, "r": 0.9, "y": 0.95})
    assert [r["layer"] for r in rows] == ["relu", "fc", "conv"] and rows[0]["introduced"] == pytest.approx(0.89)


def test_channel_error_sees_channels_an_outlier_rounds_away() -> None:
    rng = np.random.default_rng(0)
    f = np.hstack([rng.random((64, 4)), rng.random((64, 1)) * 5000])
    rounded = f.copy()
    rounded[:, :4] = 0.0  # what a per-tensor int8 scale of ~20 does to values below 10
    stats = ChannelStats()
    stats.add(f, rounded)
    assert stats.relative_rmse() > 1.0  # a whole-tensor RMSE relative to its spread would be ~0.0002
    same = ChannelStats()
    same.add(f, f)
    assert same.relative_rmse() == 0.0


# ---- the doctor on a model built to break ---------------------------------------------------


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return int8_sensitive_model(tmp_path_factory.mktemp("sensitive"))


GATE = GateLimits(max_accuracy_drop_pp=1.0)


def _doctor(sensitive: dict[str, Path], out: Path, keep: tuple[str, ...] = ()) -> Any:
    return convert_model(sensitive["model"], out, quantize="int8", calib=sensitive["calib"], eval_data=sensitive["eval"],
                         limits=GATE, latency_runs=2, choices=QuantizationChoices(keep_float=keep))


@pytest.mark.parametrize("to", ["onnx", pytest.param("tflite", marks=pytest.mark.slow)])
def test_plain_int8_fails_the_gate_and_the_refusal_names_the_layers(sensitive: dict[str, Path], tmp_path: Path, to: str) -> None:
    with pytest.raises(ConversionGateError) as info:
        _doctor(sensitive, tmp_path / f"plain.{to}")
    quality = info.value.report["quality"]
    assert quality["accuracy_drop_pp"] > 50  # int8 ruins it: ~90% -> ~10%
    worst = info.value.report["conversion"]["doctor"]["worst_layers"]
    assert worst and all("layer" in row for row in worst)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["onnx", pytest.param("tflite", marks=pytest.mark.slow)])
def test_keep_float_auto_passes_the_gate_with_the_fewest_layers(sensitive: dict[str, Path], tmp_path: Path, to: str) -> None:
    result = _doctor(sensitive, tmp_path / f"auto.{to}", keep=("auto",))
    quality = result.report["quality"]
    assert quality["accuracy_drop_pp"] <= 1.0 and quality["reference_accuracy"] > 0.85
    doctor = result.report["conversion"]["doctor"]
    kept = doctor["kept_in_float"]
    assert 1 <= len(kept) < doctor["layers_measured"]  # fewer than all: some layers stay int8
    assert any("outlier" in name for name in kept)  # the layer built to break is among them
    # and the model really is mostly int8
    counts = result.report["operators"]["counts"]
    assert counts.get("QuantizeLinear" if to == "onnx" else "QUANTIZE")


def test_keep_float_names_on_the_cli(sensitive: dict[str, Path], tmp_path: Path) -> None:
    """The user's own list (what the doctor printed) is accepted as is."""
    first = _doctor(sensitive, tmp_path / "auto.onnx", keep=("auto",))
    kept = ",".join(first.report["conversion"]["doctor"]["kept_in_float"])
    result = CliRunner().invoke(main, [
        "convert", str(sensitive["model"]), "-o", str(tmp_path / "named.onnx"), "--quantize", "int8",
        "--calib", str(sensitive["calib"]), "--eval", str(sensitive["eval"]), "--keep-float", kept,
        "--max-accuracy-drop", "1",
    ])
    assert result.exit_code == 0, result.stderr
    assert "gates passed" in result.stdout


def test_keep_float_auto_needs_a_gate(sensitive: dict[str, Path], tmp_path: Path) -> None:
    from edgeship.ota.errors import BadInputError

    with pytest.raises(BadInputError, match="give --max-accuracy-drop or --min-agreement"):
        convert_model(sensitive["model"], tmp_path / "x.onnx", quantize="int8", calib=sensitive["calib"],
                      choices=QuantizationChoices(keep_float=("auto",)))
