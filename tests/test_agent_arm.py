"""The device agent on the devices' own CPUs: the wheel installed into an arm64 or armhf
Debian bookworm root (what Raspberry Pi OS 64-bit and 32-bit are) under qemu-user-static,
as a device would, and the agent run there while these tests drive it from the host.

``make test-arm`` (``.ci/arm/test-arm``) prepares each root (``.ci/arm/session``) and runs
this file with ``EDGESHIP_TEST_AGENT_COMMAND`` pointing at the root's Python, together with
the agent's own process tests (tests/test_agent_process.py), which then start every
``edgeship-agent`` inside the root. Packages, configs and data live in a folder seen at the
same path on both sides, so the host's test code reads the agent's files and talks to its
control socket and REST port (the root shares the host's network). Everything a device
receives is made here on the host with the project's own tools (the workstation's job):
models, keys, signed bundles, offline packages, signed desired states.

Skipped outside the ARM stage (``make test`` has no emulated root).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from agent_fixtures import AgentProcess, AgentRepo, agent_cli, time_scale, write_config
from fleet_e2e_fixtures import GOOD, FleetAgent, FleetRelease, TestDirector, fleet_release, wait_for
from test_fleet_e2e import director  # the fleet tests' fixture: a TestDirector on the broker

__all__ = ["director", "fleet_release"]  # fixtures, re-exported for pytest

ARCH = os.environ.get("EDGESHIP_ARM_ARCH", "")
EXTRA = os.environ.get("EDGESHIP_ARM_EXTRA", "")
if not (ARCH and EXTRA and os.environ.get("EDGESHIP_TEST_AGENT_COMMAND")):
    pytest.skip(
        "the ARM stage runs these (make test-arm: the agent inside an emulated arm64/armhf root)",
        allow_module_level=True,
    )

MACHINE = {"arm64": "aarch64", "armhf": "armv7l"}[ARCH]
# The runtime each extra brings, and the only light runtime the agent may find there.
RUNTIME = {"litert": "litert", "tflite": "tflite_runtime", "onnx": "onnxruntime"}[EXTRA]
TFLITE = EXTRA in ("litert", "tflite")
needs_tflite = pytest.mark.skipif(not TFLITE, reason=f"edgeship[{EXTRA}] runs no TFLite model")
needs_onnx = pytest.mark.skipif(EXTRA != "onnx", reason=f"edgeship[{EXTRA}] runs no ONNX model")


def in_root(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The root's venv Python (the one the agent runs on) with ``args``."""
    command = [*shlex.split(os.environ["EDGESHIP_TEST_AGENT_COMMAND"]), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout * time_scale(), check=False)


def assert_inside_the_root(pid: int) -> None:
    """The process runs chrooted in the ARM root, on qemu: not a host agent passing for one."""
    assert os.path.realpath(f"/proc/{pid}/root") == os.path.realpath(os.environ["EDGESHIP_ARM_ROOT"])
    assert "qemu" in os.path.realpath(f"/proc/{pid}/exe")


def test_the_agent_runs_on_the_emulated_cpu_with_only_its_extras_runtime() -> None:
    result = in_root(
        "-c",
        "import json, platform, numpy, edgeship.agent.runtimes as r; print(json.dumps("
        "[platform.machine(), numpy.__version__, numpy.__file__, r.available_runtimes(include_tensorflow=False)]))",
    )
    assert result.returncode == 0, result.stderr
    machine, numpy_version, numpy_file, runtimes = json.loads(result.stdout)
    assert machine == MACHINE
    assert list(runtimes) == [RUNTIME], runtimes  # what the extra installs, and nothing else
    if ARCH == "armhf":  # Pi OS 32-bit: Debian's numpy (no armv7 wheels), not a build of our own
        assert numpy_file.startswith("/usr/lib/python3/dist-packages/") and numpy_version.startswith("1.")


