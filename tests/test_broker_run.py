"""`edgeship broker run`: the embedded development broker, as a real process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import pytest
from broker_fixtures import connect, stop_gracefully
from click.testing import CliRunner
from mqtt_broker import free_port

from edgeship.toolkit.cli import main

HAVE_EMBEDDED = importlib.util.find_spec("edgeship.toolkit.embedded_broker") is not None


@pytest.mark.skipif(HAVE_EMBEDDED, reason="the embedded broker exists: covered by the process test")
def test_broker_run_without_the_embedded_broker_says_so() -> None:
    r = CliRunner().invoke(main, ["broker", "run", "--port", str(free_port())], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.startswith("error: the embedded broker") and r.output.count("\n") == 1


@pytest.mark.skipif(not HAVE_EMBEDDED, reason="edgeship.toolkit.embedded_broker is not there yet")
def test_broker_run_serves_mqtt_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "broker", "run", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        client = None
        while client is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            client, _ = connect(port, tls=False, timeout=1)
            if client is None:
                time.sleep(0.2)
        assert client is not None, "the embedded broker never accepted a connection"
        client.subscribe("edgeship/f1/devices/d1/status")
        client.publish("edgeship/f1/devices/d1/status", b"hello")
        assert client.wait_for("edgeship/f1/devices/d1/status") == b"hello"
        client.close()
    finally:
        stop_gracefully(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
