"""`edgeship broker run` with an address it cannot listen on: one clear line, whatever the port."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeship.ota.errors import EdgeshipError
from edgeship.toolkit.cli import main
from edgeship.toolkit.embedded_broker import EmbeddedBroker

pytest.importorskip("amqtt")


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid", "192.0.2.1"])
def test_an_address_it_cannot_listen_on_is_a_clear_error(host: str) -> None:
    with pytest.raises(EdgeshipError, match=f"could not listen on {host}"):
        EmbeddedBroker(host, 0).start(timeout=5)


def test_broker_run_with_a_bad_host_is_one_line() -> None:
    result = CliRunner().invoke(main, ["broker", "run", "--host", "999.1.1.1", "--port", "0"])
    assert result.exit_code != 0 and not isinstance(result.exception, OSError), result.output
    assert result.stderr.startswith("error: embedded MQTT broker could not listen on 999.1.1.1")
    assert result.stderr.count("\n") == 1


def test_a_fixed_port_on_a_bad_host_is_one_line_without_amqtt_s_traceback() -> None:
    from mqtt_broker import free_port

    # a real process: amqtt logs through the root logger's last-resort handler there
    result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "broker", "run", "--host", "192.0.2.1",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: embedded MQTT broker could not listen on 192.0.2.1"), result.stderr


def test_ipv6_loopback_still_listens() -> None:
    import socket

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 here")
    broker = EmbeddedBroker("::1", 0)
    try:
        broker.start(timeout=10)
    except EdgeshipError as exc:
        if "Address family" in exc.message or "Cannot assign" in exc.message:
            pytest.skip(f"no IPv6 loopback here: {exc.message}")
        raise
    try:
        assert broker.port > 0
        socket.create_connection(("::1", broker.port), timeout=5).close()
    finally:
        broker.stop()
