"""The last provisioning step, against a real Mosquitto from `broker config`: the
controller identity waits for the device's own retained `online` status."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from broker_fixtures import start_broker
from mqtt_broker import mosquitto_binary

from edgeship.ota.protocol import StatusMessage, encode_message
from edgeship.toolkit.provisioning import ProvisionError, wait_online

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]


def test_wait_online_sees_the_device_and_only_the_device(tmp_path: Path) -> None:
    b = start_broker(tmp_path, auth="both")
    try:
        dev, other = b.device("dev-on"), b.device("dev-other")
        dc, outcome = b.connect_as(dev)
        oc, outcome2 = b.connect_as(other)
        assert dc is not None and oc is not None, (outcome, outcome2)
        online = encode_message(StatusMessage("online", time.time()))
        # another device saying "online" on its own topic does not count
        oc.publish("edgeship/f1/devices/dev-other/status", online, retain=True)
        with pytest.raises(ProvisionError, match="did not report online on edgeship/f1/devices/dev-on/status"):
            wait_online(b.folder, "f1", "dev-on", timeout=1.5)
        # "offline" does not count either; "online" from the device itself does, live or retained
        dc.publish("edgeship/f1/devices/dev-on/status", encode_message(StatusMessage("offline")), retain=True)
        timer = threading.Timer(0.7, lambda: dc.publish("edgeship/f1/devices/dev-on/status", online, retain=True))
        timer.start()
        waited = wait_online(b.folder, "f1", "dev-on", timeout=10)
        assert 0.5 < waited < 10
        assert wait_online(b.folder, "f1", "dev-on", timeout=5) < 2  # retained: at once
        dc.close()
        oc.close()
    finally:
        b.stop()


def test_waiting_for_devices_leaves_the_running_controller_connected(tmp_path: Path) -> None:
    """The broker names each client by its identity: provisioning waits with its own (the
    provisioner's), one connection for every device it waits for at once, so neither the
    controller nor a parallel wait loses its session."""
    b = start_broker(tmp_path, auth="cert")
    try:
        ctl, outcome = b.connect_as(b.controller())
        assert ctl is not None, outcome
        online = encode_message(StatusMessage("online", time.time()))
        devices = {}
        for name in ("dev-1", "dev-2", "dev-3"):
            client, outcome = b.connect_as(b.device(name), client_id=name)
            assert client is not None, outcome
            devices[name] = client
        waited: dict = {}

        def wait(name: str) -> None:
            waited[name] = wait_online(b.folder, "f1", name, timeout=15)

        threads = [threading.Thread(target=wait, args=(n,)) for n in devices]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        for name, client in devices.items():
            client.publish(f"edgeship/f1/devices/{name}/status", online, retain=True)
        for thread in threads:
            thread.join(20)
        assert set(waited) == set(devices)
        assert not ctl.disconnected.is_set(), "the controller lost its session to provisioning"
        assert (b.folder.provisioner_dir / "connection.json").is_file()
        log = b.broker.log_path.read_text()
        assert log.count(" as edgeship-provisioner ") == 1, log[-3000:]  # one shared connection
        for client in (ctl, *devices.values()):
            client.close()
    finally:
        b.stop()
