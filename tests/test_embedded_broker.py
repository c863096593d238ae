"""The embedded amqtt broker: paho clients (through MqttConnection) talk through it,
MQTT 5 clients fall back to 3.1.1, the last will fires for a SIGKILLed process,
block transfer works through it, and it starts and stops cleanly."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from transport_fixtures import Collector, python_child, read_line_with, wait_until

from edgeship.ota.blocks import BlockTransferConfig, MqttBlockFetcher
from edgeship.ota.errors import EdgeshipError
from edgeship.ota.topics import device_topic
from edgeship.ota.transport import (
    MQTT_V5,
    MQTT_V311,
    MqttConnection,
    ReconnectPolicy,
    TransportError,
)
from edgeship.toolkit.blockserver import BlockServer
from edgeship.toolkit.cli import main
from edgeship.toolkit.embedded_broker import EmbeddedBroker

FAST = ReconnectPolicy(initial_s=0.1, max_s=0.5)


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_clients_publish_and_subscribe_through_it(embedded: EmbeddedBroker) -> None:
    got = Collector()
    with MqttConnection(embedded.url, client_id="sub", reconnect=FAST) as sub, \
            MqttConnection(embedded.url, client_id="pub", reconnect=FAST) as pub:
        assert sub.protocol == MQTT_V311  # amqtt refused MQTT 5; the connection fell back by itself
        sub.subscribe("edgeship/lab/devices/+/events", got)
        for i in range(50):
            pub.publish(device_topic("lab", "d1", "events"), f"e{i}", qos=1)
        pub.publish(device_topic("lab", "d1", "telemetry"), b"other topic", qos=1)
        assert got.wait_for(lambda ms: len(ms) >= 50)
        time.sleep(0.2)
        assert got.payloads() == [f"e{i}".encode() for i in range(50)]  # in order, once each


def test_retained_state_reaches_a_late_subscriber(embedded: EmbeddedBroker) -> None:
    topic = device_topic("lab", "pi-01", "desired")
    with MqttConnection(embedded.url, client_id="ctl", reconnect=FAST) as ctl:
        ctl.publish(topic, b'{"seq":1}', qos=1, retain=True)
        ctl.publish(topic, b'{"seq":2}', qos=1, retain=True)
    got = Collector()
    with MqttConnection(embedded.url, client_id="pi-01", reconnect=FAST) as device:
        device.subscribe(topic, got)
        assert got.wait_for(lambda ms: len(ms) >= 1)
        time.sleep(0.3)
        # only the latest retained state; amqtt 0.12 sometimes delivers it more than once on
        # subscribe (docs/protocol.md), which the consumers of retained state tolerate
        assert {m.payload for m in got.messages if m.retain} == {b'{"seq":2}'}


def test_explicit_mqtt5_is_refused_clearly(embedded: EmbeddedBroker) -> None:
    with pytest.raises(TransportError, match="Unsupported protocol version"):
        MqttConnection(embedded.url, client_id="v5", protocol=MQTT_V5, reconnect=FAST).connect(3)


_CHILD = r"""
import sys, time
from edgeship.ota.transport import device_connection
url, topic = sys.argv[1], sys.argv[2]
device_connection(url, fleet="lab", device="pi-05").connect(10)
print("ready", flush=True)
time.sleep(120)
"""


def test_last_will_fires_for_a_killed_client(embedded: EmbeddedBroker) -> None:
    topic = device_topic("lab", "pi-05", "status")
    got = Collector()
    with MqttConnection(embedded.url, client_id="ctl", reconnect=FAST) as ctl:
        ctl.subscribe(topic, got)
        child = python_child(_CHILD, embedded.url, topic)
        try:
            read_line_with(child, "ready")
            assert got.wait_for(lambda ms: any(b'"online"' in m.payload for m in ms))
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert got.wait_for(lambda ms: b'"offline"' in ms[-1].payload, 10)
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=5)


def test_block_transfer_through_the_embedded_broker(embedded: EmbeddedBroker, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets").mkdir()
    data = hashlib.sha256(b"x").digest() * 20_000  # 640 kB
    (root / "targets" / "b.tar").write_bytes(data)
    with MqttConnection(embedded.url, client_id="ctl", reconnect=FAST) as ctl, \
            MqttConnection(embedded.url, client_id="pi-01", reconnect=FAST) as device, \
            BlockServer(ctl, root):
        fetcher = MqttBlockFetcher(device, fleet="lab", device="pi-01", work_dir=tmp_path / "w",
                                   config=BlockTransferConfig(block_size=16384, window=16))
        assert b"".join(fetcher.fetch("edgeship://targets/b.tar")) == data


def test_stop_drops_clients_and_they_reconnect_to_a_new_broker_on_the_same_port() -> None:
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    port = broker.port
    client = MqttConnection(broker.url, client_id="c", reconnect=FAST).connect(5)
    try:
        broker.stop()
        assert wait_until(lambda: not client.is_connected, 10)
        again = EmbeddedBroker("127.0.0.1", port).start()
        try:
            assert client.wait_connected(10) and client.connects == 2
        finally:
            again.stop()
    finally:
        client.close()


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(EdgeshipError, match=f"could not listen on 127.0.0.1:{port}"):
            EmbeddedBroker("127.0.0.1", port).start(timeout=5)


def test_module_entry_point_runs_until_interrupted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.embedded_broker", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line_with(process, "embedded broker on")
        assert f"mqtt://127.0.0.1:{port}" in line
        with MqttConnection(f"mqtt://127.0.0.1:{port}", client_id="x", reconnect=FAST) as conn:
            conn.publish("a/b", "x", qos=1)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


def test_an_agent_started_before_the_broker_loses_nothing_in_the_version_fallback() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    got = Collector()
    conn = MqttConnection(f"mqtt://127.0.0.1:{port}", client_id="early", reconnect=FAST).start()
    conn.subscribe("edgeship/lab/devices/early/#", got)
    errors: list[Exception] = []

    def report() -> None:
        try:  # published before any broker exists; must arrive once the version is settled
            conn.publish(device_topic("lab", "early", "reported"), b'{"state":"IDLE"}', qos=1, retain=True,
                         wait=False, timeout=20)
        except Exception as exc:  # pragma: no cover  # noqa: BLE001 - the assertion below shows it
            errors.append(exc)

    import threading

    sender = threading.Thread(target=report)
    sender.start()
    time.sleep(0.5)
    broker = EmbeddedBroker("127.0.0.1", port).start()
    try:
        sender.join(20)
        assert not errors
        assert conn.wait_connected(10) and conn.protocol == MQTT_V311
        assert got.wait_for(lambda ms: any(m.payload == b'{"state":"IDLE"}' for m in ms), 10)
    finally:
        conn.close()
        broker.stop()


def test_module_entry_point_on_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "edgeship.toolkit.embedded_broker", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: embedded MQTT broker could not listen on 127.0.0.1:{port} "
        "(OSError: [Errno 98] Address already in use)"], result.stderr


# -- `edgeship broker run` with an address it cannot listen on: one clear line, whatever the port.

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
