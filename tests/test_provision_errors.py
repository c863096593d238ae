"""Provisioning errors are one line on stderr: a host that is unreachable, or that speaks no SSH
(paramiko's transport thread would log a 20-line traceback of its own), and nonsense options,
refused before any host is touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.cli import main
from edgeship.toolkit.provisioning import ProvisionOptions


def _closing_server() -> tuple[socket.socket, int]:
    """A TCP listener that accepts and hangs up at once: paramiko reads no SSH banner."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.mark.parametrize("kind", ["no-ssh-banner", "refused"])
def test_an_unreachable_host_is_one_line(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("fabric")
    server, port = _closing_server()
    if kind == "refused":
        server.close()  # nothing listens there any more
    (tmp_path / "root.json").write_text("{}")
    (tmp_path / "director.pub").write_text("key")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgeship.toolkit.cli", "device", "provision", f"pi@127.0.0.1:{port}",
             "--fleet", "lab", "--root", str(tmp_path / "root.json"), "--director-key",
             str(tmp_path / "director.pub"), "--dry-run"],
            capture_output=True, text=True, timeout=120, check=False,
            env={k: v for k, v in os.environ.items() if k != "EDGESHIP_SSH_DEBUG"})
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach pi@127.0.0.1:{port} over SSH: ")
    assert "Traceback" not in result.stderr and result.stdout == ""


# -- Nonsense options are refused before any host is touched.

@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_online_timeout_must_be_positive_and_finite(timeout: float) -> None:
    with pytest.raises(BadInputError, match="--online-timeout"):
        ProvisionOptions(fleet="plant", online_timeout=timeout)


def test_bad_online_timeout_is_refused_before_ssh(tmp_path: Path) -> None:
    root, key = tmp_path / "root.json", tmp_path / "director.pub"
    root.write_text("{}")
    key.write_text("x")
    # port 1 on loopback: if the command got as far as SSH it would fail with "cannot reach" (exit 1)
    result = CliRunner().invoke(main, ["device", "provision", "pi@127.0.0.1", "--port", "1", "--fleet", "plant",
                                       "--root", str(root), "--director-key", str(key), "--online-timeout", "-1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --online-timeout")


def test_a_bad_store_url_is_refused_before_ssh(tmp_path: Path) -> None:
    root, key = tmp_path / "root.json", tmp_path / "director.pub"
    root.write_text("{}")
    key.write_text("x")
    result = CliRunner().invoke(main, ["device", "provision", "pi@127.0.0.1", "--port", "1", "--fleet", "plant",
                                       "--root", str(root), "--director-key", str(key), "--tags", "site=p3",
                                       "--db", "mysql://x@h/db"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: store URL")
