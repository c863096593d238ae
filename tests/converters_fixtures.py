"""Shared, cached conversions of the digits model for the converter and CLI tests.

Conversions cost seconds each on a 2-core machine, so each (target, quantize,
int8 I/O) combination is converted once per test session and shared: the cache
lives in this module (imported once), the files in a session temp folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_CACHE: dict[tuple[str, str, bool], Any] = {}


def converted(digits_files: dict[str, Path], folder: Path, to: str, quantize: str, int8_io: bool = False) -> Any:
    """The ConversionResult of digits.keras -> (to, quantize, int8_io), converted once."""
    from edgeship.converters.convert import convert_model

    key = (to, quantize, int8_io)
    if key not in _CACHE:
        name = f"digits-{quantize}{'-io' if int8_io else ''}.{to}"
        _CACHE[key] = convert_model(
            digits_files["model"],
            folder / name,
            to=to,
            quantize=quantize,
            int8_io=int8_io,
            calib=digits_files["calib"],
            eval_data=digits_files["eval"],
            latency_runs=5,
        )
    return _CACHE[key]


@pytest.fixture(scope="session")
def conversions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conversions")


@pytest.fixture(scope="session")
def convert_digits(digits_files: dict[str, Path], conversions_dir: Path) -> Any:
    """``convert_digits(to, quantize, int8_io=False) -> ConversionResult`` (cached)."""

    def get(to: str, quantize: str, int8_io: bool = False) -> Any:
        return converted(digits_files, conversions_dir, to, quantize, int8_io)

    return get
