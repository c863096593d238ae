"""Fixtures of the device-agent tests: a real release repository
(``ReleaseRepository``) holding digits bundles, good and bad, exported as real
offline packages; agent configs; a plain TF Serving-style HTTP client."""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from polling import time_scale, wait_for  # noqa: F401  (wait_for re-exported for the tests)

from edgeship.agent.config import AgentConfig, load_config, render_config
from edgeship.agent.runtimes import open_model
from edgeship.ota.errors import EdgeshipError
from edgeship.ota.golden import GoldenVectors

PASSPHRASE = "agent-tests-root-passphrase"
FLEET = "lab"
DEVICE = "dev-1"
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_golden(
    model: Path, x: np.ndarray, out: Path, atol: float = 1e-4, outputs_from: Path | None = None
) -> Path:
    """Golden vectors of ``model`` (or of ``outputs_from``'s outputs, to make a mismatch)."""
    with open_model(outputs_from or model, prefer=["litert", "tflite_runtime"]) as runner:
        (y,) = runner.run([x])
    GoldenVectors(
        ("image",), (x.astype(np.float32),), ("probs",), (y.astype(np.float32),), atol=atol
    ).save(out)
    return out


@dataclass
class AgentRepo:
    """A release repository with digits bundles published; ``export`` makes a fresh
    offline package (each with the fleet's next director sequence)."""

    path: Path
    out: Path
    eval_x: np.ndarray
    fp32: Path
    int8: Path

    @property
    def repo(self) -> Any:
        from edgeship.ota.release import ReleaseRepository

        return ReleaseRepository(self.path)

    def export(
        self,
        version: str,
        *,
        fleet: str = FLEET,
        name: str = "digits",
        tag: str = "",
        now: dt.datetime | None = None,
        expires_in: dt.timedelta = dt.timedelta(days=30),
    ) -> Path:
        out = self.out / f"{name}-{version}{tag}-{time.monotonic_ns()}.package"
        self.repo.export(name, version, out, fleet=fleet, now=now, expires_in=expires_in)
        return out

    @property
    def root_json(self) -> Path:
        return self.repo.root_metadata_path

    @property
    def director_pub(self) -> Path:
        return self.repo.director_public_key_path


BUNDLES = {
    # version: (model kind, bundle options) -- published in this (increasing) order
    "1.0.0": "fp32",
    "2.0.0": "int8",
    "2.1.0": "bad-golden",  # golden vectors that the model does not reproduce -> FAILED
    "2.2.0": "needs-runtime",  # needs a runtime version this device lacks -> REJECTED
    "2.3.0": "other-arch",  # built for another architecture -> REJECTED
    "2.4.0": "corrupt-model",  # signed and intact, but the model does not load -> FAILED
    "3.0.0": "fp32",
}


SECOND_MODEL = "numbers"
"""A second model name in the agent repository: versions 1.0.0 (fp32) and 2.0.0 (int8)."""

_REQUIREMENTS: dict[str, dict[str, Any]] = {
    "needs-runtime": {"min_version": "99.0"},
    "other-arch": {"architectures": ["riscv64"]},
}


