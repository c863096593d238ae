"""The agent after an update idles as small as before it: the offline package's
verification (TUF, cryptography, tar extraction) runs in a short-lived child
process (edgeship.agent.isolated), the driver still owns the state machine and the
error mapping, and the end of an update collects and trims the heap."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_fixtures import AgentProcess, AgentRepo, agent_cli, rss_mb, write_config

from edgeship.agent.isolated import (
    VERIFY_IN_PROCESS_ENV,
    IsolatedSource,
    error_payload,
    isolate_verification,
    rebuild_error,
)
from edgeship.agent.loading import release_memory
from edgeship.agent.runtimes import RuntimeUnavailableError
from edgeship.agent.sources import OfflinePackageSource
from edgeship.agent.state_machine import Event
from edgeship.agent.updater import classify_error
from edgeship.ota.director import DirectorSignatureError
from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError


# -- the child's error comes back mapped the same way (pure) ------------------------------------------
@pytest.mark.parametrize(
    ("raised", "cls", "exit_code"),
    [
        # a family the agent has loaded: that family's class
        (BadInputError("m"), BadInputError, 2),
        (SecurityError("m"), SecurityError, 4),
        # a subclass from a module the agent must not import (cryptography would come with
        # it): its family's class, which keeps REJECTED, with the child's exit code
        (DirectorSignatureError("m"), SecurityError, 4),
        (RuntimeUnavailableError("m", exit_code=4), RuntimeUnavailableError, 4),
        (EdgeshipError("m"), EdgeshipError, 1),
        # a bug in the child (no family): FAILED with its "Type: message" reason
        (KeyError("x"), EdgeshipError, 1),
    ],
)
def test_child_errors_keep_family_message_and_exit_code(
    raised: Exception, cls: type, exit_code: int
) -> None:
    payload = pickle.loads(pickle.dumps(error_payload(raised)))  # what crosses the pipe
    exc = rebuild_error(payload)
    assert type(exc) is cls
    message = "KeyError: 'x'" if isinstance(raised, KeyError) else "m"
    assert isinstance(exc, EdgeshipError) and exc.message == message and exc.exit_code == exit_code
    rejected = isinstance(raised, (SecurityError, RuntimeUnavailableError))
    assert classify_error(exc) is (Event.REJECT if rejected else Event.FAILURE)


def test_an_unknown_family_comes_back_as_the_base_error() -> None:
    exc = rebuild_error(("error", "from_a_newer_child", "m", 3))
    assert type(exc) is EdgeshipError and exc.exit_code == 3


def test_isolation_is_the_default_and_the_env_switch_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(VERIFY_IN_PROCESS_ENV, raising=False)
    assert isinstance(isolate_verification(OfflinePackageSource(tmp_path / "p")), IsolatedSource)
    monkeypatch.setenv(VERIFY_IN_PROCESS_ENV, "1")
    assert isinstance(isolate_verification(OfflinePackageSource(tmp_path / "p")), OfflinePackageSource)
    assert isinstance(IsolatedSource(OfflinePackageSource(tmp_path / "p")), IsolatedSource)


def test_release_memory_trims_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """It calls glibc's malloc_trim(0) where libc has it, and only collects where not."""
    import ctypes

    calls: list[int] = []

    class Libc:
        def __init__(self, with_trim: bool) -> None:
            if with_trim:
                self.malloc_trim = lambda pad: calls.append(pad)

    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: Libc(with_trim=True))
    assert release_memory() is True and calls == [0]
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: Libc(with_trim=False))
    assert release_memory() is False and calls == [0]


