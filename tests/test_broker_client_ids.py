"""A device's MQTT client id is bound to its identity: with the configuration `broker config`
generates, on a real Mosquitto, device A's certificate (or password) asking for devB's client id
does not take devB's session; devB stays connected and keeps receiving. The embedded broker with a
broker folder refuses such a CONNECT outright."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from broker_fixtures import connect, start_broker
from mqtt_broker import free_port, mosquitto_binary

from edgeship.toolkit.broker_config import client_id_allowed

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


def t(device: str, kind: str) -> str:
    return f"edgeship/f1/devices/{device}/{kind}"


@pytest.mark.parametrize("kind, identity, client_id, allowed", [
    ("device", "dev-b", "dev-b", True),
    ("device", "dev-a", "dev-b", False),           # another device's id
    ("device", "dev-a", "dev-a-2", False),         # a device has exactly one id
    ("device", "dev-a", "", False),
    ("controller", "edgeship-controller", "edgeship-controller", True),
    ("controller", "edgeship-controller", "edgeship-controller-host-42", True),  # a replica
    ("controller", "edgeship-controller", "edgeship-controller-", False),
    ("controller", "edgeship-controller", "dev-b", False),
])
def test_client_id_allowed(kind: str, identity: str, client_id: str, allowed: bool) -> None:
    assert client_id_allowed(kind, identity, client_id) is allowed


@pytest.mark.mosquitto
@needs_mosquitto
@pytest.mark.parametrize("auth", ["cert", "password"])
def test_device_a_cannot_take_device_b_s_session_on_mosquitto(tmp_path: Path, auth: str) -> None:
    b = start_broker(tmp_path, auth="both")
    try:
        a, victim_creds = b.device("dev-a", auth=auth), b.device("dev-b", auth=auth)
        ctl, outcome = b.connect_as(b.controller())
        assert ctl is not None, outcome
        assert ctl.subscribe("edgeship/#")
        victim, outcome = b.connect_as(victim_creds, client_id="dev-b")
        assert victim is not None, outcome
        assert victim.subscribe(t("dev-b", "desired"))
        for attempt in range(10):  # what knocked devB offline every second before
            impostor, outcome = b.connect_as(a, client_id="dev-b")
            assert impostor is not None, outcome  # the broker renames it to its identity, dev-a
            # it is dev-a: its own subtree works, devB's does not
            impostor.publish(t("dev-a", "events"), f"own-{attempt}".encode())
            impostor.publish(t("dev-b", "events"), f"forged-{attempt}".encode())
            assert ctl.wait_for_payload(t("dev-a", "events"), f"own-{attempt}".encode())
            impostor.close()
        time.sleep(0.5)
        assert not victim.disconnected.is_set(), "devB lost its connection"
        assert all(not p.startswith(b"forged") for _, p in ctl.drain())
        # and devB still gets what is sent to it, on the connection it had all along
        ctl.publish(t("dev-b", "desired"), b"still-here", qos=1)
        assert victim.wait_for_payload(t("dev-b", "desired"), b"still-here")
        log = b.broker.log_path.read_text()
        assert " as dev-a " in log and log.count(" as dev-b ") == 1, log[-2000:]
        for client in (victim, ctl):
            client.close()
    finally:
        b.stop()


def test_device_a_cannot_take_device_b_s_session_on_the_embedded_broker(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    from broker_fixtures import creds

    from edgeship.toolkit.broker_config import BrokerSettings
    from edgeship.toolkit.embedded_rules import RuledEmbeddedBroker
    from edgeship.toolkit.identities import BrokerFolder

    folder = BrokerFolder(tmp_path / "broker")
    folder.create_or_update(BrokerSettings(auth="password", run_as=""))
    for device in ("dev-a", "dev-b"):
        folder.issue_device(device, "f1", tmp_path / device)
    a, victim_creds = creds(tmp_path / "dev-a"), creds(tmp_path / "dev-b")
    port = free_port()
    broker = RuledEmbeddedBroker("127.0.0.1", port, folder.path)
    broker.start()
    try:
        def as_device(c: dict, client_id: str) -> tuple:
            return connect(port, tls=False, username=c["username"], password=Path(c["password"]).read_text().strip(),
                           client_id=client_id)

        victim, outcome = as_device(victim_creds, "dev-b")
        assert victim is not None, outcome
        for _ in range(3):
            impostor, outcome = as_device(a, "dev-b")
            assert impostor is None and "refused" in outcome, outcome
        own, outcome = as_device(a, "dev-a")  # positive control: A with its own id connects
        assert own is not None, outcome
        time.sleep(0.5)
        assert not victim.disconnected.is_set()
        for client in (own, victim):
            client.close()
    finally:
        broker.stop()