def build_agent_repo(
    digits_tflite: Path,
    digits_int8_tflite: Path,
    digits_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AgentRepo:
    """The release repository (the session fixture ``agent_repo`` in conftest.py builds
    it once for the whole run)."""
    return _build(digits_tflite, digits_int8_tflite, digits_files, tmp_path_factory)


def _build(
    digits_tflite: Path,
    digits_int8_tflite: Path,
    digits_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AgentRepo:
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.release import ReleaseRepository

    base = tmp_path_factory.mktemp("agent-repo")
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    repo = ReleaseRepository(base / "repo")
    repo.init(root_passphrase=PASSPHRASE)
    golden_fp32 = make_golden(digits_tflite, x, base / "fp32.golden.npz")
    golden_int8 = make_golden(digits_int8_tflite, x, base / "int8.golden.npz", atol=1e-3)
    bad_golden = make_golden(
        digits_int8_tflite, x, base / "bad.golden.npz", atol=1e-7, outputs_from=digits_tflite
    )
    with open_model(digits_int8_tflite) as runner:
        int8_signature = runner.signature.to_dict()
    corrupt = base / "corrupt.tflite"
    corrupt.write_bytes(digits_int8_tflite.read_bytes()[:3000])
    for version, kind in BUNDLES.items():
        out = base / f"digits-{version}.bundle"
        if kind == "fp32":
            build_bundle(digits_tflite, name="digits", version=version, out=out, golden=golden_fp32)
        elif kind == "int8":
            build_bundle(
                digits_int8_tflite, name="digits", version=version, out=out, golden=golden_int8
            )
        elif kind == "bad-golden":
            build_bundle(
                digits_int8_tflite, name="digits", version=version, out=out, golden=bad_golden
            )
        elif kind in _REQUIREMENTS:  # a bundle this device cannot run: REJECTED
            build_bundle(
                digits_int8_tflite,
                name="digits",
                version=version,
                out=out,
                golden=golden_int8,
                report={"signature": int8_signature, "runtime_requirements": _REQUIREMENTS[kind]},
            )
        elif kind == "corrupt-model":
            build_bundle(
                corrupt,
                name="digits",
                version=version,
                out=out,
                report={"signature": int8_signature},
            )
        repo.publish(out)
    # a second model name (another digits build) for the agents that serve several at once
    for version, model, golden in (("1.0.0", digits_tflite, golden_fp32), ("2.0.0", digits_int8_tflite, golden_int8)):
        out = base / f"{SECOND_MODEL}-{version}.bundle"
        build_bundle(model, name=SECOND_MODEL, version=version, out=out, golden=golden)
        repo.publish(out)
    packages = base / "packages"
    packages.mkdir()
    return AgentRepo(
        path=base / "repo", out=packages, eval_x=x, fp32=digits_tflite, int8=digits_int8_tflite
    )


def tamper_package(package: Path, out: Path) -> Path:
    """A copy of ``package`` with one byte of its bundle flipped (hash no longer matches)."""
    with tarfile.open(package) as src, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            if member.name.startswith("targets/"):
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def write_config(
    folder: Path,
    repo: AgentRepo,
    *,
    port: int = 0,
    window_s: float = 0.3,
    extra: str = "",
    device: str = DEVICE,
    fleet: str = FLEET,
) -> Path:
    """A config made by the real ``render_config`` (what ``edgeship-agent init`` writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = render_config(
        data=str(folder / "data"),
        device_id=device,
        fleet=fleet,
        root=str(repo.root_json),
        director_key=str(repo.director_pub),
        bind=f"127.0.0.1:{port}",
    )
    text = text.replace("window_s = 60.0", f"window_s = {window_s}")
    text += extra
    path = folder / "agent.toml"
    path.write_text(text)
    return path


def agent_config(folder: Path, repo: AgentRepo, **overrides: Any) -> AgentConfig:
    config = load_config(write_config(folder, repo))
    return dataclasses.replace(config, **overrides) if overrides else config


class TFServingClient:
    """What an application written for TF Serving does: JSON over a keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        payload = (
            raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        )
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        ctype = response.getheader("Content-Type", "")
        return response.status, (json.loads(data) if "json" in ctype else data.decode())

    def predict(self, name: str, instances: Any) -> tuple[int, Any]:
        return self.request("POST", f"/v1/models/{name}:predict", {"instances": instances})

    def close(self) -> None:
        self.conn.close()


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_AGENT_TEST_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def agent_command() -> list[str]:
    """The program that runs ``edgeship-agent``: this Python, or, where
    EDGESHIP_TEST_AGENT_COMMAND is set, that command line (the ARM stage runs the agent
    installed in an emulated arm64/armhf root this way: ``.ci/arm/in-root ROOT PYTHON``)."""
    command = os.environ.get("EDGESHIP_TEST_AGENT_COMMAND", "")
    return [*(shlex.split(command) if command else [sys.executable]), "-m", "edgeship.agent.cli"]


def agent_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``edgeship-agent`` as a user would (a real process)."""
    return subprocess.run(
        [*agent_command(), *args],
        capture_output=True,
        text=True,
        env=env or agent_env(),
        timeout=timeout * time_scale(),
    )


class AgentProcess:
    """``edgeship-agent run`` in its own process; killed with SIGKILL by tests."""

    def __init__(
        self, config: Path, env: dict[str, str] | None = None, preexec_fn: Any = None, args: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.log = config.parent / f"agent-{time.monotonic_ns()}.log"
        self._log_handle = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [*agent_command(), "run", "--config", str(config), *args],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env or agent_env(),
            preexec_fn=preexec_fn,  # e.g. a lower file limit for the agent alone (rlimit only)
        )

    def wait_serving(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the control socket to answer; returns the status document."""
        from edgeship.agent.config import load_config
        from edgeship.agent.control import ControlClient

        socket_path = load_config(self.config).control_socket
        deadline = time.monotonic() + timeout * time_scale()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                return dict(
                    ControlClient(socket_path, timeout=5 * time_scale()).call("status")["status"]
                )
            except EdgeshipError:
                time.sleep(0.05)
        raise AssertionError(f"agent did not start:\n{self.log.read_text()[-3000:]}")

    def status(self) -> dict[str, Any]:
        from edgeship.agent.config import load_config
        from edgeship.agent.control import ControlClient

        return dict(
            ControlClient(load_config(self.config).control_socket, timeout=10 * time_scale()).call("status")[
                "status"
            ]
        )

    def client(self) -> TFServingClient:
        host, port = self.status()["server"].removeprefix("http://").rsplit(":", 1)
        return TFServingClient(host, int(port))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=30)
        self._log_handle.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15 * time_scale())
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_handle.close()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (or another /proc/PID/status size, e.g. VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no {field} for pid {pid}")


def status(config: Path) -> dict[str, Any]:
    result = agent_cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
