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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mqtt_broker import free_port

if TYPE_CHECKING:
    from edgeship.toolkit.store import FleetStore

__all__ = ["PostgresServer", "SimulatedFleet", "postgres_binaries", "postgres_server", "store"]


def postgres_binaries() -> Path | None:
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
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--"] + command
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PostgresServer:
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


class SimulatedFleet:
    """Devices that answer desired states at once, and the controller's reconcile loop, over a real store.

    What the controller does with the store (step every live rollout, carry out the outbox), with the
    broker and the agents replaced by direct store writes: devices in ``fail`` report FAILED for any
    new version, the others COMMITTED; rollbacks succeed. The loop is the reference the controller's
    own reconcile follows.
    """

    def __init__(self, store: FleetStore, fleet: str, n: int, version: str = "1.0", name: str = "digits",
                 fail: set | None = None, now: float | None = None) -> None:
        from edgeship.ota.protocol import ReportedMessage, StatusMessage
        from edgeship.toolkit.store import IngestItem

        self.store, self.fleet, self.name = store, fleet, name
        self.fail = fail or set()
        # The CLI stamps rollouts with the wall clock; the simulated controller must share it.
        self.now = time.time() if now is None else now
        self.devices = [f"dev-{i:03d}" for i in range(n)]
        self._reported, self._item = ReportedMessage, IngestItem
        store.ingest([IngestItem(fleet, d, StatusMessage("online"), self.now) for d in self.devices]
                     + [IngestItem(fleet, d, self._report(d, version), self.now) for d in self.devices])

    def _report(self, device: str, version: str | None, update: dict | None = None) -> object:
        active = {"name": self.name, "version": version} if version else None
        return self._reported(device=device, ts=self.now, active=active, update=update)

    def tick(self, dt: float = 1.0) -> None:
        from edgeship.toolkit.rollouts import AssignVersion

        self.now += dt
        for rollout_id in self.store.live_rollout_ids():
            self.store.reconcile_rollout(rollout_id, self.now)
        for test in self.store.list_abtests(states=["RUNNING"]):
            self.store.reconcile_abtest(test.id, self.now)
        self.now += dt
        items = []
        for pending in self.store.pending_actions():
            action = pending.action
            sequence = self.store.next_desired_sequence(action.device)
            is_assign = isinstance(action, AssignVersion)
            self.store.record_desired(fleet=pending.fleet, device=action.device, sequence=sequence,
                                      name=action.name, version=action.version,
                                      action="install" if is_assign else "rollback", issued_at=self.now,
                                      rollout_id=pending.rollout_id)
            current = self.store.get_device(action.device)
            bundle = {"name": action.name, "version": action.version}
            if is_assign and action.device in self.fail:
                report = self._report(action.device, current.active_version, {"state": "FAILED", "bundle": bundle})
            else:
                report = self._report(action.device, action.version, {"state": "COMMITTED", "bundle": bundle})
            items.append(self._item(pending.fleet, action.device, report, self.now))
            self.store.complete_action(pending.id, self.now)
        if items:
            self.store.ingest(items)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    """An empty fleet store on SQLite, and on PostgreSQL (slow) where its binaries are installed;
    a test module imports it with ``postgres_server``."""
    from edgeship.toolkit.store import FleetStore

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        url = request.getfixturevalue("postgres_server").new_database()
    with FleetStore(url) as opened:
        yield opened
