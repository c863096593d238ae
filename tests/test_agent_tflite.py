"""The runtime layer and the agent on ``tflite_runtime`` 2.14 (numpy < 2), in its own
environment: ``make test-tflite``. Skipped where tflite_runtime is not installed
(the main environment has LiteRT instead)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite_runtime.interpreter")

MODELS = Path(os.environ.get("EDGESHIP_TFLITE_MODELS", "")).resolve()
if not (MODELS / "digits.tflite").is_file():
    pytest.skip(
        "set EDGESHIP_TFLITE_MODELS to a folder written by tests/agent_tflite_models.py "
        "(make test-tflite does)",
        allow_module_level=True,
    )


def test_tflite_runtime_matches_litert_reference() -> None:
    from edgeship.agent.runtimes import available_runtimes, open_model

    assert "tflite_runtime" in available_runtimes(include_tensorflow=False)
    x = np.load(MODELS / "eval.npz")["x"]
    reference = np.load(MODELS / "reference.npz")
    with open_model(MODELS / "digits.tflite", prefer=["tflite_runtime"]) as runner:
        assert runner.runtime == "tflite_runtime" and runner.runtime_version.startswith("2.14")
        (y,) = runner.run([x])  # batch of 64: resizes the batch-1 interpreter
    np.testing.assert_allclose(y, reference["fp32"], atol=1e-5)
    with open_model(MODELS / "digits-int8.tflite", prefer=["tflite_runtime"]) as runner:
        assert runner.signature.inputs[0].dtype == "int8"
        (q,) = runner.run([x])
    assert q.dtype == np.float32
    assert float(np.mean(q.argmax(1) == reference["int8"].argmax(1))) >= 0.98


def test_agent_installs_and_serves_on_tflite_runtime(tmp_path: Path) -> None:
    """The whole path in this environment: release repository, offline package,
    verification, self-test with golden vectors, hot swap, HTTP predict."""
    import http.client

    from edgeship.agent.config import load_config, render_config
    from edgeship.agent.runtimes import open_model
    from edgeship.agent.server import ApiServer
    from edgeship.agent.serving import ServingModel
    from edgeship.agent.sources import OfflinePackageSource
    from edgeship.agent.updater import UpdateDriver
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.golden import GoldenVectors
    from edgeship.ota.release import ReleaseRepository

    x = np.load(MODELS / "eval.npz")["x"][:8]
    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="tflite-runtime-tests")
    for version, name in (("1.0.0", "digits.tflite"), ("2.0.0", "digits-int8.tflite")):
        with open_model(MODELS / name, prefer=["tflite_runtime"]) as runner:
            (y,) = runner.run([x])
        GoldenVectors(("image",), (x,), ("probs",), (y,), atol=1e-3).save(
            tmp_path / f"{version}.npz"
        )
        build_bundle(
            MODELS / name,
            name="digits",
            version=version,
            out=tmp_path / f"{version}.bundle",
            golden=tmp_path / f"{version}.npz",
        )
        repo.publish(tmp_path / f"{version}.bundle")
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        render_config(
            data=str(tmp_path / "data"),
            device_id="pi",
            fleet="lab",
            root=str(repo.root_metadata_path),
            director_key=str(repo.director_public_key_path),
            bind="127.0.0.1:0",
        ).replace("window_s = 60.0", "window_s = 0.2")
    )
    config = load_config(config_path)
    serving = ServingModel()
    driver = UpdateDriver(config, serving=serving)
    server = ApiServer(serving, config.data_dir, port=0).start()
    try:
        for version in ("1.0.0", "2.0.0"):
            repo.export("digits", version, tmp_path / f"{version}.package", fleet="lab")
            driver.begin(OfflinePackageSource(tmp_path / f"{version}.package"))
            record = driver.run()
            assert record.state == "COMMITTED", record.reason
            assert (
                serving.current.version == version
                and serving.current.runner.runtime == "tflite_runtime"
            )
            conn = http.client.HTTPConnection(server.host, server.port)
            conn.request(
                "POST", "/v1/models/digits:predict", json.dumps({"instances": x[:2].tolist()})
            )
            response = conn.getresponse()
            assert response.status == 200
            assert np.array(json.loads(response.read())["predictions"]).shape == (2, 10)
    finally:
        server.stop()
    assert not any(m.split(".")[0] in ("tensorflow", "ai_edge_litert") for m in sys.modules)