@needs_tflite
def test_offline_install_serves_what_the_host_computes(tmp_path: Path, agent_repo: AgentRepo) -> None:
    """Installed offline from a package signed on the host, self-tested with its golden
    vectors on this CPU, and served over the REST API: the predictions equal the host's
    LiteRT outputs for the same inputs (the same model gives the same answers here)."""
    from edgeship.agent.runtimes import open_model

    config = write_config(tmp_path, agent_repo, window_s=0.3)
    result = agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active"]["version"] == "1.0.0"
    with open_model(agent_repo.fp32, prefer=["litert"]) as runner:
        (expected,) = runner.run([agent_repo.eval_x])
    agent = AgentProcess(config)
    try:
        doc = agent.wait_serving()
        assert doc["serving"]["runtime"] == RUNTIME and doc["serving"]["version"] == "1.0.0"
        assert_inside_the_root(agent.proc.pid)
        client = agent.client()
        try:
            code, body = client.predict("digits", agent_repo.eval_x.tolist())
        finally:
            client.close()
        assert code == 200, body
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-4)
    finally:
        agent.stop()
    assert agent.proc.returncode == 0


@needs_tflite
@pytest.mark.mosquitto
def test_fleet_join_through_the_hosts_broker(
    tmp_path: Path, mosquitto_broker, director: TestDirector, fleet_release: FleetRelease  # type: ignore[no-untyped-def]
) -> None:
    """The device joins its fleet through Mosquitto on the host: birth message, a signed
    desired state taken, the bundle fetched as MQTT blocks, self-tested, committed, served."""
    device = f"pi-{ARCH}"
    agent = FleetAgent(tmp_path / "device", fleet_release, mosquitto_broker.url, device)
    try:
        agent.wait_serving()
        assert_inside_the_root(agent.proc.pid)
        wait_for(lambda: "online" in director.status[device], 30, "the device's birth message")
        director.assign(device, GOOD)
        update = director.wait_update(device, GOOD, ("COMMITTED", "FAILED", "REJECTED"))
        assert update["state"] == "COMMITTED", update
        assert director.active_of(device) == {"name": "digits", "version": GOOD}
        code, body = agent.predict(fleet_release.eval_x[:4].tolist())
        assert code == 200, body
        np.testing.assert_allclose(np.asarray(body["predictions"]), fleet_release.golden_y[:4], atol=1e-4)
        assert not director.refused, director.refused  # all it published parses on the fleet side
    finally:
        agent.stop()
    wait_for(lambda: director.status[device][-1:] == ["offline"], 30, "the device to say offline")


@needs_onnx
def test_onnx_bundles_install_swap_and_roll_back(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    """edgeship[onnx] on arm64: the digits model converted to ONNX on the host (edgeship
    convert), bundled, signed and exported; installed offline, served, hot-swapped to the
    next version while the agent runs, and rolled back."""
    from fleet_e2e_fixtures import edgeship_cli

    from edgeship.agent.runtimes import open_model
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.release import ReleaseRepository

    model = tmp_path / "digits.onnx"
    edgeship_cli("convert", str(digits_files["model"]), "-o", str(model), "--calib", str(digits_files["calib"]))
    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="arm-onnx-tests")
    for version in ("1.0.0", "1.1.0"):
        out = tmp_path / f"digits-{version}.bundle"
        build_bundle(model, name="digits", version=version, out=out, golden=Path(f"{model}.golden.npz"))
        repo.publish(out)
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    with open_model(model, prefer=["onnxruntime"]) as runner:
        (expected,) = runner.run([x])
    (tmp_path / "packages").mkdir()
    release = AgentRepo(path=tmp_path / "repo", out=tmp_path / "packages", eval_x=x, fp32=model, int8=model)
    config = write_config(tmp_path / "device", release, window_s=0.3)
    result = agent_cli("install", str(release.export("1.0.0")), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    agent = AgentProcess(config)
    try:
        doc = agent.wait_serving()
        assert doc["serving"]["runtime"] == "onnxruntime" and doc["serving"]["version"] == "1.0.0"
        assert_inside_the_root(agent.proc.pid)
        client = agent.client()
        try:
            code, body = client.predict("digits", x.tolist())
            assert code == 200, body
            np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-4)
            result = agent_cli("install", str(release.export("1.1.0")), "--config", str(config), "--json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["active"]["version"] == "1.1.0"
            code, body = client.request("GET", "/v1/models/digits")
            assert code == 200 and body["model_version_status"][0]["version"] == "1.1.0", body
            result = agent_cli("rollback", "--config", str(config), "--json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["active"]["version"] == "1.0.0"
            code, body = client.predict("digits", x[:2].tolist())
            assert code == 200 and np.asarray(body["predictions"]).shape == (2, 10), body
        finally:
            client.close()
    finally:
        agent.stop()
    assert agent.proc.returncode == 0
