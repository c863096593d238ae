"""Session-wide fixtures shared by every part's tests: the digits model, trained
once per test session, and its data. Parts keep their own fixtures in their own
test folders."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqtt_broker import MosquittoBroker

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "digits"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model`` (digits.keras), ``calib`` and ``eval`` (.npz with x, y)."""
    from model import save_digits_model  # examples/digits/model.py

    return save_digits_model(tmp_path_factory.mktemp("digits"), epochs=8)


@pytest.fixture(scope="session")
def digits_tflite(digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model as fp32 TFLite, straight from TensorFlow's converter."""
    import tensorflow as tf

    model = tf.keras.models.load_model(digits_files["model"])
    out = tmp_path_factory.mktemp("digits-tflite") / "digits.tflite"
    out.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return out


@pytest.fixture(scope="session")
def digits_int8_tflite(digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model as full-integer TFLite with int8 inputs and outputs."""
    import numpy as np
    import tensorflow as tf
    from agent_tflite_models import full_integer_tflite

    model = tf.keras.models.load_model(digits_files["model"])
    out = tmp_path_factory.mktemp("digits-int8") / "digits-int8.tflite"
    out.write_bytes(full_integer_tflite(model, np.load(digits_files["calib"])["x"]))
    return out


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The system programs a marker names (pyproject.toml): a machine without them (a
    `make test` that could not install them: no root) skips those tests, with the reason."""
    import shutil

    if item.get_closest_marker("mosquitto") is not None:
        from mqtt_broker import mosquitto_binary

        if mosquitto_binary() is None:
            pytest.skip("mosquitto is not installed (make test installs it as root: .ci/system-packages)")
    if item.get_closest_marker("mosquitto_clients") is not None and shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed (mosquitto-clients; .ci/system-packages)")
    if item.get_closest_marker("sshd") is not None:
        from provision_fixtures import sshd_binary

        if sshd_binary() is None:
            pytest.skip("sshd is not installed (openssh-server; .ci/system-packages)")
    if item.get_closest_marker("promtool") is not None and shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian's prometheus; .ci/system-packages)")
    if item.get_closest_marker("chromium") is not None and chromium_binary() is None:
        pytest.skip("Chromium or Playwright is not installed (Debian's chromium; .ci/system-packages)")


def chromium_binary() -> str | None:
    """Debian's Chromium, when it and the Playwright client that drives it are both installed."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("playwright") is None:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def agent_repo(
    digits_tflite: Path,
    digits_int8_tflite: Path,
    digits_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A release repository of digits bundles for the agent tests (agent_fixtures.AgentRepo),
    built once per run: defined here, not per test module, so every module shares it."""
    from agent_fixtures import build_agent_repo

    return build_agent_repo(digits_tflite, digits_int8_tflite, digits_files, tmp_path_factory)


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, anonymous, MQTT 3.1.1 and 5.

    For a custom configuration (TLS, ACLs), build ``MosquittoBroker(folder, config)``
    from tests/mqtt_broker.py yourself. Skips when mosquitto is not installed.
    """
    from mqtt_broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (make test installs it as root: .ci/system-packages)")
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()
