"""Fixtures for the fleet tests: a real PostgreSQL server (initdb + pg_ctl on a free loopback
port in a temporary folder), and message builders.

PostgreSQL refuses to run as root, so when the tests run as root the cluster
is created and started as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

__all__ = ["PostgresServer", "postgres_binaries", "postgres_server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_binaries() -> Optional[Path]:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    base = Path("/usr/lib/postgresql")
    if base.is_dir():
        for version in sorted(base.iterdir(), reverse=True):
            if (version / "bin" / "initdb").exists():
                return version / "bin"
    return None


class PostgresServer:
    """One throwaway cluster with trust authentication on 127.0.0.1."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--"] + command
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        if self.user is not None:
            shutil.chown(self.folder, self.user)
        result = self._run(self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                           "--no-sync", "-E", "UTF8")
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.folder / "log", "-o", options,
                           "-w", "-t", "60", "start")
        if result.returncode != 0:
            log = (self.folder / "log").read_text()[-2000:] if (self.folder / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr[-1000:]} {log}")
        return self

    def stop(self) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"edgeship_test_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL")
    server = PostgresServer(bindir).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    try:
        yield server
    finally:
        server.stop()