def test_missing_package_fails_in_the_parent_with_the_same_message(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """The parent checks the package and the space itself, before any child starts."""
    import datetime as dt

    from agent_fixtures import agent_config

    from edgeship.agent.sources import SourceContext

    config = agent_config(tmp_path, agent_repo)
    ctx = SourceContext(config, 0, dt.datetime.now(dt.timezone.utc), tmp_path / "w", tmp_path / "t")
    source = IsolatedSource(OfflinePackageSource(tmp_path / "gone.package"))
    with pytest.raises(BadInputError, match="no such file"):
        source.admit(ctx)


# -- a real agent process ---------------------------------------------------------------------------
def _mapped(pid: int, fragment: str) -> bool:
    return fragment in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_update_through_the_running_agent_keeps_verification_out_of_it(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """install 1.0.0, then 2.0.0 through the running agent's control socket: the agent
    ends COMMITTED on 2.0.0, serves it, and never loaded cryptography's extension (the
    verification ran in the child); a tampered package is still REJECTED with the
    verification's reason. Its idle RSS grows by well under the ~15 MB the in-process
    verification cost (a loose bound: the exact figure is the benchmark's)."""
    from agent_fixtures import tamper_package

    config = write_config(tmp_path, agent_repo, window_s=0.2)
    result = agent_cli("install", agent_repo.export("1.0.0"), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        deadline = time.monotonic() + 60
        while agent.status()["update"]["state"] != "COMMITTED":
            assert time.monotonic() < deadline, agent.status()["update"]
            time.sleep(0.1)
        time.sleep(1.0)
        pid = agent.proc.pid
        before = rss_mb(pid)
        result = agent_cli("install", agent_repo.export("2.0.0"), "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["update"]["state"] == "COMMITTED" and doc["active"]["version"] == "2.0.0"
        states = [h["state"] for h in doc["update"]["history"]]
        assert states[:4] == ["DISK_CHECK", "FETCHING", "VERIFYING", "INSTALLING"], states
        code, pred = agent.client().predict("digits", [[[[0.0]] * 8] * 8])
        assert code == 200 and len(pred["predictions"][0]) == 10
        time.sleep(2.0)
        after = rss_mb(pid)
        assert not _mapped(pid, "cryptography/hazmat/bindings/_rust"), (
            "cryptography entered the agent"
        )
        assert not _mapped(pid, "_cffi_backend")
        assert after - before < 6.0, (before, after)

        bad = tamper_package(agent_repo.export("3.0.0"), tmp_path / "bad.package")
        result = agent_cli("install", str(bad), "--config", str(config), "--json")
        doc = json.loads(result.stdout)
        assert result.returncode == 4 and doc["update"]["state"] == "REJECTED", doc["update"]
        assert doc["active"]["version"] == "2.0.0"
        assert not _mapped(pid, "cryptography/hazmat/bindings/_rust")
    finally:
        agent.stop()


def test_in_process_switch_still_verifies_in_the_agent(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """EDGESHIP_AGENT_VERIFY_IN_PROCESS=1 (what the benchmark compares against): the same
    update, verified in the driver's own process, loads cryptography there; by default it
    does not."""
    config = write_config(tmp_path, agent_repo, window_s=0.2)
    script = (
        "import sys\n"
        "from edgeship.agent.config import load_config\n"
        "from edgeship.agent.serving import ServingModel\n"
        "from edgeship.agent.isolated import isolate_verification\n"
        "from edgeship.agent.sources import OfflinePackageSource\n"
        "from edgeship.agent.updater import UpdateDriver\n"
        "d = UpdateDriver(load_config(sys.argv[1]), serving=ServingModel())\n"
        "d.begin(isolate_verification(OfflinePackageSource(sys.argv[2]))); r = d.run()\n"
        "print(r.state, 'cryptography' in sys.modules, 'tensorflow' in sys.modules)\n"
    )
    package = agent_repo.export("1.0.0")
    out = {}
    for flag in ("1", "0"):
        env = {**os.environ, VERIFY_IN_PROCESS_ENV: flag}
        data = tmp_path / "data"
        if data.exists():
            import shutil

            shutil.rmtree(data)
        done = subprocess.run(
            [sys.executable, "-c", script, str(config), str(package)],
            capture_output=True,
            check=False,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        out[flag] = done.stdout.split()
    # in-process: the verification's imports are in the process (and never TensorFlow, so the
    # child, which runs this same code, is TensorFlow-free too); isolated: not even cryptography
    assert out["1"] == ["COMMITTED", "True", "False"]
    assert out["0"] == ["COMMITTED", "False", "False"]
