"""The served-models catalogue: which loaded version a request's name, version or label
reaches, and that adding or removing one model leaves the others serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.agent.runtimes import open_model
from edgeship.agent.servables import ServableNotFoundError, Servables
from edgeship.agent.serving import LoadedModel, NoModelError


@pytest.fixture
def catalogue(digits_tflite: Path) -> Servables:
    servables = Servables()
    digits = servables.ensure("digits")
    digits.serving.swap(LoadedModel("digits", "1.1.0", open_model(digits_tflite), serving_version=4))
    digits.keep(LoadedModel("digits", "1.0.0", open_model(digits_tflite), serving_version=3))
    digits.set_label("stable", 3)
    digits.set_label("canary", 4)
    servables.ensure("empty")
    return servables


@pytest.mark.parametrize(
    ("name", "version", "label", "expected"),
    [
        ("digits", None, None, "1.1.0"),  # the default: what the active slot serves
        ("digits", "4", None, "1.1.0"),  # the serving version number
        ("digits", "3", None, "1.0.0"),  # a kept version, by number
        ("digits", "1.0.0", None, "1.0.0"),  # the bundle's own version string
        ("digits", None, "stable", "1.0.0"),
        ("digits", None, "canary", "1.1.0"),
        ("digits", "5", None, ServableNotFoundError),  # never loaded
        ("digits", "2.0.0", None, ServableNotFoundError),
        ("digits", None, "beta", ServableNotFoundError),  # no such label
        ("digits", "3", "stable", ServableNotFoundError),  # both: ambiguous
        ("other", None, None, ServableNotFoundError),  # no such model
        ("empty", None, None, NoModelError),  # a name with nothing loaded yet: 503, not 404
    ],
)
def test_a_request_resolves_to_the_version_it_names(
    catalogue: Servables, name: str, version: str | None, label: str | None, expected: object
) -> None:
    if isinstance(expected, str):
        assert catalogue.resolve(name, version, label).version == expected
    else:
        with pytest.raises(expected):  # type: ignore[call-overload]
            catalogue.resolve(name, version, label)


def test_dropping_a_kept_version_removes_its_labels_but_not_the_defaults(catalogue: Servables) -> None:
    digits = catalogue.get("digits")
    dropped = digits.drop(3)
    assert dropped is not None and dropped.version == "1.0.0"
    assert digits.labels() == {"canary": 4}
    with pytest.raises(ServableNotFoundError):
        catalogue.resolve("digits", None, "stable")
    assert [m.serving_version for m in digits.loaded()] == [4]


def test_removing_one_model_leaves_the_others_serving(catalogue: Servables, digits_tflite: Path) -> None:
    catalogue.serving("kws").swap(LoadedModel("kws", "0.1.0", open_model(digits_tflite), serving_version=1))
    assert catalogue.names() == ["digits", "empty", "kws"]
    removed = catalogue.remove("kws")
    assert removed is not None and removed.serving.current is not None
    assert catalogue.resolve("digits").version == "1.1.0"
    with pytest.raises(ServableNotFoundError, match="digits, empty"):
        catalogue.resolve("kws")


def test_labels_are_checked() -> None:
    versions = Servables().ensure("m")
    with pytest.raises(ValueError, match="label"):
        versions.set_label("Not A Label", 1)
